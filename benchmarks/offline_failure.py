"""How a run without the weights fails offline: seconds, stderr lines, retries, lines printed twice.

Runs ``esm2cli embed`` on a one-protein FASTA with an empty Hugging Face cache, once with the hub
unreachable (HF_ENDPOINT on a closed loopback port) and once with HF_HUB_OFFLINE=1, for each source
tree given (e.g. a checkout of main beside this one), side by side in one run:

    git archive main | tar -x -C /tmp/main-src
    python benchmarks/offline_failure.py /tmp/main-src .
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = {
    "unreachable": {"HF_ENDPOINT": "http://127.0.0.1:9"},
    "HF_HUB_OFFLINE=1": {"HF_HUB_OFFLINE": "1"},
}


def run(tree: Path, case: dict, workdir: Path) -> dict:
    fasta = workdir / "one.fa"
    fasta.write_text(">p\nMKTAYIAKQR\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "ESM2CLI_", "TRANSFORMERS_"))}
    env.update(case, HF_HOME=str(workdir / "hf"), TORCH_HOME=str(workdir / "torch"), PYTHONPATH=str(tree))
    command = [sys.executable, "-m", "esm2cli", "embed", str(fasta), "-o", str(workdir / "o.parquet"),
               "-m", "esm2_t6_8M", "--devices", "cpu"]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True, cwd=workdir, timeout=300)
    seconds = time.perf_counter() - start
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    return {
        "seconds": seconds,
        "exit": proc.returncode,
        "stderr_lines": len(lines),
        "retries": sum("Retrying in" in line for line in lines),
        "repeated": len(lines) - len(set(lines)),
        "error": next((line for line in lines if line.startswith("Error:")), "")[:160],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trees", nargs="+", type=Path, help="source trees whose esm2cli to run")
    args = parser.parse_args()
    results = {}
    for name, case in CASES.items():
        for tree in args.trees:
            with tempfile.TemporaryDirectory() as tmp:
                results[name, tree] = run(tree.resolve(), case, Path(tmp))
    print(f"{'case':18} {'tree':28} {'seconds':>8} {'exit':>4} {'lines':>5} {'retries':>7} {'twice':>5}  error")
    for (name, tree), r in results.items():
        print(f"{name:18} {str(tree)[-28:]:28} {r['seconds']:8.1f} {r['exit']:4d} {r['stderr_lines']:5d} "
              f"{r['retries']:7d} {r['repeated']:5d}  {r['error']}")  # fmt: skip
    if len(args.trees) == 2:
        for name in CASES:
            before, after = results[name, args.trees[0]], results[name, args.trees[1]]
            print(f"{name}: {before['seconds'] / after['seconds']:.1f}x faster to fail")


if __name__ == "__main__":
    main()
