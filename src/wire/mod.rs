//! Zero-copy views of IP packet headers. Depends on nothing but `core`/`std`.
