"""Error bodies of the HTTP API: esm2cli's own shape, or OpenAI's under /v1, from one place.

esm2cli routes answer ``{"error": "...", "error_type": "..."}``; routes under ``/v1`` answer as
OpenAI does, ``{"error": {"message", "type", "param", "code"}}``, so that OpenAI clients show the
message. Bodies are encoded with ensure_ascii, so that no text (a lone surrogate echoed from a
request, say) can make an error answer itself fail.
"""

from __future__ import annotations

import json

OPENAI_PREFIX = "/v1"
RETRY_AFTER_S = "1"

# OpenAI's error types and codes by status, as its API sends them.
_OPENAI_KINDS = {
    401: ("invalid_request_error", "invalid_api_key"),
    404: ("invalid_request_error", "not_found"),
    408: ("invalid_request_error", "request_timeout"),
    413: ("invalid_request_error", None),
    422: ("invalid_request_error", None),
    429: ("requests", "rate_limit_exceeded"),
    503: ("server_error", "service_unavailable"),
}


def is_openai_path(path: str) -> bool:
    return path == OPENAI_PREFIX or path.startswith(OPENAI_PREFIX + "/")


def error_payload(
    path: str, status: int, message: str, error_type: str, param: str | None = None, code: str | None = None
) -> dict:
    """The JSON body of an error answer for a request to ``path``."""
    if not is_openai_path(path):
        return {"error": message, "error_type": error_type}
    kind, default_code = _OPENAI_KINDS.get(status, ("server_error" if status >= 500 else "invalid_request_error", None))
    return {"error": {"message": message, "type": kind, "param": param, "code": code or default_code}}


def error_headers(status: int) -> list[tuple[bytes, bytes]]:
    """Headers every error answer of this status carries (Retry-After, WWW-Authenticate)."""
    headers = [(b"content-type", b"application/json")]
    if status in (429, 503):
        headers.append((b"retry-after", RETRY_AFTER_S.encode()))
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    return headers


def encode(payload: dict) -> bytes:
    return json.dumps(payload, ensure_ascii=True).encode("ascii")


async def send_error(send, path: str, status: int, message: str, error_type: str, close: bool = False) -> None:
    """Sends a complete error answer through an ASGI ``send`` (close: ask the server to close the connection)."""
    body = encode(error_payload(path, status, message, error_type))
    headers = error_headers(status) + [(b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
