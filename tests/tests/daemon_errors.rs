//! Bad requests get a 4xx with the OpenAI error object and the daemon keeps serving; a full
//! waiting queue answers 429 `rate_limit_error`.

use std::io::{Read, Write};
use std::sync::{Arc, Barrier};

use serde_json::{json, Value};
use tileflow_tests::{Daemon, HttpResponse, UdsClient};

const MODEL: &str = "mixtral";

/// Panics unless `r` has status `status` and the body `{"error":{"message","type","code"}}`
/// with a non-empty message and, where given, the expected type and code.
fn assert_error(r: &HttpResponse, status: u16, kind: &str, code: Option<&str>, what: &str) {
    assert_eq!(r.status, status, "{what}: {}", r.text());
    assert_eq!(
        r.header("content-type"),
        Some("application/json"),
        "{what}: content type"
    );
    let body = r.json();
    let error = body["error"]
        .as_object()
        .unwrap_or_else(|| panic!("{what}: no error object: {body}"));
    let mut keys: Vec<&str> = error.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["code", "message", "type"], "{what}: {body}");
    assert_eq!(body.as_object().map(|o| o.len()), Some(1), "{what}: {body}");
    let message = error["message"].as_str().unwrap_or_default();
    assert!(!message.is_empty(), "{what}: empty message: {body}");
    assert_eq!(error["type"], kind, "{what}: {body}");
    match code {
        Some(c) => assert_eq!(error["code"], c, "{what}: {body}"),
        None => assert!(
            error["code"].is_null() || error["code"].is_string(),
            "{what}: {body}"
        ),
    }
}

fn completion(extra: Value) -> Value {
    let mut body = json!({
        "model": MODEL, "prompt": [1, 2, 3], "max_tokens": 4, "ignore_eos": true,
    });
    for (k, v) in extra.as_object().expect("an object") {
        body[k] = v.clone();
    }
    body
}

/// One bad request and what it must get.
struct Case {
    what: &'static str,
    method: &'static str,
    path: &'static str,
    content_type: Option<&'static str>,
    body: Vec<u8>,
    status: u16,
    kind: &'static str,
    code: Option<&'static str>,
}

fn json_case(what: &'static str, path: &'static str, body: Value, status: u16) -> Case {
    Case {
        what,
        method: "POST",
        path,
        content_type: Some("application/json"),
        body: body.to_string().into_bytes(),
        status,
        kind: "invalid_request_error",
        code: None,
    }
}

fn cases() -> Vec<Case> {
    let raw = |what, body: &[u8], code| Case {
        code,
        body: body.to_vec(),
        ..json_case(what, "/v1/completions", json!({}), 400)
    };
    let mut big = br#"{"model":"mixtral","prompt":""#.to_vec();
    big.resize(big.len() + (1 << 20) + 1, b'a');
    big.extend(br#""}"#);
    let chat = |what, body| json_case(what, "/v1/chat/completions", body, 400);
    let cmpl = |what, extra| json_case(what, "/v1/completions", completion(extra), 400);
    let with_code = |c: Case, kind, code| Case {
        kind,
        code: Some(code),
        ..c
    };
    vec![
        raw(
            "malformed JSON",
            br#"{"model": "mixtral", "prompt": "#,
            Some("invalid_json"),
        ),
        raw("not an object", b"[1, 2, 3]", Some("invalid_json")),
        raw("empty body", b"", Some("invalid_json")),
        raw(
            "invalid UTF-8 in a string",
            b"{\"model\":\"mixtral\",\"prompt\":\"caf\xe9\"}",
            Some("invalid_json"),
        ),
        raw(
            "invalid UTF-8 outside strings",
            b"{\"model\":\"mixtral\",\xff\"prompt\":\"x\"}",
            Some("invalid_json"),
        ),
        Case {
            status: 413,
            ..raw("a body over 1 MiB", &big, Some("body_too_large"))
        },
        Case {
            status: 415,
            content_type: Some("text/plain"),
            ..raw(
                "not labelled JSON",
                br#"{"model":"mixtral","prompt":"x"}"#,
                None,
            )
        },
        with_code(
            cmpl("an unknown field", json!({"frobnicate": true})),
            "invalid_request_error",
            "invalid_json",
        ),
        cmpl("a wrongly typed field", json!({"max_tokens": "many"})),
        cmpl("a negative max_tokens", json!({"max_tokens": -1})),
        cmpl("a batch of prompts", json!({"prompt": [[1, 2], [3]]})),
        cmpl("a missing prompt", json!({"prompt": null})),
        cmpl("an empty prompt", json!({"prompt": []})),
        with_code(
            cmpl(
                "a token id equal to the vocabulary size",
                json!({"prompt": [1, 448]}),
            ),
            "invalid_request_error",
            "invalid_token_id",
        ),
        with_code(
            cmpl("a huge token id", json!({"prompt": [4_294_967_295_u32]})),
            "invalid_request_error",
            "invalid_token_id",
        ),
        cmpl(
            "a token id out of u32",
            json!({"prompt": [4_294_967_296_u64]}),
        ),
        cmpl("n = 2", json!({"n": 2})),
        cmpl("logprobs 21", json!({"logprobs": 21})),
        cmpl("a negative temperature", json!({"temperature": -0.5})),
        cmpl("top_p 0", json!({"top_p": 0.0})),
        cmpl("top_p above 1", json!({"top_p": 1.5})),
        with_code(
            cmpl(
                "prompt + max_tokens over the context",
                json!({"max_tokens": 254}),
            ),
            "invalid_request_error",
            "context_length_exceeded",
        ),
        with_code(
            cmpl(
                "a prompt longer than the context",
                json!({"prompt": vec![5; 300]}),
            ),
            "invalid_request_error",
            "context_length_exceeded",
        ),
        with_code(
            cmpl(
                "max_tokens far over the context",
                json!({"max_tokens": u32::MAX}),
            ),
            "invalid_request_error",
            "context_length_exceeded",
        ),
        Case {
            status: 404,
            ..with_code(
                cmpl("an unknown model", json!({"model": "no-such-model"})),
                "not_found_error",
                "model_not_found",
            )
        },
        Case {
            status: 404,
            ..with_code(
                cmpl(
                    "an unknown model, streamed",
                    json!({"model": "x", "stream": true}),
                ),
                "not_found_error",
                "model_not_found",
            )
        },
        chat("chat: no messages", json!({"model": MODEL, "messages": []})),
        chat(
            "chat: n = 2",
            json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 2}),
        ),
        chat(
            "chat: top_logprobs 21",
            json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                   "logprobs": true, "top_logprobs": 21}),
        ),
        chat(
            "chat: top_logprobs without logprobs",
            json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                   "top_logprobs": 2}),
        ),
        chat(
            "chat: an unknown field in a message",
            json!({"model": MODEL, "messages": [{"role": "user", "content": "hi", "x": 1}]}),
        ),
        Case {
            status: 404,
            ..with_code(
                chat(
                    "chat: an unknown model",
                    json!({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}),
                ),
                "not_found_error",
                "model_not_found",
            )
        },
        Case {
            method: "GET",
            path: "/v1/nothing",
            content_type: None,
            body: Vec::new(),
            status: 404,
            kind: "not_found_error",
            code: None,
            what: "an unknown route",
        },
        Case {
            method: "GET",
            path: "/api/models/no-such-model",
            content_type: None,
            body: Vec::new(),
            status: 404,
            kind: "not_found_error",
            code: None,
            what: "an unknown stored model",
        },
        Case {
            method: "DELETE",
            path: "/v1/completions",
            content_type: None,
            body: Vec::new(),
            status: 405,
            kind: "invalid_request_error",
            code: Some("method_not_allowed"),
            what: "a method the route does not serve",
        },
        Case {
            method: "POST",
            path: "/api/models/no-such-model/load",
            content_type: None,
            body: Vec::new(),
            status: 404,
            kind: "not_found_error",
            code: None,
            what: "loading an unknown model",
        },
    ]
}

#[test]
fn bad_requests_get_error_objects_and_the_daemon_keeps_serving() {
    let mut daemon = Daemon::start(&[MODEL]);
    let client = daemon.client();
    for case in cases() {
        let r = client
            .request(case.method, case.path, case.content_type, &case.body)
            .unwrap_or_else(|e| panic!("{}: {e}", case.what));
        // Admin routes answer 403 to anyone else; the suite may not run as root.
        if case.path.starts_with("/api/models/") && case.method == "POST" && r.status == 403 {
            assert_error(&r, 403, "permission_error", None, case.what);
        } else {
            assert_error(&r, case.status, case.kind, case.code, case.what);
        }
        daemon.assert_serving();
    }
    // And it still generates.
    let r = client.post_json("/v1/completions", &completion(json!({"max_tokens": 8})));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["usage"]["completion_tokens"], 8);
    let status = daemon.model_status(MODEL);
    assert_eq!(status["kv_free_blocks"], status["kv_blocks"], "{status}");
}

#[test]
fn broken_http_does_not_hurt_the_daemon() {
    let mut daemon = Daemon::start(&[MODEL]);
    let socket = daemon.socket().to_path_buf();
    let garbage: [&[u8]; 5] = [
        b"\x00\x01\x02 not http at all\r\n\r\n",
        b"POST /v1/completions HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"model\"",
        b"POST /v1/completions HTTP/1.1\r\nContent-Length: nope\r\n\r\n",
        b"GET / HTTP/1.1\r\n",
        b"POST /v1/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\
          Content-Type: application/json\r\n\r\nzz\r\n",
    ];
    for bytes in garbage {
        let mut s = std::os::unix::net::UnixStream::connect(&socket).expect("connect");
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .expect("timeout");
        let _ = s.write_all(bytes);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
        if let Some(line) = answer.split(|&b| b == b'\n').next() {
            let line = String::from_utf8_lossy(line);
            assert!(
                line.is_empty() || line.starts_with("HTTP/1.1 4"),
                "{bytes:?}: {line}"
            );
        }
        daemon.assert_serving();
    }
}

#[test]
fn a_full_queue_answers_429_and_the_daemon_keeps_serving() {
    // At most 32 jobs run and 1 waits; a burst of long requests must overflow that.
    let mut daemon = Daemon::builder()
        .model(MODEL)
        .args(&["--max-waiting", "1"])
        .start();
    let client = daemon.client();
    let mut limited = Vec::new();
    for burst in [64, 128, 256] {
        let barrier = Arc::new(Barrier::new(burst));
        let threads: Vec<_> = (0..burst)
            .map(|i| {
                let (client, barrier): (UdsClient, _) = (client.clone(), barrier.clone());
                std::thread::spawn(move || {
                    let body = completion(json!({
                        "prompt": [1 + (i % 400), 2, 3],
                        "max_tokens": 240,
                        "ignore_eos": true,
                    }));
                    barrier.wait();
                    client.post_json("/v1/completions", &body)
                })
            })
            .collect();
        for t in threads {
            let r = t.join().expect("a client thread");
            match r.status {
                200 => assert_eq!(r.json()["usage"]["completion_tokens"], 240),
                429 => {
                    assert_error(
                        &r,
                        429,
                        "rate_limit_error",
                        Some("queue_full"),
                        "queue full",
                    );
                    limited.push(r);
                }
                _ => panic!("unexpected answer: {} {}", r.status, r.text()),
            }
        }
        if !limited.is_empty() {
            break;
        }
    }
    assert!(
        !limited.is_empty(),
        "no request got 429 although at most 33 fit"
    );
    daemon.assert_serving();
    let r = client.post_json("/v1/completions", &completion(json!({"max_tokens": 8})));
    assert_eq!(r.status, 200, "{}", r.text());
    let status = daemon.model_status(MODEL);
    assert_eq!(status["running"], 0, "{status}");
    assert_eq!(status["waiting"], 0, "{status}");
    assert_eq!(status["kv_free_blocks"], status["kv_blocks"], "{status}");
}
