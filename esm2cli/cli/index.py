"""esm2cli index: esm2cli outputs into a search database (exact or approximate), shard by shard."""

from __future__ import annotations

import sys

import click

from esm2cli.cli.console import interruptible, one_line_errors, setup_logging, use_s3_endpoint
from esm2cli.cli.options import log_options, overwrite_option, resolve_shard, s3_endpoint_option, shard_options
from esm2cli.config import AUTO_FLAT_MAX_VECTORS, DEFAULT_DECOYS, INDEX_KINDS, IndexConfig, ShardConfig


def _progress(quiet: bool):
    def factory(total: int):
        from tqdm import tqdm

        bar = tqdm(total=total, unit="vec", unit_scale=True, file=sys.stderr, disable=True if quiet else None,
                   dynamic_ncols=True)  # fmt: skip

        def update(rows: int) -> None:
            bar.update(rows)
            if bar.n >= total:
                bar.close()

        return update

    return factory


def _summary_line(summary) -> str:
    where = f"{summary.db}/{summary.part}"
    if summary.already_complete:
        return f"{where} is already complete (same inputs and options): nothing to do"
    if summary.part.endswith(".faiss"):
        return f"trained the IVF-PQ quantizer on {summary.rows:,} vectors' sample -> {where} in {summary.seconds:.1f} s"
    search = ", ".join(f"{key} {value}" for key, value in summary.search.items())
    null = f"; E-values: {summary.null}" if summary.null else "; no E-values (--decoys 0 or no null model)"
    return (f"indexed {summary.rows:,} vectors ({summary.kind}{', ' + search if search else ''}) -> {where} in "
            f"{summary.seconds:.1f} s{null}")  # fmt: skip


@click.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--output", required=True, envvar="ESM2CLI_OUTPUT",
              help="The database folder to write (local: its vectors are memory-mapped).")  # fmt: skip
@click.option(
    "--kind",
    type=click.Choice(INDEX_KINDS),
    default="auto",
    show_default=True,
    envvar="ESM2CLI_INDEX_KIND",
    help=f"flat: exact, every vector compared; ivf-pq: FAISS IVF-PQ, candidates re-ranked exactly; hnsw: FAISS HNSW, "
    f"likewise; auto: flat below {AUTO_FLAT_MAX_VECTORS:,} vectors, ivf-pq above.",
)
@click.option("--layer", type=int, default=None, help="The layer to index from outputs of several layers.")
@click.option(
    "--decoys",
    type=click.IntRange(min=0),
    default=DEFAULT_DECOYS,
    show_default=True,
    envvar="ESM2CLI_DECOYS",
    help="Decoy queries (shuffled database sequences) the E-values' null model is fitted on, per shard; "
    "0: no E-values. They are embedded with the inputs' model, so it must be loadable here.",
)
@click.option("--fasta", default=None, help="The FASTA the inputs were embedded from, for the decoys "
              "(default: the one named in the inputs' metadata, when it is readable).")  # fmt: skip
@click.option("--seed", type=int, default=IndexConfig.seed, show_default=True,
              help="Seeds the training sample, the k-means and the decoys.")  # fmt: skip
@click.option("--devices", default=IndexConfig.devices, show_default=True, envvar="ESM2CLI_DEVICES",
              help="Where the decoys are embedded (as embed's --devices).")  # fmt: skip
@click.option("--train-only", is_flag=True, help="Only train the IVF-PQ quantizer the shards share "
              "(DB/trained.faiss): run once before the shard tasks of an ivf-pq database.")  # fmt: skip
@shard_options("each task indexes a contiguous slice of the inputs' rows into DB/shard-<i>-of-<n>/")
@overwrite_option("Replace a database of another build; the old shards stay until the new one is complete.")
@s3_endpoint_option("S3-compatible endpoint for s3:// inputs.")
@log_options
def index(inputs, output, kind, layer, decoys, fasta, seed, devices, train_only, shard_index, shard_count,
          overwrite, s3_endpoint_url, verbose, quiet):  # fmt: skip
    """Build a search database from esm2cli outputs (Parquet or HDF5 files, part folders, s3:// prefixes).

    The inputs must hold vectors of one identity (model and weights, layer, pooling, truncation or windows,
    dtype); the database records it and refuses queries of another. Vectors are read in bounded memory, the
    database is written atomically under a lock, and a rerun of a finished build does nothing. With
    --shard-count N each task (--shard-index, $JOB_COMPLETION_INDEX, a Slurm array task) builds one shard;
    an ivf-pq database first needs its quantizer trained once with --train-only.

    \b
    Examples:
      esm2cli index emb.parquet -o db
      esm2cli index s3://bucket/emb/ -o db --kind ivf-pq --train-only
      esm2cli index s3://bucket/emb/ -o db --kind ivf-pq --shard-count 8 --shard-index 3
      esm2cli index emb.parquet -o db --decoys 0          # no E-values
    """
    with interruptible():
        setup_logging(verbose, quiet)
        from esm2cli.io.storage import write_errors
        from esm2cli.search.build import build_index

        use_s3_endpoint(s3_endpoint_url)
        sharded = resolve_shard(click.get_current_context(), shard_index, shard_count)
        shard = ShardConfig(index=sharded[0], count=sharded[1]) if sharded else None
        config = IndexConfig(kind=kind, layer=layer, decoys=decoys, fasta=fasta, seed=seed, devices=devices,
                             train_only=train_only)  # fmt: skip
        with one_line_errors(), write_errors(output):
            summary = build_index(inputs, output, config, shard=shard, overwrite=overwrite, progress=_progress(quiet))
        if not quiet:
            click.echo(_summary_line(summary), err=True)
