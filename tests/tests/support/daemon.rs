//! A `tileflowd` of one test: temporary socket and store, CPU backend, the test's user as
//! admin; stopped with SIGTERM (or killed if the test fails first). Shared by the ctl and
//! Python client tests.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tileflow_tests::{bin, Run};

/// A daemon started by a test.
#[derive(Debug)]
pub struct TestDaemon {
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl TestDaemon {
    /// A temporary directory for the socket, store and config; nothing runs yet.
    pub fn new() -> TestDaemon {
        // Short, so that the socket path fits in sun_path.
        let dir = tempfile::Builder::new()
            .prefix("tfd-")
            .tempdir_in("/tmp")
            .unwrap();
        std::fs::create_dir_all(dir.path().join("state")).unwrap();
        TestDaemon { dir, child: None }
    }

    /// The store directory.
    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The socket path.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("tileflowd.sock")
    }

    /// Starts `tileflowd` with `args` (such as `--preload tiny`) and waits until `/health`
    /// answers.
    pub fn start(&mut self, args: &[&str]) {
        let config = self.dir.path().join("tileflowd.toml");
        // The test's own primary group may use admin routes (root may anyway).
        let group = Command::new("id")
            .arg("-gn")
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        std::fs::write(
            &config,
            format!(
                "[server]\nsocket_group = \"\"\nadmin_group = {group:?}\ndrain_grace = \"5s\"\n\
                 [log]\nlevel = \"warn\"\n"
            ),
        )
        .unwrap();
        let log = std::fs::File::create(self.dir.path().join("tileflowd.log")).unwrap();
        let mut cmd = Command::new(bin("tileflowd"));
        cmd.arg("--config")
            .arg(&config)
            .arg("--socket")
            .arg(self.socket())
            .arg("--state-dir")
            .arg(self.state())
            .args(["--device", "cpu"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("TILEFLOW_") {
                cmd.env_remove(key);
            }
        }
        self.child = Some(cmd.spawn().expect("cannot start tileflowd"));
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("tileflowd exited at start ({status}):\n{}", self.log());
            }
            if self.get("/health").is_some_and(|(code, _)| code == 200) {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "tileflowd did not answer:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("tileflowd.log")).unwrap_or_default()
    }

    /// `GET route` over the socket: status code and body (None if nothing answers).
    pub fn get(&self, route: &str) -> Option<(u16, String)> {
        let mut s = UnixStream::connect(self.socket()).ok()?;
        write!(
            s,
            "GET {route} HTTP/1.1\r\nHost: tileflowd\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut raw = String::new();
        s.read_to_string(&mut raw).ok()?;
        let code = raw.split(' ').nth(1)?.parse().ok()?;
        let body = raw.split_once("\r\n\r\n")?.1.to_string();
        Some((code, body))
    }

    /// Runs `tilectl ARGS…` against this daemon (TILEFLOW_SOCKET, no --state-dir), with
    /// `stdin` piped in.
    pub fn tilectl(&self, args: &[&str], stdin: &str) -> Run {
        tilectl_env(args, stdin, &[("TILEFLOW_SOCKET", self.socket().as_path())])
    }

    /// Like [`TestDaemon::tilectl`], panicking with the output if it fails.
    pub fn tilectl_ok(&self, args: &[&str]) -> Run {
        let run = self.tilectl(args, "");
        assert!(
            run.ok,
            "tilectl {args:?} failed:\n{}\n{}\ntileflowd:\n{}",
            run.stdout,
            run.stderr,
            self.log()
        );
        run
    }

    /// SIGTERM; the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("not started");
        let term = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("cannot run kill");
        assert!(term.success());
        child.wait().unwrap()
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs `tilectl` with a clean TILEFLOW_* environment plus `env`, `stdin` piped in.
pub fn tilectl_env(args: &[&str], stdin: &str, env: &[(&str, &Path)]) -> Run {
    let mut cmd = Command::new(bin("tilectl"));
    cmd.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("TILEFLOW_") {
            cmd.env_remove(key);
        }
    }
    // Not under `cargo run`: `tilectl demo` uses the tileflowd beside it without rebuilding.
    cmd.env_remove("CARGO");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("cannot start tilectl");
    let mut input = child.stdin.take().unwrap();
    let text = stdin.to_string();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(text.as_bytes());
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    out.into()
}
