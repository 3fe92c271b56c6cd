//! The CUDA backend. Built behind the `cuda` feature; empty until the CUDA issue lands.
