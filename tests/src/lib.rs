//! Helpers for the end-to-end tests, which start the real binaries.
