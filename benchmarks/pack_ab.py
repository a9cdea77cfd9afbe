"""Batches packed as embed packs them against batches of similar length, side by side, on one forward.

Both plans cut the same proteins (in slices of --slice, each slice run by every runner in turn) under the same
token budget; esm2cli's forward (batch-invariant, as it runs
by default) computes every batch's tokens rounded up to whole 256-row matmul tiles, so a plan that fills its
batches computes fewer padding rows. Printed per plan: batches, computed rows over real tokens, residues/s;
then packed/sorted. The proteins' vectors are the same under both plans, bit for bit (checked). A third
runner, "dependent", is the batch-dependent forward (plain matmuls, no tiles) on the sorted batches, as
esm2cli ran before its forward was made batch-invariant: invariant-and-packed against it is what the default
costs, or saves, against the forward it replaced.

    python benchmarks/pack_ab.py --model esm2_t6_8M --dtype bfloat16 --sequences 200 --slice 50
    python benchmarks/pack_ab.py --model esmc_300m --dtype float32 --sequences 12 --max-length 400 --rounds 1
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from benchmarks.ab_runs import PLANS, side_by_side
from esm2cli.config import DEFAULT_BATCH_SIZE, BatchConfig, EmbedConfig, ModelConfig
from esm2cli.jobs.workload import synthetic_sequences
from esm2cli.model.invariant import padded_rows
from esm2cli.model.load import load_model
from esm2cli.runtime.batching import SPECIAL_TOKENS
from esm2cli.runtime.devices import Device
from esm2cli.runtime.replica import build_replicas


def _plan(name: str, part: list[str], budget: int) -> list[list[int]]:
    """A slice's batches under one plan, as the tokens of each member."""
    lengths = [len(s) for s in part]
    return [[lengths[i] + SPECIAL_TOKENS for i in b] for b in PLANS[name](lengths, budget, DEFAULT_BATCH_SIZE)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="esm2_t6_8M")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--budget", type=int, default=1024, help="tokens a batch (the CPU's default)")
    parser.add_argument("--sequences", type=int, default=200)
    parser.add_argument("--max-length", type=int, default=1022)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--slice", type=int, default=25, help="proteins planned and run together")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    seqs = [s for _, s in synthetic_sequences(args.sequences, seed=11, max_length=args.max_length)]
    loaded = load_model(ModelConfig(model=args.model, load_format="dummy", dtype=args.dtype))
    embed = EmbedConfig(truncate=max(map(len, seqs)))
    (replica,) = build_replicas(loaded, [Device("cpu", "cpu")], embed, BatchConfig(max_tokens=args.budget))
    replica.warm_up()
    # The proteins in slices, each slice planned by both plans and run by every runner in turn: a machine
    # whose load changes during the run slows all runners alike (one long unit per runner would not).
    slices = [seqs[i : i + args.slice] for i in range(0, len(seqs), args.slice)]

    def runner(plan: str, invariant: bool = True):
        def run(part: list[str]) -> np.ndarray:
            replica.forward.batch_invariant = invariant
            out = np.zeros((len(part), loaded.hidden_size), dtype=np.float32)
            try:
                for rows in PLANS[plan]([len(s) for s in part], args.budget, DEFAULT_BATCH_SIZE):
                    out[rows] = replica.embed_batch([part[i] for i in rows]).pooled[loaded.num_layers]
            finally:
                replica.forward.batch_invariant = True
            return out

        return run

    same = []
    forwards = {"sorted": runner("sorted"), "packed": runner("packed"), "dependent": runner("sorted", False)}

    def compare(outs: dict[str, np.ndarray]) -> None:
        same.append(np.array_equal(outs["sorted"], outs["packed"]))

    seconds = side_by_side(forwards, slices, rounds=args.rounds, device=torch.device("cpu"), compare=compare)
    plans = {name: [b for part in slices for b in _plan(name, part, args.budget)] for name in PLANS}
    real = sum(len(s) + SPECIAL_TOKENS for s in seqs)
    residues = args.rounds * sum(map(len, seqs))
    report = {"model": args.model, "dtype": args.dtype, "budget": args.budget, "sequences": len(seqs),
              "bit_identical": all(same), "packed_over_sorted": seconds["sorted"] / seconds["packed"],
              "packed_over_dependent": seconds["dependent"] / seconds["packed"],
              "dependent_residues_per_s": residues / seconds["dependent"]}  # fmt: skip
    for name, batches in plans.items():
        rows = sum(padded_rows(sum(b)) for b in batches)
        report[name] = {"batches": len(batches), "rows_over_real": rows / real,
                        "residues_per_s": residues / seconds[name]}  # fmt: skip
    if args.json:
        print(json.dumps(report, indent=1))
        return
    print(f"{args.model} {args.dtype}, {len(seqs)} proteins, budget {args.budget}, {args.rounds} rounds:")
    for name in PLANS:
        r = report[name]
        print(f"  {name:>6}: {r['batches']:4} batches, computed rows / real tokens {r['rows_over_real']:.3f},"
              f" {r['residues_per_s']:,.0f} residues/s")  # fmt: skip
    print(f"  dependent forward on the sorted batches: {report['dependent_residues_per_s']:,.0f} residues/s")
    print(f"  packed/sorted {report['packed_over_sorted']:.3f}x,"
          f" packed/dependent {report['packed_over_dependent']:.3f}x;"
          f" vectors bit-identical across plans: {report['bit_identical']}")  # fmt: skip


if __name__ == "__main__":
    main()
