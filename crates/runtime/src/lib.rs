//! Process plumbing (placeholder).
