"""The command line: parses options, builds the config, calls the library, reports. Nothing else."""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import click

from esm2cli import __version__
from esm2cli.config import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_BENCH_SECONDS,
    DEFAULT_CHUNK_SIZE,
    DEFAULT_COMMIT_SECONDS,
    DEFAULT_MAX_TOKENS,
    DEFAULT_MODEL,
    DEFAULT_TRUNCATE,
    DEFAULT_WINDOW_OVERLAP,
    GPU_PEAKS,
    MAX_BENCH_DEVICES,
    BatchConfig,
    EmbedConfig,
    InputConfig,
    ModelConfig,
    ModeledGPU,
    ServeConfig,
    ShardConfig,
)
from esm2cli.errors import ConfigError, Esm2Error, Interrupted, exit_code

log = logging.getLogger("esm2cli")


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


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.ERROR if quiet else (logging.DEBUG if verbose else logging.INFO)
    # Other libraries (botocore, werkzeug, httpx, ...) speak only at WARNING and up unless -vv.
    logging.basicConfig(
        level=logging.DEBUG if verbose > 1 else logging.WARNING, format="esm2cli: %(message)s", stream=sys.stderr,
        force=True,
    )  # fmt: skip
    logging.getLogger("esm2cli").setLevel(level)
    # huggingface_hub prints through a handler of its own; propagating too would print each message twice.
    logging.getLogger("huggingface_hub").propagate = False


def _use_s3_endpoint(url: str | None) -> None:
    """Hands --s3-endpoint-url to esm2cli.storage, which reads it for s3:// URLs."""
    if url:
        import os

        os.environ["ESM2CLI_S3_ENDPOINT_URL"] = url


class _Refused(click.ClickException):
    """A domain error the user must fix (bad input, an output in the way): one message, exit 2, no usage text."""

    exit_code = 2


def _to_click(exc: Esm2Error) -> click.ClickException:
    """Translates a domain error into Click's: exit 2 for bad input or options, 1 otherwise.

    Option values Click itself rejects keep Click's usage text; our own findings (which name the file,
    record or option) are the message alone.
    """
    return _Refused(str(exc)) if exit_code(exc) == 2 else click.ClickException(str(exc))


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
            type=click.Choice(["mean", "bos"]),
            default=EmbedConfig.pooling,
            show_default=True,
            envvar="ESM2CLI_POOLING",
            help="mean: over residues only (no <cls>, <eos>, padding); bos: the <cls> token.",
        ),
        click.option(
            "--truncate",
            type=click.IntRange(min=1),
            default=DEFAULT_TRUNCATE,
            show_default=True,
            envvar="ESM2CLI_TRUNCATE",
            help="Residues kept per sequence; longer ones are truncated and flagged.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


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
        type=click.Choice(["truncate", "window", "error"]),
        default=EmbedConfig.long_sequences,
        show_default=True,
        envvar="ESM2CLI_LONG_SEQUENCES",
        help="Sequences over --truncate residues: truncate them (flagged), embed them whole in overlapping "
        "windows of --truncate residues (column 'windows'), or refuse them as invalid records.",
    )(func)


max_tokens_option = click.option(
    "--max-tokens",
    type=click.IntRange(min=64),
    default=None,
    envvar="ESM2CLI_MAX_TOKENS",
    help="Padded tokens per batch at most, <cls> and <eos> included. "
    f"[default: {DEFAULT_MAX_TOKENS['cpu']} on the CPU, {DEFAULT_MAX_TOKENS['cuda']} on GPUs]",
)


def log_options(func):
    """-v and -q."""
    func = click.option("-q", "--quiet", is_flag=True, help="Only errors; no progress bar.")(func)
    return click.option("-v", "--verbose", count=True, help="More detail on stderr.")(func)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="esm2cli")
def cli() -> None:
    """ESM-2 protein embeddings on every CPU or GPU you have."""


def _progress_factory(quiet: bool, unit: str = "seq"):
    def factory(total: int):
        from tqdm import tqdm

        bar = tqdm(
            total=total,
            unit=unit,
            dynamic_ncols=True,
            file=sys.stderr,
            disable=True if quiet else None,
            smoothing=0.1,
        )
        state = {"residues": 0}

        def update(sequences: int, residues: int) -> None:
            state["residues"] += residues
            elapsed = bar.format_dict["elapsed"] or 1e-9
            bar.set_postfix_str(f"{state['residues'] / elapsed:,.0f} residues/s", refresh=False)
            bar.update(sequences)
            if bar.n >= bar.total:
                bar.close()

        return update

    return factory


def _device_list(devices: list[str], most: int = 4) -> str:
    """Names the devices, abbreviated past ``most``: 'cuda:0, cuda:1, ... cuda:7 (8 devices)'."""
    if len(devices) <= most:
        return ", ".join(devices)
    return f"{devices[0]}, {devices[1]}, ... {devices[-1]} ({len(devices)} devices)"


def _summary_line(summary, output, shard=None) -> str:
    from esm2cli.pipeline import output_target

    target = output_target(output, shard)
    if summary.already_complete:
        return f"{target} is already complete (same input content, weights and options): nothing to do"
    devices = _device_list(summary.devices)
    notes = [
        f"{len(summary.skipped)} skipped" if summary.skipped else "",
        f"{summary.truncated} truncated" if summary.truncated else "",
        f"{summary.windowed} embedded whole in windows" if summary.windowed else "",
        f"{summary.deduplicated} duplicate sequences computed once" if summary.deduplicated else "",
        f"{summary.resumed:,} resumed from an earlier run" if summary.resumed else "",
        f"{summary.recomputed} changed chunk(s) recomputed" if summary.recomputed else "",
    ]
    note = "".join(f", {n}" for n in notes if n)
    oom = f"; {summary.oom_splits} batch(es) split after CUDA out-of-memory" if summary.oom_splits else ""
    return (
        f"embedded {summary.sequences:,} sequences{note} -> {target} "
        f"in {summary.seconds:.1f} s ({summary.residues_per_s:,.0f} residues/s) on {devices}{oom}"
    )


@cli.command()
@click.argument("fasta", envvar="ESM2CLI_INPUT")
@click.option(
    "-o",
    "--output",
    required=True,
    envvar="ESM2CLI_OUTPUT",
    help="Parquet file to write, or HDF5 for a name ending in .h5 (a path or an fsspec URL such as "
    "s3://bucket/out.parquet); with --shard-count, the directory or prefix of the parts.",
)
@model_options
@embedding_options
@long_sequence_options
@click.option(
    "--per-token",
    is_flag=True,
    envvar="ESM2CLI_PER_TOKEN",
    help="Also write per-residue embeddings (large: residues x hidden floats per sequence).",
)
@click.option(
    "--contacts",
    is_flag=True,
    envvar="ESM2CLI_CONTACTS",
    help="Also write contact probabilities from the contact head (large: residues x residues floats per sequence).",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=DEFAULT_BATCH_SIZE,
    show_default=True,
    envvar="ESM2CLI_BATCH_SIZE",
    help="Sequences per batch at most.",
)
@max_tokens_option
@click.option(
    "--skip-invalid",
    is_flag=True,
    envvar="ESM2CLI_SKIP_INVALID",
    help="Embed the valid records and report the invalid ones instead of stopping.",
)
@click.option(
    "--allow-duplicate-ids",
    is_flag=True,
    envvar="ESM2CLI_ALLOW_DUPLICATE_IDS",
    help="Accept records that share an id (each still gets its own row).",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace an output made by another run; the old file stays until the new one is complete.",
)
@click.option(
    "--shard-index",
    type=click.IntRange(min=0),
    default=None,
    envvar=["ESM2CLI_SHARD_INDEX", "JOB_COMPLETION_INDEX"],
    help="This process's shard (0-based); read from $JOB_COMPLETION_INDEX in an Indexed Job.",
)
@click.option(
    "--shard-count",
    type=click.IntRange(min=1),
    default=None,
    envvar="ESM2CLI_SHARD_COUNT",
    help="Split the input into this many contiguous shards; OUTPUT is then a directory or prefix.",
)
@click.option(
    "--format",
    "output_format",
    type=click.Choice(["auto", "parquet", "h5"]),
    default="auto",
    show_default=True,
    envvar="ESM2CLI_FORMAT",
    help="auto: HDF5 when OUTPUT ends in .h5 or .hdf5 (needs esm2cli[h5]), else Parquet; the parts' format "
    "with --shard-count (auto: Parquet).",
)
@click.option(
    "--chunk-size",
    type=click.IntRange(min=1),
    default=DEFAULT_CHUNK_SIZE,
    show_default=True,
    envvar="ESM2CLI_CHUNK_SIZE",
    help="Records sorted and committed together at most. A chunk is also committed after about "
    f"{DEFAULT_COMMIT_SECONDS:.0f} s of compute (and 128 MB of embeddings): what an interruption loses.",
)
@click.option(
    "--s3-endpoint-url",
    envvar="ESM2CLI_S3_ENDPOINT_URL",
    help="S3-compatible endpoint (MinIO, Ceph) for s3:// URLs; credentials from the AWS variables.",
)
@log_options
def embed(
    fasta,
    output,
    model,
    load_format,
    dtype,
    devices,
    layers,
    pooling,
    truncate,
    long_sequences,
    window_overlap,
    per_token,
    contacts,
    batch_size,
    max_tokens,
    skip_invalid,
    allow_duplicate_ids,
    overwrite,
    shard_index,
    shard_count,
    output_format,
    chunk_size,
    s3_endpoint_url,
    verbose,
    quiet,
):
    """Embed every protein of a FASTA file (plain, .gz, - for stdin, or s3://...) into Parquet.

    One row per protein: id, description, length, truncated, and the pooled embedding of each
    requested layer (float32). Batches run on one model replica per device.

    Runs are resumable: finished chunks of --chunk-size records are kept, and rerunning the same
    command after an interruption computes only what is missing. With --shard-count N, this
    process embeds shard --shard-index (or $JOB_COMPLETION_INDEX) into OUTPUT/part-<i>-of-<N>.parquet.

    \b
    Examples:
      esm2cli embed proteins.fasta -o out.parquet
      esm2cli embed proteins.fa.gz -o out.parquet -m esm2_t12_35M --layers 6,-1
      zcat big.fa.gz | esm2cli embed - -o out.parquet --devices cuda:0,cuda:1
      esm2cli embed demo.fasta -o demo.parquet -m esm2_t6_8M --load-format dummy --devices sim:4
      esm2cli embed s3://bucket/uniref50.fa.gz -o s3://bucket/emb/ --shard-count 100 --shard-index 7
    """
    # From the first statement: a signal while the heavy imports run exits as cleanly as one mid-run.
    with _interruptible():
        _setup_logging(verbose, quiet)
        from esm2cli.hdf5 import is_hdf5
        from esm2cli.pipeline import embed_fasta

        _use_s3_endpoint(s3_endpoint_url)
        shard = None
        if shard_count is not None:
            if shard_index is None:
                raise click.BadParameter("needs --shard-index or $JOB_COMPLETION_INDEX", param_hint="--shard-count")
            if shard_index >= shard_count:
                raise click.BadParameter(
                    f"{shard_index} is not below --shard-count {shard_count}", param_hint="--shard-index"
                )
            suffix = ".h5" if output_format == "h5" else ".parquet"
            shard = ShardConfig(index=shard_index, count=shard_count, suffix=suffix)
        elif output_format != "auto" and (output_format == "h5") != is_hdf5(output):
            raise click.BadParameter(f"{output} is not a .{output_format} file name", param_hint="--format")
        configs = dict(
            model=ModelConfig(model=model, load_format=load_format, dtype=dtype, devices=devices),
            embed=EmbedConfig(
                layers=layers,
                pooling=pooling,
                per_token=per_token,
                truncate=truncate,
                long_sequences=long_sequences,
                window_overlap=window_overlap,
                contacts=contacts,
            ),  # fmt: skip
            batch=BatchConfig(batch_size=batch_size, max_tokens=max_tokens, chunk_size=chunk_size),
            inputs=InputConfig(skip_invalid=skip_invalid, allow_duplicate_ids=allow_duplicate_ids),
            shard=shard,
        )
        for name, value in configs.items():
            log.debug("%s: %s", name, value)
        try:
            summary = embed_fasta(
                fasta, output, overwrite=overwrite, progress_factory=_progress_factory(quiet), **configs
            )
        except Esm2Error as exc:
            raise _to_click(exc) from exc
        if not quiet:
            click.echo(_summary_line(summary, output, shard), err=True)


@contextmanager
def _interruptible(message: str = "interrupted: rerun the same command to resume"):
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


@cli.command()
@model_options
@embedding_options
@long_sequence_options
@click.option("--host", default="127.0.0.1", show_default=True, envvar="ESM2CLI_HOST", help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, envvar="ESM2CLI_PORT")
@click.option(
    "--batching/--no-batching",
    default=ServeConfig.batching,
    show_default=True,
    envvar="ESM2CLI_BATCHING",
    help="Coalesce concurrent requests into engine batches (dynamic batching).",
)
@click.option(
    "--max-batch-size",
    type=click.IntRange(min=1),
    default=ServeConfig.max_batch_size,
    show_default=True,
    envvar="ESM2CLI_MAX_BATCH_SIZE",
    help="Sequences per engine batch at most.",
)
@click.option(
    "--max-wait-ms",
    type=click.FloatRange(min=0),
    default=ServeConfig.max_wait_ms,
    show_default=True,
    envvar="ESM2CLI_MAX_WAIT_MS",
    help="How long a request waits for others to share its batch.",
)
@max_tokens_option
@click.option(
    "--max-client-batch",
    type=click.IntRange(min=1),
    default=ServeConfig.max_client_batch,
    show_default=True,
    envvar="ESM2CLI_MAX_CLIENT_BATCH",
    help="Sequences per /predict/batch request at most.",
)
@click.option(
    "--max-queue",
    type=click.IntRange(min=1),
    default=ServeConfig.max_queue,
    show_default=True,
    envvar="ESM2CLI_MAX_QUEUE",
    help="Sequences waiting at most; past it, 429 with Retry-After.",
)
@click.option(
    "--request-timeout",
    type=click.FloatRange(min=0.001),
    default=ServeConfig.request_timeout_s,
    show_default=True,
    envvar="ESM2CLI_REQUEST_TIMEOUT",
    help="Seconds before an unanswered request gets 503.",
)
@click.option(
    "--max-body-bytes",
    type=click.IntRange(min=1024),
    default=ServeConfig.max_body_bytes,
    show_default=True,
    envvar="ESM2CLI_MAX_BODY_BYTES",
    help="Larger request bodies get 422.",
)
@click.option(
    "--truncation/--no-truncation",
    default=ServeConfig.truncation,
    show_default=True,
    envvar="ESM2CLI_TRUNCATION",
    help="Truncate sequences over --truncate residues (else answer 422).",
)
@click.option(
    "--graceful-timeout",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    envvar="ESM2CLI_GRACEFUL_TIMEOUT",
    help="On SIGTERM, seconds that requests in flight may take.",
)
@serve_security_options
@log_options
def serve(
    model,
    load_format,
    dtype,
    devices,
    layers,
    pooling,
    truncate,
    long_sequences,
    window_overlap,
    host,
    port,
    batching,
    max_batch_size,
    max_wait_ms,
    max_tokens,
    max_client_batch,
    max_queue,
    request_timeout,
    max_body_bytes,
    truncation,
    graceful_timeout,
    api_keys,
    api_key_file,
    public_metrics,
    public_docs,
    header_timeout,
    body_timeout,
    max_connections,
    verbose,
    quiet,
):
    """Serve embeddings over HTTP: GET /health, GET /live, POST /predict, POST /predict/batch,
    POST /v1/embeddings (OpenAI-compatible), GET /v1/models, GET /metrics.

    The port opens at once; /health answers 503 until every replica is loaded and warm.
    SIGTERM stops accepting, finishes the requests in flight and exits 0. With API keys, every
    route but /health and /live needs 'Authorization: Bearer KEY'.

    \b
    Examples:
      esm2cli serve -m esm2_t33_650M --port 8000 --api-key-file /etc/esm2cli/api-keys
      esm2cli serve -m esm2_t6_8M --load-format dummy --devices sim:2
      curl -s localhost:8000/predict -H "authorization: Bearer $KEY" -H 'content-type: application/json' \\
           -d '{"sequence": "MKTAYIAK"}'
    """
    import signal

    import uvicorn

    from esm2cli.auth import checked_keys, read_key_file
    from esm2cli.connections import fit_open_files, uvicorn_config
    from esm2cli.server import create_app

    _setup_logging(verbose, quiet)
    logging.getLogger("uvicorn").setLevel(logging.WARNING if quiet else logging.INFO)
    try:
        keys = checked_keys([*api_keys, *(read_key_file(api_key_file) if api_key_file else [])])
    except ConfigError as exc:
        raise _to_click(exc) from exc
    serve_cfg = ServeConfig(
        batching=batching,
        max_batch_size=max_batch_size,
        max_wait_ms=max_wait_ms,
        max_tokens=max_tokens,
        max_client_batch=max_client_batch,
        max_queue=max_queue,
        request_timeout_s=request_timeout,
        max_body_bytes=max_body_bytes,
        truncation=truncation,
        api_keys=keys,
        public_metrics=public_metrics,
        public_docs=public_docs,
        header_timeout_s=header_timeout,
        body_timeout_s=body_timeout,
        max_connections=fit_open_files(max_connections),
    )
    model_cfg = ModelConfig(model=model, load_format=load_format, dtype=dtype, devices=devices)
    embed_cfg = EmbedConfig(
        layers=layers, pooling=pooling, truncate=truncate, long_sequences=long_sequences, window_overlap=window_overlap
    )
    if long_sequences == "window":
        from esm2cli.windows import check_overlap

        try:
            check_overlap(truncate, window_overlap)
        except ConfigError as exc:
            raise _to_click(exc) from exc
    log.info("serve: %s", serve_cfg)
    log.info("model: %s", model_cfg)
    failure: list[Exception] = []

    def on_load_failure(exc: Exception) -> None:
        failure.append(exc)
        server.should_exit = True

    app = create_app(serve_cfg, model_cfg, embed_cfg, on_load_failure=on_load_failure)
    config = uvicorn_config(app, serve_cfg, host=host, port=port, timeout_graceful_shutdown=graceful_timeout)
    server = uvicorn.Server(config)
    # uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown; with the default handlers that
    # kills the process. Handlers of ours turn a completed drain into a normal exit 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()
    if failure:
        raise _to_click(failure[0]) if isinstance(failure[0], Esm2Error) else click.ClickException(str(failure[0]))


def _score_summary_line(summary, output) -> str:
    what = {
        "pll": f"{summary.proteins:,} proteins (pseudo-log-likelihood)",
        "mutations": f"{summary.rows:,} mutants of {summary.proteins:,} proteins",
        "all-substitutions": f"{summary.rows:,} substitutions of {summary.proteins:,} proteins",
    }[summary.mode]
    notes = [
        f"{len(summary.skipped_records)} invalid records skipped" if summary.skipped_records else "",
        f"{summary.skipped_rows:,} mutants skipped" if summary.skipped_rows else "",
        f"{summary.windowed} longer than the window" if summary.windowed else "",
    ]
    note = "".join(f", {n}" for n in notes if n)
    oom = f"; {summary.oom_splits} batch(es) split after CUDA out-of-memory" if summary.oom_splits else ""
    rate = summary.inputs / summary.seconds if summary.seconds > 0 else 0.0
    return (
        f"scored {what}{note} -> {output}: {summary.inputs:,} distinct inputs for {summary.positions:,} positions "
        f"in {summary.seconds:.1f} s ({rate:,.1f} inputs/s) on {_device_list(summary.devices)}{oom}"
    )


@cli.command()
@click.argument("fasta")
@click.option("-o", "--output", required=True, help="Parquet file to write (a path or an fsspec URL).")
@click.option("--pll", is_flag=True, help="Pseudo-log-likelihood and pseudo-perplexity of each protein.")
@click.option(
    "--mutations",
    metavar="CSV",
    help="Score the mutants of this CSV (columns id,mutant; A24G, or several joined by ':'; 1-based).",
)
@click.option(
    "--all-substitutions",
    is_flag=True,
    help="Score every single substitution of every protein (a deep mutational scan).",
)
@click.option(
    "--method",
    type=click.Choice(["masked-marginal", "wt-marginal"]),
    default=None,
    help="Mutant scores from the wild type with the position masked, or unmasked.  [default: masked-marginal]",
)
@model_options
@click.option(
    "--truncate",
    type=click.IntRange(min=1),
    default=DEFAULT_TRUNCATE,
    show_default=True,
    envvar="ESM2CLI_TRUNCATE",
    help="Window: residues per forward pass. A position of a longer protein is scored in the window of this "
    "many residues that centres it.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=DEFAULT_BATCH_SIZE,
    show_default=True,
    envvar="ESM2CLI_BATCH_SIZE",
    help="Inputs (masked copies) per batch at most.",
)
@max_tokens_option
@click.option("--skip-invalid", is_flag=True, help="Score the valid records and mutants; report the others.")
@click.option("--overwrite", is_flag=True, help="Replace the output file if it exists (once the new one is complete).")
@click.option("--s3-endpoint-url", envvar="ESM2CLI_S3_ENDPOINT_URL", help="S3-compatible endpoint for s3:// URLs.")
@log_options
def score(
    fasta,
    output,
    pll,
    mutations,
    all_substitutions,
    method,
    model,
    load_format,
    dtype,
    devices,
    truncate,
    batch_size,
    max_tokens,
    skip_invalid,
    overwrite,
    s3_endpoint_url,
    verbose,
    quiet,
):
    """Score proteins with ESM-2's masked-LM head: pseudo-log-likelihoods or mutant effects, into Parquet.

    --pll writes id, length, pll (natural log: the sum over residues of log p(x_i | x with i masked)),
    pseudo_perplexity (exp(-pll / length)) and windowed. --mutations and --all-substitutions write
    id, mutant, score: the sum over the mutant's substitutions of log p(mutant) - log p(wild type), from
    the wild type with that position masked (masked-marginal) or unmasked (wt-marginal).

    Every distinct masked input is computed once and batched under the token budget on every replica.

    \b
    Examples:
      esm2cli score designs.fasta --pll -o pll.parquet
      esm2cli score wt.fasta --mutations muts.csv -o scores.parquet
      esm2cli score wt.fasta --all-substitutions --method wt-marginal -o dms.parquet
    """
    _setup_logging(verbose, quiet)
    from esm2cli.config import ScoreConfig
    from esm2cli.scoring import score_fasta

    _use_s3_endpoint(s3_endpoint_url)
    modes = [
        name
        for name, on in [("--pll", pll), ("--mutations", mutations), ("--all-substitutions", all_substitutions)]
        if on
    ]
    if len(modes) != 1:
        raise click.UsageError("give exactly one of --pll, --mutations CSV, --all-substitutions")
    if pll and method:
        raise click.BadParameter("a pseudo-log-likelihood always masks; --method is for mutants", param_hint="--method")
    mode = {"--pll": "pll", "--mutations": "mutations", "--all-substitutions": "all-substitutions"}[modes[0]]
    cfg = ScoreConfig(
        mode=mode, method=method or "masked-marginal", mutations=mutations, window=truncate, skip_invalid=skip_invalid
    )
    model_cfg = ModelConfig(model=model, load_format=load_format, dtype=dtype, devices=devices)
    log.debug("score: %s; model: %s", cfg, model_cfg)
    with _interruptible("interrupted: the output was not written (an earlier one is left as it was)"):
        try:
            summary = score_fasta(
                fasta,
                output,
                model=model_cfg,
                score=cfg,
                batch=BatchConfig(batch_size=batch_size, max_tokens=max_tokens),
                overwrite=overwrite,
                progress_factory=_progress_factory(quiet, unit="pos"),
            )
        except Esm2Error as exc:  # the message names the file, row or record
            raise _to_click(exc) from exc
    if not quiet:
        click.echo(_score_summary_line(summary, output), err=True)


@cli.command()
@click.option(
    "--gpus",
    type=click.IntRange(1, MAX_BENCH_DEVICES),
    default=None,
    help="Devices to scale to (1, 2, 4, ... N): real CUDA devices when there are that many, else simulated on "
    "the CPU. [default: every CUDA device, or 1; 8 with --simulate]",
)
@click.option(
    "--simulate",
    type=click.Choice(list(GPU_PEAKS), case_sensitive=False),
    default=None,
    help="Model GPUs of this card instead of running the model: each batch takes the card's time (FLOPs over "
    "its published peak x --mfu, + --overhead-ms) while the real embed pipeline writes real Parquet; "
    "reports the host efficiency.",
)
@click.option(
    "--mfu",
    type=click.FloatRange(0, 1, min_open=True),
    default=ModeledGPU.mfu,
    show_default=True,
    help="With --simulate: the share of the card's peak its batches reach.",
)
@click.option(
    "--overhead-ms",
    type=click.FloatRange(min=0),
    default=ModeledGPU.overhead_ms,
    show_default=True,
    help="With --simulate: fixed device time per batch.",
)
@click.option(
    "--launch-ms",
    type=click.FloatRange(min=0),
    default=ModeledGPU.launch_ms,
    show_default=True,
    help="With --simulate: host time per batch that holds the GIL (the Python side of an eager forward).",
)
@click.option(
    "--duration",
    type=click.FloatRange(min=1),
    default=DEFAULT_BENCH_SECONDS,
    show_default=True,
    help="Seconds per device count; the workload is sized to it (unless --sequences or --input).",
)
@click.option("-m", "--model", default=DEFAULT_MODEL, show_default=True, help="Model alias, hub id or directory.")
@click.option(
    "--load-format",
    type=click.Choice(["auto", "dummy"]),
    default="dummy",
    show_default=True,
    help="dummy: random weights of the named size (the compute is the same as the real model's).",
)
@click.option(
    "--dtype",
    type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
    default=ModelConfig.dtype,
    show_default=True,
)
@click.option(
    "--input",
    "input_fasta",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A FASTA file to time instead of the synthetic workload.",
)
@click.option(
    "--sequences",
    type=click.IntRange(min=1),
    default=None,
    help="A fixed workload of this many synthetic proteins (UniProt-like lengths), run once per device count, "
    "instead of the time box.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--max-length",
    type=click.IntRange(min=1),
    default=DEFAULT_TRUNCATE,
    show_default=True,
    help="Sequences are truncated to this many residues.",
)
@click.option(
    "--max-tokens",
    type=click.IntRange(min=64),
    default=None,
    help="Padded tokens per batch. [default: as esm2cli embed]",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=DEFAULT_BATCH_SIZE, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout (one row per device count).")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), help="Write a PNG of the scaling.")
@log_options
@click.pass_context
def bench(
    ctx,
    gpus,
    simulate,
    mfu,
    overhead_ms,
    launch_ms,
    duration,
    model,
    load_format,
    dtype,
    input_fasta,
    sequences,
    seed,
    max_length,
    max_tokens,
    batch_size,
    as_json,
    plot,
    verbose,
    quiet,
):
    """Measure throughput and scaling over 1, 2, 4 ... N devices: sequences/s, residues/s, speedup, efficiency.

    Each device count runs for --duration seconds (sized to the devices at hand), so that the
    whole bench answers in about a minute. Without GPUs, --gpus N simulates N devices sharing the
    CPU; --simulate CARD models N GPUs of that card instead, around the real embed pipeline, and
    reports whether this host keeps them busy.

    \b
    Examples:
      esm2cli bench                                  # 650M architecture, every GPU (or the CPU)
      esm2cli bench --gpus 8                         # 8 simulated devices on a machine without GPUs
      esm2cli bench --gpus 8 --simulate a100         # can this host feed 8 A100s? (a model, not a GPU)
      esm2cli bench --simulate h100 --mfu 0.3 --json
      esm2cli bench --input proteins.fasta --plot scaling.png
    """
    import json

    _setup_logging(verbose, quiet)
    given = {
        name for name in ("mfu", "overhead_ms", "launch_ms")
        if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE
    }  # fmt: skip
    if given and not simulate:
        raise click.UsageError(f"--{sorted(given)[0].replace('_', '-')} applies to modeled GPUs: add --simulate CARD")
    if input_fasta and sequences:
        raise click.UsageError("--input and --sequences both choose the workload: give one")
    if plot:
        from esm2cli.bench import check_plot_path

        if problem := check_plot_path(plot):
            raise click.BadParameter(f"cannot write {plot}: {problem}", param_hint="--plot")

    def say(line: str) -> None:
        if not quiet:
            click.echo(line, err=True)

    batch = BatchConfig(max_tokens=max_tokens, batch_size=batch_size)
    try:
        report = (
            _bench_modeled(gpus, simulate, mfu, overhead_ms, launch_ms, duration, model, load_format, dtype,
                           input_fasta, sequences, seed, max_length, batch, say)
            if simulate
            else _bench_devices(ctx, gpus, duration, model, load_format, dtype, input_fasta, sequences, seed,
                                max_length, batch, say)
        )  # fmt: skip
    except Esm2Error as exc:
        raise _to_click(exc) from exc
    except KeyboardInterrupt:
        click.echo("interrupted before the first device count finished: no result", err=True)
        sys.exit(130)
    from esm2cli.bench import format_report

    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else format_report(report))
    if plot:
        from esm2cli.bench import plot_report

        plot_report(report, str(plot))
        say(f"plot: {plot}")
    if report.interrupted:
        click.echo(f"interrupted: the table holds the {len(report.rows)} device count(s) finished before", err=True)
        sys.exit(130)


def _bench_modeled(gpus, card, mfu, overhead_ms, launch_ms, duration, model, load_format, dtype, input_fasta,
                   sequences, seed, max_length, batch, say):  # fmt: skip
    from esm2cli.bench import run_modeled_bench

    gpus = gpus or 8
    modeled = ModeledGPU(card=card.lower(), count=gpus, mfu=mfu, overhead_ms=overhead_ms, launch_ms=launch_ms)
    config = ModelConfig(model=model, load_format=load_format, dtype=dtype, simulate=modeled)
    return run_modeled_bench(
        config, gpus, batch=batch, duration=duration, input_fasta=str(input_fasta) if input_fasta else None,
        sequences=sequences, seed=seed, max_length=max_length, say=say,
    )  # fmt: skip


def _bench_devices(ctx, gpus, duration, model, load_format, dtype, input_fasta, sequences, seed, max_length, batch,
                   say):  # fmt: skip
    from esm2cli.bench import run_bench
    from esm2cli.devices import cuda_device_count

    n_cuda = cuda_device_count()
    gpus = gpus or max(n_cuda, 1)
    on_cuda = gpus <= n_cuda
    if input_fasta:
        from esm2cli.fasta import read_records

        try:
            seqs = [r.sequence[:max_length] for r in read_records(input_fasta) if r.problem is None]
        except Esm2Error as exc:
            raise _to_click(exc) from exc
        if not seqs:
            raise click.BadParameter("no valid sequences", param_hint="--input")
    else:
        from esm2cli.workload import synthetic_sequences

        # Cycled inside the time box: enough distinct proteins for a representative mix of lengths.
        count = sequences or (1024 * gpus if on_cuda else 256)
        seqs = [s[:max_length] for _, s in synthetic_sequences(count, seed=seed)]
    if not on_cuda:
        say(f"{gpus} simulated device(s) sharing the CPU (this machine has {n_cuda} CUDA device(s))")
    fit = not input_fasta and not sequences and batch.max_tokens is None
    fit = fit and ctx.get_parameter_source("max_length") != click.core.ParameterSource.COMMANDLINE
    return run_bench(
        ModelConfig(model=model, load_format=load_format, dtype=dtype), seqs, gpus, batch=batch,
        duration=None if sequences or input_fasta else duration, fit_to_box=fit, say=say,
    )  # fmt: skip


@cli.command()
@click.argument("model")
@click.option(
    "--to",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Put the model in DIR/<name> (a shared volume) instead of the Hugging Face cache.",
)
@log_options
def download(model, to, verbose, quiet):
    """Download a model's weights once, for machines or runs without internet access.

    MODEL is an alias (esm2_t33_650M) or a hub id. Only the config, the tokenizer and one set of
    weights are fetched. Without --to they go to the Hugging Face cache (HF_HOME), where embed and
    serve find them with no request to the hub; with --to, pass the printed folder to -m.
    The folder is printed on stdout.

    \b
    Examples:
      esm2cli download esm2_t33_650M                         # then: HF_HUB_OFFLINE=1 esm2cli embed ...
      esm2cli download esm2_t36_3B --to /shared/models       # then: -m /shared/models/esm2_t36_3B_UR50D
    """
    from esm2cli import hub
    from esm2cli.model import resolve_source

    _setup_logging(verbose, quiet)
    repo_id = resolve_source(model)
    if not hub.is_repo_id(repo_id):
        raise click.BadParameter(f"{model!r} is not an ESM-2 alias or a hub id (owner/name)", param_hint="MODEL")
    try:
        folder = hub.download(repo_id, to, alias=model)
    except Esm2Error as exc:
        raise _to_click(exc) from exc
    click.echo(str(folder))
    if not quiet:
        click.echo(f"{repo_id} is in {folder}", err=True)


@cli.command()
@click.argument("prefix")
@click.option("-o", "--output", required=True, help="The single Parquet (or .h5) file to write (a path or URL).")
@click.option(
    "--overwrite", is_flag=True, help="Replace the output if it exists; the old file stays until the new one is done."
)
@click.option("--s3-endpoint-url", envvar="ESM2CLI_S3_ENDPOINT_URL", help="S3-compatible endpoint for s3:// URLs.")
@log_options
def merge(prefix, output, overwrite, s3_endpoint_url, verbose, quiet):
    """Merge the parts of a sharded run (PREFIX/part-<i>-of-<n>.parquet) into one file, in input order.

    The parts already read as one dataset (pyarrow.dataset, duckdb and polars over PREFIX);
    merge is for tools that want a single file.

    \b
    Example:
      esm2cli merge s3://bucket/emb/ -o s3://bucket/emb.parquet
    """

    from esm2cli.writer import merge_parts

    _setup_logging(verbose, quiet)
    _use_s3_endpoint(s3_endpoint_url)
    try:
        rows = merge_parts(prefix, output, overwrite)  # checks the parts and the output; replaces atomically
    except Esm2Error as exc:
        raise _to_click(exc) from exc
    if not quiet:
        done = f"merged {rows:,} rows -> {output}" if rows is not None else f"{output} is already complete"
        click.echo(done, err=True)
