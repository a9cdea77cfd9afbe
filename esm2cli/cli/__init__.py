"""The command line: one module per command, the shared options, and what a command prints.

Owns parsing options, building the configuration, calling jobs/serve/api, and turning their errors into
one line and an exit code (the only place that does). May import every other subpackage; nothing imports it.
Heavy modules (torch, transformers, the server) are imported inside the commands, so `esm2cli --help` is fast.
"""

from __future__ import annotations

import os

import click

from esm2cli.cli.bench import bench
from esm2cli.cli.download import download
from esm2cli.cli.embed import embed
from esm2cli.cli.index import index
from esm2cli.cli.map import map_command
from esm2cli.cli.merge import merge
from esm2cli.cli.score import score
from esm2cli.cli.search import search
from esm2cli.cli.serve import serve
from esm2cli.config import __version__

# OpenMP threads that finish a parallel region first spin, waiting for the others, before they sleep. With
# --devices cpu (one replica using every core) the worker's threads share the cores with this process's
# own threads (the pipeline, the writer) and with anything else on the machine: a spinning thread then
# holds the core its teammate needs, and every small kernel waits for a time slice. The tiny model on
# 1,000 proteins took 524 s (104 s of CPU) with the default policy and 41 s (10 s) passive, on 2 shared
# cores; the default, one single-threaded replica per core, never waits on a teammate (39 s either way).
# libgomp reads the policy once, when torch loads it: set here, before any command imports torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="esm2cli")
def cli() -> None:
    """ESM-2 protein embeddings on every CPU or GPU you have."""


for _command in (embed, serve, score, bench, download, merge, index, search, map_command):
    cli.add_command(_command)
