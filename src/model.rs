//! Shared vocabulary.
