"""API keys: where they come from, how a request's bearer token is checked, which paths stay open."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from pathlib import Path

from esm2cli.errors import ConfigError

MIN_KEY_LENGTH = 16
# Open to anyone, whatever the keys: the kubelet's probes carry no credentials.
PROBE_PATHS = frozenset({"/health", "/live"})
METRICS_PATHS = frozenset({"/metrics"})
DOCS_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})


KEY_VARIABLES = ("ESM2CLI_API_KEYS", "ESM2CLI_API_KEY_FILE")


def refuse_empty_key_variables(environ: Mapping[str, str]) -> None:
    """Refuses ESM2CLI_API_KEYS or ESM2CLI_API_KEY_FILE set to nothing (an empty Secret value).

    click reads an empty variable as no option at all, which would start an open server although keys
    were asked for.

    Raises:
        ConfigError: One of them is set but blank.
    """
    for name in KEY_VARIABLES:
        if name in environ and not environ[name].strip():
            raise ConfigError(f"{name} is set but empty; refusing to serve without a key (unset it to serve openly)")


def read_key_file(path: str | Path) -> list[str]:
    """Reads API keys from a file: one a line; blank lines and lines starting with '#' are skipped.

    A file that holds no key (an empty Secret, a template that rendered nothing) is refused: the user
    asked for keys, and starting without them would open the server to anyone.

    Raises:
        ConfigError: The file cannot be read, or holds no key.
    """
    try:
        text = Path(path).read_text(encoding="utf-8-sig")  # a byte-order mark from an editor is not part of a key
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the API key file {path}: {exc}") from exc
    keys = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not keys:
        raise ConfigError(
            f"the API key file {path} holds no key (only blank lines or # comments); refusing to serve without one"
        )
    return keys


def checked_keys(keys: Iterable[str]) -> tuple[str, ...]:
    """Validates API keys (visible ASCII, no spaces, at least 16 characters); returns them without duplicates.

    Messages name a key by its position, never by its value.

    Raises:
        ConfigError: A key is too short or holds characters an HTTP header cannot carry.
    """
    out: list[str] = []
    for n, key in enumerate(keys, start=1):
        if len(key) < MIN_KEY_LENGTH:
            raise ConfigError(f"API key #{n} is too short ({len(key)} characters; at least {MIN_KEY_LENGTH})")
        if not all("!" <= ch <= "~" for ch in key):
            raise ConfigError(f"API key #{n} holds a character other than visible ASCII (no spaces)")
        if key not in out:
            out.append(key)
    return tuple(out)


class KeyChecker:
    """Accepts a request whose ``Authorization: Bearer`` token is one of the keys, in constant time.

    Tokens and keys are compared as SHA-256 digests with hmac.compare_digest, against every key
    without stopping at a match, so that the time taken says nothing about how much of a key was
    right, nor which key matched. The keys themselves are not kept.
    """

    def __init__(self, keys: Iterable[str], public_metrics: bool = False, public_docs: bool = False):
        self._digests = [hashlib.sha256(key.encode()).digest() for key in keys]
        self._open = set(PROBE_PATHS)
        if public_metrics:
            self._open |= METRICS_PATHS
        if public_docs:
            self._open |= DOCS_PATHS

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def needs_key(self, path: str) -> bool:
        """True when a request for ``path`` must carry a key (every path but the open ones)."""
        return self.enabled and path not in self._open

    def accepts(self, authorization: bytes | None) -> bool:
        """True when the Authorization header's value is ``Bearer <one of the keys>``."""
        return self.identify(authorization) is not None

    def identify(self, authorization: bytes | None) -> bytes | None:
        """The SHA-256 digest of the key an Authorization header carries (``Bearer <key>``), or None.

        The digest names the client (its cache partition) without keeping the key.
        """
        scheme, _, token = (authorization or b"").strip().partition(b" ")
        digest = hashlib.sha256(token.strip()).digest()
        match = False
        for known in self._digests:
            match |= hmac.compare_digest(known, digest)
        return digest if match and scheme.lower() == b"bearer" else None

    def __repr__(self) -> str:
        return f"KeyChecker(<{len(self._digests)} keys>)"
