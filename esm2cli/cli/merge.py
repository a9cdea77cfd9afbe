"""esm2cli merge: the parts of a sharded run into one file."""

from __future__ import annotations

import click

from esm2cli.cli.console import one_line_errors, setup_logging, use_s3_endpoint
from esm2cli.cli.options import log_options, overwrite_option, s3_endpoint_option


@click.command()
@click.argument("prefix")
@click.option("-o", "--output", required=True, help="The single Parquet (or .h5) file to write (a path or URL).")
@overwrite_option("Replace the output if it exists; the old file stays until the new one is done.")
@s3_endpoint_option()
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
    with one_line_errors():
        rows = merge_parts(prefix, output, overwrite)  # checks the parts and the output; replaces atomically
    if not quiet:
        done = f"merged {rows:,} rows -> {output}" if rows is not None else f"{output} is already complete"
        click.echo(done, err=True)
