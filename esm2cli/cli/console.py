"""What a command shows and how it ends: logging, progress bars, one-line errors, interruption."""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager

import click

from esm2cli.errors import Esm2Error, Interrupted, exit_code

log = logging.getLogger("esm2cli")


def setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.ERROR if quiet else (logging.DEBUG if verbose else logging.INFO)
    # Other libraries (botocore, werkzeug, httpx, ...) speak only at WARNING and up unless -vv.
    logging.basicConfig(
        level=logging.DEBUG if verbose > 1 else logging.WARNING, format="esm2cli: %(message)s", stream=sys.stderr,
        force=True,
    )  # fmt: skip
    logging.getLogger("esm2cli").setLevel(level)
    # huggingface_hub prints through a handler of its own; propagating too would print each message twice.
    logging.getLogger("huggingface_hub").propagate = False


def use_s3_endpoint(url: str | None) -> None:
    """Hands --s3-endpoint-url to esm2cli.io.storage, which reads it for s3:// URLs."""
    if url:
        import os

        os.environ["ESM2CLI_S3_ENDPOINT_URL"] = url


def device_list(devices: list[str], most: int = 4) -> str:
    """Names the devices, abbreviated past ``most``: 'cuda:0, cuda:1, ... cuda:7 (8 devices)'."""
    if len(devices) <= most:
        return ", ".join(devices)
    return f"{devices[0]}, {devices[1]}, ... {devices[-1]} ({len(devices)} devices)"


class Refused(click.ClickException):
    """A domain error the user must fix (bad input, an output in the way): one message, exit 2, no usage text."""

    exit_code = 2


def to_click(exc: Esm2Error) -> click.ClickException:
    """Translates a domain error into Click's: exit 2 for bad input or options, 1 otherwise.

    Option values Click itself rejects keep Click's usage text; our own findings (which name the file,
    record or option) are the message alone.
    """
    return Refused(str(exc)) if exit_code(exc) == 2 else click.ClickException(str(exc))


@contextmanager
def one_line_errors():
    """Domain errors leave the command as Click's (to_click): one line, exit 2 or 1; bugs keep their traceback."""
    try:
        yield
    except Esm2Error as exc:  # the message names the file, row, record or option
        raise to_click(exc) from exc


def progress_factory(quiet: bool, unit: str = "seq"):
    def factory(total: int, residues_total: int | None = None):
        """A bar over ``total`` items; given ``residues_total``, over residues, so that its ETA holds while the
        longest proteins come last in each chunk (items sorted by length)."""
        from tqdm import tqdm

        by_residue = residues_total is not None
        bar = tqdm(
            total=residues_total if by_residue else total,
            unit="res" if by_residue else unit,
            unit_scale=by_residue,
            dynamic_ncols=True,
            file=sys.stderr,
            disable=True if quiet else None,
            smoothing=0.1,
        )
        state = {"residues": 0, "items": 0}

        def update(sequences: int, residues: int) -> None:
            state["residues"] += residues
            state["items"] += sequences
            if by_residue:
                bar.set_postfix_str(f"{state['items']:,}/{total:,} {unit}", refresh=False)
                bar.update(residues)
            else:
                elapsed = bar.format_dict["elapsed"] or 1e-9
                bar.set_postfix_str(f"{state['residues'] / elapsed:,.0f} residues/s", refresh=False)
                bar.update(sequences)
            if state["items"] >= total:
                bar.close()

        return update

    return factory


@contextmanager
def interruptible(message: str = "interrupted: rerun the same command to resume"):
    """SIGINT and SIGTERM (a preempted pod) unwind the run: finished chunks stay, the exit is 130 or 143.

    A second signal during that unwinding exits at once: every committed chunk is already safe on disk.
    """
    import signal

    def first(signum, frame):
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda s, f: os._exit(128 + s))
        raise Interrupted(signum)

    previous = {sig: signal.signal(sig, first) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    except Interrupted as exc:
        click.echo(message, err=True)
        sys.exit(128 + exc.signum)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def model_truncate(model: str, truncate: int | None, *, long_sequences: str | None = None) -> int:
    """--truncate as given, else the model's own context; one line (exit 2) when it is over ESM C's.

    ``long_sequences`` is the command's --long-sequences (None for a command without it): windows are suggested
    only where they can be asked for and were not.
    """
    from esm2cli.model.architecture import resolve_truncate

    window = "--long-sequences window" if long_sequences not in (None, "window") else None
    try:
        return resolve_truncate(model, truncate, window=window)
    except Esm2Error as exc:
        raise to_click(exc) from exc
