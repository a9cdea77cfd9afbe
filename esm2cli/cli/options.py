"""Options shared by several commands (model, embedding, long sequences, logging, server security)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import click

from esm2cli.config import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_TOKENS,
    DEFAULT_MODEL,
    DEFAULT_OUTPUT_DTYPE,
    DEFAULT_WINDOW_OVERLAP,
    LONG_SEQUENCES,
    OUTPUT_DTYPES,
    POOLINGS,
    EmbedConfig,
    ModelConfig,
    ServeConfig,
)


class LayerList(click.ParamType):
    """Comma-separated layer indices, such as ``-1`` or ``0,6,-1``."""

    name = "LAYERS"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            layers = tuple(int(part) for part in str(value).split(",") if part.strip())
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of integers", param, ctx)
        if not layers:
            self.fail("name at least one layer", param, ctx)
        return layers


def model_options(func):
    """Options shared by every command that loads the model: model, load format, dtype, devices."""
    options = [
        click.option(
            "-m",
            "--model",
            default=DEFAULT_MODEL,
            show_default=True,
            envvar="ESM2CLI_MODEL",
            help="ESM-2 alias (esm2_t6_8M ... esm2_t48_15B), Hugging Face hub id, or local directory.",
        ),
        click.option(
            "--load-format",
            type=click.Choice(["auto", "dummy"]),
            default=ModelConfig.load_format,
            show_default=True,
            envvar="ESM2CLI_LOAD_FORMAT",
            help="dummy: the named architecture with RANDOM weights, no download (demos, benchmarks).",
        ),
        click.option(
            "--dtype",
            type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
            default=ModelConfig.dtype,
            show_default=True,
            envvar="ESM2CLI_DTYPE",
            help="Weights are converted to this once. auto: bfloat16 where the hardware computes it natively "
            "(CUDA with bf16, CPUs with AVX512-BF16 or AMX), else float32. Pooling and output stay float32.",
        ),
        click.option(
            "--devices",
            default=ModelConfig.devices,
            show_default=True,
            envvar="ESM2CLI_DEVICES",
            help="auto, cpu, a GPU count, a list such as cuda:0,cuda:2, or sim:N for N simulated devices on the CPU.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def embedding_options(func):
    """Options shared by every command that embeds: layers, pooling, truncation."""
    options = [
        click.option(
            "--layers",
            type=LayerList(),
            default=",".join(map(str, EmbedConfig.layers)),
            show_default=True,
            envvar="ESM2CLI_LAYERS",
            help="Layers to return, comma-separated; 0 is the embedding layer, -1 the last.",
        ),
        click.option(
            "--pooling",
            type=click.Choice(POOLINGS),
            default=EmbedConfig.pooling,
            show_default=True,
            envvar="ESM2CLI_POOLING",
            help="mean: over residues only (no <cls>, <eos>, padding); bos: the <cls> token.",
        ),
        truncate_option("Residues kept per sequence; longer ones are truncated and flagged."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def truncate_option(help: str):
    """--truncate, the model's context by default; ``help`` says what it means to the command."""
    return click.option(
        "--truncate",
        type=click.IntRange(min=1),
        default=None,
        show_default="the model's context: 1022 for ESM-2, 2046 for ESM C",
        envvar="ESM2CLI_TRUNCATE",
        help=help,
    )


def batch_options(items: str):
    """--batch-size (``items`` per batch at most) and --max-tokens, for the commands that run batches of a file."""

    def decorate(func):
        func = max_tokens_option(func)
        return click.option(
            "--batch-size",
            type=click.IntRange(min=1),
            default=DEFAULT_BATCH_SIZE,
            show_default=True,
            envvar="ESM2CLI_BATCH_SIZE",
            help=f"{items} per batch at most.",
        )(func)

    return decorate


def skip_invalid_option(help: str, envvar: str | None = None):
    """--skip-invalid: go on past invalid records (and, for score, mutants) and report them."""
    return click.option("--skip-invalid", is_flag=True, envvar=envvar, help=help)


def overwrite_option(help: str):
    """--overwrite: replace an existing output, never before the new one is complete."""
    return click.option("--overwrite", is_flag=True, help=help)


def s3_endpoint_option(help: str = "S3-compatible endpoint for s3:// URLs."):
    """--s3-endpoint-url, handed to io.storage by console.use_s3_endpoint."""
    return click.option("--s3-endpoint-url", envvar="ESM2CLI_S3_ENDPOINT_URL", help=help)


def long_sequence_options(func):
    """--long-sequences and --window-overlap."""
    func = click.option(
        "--window-overlap",
        type=click.IntRange(min=0),
        default=DEFAULT_WINDOW_OVERLAP,
        show_default=True,
        envvar="ESM2CLI_WINDOW_OVERLAP",
        help="Residues shared by consecutive windows (--long-sequences window).",
    )(func)
    return click.option(
        "--long-sequences",
        type=click.Choice(LONG_SEQUENCES),
        default=EmbedConfig.long_sequences,
        show_default=True,
        envvar="ESM2CLI_LONG_SEQUENCES",
        help="Sequences over --truncate residues: truncate them (flagged), embed them whole in overlapping "
        "windows of --truncate residues (column 'windows'), or refuse them as invalid records.",
    )(func)


output_dtype_option = click.option(
    "--output-dtype",
    type=click.Choice(OUTPUT_DTYPES),
    default=DEFAULT_OUTPUT_DTYPE,
    show_default=True,
    envvar="ESM2CLI_OUTPUT_DTYPE",
    help="How stored vectors are kept: float16 halves the file (Parquet halffloat, HDF5 float16), rounding each "
    "value to about 1e-3 relative; computed in float32 either way.",
)

SLURM_ARRAY_VARIABLES = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_COUNT")


def slurm_shard(environ: Mapping[str, str]) -> tuple[int, int, str] | None:
    """The shard of a Slurm job-array task: index ID - MIN of COUNT, so --array=1-N and --array=0-(N-1) both
    work; None outside an array. Also returns the variables read, for the startup log.

    Raises:
        click.UsageError: The array is stepped or sparse (a task would not be one shard), or a variable is
            not an integer.
    """
    if "SLURM_ARRAY_TASK_ID" not in environ:
        return None
    names = [*SLURM_ARRAY_VARIABLES, *(n for n in ("SLURM_ARRAY_TASK_MAX", "SLURM_ARRAY_TASK_STEP") if n in environ)]
    try:
        values = {name: int(environ[name]) for name in names}
    except KeyError as exc:
        raise click.UsageError(
            f"a Slurm array task without ${exc.args[0]}: pass --shard-index and --shard-count"
        ) from None
    except ValueError:
        raise click.UsageError(f"Slurm array variables are not integers ({_shown(environ, names)})") from None
    task, low, count = (values[name] for name in SLURM_ARRAY_VARIABLES)
    high, step = values.get("SLURM_ARRAY_TASK_MAX", low + count - 1), values.get("SLURM_ARRAY_TASK_STEP", 1)
    if step != 1 or high - low + 1 != count:
        raise click.UsageError(
            f"the Slurm array is stepped or sparse ({_shown(environ, names)}): each task must be one shard, so "
            f"submit a dense array such as --array=0-{count - 1} or --array=1-{count}, or pass --shard-index "
            "and --shard-count"
        )
    if not 0 <= task - low < count:
        raise click.UsageError(
            f"SLURM_ARRAY_TASK_ID is outside its array ({_shown(environ, names)}): pass --shard-index and --shard-count"
        )
    return task - low, count, _shown(environ, names)


def names_a_file(output: str) -> bool:
    """An output with an extension embed writes (out_3.parquet) names one file, not a directory of parts."""
    from esm2cli.io.storage import OUTPUT_SUFFIXES, output_suffix

    return not str(output).endswith("/") and output_suffix(output) in OUTPUT_SUFFIXES


def _shown(environ: Mapping[str, str], names: list[str]) -> str:
    return ", ".join(f"{name}={environ.get(name)}" for name in names)


max_tokens_option = click.option(
    "--max-tokens",
    type=click.IntRange(min=64),
    default=None,
    envvar="ESM2CLI_MAX_TOKENS",
    help="Tokens per batch at most (sequences laid end to end), <cls> and <eos> included. "
    f"[default: {DEFAULT_MAX_TOKENS['cpu']} on the CPU, {DEFAULT_MAX_TOKENS['cuda']} on GPUs]",
)


def log_options(func):
    """-v and -q."""
    func = click.option("-q", "--quiet", is_flag=True, help="Only errors; no progress bar.")(func)
    return click.option("-v", "--verbose", count=True, help="More detail on stderr.")(func)


class _ApiKey(click.ParamType):
    """An API key; ESM2CLI_API_KEYS holds several, comma-separated."""

    name = "KEY"
    envvar_list_splitter = ","

    def convert(self, value, param, ctx):
        return value.strip()


def serve_security_options(func):
    """The server's access control and connection bounds."""
    options = [
        click.option(
            "--api-key",
            "api_keys",
            type=_ApiKey(),
            multiple=True,
            envvar="ESM2CLI_API_KEYS",
            help="A key clients send as 'Authorization: Bearer KEY' (repeatable; ESM2CLI_API_KEYS: comma-separated). "
            "Without any key the server answers anyone.",
        ),
        click.option(
            "--api-key-file",
            type=click.Path(dir_okay=False, path_type=Path),
            envvar="ESM2CLI_API_KEY_FILE",
            help="A file of API keys, one a line (# comments); for a Kubernetes Secret.",
        ),
        click.option(
            "--public-metrics",
            is_flag=True,
            envvar="ESM2CLI_PUBLIC_METRICS",
            help="Serve /metrics without a key.",
        ),
        click.option(
            "--public-docs",
            is_flag=True,
            envvar="ESM2CLI_PUBLIC_DOCS",
            help="Serve /docs, /redoc and /openapi.json without a key.",
        ),
        click.option(
            "--header-timeout",
            type=click.FloatRange(min=0.1),
            default=ServeConfig.header_timeout_s,
            show_default=True,
            envvar="ESM2CLI_HEADER_TIMEOUT",
            help="Seconds a connection may take to send a request's headers (else 408 and closed).",
        ),
        click.option(
            "--body-timeout",
            type=click.FloatRange(min=0.1),
            default=ServeConfig.body_timeout_s,
            show_default=True,
            envvar="ESM2CLI_BODY_TIMEOUT",
            help="Seconds a request body may take to arrive (else 408 and closed).",
        ),
        click.option(
            "--max-connections",
            type=click.IntRange(min=1),
            default=ServeConfig.max_connections,
            show_default=True,
            envvar="ESM2CLI_MAX_CONNECTIONS",
            help="Open connections at most; past it, new ones get 503.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def shard_options(what: str):
    """--shard-index and --shard-count as embed reads them ($ESM2CLI_SHARD_INDEX, $JOB_COMPLETION_INDEX, a Slurm
    array); ``what`` says what a shard holds."""

    def decorate(func):
        func = click.option(
            "--shard-count",
            type=click.IntRange(min=1),
            default=None,
            envvar="ESM2CLI_SHARD_COUNT",
            help=f"Split the work into this many shards: {what}.",
        )(func)
        return click.option(
            "--shard-index",
            type=click.IntRange(min=0),
            default=None,
            envvar=["ESM2CLI_SHARD_INDEX", "JOB_COMPLETION_INDEX"],
            help="This process's shard (0-based); read from $JOB_COMPLETION_INDEX in an Indexed Job, and from "
            "$SLURM_ARRAY_TASK_ID - $SLURM_ARRAY_TASK_MIN (of $SLURM_ARRAY_TASK_COUNT) in a Slurm job array.",
        )(func)

    return decorate


def resolve_shard(ctx: click.Context, shard_index: int | None, shard_count: int | None) -> tuple[int, int] | None:
    """(index, count) of this process's shard, from the options, an Indexed Job or a Slurm array; None unsharded.

    $JOB_COMPLETION_INDEX alone is every Indexed Job's: without --shard-count it is no request to shard.

    Raises:
        click.BadParameter: An index without a count (or the reverse), or an index not below the count.
    """
    from click.core import ParameterSource

    asked = (
        ctx.get_parameter_source("shard_index") is ParameterSource.COMMANDLINE or "ESM2CLI_SHARD_INDEX" in os.environ
    )
    if shard_index is not None and shard_count is None and asked:
        raise click.BadParameter("needs --shard-count (how many shards split the work)", param_hint="--shard-index")
    if shard_index is None and (slurm := slurm_shard(os.environ)) is not None:
        shard_index, slurm_count, _ = slurm
        shard_count = shard_count or slurm_count
    if shard_count is None:
        return None
    if shard_index is None:
        raise click.BadParameter("needs --shard-index, $JOB_COMPLETION_INDEX or a Slurm array task",
                                 param_hint="--shard-count")  # fmt: skip
    if shard_index >= shard_count:
        raise click.BadParameter(f"{shard_index} is not below --shard-count {shard_count}", param_hint="--shard-index")
    return shard_index, shard_count
