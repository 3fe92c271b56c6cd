//! SIGHUP re-reads the configuration: a broken file is refused and the old configuration keeps
//! serving; a valid change to a live key is applied. Socket activation: the daemon serves on
//! the socket systemd passes (through `systemd-socket-activate`, systemd's own harness).

use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::json;
use tileflow_tests::{bin, Daemon, UdsClient};

const MODEL: &str = "olmoe";

#[test]
fn sighup_with_a_broken_config_keeps_serving_and_a_valid_one_applies() {
    let mut d = Daemon::start(&[MODEL]);
    let config = d.dir().join("tileflowd.toml");
    std::fs::write(&config, "[scheduler]\nmax_runing = 4\n").unwrap();
    d.signal(Signal::SIGHUP);
    d.wait_until("the reload to be refused", Duration::from_secs(60), || {
        d.stderr().contains("keeping the old one")
    });
    let log = d.stderr();
    assert!(
        log.contains("scheduler.max_runing"),
        "the refusal does not name the key:\n{log}"
    );
    d.assert_serving();

    std::fs::write(
        &config,
        "[server]\nrequest_timeout = \"2m\"\n[engine]\ndevice = \"cpu\"\nthreads = 1\n[cache]\ndevice_bytes = \"64MiB\"\n",
    )
    .unwrap();
    d.signal(Signal::SIGHUP);
    d.wait_until("the reload to apply", Duration::from_secs(60), || {
        d.stderr().contains("take effect after a restart")
    });
    let log = d.stderr();
    assert!(
        log.contains("server.request_timeout") && log.contains("applied"),
        "{log}"
    );
    assert!(
        log.contains("take effect after a restart: engine.device, engine.threads"),
        "{log}"
    );
    assert!(
        log.contains("apply to models loaded after the reload: cache.device_bytes"),
        "{log}"
    );
    d.assert_serving();
    let r = d.client().post_json(
        "/v1/completions",
        &json!({"model": MODEL, "prompt": [1, 2], "max_tokens": 2}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(d.terminate().success());
}

#[test]
fn serves_on_a_socket_passed_by_systemd() {
    let harness = [
        "/usr/bin/systemd-socket-activate",
        "/bin/systemd-socket-activate",
    ]
    .into_iter()
    .find(|p| std::path::Path::new(p).exists());
    let Some(harness) = harness else {
        eprintln!("skipped: systemd-socket-activate is not installed (Debian package `systemd`)");
        return;
    };
    // A daemon that only imports the model; this test starts its own under the harness.
    let d = Daemon::builder().import_only(MODEL).start();
    let socket = d.dir().join("activated.sock");
    let config = d.dir().join("activated.toml");
    // The daemon's own bind would go to a different path: serving on `socket` proves it used fd 3.
    std::fs::write(
        &config,
        format!(
            "[server]\nsocket = {:?}\nsocket_group = \"\"\n[models]\nstate_dir = {:?}\npreload = [\"{MODEL}\"]\n",
            d.dir().join("never-bound.sock").display().to_string(),
            d.state_dir().display().to_string()
        ),
    )
    .unwrap();
    let mut child = Command::new(harness)
        .arg("--listen")
        .arg(&socket)
        .arg(bin("tileflowd"))
        .arg("--config")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start systemd-socket-activate");
    let client = UdsClient::new(&socket);
    let mut answer = None;
    for _ in 0..600 {
        if let Ok(r) = client.request("GET", "/health", None, b"") {
            answer = Some(r.status);
            break;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the harness exited: {status}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(answer, Some(200), "no answer on the activated socket");
    let r = client.post_json(
        "/v1/completions",
        &json!({"model": MODEL, "prompt": [1, 2], "max_tokens": 2}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        !d.dir().join("never-bound.sock").exists(),
        "the daemon bound its own socket"
    );
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        Signal::SIGTERM,
    );
    let status = child.wait().unwrap();
    assert!(status.success(), "daemon under the harness exited {status}");
}
