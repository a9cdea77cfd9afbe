"""esm2cli search: the nearest database vectors of each query (a FASTA or an esm2cli output), with E-values."""

from __future__ import annotations

import sys

import click

from esm2cli.cli.console import interruptible, one_line_errors, setup_logging, use_s3_endpoint
from esm2cli.cli.options import log_options, overwrite_option, s3_endpoint_option
from esm2cli.config import DEFAULT_TOP_K, HIT_FORMATS


def _progress(quiet: bool):
    from tqdm import tqdm

    bar = tqdm(unit="query", file=sys.stderr, disable=True if quiet else None, dynamic_ncols=True)
    return bar, bar.update


@click.command()
@click.argument("query", envvar="ESM2CLI_INPUT")
@click.option("-d", "--db", required=True, envvar="ESM2CLI_DB", help="The database folder (esm2cli index).")
@click.option("-o", "--output", required=True, envvar="ESM2CLI_OUTPUT",
              help="The hits file to write (a path or URL), or - for stdout.")  # fmt: skip
@click.option("-k", "k", type=int, default=DEFAULT_TOP_K, show_default=True, help="Hits per query at most.")
@click.option("--min-score", type=float, default=None, help="Drop hits of a lower cosine.")
@click.option("--max-evalue", type=float, default=None, help="Drop hits of a higher E-value.")
@click.option(
    "--format",
    "output_format",
    type=click.Choice(HIT_FORMATS),
    default="tsv",
    show_default=True,
    help="tsv: query target score evalue rank, with a header; m8: BLAST's 12 tabular columns (cosine as bitscore, "
    "see docs/search.md); parquet: the tsv's columns and both lengths.",
)
@click.option("--nprobe", type=click.IntRange(min=1), default=None,
              help="IVF-PQ: inverted lists visited per query [default: the least measured to reach a recall@10 "
              "of 0.95]")  # fmt: skip
@click.option("-m", "--model", default=None, help="The model to embed a FASTA query with [default: the database's]; "
              "it must give the database's vectors.")  # fmt: skip
@click.option("--load-format", type=click.Choice(["auto", "dummy"]), default=None,
              help="[default: the database's: dummy for random weights]")  # fmt: skip
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="[default: the database's]; another one is refused (it changes the vectors).")  # fmt: skip
@click.option("--devices", default="auto", show_default=True, envvar="ESM2CLI_DEVICES",
              help="Where a FASTA query is embedded (as embed's --devices).")  # fmt: skip
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Check every database file's SHA-256 against its manifest (sizes are checked always).")  # fmt: skip
@overwrite_option("Replace an existing hits file; the old one stays until the new one is complete.")
@s3_endpoint_option("S3-compatible endpoint for s3:// queries and outputs.")
@log_options
def search(query, db, output, k, min_score, max_evalue, output_format, nprobe, model, load_format, dtype, devices,
           verify, overwrite, s3_endpoint_url, verbose, quiet):  # fmt: skip
    """Search a database with the proteins of a FASTA file, or with the vectors of an esm2cli output.

    A FASTA is embedded with the database's own model and options; an output must hold vectors of the
    database's identity. Either way a query of another model, layer, pooling or dtype is refused, naming
    what differs. Hits are the k best cosines of each query, best first, with an E-value when the
    database was built with decoys.

    \b
    Examples:
      esm2cli search queries.fasta -d db -o hits.tsv
      esm2cli search queries.parquet -d db -o - -k 50 --max-evalue 1e-3
      esm2cli search queries.fasta -d db -o hits.m8 --format m8 --devices cuda:0
    """
    with interruptible():
        setup_logging(verbose, quiet)
        from esm2cli.io.storage import write_errors
        from esm2cli.search.hits import check_output
        from esm2cli.search.index import Index
        from esm2cli.search.query import search_file

        use_s3_endpoint(s3_endpoint_url)
        options = {"model": model, "load_format": load_format, "dtype": dtype, "devices": devices}
        filters = {"min_score": min_score, "max_evalue": max_evalue, "nprobe": nprobe}
        with one_line_errors():
            check_output(output, overwrite, inputs=(query,))
            index = Index.open(db, verify=verify)
            check_output(output, overwrite, inputs=(db,))  # once it is a database: a plain folder may take hits
            bar, update = _progress(quiet)
            with bar, write_errors(output):
                summary = search_file(index, query, output, output_format=output_format, k=k, filters=filters,
                                      embedder_options=options, progress=update)  # fmt: skip
        if not quiet:
            where = "stdout" if output == "-" else output
            click.echo(f"searched {summary.queries:,} queries against {index.size:,} vectors: {summary.hits:,} hits "
                       f"-> {where}", err=True)  # fmt: skip
