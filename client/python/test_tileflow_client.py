"""Checks of tileflow_client against a running tileflowd.

Run by tests/tests/python_client.rs with TILEFLOW_SOCKET pointing at a daemon it started with
the `tiny` model loaded; also runs under pytest, or as `python3 test_tileflow_client.py`.
TILEFLOW_TEST_MODEL names the loaded model to use (default: tiny).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tileflow_client import TileflowClient, TileflowConnectionError, TileflowError  # noqa: E402

MODEL = os.environ.get("TILEFLOW_TEST_MODEL", "tiny")
GREEDY = {"max_tokens": 8, "temperature": 0, "ignore_eos": True}


def client() -> TileflowClient:
    return TileflowClient()


def test_health_status_and_models():
    with client() as tf:
        assert tf.health() == {"status": "ok"}
        status = tf.status()
        assert status["device"] == "cpu", status
        assert MODEL in [m["name"] for m in status["models"]], status
        assert MODEL in [m["id"] for m in tf.models()]
        stored = {m["name"]: m for m in tf.list_models()}
        assert stored[MODEL]["loaded"] is True, stored
        assert tf.cache()["models"][0]["model"] == MODEL
        assert "tileflow_requests_total" in tf.metrics() or "tileflow_requests" in tf.metrics()


def test_completions_whole_and_streamed_agree():
    with client() as tf:
        whole = tf.completions(MODEL, "The tile cache", **GREEDY)
        assert whole["usage"]["completion_tokens"] == 8, whole
        text = whole["choices"][0]["text"]
        chunks = list(tf.completions_stream(MODEL, "The tile cache", **GREEDY))
        assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == text
        assert chunks[-1]["choices"][0]["finish_reason"] == "length", chunks[-1]
        # Token-id prompts.
        ids = tf.completions(MODEL, [1, 2, 3], **GREEDY)
        assert ids["usage"]["prompt_tokens"] == 3, ids


def test_chat_whole_and_streamed_agree():
    messages = [{"role": "user", "content": "Hello, experts"}]
    with client() as tf:
        whole = tf.chat(MODEL, messages, **GREEDY)
        content = whole["choices"][0]["message"]["content"]
        chunks = list(
            tf.chat_stream(MODEL, messages, stream_options={"include_usage": True}, **GREEDY)
        )
        streamed = "".join(
            c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]
        )
        assert streamed == content, (streamed, content)
        assert chunks[0]["choices"][0]["delta"].get("role") == "assistant", chunks[0]
        assert chunks[-1]["usage"]["completion_tokens"] == 8, chunks[-1]


def test_errors_carry_the_error_object():
    with client() as tf:
        try:
            tf.completions("no-such-model", "x")
        except TileflowError as e:
            assert e.status == 404 and e.type == "not_found_error", e
            assert e.code == "model_not_found", e
        else:
            raise AssertionError("an unknown model was accepted")
        try:
            list(tf.chat_stream(MODEL, [], max_tokens=4))
        except TileflowError as e:
            assert e.status == 400 and e.type == "invalid_request_error", e
        else:
            raise AssertionError("an empty conversation was accepted")


def test_a_missing_socket_is_named():
    missing = "/nonexistent/tileflowd.sock"
    try:
        TileflowClient(missing).health()
    except TileflowConnectionError as e:
        assert missing in str(e) and "is tileflowd running?" in str(e), e
    else:
        raise AssertionError("connected to a missing socket")


def main() -> int:
    tests = [(name, f) for name, f in sorted(globals().items()) if name.startswith("test_")]
    for name, f in tests:
        f()
        print(f"ok   {name}")
    print(f"{len(tests)} passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
