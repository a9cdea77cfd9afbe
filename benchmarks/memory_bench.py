"""Memory through a run: peak RSS and its slope for `esm2cli embed`, one subprocess a configuration.

Each configuration runs `python -m esm2cli embed` on synthetic proteins (esm2cli.jobs.workload) in a
subprocess of its own, whose resident set size is read from /proc/PID/status every ``--interval``
seconds; the peak is the kernel's own (ru_maxrss of the finished child, so no short spike is missed).
The slope is the growth of RSS over the second half of the run, in MB a minute: a run whose memory is
flat in the number of proteins shows ~0 there, and the peak of 32,000 proteins stays near that of 4,000.

Trees: ``--tree NAME=PATH`` runs the esm2cli found at PATH (a checkout, e.g. main exported with
``git archive main | tar -x -C /tmp/main``) by putting it first on PYTHONPATH, so that two versions are
measured side by side on the same input in one run.

    python benchmarks/memory_bench.py --tree before=/tmp/main --tree after=. \\
        --model tiny --sequences 4000 32000 [--per-token] [--dtype float32] [--json out.json]

``--model tiny`` builds the tests' tiny ESM-2 (3 layers, hidden 32) once; any other value is passed to
``-m`` with ``--load-format dummy`` (random weights: the compute and memory of the real ones).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from esm2cli.jobs.workload import write_fasta


@dataclass
class Sample:
    """One configuration's run: what ran and the memory it took."""

    tree: str
    model: str
    sequences: int
    per_token: bool
    dtype: str
    seconds: float
    cpu_seconds: float  # user + system: less sensitive than the wall time to other work on the machine
    peak_mb: float
    slope_mb_per_min: float
    rss_mb: list[tuple[float, float]]  # (seconds since start, RSS in MB)


def _rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def slope(samples: list[tuple[float, float]]) -> float:
    """Least-squares growth of RSS over the second half of the run, in MB a minute (0 with too few samples)."""
    if not samples:
        return 0.0
    half = [(t, r) for t, r in samples if t >= samples[-1][0] / 2]
    if len(half) < 3:
        return 0.0
    mean_t = sum(t for t, _ in half) / len(half)
    mean_r = sum(r for _, r in half) / len(half)
    var = sum((t - mean_t) ** 2 for t, _ in half)
    cov = sum((t - mean_t) * (r - mean_r) for t, r in half)
    return 60 * cov / var if var else 0.0


def run_one(
    command: list[str], env: dict, interval: float, cwd: str | None = None
) -> tuple[float, float, float, list[tuple[float, float]]]:
    """Runs ``command`` and samples its RSS; returns (seconds, CPU seconds, peak MB, samples)."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    samples: list[tuple[float, float]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(interval):
            rss = _rss_mb(proc.pid)
            if rss is not None:
                samples.append((time.perf_counter() - start, rss))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        done.set()
        sampler.join()
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.returncode:
        raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}):\n{stderr[-3000:]}")
    return seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, samples


def _tiny_model(folder: Path) -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from conftest import build_tiny_esm2

    return build_tiny_esm2(folder / "tiny")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", action="append", default=[], help="NAME=PATH of an esm2cli checkout (repeat)")
    parser.add_argument("--model", action="append", default=[], help="tiny, or an alias run with dummy weights")
    parser.add_argument("--sequences", type=int, nargs="+", default=[4000, 32000])
    parser.add_argument("--per-token", action="store_true")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--devices", default="auto")
    parser.add_argument("--interval", type=float, default=0.25, help="seconds between RSS samples")
    parser.add_argument("--work", help="folder for inputs and outputs (default: a temporary one)")
    parser.add_argument("--json", help="also write every sample here")
    args = parser.parse_args()
    trees = [t.split("=", 1) for t in args.tree] or [["here", str(Path(__file__).resolve().parent.parent)]]
    models = args.model or ["tiny"]

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        results: list[Sample] = []
        for model in models:
            source = ["-m", _tiny_model(work)] if model == "tiny" else ["-m", model, "--load-format", "dummy"]
            for n in args.sequences:
                fasta = work / f"proteins_{n}.fa"
                if not fasta.exists():
                    write_fasta(str(fasta), n)
                for name, path in trees:  # the trees one after the other on each input: side by side
                    # A fresh output each run: a complete one would be reused, not recomputed.
                    out = Path(tempfile.mkdtemp(dir=work)) / f"{name}_{model}_{n}.parquet"
                    command = [sys.executable, "-m", "esm2cli", "embed", str(fasta), "-o", str(out),
                               "--dtype", args.dtype, "--devices", args.devices, *source]  # fmt: skip
                    command += ["--per-token"] if args.per_token else []
                    env = {**os.environ, "PYTHONPATH": str(Path(path).resolve())}
                    try:
                        # cwd: `python -m` puts the working directory before PYTHONPATH on sys.path.
                        seconds, cpu, peak, samples = run_one(command, env, args.interval, cwd=path)
                    finally:
                        shutil.rmtree(out.parent)
                    result = Sample(
                        name, model, n, args.per_token, args.dtype, seconds, cpu, peak, slope(samples), samples
                    )
                    results.append(result)
                    print(
                        f"{name:>8} {model:>14} {n:>6} proteins per_token={args.per_token} dtype={args.dtype}: "
                        f"peak {peak:7.1f} MB, slope {result.slope_mb_per_min:+6.1f} MB/min, "
                        f"{seconds:6.1f} s ({cpu:6.1f} s CPU)",
                        flush=True,
                    )
        if args.json:
            Path(args.json).write_text(json.dumps([asdict(r) for r in results]))


if __name__ == "__main__":
    main()
