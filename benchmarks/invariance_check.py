"""One protein in three batch compositions, bit for bit, and what batch invariance costs, on one device.

The probe (300 residues) is embedded alone, at the end of a batch of short proteins and in the middle of a
batch of long ones, through a runtime replica (CUDA graphs per token bucket on a GPU in bf16/fp16) and through
the eager forward; every vector must equal the first bit for bit. Then the same batches of synthetic proteins
run through the batch-invariant forward (the default) and the batch-dependent one it replaced, in turn batch
by batch: residues/s of each. Exit 1 when a vector moved.

    python benchmarks/invariance_check.py                                          # a GPU: 650M, bf16
    python benchmarks/invariance_check.py --device cpu --model esm2_t6_8M --dtype float32 --sequences 40
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from benchmarks.forward_ab import NewForward
from esm2cli.config import DEFAULT_BATCH_SIZE, ModelConfig
from esm2cli.jobs.workload import synthetic_sequences
from esm2cli.model.load import load_model
from esm2cli.runtime.batching import plan_batches
from esm2cli.runtime.devices import Device


def compositions(probe: str, seqs: list[str]) -> list[tuple[list[str], int]]:
    """The probe alone, last among short proteins, in the middle of long ones: (batch, probe's index)."""
    short = sorted(seqs, key=len)[:20]
    long = sorted(seqs, key=len)[-8:]
    return [([probe], 0), ([*short, probe], len(short)), ([*long[:4], probe, *long[4:]], 4)]


def probe_check(runner: NewForward, probe: str, seqs: list[str]) -> list[float]:
    """Max |diff| of the probe's vector in each composition against the first (replica path, then eager)."""
    diffs, first = [], None
    forward, layer = runner.replica.forward, runner.layer
    for batch, at in compositions(probe, seqs):
        for vector in (runner(batch)[at], forward.embed(runner.replica.pack(batch), (layer,)).pooled[layer][at]):
            first = vector if first is None else first
            diffs.append(float(np.abs(vector - first).max()))
    return diffs


def speed(runners: dict[str, NewForward], batches: list[list[str]], rounds: int) -> dict[str, float]:
    """Residues/s of each runner on the same batches, run in turn batch by batch."""
    for b in batches[:2]:
        for fn in runners.values():
            fn(b)
    seconds = dict.fromkeys(runners, 0.0)
    for _ in range(rounds):
        for b in batches:
            for name, fn in runners.items():
                start = time.perf_counter()
                fn(b)
                seconds[name] += time.perf_counter() - start
    residues = rounds * sum(len(s) for b in batches for s in b)
    return {name: residues / s for name, s in seconds.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="esm2_t33_650M")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on a GPU, float32 on the CPU")
    parser.add_argument("--device", default=None, help="default: cuda:0 when there is one")
    parser.add_argument("--budget", type=int, default=8192, help="token budget of a batch")
    parser.add_argument("--sequences", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    name = args.device or ("cuda:0" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if name.startswith("cuda") else "float32")
    loaded = load_model(ModelConfig(model=args.model, load_format="dummy", dtype=dtype))
    device = Device(name, name)
    seqs = [s for _, s in synthetic_sequences(args.sequences, seed=17, max_length=1022)]
    probe = next(s for _, s in synthetic_sequences(200, seed=3, max_length=1022) if len(s) >= 300)[:300]
    inv = NewForward(loaded, device, args.budget)
    dep = NewForward(loaded, device, args.budget, invariant=False)
    diffs = probe_check(inv, probe, seqs)
    batches = [[seqs[i] for i in b] for b in plan_batches([len(s) for s in seqs], args.budget, DEFAULT_BATCH_SIZE)]
    rates = speed({"invariant": inv, "dependent": dep}, batches, args.rounds)
    report = {
        "model": args.model, "dtype": dtype, "device": name, "torch": torch.__version__,
        "probe_max_abs_diff": diffs, "bitwise": max(diffs) == 0.0,
        "graph_batches": inv.replica.graphs.graph_batches if inv.replica.graphs else 0,
        "invariant_residues_per_s": rates["invariant"], "dependent_residues_per_s": rates["dependent"],
        "invariant_cost": rates["dependent"] / rates["invariant"] - 1,
    }  # fmt: skip
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"batch invariance, {args.model} {dtype} on {name}: one protein in 3 batch compositions (replica and"
              f" eager), max |diff| {max(diffs):.3g} ({'bitwise equal' if report['bitwise'] else 'MOVED'});"
              f" residues/s invariant {rates['invariant']:,.0f}, batch-dependent {rates['dependent']:,.0f}"
              f" (invariance costs {report['invariant_cost']:+.1%})")  # fmt: skip
    return 0 if report["bitwise"] else 1


if __name__ == "__main__":
    sys.exit(main())
