"""esm2cli embed: a FASTA to Parquet or HDF5, resumable, sharded, on every device."""

from __future__ import annotations

import os

import click

from esm2cli.cli.console import (
    device_list,
    interruptible,
    log,
    model_truncate,
    one_line_errors,
    progress_factory,
    setup_logging,
    use_s3_endpoint,
)
from esm2cli.cli.options import (
    batch_options,
    embedding_options,
    log_options,
    long_sequence_options,
    model_options,
    names_a_file,
    output_dtype_option,
    overwrite_option,
    s3_endpoint_option,
    skip_invalid_option,
    slurm_shard,
)
from esm2cli.config import (
    CHUNK_BYTES,
    DEFAULT_CHUNK_SIZE,
    DEFAULT_COMMIT_SECONDS,
    BatchConfig,
    EmbedConfig,
    InputConfig,
    ModelConfig,
    ShardConfig,
)


def _summary_line(summary, output, shard=None) -> str:
    from esm2cli.io.targets import output_target

    target = output_target(output, shard)
    if summary.already_complete:
        return f"{target} is already complete (same input content, weights and options): nothing to do"
    devices = device_list(summary.devices)
    notes = [
        f"{len(summary.skipped)} skipped" if summary.skipped else "",
        f"{summary.truncated} truncated" if summary.truncated else "",
        f"{summary.windowed} embedded whole in windows" if summary.windowed else "",
        f"{summary.deduplicated:,} duplicate sequences computed once" if summary.deduplicated else "",
        f"{summary.resumed:,} resumed from an earlier run" if summary.resumed else "",
        f"{summary.recomputed} changed chunk(s) recomputed" if summary.recomputed else "",
        _reused_note(summary),
    ]
    note = "".join(f", {n}" for n in notes if n)
    oom = f"; {summary.oom_splits} batch(es) split after CUDA out-of-memory" if summary.oom_splits else ""
    return (
        f"embedded {summary.sequences:,} sequences{note} -> {target} "
        f"in {summary.seconds:.1f} s ({summary.residues_per_s:,.0f} residues/s) "
        f"with {summary.model} in {summary.dtype} on {devices}{oom}"
    )


def _reused_note(summary) -> str:
    """'N reused from a.parquet (n1), b.parquet (n2), M computed', or '' without --reuse rows."""
    if not summary.reused:
        return ""
    files = ", ".join(f"{path} ({n:,})" for path, n in summary.reused_from.items())
    return f"{summary.reused:,} reused from {files}, {summary.sequences:,} computed"


def _index_asked(ctx: click.Context) -> bool:
    """--shard-index or $ESM2CLI_SHARD_INDEX was given; $JOB_COMPLETION_INDEX alone is every Indexed Job's, so
    without --shard-count it is no request to shard."""
    from click.core import ParameterSource

    given = ctx.get_parameter_source("shard_index") is ParameterSource.COMMANDLINE
    return given or "ESM2CLI_SHARD_INDEX" in os.environ


@click.command()
@click.argument("fasta", envvar="ESM2CLI_INPUT")
@click.option(
    "-o",
    "--output",
    required=True,
    envvar="ESM2CLI_OUTPUT",
    help="Parquet file to write (.parquet, .pq or no extension), or HDF5 for a name ending in .h5 or .hdf5 "
    "(a path or an fsspec URL such as s3://bucket/out.parquet); with --shard-count, the directory or prefix "
    "of the parts. Other extensions, and - (stdout), are refused.",
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
@batch_options("Sequences")
@output_dtype_option
@skip_invalid_option(
    "Embed the valid records and report the invalid ones instead of stopping.", envvar="ESM2CLI_SKIP_INVALID"
)
@click.option(
    "--allow-duplicate-ids",
    is_flag=True,
    envvar="ESM2CLI_ALLOW_DUPLICATE_IDS",
    help="Accept records that share an id (each still gets its own row).",
)
@overwrite_option("Replace an output made by another run; the old file stays until the new one is complete.")
@click.option(
    "--shard-index",
    type=click.IntRange(min=0),
    default=None,
    envvar=["ESM2CLI_SHARD_INDEX", "JOB_COMPLETION_INDEX"],
    help="This process's shard (0-based); read from $JOB_COMPLETION_INDEX in an Indexed Job, and from "
    "$SLURM_ARRAY_TASK_ID - $SLURM_ARRAY_TASK_MIN (of $SLURM_ARRAY_TASK_COUNT) in a Slurm job array.",
)
@click.option(
    "--shard-count",
    type=click.IntRange(min=1),
    default=None,
    envvar="ESM2CLI_SHARD_COUNT",
    help="Split the input into this many shards by byte range (plain or BGZF FASTA; a plain gzip is read whole by "
    "each shard); OUTPUT is then a directory or prefix.",
)
@click.option(
    "--format",
    "output_format",
    type=click.Choice(["auto", "parquet", "h5"]),
    default="auto",
    show_default=True,
    envvar="ESM2CLI_FORMAT",
    help="auto: HDF5 when OUTPUT ends in .h5 or .hdf5 (needs h5py), else Parquet; the parts' format "
    "with --shard-count (auto: Parquet).",
)
@click.option(
    "--chunk-size",
    type=click.IntRange(min=1),
    default=DEFAULT_CHUNK_SIZE,
    show_default=True,
    envvar="ESM2CLI_CHUNK_SIZE",
    help="Records sorted and committed together at most. A chunk is also committed after about "
    f"{DEFAULT_COMMIT_SECONDS:.0f} s of compute (and {CHUNK_BYTES >> 20} MB of embeddings): what an interruption "
    "loses.",
)
@click.option(
    "--reuse",
    multiple=True,
    envvar="ESM2CLI_REUSE",
    help="An earlier output (Parquet or HDF5; a path, URL, or directory/prefix of parts; repeatable): its rows "
    "made with the same weights and options are copied for the sequences it holds, the rest computed.",
)
@s3_endpoint_option("S3-compatible endpoint (MinIO, Ceph) for s3:// URLs; credentials from the AWS variables.")
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
    output_dtype,
    skip_invalid,
    allow_duplicate_ids,
    overwrite,
    shard_index,
    shard_count,
    output_format,
    chunk_size,
    reuse,
    s3_endpoint_url,
    verbose,
    quiet,
):
    """Embed every protein of a FASTA file (plain, .gz, - for stdin, or s3://...) into Parquet.

    One row per protein: id, description, length, truncated, and the pooled embedding of each
    requested layer (float32, or float16 with --output-dtype). Batches run on one model replica per device.

    Runs are resumable: finished chunks of --chunk-size records are kept, and rerunning the same
    command after an interruption computes only what is missing. With --shard-count N, this
    process embeds shard --shard-index (or $JOB_COMPLETION_INDEX, or a Slurm array task's index) into
    OUTPUT/part-<i>-of-<N>.parquet; a shard reads only its byte range of a plain or BGZF file.

    \b
    Examples:
      esm2cli embed proteins.fasta -o out.parquet
      esm2cli embed proteins.fa.gz -o out.parquet -m esm2_t12_35M --layers 6,-1
      zcat big.fa.gz | esm2cli embed - -o out.parquet --devices cuda:0,cuda:1
      esm2cli embed demo.fasta -o demo.parquet -m esm2_t6_8M --load-format dummy --devices sim:4
      esm2cli embed s3://bucket/uniref50.fa.gz -o s3://bucket/emb/ --shard-count 100 --shard-index 7
      esm2cli embed release-2.fasta -o release-2.parquet --reuse release-1.parquet
    """
    # From the first statement: a signal while the heavy imports run exits as cleanly as one mid-run.
    with interruptible():
        setup_logging(verbose, quiet)
        from esm2cli.io.hdf5 import is_hdf5
        from esm2cli.io.targets import output_target
        from esm2cli.jobs.pipeline import embed_fasta

        use_s3_endpoint(s3_endpoint_url)
        shard = None
        if shard_index is not None and shard_count is None and _index_asked(click.get_current_context()):
            raise click.BadParameter(
                "needs --shard-count (how many shards split the input)", param_hint="--shard-index"
            )
        if shard_index is None and shard_count is None and "SLURM_ARRAY_TASK_ID" in os.environ and names_a_file(output):
            # One input file per array task is the usual array: a file name is no cue to shard.
            log.info("%s names a file: the Slurm array variables are ignored (add --shard-count to shard)", output)
        elif shard_index is None and (slurm := slurm_shard(os.environ)) is not None:
            shard_index, slurm_count, read = slurm
            shard_count = shard_count or slurm_count
            log.info("shard %d of %d from the Slurm job array (%s)", shard_index, shard_count, read)
        if shard_count is not None:
            if shard_index is None:
                raise click.BadParameter(
                    "needs --shard-index, $JOB_COMPLETION_INDEX or a Slurm array task", param_hint="--shard-count"
                )
            if shard_index >= shard_count:
                raise click.BadParameter(
                    f"{shard_index} is not below --shard-count {shard_count}", param_hint="--shard-index"
                )
            suffix = ".h5" if output_format == "h5" else ".parquet"
            shard = ShardConfig(index=shard_index, count=shard_count, suffix=suffix)
        elif output_format != "auto" and (output_format == "h5") != is_hdf5(target := output_target(output)):
            # the file written decides its format: a link's target, not the link's own name
            raise click.BadParameter(f"{target} is not a .{output_format} file name", param_hint="--format")
        truncate = model_truncate(model, truncate, long_sequences=long_sequences)
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
                output_dtype=output_dtype,
            ),  # fmt: skip
            batch=BatchConfig(batch_size=batch_size, max_tokens=max_tokens, chunk_size=chunk_size),
            inputs=InputConfig(skip_invalid=skip_invalid, allow_duplicate_ids=allow_duplicate_ids),
            shard=shard,
        )
        for name, value in configs.items():
            log.debug("%s: %s", name, value)
        with one_line_errors():
            summary = embed_fasta(
                fasta, output, overwrite=overwrite, progress_factory=progress_factory(quiet), reuse=reuse, **configs
            )
        if not quiet:
            click.echo(_summary_line(summary, output, shard), err=True)
