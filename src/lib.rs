//! Shared helpers for the workspace tests and benches.
