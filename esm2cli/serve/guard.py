"""The outermost layer of the app: API keys, body limits, JSON errors for every failure, metrics, access log.

Every request passes here before FastAPI sees it, so that nothing behind it has to care:
- a request without a valid key (where one is needed) gets 401 before its body is read; the key's digest
  is put in the scope (``CLIENT_SCOPE_KEY``), naming the client whose cache partition the request uses;
- the body is read here, whole, within ``body_timeout_s`` and ``max_body_bytes`` (declared or chunked),
  and compressed bodies are refused; the app then reads it from memory;
- an exception no handler took becomes a JSON 500 (the traceback goes to the log, never to the client);
- every answer is counted by endpoint and status (499 when the client left first) and logged on stderr,
  without the query string (it can carry anything) and never with headers.
"""

from __future__ import annotations

import asyncio
import logging
import time

from esm2cli.serve.auth import KeyChecker
from esm2cli.serve.cache import OPEN_PARTITION
from esm2cli.serve.http_errors import send_error
from esm2cli.serve.metrics import ServerMetrics

log = logging.getLogger(__name__)
access_log = logging.getLogger("esm2cli.access")

CLIENT_GONE = 499
CLIENT_SCOPE_KEY = "esm2cli.client"  # the ASGI scope entry naming the request's API key (its digest)
_MAX_LOGGED_PATH = 200


class _ClientGone(Exception):
    """The client disconnected while its body was being read."""


class RequestGuard:
    """ASGI middleware; see the module docstring.

    Args:
        app: The FastAPI app.
        keys: Which paths need a key, and which keys are good.
        metrics: Where requests are counted.
        endpoints: Paths counted under their own name; others count as "other" (bounded label values).
        max_body_bytes: Larger bodies get 422.
        body_timeout_s: A body not complete by then gets 408.
    """

    def __init__(
        self,
        app,
        *,
        keys: KeyChecker,
        metrics: ServerMetrics,
        endpoints: frozenset[str],
        max_body_bytes: int,
        body_timeout_s: float,
    ):
        self.app = app
        self.keys = keys
        self.metrics = metrics
        self.endpoints = endpoints
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        sent: list[int] = []  # the status of the answer, once it has started

        async def observed_send(message):
            if message["type"] == "http.response.start":
                sent.append(message["status"])
            await send(message)

        status = 500
        try:
            await self._handle(scope, receive, observed_send)
            status = sent[0] if sent else CLIENT_GONE
        except _ClientGone:
            status = CLIENT_GONE
        except asyncio.CancelledError:
            # uvicorn cancels what is left when --graceful-timeout runs out: say so, in JSON, and end quietly.
            log.warning("%s %s: cancelled at shutdown", scope["method"], _shown(scope["path"]))
            if not sent:
                status = 503
                await send_error(send, scope["path"], 503, "the server is shutting down; retry", "NotReadyError")
        except Exception:
            log.exception("unexpected error answering %s %s; this is a bug", scope["method"], _shown(scope["path"]))
            if not sent:
                message = "internal server error (see the server log)"
                await send_error(send, scope["path"], 500, message, "InternalError")
        finally:
            self._record(scope, status, time.perf_counter() - start)

    async def _handle(self, scope, receive, send) -> None:
        path = scope["path"]
        headers = scope["headers"]
        tokens = [value for name, value in headers if name == b"authorization"]
        client = self.keys.identify(tokens[0]) if len(tokens) == 1 and self.keys.enabled else None
        if self.keys.needs_key(path) and client is None:
            message = "invalid API key" if tokens else "an API key is required: send 'Authorization: Bearer <key>'"
            return await send_error(send, path, 401, message, "AuthenticationError")
        scope[CLIENT_SCOPE_KEY] = client or OPEN_PARTITION  # whose cache entries (and counts) this request sees
        encoding = next((value for name, value in headers if name == b"content-encoding"), b"identity")
        if encoding.strip().lower() not in (b"", b"identity"):
            shown = encoding.decode("latin-1")[:40]
            message = f"Content-Encoding {shown!r} is not accepted: send the body uncompressed"
            return await send_error(send, path, 422, message, "InputError", close=True)
        declared = next((value for name, value in headers if name == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return await self._too_large(send, path)
        try:
            body = await asyncio.wait_for(self._read_body(receive), self.body_timeout_s)
        except TimeoutError:
            message = f"the request body was not received within {self.body_timeout_s:g} s"
            return await send_error(send, path, 408, message, "InputError", close=True)
        if body is None:
            return await self._too_large(send, path)
        if _utf16_or_32(body):  # json.loads would guess the encoding; JSON on the wire is UTF-8 (RFC 8259)
            return await send_error(send, path, 422, "malformed JSON body: not UTF-8 (UTF-16 or UTF-32)", "InputError")
        replayed = False

        async def replay():
            # The body once, from memory; after it, the server's own receive, which reports a disconnect.
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _read_body(self, receive) -> bytes | None:
        """The whole body, or None once it is over the limit."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _too_large(self, send, path: str) -> None:
        message = f"request body over {self.max_body_bytes} bytes"
        # close: the rest of the body is not read, and an oversized body is not worth draining.
        await send_error(send, path, 422, message, "InputError", close=True)

    def _record(self, scope, status: int, seconds: float) -> None:
        path = scope["path"]
        endpoint = path if path in self.endpoints else "other"
        self.metrics.requests.labels(endpoint, str(status)).inc()
        self.metrics.latency.labels(endpoint).observe(seconds)
        if access_log.isEnabledFor(logging.INFO):
            client = scope.get("client") or ("-", 0)
            access_log.info('%s "%s %s" %d %.1f ms', client[0], scope["method"], _shown(path), status, seconds * 1000)


def _utf16_or_32(body: bytes) -> bool:
    """True for a body in UTF-16 or UTF-32: a byte-order mark, or a NUL among the first bytes (JSON text starts
    with an ASCII character, which those encodings write with zero bytes beside it)."""
    return body.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in body[:4]


def _shown(path: str) -> str:
    """A path safe to log: escaped (no forged log lines), cut short, the query string never included."""
    shown = repr(path)[1:-1]
    return shown if len(shown) <= _MAX_LOGGED_PATH else shown[:_MAX_LOGGED_PATH] + "..."
