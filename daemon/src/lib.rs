//! `tileflowd`'s library: configuration, systemd integration, the engine thread, the HTTP API
//! and metrics, wired together by `main.rs`.

pub mod api;
pub mod config;
pub mod engine;
pub mod metrics;
pub mod serve;
pub mod systemd;
