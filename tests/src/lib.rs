//! Helpers for the end-to-end tests, which start the real binaries.

mod daemon;
pub mod engine_help;
mod golden;
pub mod greedy;
mod uds_http;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

pub use daemon::{parse_metrics, Daemon, DaemonBuilder, START_TIMEOUT, STOP_TIMEOUT};
pub use golden::{golden, golden_cases, token_id, Continuation, GoldenCase, LOGPROB_TOLERANCE};
pub use uds_http::{
    parse_response, ChunkedReader, HttpResponse, SseEvent, SseStream, UdsClient, READ_TIMEOUT,
};

/// The repository root.
///
/// `TILEFLOW_REPO_ROOT` overrides it, for test binaries built here and run on another machine
/// (the GPU host) from a copy of the tree.
pub fn repo_root() -> PathBuf {
    if let Some(root) = std::env::var_os("TILEFLOW_REPO_ROOT") {
        return PathBuf::from(root);
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// A golden fixture directory (`tests/fixtures/<family>`).
pub fn fixture(family: &str) -> PathBuf {
    repo_root().join("tests/fixtures").join(family)
}

/// The fixture families.
pub const FAMILIES: [&str; 4] = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"];

/// Path of a workspace binary (`tilectl`, `tileflowd`), built fresh for this test run.
///
/// `cargo test` compiles other packages' binaries only as test harnesses, so the first call in
/// each test executable runs `cargo build --bins` for the ctl and daemon packages into the same
/// target directory and profile (a no-op when they are up to date).
pub fn bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let exe = std::env::current_exe().unwrap_or_default();
    // target/<profile>/deps/<test-exe> -> target/<profile>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let built = BUILT.get_or_init(|| {
        let profile = dir
            .file_name()
            .and_then(|p| p.to_str())
            .unwrap_or("debug")
            .to_string();
        let target = dir.parent().map(Path::to_path_buf).unwrap_or_default();
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args([
            "build",
            "--quiet",
            "--bins",
            "-p",
            "tileflow-ctl",
            "-p",
            "tileflow-daemon",
        ])
        .current_dir(repo_root())
        .env("CARGO_TARGET_DIR", &target);
        match profile.as_str() {
            "debug" => {}
            "release" => {
                cmd.arg("--release");
            }
            other => {
                cmd.args(["--profile", other]);
            }
        }
        match cmd.output() {
            Ok(o) if o.status.success() => Ok(()),
            Ok(o) => Err(String::from_utf8_lossy(&o.stderr).into_owned()),
            Err(e) => Err(format!("cannot run cargo: {e}")),
        }
    });
    if let Err(e) = built {
        panic!("cannot build the binaries under test:\n{e}");
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not found after building it",
        path.display()
    );
    path
}

/// The result of running `tilectl`.
#[derive(Debug)]
pub struct Run {
    /// Exit status was zero.
    pub ok: bool,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(o: Output) -> Run {
        Run {
            ok: o.status.success(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

/// Runs `tilectl --state-dir STATE ARGS…`.
pub fn tilectl(state: &Path, args: &[&str]) -> Run {
    Command::new(bin("tilectl"))
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .env_remove("TILEFLOW_STATE_DIR")
        .output()
        .unwrap_or_else(|e| panic!("cannot start tilectl: {e}"))
        .into()
}

/// Runs `tilectl` and panics with its output if it failed.
pub fn tilectl_ok(state: &Path, args: &[&str]) -> Run {
    let run = tilectl(state, args);
    assert!(
        run.ok,
        "tilectl {args:?} failed:\n{}\n{}",
        run.stdout, run.stderr
    );
    run
}
