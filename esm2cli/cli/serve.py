"""esm2cli serve: the engine behind HTTP."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import click

from esm2cli.cli.console import log, model_truncate, setup_logging, to_click
from esm2cli.cli.options import (
    embedding_options,
    log_options,
    long_sequence_options,
    max_tokens_option,
    model_options,
    serve_security_options,
)
from esm2cli.config import (
    DEFAULT_GRACEFUL_TIMEOUT,
    EmbedConfig,
    ModelConfig,
    ServeConfig,
    describe,
)
from esm2cli.errors import ConfigError, Esm2Error


@click.command()
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
    default=DEFAULT_GRACEFUL_TIMEOUT,
    show_default=True,
    envvar="ESM2CLI_GRACEFUL_TIMEOUT",
    help="On SIGTERM, seconds that requests in flight may take.",
)
@click.option(
    "--cache-size",
    type=click.IntRange(min=0),
    default=ServeConfig.cache_size,
    show_default=True,
    envvar="ESM2CLI_CACHE_SIZE",
    help="Recent distinct sequences whose embeddings are kept and answered again without the model, per API key "
    "(one key is never answered from another's entries, nor sees its cache counts); 0: off.",
)
@click.option(
    "--index",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    envvar="ESM2CLI_INDEX",
    help="A database of esm2cli index that POST /search answers from; its vectors must be of the server's model "
    "and options (checked at startup: exit 2 naming what differs).",
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
    cache_size,
    index,
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
    POST /v1/embeddings (OpenAI-compatible), GET /v1/models, POST /search (with --index), GET /metrics.

    The port opens at once; /health answers 503 until every replica is loaded and warm.
    SIGTERM stops accepting, finishes the requests in flight and exits 0. With API keys, every
    route but /health and /live needs 'Authorization: Bearer KEY'.

    \b
    Examples:
      esm2cli serve -m esm2_t33_650M --port 8000 --api-key-file /etc/esm2cli/api-keys
      esm2cli serve -m esm2_t6_8M --load-format dummy --devices sim:2
      esm2cli serve -m esm2_t33_650M --index db   # the model and options the database was built with
      curl -s localhost:8000/predict -H "authorization: Bearer $KEY" -H 'content-type: application/json' \\
           -d '{"sequence": "MKTAYIAK"}'
    """
    import signal

    import uvicorn

    from esm2cli.serve.app import create_app
    from esm2cli.serve.auth import checked_keys, read_key_file, refuse_empty_key_variables
    from esm2cli.serve.connections import fit_open_files, uvicorn_config

    setup_logging(verbose, quiet)
    logging.getLogger("uvicorn").setLevel(logging.WARNING if quiet else logging.INFO)
    try:
        if not api_keys and not api_key_file:  # keys asked for through the environment, and none came
            refuse_empty_key_variables(os.environ)
        keys = checked_keys([*api_keys, *(read_key_file(api_key_file) if api_key_file else [])])
    except ConfigError as exc:
        raise to_click(exc) from exc
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
        cache_size=cache_size,
    )
    model_cfg = ModelConfig(model=model, load_format=load_format, dtype=dtype, devices=devices)
    truncate = model_truncate(model, truncate, long_sequences=long_sequences)
    embed_cfg = EmbedConfig(
        layers=layers, pooling=pooling, truncate=truncate, long_sequences=long_sequences, window_overlap=window_overlap
    )
    if long_sequences == "window":
        from esm2cli.runtime.windows import check_overlap, overlap_warning

        try:
            check_overlap(truncate, window_overlap)
        except ConfigError as exc:
            raise to_click(exc) from exc
        if warning := overlap_warning(truncate, window_overlap):
            log.warning("%s", warning)
    log.info("serve: %s", describe(serve_cfg))
    log.info("model: %s", describe(model_cfg))
    if index is not None:
        _check_database(index)
    failure: list[Exception] = []

    def on_load_failure(exc: Exception) -> None:
        failure.append(exc)
        server.should_exit = True

    # The service's default loader builds the engine for the server's batches (build_server_engine).
    app = create_app(serve_cfg, model_cfg, embed_cfg, on_load_failure=on_load_failure, index=index)
    config = uvicorn_config(app, serve_cfg, host=host, port=port, timeout_graceful_shutdown=graceful_timeout)
    server = uvicorn.Server(config)
    # uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown; with the default handlers that
    # kills the process. Handlers of ours turn a completed drain into a normal exit 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()
    if failure and isinstance(failure[0], Esm2Error):
        raise to_click(failure[0]) from failure[0]
    if failure:  # not one of ours: a bug, raised as it is so that its traceback shows (exit 1)
        raise failure[0]


def _check_database(path: Path) -> None:
    """Refuses (exit 2) a folder that holds no complete database before the model loads; its files' digests and its
    identity are checked once the model is loaded (a mismatch stops the server, exit 2)."""
    from esm2cli.search import manifest

    try:
        manifest.load_manifest(str(path), verify=False)
    except Esm2Error as exc:
        raise to_click(exc) from exc
    log.info("search database: %s (opened and checked once the model is loaded)", path)
