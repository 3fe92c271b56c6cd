//! `tileflowd`'s library: configuration and systemd integration, wired together by `main.rs`.

pub mod config;
pub mod systemd;
