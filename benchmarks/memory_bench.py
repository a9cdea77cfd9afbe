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
        --model tiny --sequences 4000 32000 [--per-token] [--dtype float32 bfloat16] [--json out.json]
    python benchmarks/memory_bench.py --tree before=/tmp/main --tree after=. --case pooled-8M --case long-window \\
        --dtype float32 bfloat16

``--case`` runs a recorded configuration instead of --model/--sequences/--per-token: ``pooled-8M``
(esm2_t6_8M, 8,000 synthetic proteins, mean pooled) and ``long-window`` (esm2_t6_8M, one protein of 35,000
residues, ``--per-token --long-sequences window``: 35 windows stitched into one 45 MB float32 row). Each
dtype given is run in turn: ``--dtype auto`` is float32 on a CPU without AVX512-BF16 or AMX, so both are
measured whatever this machine has.

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

from esm2cli.jobs.workload import draw_sequences, write_fasta


@dataclass(frozen=True)
class Case:
    """A recorded configuration: the model, the input and the options that make it."""

    model: str
    sequences: int
    per_token: bool
    options: tuple[str, ...] = ()
    length: int | None = None  # one protein of this many residues instead of synthetic ones


CASES = {
    "pooled-8M": Case("esm2_t6_8M", 8000, False),
    "long-window": Case("esm2_t6_8M", 1, True, ("--long-sequences", "window"), length=35000),
}


@dataclass
class Sample:
    """One configuration's run: what ran and the memory it took."""

    tree: str
    case: str
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


def _write_input(path: Path, case: Case) -> None:
    if case.length is None:
        write_fasta(str(path), case.sequences)
        return
    # Distinct synthetic proteins end to end: UniProt-like residues, and no two windows alike (identical
    # windows would be embedded once).
    protein = "".join(draw_sequences(case.length // 100 + 1))[: case.length]
    with open(path, "w") as out:
        out.write(f">long_{case.length} synthetic protein, {case.length} aa\n")
        out.writelines(protein[i : i + 60] + "\n" for i in range(0, len(protein), 60))


def _cases(args: argparse.Namespace) -> list[tuple[str, Case]]:
    if args.case:
        return [(name, CASES[name]) for name in args.case]
    models = args.model or ["tiny"]
    return [(f"{m}-{n}", Case(m, n, args.per_token)) for m in models for n in args.sequences]


def _run_case(
    *, work: Path, name: str, case: Case, trees: list[list[str]], dtypes: list[str], args: argparse.Namespace
) -> list[Sample]:
    """Every dtype, and in it every tree one after the other on the same input: side by side."""
    source = ["-m", _tiny_model(work)] if case.model == "tiny" else ["-m", case.model, "--load-format", "dummy"]
    fasta = work / f"{name}.fa"
    if not fasta.exists():
        _write_input(fasta, case)
    results = []
    for dtype in dtypes:
        for tree, path in trees:
            # A fresh output each run: a complete one would be reused, not recomputed.
            out = Path(tempfile.mkdtemp(dir=work)) / f"{tree}_{name}.parquet"
            command = [sys.executable, "-m", "esm2cli", "embed", str(fasta), "-o", str(out),
                       "--dtype", dtype, "--devices", args.devices, *source, *case.options]  # fmt: skip
            command += ["--per-token"] if case.per_token else []
            env = {**os.environ, "PYTHONPATH": str(Path(path).resolve())}
            try:
                # cwd: `python -m` puts the working directory before PYTHONPATH on sys.path.
                seconds, cpu, peak, samples = run_one(command, env, args.interval, cwd=path)
            finally:
                shutil.rmtree(out.parent)
            result = Sample(tree, name, case.model, case.sequences, case.per_token, dtype, seconds, cpu, peak,
                            slope(samples), samples)  # fmt: skip
            results.append(result)
            print(
                f"{tree:>8} {name:>14} {case.model:>12} {case.sequences:>6} proteins per_token={case.per_token} "
                f"dtype={dtype}: peak {peak:7.1f} MB, slope {result.slope_mb_per_min:+6.1f} MB/min, "
                f"{seconds:6.1f} s ({cpu:6.1f} s CPU)",
                flush=True,
            )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", action="append", default=[], help="NAME=PATH of an esm2cli checkout (repeat)")
    parser.add_argument("--case", action="append", choices=sorted(CASES), default=[], help="a recorded case (repeat)")
    parser.add_argument("--model", action="append", default=[], help="tiny, or an alias run with dummy weights")
    parser.add_argument("--sequences", type=int, nargs="+", default=[4000, 32000])
    parser.add_argument("--per-token", action="store_true")
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], help="each is run in turn")
    parser.add_argument("--devices", default="auto")
    parser.add_argument("--interval", type=float, default=0.25, help="seconds between RSS samples")
    parser.add_argument("--work", help="folder for inputs and outputs (default: a temporary one)")
    parser.add_argument("--json", help="also write every sample here")
    args = parser.parse_args()
    trees = [t.split("=", 1) for t in args.tree] or [["here", str(Path(__file__).resolve().parent.parent)]]

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        results: list[Sample] = []
        for name, case in _cases(args):
            results += _run_case(work=work, name=name, case=case, trees=trees, dtypes=args.dtype, args=args)
        if args.json:
            Path(args.json).write_text(json.dumps([asdict(r) for r in results]))


if __name__ == "__main__":
    main()
