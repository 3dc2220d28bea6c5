//! Registries, the allocator and the lease manager.
