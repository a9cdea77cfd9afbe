"""Time from the command to the first batch: `esm2cli embed` in fresh processes, with the phases on the way.

Each round starts `esm2cli embed` on a small FASTA (650M architecture, --load-format dummy) in a new
Python process that stops at its first batch, and reports: imports (esm2cli, then torch and
transformers), the rest up to the first batch (reading and checking the FASTA, building the model and
the replicas) and the total. `--old-dummy-init` runs the same command with the random weights drawn as
they were before (transformers' own initialisation in float32, then converted), side by side.

    python -m benchmarks.startup_bench --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from esm2cli.jobs.workload import synthetic_sequences

_CHILD = r"""
import json, os, sys, time
start = float(os.environ["STARTUP_T0"])
marks = {"python": time.time() - start}
import esm2cli.cli
marks["import esm2cli"] = time.time() - start
import esm2cli.model.load  # torch and transformers
marks["import torch, transformers"] = time.time() - start
from esm2cli.model import load as model
from esm2cli.runtime import replica
if os.environ.get("OLD_DUMMY_INIT"):
    import torch
    from transformers import EsmModel

    def random_model(config, seed=0, dtype=torch.float32):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return EsmModel(config, add_pooling_layer=False)

    model.random_model = random_model
original = model.load_model

def load_model(*args, **kwargs):
    marks["before loading"] = time.time() - start
    loaded = original(*args, **kwargs)
    marks["model loaded"] = time.time() - start
    return loaded

model.load_model = load_model

def first_batch(self, seqs, *args, **kwargs):
    marks["first batch"] = time.time() - start
    print("MARKS " + json.dumps(marks), flush=True)
    os._exit(0)

replica.Replica.embed_batch = first_batch
sys.argv = ["esm2cli", "embed", *sys.argv[1:]]
esm2cli.cli.cli()
"""


_MARKS = ("python", "import esm2cli", "import torch, transformers", "before loading", "model loaded", "first batch")


def _run(args: list[str], old_init: bool) -> dict:
    env = {**os.environ, "STARTUP_T0": repr(time.time())}
    if old_init:
        env["OLD_DUMMY_INIT"] = "1"
    done = subprocess.run([sys.executable, "-c", _CHILD, *args], env=env, capture_output=True, text=True)
    line = next((x for x in done.stdout.splitlines() if x.startswith("MARKS ")), None)
    if line is None:
        raise RuntimeError(f"no first batch: {done.stderr[-2000:]}")
    return json.loads(line[len("MARKS ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="esm2_t33_650M")
    parser.add_argument("--proteins", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--devices", default="auto")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="esm2cli-startup-") as work:
        fasta = Path(work) / "in.fasta"
        with open(fasta, "w") as out:
            for rec_id, seq in synthetic_sequences(args.proteins, seed=0):
                out.write(f">{rec_id}\n{seq}\n")
        cli_args = [str(fasta), "-o", str(Path(work) / "out.parquet"), "-m", args.model, "--load-format", "dummy",
                    "--devices", args.devices, "-q", "--overwrite"]  # fmt: skip
        rows = []
        for r in range(args.rounds):
            for old in (False, True)[:: 1 if r % 2 == 0 else -1]:
                rows.append((old, _run(cli_args, old)))
    print(f"esm2cli embed, {args.model} (dummy weights), {args.proteins} proteins, --devices {args.devices}: seconds")
    columns = ("python", "esm2cli", "torch+hf", "to load", "loaded", "1st batch")
    print(f"{'random weights':>30} " + " ".join(f"{c:>9}" for c in columns))
    for old, m in rows:
        name = "transformers init (before)" if old else "pooled fill (now)"
        print(f"{name:>30} " + " ".join(f"{m[k]:>9.2f}" for k in _MARKS))


if __name__ == "__main__":
    main()
