//! A real `tileflowd` for a test: fixtures imported into a temporary state dir, the daemon on a
//! temporary socket, stopped (SIGTERM, then SIGKILL) when the guard is dropped.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

use crate::uds_http::UdsClient;
use crate::{bin, fixture, tilectl_ok};

/// How long the daemon may take to answer `/health` after it starts.
pub const START_TIMEOUT: Duration = Duration::from_secs(120);
/// How long SIGTERM may take before the guard resorts to SIGKILL.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// How to start a daemon: which fixtures to import (and preload) and which extra flags.
#[derive(Debug, Clone, Default)]
pub struct DaemonBuilder {
    imports: Vec<String>,
    preload: Vec<String>,
    args: Vec<String>,
    env: Vec<(String, String)>,
    state: Option<PathBuf>,
}

impl DaemonBuilder {
    /// Imports the fixture `family` under its own name and preloads it.
    pub fn model(mut self, family: &str) -> DaemonBuilder {
        self.imports.push(family.to_string());
        self.preload.push(family.to_string());
        self
    }

    /// Imports and preloads each of `families`.
    pub fn models(self, families: &[&str]) -> DaemonBuilder {
        families.iter().fold(self, |b, f| b.model(f))
    }

    /// Imports the fixture `family` without loading it.
    pub fn import_only(mut self, family: &str) -> DaemonBuilder {
        self.imports.push(family.to_string());
        self
    }

    /// Preloads `name`, a model already in the store (see [`DaemonBuilder::state_dir`]).
    pub fn preload(mut self, name: &str) -> DaemonBuilder {
        self.preload.push(name.to_string());
        self
    }

    /// Uses `state` as the state directory (a store the test prepared, such as one with a
    /// damaged pack) instead of a fresh one; fixtures given with `model` are imported into it.
    pub fn state_dir(mut self, state: &Path) -> DaemonBuilder {
        self.state = Some(state.to_path_buf());
        self
    }

    /// Adds command-line arguments.
    pub fn args(mut self, args: &[&str]) -> DaemonBuilder {
        self.args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// Sets an environment variable of the daemon.
    pub fn env(mut self, key: &str, value: &str) -> DaemonBuilder {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// Imports the fixtures, starts the daemon and waits until `/health` answers 200.
    pub fn start(self) -> Daemon {
        let dir = temp_dir_for_socket();
        let state = self
            .state
            .clone()
            .unwrap_or_else(|| dir.path().join("state"));
        for family in &self.imports {
            tilectl_ok(
                &state,
                &[
                    "model",
                    "import",
                    fixture(family).to_str().unwrap_or_default(),
                    "--name",
                    family,
                ],
            );
        }
        let socket = dir.path().join("tileflowd.sock");
        let log_path = dir.path().join("tileflowd.stderr");
        let log = File::create(&log_path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", log_path.display()));
        let mut cmd = Command::new(bin("tileflowd"));
        cmd.arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(&state)
            .args(self.preload.iter().flat_map(|p| ["--preload", p.as_str()]))
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        for (k, _) in std::env::vars() {
            if k.starts_with("TILEFLOW_") || k == "LISTEN_FDS" || k == "NOTIFY_SOCKET" {
                cmd.env_remove(k);
            }
        }
        // The host's /etc/tileflow is not the test's: an empty config file of its own, and the
        // socket left in the test's group (the `tileflow` group need not exist here).
        let config = dir.path().join("tileflowd.toml");
        std::fs::write(&config, "")
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", config.display()));
        cmd.arg("--config").arg(&config);
        cmd.env("TILEFLOW_SERVER__SOCKET_GROUP", "");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start tileflowd: {e}"));
        let mut daemon = Daemon {
            child: Some(child),
            socket,
            state,
            log_path,
            dir,
        };
        daemon.wait_healthy();
        daemon
    }
}

/// A temporary directory short enough for a socket path (sun_path holds 108 bytes).
fn temp_dir_for_socket() -> tempfile::TempDir {
    let make = |base: &Path| {
        tempfile::Builder::new()
            .prefix("tileflowd-test-")
            .tempdir_in(base)
    };
    let dir = make(&std::env::temp_dir())
        .unwrap_or_else(|e| panic!("cannot create a temporary directory: {e}"));
    if dir.path().join("tileflowd.sock").as_os_str().len() < 100 {
        return dir;
    }
    make(Path::new("/tmp")).unwrap_or_else(|e| panic!("cannot create a directory in /tmp: {e}"))
}

/// A running `tileflowd`; dropping it stops it (SIGTERM, then SIGKILL) and removes its files.
#[derive(Debug)]
pub struct Daemon {
    child: Option<Child>,
    socket: PathBuf,
    state: PathBuf,
    log_path: PathBuf,
    dir: tempfile::TempDir,
}

impl Daemon {
    /// A builder: add fixtures and flags, then `start()`.
    pub fn builder() -> DaemonBuilder {
        DaemonBuilder::default()
    }

    /// A daemon with these fixtures imported and preloaded, default flags.
    pub fn start(families: &[&str]) -> Daemon {
        Daemon::builder().models(families).start()
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The state directory.
    pub fn state_dir(&self) -> &Path {
        &self.state
    }

    /// The temporary directory holding the socket, the state and the log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A client of the daemon's socket.
    pub fn client(&self) -> UdsClient {
        UdsClient::new(&self.socket)
    }

    /// The daemon's process id.
    pub fn pid(&self) -> Pid {
        let id = self.child.as_ref().map_or(0, Child::id);
        Pid::from_raw(i32::try_from(id).unwrap_or(0))
    }

    /// What the daemon wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Sends `signal` to the daemon.
    pub fn signal(&self, signal: Signal) {
        if self.child.is_some() {
            kill(self.pid(), signal).unwrap_or_else(|e| panic!("cannot send {signal}: {e}"));
        }
    }

    /// Whether the process has exited (reaping it if so).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        child
            .try_wait()
            .unwrap_or_else(|e| panic!("cannot wait for tileflowd: {e}"))
    }

    /// Waits (bounded) for the daemon to exit; None if it is still running after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM and waits for the exit; panics with stderr if it does not exit in time.
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal(Signal::SIGTERM);
        self.wait_exit(STOP_TIMEOUT).unwrap_or_else(|| {
            panic!(
                "tileflowd did not exit within {STOP_TIMEOUT:?} of SIGTERM; stderr:\n{}",
                self.stderr()
            )
        })
    }

    /// Panics with stderr unless the daemon is running and `/health` answers 200.
    pub fn assert_serving(&mut self) {
        if let Some(status) = self.exited() {
            panic!("tileflowd exited ({status}); stderr:\n{}", self.stderr());
        }
        let health = self.client().request("GET", "/health", None, b"");
        match health {
            Ok(r) if r.status == 200 => {}
            other => panic!(
                "tileflowd does not answer /health: {other:?}; stderr:\n{}",
                self.stderr()
            ),
        }
    }

    fn wait_healthy(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.exited() {
                panic!(
                    "tileflowd exited during startup ({status}); stderr:\n{}",
                    self.stderr()
                );
            }
            if let Ok(r) = self.client().request("GET", "/health", None, b"") {
                if r.status == 200 {
                    return;
                }
            }
            if Instant::now() >= deadline {
                panic!(
                    "tileflowd did not answer /health within {START_TIMEOUT:?}; stderr:\n{}",
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// `GET /api/status` as JSON.
    pub fn status(&self) -> Value {
        let r = self.client().get("/api/status");
        assert_eq!(r.status, 200, "/api/status: {}", r.text());
        r.json()
    }

    /// The status entry of one loaded model.
    pub fn model_status(&self, model: &str) -> Value {
        let status = self.status();
        status["models"]
            .as_array()
            .and_then(|ms| ms.iter().find(|m| m["name"] == model).cloned())
            .unwrap_or_else(|| panic!("{model} is not in /api/status: {status}"))
    }

    /// Polls `cond` (bounded by `timeout`) until it holds; panics with `what` and stderr if not.
    pub fn wait_until(&self, what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + timeout;
        while !cond() {
            if Instant::now() >= deadline {
                panic!(
                    "timed out after {timeout:?} waiting until {what}; stderr:\n{}",
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(None) = child.try_wait() {
            let pid = Pid::from_raw(i32::try_from(child.id()).unwrap_or(0));
            let _ = kill(pid, Signal::SIGTERM);
            let deadline = Instant::now() + STOP_TIMEOUT;
            while let Ok(None) = child.try_wait() {
                if Instant::now() >= deadline {
                    let _ = child.kill();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = child.wait();
    }
}

/// Prometheus text: the value of each sample, keyed by name with its labels as written
/// (`tileflow_requests_total{model="m",finish_reason="length"}`).
pub fn parse_metrics(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            Some((key.to_string(), value.parse().ok()?))
        })
        .collect()
}
