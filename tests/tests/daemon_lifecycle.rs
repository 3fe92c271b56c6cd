//! The daemon as a process: SIGTERM drains running streams and exits 0 removing its socket,
//! SIGHUP keeps it serving, a stale socket file does not stop a start, a live one does.

use std::process::{Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::{json, Value};
use tileflow_tests::{bin, Daemon, SseStream, UdsClient};

const MODEL: &str = "olmoe";

fn long_stream(client: &UdsClient, i: u32) -> SseStream {
    let body = json!({
        "model": MODEL,
        "prompt": [1 + i, 2, 3, 4],
        "max_tokens": 200,
        "ignore_eos": true,
        "temperature": 0,
        "stream": true,
    });
    let s = client
        .stream_json("/v1/completions", &body)
        .unwrap_or_else(|e| panic!("{body}: {e}"));
    assert_eq!(s.status, 200);
    s
}

/// Reads a stream to its end: the number of text chunks, the finish reason, and whether it
/// ended with `[DONE]`.
fn finish(stream: &mut SseStream) -> (usize, Option<String>, bool) {
    let (mut chunks, mut reason, mut done) = (0, None, false);
    for data in stream.by_ref() {
        if data == "[DONE]" {
            done = true;
            continue;
        }
        let chunk: Value = serde_json::from_str(&data).unwrap_or_else(|e| panic!("{data}: {e}"));
        if let Some(r) = chunk["choices"][0]["finish_reason"].as_str() {
            reason = Some(r.to_string());
        } else {
            chunks += 1;
        }
    }
    (chunks, reason, done)
}

#[test]
fn sigterm_drains_running_streams_and_exits_0() {
    let mut daemon = Daemon::start(&[MODEL]);
    let client = daemon.client();
    let socket = daemon.socket().to_path_buf();
    let mut streams: Vec<SseStream> = (0..16).map(|i| long_stream(&client, i)).collect();
    for s in &mut streams {
        assert!(s.next_data().is_some(), "a first event");
    }
    daemon.signal(Signal::SIGTERM);
    // Every running stream completes (the drain grace is far longer than this work).
    let barrier = Arc::new(Barrier::new(streams.len()));
    let readers: Vec<_> = streams
        .into_iter()
        .map(|mut s| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                finish(&mut s)
            })
        })
        .collect();
    for (i, r) in readers.into_iter().enumerate() {
        let (chunks, reason, done) = r.join().expect("a reader");
        assert!(done, "stream {i} ended without [DONE]");
        assert_eq!(reason.as_deref(), Some("length"), "stream {i}");
        assert_eq!(chunks, 199, "stream {i}: text chunks after the first");
    }
    let status = daemon
        .wait_exit(tileflow_tests::STOP_TIMEOUT)
        .unwrap_or_else(|| panic!("no exit after SIGTERM; stderr:\n{}", daemon.stderr()));
    assert!(status.success(), "{status}; stderr:\n{}", daemon.stderr());
    assert!(!socket.exists(), "the socket file is left behind");
}

#[test]
fn sigterm_when_idle_and_sigint_exit_0() {
    for signal in [Signal::SIGTERM, Signal::SIGINT] {
        let mut daemon = Daemon::start(&[MODEL]);
        let socket = daemon.socket().to_path_buf();
        daemon.signal(signal);
        let status = daemon
            .wait_exit(tileflow_tests::STOP_TIMEOUT)
            .unwrap_or_else(|| panic!("no exit after {signal}; stderr:\n{}", daemon.stderr()));
        assert!(
            status.success(),
            "{signal}: {status}; stderr:\n{}",
            daemon.stderr()
        );
        assert!(!socket.exists(), "{signal}: the socket file is left behind");
    }
}

#[test]
fn sighup_keeps_serving() {
    let mut daemon = Daemon::start(&[MODEL]);
    let client = daemon.client();
    let mut stream = long_stream(&client, 7);
    daemon.signal(Signal::SIGHUP);
    let (_, reason, done) = finish(&mut stream);
    assert!(done && reason.as_deref() == Some("length"));
    daemon.assert_serving();
    let r = client.post_json(
        "/v1/completions",
        &json!({"model": MODEL, "prompt": [1, 2], "max_tokens": 3}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn a_stale_socket_is_replaced_and_a_live_one_is_not_stolen() {
    let mut first = Daemon::start(&[MODEL]);
    // A second daemon on the same socket refuses to start and leaves the first serving.
    let out = Command::new(bin("tileflowd"))
        .arg("--socket")
        .arg(first.socket())
        .arg("--state-dir")
        .arg(first.state_dir())
        .env("TILEFLOW_SERVER__SOCKET_GROUP", "")
        .stdin(Stdio::null())
        .output()
        .expect("run tileflowd");
    assert!(!out.status.success(), "a second daemon took a live socket");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("in use"), "{stderr}");
    first.assert_serving();

    // A socket file left by a daemon that was killed does not stop the next one.
    let socket = first.socket().to_path_buf();
    first.signal(Signal::SIGKILL);
    first
        .wait_exit(Duration::from_secs(30))
        .expect("SIGKILL ends it");
    assert!(socket.exists(), "SIGKILL leaves the socket file behind");
    let mut second = Command::new(bin("tileflowd"))
        .arg("--socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(first.state_dir())
        .args(["--preload", MODEL])
        .env("TILEFLOW_SERVER__SOCKET_GROUP", "")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start tileflowd");
    let client = UdsClient::new(&socket);
    let mut healthy = false;
    for _ in 0..(tileflow_tests::START_TIMEOUT.as_millis() / 50) {
        if let Ok(r) = client.request("GET", "/health", None, b"") {
            healthy = r.status == 200;
            if healthy {
                break;
            }
        }
        if let Ok(Some(status)) = second.try_wait() {
            panic!("the second daemon exited: {status}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let r = client.post_json(
        "/v1/completions",
        &json!({"model": MODEL, "prompt": [1, 2], "max_tokens": 3}),
    );
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(second.id()).unwrap_or(0)),
        Signal::SIGTERM,
    );
    let status = second.wait().expect("wait");
    assert!(
        healthy,
        "the daemon did not come up over a stale socket file"
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(status.success(), "{status}");
    assert!(!socket.exists());
}
