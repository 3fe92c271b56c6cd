//! systemd integration (placeholder until the config/systemd work lands): notifications are
//! no-ops and there is no socket activation.

/// `READY=1`.
pub fn notify_ready() {}

/// `STATUS=…`.
pub fn notify_status(_msg: &str) {}

/// `STOPPING=1`.
pub fn notify_stopping() {}

/// `WATCHDOG=1`.
pub fn notify_watchdog() {}
