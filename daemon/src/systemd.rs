//! systemd integration: readiness, status and stop notifications, the watchdog, socket
//! activation, and binding the API socket ourselves when systemd did not pass one.
//!
//! Every notification is a no-op when `NOTIFY_SOCKET` is unset (not started by systemd, or a
//! unit without `Type=notify`), so the daemon calls them unconditionally. A failed notification
//! is logged, never fatal: the service manager going away must not take the daemon with it.

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sd_notify::NotifyState;

use crate::config::ServerConfig;

fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!("cannot notify systemd ({states:?}): {e}");
    }
}

/// `READY=1`: the socket is bound and preloaded models are resident.
pub fn notify_ready() {
    notify(&[NotifyState::Ready]);
}

/// `RELOADING=1` with the current monotonic time, at the start of a SIGHUP re-read; follow with
/// [`notify_ready`] when done.
pub fn notify_reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => notify(&[NotifyState::Reloading, now]),
        Err(_) => notify(&[NotifyState::Reloading]),
    }
}

/// `STATUS=…`: one line shown by `systemctl status` (newlines become spaces).
pub fn notify_status(message: &str) {
    let line = message.replace(['\n', '\r'], " ");
    notify(&[NotifyState::Status(&line)]);
}

/// `EXTEND_TIMEOUT_USEC=…`: asks for `extra` more time to finish starting (or stopping), from
/// now; sent repeatedly during long model loads so `TimeoutStartSec=` does not kill the daemon.
pub fn notify_extend_timeout(extra: Duration) {
    let usec = u32::try_from(extra.as_micros()).unwrap_or(u32::MAX);
    notify(&[NotifyState::ExtendTimeoutUsec(usec)]);
}

/// `STOPPING=1`: draining after SIGTERM.
pub fn notify_stopping() {
    notify(&[NotifyState::Stopping]);
}

/// The watchdog interval (`WatchdogSec=`) if systemd enabled one for this process; the daemon
/// must send [`notify_watchdog`] more often than this (every half interval is customary).
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().filter(|d| !d.is_zero())
}

/// `WATCHDOG=1`: the engine loop is alive. Prefer [`WatchdogFeeder`], which rate-limits.
pub fn notify_watchdog() {
    notify(&[NotifyState::Watchdog]);
}

/// Feeds the systemd watchdog from a loop that runs far more often than the watchdog interval
/// (the engine's step loop), sending `WATCHDOG=1` at most once per half interval. Owned by the
/// loop itself, so a hung step means a missed ping and systemd restarts the daemon.
#[derive(Debug, Clone)]
pub struct WatchdogFeeder {
    period: Duration,
    last: Option<Instant>,
}

impl WatchdogFeeder {
    /// A feeder for the interval systemd set, `None` when the watchdog is off.
    pub fn from_env() -> Option<WatchdogFeeder> {
        watchdog_interval().map(WatchdogFeeder::with_interval)
    }

    /// A feeder for a given watchdog interval.
    pub fn with_interval(interval: Duration) -> WatchdogFeeder {
        WatchdogFeeder {
            period: interval / 2,
            last: None,
        }
    }

    /// Sends `WATCHDOG=1` if half an interval has passed since the last one.
    pub fn feed(&mut self) {
        if self.due(Instant::now()) {
            notify_watchdog();
        }
    }

    /// Whether a ping is due at `now`; if so, records it as sent.
    fn due(&mut self, now: Instant) -> bool {
        let due = self
            .last
            .is_none_or(|last| now.saturating_duration_since(last) >= self.period);
        if due {
            self.last = Some(now);
        }
        due
    }
}

/// Why the API socket could not be had.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// `LISTEN_PID` or `LISTEN_FDS` is not a number.
    #[error("malformed socket activation environment: {0}")]
    ActivationEnv(String),
    /// The descriptor systemd passed is not a Unix stream socket.
    #[error("socket activation passed fd 3, which is not a Unix stream socket")]
    NotUnixListener(#[source] io::Error),
    /// Something other than a socket is at the path.
    #[error("{} exists and is not a socket; refusing to replace it", path.display())]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// A live process accepts connections on the path.
    #[error("{} is in use: another process accepts connections on it", path.display())]
    InUse {
        /// The path.
        path: PathBuf,
    },
    /// The path could not be inspected, probed or cleaned up.
    #[error("cannot check or remove the old socket {}", path.display())]
    Stale {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The socket's directory could not be created.
    #[error("cannot create socket directory {}", dir.display())]
    CreateDir {
        /// The directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// `bind(2)` failed.
    #[error("cannot bind {}", path.display())]
    Bind {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// `chmod(2)` failed.
    #[error("cannot set mode {mode:04o} on {}", path.display())]
    Chmod {
        /// The path.
        path: PathBuf,
        /// The mode.
        mode: u32,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The configured group does not exist (fatal when running as root).
    #[error("group {group:?} for {} does not exist (server.socket_group)", path.display())]
    NoGroup {
        /// The path.
        path: PathBuf,
        /// The group.
        group: String,
    },
    /// `chown(2)` to the group failed (fatal when running as root).
    #[error("cannot give {} to group {group:?}", path.display())]
    Chgrp {
        /// The path.
        path: PathBuf,
        /// The group.
        group: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// How many descriptors systemd passed to process `pid`, given `LISTEN_PID` and `LISTEN_FDS`.
fn activation_fd_count(
    listen_pid: Option<&str>,
    listen_fds: Option<&str>,
    pid: u32,
) -> Result<u32, SocketError> {
    let (Some(listen_pid), Some(listen_fds)) = (listen_pid, listen_fds) else {
        return Ok(0);
    };
    let listen_pid: u32 = listen_pid
        .trim()
        .parse()
        .map_err(|_| SocketError::ActivationEnv(format!("LISTEN_PID={listen_pid:?}")))?;
    if listen_pid != pid {
        // Meant for a parent that exec'd us without clearing it; not ours to take.
        return Ok(0);
    }
    listen_fds
        .trim()
        .parse()
        .map_err(|_| SocketError::ActivationEnv(format!("LISTEN_FDS={listen_fds:?}")))
}

/// The listening socket systemd passed (socket activation: `LISTEN_PID` is this process and
/// `LISTEN_FDS` ≥ 1; the socket is fd 3), or `None` when not socket-activated. Clears the
/// variables so that children do not inherit them: call it once, before spawning threads. The
/// listener is in blocking mode as passed; set it non-blocking before handing it to tokio.
pub fn listen_fds() -> Result<Option<UnixListener>, SocketError> {
    let var = |name| std::env::var(name).ok();
    let count = activation_fd_count(
        var("LISTEN_PID").as_deref(),
        var("LISTEN_FDS").as_deref(),
        std::process::id(),
    )?;
    if count == 0 {
        return Ok(None);
    }
    if count > 1 {
        tracing::warn!("systemd passed {count} sockets; tileflowd uses only the first");
    }
    // listenfd checks that the descriptor is a Unix stream socket before taking ownership of it.
    listenfd::ListenFd::from_env()
        .take_unix_listener(0)
        .map_err(SocketError::NotUnixListener)
}

/// Binds the API socket at `path`: removes a stale socket file left by a previous run (only if
/// it is a socket and nothing accepts on it), creates the parent directory if needed, binds,
/// sets `mode` and, unless `group` is empty, gives the file to `group` (a name, or a numeric
/// gid). A missing group or a failed chgrp is an error as root and a warning otherwise, so an
/// unprivileged developer can run the daemon with the default config.
pub fn bind_socket(path: &Path, mode: u32, group: &str) -> Result<UnixListener, SocketError> {
    remove_stale(path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).map_err(|source| SocketError::CreateDir {
            dir: dir.to_path_buf(),
            source,
        })?;
    }
    // Bound with 0777 & !umask. Under systemd's default umask (0022) that is 0755, which lets
    // only the owner connect (connecting needs write permission) until the chmod below.
    let listener = UnixListener::bind(path).map_err(|source| SocketError::Bind {
        path: path.to_path_buf(),
        source,
    })?;
    let finish = || -> Result<(), SocketError> {
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(|source| {
            SocketError::Chmod {
                path: path.to_path_buf(),
                mode,
                source,
            }
        })?;
        if !group.is_empty() {
            set_group(path, group)?;
        }
        Ok(())
    };
    if let Err(e) = finish() {
        let _ = fs::remove_file(path);
        return Err(e);
    }
    Ok(listener)
}

/// Removes `path` if it is a socket that nothing accepts on.
fn remove_stale(path: &Path) -> Result<(), SocketError> {
    let stale = |source| SocketError::Stale {
        path: path.to_path_buf(),
        source,
    };
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(stale(e)),
    };
    if !meta.file_type().is_socket() {
        return Err(SocketError::NotASocket {
            path: path.to_path_buf(),
        });
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(SocketError::InUse {
            path: path.to_path_buf(),
        }),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            tracing::info!("removing stale socket {}", path.display());
            match fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(stale(e)),
                _ => Ok(()),
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(stale(e)),
    }
}

/// Gives `path` to `group`; see [`bind_socket`] for when failures are only warnings.
fn set_group(path: &Path, group: &str) -> Result<(), SocketError> {
    let privileged = nix::unistd::geteuid().is_root();
    let gid = match nix::unistd::Group::from_name(group) {
        Ok(Some(g)) => Some(g.gid.as_raw()),
        Ok(None) => group.parse::<u32>().ok(),
        Err(errno) => {
            let source = io::Error::from(errno);
            if privileged {
                return Err(SocketError::Chgrp {
                    path: path.to_path_buf(),
                    group: group.to_owned(),
                    source,
                });
            }
            tracing::warn!("cannot look up group {group:?} ({source}); leaving the socket's group");
            return Ok(());
        }
    };
    let Some(gid) = gid else {
        if privileged {
            return Err(SocketError::NoGroup {
                path: path.to_path_buf(),
                group: group.to_owned(),
            });
        }
        tracing::warn!(
            "group {group:?} does not exist; {} keeps the daemon's group",
            path.display()
        );
        return Ok(());
    };
    match std::os::unix::fs::chown(path, None, Some(gid)) {
        Ok(()) => Ok(()),
        Err(source) if privileged => Err(SocketError::Chgrp {
            path: path.to_path_buf(),
            group: group.to_owned(),
            source,
        }),
        Err(e) => {
            tracing::warn!("cannot give {} to group {group:?}: {e}", path.display());
            Ok(())
        }
    }
}

/// The API socket file this process created; dropping it removes the file, unless something
/// else is at the path by then (not a socket, or another inode).
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    inode: Option<(u64, u64)>,
}

impl SocketFile {
    /// Takes charge of the socket file now at `path`.
    pub fn new(path: &Path) -> SocketFile {
        SocketFile {
            path: path.to_path_buf(),
            inode: fs::symlink_metadata(path).ok().map(|m| (m.dev(), m.ino())),
        }
    }

    /// The path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let same = fs::symlink_metadata(&self.path)
            .ok()
            .filter(|m| m.file_type().is_socket())
            .map(|m| (m.dev(), m.ino()));
        if same.is_some() && same == self.inode {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// The API socket, however it was obtained.
#[derive(Debug)]
pub struct ApiSocket {
    /// The listener (blocking mode; set it non-blocking before handing it to tokio).
    pub listener: UnixListener,
    /// systemd passed it (socket activation) rather than this process binding it.
    pub activated: bool,
    /// The file to remove at exit, when this process bound it.
    pub file: Option<SocketFile>,
}

/// The socket systemd passed, else a fresh one bound at `server.socket` with the configured mode
/// and group.
pub fn open_api_socket(server: &ServerConfig) -> Result<ApiSocket, SocketError> {
    if let Some(listener) = listen_fds()? {
        let passed = listener
            .local_addr()
            .ok()
            .and_then(|a| a.as_pathname().map(Path::to_path_buf));
        if passed.as_deref() != Some(server.socket.as_path()) {
            tracing::warn!(
                "systemd passed the socket {passed:?}, not server.socket {}; serving on the \
                 one passed",
                server.socket.display()
            );
        }
        return Ok(ApiSocket {
            listener,
            activated: true,
            file: None,
        });
    }
    let listener = bind_socket(
        &server.socket,
        server.socket_mode.bits(),
        &server.socket_group,
    )?;
    Ok(ApiSocket {
        listener,
        activated: false,
        file: Some(SocketFile::new(&server.socket)),
    })
}

#[cfg(test)]
mod tests;
