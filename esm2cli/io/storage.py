"""Where files live: local paths or fsspec URLs (s3://, gs://, ...), with atomic commits and clear errors."""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import BinaryIO

from esm2cli.errors import ConfigError, OutputError, StorageError


def is_url(path: str | os.PathLike) -> bool:
    """True for fsspec URLs such as s3://bucket/key (a plain path is local)."""
    return "://" in str(path)


def file_key(path: str) -> object:
    """What names one file, whatever the spelling: (device, inode) of a local file (links and relative paths
    resolved), else its real path (a file still to be written), or a URL without its trailing slash."""
    if is_url(path):
        return path.rstrip("/")
    try:
        found = os.stat(path)
    except OSError:
        return os.path.realpath(path)
    return found.st_dev, found.st_ino


def is_stream(path: str | os.PathLike) -> bool:
    """True for an input that can be read once only: '-' (stdin), or a local path that is not a regular file (a
    named FIFO, bash's ``<(zcat x.gz)`` as /dev/fd/63, /dev/stdin when stdin is a pipe).

    Only stat is asked: it does not block on a FIFO, where open() waits for a writer. A missing path is no stream
    (opening it says so).
    """
    if str(path) == "-":
        return True
    if is_url(path):
        return False
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not stat.S_ISREG(mode) and not stat.S_ISDIR(mode)


_SPOOL_PREFIX = "esm2cli-stream-"  # then the writer's pid, so that a killed run's copy can be known


def process_alive(pid: int) -> bool:
    """True while process ``pid`` exists on this machine (another user's counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def sweep_orphans(directory: str, pid_of: Callable[[str], int | None]) -> list[str]:
    """Deletes the files in ``directory`` that a process killed before its cleanup left there.

    Args:
        directory: Where to look (a folder that cannot be listed: nothing is deleted).
        pid_of: The pid that wrote a file, read from its name; None for a file that is none of these.

    Returns:
        The paths deleted. A file of this process or of a live one is kept, as is one that cannot be removed
        (gone already, or another user's).
    """
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    swept = []
    for name in names:
        pid = pid_of(name)
        if pid is None or pid == os.getpid() or process_alive(pid):
            continue
        try:
            os.remove(os.path.join(directory, name))
            swept.append(os.path.join(directory, name))
        except OSError:
            pass
    return swept


def _spool_pid(name: str) -> int | None:
    pid = name[len(_SPOOL_PREFIX) :].split("-", 1)[0]
    return int(pid) if name.startswith(_SPOOL_PREFIX) and pid.isdigit() else None


def spool(source: str | os.PathLike, directory: str | None = None) -> str:
    """Copies a stream (see is_stream) to a temporary file, read once, so that it can be read twice; the caller
    deletes the copy.

    Raises:
        StorageError: The stream cannot be opened or read (the copy is removed).
    """
    sweep_orphans(directory or tempfile.gettempdir(), _spool_pid)  # copies of runs killed by a second Ctrl-C
    fd, name = tempfile.mkstemp(prefix=f"{_SPOOL_PREFIX}{os.getpid()}-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as out:
            if str(source) == "-":
                shutil.copyfileobj(sys.stdin.buffer, out, length=1 << 20)
            else:
                with open_input(source) as handle:  # a FIFO: waits here for its writer, as a reader of stdin does
                    shutil.copyfileobj(handle, out, length=1 << 20)
    except BaseException as exc:
        os.unlink(name)
        if isinstance(exc, OSError):
            raise describe(exc, str(source)) from exc
        raise
    return name


OUTPUT_SUFFIXES = (".parquet", ".pq", ".h5", ".hdf5")  # what embed writes: Parquet, or HDF5 (by the name)


def check_output_name(output: str | os.PathLike, sharded: bool) -> None:
    """Refuses an output name that promises a format embed does not write (out.csv would hold Parquet),
    and '-' (embed writes a file, never a stream to stdout). A name without an extension is Parquet.

    Raises:
        ConfigError: The name is '-' or ends in another extension.
    """
    name = str(output)
    if name == "-":
        raise ConfigError(
            "-o -: embed writes a file (Parquet or HDF5), not a stream to stdout; name a file such as out.parquet"
        )
    if sharded:
        return  # a directory or prefix: the parts get their own names
    suffix = output_suffix(name)
    if suffix and suffix not in OUTPUT_SUFFIXES:
        raise ConfigError(
            f"{name}: embed writes Parquet (.parquet, .pq) or HDF5 (.h5, .hdf5), not {suffix}; "
            "name the output with one of those extensions"
        )


def output_suffix(output: str | os.PathLike) -> str:
    """The extension of an output's last name, lower-cased ('.parquet'); '' for none (a directory or prefix)."""
    base = str(output).rstrip("/").rsplit("/", 1)[-1]
    return "." + base.rsplit(".", 1)[-1].lower() if "." in base.lstrip(".") else ""


def storage_options(url: str) -> dict:
    """Options for the URL's filesystem: an S3 endpoint from ESM2CLI_S3_ENDPOINT_URL or AWS_ENDPOINT_URL[_S3].

    Credentials come from the usual AWS variables, files or instance roles, as boto does.
    """
    if not str(url).startswith(("s3://", "s3a://")):
        return {}
    endpoint = (
        os.environ.get("ESM2CLI_S3_ENDPOINT_URL")
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
    )
    return {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}


def _fs(url: str):
    import fsspec

    try:
        return fsspec.core.url_to_fs(url, **storage_options(url))
    except (ImportError, ValueError) as exc:
        raise StorageError(f"{url}: {exc}") from exc


def describe(exc: BaseException, url: str) -> StorageError:
    """Turns a storage exception into one clear line (no such bucket, denied, no credentials, ...)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    name = type(exc).__name__
    if "NoCredentials" in name or "Unable to locate credentials" in text:
        return StorageError(f"{url}: no credentials (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile)")
    if "NoSuchBucket" in text or "bucket does not exist" in text.lower():
        return StorageError(f"{url}: no such bucket")
    if isinstance(exc, PermissionError) or "AccessDenied" in text or "Forbidden" in text:
        return StorageError(f"{url}: access denied ({text})")
    if isinstance(exc, FileNotFoundError):
        return StorageError(f"{url}: no such file")
    if isinstance(exc, OSError) and exc.strerror:
        return StorageError(f"{url}: {exc.strerror}")
    return StorageError(f"{url}: {text}")


@contextmanager
def open_input(url: str | os.PathLike, *, ranged: bool = False) -> Iterator[BinaryIO]:
    """Opens a local path or URL for reading bytes.

    Args:
        url: A path or an fsspec URL.
        ranged: For a URL, fetch exactly the bytes each read asks for (a shard's slice), not the filesystem's
            read-ahead blocks.

    Raises:
        StorageError: The file, bucket or credentials are missing, or access is denied.
    """
    if not is_url(url):
        try:
            handle = open(url, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError as exc:
            raise StorageError(f"{url}: no such file") from exc
        except OSError as exc:
            raise StorageError(f"{url}: cannot open ({exc.strerror})") from exc
        with handle:
            yield handle
        return
    fs, path = _fs(str(url))
    try:
        handle = fs.open(path, "rb", cache_type="none") if ranged else fs.open(path, "rb")
    except Exception as exc:  # botocore, aiohttp and fsspec errors all end as one line
        raise describe(exc, str(url)) from exc
    with handle:
        yield handle


def exists(url: str | os.PathLike) -> bool:
    """True when a file exists at this path or URL."""
    if not is_url(url):
        return os.path.exists(url)
    fs, path = _fs(str(url))
    try:
        return fs.exists(path)
    except Exception as exc:
        raise describe(exc, str(url)) from exc


def listdir(url: str | os.PathLike) -> list[str]:
    """Names (not paths) of the files directly under a directory or prefix; empty when there is none."""
    if not is_url(url):
        return sorted(os.listdir(url)) if os.path.isdir(url) else []
    fs, path = _fs(str(url))
    try:
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)) if fs.exists(path) else []
    except Exception as exc:
        raise describe(exc, str(url)) from exc


def file_stamp(url: str | os.PathLike) -> dict:
    """What tells one version of a file from the next without reading it: size and modification (or ETag).

    Raises:
        StorageError: The file cannot be reached.
    """
    if not is_url(url):
        try:
            stat = os.stat(url)
        except OSError as exc:
            raise StorageError(f"{url}: {exc.strerror}") from exc
        return {"size": stat.st_size, "modified": stat.st_mtime_ns}
    fs, path = _fs(str(url))
    try:
        info = fs.info(path)
    except Exception as exc:
        raise describe(exc, str(url)) from exc
    version = info.get("ETag") or info.get("LastModified") or info.get("mtime") or info.get("created")
    return {"size": info.get("size"), "modified": str(version)}


def remove(url: str | os.PathLike, recursive: bool = False) -> None:
    """Deletes a file (or a directory tree); a missing one is not an error."""
    if not is_url(url):
        if os.path.isdir(url) and recursive:
            import shutil

            shutil.rmtree(url, ignore_errors=True)
        elif os.path.exists(url):
            os.remove(url)
        return
    fs, path = _fs(str(url))
    try:
        if fs.exists(path):
            fs.rm(path, recursive=recursive)
    except Exception as exc:
        raise describe(exc, str(url)) from exc


def join(base: str | os.PathLike, *names: str) -> str:
    """Joins names onto a path or URL."""
    if is_url(base):
        return "/".join([str(base).rstrip("/"), *names])
    return os.path.join(base, *names)


class AtomicFile:
    """A file that appears at its final path only when commit() succeeds.

    Locally it is written as ``.<name>.<pid>-<random>.tmp`` beside the target and renamed; on object stores the
    upload completes at commit (an object is never visible half-written) and abort() discards it. As a context
    manager it commits when the block ends and aborts when the block raises.
    """

    def __init__(self, url: str | os.PathLike):
        self.url = str(url)
        try:
            if is_url(self.url):
                fs, path = _fs(self.url)
                self.tmp = None
                self.handle = fs.open(path, "wb")
            else:
                directory, name = os.path.split(os.path.abspath(self.url))
                os.makedirs(directory, exist_ok=True)
                # Unique to the writer: two runs toward one path never write into one temporary file.
                self.tmp = os.path.join(directory, f".{name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
                try:
                    self.handle = open(self.tmp, "wb")  # noqa: SIM115 - closed by commit/abort
                except BaseException:  # a signal just after the file appeared: leave nothing behind
                    if os.path.exists(self.tmp):
                        os.remove(self.tmp)
                    raise
        except StorageError:
            raise
        except Exception as exc:
            raise describe(exc, self.url) from exc

    def commit(self) -> None:
        """Closes the file and makes it visible at its final path."""
        try:
            if self.tmp is not None:
                self.handle.flush()
                os.fsync(self.handle.fileno())  # durable before it replaces anything
            self.handle.close()
            if self.tmp is not None:
                os.replace(self.tmp, self.url)
        except Exception as exc:
            self.abort()
            raise describe(exc, self.url) from exc

    def abort(self) -> None:
        """Drops the file: nothing appears at the final path."""
        try:
            if self.tmp is None:
                discard = getattr(self.handle, "discard", None)
                if discard:
                    discard()
                else:
                    self.handle.close()
                return
            self.handle.close()
        except Exception:  # a full disk fails the final flush too: the file is dropped all the same
            pass
        finally:
            if self.tmp is not None and os.path.exists(self.tmp):
                os.remove(self.tmp)

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.commit()
        else:
            self.abort()


FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)  # the output's filesystem refused the write


@contextmanager
def write_errors(output: str, what: str = "") -> Iterator[None]:
    """A full disk, a quota, a file size limit or a read-only filesystem under a write leaves it as one line
    naming the output (and ``what`` it is: "page"), OutputError, exit 1, not a traceback.

    Other OSErrors stay what they are: the block may also read (a search reads its database), and a read that
    fails is not the output's fault.
    """
    try:
        yield
    except (OSError, StorageError) as exc:
        # AtomicFile.commit's StorageError: a small output's full disk comes up at the last flush or the fsync
        code = _full_errno(exc.__cause__ if isinstance(exc, StorageError) else exc)
        if code is None:
            raise
        the = f" the {what}" if what else ""
        raise OutputError(f"{output}: cannot write{the} ({os.strerror(code)})") from exc


def _full_errno(exc: BaseException | None) -> int | None:
    """The FULL errno an OSError carries, in its errno or in pyarrow's wording ("[errno 27] ..."); None if none."""
    if not isinstance(exc, OSError):
        return None
    if exc.errno in FULL:
        return exc.errno
    return next((code for code in FULL if f"[errno {code}]" in str(exc)), None)
