//! Admin routes over the socket: root may list, import, load, unload and remove models; a peer
//! that is neither root nor in the admin group gets 403 on them (SO_PEERCRED) but may still use
//! inference and read-only routes.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::Command;

use serde_json::{json, Value};
use tileflow_tests::{fixture, Daemon, HttpResponse, UdsClient};

/// Set in the child process that plays the non-admin client.
const CHILD_SOCKET_ENV: &str = "TILEFLOW_TEST_NOBODY_SOCKET";

fn ok_json(r: &HttpResponse, what: &str) -> Value {
    assert_eq!(r.status, 200, "{what}: {}", r.text());
    r.json()
}

fn stored(client: &UdsClient) -> Vec<(String, bool)> {
    let list = ok_json(&client.get("/api/models"), "GET /api/models");
    let mut out: Vec<(String, bool)> = list["models"]
        .as_array()
        .expect("models")
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap_or_default().to_string(),
                m["loaded"] == true,
            )
        })
        .collect();
    out.sort();
    out
}

fn served(client: &UdsClient) -> Vec<String> {
    let list = ok_json(&client.get("/v1/models"), "GET /v1/models");
    assert_eq!(list["object"], "list");
    list["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|m| m["id"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn generate(client: &UdsClient, model: &str) -> HttpResponse {
    client.post_json(
        "/v1/completions",
        &json!({"model": model, "prompt": [1, 2, 3], "max_tokens": 4}),
    )
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

#[test]
fn root_manages_models_over_the_socket() {
    if !is_root() {
        eprintln!("skipped: admin routes need root or the tileflow-admin group; not root");
        return;
    }
    let daemon = Daemon::builder()
        .model("mixtral")
        .import_only("olmoe")
        .start();
    let client = daemon.client();
    assert_eq!(
        stored(&client),
        [("mixtral".into(), true), ("olmoe".into(), false)]
    );
    assert_eq!(served(&client), ["mixtral"]);
    let shown = ok_json(&client.get("/api/models/olmoe"), "show");
    assert_eq!(shown["family"], "olmoe");
    assert_eq!(shown["loaded"], false);

    // load / unload
    let r = ok_json(
        &client.post_json("/api/models/olmoe/load", &json!({})),
        "load",
    );
    assert_eq!(r["status"], "loaded");
    assert_eq!(served(&client), ["mixtral", "olmoe"]);
    assert_eq!(generate(&client, "olmoe").status, 200);
    let r = ok_json(
        &client.post_json("/api/models/mixtral/unload", &json!({})),
        "unload",
    );
    assert_eq!(r["status"], "unloaded");
    assert_eq!(served(&client), ["olmoe"]);
    let r = generate(&client, "mixtral");
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "model_not_found");
    assert_eq!(
        client
            .post_json("/api/models/mixtral/unload", &json!({}))
            .status,
        404,
        "unloading twice"
    );
    ok_json(
        &client.post_json("/api/models/mixtral/load", &json!({})),
        "reload",
    );
    assert_eq!(generate(&client, "mixtral").status, 200);

    // import (NDJSON progress, a last line with the result), then load the new model
    let path = fixture("qwen2_moe");
    let r = client.post_json(
        "/api/models/import",
        &json!({"path": path, "name": "qwen2-copy"}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/x-ndjson"));
    let lines: Vec<Value> = r
        .text()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    assert_eq!(
        lines.last(),
        Some(&json!({"status": "success", "name": "qwen2-copy"})),
        "{lines:?}"
    );
    assert!(
        lines.iter().any(|l| l["status"] == "importing"),
        "{lines:?}"
    );
    ok_json(
        &client.post_json("/api/models/qwen2-copy/load", &json!({})),
        "load import",
    );
    assert_eq!(generate(&client, "qwen2-copy").status, 200);
    // an import that fails reports it as the last line
    let r = client.post_json(
        "/api/models/import",
        &json!({"path": "/no/such/checkpoint", "name": "broken"}),
    );
    assert_eq!(r.status, 200);
    let text = r.text();
    let last: Value = serde_json::from_str(text.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{text:?}: {e}"));
    assert_eq!(last["status"], "error", "{text}");
    assert!(last["error"]["message"].is_string(), "{text}");

    // remove: unloads and deletes the pack
    ok_json(&client.delete("/api/models/qwen2-copy"), "rm");
    assert_eq!(generate(&client, "qwen2-copy").status, 404);
    assert!(!stored(&client).iter().any(|(n, _)| n == "qwen2-copy"));
    assert_eq!(client.delete("/api/models/qwen2-copy").status, 404);
}

/// What the non-admin child asks, with the status each must get.
const NON_ADMIN_REQUESTS: [(&str, &str, u16); 10] = [
    ("GET", "/health", 200),
    ("GET", "/v1/models", 200),
    ("GET", "/api/models", 200),
    ("GET", "/api/status", 200),
    ("GET", "/metrics", 200),
    ("POST", "/v1/completions", 200),
    ("POST", "/api/models/mixtral/unload", 403),
    ("POST", "/api/models/olmoe/load", 403),
    ("DELETE", "/api/models/olmoe", 403),
    ("POST", "/api/models/import", 403),
];

/// The non-admin client: a no-op unless started by `a_non_admin_peer_gets_403` (as `nobody`).
#[test]
fn non_admin_client_child() {
    let Some(socket) = std::env::var_os(CHILD_SOCKET_ENV) else {
        return;
    };
    let client = UdsClient::new(socket);
    for (method, path, _) in NON_ADMIN_REQUESTS {
        let body = match path {
            "/v1/completions" => json!({"model": "mixtral", "prompt": [1, 2], "max_tokens": 2}),
            "/api/models/import" => json!({"path": "/tmp", "name": "x"}),
            _ => json!({}),
        };
        let r = if method == "GET" {
            client.get(path)
        } else {
            client
                .request(
                    method,
                    path,
                    Some("application/json"),
                    body.to_string().as_bytes(),
                )
                .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
        };
        let answer = json!({"method": method, "path": path, "status": r.status, "body": r.text()});
        println!("ANSWER {answer}");
    }
}

#[test]
fn a_non_admin_peer_gets_403() {
    if !is_root() {
        eprintln!("skipped: dropping to `nobody` needs root; not root");
        return;
    }
    let Ok(Some(nobody)) = nix::unistd::User::from_name("nobody") else {
        eprintln!("skipped: there is no `nobody` user");
        return;
    };
    let daemon = Daemon::builder()
        .model("mixtral")
        .import_only("olmoe")
        .start();
    // The socket is 0660 root:root: let `nobody` reach and open it.
    let open_up = |p: &std::path::Path, mode| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", p.display()))
    };
    open_up(daemon.dir(), 0o755);
    open_up(daemon.socket(), 0o666);
    let exe = std::env::current_exe().expect("the test executable");
    // std drops the supplementary groups (setgroups(0)) when root sets uid.
    let out = Command::new(&exe)
        .args([
            "--exact",
            "non_admin_client_child",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(CHILD_SOCKET_ENV, daemon.socket())
        .uid(nobody.uid.as_raw())
        .gid(nobody.gid.as_raw())
        .output();
    let out = match out {
        Ok(o) => o,
        Err(e) => {
            eprintln!("skipped: cannot run {} as nobody: {e}", exe.display());
            return;
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() && stderr.contains("Permission denied") {
        eprintln!("skipped: nobody cannot run the test executable: {stderr}");
        return;
    }
    assert!(out.status.success(), "child failed:\n{stdout}\n{stderr}");
    let answers: Vec<Value> = stdout
        .lines()
        .filter_map(|l| l.find("ANSWER ").map(|at| &l[at + "ANSWER ".len()..]))
        .map(|l| serde_json::from_str(l).expect("an answer line"))
        .collect();
    assert_eq!(
        answers.len(),
        NON_ADMIN_REQUESTS.len(),
        "{stdout}\n{stderr}"
    );
    for ((method, path, status), answer) in NON_ADMIN_REQUESTS.iter().zip(&answers) {
        assert_eq!(
            answer["status"], *status,
            "{method} {path} as nobody: {answer}"
        );
        if *status == 403 {
            let body: Value = serde_json::from_str(answer["body"].as_str().unwrap_or_default())
                .unwrap_or_else(|e| panic!("{answer}: {e}"));
            assert_eq!(body["error"]["type"], "permission_error", "{answer}");
            let message = body["error"]["message"].as_str().unwrap_or_default();
            assert!(
                message.contains(&nobody.uid.to_string()),
                "the message names the peer uid: {message}"
            );
        }
    }
    // Nothing changed: mixtral still serves, olmoe is still stored and not loaded.
    let client = daemon.client();
    assert_eq!(served(&client), ["mixtral"]);
    assert_eq!(
        stored(&client),
        [("mixtral".into(), true), ("olmoe".into(), false)]
    );
}

/// How a stream ended: with its finish reason, or with an error object (type) before `[DONE]`.
#[derive(Debug, PartialEq)]
enum Ending {
    Finished(String),
    Error(String),
}

fn read_to_end(mut s: tileflow_tests::SseStream) -> Ending {
    let mut ending = None;
    let mut done = false;
    while let Some(data) = s.next_data() {
        assert!(!done, "an event after [DONE]: {data}");
        if data == "[DONE]" {
            done = true;
            continue;
        }
        let v: Value = serde_json::from_str(&data).unwrap_or_else(|e| panic!("{data}: {e}"));
        if let Some(kind) = v["error"]["type"].as_str() {
            ending = Some(Ending::Error(kind.to_string()));
        } else if let Some(r) = v["choices"][0]["finish_reason"].as_str() {
            ending = Some(Ending::Finished(r.to_string()));
        }
    }
    assert!(done, "the stream ended without [DONE] (after {ending:?})");
    ending.expect("a finish reason or an error")
}

#[test]
fn unloading_a_model_ends_its_streams_properly() {
    if !is_root() {
        eprintln!("skipped: unloading needs root or the tileflow-admin group; not root");
        return;
    }
    let daemon = Daemon::start(&["qwen2_moe"]);
    let client = daemon.client();
    for attempt in 1..=3 {
        let streams: Vec<_> = (0..32)
            .map(|i| {
                let body = json!({
                    "model": "qwen2_moe", "prompt": [1 + i, 2, 3], "max_tokens": 240,
                    "ignore_eos": true, "stream": true,
                });
                let mut s = client
                    .stream_json("/v1/completions", &body)
                    .expect("a stream");
                assert_eq!(s.status, 200);
                assert!(s.next_data().is_some());
                s
            })
            .collect();
        ok_json(
            &client.post_json("/api/models/qwen2_moe/unload", &json!({})),
            "unload",
        );
        let endings: Vec<Ending> = streams.into_iter().map(read_to_end).collect();
        for e in &endings {
            assert!(
                *e == Ending::Finished("length".into())
                    || *e == Ending::Error("unavailable_error".into()),
                "{e:?}"
            );
        }
        let cut = endings
            .iter()
            .filter(|e| matches!(e, Ending::Error(_)))
            .count();
        let status = daemon.status();
        assert_eq!(status["models"], json!([]), "{status}");
        if cut > 0 || attempt == 3 {
            eprintln!("unload cut {cut} of 32 running streams (attempt {attempt})");
            break;
        }
        ok_json(
            &client.post_json("/api/models/qwen2_moe/load", &json!({})),
            "load",
        );
    }
    daemon.client().get("/health");
}
