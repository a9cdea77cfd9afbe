"""esm2cli merge: the parts of a sharded run into one file."""

from __future__ import annotations

import click

from esm2cli.cli.console import setup_logging, to_click, use_s3_endpoint
from esm2cli.cli.options import log_options
from esm2cli.errors import Esm2Error


@click.command()
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

    from esm2cli.io.merge import merge_parts

    setup_logging(verbose, quiet)
    use_s3_endpoint(s3_endpoint_url)
    try:
        rows = merge_parts(prefix, output, overwrite)  # checks the parts and the output; replaces atomically
    except Esm2Error as exc:
        raise to_click(exc) from exc
    if not quiet:
        done = f"merged {rows:,} rows -> {output}" if rows is not None else f"{output} is already complete"
        click.echo(done, err=True)
