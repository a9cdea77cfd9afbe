"""Residues/s of one replica across padded-token budgets and dtypes, on the same synthetic proteins.

python benchmarks/token_budget.py --model esm2_t30_150M --sequences 300 --budgets 512,1024,2048,4096,16384
"""

from __future__ import annotations

import argparse
import time

from esm2cli.config import BatchConfig, EmbedConfig, ModelConfig
from esm2cli.jobs.workload import synthetic_sequences
from esm2cli.runtime.batching import plan_batches
from esm2cli.runtime.devices import cuda_device_count
from esm2cli.runtime.engine import build_engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="esm2_t30_150M")
    parser.add_argument("--sequences", type=int, default=300)
    parser.add_argument("--budgets", default="512,1024,2048,4096,16384")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--devices", default=None, help="one device [default: cuda:0, else cpu (every core)]")
    args = parser.parse_args()
    seqs = [seq[:1022] for _, seq in synthetic_sequences(args.sequences, seed=0)]
    residues = sum(map(len, seqs))
    devices = args.devices or ("cuda:0" if cuda_device_count() else "cpu")
    budgets = [int(b) for b in args.budgets.split(",")]
    # Graphs up to the largest budget: under the default one a 65,536-token batch finds no bucket and runs eagerly.
    sizes = BatchConfig(batch_size=64, max_tokens=max(budgets))
    for n, dtype in enumerate(args.dtypes.split(",")):
        setup = build_engine(ModelConfig(model=args.model, load_format="dummy", dtype=dtype, devices=devices),
                             EmbedConfig(), sizes)  # fmt: skip
        replica = setup.replicas[0]
        if n == 0:
            print(f"{args.model}, {args.sequences} proteins, {residues:,} residues, on {replica.device.name}")
        replica.embed_batch(seqs[:4])  # warm-up
        for budget in budgets:
            batches = plan_batches([len(s) for s in seqs], budget, 64)
            start = time.perf_counter()
            for rows in batches:
                replica.embed_batch([seqs[i] for i in rows])
            seconds = time.perf_counter() - start
            print(
                f"{dtype:>9} max_tokens={budget:>6}: {residues / seconds:8,.0f} residues/s ({len(batches)} batches)",
                flush=True,
            )


if __name__ == "__main__":
    main()
