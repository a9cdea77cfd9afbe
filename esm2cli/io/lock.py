"""One run at a time per output: a lock that names its holder and that a dead holder does not keep.

Local outputs use flock(2) on a file beside the output: the kernel drops the lock when the holder
dies, however it dies. Object stores have no locks; there a lease object is written and renewed while
the run lives, and a lease not renewed for LEASE_S is taken over.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import socket
import threading
import time

from esm2cli.errors import OutputError, OutputLockedError
from esm2cli.io import storage

LEASE_S = 120.0  # an object-store lease not renewed for this long belongs to a dead run
RENEW_S = 30.0


def _holder() -> dict:
    # The token tells two runs of one process apart (the Python API from two threads, started in one second).
    return {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "token": secrets.token_hex(8)}  # fmt: skip


def _describe(target: str, holder: dict) -> str:
    who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, since {holder.get('since', '?')}"
    return f"{target} is being written by another esm2cli run ({who}); wait for it to end or stop it"


def lock_path(target: str) -> str:
    """The lock beside the output: ``.<name>.lock`` (hidden from globs of *.parquet)."""
    if storage.is_url(target):
        parent, name = target.rstrip("/").rsplit("/", 1)
    else:
        parent, name = os.path.split(os.path.abspath(target))
    return storage.join(parent, f".{name}.lock")


class OutputLock:
    """Held for the whole run toward one output; use as a context manager.

    Raises:
        OutputLockedError: Another live run holds the output.
    """

    def __init__(self, target: str):
        self.target = str(target)
        self.path = lock_path(self.target)
        self._fd: int | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self._me = _holder()

    def __enter__(self) -> OutputLock:
        if storage.is_url(self.path):
            self._take_lease()
            return self
        try:
            self._flock()
        except OSError as exc:
            if getattr(exc, "errno", None) not in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise OutputError(f"cannot lock {self.path}: {exc.strerror or exc}") from exc
            # Nothing can be written there, so no other run can write either: go on without the lock
            # (an output that is already complete is reported as such; any write fails in one line).
            self._fd = None
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    def _flock(self) -> None:
        import fcntl

        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_json_fd(fd)
                os.close(fd)
                raise OutputLockedError(_describe(self.target, holder)) from None
            # The holder before us may have unlinked the file after we opened it: lock the live one.
            if os.path.exists(self.path) and os.path.samestat(os.fstat(fd), os.stat(self.path)):
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(self._me).encode())
        self._fd = fd
        sweep_stale_temporaries(self.target)

    def _take_lease(self) -> None:
        if storage.exists(self.path):
            with storage.open_input(self.path) as handle:
                try:
                    lease = json.load(handle)
                except ValueError:
                    lease = {}
            if lease.get("expires", 0) > time.time() and lease.get("holder") != self._me:
                raise OutputLockedError(_describe(self.target, lease.get("holder", {})))
        self._write_lease()
        self._renewer = threading.Thread(target=self._renew, name="esm2cli-lease", daemon=True)
        self._renewer.start()

    def _write_lease(self) -> None:
        with storage.AtomicFile(self.path) as lease:
            lease.handle.write(json.dumps({"holder": self._me, "expires": time.time() + LEASE_S}).encode())

    def _renew(self) -> None:
        while not self._stop.wait(RENEW_S):
            try:
                self._write_lease()
            except Exception:  # a missed renewal only shortens the lease
                pass

    def release(self) -> None:
        """Gives the output up (idempotent)."""
        if self._fd is not None:
            try:
                os.unlink(self.path)
            except OSError:
                pass
            os.close(self._fd)  # closing drops the flock
            self._fd = None
        if self._renewer is not None:
            self._stop.set()
            self._renewer.join()
            self._renewer = None
            try:
                storage.remove(self.path)
            except Exception:  # the lease expires by itself
                pass


def _read_json_fd(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return json.loads(os.read(fd, 4096) or b"{}")
    except (OSError, ValueError):
        return {}


def sweep_stale_temporaries(target: str) -> list[str]:
    """Deletes the temporary files (storage.AtomicFile's ``.<name>.<pid>-<hex>.tmp``) that runs killed before
    their commit left beside ``target``: each may be as large as the output, and nothing else ever removes it.

    Called with the output's lock held, so no live run writes toward it; a file whose process still lives is
    kept all the same (a writer of this process, or one that does not lock).

    Returns:
        The paths deleted.
    """
    directory, name = os.path.split(os.path.abspath(target))
    pattern = re.compile(rf"\.{re.escape(name)}\.(\d+)-[0-9a-f]{{8}}\.tmp")

    def pid_of(entry: str) -> int | None:
        found = pattern.fullmatch(entry)
        return int(found.group(1)) if found else None

    return storage.sweep_orphans(directory, pid_of)
