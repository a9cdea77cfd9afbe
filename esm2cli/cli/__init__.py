"""The command line: one module per command, the shared options, and what a command prints.

Owns parsing options, building the configuration, calling jobs/serve/api, and turning their errors into
one line and an exit code (the only place that does). May import every other subpackage; nothing imports it.
Heavy modules (torch, transformers, the server) are imported inside the commands, so `esm2cli --help` is fast.
"""

from __future__ import annotations

import click

from esm2cli.cli.bench import bench
from esm2cli.cli.download import download
from esm2cli.cli.embed import embed
from esm2cli.cli.merge import merge
from esm2cli.cli.score import score
from esm2cli.cli.serve import serve
from esm2cli.config import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="esm2cli")
def cli() -> None:
    """ESM-2 protein embeddings on every CPU or GPU you have."""


for _command in (embed, serve, score, bench, download, merge):
    cli.add_command(_command)
