"""The timing harness behind `esm2cli bench`: throughput, padding, MFU and scaling over 1..N devices."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from esm2cli.batching import SPECIAL_TOKENS, padded_tokens, plan_batches
from esm2cli.config import EmbedConfig, ModelConfig
from esm2cli.engine import Engine


def model_flops(lengths: Sequence[int], layers: int, hidden: int) -> float:
    """Forward FLOPs of ESM-2 on these sequences (<cls> and <eos> counted, padding not).

    Per layer and sequence of T tokens: 24·h²·T for the projections and the 4h feed-forward,
    plus 4·h·T² for the attention scores and their weighted sum.
    """
    total = 0.0
    for n in lengths:
        t = n + SPECIAL_TOKENS
        total += layers * (24 * hidden * hidden * t + 4 * hidden * t * t)
    return total


def measure_matmul_peak(torch_device: str, dtype: str, seconds: float = 1.0) -> float:
    """FLOP/s of a large square matmul in ``dtype`` on a device: the peak that MFU is measured against."""
    import torch

    from esm2cli.model import DTYPES

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


@dataclass
class BenchRow:
    """One device count's measurement."""

    devices: int
    seconds: float
    sequences_per_s: float
    residues_per_s: float
    gflops: float
    mfu: float
    speedup: float = 1.0
    efficiency: float = 1.0
    busy_share: dict[str, float] = field(default_factory=dict)


@dataclass
class BenchReport:
    """What `esm2cli bench` prints (or writes as JSON)."""

    model: str
    random_weights: bool
    dtype: str
    device_kind: str  # "cuda" or "simulated"
    sequences: int
    residues: int
    max_tokens: int
    batches: int
    padding_fraction: float
    peak_gflops: float
    rows: list[BenchRow] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _run_once(engine: Engine, seqs: list[str], batches: list[list[int]]) -> float:
    start = time.perf_counter()  # before submitting: submit blocks while the replicas' queues are full
    futures = [engine.submit([seqs[i] for i in rows]) for rows in batches]
    for future in futures:
        future.result()
    return time.perf_counter() - start


def run_bench(
    model: ModelConfig, seqs: list[str], gpus: int, max_tokens: int, batch_size: int, peak_seconds: float = 1.0
) -> BenchReport:
    """Embeds the same sequences on 1..gpus devices and measures each.

    Real CUDA devices are used when the machine has ``gpus`` of them; otherwise ``gpus``
    simulated devices whose replicas share the CPU.

    Args:
        model: The model (its devices field is ignored).
        seqs: Validated sequences, already truncated.
        gpus: The largest device count.
        max_tokens, batch_size: How batches are cut.
        peak_seconds: How long the matmul peak is measured.
    """
    from dataclasses import replace

    from esm2cli.devices import Device, cuda_device_count, resolve_dtype
    from esm2cli.model import build_replicas, load_model

    cuda = 0 < gpus <= cuda_device_count()
    devices = [Device(f"cuda:{i}", f"cuda:{i}") if cuda else Device(f"sim:{i}", "cpu") for i in range(gpus)]
    dtype = resolve_dtype(model.dtype, devices)
    loaded = load_model(replace(model, dtype=dtype))
    batches = plan_batches([len(s) for s in seqs], max_tokens, batch_size)
    real_tokens = sum(len(s) + SPECIAL_TOKENS for s in seqs)
    padded = sum(padded_tokens([len(seqs[i]) for i in rows]) for rows in batches)
    flops = model_flops([len(s) for s in seqs], loaded.num_layers, loaded.hidden_size)
    peak = measure_matmul_peak(devices[0].torch_device, dtype, peak_seconds)
    report = BenchReport(
        model=model.model, random_weights=loaded.dummy, dtype=dtype, device_kind="cuda" if cuda else "simulated",
        sequences=len(seqs), residues=sum(map(len, seqs)), max_tokens=max_tokens, batches=len(batches),
        padding_fraction=1 - real_tokens / padded, peak_gflops=peak / 1e9,
    )  # fmt: skip
    cuda_replicas = build_replicas(loaded, devices, EmbedConfig()) if cuda else None
    for k in range(1, gpus + 1):
        replicas = cuda_replicas[:k] if cuda_replicas else build_replicas(loaded, devices[:k], EmbedConfig())
        with Engine(replicas) as engine:
            [f.result() for f in [engine.submit(seqs[:2]) for _ in range(k)]]  # warm every replica
            warm = engine.busy_seconds()
            seconds = _run_once(engine, seqs, batches)
            busy = {d: (s - warm[d]) / seconds for d, s in engine.busy_seconds().items()}
        # Simulated devices share one CPU: MFU is against that one CPU's peak, and ideal scaling is flat.
        peak_total = peak * (k if cuda else 1)
        report.rows.append(
            BenchRow(
                devices=k,
                seconds=seconds,
                sequences_per_s=len(seqs) / seconds,
                residues_per_s=report.residues / seconds,
                gflops=flops / seconds / 1e9,
                mfu=flops / seconds / peak_total,
                busy_share=busy,
            )  # fmt: skip
        )
    base = report.rows[0].residues_per_s
    for row in report.rows:
        row.speedup = row.residues_per_s / base
        row.efficiency = row.speedup / (row.devices if cuda else 1)
    return report


def format_report(report: BenchReport) -> str:
    """The human-readable report: workload, peak, and the scaling table."""
    weights = "RANDOM weights" if report.random_weights else "real weights"
    kind = "CUDA devices" if report.device_kind == "cuda" else "simulated devices sharing the CPU"
    lines = [
        f"model {report.model} ({weights}), {report.dtype}, {kind}",
        f"workload: {report.sequences:,} sequences, {report.residues:,} residues; max_tokens {report.max_tokens}: "
        f"{report.batches} batches, padding {report.padding_fraction:.1%} of computed tokens",
        f"peak: {report.peak_gflops:,.0f} GFLOP/s (measured {report.dtype} matmul, one device)",
        "",
        f"{'devices':>7} {'seq/s':>9} {'residues/s':>11} {'GFLOP/s':>9} {'MFU':>6} {'speedup':>8} "
        f"{'efficiency':>10}  busy share per device",
    ]
    for r in report.rows:
        busy = " ".join(f"{share:.0%}" for share in r.busy_share.values())
        lines.append(
            f"{r.devices:>7} {r.sequences_per_s:>9,.1f} {r.residues_per_s:>11,.0f} {r.gflops:>9,.0f} {r.mfu:>6.1%} "
            f"{r.speedup:>7.2f}x {r.efficiency:>10.0%}  {busy}"
        )
    if report.device_kind == "simulated" and len(report.rows) > 1:
        lines += [
            "",
            "Simulated devices share the same CPU cores, so the ideal is a flat line (speedup 1.00x). Above it:",
            "single-threaded replicas use the cores better than one replica with every thread. Below it: the",
            "cost of more replicas than cores (threads contending, dispatch, caches).",
        ]
    return "\n".join(lines)


def plot_report(report: BenchReport, path: str) -> None:
    """Writes residues/s and efficiency against device count as a PNG (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = [r.devices for r in report.rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(counts, [r.residues_per_s for r in report.rows], marker="o", label="measured")
    ideal = [report.rows[0].residues_per_s * (k if report.device_kind == "cuda" else 1) for k in counts]
    ax.plot(counts, ideal, linestyle="--", label="ideal")
    ax.set_xlabel(f"devices ({report.device_kind})")
    ax.set_ylabel("residues/s")
    ax.set_title(f"{report.model}, {report.dtype}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
