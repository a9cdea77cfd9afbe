"""The output a run writes, and whether it may: the checks embed and score both make before and after loading.

Before anything is read: the output is none of the run's inputs (a file, or the file stdin is redirected from)
and no directory. Once the run's identity is known: an output of this very run is already complete, and any
other one is replaced only with --overwrite; the refusal names what differs from the run that made it.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping

from esm2cli.config import ShardConfig
from esm2cli.errors import ConfigError, OutputExistsError
from esm2cli.io import storage
from esm2cli.io.identity import describe_changes, same_file, same_run, stdin_is
from esm2cli.io.parquet import read_metadata


def output_target(output: str | os.PathLike, shard: ShardConfig | None = None) -> str:
    """The file a run writes: ``output`` itself, or ``<output>/part-<i>-of-<n>.parquet`` for a shard.

    A local symbolic link is followed to the file it names: the commit renames a finished file over the target,
    which would replace the link itself and leave the file it names as it was. A link into /dev or /proc
    (/dev/stdout) stays as it is, for check_target to refuse.
    """
    target = storage.join(output, shard.part_name()) if shard else str(output)
    if not storage.is_url(target) and os.path.islink(target) and not _is_special(target):
        return os.path.realpath(target)
    return target


def check_target(target: str, inputs: Mapping[str, str | os.PathLike | None], *, directory_hint: str = "") -> None:
    """Refuses, before anything is touched, an output that is one of the inputs or an existing directory.

    Args:
        target: The file the run writes.
        inputs: The run's inputs by what the message calls them ("the input file": the FASTA); '-' is stdin,
            refused when it is redirected from the target; None: no such input.
        directory_hint: Said after "is a directory: name a file" (embed's "(or add --shard-count ...)").

    Raises:
        ConfigError: The output names an input, or a directory where a file is expected.
    """
    for what, source in inputs.items():
        if source is None or not str(source):
            continue
        if same_file(source, target) or (str(source) == "-" and stdin_is(target)):
            raise ConfigError(f"{target} is {what}: name another output")
    if not storage.is_url(target) and os.path.isdir(target):
        raise ConfigError(f"{target} is a directory: name a file{directory_hint}")
    if not storage.is_url(target) and (under := _file_above(target)):
        raise ConfigError(f"{target}: {under} is a file, not a folder: name an output outside it")
    if not storage.is_url(target) and _is_special(target):
        raise ConfigError(
            f"{target} is not a regular file (a FIFO, a device, /dev/stdout): esm2cli writes a file beside the "
            "output and renames it into place; name a file"
        )


def _file_above(target: str) -> str | None:
    """The nearest existing folder of ``target``'s path when it is a file (``in.fa/out.parquet``), else None."""
    parent = os.path.dirname(os.path.abspath(target))
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent) if os.path.dirname(parent) != parent else ""
    return parent if parent and not os.path.isdir(parent) else None


def _is_special(target: str) -> bool:
    """True for an output that is, or links to, something other than a regular file or nothing: a FIFO (reading
    its metadata would wait for a writer), a device, or a name in /dev or /proc (/dev/stdout links to
    /proc/self/fd/1, /dev/fd/1 is one). The rename that commits an output would replace such a link (as root,
    /dev/stdout or /dev/null itself), and never write through it. /dev/shm and its like hold plain files.
    """
    path = os.path.abspath(target)
    for _ in range(40):  # the kernel's own bound on a chain of links
        parent = os.path.realpath(os.path.dirname(path))
        if parent in ("/dev", "/proc") or parent.startswith("/proc/"):
            return True
        if not os.path.islink(path):
            break
        path = os.path.normpath(os.path.join(os.path.dirname(path), os.readlink(path)))
    try:
        mode = os.stat(target).st_mode
    except OSError:
        return False  # nothing there yet (or a dangling link): the commit creates the file
    return not stat.S_ISREG(mode)


def is_complete(target: str, identity: Mapping | None, overwrite: bool) -> bool:
    """True when the target already holds this very run's output (by the identity in its metadata).

    Args:
        target: The file the run writes.
        identity: The run's identity; None where it cannot be known (an input read once from stdin, weights not
            named before they load): never complete then.
        overwrite: Another output there is replaced (atomically, once the new one is complete).

    Raises:
        OutputExistsError: Another output is there and overwrite is False; the message names what differs.
    """
    if not storage.exists(target):
        return False
    metadata = read_metadata(target)
    if identity is not None and same_run(metadata.get("identity"), identity):
        return True
    if overwrite:
        return False
    if not metadata:
        raise OutputExistsError(f"{target} already exists and is not esm2cli output (add --overwrite to replace it)")
    if identity is None:
        raise OutputExistsError(f"{target} already exists (use --overwrite to replace it)")
    changes = describe_changes(metadata.get("identity") or {}, dict(identity))
    raise OutputExistsError(
        f"{target} already exists, made by another run ({'; '.join(changes)}): add --overwrite to replace it"
    )
