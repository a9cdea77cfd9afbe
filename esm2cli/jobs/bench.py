"""The timing harness behind `esm2cli bench`: throughput, MFU and scaling over 1..N devices.

Two kinds of run:

- **Devices** (CUDA, or simulated devices sharing the CPU): the engine alone, time-boxed. Each device
  count runs batches for ``duration`` seconds, then finishes the batches already running.
- **Modeled GPUs** (``simulate``): the real embed pipeline (FASTA -> checks -> batches -> engine ->
  Parquet) on modeled cards (esm2cli.runtime.modeled). Each count embeds a FASTA file sized to take about
  ``duration`` seconds, and the report gives the host efficiency: the throughput reached over what the
  modeled cards would give if the host never kept them waiting.
"""

from __future__ import annotations

import random
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from esm2cli.config import WARMUP_SEQUENCE, BatchConfig, EmbedConfig, InputConfig, ModelConfig
from esm2cli.model.invariant import padded_rows
from esm2cli.runtime.batching import SPECIAL_TOKENS, pack_batches
from esm2cli.runtime.engine import Engine, EngineSetup, build_engine
from esm2cli.runtime.modeled import call_seconds, model_flops

Say = Callable[[str], None]  # progress and choices, one line each (the CLI prints them on stderr)

# On the CPU, ESM-2 reaches about half of the measured matmul peak (benchmarks/RESULTS.md: 54-69% in
# bf16): what the bench assumes when it sizes batches to finish inside the time box.
_CPU_MFU_GUESS = 0.5
_BATCHES_PER_BOX = 4  # a batch should take at most this fraction of the box on the slowest count
# A benchmark times the records it can embed: invalid ones and repeated ids in --input are skipped, not refused.
_BENCH_INPUTS = InputConfig(skip_invalid=True, allow_duplicate_ids=True)


def measure_matmul_peak(torch_device: str, dtype: str, seconds: float = 1.0) -> float:
    """FLOP/s of a large square matmul in ``dtype`` on a device: the peak that MFU is measured against."""
    import torch

    from esm2cli.model.architecture import DTYPES

    n = 8192 if torch_device.startswith("cuda") else 2048
    a = torch.randn(n, n, device=torch_device, dtype=DTYPES[dtype])
    b = torch.randn(n, n, device=torch_device, dtype=DTYPES[dtype])

    def sync():
        if torch_device.startswith("cuda"):
            torch.cuda.synchronize(torch_device)

    a @ b
    sync()
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        runs += 1
        sync()
    return 2 * n**3 * runs / (time.perf_counter() - start)


def device_counts(gpus: int) -> list[int]:
    """The device counts measured: powers of two below ``gpus``, then ``gpus`` (1, 2, 4, 8; 1, 2, 4, 6)."""
    counts, k = [], 1
    while k < gpus:
        counts.append(k)
        k *= 2
    return counts + [gpus]


def card_of(cuda_name: str) -> str | None:
    """The modeled card matching a CUDA device name ("NVIDIA H100 80GB HBM3" -> "h100"), or None."""
    from esm2cli.config import GPU_PEAKS

    words = cuda_name.lower().replace("-", " ").split()
    return next((card for card in GPU_PEAKS if card in words), None)


@dataclass
class BenchRow:
    """One device count's measurement.

    Attributes:
        seconds: The measured time: the time box and its last batches; for modeled GPUs, from the
            first batch reaching a device to the last one leaving it.
        speedup, efficiency: Residues/s over one device's, and that over the ideal speedup.
        busy_share: Seconds each device spent on batches over ``seconds``.
        modeled_residues_per_s: Modeled GPUs: what the cards give when they never wait for the host.
        host_efficiency: Modeled GPUs: residues/s reached over modeled_residues_per_s.
        startup_s, finish_s: Modeled GPUs: from the call to the first batch, and from the last batch to
            the output file.
        predicted_residues_per_s: CUDA devices of a modeled card: the model's figure for the same batches.
    """

    devices: int
    seconds: float
    sequences: int
    residues: int
    sequences_per_s: float
    residues_per_s: float
    gflops: float
    mfu: float
    speedup: float = 1.0
    efficiency: float = 1.0
    busy_share: dict[str, float] = field(default_factory=dict)
    modeled_residues_per_s: float | None = None
    host_efficiency: float | None = None
    startup_s: float | None = None
    finish_s: float | None = None
    predicted_residues_per_s: float | None = None


@dataclass
class BenchReport:
    """What `esm2cli bench` prints (or writes as JSON)."""

    model: str
    random_weights: bool
    dtype: str
    device_kind: str  # "cuda", "simulated" (sharing the CPU) or "modeled"
    duration_s: float | None  # the time box per count (None: a fixed workload)
    max_tokens: int
    batch_size: int
    max_length: int
    padding_fraction: float
    peak_gflops: float  # one device: measured matmul peak, or the modeled card's published peak
    card: str | None = None
    mfu_assumed: float | None = None
    overhead_ms: float | None = None
    launch_ms: float | None = None
    choices: list[str] = field(default_factory=list)
    rows: list[BenchRow] = field(default_factory=list)
    interrupted: bool = False  # Ctrl-C ended the bench: rows holds the device counts finished before it

    def to_dict(self) -> dict:
        return asdict(self)


def _finish_rows(report: BenchReport, ideal_scaling: bool) -> None:
    base = report.rows[0].residues_per_s / report.rows[0].devices if ideal_scaling else report.rows[0].residues_per_s
    for row in report.rows:
        row.speedup = row.residues_per_s / report.rows[0].residues_per_s
        ideal = base * row.devices if ideal_scaling else base
        row.efficiency = row.residues_per_s / ideal if ideal else 0.0


# ---- devices (CUDA or simulated on the CPU): the engine alone, time-boxed -------------------------------


def _time_box(engine: Engine, batches: list[list[str]], duration: float | None, say: Say) -> tuple[float, int, int]:
    """Runs batches (cycling) until ``duration`` is up, then finishes those already running.

    Batches not started by then are cancelled; the time includes the last running ones.

    Returns:
        (seconds, sequences, residues) completed.
    """
    start = time.perf_counter()  # before submitting: submit blocks while the queue is full
    deadline = None if duration is None else start + duration
    pending: deque[tuple[list[str], Future]] = deque()
    sequences = residues = 0
    next_tick = start + 2.0

    def settle(future_done_only: bool) -> None:
        nonlocal sequences, residues
        while pending and (not future_done_only or pending[0][1].done()):
            seqs, future = pending.popleft()
            if future.cancelled():
                continue
            future.result()
            sequences += len(seqs)
            residues += sum(map(len, seqs))

    submitted = 0
    while (deadline is None and submitted < len(batches)) or (deadline is not None and time.perf_counter() < deadline):
        seqs = batches[submitted % len(batches)]
        pending.append((seqs, engine.submit(seqs)))
        submitted += 1
        settle(future_done_only=True)
        if time.perf_counter() >= next_tick:
            elapsed = time.perf_counter() - start
            say(f"    {elapsed:4.0f} s: {sequences:,} sequences, {residues / elapsed:,.0f} residues/s so far")
            next_tick += 2.0
    if deadline is not None:
        for _, future in pending:
            future.cancel()  # the box is over: only those no replica has started
    settle(future_done_only=False)
    return time.perf_counter() - start, sequences, residues


def _cpu_batch_tokens(peak: float, loaded, replicas: int, duration: float) -> int:
    """Padded tokens a batch may hold so that one of ``replicas`` CPU replicas finishes it well inside the box."""
    per_token = _token_flops(loaded)  # ~ the cost of one more token
    tokens_per_s = peak * _CPU_MFU_GUESS / per_token / replicas
    return max(SPECIAL_TOKENS + 8, int(tokens_per_s * duration / _BATCHES_PER_BOX))


def run_bench(
    model: ModelConfig,
    seqs: list[str],
    gpus: int,
    *,
    batch: BatchConfig | None = None,
    duration: float | None = None,
    fit_to_box: bool = False,
    peak_seconds: float = 1.0,
    say: Say = lambda line: None,
) -> BenchReport:
    """Measures the engine on 1..gpus devices: real CUDA devices when there are that many, else simulated.

    Args:
        model: The model (its devices field is ignored).
        seqs: Validated sequences, already truncated: the workload, cycled inside the time box.
        gpus: The largest device count.
        batch: Batch size and token budget (max_tokens None: the default of the device kind).
        duration: Seconds per device count (None: each count runs ``seqs`` once).
        fit_to_box: On simulated devices, shorten the sequences and batches so that batches finish
            inside the box (the CPU runs large models slowly); said through ``say``.
        peak_seconds: How long the matmul peak is measured.
        say: Receives progress and the choices made, one line at a time.
    """
    from esm2cli.runtime.devices import cuda_device_count
    from esm2cli.runtime.replica import build_replicas

    cuda = gpus <= cuda_device_count()
    spec = ",".join(f"cuda:{i}" for i in range(gpus)) if cuda else f"sim:{gpus}"
    setup = build_engine(replace(model, devices=spec, simulate=None), EmbedConfig(), batch)
    loaded, dtype = setup.model, setup.dtype
    say(f"{gpus} {'CUDA' if cuda else 'simulated'} device(s), {dtype}; measuring the matmul peak ({peak_seconds:g} s)")
    peak = measure_matmul_peak(setup.devices[0].torch_device, dtype, peak_seconds)
    max_tokens: int = setup.batch.max_tokens or 0  # set by build_engine for the devices
    choices: list[str] = []
    if fit_to_box and not cuda and duration:
        fitted = _cpu_batch_tokens(peak, loaded, gpus, duration)
        if fitted < max_tokens:
            max_tokens = fitted
            seqs = [s[: max_tokens - SPECIAL_TOKENS] for s in seqs]
            rate = peak * _CPU_MFU_GUESS / _token_flops(loaded)
            choices.append(
                f"the CPU runs {model.model} at about {rate:,.0f} tokens/s in all; so that {gpus} replicas "
                f"sharing it finish batches inside a {duration:g} s box, batches hold at most {max_tokens} tokens "
                f"and sequences are cut to {max_tokens - SPECIAL_TOKENS} residues"
            )
    planned = pack_batches([len(s) for s in seqs], max_tokens, setup.batch.batch_size)
    random.Random(0).shuffle(planned)  # any prefix of the cycle then has the workload's mix of lengths
    batches = [[seqs[i] for i in rows] for rows in planned]
    real = sum(len(s) + SPECIAL_TOKENS for s in seqs)
    padded = sum(_computed_rows([len(seqs[i]) for i in rows]) for rows in planned)
    report = BenchReport(
        model=model.model, random_weights=loaded.dummy, dtype=dtype, device_kind="cuda" if cuda else "simulated",
        duration_s=duration, max_tokens=max_tokens, batch_size=setup.batch.batch_size,
        max_length=max(map(len, seqs)), padding_fraction=1 - real / padded, peak_gflops=peak / 1e9, choices=choices,
    )  # fmt: skip
    for line in choices:
        say(line)
    card = card_of(_cuda_name()) if cuda else None
    counts = device_counts(gpus)
    with _keep_rows_on_interrupt(report):
        for n, k in enumerate(counts, start=1):
            say(f"[{n}/{len(counts)}] {k} device(s): " + (f"{duration:g} s" if duration else "one pass"))
            # CPU replicas size their threads by how many share the cores: build them for this count.
            replicas = setup.replicas[:k] if cuda else build_replicas(loaded, setup.devices[:k], EmbedConfig())
            with Engine(replicas) as engine:
                engine.warm_up([WARMUP_SEQUENCE])
                warm = engine.busy_seconds()
                seconds, done, residues = _time_box(engine, batches, duration, say)
                busy = {d: (s - warm[d]) / seconds for d, s in engine.busy_seconds().items()}
            flops = _flops_of(batches, done, loaded)
            # Simulated devices share one CPU: MFU is against that one CPU's peak, and ideal scaling is flat.
            row = BenchRow(
                devices=k, seconds=seconds, sequences=done, residues=residues, sequences_per_s=done / seconds,
                residues_per_s=residues / seconds, gflops=flops / seconds / 1e9,
                mfu=flops / seconds / (peak * (k if cuda else 1)), busy_share=busy,
            )  # fmt: skip
            if card:
                row.predicted_residues_per_s = _predicted_rate(batches, k, card, dtype, loaded)
            report.rows.append(row)
            say(f"    {k} device(s): {row.residues_per_s:,.0f} residues/s ({done:,} sequences in {seconds:.1f} s)")
    _finish_rows(report, ideal_scaling=cuda)
    return report


@contextmanager
def _keep_rows_on_interrupt(report: BenchReport) -> Iterator[None]:
    """Ctrl-C after the first device count ends the bench with the rows measured so far."""
    try:
        yield
    except KeyboardInterrupt:
        if not report.rows:
            raise
        report.interrupted = True


def _cuda_name() -> str:
    import torch

    return torch.cuda.get_device_name(0)


def _token_flops(loaded) -> float:
    """Model FLOPs of a one-residue protein: about the cost of one more token."""
    return model_flops([1], loaded.num_layers, loaded.hidden_size, ffn_weights=loaded.ffn_weights)


def _flops_of(batches: list[list[str]], sequences: int, loaded) -> float:
    """Model FLOPs of the first ``sequences`` sequences of the cycled batches (an estimate: the mix repeats)."""
    lengths = [len(s) for b in batches for s in b]
    per_cycle = model_flops(lengths, loaded.num_layers, loaded.hidden_size, ffn_weights=loaded.ffn_weights)
    return per_cycle * sequences / len(lengths)


def _predicted_rate(batches: list[list[str]], k: int, card: str, dtype: str, loaded) -> float:
    """Residues/s that ``k`` modeled cards would give on these batches (default MFU and overhead)."""
    from esm2cli.config import ModeledGPU

    gpu = ModeledGPU(card=card)
    shape = (loaded.num_layers, loaded.hidden_size)
    seconds = sum(
        call_seconds([len(s) for s in b], *shape, gpu, dtype, ffn_weights=loaded.ffn_weights) for b in batches
    )
    return sum(len(s) for b in batches for s in b) / (seconds / k)


# ---- modeled GPUs: the real embed pipeline --------------------------------------------------------------


def _seconds_per_residue(seqs: Sequence[str], setup: EngineSetup) -> float:
    """Modeled device seconds per residue on a sample of the workload, batched as embed batches it."""
    planned = pack_batches([len(s) for s in seqs], setup.batch.token_budget, setup.batch.batch_size)
    replica = setup.replicas[0]
    held = sum(replica.seconds([len(seqs[i]) for i in rows]) for rows in planned)
    return held / sum(map(len, seqs))


def run_modeled_bench(
    model: ModelConfig,
    gpus: int,
    *,
    batch: BatchConfig | None = None,
    duration: float = 8.0,
    input_fasta: str | None = None,
    sequences: int | None = None,
    seed: int = 0,
    max_length: int = 1022,
    say: Say = lambda line: None,
) -> BenchReport:
    """Runs the real embed pipeline on 1..gpus modeled GPUs (``model.simulate``) and measures the host.

    Each count embeds a FASTA file into Parquet (in a temporary directory) with esm2cli.jobs.pipeline.embed_fasta.
    Without ``input_fasta`` or ``sequences`` the file holds distinct synthetic proteins, as many as the cards
    would embed in ``duration`` seconds (at the rate the host reached on the previous count, when lower).

    Args:
        model: The model, with ``simulate`` set (its count is replaced by each count measured).
        gpus: The largest count.
        batch: Batch size and token budget (max_tokens None: the GPU default).
        duration: Seconds each count should take.
        input_fasta: A FASTA file to embed as it is, instead.
        sequences: A fixed number of synthetic proteins, instead.
        seed, max_length: The synthetic proteins' seed and longest length (residues).
        say: Receives progress and the choices made, one line at a time.
    """
    from esm2cli.jobs.pipeline import embed_fasta
    from esm2cli.jobs.workload import draw_sequences, fasta_text

    gpu = model.simulate
    if gpu is None:
        raise ValueError("run_modeled_bench needs model.simulate; this is a bug")
    embed = EmbedConfig(truncate=max_length, window_overlap=0)  # truncate mode: no windows to overlap
    probe = build_engine(replace(model, simulate=replace(gpu, count=1)), embed, batch)
    sample = draw_sequences(4096, seed=seed + 10_000, max_length=max_length)
    per_residue = _seconds_per_residue(sample, probe)
    mean_length = sum(map(len, sample)) / len(sample)
    report = BenchReport(
        model=model.model, random_weights=True, dtype=probe.dtype, device_kind="modeled",
        duration_s=None if input_fasta or sequences else duration, max_tokens=probe.batch.token_budget,
        batch_size=probe.batch.batch_size, max_length=max_length, padding_fraction=_padding(sample, probe.batch),
        peak_gflops=_peak(probe.devices[0].card, probe.dtype) / 1e9, card=probe.devices[0].card,
        mfu_assumed=gpu.mfu, overhead_ms=gpu.overhead_ms, launch_ms=gpu.launch_ms,
    )  # fmt: skip
    one = 1 / per_residue
    report.choices.append(
        f"a MODEL of {gpu.card.upper()} GPUs, not a measurement of one: each batch is held for its FLOPs over "
        f"{_peak(gpu.card, report.dtype) / 1e12:,.0f} TFLOP/s ({report.dtype} peak) x MFU {gpu.mfu:g} + "
        f"{gpu.overhead_ms:g} ms; one card embeds about {one:,.0f} residues/s of this workload"
    )
    if gpu.launch_ms:
        report.choices.append(f"each call also holds the GIL for {gpu.launch_ms:g} ms (--launch-ms)")
    for line in report.choices:
        say(line)
    host_rate: float | None = None
    model = replace(model, dtype=probe.dtype)  # decided once
    with tempfile.TemporaryDirectory(prefix="esm2cli-bench-") as work, _keep_rows_on_interrupt(report):
        counts = device_counts(gpus)
        for n, k in enumerate(counts, start=1):
            fasta = Path(work) / f"in-{k}.fasta"
            if input_fasta:
                source = input_fasta
            else:
                rate = min(one * k, host_rate * k) if host_rate else one * k
                count = sequences or max(k * 64, int(rate * duration / mean_length))
                fasta.write_text(fasta_text(draw_sequences(count, seed=seed + k, max_length=max_length)))
                source = str(fasta)
            say(f"[{n}/{len(counts)}] {k} modeled {gpu.card.upper()}: embedding {Path(source).name}")
            setup = build_engine(replace(model, simulate=replace(gpu, count=k)), embed, batch)
            begin = time.perf_counter()
            with setup.engine:  # embed_fasta runs a setup it is given, and leaves it to its owner
                summary = embed_fasta(
                    source, Path(work) / f"out-{k}.parquet", model=replace(model, simulate=replace(gpu, count=k)),
                    embed=embed, batch=setup.batch, inputs=_BENCH_INPUTS, overwrite=True, setup=setup,
                )  # fmt: skip
            end = time.perf_counter()
            row = _modeled_row(k, setup, summary, begin, end)
            host_rate = row.residues_per_s / k
            report.rows.append(row)
            say(
                f"    {k} modeled {gpu.card.upper()}: {row.residues_per_s:,.0f} residues/s, host efficiency "
                f"{row.host_efficiency:.0%} (startup {row.startup_s:.1f} s, finish {row.finish_s:.1f} s)"
            )
            fasta.unlink(missing_ok=True)
    _finish_rows(report, ideal_scaling=True)
    return report


def _peak(card: str, dtype: str) -> float:
    from esm2cli.config import GPU_PEAKS

    return GPU_PEAKS[card][dtype]


def _padding(seqs: Sequence[str], batch: BatchConfig) -> float:
    planned = pack_batches([len(s) for s in seqs], batch.token_budget, batch.batch_size)
    real = sum(len(s) + SPECIAL_TOKENS for s in seqs)
    return 1 - real / sum(_computed_rows([len(seqs[i]) for i in rows]) for rows in planned)


def _computed_rows(lengths: Sequence[int]) -> int:
    """Rows the forward computes for a packed batch of these lengths: its tokens in whole matmul tiles."""
    return padded_rows(sum(n + SPECIAL_TOKENS for n in lengths))


def _modeled_row(k: int, setup: EngineSetup, summary, begin: float, end: float) -> BenchRow:
    """A modeled count's row: throughput over the device phase, and what the host cost before and after."""
    replicas = [r for r in setup.replicas if r.calls]
    first = min(r.first_start for r in replicas)
    last = max(r.last_end for r in replicas)
    seconds = last - first
    held = sum(r.held_s for r in setup.replicas)
    flops = sum(r.flops for r in setup.replicas)
    residues = summary.residues
    return BenchRow(
        devices=k, seconds=seconds, sequences=summary.sequences, residues=residues,
        sequences_per_s=summary.sequences / seconds, residues_per_s=residues / seconds,
        gflops=flops / seconds / 1e9, mfu=flops / seconds / (k * _peak(setup.devices[0].card, setup.dtype)),
        busy_share={r.device.name: r.held_s / seconds for r in setup.replicas},
        modeled_residues_per_s=residues / (held / k), host_efficiency=(held / k) / seconds,
        startup_s=first - begin, finish_s=end - last,
    )  # fmt: skip


# ---- the report ---------------------------------------------------------------------------------------


def format_report(report: BenchReport) -> str:
    """The human-readable report: workload, peak, and the scaling table."""
    weights = "RANDOM weights" if report.random_weights else "real weights"
    kinds = {
        "cuda": "CUDA devices",
        "simulated": "simulated devices sharing the CPU",
        "modeled": f"MODELED {str(report.card).upper()} GPUs (no model runs: each batch takes the card's modeled time)",
    }
    box = f"{report.duration_s:g} s per device count" if report.duration_s else "one pass per device count"
    lines = [
        f"model {report.model} ({weights}), {report.dtype}, {kinds[report.device_kind]}",
        f"workload: {box}; batches of at most {report.max_tokens:,} tokens and {report.batch_size} sequences, "
        f"sequences up to {report.max_length} residues; padding {report.padding_fraction:.1%} of computed tokens",
    ]
    if report.device_kind == "modeled":
        lines.append(
            f"model of the card: {report.peak_gflops / 1e3:,.0f} TFLOP/s {report.dtype} peak x MFU "
            f"{report.mfu_assumed:g} + {report.overhead_ms:g} ms a call"
            + (f", {report.launch_ms:g} ms of it holding the GIL" if report.launch_ms else "")
        )
    else:
        lines.append(f"peak: {report.peak_gflops:,.0f} GFLOP/s (measured {report.dtype} matmul, one device)")
    lines += [f"note: {c}" for c in report.choices[1 if report.device_kind == "modeled" else 0 :]]
    lines.append("")
    header = f"{'devices':>7} {'seq/s':>9} {'residues/s':>11} {'speedup':>8} {'efficiency':>10}"
    if report.device_kind == "modeled":
        header += f" {'modeled ideal':>13} {'host eff.':>9} {'startup':>8} {'finish':>7}"
    else:
        header += f" {'GFLOP/s':>9} {'MFU':>6}"
        if any(r.predicted_residues_per_s for r in report.rows):
            header += f" {'modeled':>11} {'real/model':>10}"
    lines.append(header + "  busy share per device")
    for r in report.rows:
        line = (
            f"{r.devices:>7} {r.sequences_per_s:>9,.1f} {r.residues_per_s:>11,.0f} {r.speedup:>7.2f}x "
            f"{r.efficiency:>10.0%}"
        )
        if report.device_kind == "modeled":
            line += f" {r.modeled_residues_per_s:>13,.0f} {r.host_efficiency:>9.0%}"
            line += f" {r.startup_s:>7.1f}s {r.finish_s:>6.1f}s"
        else:
            line += f" {r.gflops:>9,.0f} {r.mfu:>6.1%}"
            if r.predicted_residues_per_s:
                line += f" {r.predicted_residues_per_s:>11,.0f} {r.residues_per_s / r.predicted_residues_per_s:>10.2f}"
        lines.append(line + "  " + " ".join(f"{share:.0%}" for share in r.busy_share.values()))
    lines.append("")
    lines += _footnotes(report)
    return "\n".join(lines)


def _efficiency_note(report: BenchReport) -> str:
    """What the efficiency column is measured against (a bare percentage over 100% reads as an error)."""
    one = report.rows[0]
    if report.device_kind == "simulated":
        return (
            f"efficiency: residues/s over that of {one.devices} simulated device(s) ({one.residues_per_s:,.0f}): "
            "simulated devices share the CPU, so the ideal is flat and above 100% means the cores were used better"
        )
    return (
        f"efficiency: residues/s over linear scaling of {one.devices} device(s)' "
        f"{one.residues_per_s / one.devices:,.0f} per device (100% = every device as fast as alone)"
    )


def _footnotes(report: BenchReport) -> list[str]:
    return [_efficiency_note(report), *_kind_notes(report)] if report.rows else _kind_notes(report)


def _kind_notes(report: BenchReport) -> list[str]:
    if report.device_kind == "modeled":
        return [
            "This is a MODEL of the GPUs: batches take the time the cards would take; reading, checks, sorting,",
            "tokenising, outputs and Parquet writing are real. residues/s is measured from the first batch on a",
            "device to the last; host efficiency = residues/s over the modeled ideal (devices never kept waiting).",
            "startup: from the call to the first batch (reading the input once to check it); finish: from the last",
            "batch to the output file.",
        ]
    if report.device_kind == "simulated" and len(report.rows) > 1:
        return [
            "Simulated devices share the same CPU cores, so the ideal is a flat line (speedup 1.00x). Above it:",
            "single-threaded replicas use the cores better than one replica with every thread. Below it: the",
            "cost of more replicas than cores (threads contending, dispatch, caches).",
        ]
    if any(r.predicted_residues_per_s for r in report.rows):
        return ["modeled: what `esm2cli bench --simulate` predicts for the same batches (default MFU and overhead)."]
    return []


def check_plot_path(path: Path) -> str | None:
    """Why a plot cannot be written at ``path`` (no matplotlib, a format it lacks, no such directory, not
    writable), or None."""
    import importlib.util
    import os

    if importlib.util.find_spec("matplotlib") is None:
        return "needs matplotlib (pip install matplotlib)"
    if path.is_dir():
        return f"{path} is a directory"
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    if path.suffix.lower().lstrip(".") not in formats:
        return f"name it .png (or one of {', '.join(sorted(formats))})"
    parent = path.expanduser().resolve().parent
    if not parent.is_dir():
        return f"the directory {parent} does not exist"
    if not os.access(parent, os.W_OK):
        return f"the directory {parent} is not writable"
    return None


def plot_report(report: BenchReport, path: str) -> None:
    """Writes residues/s and efficiency against device count as a PNG (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = [r.devices for r in report.rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(counts, [r.residues_per_s for r in report.rows], marker="o", label="measured")
    if report.device_kind == "modeled":
        ideal = [r.modeled_residues_per_s or 0.0 for r in report.rows]
    else:
        ideal = [report.rows[0].residues_per_s * (k if report.device_kind == "cuda" else 1) for k in counts]
    ax.plot(counts, ideal, linestyle="--", label="modeled ideal" if report.device_kind == "modeled" else "ideal")
    ax.set_xlabel(f"devices ({report.device_kind}{' ' + report.card if report.card else ''})")
    ax.set_ylabel("residues/s")
    ax.set_title(f"{report.model}, {report.dtype}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
