//! Test support (filled by the registry work).
