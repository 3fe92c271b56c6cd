"""A small client of tileflowd over its Unix socket, on httpx's UDS transport.

    from tileflow_client import TileflowClient

    with TileflowClient() as tf:             # $TILEFLOW_SOCKET, else /run/tileflowd.sock
        print(tf.status()["models"])
        for chunk in tf.chat_stream("olmoe", [{"role": "user", "content": "Hi"}]):
            print(chunk["choices"][0]["delta"].get("content", ""), end="", flush=True)

Errors of the daemon raise TileflowError (with the error object's message, type and code);
a socket nobody answers on raises TileflowConnectionError naming the socket.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterator, List, Optional, Union

import httpx

__all__ = [
    "DEFAULT_SOCKET",
    "BASE_URL",
    "TileflowClient",
    "TileflowError",
    "TileflowConnectionError",
    "http_client",
]

DEFAULT_SOCKET = "/run/tileflowd.sock"
BASE_URL = "http://tileflowd"


def socket_path(socket: Optional[str] = None) -> str:
    """The socket: the argument, else $TILEFLOW_SOCKET, else /run/tileflowd.sock."""
    return socket or os.environ.get("TILEFLOW_SOCKET") or DEFAULT_SOCKET


def http_client(socket: Optional[str] = None, timeout: float = 600.0) -> httpx.Client:
    """An httpx client bound to the daemon's socket (base URL http://tileflowd/)."""
    return httpx.Client(
        transport=httpx.HTTPTransport(uds=socket_path(socket)),
        base_url=BASE_URL,
        timeout=timeout,
    )


class TileflowError(Exception):
    """The daemon's error object: {"error": {"message", "type", "code"}}."""

    def __init__(self, message: str, type: str, code: Optional[str], status: Optional[int]):
        tag = f"{status} {type}" if status else type
        if code:
            tag += f", {code}"
        super().__init__(f"{message} ({tag})")
        self.message = message
        self.type = type
        self.code = code
        self.status = status


class TileflowConnectionError(TileflowError):
    """Nothing answers on the socket."""

    def __init__(self, socket: str, cause: Exception):
        Exception.__init__(self, f"cannot connect to {socket}: is tileflowd running? ({cause})")
        self.message = str(self)
        self.type = "connection_error"
        self.code = None
        self.status = None
        self.socket = socket


def _error(body: Any, status: Optional[int]) -> TileflowError:
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        return TileflowError(f"unexpected answer: {body!r}"[:300], "protocol_error", None, status)
    return TileflowError(
        str(err.get("message", "")), str(err.get("type", "")), err.get("code"), status
    )


class TileflowClient:
    """Typed-enough calls for the OpenAI-compatible and native routes of tileflowd."""

    def __init__(self, socket: Optional[str] = None, timeout: float = 600.0):
        self.socket = socket_path(socket)
        self._http = http_client(self.socket, timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "TileflowClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --- plumbing -------------------------------------------------------------------------

    def _request(self, method: str, route: str, body: Any = None) -> httpx.Response:
        try:
            response = self._http.request(method, route, json=body)
        except httpx.ConnectError as e:
            raise TileflowConnectionError(self.socket, e) from e
        if response.status_code >= 400:
            try:
                raise _error(response.json(), response.status_code)
            except json.JSONDecodeError:
                raise TileflowError(response.text[:300], "protocol_error", None, response.status_code)
        return response

    def _json(self, method: str, route: str, body: Any = None) -> Any:
        return self._request(method, route, body).json()

    def _sse(self, route: str, body: Dict[str, Any]) -> Iterator[Dict[str, Any]]:
        """POSTs `body` with stream=true and yields each SSE chunk until [DONE]."""
        body = dict(body, stream=True)
        try:
            with self._http.stream("POST", route, json=body) as response:
                if response.status_code >= 400:
                    response.read()
                    raise _error(response.json(), response.status_code)
                data: List[str] = []
                for line in response.iter_lines():
                    if line.startswith("data:"):
                        data.append(line[5:][1:] if line[5:6] == " " else line[5:])
                        continue
                    if line or not data:
                        continue  # comments, other fields, stray blank lines
                    event, data = "\n".join(data), []
                    if event.strip() == "[DONE]":
                        return
                    chunk = json.loads(event)
                    if isinstance(chunk, dict) and "error" in chunk:
                        raise _error(chunk, None)
                    yield chunk
                raise TileflowError("the stream ended before [DONE]", "protocol_error", None, None)
        except httpx.ConnectError as e:
            raise TileflowConnectionError(self.socket, e) from e

    # --- OpenAI-compatible ----------------------------------------------------------------

    def models(self) -> List[Dict[str, Any]]:
        """GET /v1/models: the loaded models."""
        return self._json("GET", "/v1/models")["data"]

    def completions(self, model: str, prompt: Union[str, List[int]], **params: Any) -> Dict[str, Any]:
        """POST /v1/completions; params are the OpenAI/vLLM fields (max_tokens, temperature, …)."""
        body = dict(params, model=model, prompt=prompt, stream=False)
        return self._json("POST", "/v1/completions", body)

    def completions_stream(
        self, model: str, prompt: Union[str, List[int]], **params: Any
    ) -> Iterator[Dict[str, Any]]:
        """POST /v1/completions streamed: yields chunks; each has choices[0]["text"]."""
        return self._sse("/v1/completions", dict(params, model=model, prompt=prompt))

    def chat(self, model: str, messages: List[Dict[str, str]], **params: Any) -> Dict[str, Any]:
        """POST /v1/chat/completions."""
        body = dict(params, model=model, messages=messages, stream=False)
        return self._json("POST", "/v1/chat/completions", body)

    def chat_stream(
        self, model: str, messages: List[Dict[str, str]], **params: Any
    ) -> Iterator[Dict[str, Any]]:
        """POST /v1/chat/completions streamed: yields chunks; choices[0]["delta"] has content."""
        return self._sse("/v1/chat/completions", dict(params, model=model, messages=messages))

    # --- native ---------------------------------------------------------------------------

    def status(self) -> Dict[str, Any]:
        """GET /api/status: version, device, uptime and each loaded model's state."""
        return self._json("GET", "/api/status")

    def list_models(self) -> List[Dict[str, Any]]:
        """GET /api/models: every model in the store, with whether it is loaded."""
        return self._json("GET", "/api/models")["models"]

    def cache(self) -> Dict[str, Any]:
        """GET /api/cache: each loaded model's expert cache."""
        return self._json("GET", "/api/cache")

    def health(self) -> Dict[str, Any]:
        """GET /health."""
        return self._json("GET", "/health")

    def metrics(self) -> str:
        """GET /metrics: Prometheus text."""
        return self._request("GET", "/metrics").text
