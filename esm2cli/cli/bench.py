"""esm2cli bench: throughput on N devices, real or modeled, with a scaling table."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from esm2cli.cli.console import setup_logging, to_click
from esm2cli.cli.options import log_options
from esm2cli.config import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_BENCH_SECONDS,
    DEFAULT_MODEL,
    DEFAULT_TRUNCATE,
    GPU_PEAKS,
    MAX_BENCH_DEVICES,
    BatchConfig,
    ModelConfig,
    ModeledGPU,
)
from esm2cli.errors import Esm2Error


@click.command()
@click.option(
    "--gpus",
    type=click.IntRange(1, MAX_BENCH_DEVICES),
    default=None,
    help="Devices to scale to (1, 2, 4, ... N): real CUDA devices when there are that many, else simulated on "
    "the CPU. [default: every CUDA device, or 1; 8 with --simulate]",
)
@click.option(
    "--simulate",
    type=click.Choice(list(GPU_PEAKS), case_sensitive=False),
    default=None,
    help="Model GPUs of this card instead of running the model: each batch takes the card's time (FLOPs over "
    "its published peak x --mfu, + --overhead-ms) while the real embed pipeline writes real Parquet; "
    "reports the host efficiency.",
)
@click.option(
    "--mfu",
    type=click.FloatRange(0, 1, min_open=True),
    default=ModeledGPU.mfu,
    show_default=True,
    help="With --simulate: the share of the card's peak its batches reach.",
)
@click.option(
    "--overhead-ms",
    type=click.FloatRange(min=0),
    default=ModeledGPU.overhead_ms,
    show_default=True,
    help="With --simulate: fixed device time per batch.",
)
@click.option(
    "--launch-ms",
    type=click.FloatRange(min=0),
    default=ModeledGPU.launch_ms,
    show_default=True,
    help="With --simulate: host time per batch that holds the GIL (the Python side of an eager forward).",
)
@click.option(
    "--duration",
    type=click.FloatRange(min=1),
    default=DEFAULT_BENCH_SECONDS,
    show_default=True,
    help="Seconds per device count; the workload is sized to it (unless --sequences or --input).",
)
@click.option("-m", "--model", default=DEFAULT_MODEL, show_default=True, help="Model alias, hub id or directory.")
@click.option(
    "--load-format",
    type=click.Choice(["auto", "dummy"]),
    default="dummy",
    show_default=True,
    help="dummy: random weights of the named size (the compute is the same as the real model's).",
)
@click.option(
    "--dtype",
    type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
    default=ModelConfig.dtype,
    show_default=True,
)
@click.option(
    "--input",
    "input_fasta",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A FASTA file to time instead of the synthetic workload.",
)
@click.option(
    "--sequences",
    type=click.IntRange(min=1),
    default=None,
    help="A fixed workload of this many synthetic proteins (UniProt-like lengths), run once per device count, "
    "instead of the time box.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--max-length",
    type=click.IntRange(min=1),
    default=DEFAULT_TRUNCATE,
    show_default=True,
    help="Sequences are truncated to this many residues.",
)
@click.option(
    "--max-tokens",
    type=click.IntRange(min=64),
    default=None,
    help="Padded tokens per batch. [default: as esm2cli embed]",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=DEFAULT_BATCH_SIZE, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout (one row per device count).")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), help="Write a PNG of the scaling.")
@log_options
@click.pass_context
def bench(
    ctx,
    gpus,
    simulate,
    mfu,
    overhead_ms,
    launch_ms,
    duration,
    model,
    load_format,
    dtype,
    input_fasta,
    sequences,
    seed,
    max_length,
    max_tokens,
    batch_size,
    as_json,
    plot,
    verbose,
    quiet,
):
    """Measure throughput and scaling over 1, 2, 4 ... N devices: sequences/s, residues/s, speedup, efficiency.

    Each device count runs for --duration seconds (sized to the devices at hand), so that the
    whole bench answers in about a minute. Without GPUs, --gpus N simulates N devices sharing the
    CPU; --simulate CARD models N GPUs of that card instead, around the real embed pipeline, and
    reports whether this host keeps them busy.

    \b
    Examples:
      esm2cli bench                                  # 650M architecture, every GPU (or the CPU)
      esm2cli bench --gpus 8                         # 8 simulated devices on a machine without GPUs
      esm2cli bench --gpus 8 --simulate a100         # can this host feed 8 A100s? (a model, not a GPU)
      esm2cli bench --simulate h100 --mfu 0.3 --json
      esm2cli bench --input proteins.fasta --plot scaling.png
    """
    import json

    setup_logging(verbose, quiet)
    given = {
        name for name in ("mfu", "overhead_ms", "launch_ms")
        if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE
    }  # fmt: skip
    if given and not simulate:
        raise click.UsageError(f"--{sorted(given)[0].replace('_', '-')} applies to modeled GPUs: add --simulate CARD")
    if input_fasta and sequences:
        raise click.UsageError("--input and --sequences both choose the workload: give one")
    if plot:
        from esm2cli.jobs.bench import check_plot_path

        if problem := check_plot_path(plot):
            raise click.BadParameter(f"cannot write {plot}: {problem}", param_hint="--plot")

    def say(line: str) -> None:
        if not quiet:
            click.echo(line, err=True)

    batch = BatchConfig(max_tokens=max_tokens, batch_size=batch_size)
    try:
        report = (
            _bench_modeled(gpus, simulate, mfu, overhead_ms, launch_ms, duration, model, load_format, dtype,
                           input_fasta, sequences, seed, max_length, batch, say)
            if simulate
            else _bench_devices(ctx, gpus, duration, model, load_format, dtype, input_fasta, sequences, seed,
                                max_length, batch, say)
        )  # fmt: skip
    except Esm2Error as exc:
        raise to_click(exc) from exc
    except KeyboardInterrupt:
        click.echo("interrupted before the first device count finished: no result", err=True)
        sys.exit(130)
    from esm2cli.jobs.bench import format_report

    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else format_report(report))
    if plot:
        from esm2cli.jobs.bench import plot_report

        plot_report(report, str(plot))
        say(f"plot: {plot}")
    if report.interrupted:
        click.echo(f"interrupted: the table holds the {len(report.rows)} device count(s) finished before", err=True)
        sys.exit(130)


def _bench_modeled(gpus, card, mfu, overhead_ms, launch_ms, duration, model, load_format, dtype, input_fasta,
                   sequences, seed, max_length, batch, say):  # fmt: skip
    from esm2cli.jobs.bench import run_modeled_bench

    gpus = gpus or 8
    modeled = ModeledGPU(card=card.lower(), count=gpus, mfu=mfu, overhead_ms=overhead_ms, launch_ms=launch_ms)
    config = ModelConfig(model=model, load_format=load_format, dtype=dtype, simulate=modeled)
    return run_modeled_bench(
        config, gpus, batch=batch, duration=duration, input_fasta=str(input_fasta) if input_fasta else None,
        sequences=sequences, seed=seed, max_length=max_length, say=say,
    )  # fmt: skip


def _bench_devices(ctx, gpus, duration, model, load_format, dtype, input_fasta, sequences, seed, max_length, batch,
                   say):  # fmt: skip
    from esm2cli.jobs.bench import run_bench
    from esm2cli.runtime.devices import cuda_device_count

    n_cuda = cuda_device_count()
    gpus = gpus or max(n_cuda, 1)
    on_cuda = gpus <= n_cuda
    if input_fasta:
        from esm2cli.io.fasta import read_records

        try:
            seqs = [r.sequence[:max_length] for r in read_records(input_fasta) if r.problem is None]
        except Esm2Error as exc:
            raise to_click(exc) from exc
        if not seqs:
            raise click.BadParameter("no valid sequences", param_hint="--input")
    else:
        from esm2cli.jobs.workload import synthetic_sequences

        # Cycled inside the time box: enough distinct proteins for a representative mix of lengths.
        count = sequences or (1024 * gpus if on_cuda else 256)
        seqs = [s[:max_length] for _, s in synthetic_sequences(count, seed=seed)]
    if not on_cuda:
        say(f"{gpus} simulated device(s) sharing the CPU (this machine has {n_cuda} CUDA device(s))")
    fit = not input_fasta and not sequences and batch.max_tokens is None
    fit = fit and ctx.get_parameter_source("max_length") != click.core.ParameterSource.COMMANDLINE
    return run_bench(
        ModelConfig(model=model, load_format=load_format, dtype=dtype), seqs, gpus, batch=batch,
        duration=None if sequences or input_fasta else duration, fit_to_box=fit, say=say,
    )  # fmt: skip
