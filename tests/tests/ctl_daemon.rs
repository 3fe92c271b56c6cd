//! `tilectl` as a client of the real `tileflowd`: the one-command demo, status, ps, model
//! list/show/import/load/unload/rm, streamed `run --prompt`, the interactive chat on piped
//! stdin, metrics, and the errors when no daemon answers.

#[allow(dead_code)]
#[path = "support/daemon.rs"]
mod daemon;

use std::path::Path;

use daemon::{tilectl_env, TestDaemon};
use serde_json::Value;
use tileflow_tests::{fixture, tilectl_ok};

fn json(run: &tileflow_tests::Run) -> Value {
    serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", run.stdout))
}

/// A daemon serving a store that holds the synthesized `tiny` model (not loaded).
fn daemon_with_tiny() -> TestDaemon {
    let mut d = TestDaemon::new();
    tilectl_ok(
        &d.state(),
        &["model", "synth", "--preset", "tiny", "--name", "tiny"],
    );
    d.start(&[]);
    d
}

fn prompt_tokens(d: &TestDaemon) -> u64 {
    json(&d.tilectl_ok(&["metrics", "--json"]))["prompt_tokens"]
        .as_u64()
        .unwrap()
}

#[test]
fn demo_runs_a_private_daemon_end_to_end() {
    // A TILEFLOW_SOCKET of the caller's is not the demo's business.
    let run = tilectl_env(
        &["demo", "--max-tokens", "8"],
        "",
        &[("TILEFLOW_SOCKET", Path::new("/nonexistent/tileflowd.sock"))],
    );
    assert!(run.ok, "demo failed:\n{}\n{}", run.stdout, run.stderr);
    for step in [
        "synthesized `tiny` into the store",
        "tileflowd ready",
        "POST /api/models/tiny/load: loaded",
        "POST /v1/chat/completions (streamed)",
        "8 generated",
        "GET /api/cache",
        "tileflowd drained and exited 0",
    ] {
        assert!(run.stderr.contains(step), "no {step:?} in:\n{}", run.stderr);
    }
    // The streamed reply, then the cache table with a row for tiny.
    let cache_header = run
        .stdout
        .lines()
        .position(|l| l.starts_with("MODEL") && l.contains("HIT RATIO"))
        .unwrap_or_else(|| panic!("no cache table:\n{}", run.stdout));
    assert!(cache_header >= 1, "{}", run.stdout);
    let row = run.stdout.lines().nth(cache_header + 1).unwrap_or_default();
    assert!(row.starts_with("tiny") && row.contains("device"), "{row}");
    // The temporary socket and store are gone.
    let socket = run
        .stderr
        .split(" on ")
        .nth(1)
        .and_then(|s| s.split(", store").next())
        .unwrap();
    assert!(socket.ends_with("tileflowd.sock"), "{socket}");
    assert!(
        !Path::new(socket).parent().unwrap().exists(),
        "{socket} left behind"
    );
}

#[test]
fn status_ps_and_models_through_the_daemon() {
    let mut d = daemon_with_tiny();
    let status = json(&d.tilectl_ok(&["status", "--json"]));
    assert_eq!(status["device"], "cpu");
    assert_eq!(status["models"].as_array().unwrap().len(), 0);
    let text = d.tilectl_ok(&["status"]).stdout;
    assert!(text.contains("none loaded"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("device") && l.trim_end().ends_with("cpu")),
        "{text}"
    );
    assert!(text.contains(d.socket().to_str().unwrap()), "{text}");

    let list = d.tilectl_ok(&["model", "list"]).stdout;
    let row = list.lines().find(|l| l.starts_with("tiny")).unwrap();
    assert!(
        row.contains("olmoe") && row.trim_end().ends_with("no"),
        "{list}"
    );
    assert!(list.lines().next().unwrap().contains("LOADED"), "{list}");

    d.tilectl_ok(&["model", "load", "tiny"]);
    let listed = json(&d.tilectl_ok(&["model", "list", "--json"]));
    assert_eq!(listed[0]["name"], "tiny");
    assert_eq!(listed[0]["loaded"], true);
    let shown = json(&d.tilectl_ok(&["model", "show", "tiny", "--json"]));
    assert_eq!(shown["spec"]["vocab_size"], 2048, "{shown}");
    let ps = json(&d.tilectl_ok(&["ps", "--json"]));
    assert_eq!(ps[0]["name"], "tiny");
    assert!(ps[0]["kv_blocks"].as_u64().unwrap() > 0, "{ps}");
    let ps = d.tilectl_ok(&["ps"]).stdout;
    assert!(ps.lines().next().unwrap().starts_with("NAME"), "{ps}");
    assert!(ps.lines().nth(1).unwrap().starts_with("tiny "), "{ps}");

    // Import through the daemon (NDJSON progress), then remove it.
    let olmoe = fixture("olmoe");
    let run = d.tilectl_ok(&[
        "model",
        "import",
        olmoe.to_str().unwrap(),
        "--name",
        "olmoe",
    ]);
    assert!(run.stderr.contains("imported olmoe"), "{}", run.stderr);
    let names: Vec<Value> = json(&d.tilectl_ok(&["model", "list", "--json"]))
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].clone())
        .collect();
    assert!(names.contains(&Value::from("olmoe")), "{names:?}");
    // A failed import reports the daemon's error line.
    let bad = d.tilectl(&["model", "import", "/", "--name", "root"], "");
    assert!(
        !bad.ok && bad.stderr.contains("import_error"),
        "{}",
        bad.stderr
    );
    d.tilectl_ok(&["model", "rm", "olmoe"]);
    // (`tiny` is of the olmoe family: look at the names.)
    let list = d.tilectl_ok(&["model", "list"]).stdout;
    assert!(!list.lines().any(|l| l.starts_with("olmoe ")), "{list}");

    d.tilectl_ok(&["model", "unload", "tiny"]);
    assert_eq!(json(&d.tilectl_ok(&["ps", "--json"])), Value::Array(vec![]));
    let again = d.tilectl(&["model", "unload", "tiny"], "");
    assert!(
        !again.ok && again.stderr.contains("not loaded") && again.stderr.contains("404"),
        "{}",
        again.stderr
    );
    let missing = d.tilectl(&["model", "load", "nosuch"], "");
    assert!(
        !missing.ok && missing.stderr.contains("nosuch"),
        "{}",
        missing.stderr
    );
    assert!(d.stop().success(), "{}", d.log());
}

#[test]
fn run_streams_through_the_daemon_like_offline() {
    let mut d = daemon_with_tiny();
    d.tilectl_ok(&["model", "load", "tiny"]);
    let args = [
        "run",
        "tiny",
        "--prompt",
        "The tile cache",
        "--max-tokens",
        "8",
    ];
    let online = d.tilectl_ok(&args);
    assert!(online.stderr.contains("8 generated"), "{}", online.stderr);
    // Greedy through the daemon is greedy in-process on the same store.
    let offline = tilectl_ok(&d.state(), &args);
    assert_eq!(online.stdout, offline.stdout);
    assert!(!online.stdout.trim().is_empty());

    // Several prompts go together; token-id prompts; JSON answers.
    let both = d.tilectl_ok(&[
        "run",
        "tiny",
        "-p",
        "The tile cache",
        "-p",
        "Experts",
        "--max-tokens",
        "8",
    ]);
    assert!(
        both.stdout
            .starts_with(&format!("[0] {}", online.stdout.trim_end_matches('\n'))),
        "{}",
        both.stdout
    );
    assert!(both.stdout.contains("\n[1] "), "{}", both.stdout);
    let ids = json(&d.tilectl_ok(&[
        "run",
        "tiny",
        "--prompt-ids",
        "5,6,7",
        "--max-tokens",
        "4",
        "--ignore-eos",
        "--json",
    ]));
    assert_eq!(ids["usage"]["prompt_tokens"], 3, "{ids}");
    assert_eq!(ids["usage"]["completion_tokens"], 4, "{ids}");

    // The interactive chat on piped stdin keeps the conversation: the second turn's prompt
    // holds the first exchange, so it costs more than twice a lone first turn.
    let before = prompt_tokens(&d);
    let one = d.tilectl(&["run", "tiny", "--max-tokens", "6"], "Hello\n");
    assert!(one.ok, "{}", one.stderr);
    let lone = prompt_tokens(&d) - before;
    let two = d.tilectl(
        &["run", "tiny", "--max-tokens", "6"],
        "Hello\n\nHello\n/bye\nnot sent\n",
    );
    assert!(two.ok, "{}", two.stderr);
    let pair = prompt_tokens(&d) - before - lone;
    assert!(
        pair > 2 * lone,
        "two turns cost {pair} prompt tokens, one {lone}"
    );
    assert!(
        two.stdout.starts_with(&one.stdout),
        "{}\n---\n{}",
        one.stdout,
        two.stdout
    );

    let metrics = d.tilectl_ok(&["metrics"]).stdout;
    for line in [
        "requests",
        "generated tokens",
        "time to first token",
        "hit ratio",
    ] {
        assert!(metrics.contains(line), "no {line:?} in:\n{metrics}");
    }
    let raw = d.tilectl_ok(&["metrics", "--raw"]).stdout;
    assert!(raw.contains("tileflow_generation_tokens_total"), "{raw}");

    // A model that is not loaded: the daemon's error object, and a chat that does not start.
    let run = d.tilectl(&["run", "nosuch", "--prompt", "x"], "");
    assert!(
        !run.ok && run.stderr.contains("not_found_error, model_not_found"),
        "{}",
        run.stderr
    );
    let run = d.tilectl(&["run", "nosuch"], "hi\n");
    assert!(
        !run.ok && run.stderr.contains("not loaded"),
        "{}",
        run.stderr
    );
    // The daemon's device is its own: --device is for offline runs.
    let run = d.tilectl(&["run", "tiny", "--prompt", "x", "--device", "cpu"], "");
    assert!(
        !run.ok
            && run
                .stderr
                .contains("--device cpu chooses the device of an --offline run"),
        "{}",
        run.stderr
    );
    assert!(d.stop().success(), "{}", d.log());
}

#[test]
fn without_a_daemon_errors_name_the_socket_and_offline_still_works() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nobody.sock");
    let env = [("TILEFLOW_SOCKET", socket.as_path())];
    for args in [
        &["status"][..],
        &["model", "list"],
        &["run", "m", "-p", "x"],
    ] {
        let run = tilectl_env(args, "", &env);
        assert!(!run.ok, "{args:?} succeeded");
        let want = format!(
            "cannot connect to {}: is tileflowd running?",
            socket.display()
        );
        assert!(run.stderr.contains(&want), "{args:?}: {}", run.stderr);
        assert!(run.stderr.contains("--offline"), "{args:?}: {}", run.stderr);
    }
    // --state-dir and --offline act on the store, whatever the socket.
    let state = dir.path().join("state");
    let run = tilectl_env(
        &[
            "--state-dir",
            state.to_str().unwrap(),
            "model",
            "list",
            "--json",
        ],
        "",
        &env,
    );
    assert!(run.ok && run.stdout.trim() == "[]", "{}", run.stderr);
    let run = tilectl_env(
        &["--offline", "model", "list"],
        "",
        &[
            ("TILEFLOW_SOCKET", socket.as_path()),
            ("TILEFLOW_STATE_DIR", state.as_path()),
        ],
    );
    assert!(run.ok, "{}", run.stderr);
    // Commands that only the daemon can answer say so offline.
    for args in [
        &["--offline", "status"][..],
        &["--offline", "model", "load", "m"],
    ] {
        let run = tilectl_env(args, "", &env);
        assert!(
            !run.ok && run.stderr.contains("drop --offline"),
            "{}",
            run.stderr
        );
    }
    let help = tilectl_env(&["--help"], "", &env);
    assert!(
        help.stdout.contains("Where commands act"),
        "{}",
        help.stdout
    );
}
