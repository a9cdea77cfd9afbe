"""What a run costs in memory, and what an interruption costs in compute, measured on real `esm2cli embed` processes.

    python -m benchmarks.trust_bench memory --model esm2_t6_8M --sequences 2000
    python -m benchmarks.trust_bench memory --model esm2_t33_650M --sequences 500 --max-length 200
    python -m benchmarks.trust_bench interrupt --model esm2_t12_35M --sequences 1500 --kill-at 0.6

`memory` runs `embed --per-token` in a child process and reports its peak RSS (ru_maxrss) beside the
output's size. `interrupt` runs the same command three times on one input: whole (its time T), then
SIGKILLed at `--kill-at` x T, then again; the rerun reports how many records it resumed and how many it
computed, and its time against T. Random weights of the named size: the compute of the real model.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from esm2cli.jobs.workload import synthetic_sequences


def write_input(path: Path, count: int, max_length: int, seed: int = 9) -> int:
    residues = 0
    with open(path, "w") as out:
        for rec_id, seq in synthetic_sequences(count, seed=seed, max_length=max_length):
            out.write(f">{rec_id}\n{seq}\n")
            residues += len(seq)
    return residues


def embed_cmd(fasta: Path, output: Path, model: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "esm2cli", "embed", str(fasta), "-o", str(output), "-m", model,
            "--load-format", "dummy", *extra]  # fmt: skip


def child_peak_rss(cmd: list[str]) -> tuple[float, float, str]:
    """Runs cmd in a fresh process; returns (seconds, peak RSS in GB of that process, stderr)."""
    wrapper = (
        "import resource, subprocess, sys; p = subprocess.run(sys.argv[1:], stderr=subprocess.PIPE, text=True); "
        "sys.stderr.write(p.stderr); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(p.returncode)"
    )
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"embed failed:\n{done.stderr}")
    return time.perf_counter() - start, int(done.stdout.split()[-1]) / 1e6, done.stderr


def memory(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        fasta, out = Path(tmp) / "in.fa", Path(tmp) / "out.parquet"
        residues = write_input(fasta, args.sequences, args.max_length)
        extra = ["--per-token", "--dtype", args.dtype, "-q"]
        if args.chunk_size:
            extra += ["--chunk-size", str(args.chunk_size)]
        seconds, rss, _ = child_peak_rss(embed_cmd(fasta, out, args.model, *extra))
        size = out.stat().st_size / 1e9
        print(f"{args.model}, --per-token, {args.sequences} proteins, {residues:,} residues, {args.dtype}: "
              f"peak RSS {rss:.2f} GB, output {size:.2f} GB, {seconds:.0f} s")  # fmt: skip


def interrupt(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        fasta = Path(tmp) / "in.fa"
        residues = write_input(fasta, args.sequences, args.max_length)
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        base = ["--dtype", args.dtype] if args.dtype else []
        whole_s, _, _ = child_peak_rss(embed_cmd(fasta, Path(tmp) / "whole.parquet", args.model, *base))
        out = Path(tmp) / "out.parquet"
        proc = subprocess.Popen(embed_cmd(fasta, out, args.model, *base, "-q"), env=env)
        try:
            proc.wait(timeout=args.kill_at * whole_s)
            raise SystemExit("the run ended before the kill (the machine sped up): use a larger --sequences")
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        work = Path(tmp) / "_out.parquet.parts"
        chunks = sorted(work.glob("chunk-*.parquet"))
        committed = sum(int(p.name.split("-")[2]) - int(p.name.split("-")[1]) for p in chunks)
        rerun_s, _, stderr = child_peak_rss(embed_cmd(fasta, out, args.model, *base))
        line = next(ln for ln in stderr.splitlines() if ln.startswith("embedded"))
        computed = int(line.split()[1].replace(",", ""))
        resumed = int(m.group(1).replace(",", "")) if (m := re.search(r"([\d,]+) resumed", line)) else 0
        lost_s = args.kill_at * whole_s - (whole_s - rerun_s)
        print(f"{args.model}, defaults, {args.sequences} proteins ({residues:,} residues): whole run {whole_s:.0f} s; "
              f"SIGKILL at {args.kill_at:.0%} ({args.kill_at * whole_s:.0f} s) with {len(chunks)} chunks "
              f"({committed} records) committed; rerun resumed {resumed}, computed {computed}, took {rerun_s:.0f} s "
              f"({rerun_s / whole_s:.0%} of the whole run): about {max(lost_s, 0):.0f} s of compute lost")  # fmt: skip
        print(f"rerun: {line}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    for name in ("memory", "interrupt"):
        p = sub.add_parser(name)
        p.add_argument("--model", default="esm2_t6_8M")
        p.add_argument("--sequences", type=int, default=2000)
        p.add_argument("--max-length", type=int, default=1022)
        p.add_argument("--dtype", default="auto" if name == "interrupt" else "float32")
    sub.choices["memory"].add_argument("--chunk-size", type=int, default=None)
    sub.choices["interrupt"].add_argument("--kill-at", type=float, default=0.6)
    args = parser.parse_args()
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    (memory if args.what == "memory" else interrupt)(args)


if __name__ == "__main__":
    main()
