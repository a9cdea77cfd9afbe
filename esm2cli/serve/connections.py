"""Connection-level bounds of the server, below the app: header timeout, open-connection cap, accept errors.

uvicorn closes idle keep-alive connections, but not one that sends half of its headers and stops, and
it accepts connections until the process runs out of file descriptors, then logs every failed
accept() with a traceback. Here:
- a connection that has not sent a request's complete headers within ``header_timeout_s`` gets 408 and
  is closed (measured from when it opened, or from the first bytes of a later request);
- past ``max_connections`` open connections, a new one is answered 503 (with Retry-After) and closed,
  unless its request is a probe (GET or HEAD of /live or /health): probes are answered, then the
  connection closes, so that clients holding idle connections cannot get a healthy pod restarted;
- a client that stops reading its answers for ``body_timeout_s`` is disconnected;
- accept() errors (EMFILE and the like) are logged at most once per ``ACCEPT_LOG_INTERVAL_S``, one line
  with the count of those not shown;
- the process's open-file limit is raised, where allowed, to hold ``max_connections`` with room to spare.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from esm2cli.config import ServeConfig
from esm2cli.serve.http_errors import RETRY_AFTER_S, encode

log = logging.getLogger(__name__)

ACCEPT_LOG_INTERVAL_S = 30.0
FILES_RESERVED = 128  # descriptors kept for the model files, the listening socket, logs, libraries
REFUSE_WAIT_S = 1.0  # how long a connection over the cap may take to send its request before the 503
PROBE_LINE_MAX = 256  # bytes of a request line looked at, over the cap, to tell a probe from other requests
_PROBE_METHODS = (b"GET", b"HEAD")
_PROBE_PATHS = (b"/live", b"/health")
_ACCEPT_ERROR = "socket.accept() out of system resource"


def _raw_answer(status: int, reason: str, message: str, error_type: str) -> bytes:
    """A complete HTTP/1.1 error answer that closes the connection, for use outside any request cycle."""
    body = encode({"error": message, "error_type": error_type})
    head = [f"HTTP/1.1 {status} {reason}", "content-type: application/json", f"content-length: {len(body)}",
            "connection: close"]  # fmt: skip
    if status == 503:
        head.append(f"retry-after: {RETRY_AFTER_S}")
    return ("\r\n".join(head) + "\r\n\r\n").encode("ascii") + body


def is_probe_line(line: bytes) -> bool:
    """True when an HTTP request line asks for a probe: GET or HEAD of /live or /health (a query allowed)."""
    method, _, rest = line.partition(b" ")
    target = rest.partition(b" ")[0].partition(b"?")[0]
    return method in _PROBE_METHODS and target in _PROBE_PATHS


@dataclass(frozen=True, kw_only=True)
class ConnectionLimits:
    """The bounds of one connection, and where closes are counted.

    Attributes:
        header_timeout_s: A request's complete headers must arrive within this (408 and closed).
        max_connections: Open connections at most; past it, 503 and closed (probes excepted).
        send_timeout_s: A client that stops reading its answers for this long is disconnected.
        on_close: Told why each connection the guard closes was closed (for metrics).
    """

    header_timeout_s: float
    max_connections: int
    send_timeout_s: float
    on_close: Callable[[str], None] = lambda reason: None

    def answer(self, reason: str) -> bytes:
        """The raw answer sent before closing for ``reason``."""
        if reason == "header_timeout":
            message = f"the request headers were not received within {self.header_timeout_s:g} s"
            return _raw_answer(408, "Request Timeout", message, "InputError")
        if reason == "over_capacity":
            message = f"too many open connections (over {self.max_connections}); retry later"
            return _raw_answer(503, "Service Unavailable", message, "OverloadedError")
        return _raw_answer(400, "Bad Request", "invalid HTTP request", "InputError")


class Connection(Protocol):
    """What the guard needs from one connection. H11Connection is the only implementation over uvicorn."""

    def open_connections(self) -> int: ...  # connections the server holds open, this one included
    def awaiting_headers(self) -> bool: ...  # open, and no request's headers are complete yet
    def has_pipelined_bytes(self) -> bool: ...  # part of the next request came with the last one
    def closing(self) -> bool: ...
    def later(self, delay: float, callback: Callable[[], None]) -> asyncio.TimerHandle: ...
    def feed(self, data: bytes) -> None: ...  # bytes for the HTTP parser
    def answer_and_close(self, answer: bytes) -> None: ...  # written out, then closed
    def close(self) -> None: ...
    def abort(self) -> None: ...


class H11Connection:
    """The seam: every use of uvicorn's h11 protocol internals, in one place (tests/serve/test_connections.py
    checks each against the installed uvicorn)."""

    def __init__(self, protocol: H11Protocol):
        self._protocol = protocol

    def open_connections(self) -> int:
        return len(self._protocol.connections)

    def awaiting_headers(self) -> bool:
        return self._protocol.conn.their_state is h11.IDLE and not self.closing()

    def has_pipelined_bytes(self) -> bool:
        return bool(self._protocol.conn.trailing_data[0])

    def closing(self) -> bool:
        return self._protocol.transport.is_closing()

    def later(self, delay: float, callback: Callable[[], None]) -> asyncio.TimerHandle:
        return self._protocol.loop.call_later(delay, callback)

    def feed(self, data: bytes) -> None:
        H11Protocol.data_received(self._protocol, data)

    def answer_and_close(self, answer: bytes) -> None:
        self._protocol._unset_keepalive_if_required()  # its timer would close the connection under the answer
        self._protocol.transport.write(answer)
        self._protocol.transport.close()  # after the buffered answer is written

    def close(self) -> None:
        self._protocol.transport.close()

    def abort(self) -> None:
        self._protocol.transport.abort()


class ConnectionGuard:
    """The bounds of one connection (see the module docstring), told of its events; no uvicorn in here."""

    def __init__(self, conn: Connection, limits: ConnectionLimits):
        self._conn = conn
        self._limits = limits
        self._header_timer: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None
        self._refusing = False
        self._held = b""  # the first bytes of a connection over the cap, until its request line is complete
        self._probe_only = False

    def opened(self) -> None:
        if self._conn.open_connections() > self._limits.max_connections:
            # Wait briefly for the request, so that the client reads the 503 rather than a reset.
            self._refusing = True
            self._header_timer = self._conn.later(REFUSE_WAIT_S, self._refuse)
            return
        self._watch_headers()

    def received(self, data: bytes) -> None:
        if self._refusing:
            return self._over_cap(data)
        self._conn.feed(data)
        self._watch_headers()

    def _over_cap(self, data: bytes) -> None:
        """Over the cap: a probe is served (one request, then the connection closes); all else gets 503."""
        self._held += data
        line, found, _ = self._held.partition(b"\r\n")
        if not found and len(self._held) < PROBE_LINE_MAX:
            return  # the request line is not complete yet (the refuse timer still runs)
        if not (found and is_probe_line(line)):
            return self._refuse()
        self._stop_timer()
        self._refusing, self._probe_only = False, True
        held, self._held = self._held, b""
        self.received(held)

    def response_completing(self) -> None:
        """Before uvicorn finishes a response: a probe over the cap gets one answer, never a kept-alive connection."""
        if self._probe_only:
            self._conn.close()

    def response_completed(self) -> None:
        if self._conn.has_pipelined_bytes():  # part of a pipelined request already came with the last one
            self._watch_headers()

    def lost(self) -> None:
        self._stop_timer()
        if self._write_timer is not None:
            self._write_timer.cancel()

    def writes_paused(self) -> None:
        # The client stopped reading its answers: it may resume within send_timeout_s, else the
        # connection is dropped, and the answer with it (uvicorn would wait for it forever).
        if self._write_timer is None:
            self._write_timer = self._conn.later(self._limits.send_timeout_s, self._reader_gone)

    def writes_resumed(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def bad_request(self) -> None:
        """The parser refused the bytes: the documented JSON 400 (uvicorn's own is plain text), then close."""
        self._stop_timer()
        self._close("bad_request")

    def _reader_gone(self) -> None:
        self._limits.on_close("send_timeout")
        self._conn.abort()

    def _watch_headers(self) -> None:
        """Arms the timer while a request's headers are awaited; disarms it once they are in.

        Called when the connection opens and when bytes arrive (or wait, pipelined): between requests,
        uvicorn's keep-alive timeout closes an idle connection, and the timer starts with the next
        request's first bytes.
        """
        waiting = self._conn.awaiting_headers()
        if waiting and self._header_timer is None:
            self._header_timer = self._conn.later(self._limits.header_timeout_s, self._headers_late)
        elif not waiting:
            self._stop_timer()

    def _stop_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self._conn.awaiting_headers():
            self._close("header_timeout")

    def _refuse(self) -> None:
        self._stop_timer()
        if not self._conn.closing():
            self._close("over_capacity")

    def _close(self, reason: str) -> None:
        self._limits.on_close(reason)
        self._conn.answer_and_close(self._limits.answer(reason))


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a ConnectionGuard told of each connection's events."""

    limits: ClassVar[ConnectionLimits]

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.guard = ConnectionGuard(H11Connection(self), self.limits)

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.guard.opened()

    def data_received(self, data: bytes) -> None:
        self.guard.received(data)

    def on_response_complete(self) -> None:
        self.guard.response_completing()
        super().on_response_complete()
        self.guard.response_completed()

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.lost()
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        super().pause_writing()
        self.guard.writes_paused()

    def resume_writing(self) -> None:
        super().resume_writing()
        self.guard.writes_resumed()

    def send_400_response(self, msg: str) -> None:
        self.guard.bad_request()


def guarded_protocol(
    header_timeout_s: float,
    max_connections: int,
    send_timeout_s: float,
    on_close: Callable[[str], None] = lambda reason: None,
) -> type[H11Protocol]:
    """An h11 protocol class for uvicorn with the header timeout, the connection cap and the send timeout;
    ``on_close`` is told why each connection it closes was closed (for metrics)."""
    limits = ConnectionLimits(header_timeout_s=header_timeout_s, max_connections=max_connections,
                              send_timeout_s=send_timeout_s, on_close=on_close)  # fmt: skip
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"limits": limits})


class RepeatFilter(logging.Filter):
    """Lets a log message through at most once per interval (clients can make uvicorn repeat some at will)."""

    def __init__(self, messages: tuple[str, ...], interval_s: float = ACCEPT_LOG_INTERVAL_S):
        super().__init__()
        self._messages = messages
        self._interval_s = interval_s
        self._last: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message not in self._messages:
            return True
        now = time.monotonic()
        if now - self._last.get(message, -float("inf")) < self._interval_s:
            return False
        self._last[message] = now
        return True


def _limit_uvicorn_repeats() -> None:
    errors = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, RepeatFilter) for f in errors.filters):
        errors.addFilter(
            RepeatFilter(("Invalid HTTP request received.", "ASGI callable returned without completing response."))
        )


class AcceptErrorLimiter:
    """An event-loop exception handler that logs accept() failures at most once per interval.

    Everything else goes to the handler that was there before (asyncio's default: log with traceback).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, interval_s: float = ACCEPT_LOG_INTERVAL_S):
        self._previous = loop.get_exception_handler()
        self._interval_s = interval_s
        self._last = -float("inf")
        self._suppressed = 0

    @classmethod
    def install(cls, loop: asyncio.AbstractEventLoop, interval_s: float = ACCEPT_LOG_INTERVAL_S) -> AcceptErrorLimiter:
        limiter = cls(loop, interval_s)
        loop.set_exception_handler(limiter)
        return limiter

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        if _retry_after_close(context):
            return
        if not str(context.get("message", "")).startswith(_ACCEPT_ERROR):
            if self._previous is not None:
                self._previous(loop, context)
            else:
                loop.default_exception_handler(context)
            return
        now = time.monotonic()
        if now - self._last < self._interval_s:
            self._suppressed += 1
            return
        more = f" ({self._suppressed} more in the last {now - self._last:.0f} s)" if self._suppressed else ""
        log.error(
            "cannot accept connections: %s%s; lower --max-connections or raise the open-file limit (ulimit -n)",
            context.get("exception", "out of resources"),
            more,
        )
        self._last, self._suppressed = now, 0


def _retry_after_close(context: dict) -> bool:
    """True for asyncio's accept() retry that fires after the server closed its socket.

    After a failed accept() asyncio schedules _start_serving again ACCEPT_RETRY_DELAY s later; when the
    server shuts down in between, the retry registers the closed socket (fd -1) and raises ValueError,
    which would be logged as a traceback at every such exit. Nothing is lost: the server is stopping.
    """
    callback = getattr(context.get("handle"), "_callback", None)
    return getattr(callback, "__name__", "") == "_start_serving" and isinstance(context.get("exception"), ValueError)


def fit_open_files(max_connections: int) -> int:
    """Raises the soft open-file limit toward the hard one so that max_connections fit; returns the cap to use.

    Where even the hard limit is too low, the cap is lowered to fit, with a warning.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max_connections + FILES_RESERVED
    if soft != resource.RLIM_INFINITY and soft < want:
        new_soft = want if hard == resource.RLIM_INFINITY else min(want, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new_soft, hard))
            soft = new_soft
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit to %d: %s", new_soft, exc)
    if soft != resource.RLIM_INFINITY and soft < want:
        fitted = max(1, soft - FILES_RESERVED)
        log.warning(
            "--max-connections %d does not fit the open-file limit (%d): using %d", max_connections, soft, fitted
        )
        return fitted
    return max_connections


def uvicorn_config(app, serve: ServeConfig, *, host: str, port: int, **options) -> uvicorn.Config:  # app: create_app()
    """The uvicorn configuration of esm2cli serve: the guarded protocol, no access log of uvicorn's own
    (esm2cli.serve.guard writes one on stderr), no Server header. ``options`` go to uvicorn.Config as they are."""
    _limit_uvicorn_repeats()
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=guarded_protocol(
            serve.header_timeout_s,
            serve.max_connections,
            serve.body_timeout_s,
            on_close=app.state.metrics.connection_closed,
        ),
        access_log=False,
        server_header=False,
        log_config=None,  # esm2cli's logging (stderr) carries uvicorn's messages too
        **options,
    )
