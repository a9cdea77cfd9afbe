"""esm2cli score: pseudo-log-likelihoods and mutant effects from the masked-LM head."""

from __future__ import annotations

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
    log_options,
    model_options,
    overwrite_option,
    s3_endpoint_option,
    skip_invalid_option,
    truncate_option,
)
from esm2cli.config import SCORE_METHODS, BatchConfig, ModelConfig


def _score_summary_line(summary, output) -> str:
    if summary.already_complete:
        return f"{output} is already complete (same input, mutants, weights and options): nothing to do"
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
        f"in {summary.seconds:.1f} s ({rate:,.1f} inputs/s) on {device_list(summary.devices)}{oom}"
    )


@click.command()
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
    type=click.Choice(SCORE_METHODS),
    default=None,
    help="Mutant scores from the wild type with the position masked, or unmasked.  [default: masked-marginal]",
)
@model_options
@truncate_option(
    "Window: residues per forward pass. A position of a longer protein is scored in the window of this "
    "many residues that centres it."
)
@batch_options("Inputs (masked copies)")
@skip_invalid_option("Score the valid records and mutants; report the others.")
@overwrite_option("Replace the output file if it exists (once the new one is complete).")
@s3_endpoint_option()
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
    setup_logging(verbose, quiet)
    from esm2cli.config import ScoreConfig
    from esm2cli.jobs.scoring import score_fasta

    use_s3_endpoint(s3_endpoint_url)
    modes = [
        name
        for name, on in [("--pll", pll), ("--mutations", mutations), ("--all-substitutions", all_substitutions)]
        if on
    ]
    if len(modes) != 1:
        raise click.UsageError("give exactly one of --pll, --mutations CSV, --all-substitutions")
    if fasta == "-" and mutations == "-":
        raise click.BadParameter(
            "the FASTA is already read from stdin; name a file for the list", param_hint="--mutations"
        )
    if pll and method:
        raise click.BadParameter("a pseudo-log-likelihood always masks; --method is for mutants", param_hint="--method")
    truncate = model_truncate(model, truncate)
    mode = {"--pll": "pll", "--mutations": "mutations", "--all-substitutions": "all-substitutions"}[modes[0]]
    cfg = ScoreConfig(
        mode=mode, method=method or "masked-marginal", mutations=mutations, window=truncate, skip_invalid=skip_invalid
    )
    model_cfg = ModelConfig(model=model, load_format=load_format, dtype=dtype, devices=devices)
    log.debug("score: %s; model: %s", cfg, model_cfg)
    with interruptible("interrupted: the output was not written (an earlier one is left as it was)"):
        with one_line_errors():
            summary = score_fasta(
                fasta,
                output,
                model=model_cfg,
                score=cfg,
                batch=BatchConfig(batch_size=batch_size, max_tokens=max_tokens),
                overwrite=overwrite,
                progress_factory=progress_factory(quiet, unit="pos"),
            )
    if not quiet:
        click.echo(_score_summary_line(summary, output), err=True)
