//! The Python client (`client/python/`) against the real daemon: its checks run with
//! TILEFLOW_SOCKET pointing at a `tileflowd` serving the `tiny` model. Without `python3` or
//! `httpx` the test says why it skips and passes (CI installs httpx: `.ci/run`); the OpenAI
//! SDK example runs too when `openai` is installed.

#[allow(dead_code)]
#[path = "support/daemon.rs"]
mod daemon;

use std::process::Command;

use daemon::TestDaemon;
use tileflow_tests::{repo_root, tilectl_ok};

/// Whether `python3` can import `module`.
fn python_has(module: &str) -> Result<(), String> {
    match Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .output()
    {
        Err(e) => Err(format!("python3 cannot be run ({e})")),
        Ok(o) if !o.status.success() => Err(format!(
            "python3 has no {module} ({})",
            String::from_utf8_lossy(&o.stderr)
                .trim()
                .lines()
                .last()
                .unwrap_or("")
        )),
        Ok(_) => Ok(()),
    }
}

fn python(d: &TestDaemon, script: &str, args: &[&str]) -> String {
    let out = Command::new("python3")
        .arg(repo_root().join("client/python").join(script))
        .args(args)
        .env("TILEFLOW_SOCKET", d.socket())
        .env("TILEFLOW_TEST_MODEL", "tiny")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .expect("cannot run python3");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{script} failed:\n{stdout}\n{}\ntileflowd:\n{}",
        String::from_utf8_lossy(&out.stderr),
        d.log()
    );
    stdout
}

#[test]
fn python_client_against_the_daemon() {
    if let Err(why) = python_has("httpx") {
        eprintln!(
            "SKIPPED python_client_against_the_daemon: {why}; install it with \
             `python3 -m pip install httpx` to run this test"
        );
        return;
    }
    let mut d = TestDaemon::new();
    tilectl_ok(
        &d.state(),
        &["model", "synth", "--preset", "tiny", "--name", "tiny"],
    );
    d.start(&["--preload", "tiny"]);
    let out = python(&d, "test_tileflow_client.py", &[]);
    assert!(out.contains("5 passed"), "{out}");
    match python_has("openai") {
        Ok(()) => {
            let out = python(&d, "example_openai.py", &["tiny"]);
            assert!(out.contains("models: ['tiny']"), "{out}");
            assert!(out.contains("completion_tokens=8"), "{out}");
        }
        Err(why) => eprintln!("skipping example_openai.py: {why}"),
    }
    assert!(d.stop().success(), "{}", d.log());
}
