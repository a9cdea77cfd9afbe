"""Host work a CUDA-graph batch needs before its replay, measured on the CPU: pack the proteins and fill the
bucket's static buffers (esm2cli.model.packed.PackedBatch, esm2cli.model.graphs.GraphRunner._fill).

The copy of the filled buffers to the device is left out: on CUDA it is one asynchronous launch (pinned
memory), here a memcpy that would stand for nothing. Batches are the pipeline's at the GPU budget.

    python benchmarks/host_prep.py --model esm2_t6_8M --sequences 1500 --budget 32768
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from esm2cli.config import DEFAULT_BATCH_SIZE, ModelConfig
from esm2cli.jobs.workload import synthetic_sequences
from esm2cli.model.graphs import GraphRunner
from esm2cli.model.load import load_model
from esm2cli.model.packed import PackedBatch
from esm2cli.runtime.batching import plan_batches, token_buckets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="esm2_t6_8M")
    parser.add_argument("--sequences", type=int, default=1500)
    parser.add_argument("--budget", type=int, default=32768)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    loaded = load_model(ModelConfig(model=args.model, load_format="dummy", dtype="float32"))
    seqs = [s for _, s in synthetic_sequences(args.sequences, seed=11, max_length=1022)]
    plan = plan_batches([len(s) for s in seqs], args.budget, DEFAULT_BATCH_SIZE)
    batches = [[seqs[i] for i in b] for b in plan]
    runner = GraphRunner(loaded.forward, (loaded.num_layers,), "mean", buckets=token_buckets(args.budget),
                         max_seqs=DEFAULT_BATCH_SIZE, capture=False)  # fmt: skip
    runner.warmup()
    runner.sdpa_groups = False  # the graph path's host work: no attention groups, which only the SDPA path plans
    times = []
    with torch.inference_mode():
        for _ in range(args.rounds):
            for b in batches:
                start = time.perf_counter()
                batch = PackedBatch.from_sequences(b, loaded.token_lut, cls_id=loaded.cls_id, eos_id=loaded.eos_id,
                                                   mask_id=loaded.mask_id)  # fmt: skip
                static = runner._static[(runner.bucket_for(batch, False), False)]
                runner._fill(static, batch, False, copy=False)
                times.append(time.perf_counter() - start)
    tokens = statistics.median(sum(len(s) + 2 for s in b) for b in batches)
    print(
        f"{len(batches)} batches (median {tokens:,.0f} tokens) x {args.rounds}: host prep median "
        f"{statistics.median(times) * 1e3:.2f} ms, p90 {statistics.quantiles(times, n=10)[-1] * 1e3:.2f} ms"
    )


if __name__ == "__main__":
    main()
