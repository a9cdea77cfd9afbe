"""esm2cli download: fetch weights once for offline runs."""

from __future__ import annotations

from pathlib import Path

import click

from esm2cli.cli.console import setup_logging, to_click
from esm2cli.cli.options import log_options
from esm2cli.errors import Esm2Error


@click.command()
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
    from esm2cli.model import hub
    from esm2cli.model.architecture import resolve_source

    setup_logging(verbose, quiet)
    repo_id = resolve_source(model)
    if not hub.is_repo_id(repo_id):
        raise click.BadParameter(f"{model!r} is not an ESM-2 alias or a hub id (owner/name)", param_hint="MODEL")
    try:
        folder = hub.download(repo_id, to, alias=model)
    except Esm2Error as exc:
        raise to_click(exc) from exc
    click.echo(str(folder))
    if not quiet:
        click.echo(f"{repo_id} is in {folder}", err=True)
