"""transformers' five-op ESM GELU against esm2cli's fused one: residues/s and agreement, alternating rounds.

Same random weights, same proteins, same device and dtype; each round times both models on every
protein (in token-budget batches), the order alternating, and the medians are compared.

    python benchmarks/gelu_ab.py --model esm2_t30_150M --sequences 60 --rounds 4
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import numpy as np
import torch

from esm2cli.config import EmbedConfig, ModelConfig
from esm2cli.jobs.workload import synthetic_sequences
from esm2cli.model.architecture import DTYPES, esm2_config
from esm2cli.model.load import random_model
from esm2cli.runtime.batching import plan_batches
from esm2cli.runtime.devices import cuda_device_count
from esm2cli.runtime.engine import build_engine
from esm2cli.runtime.replica import build_replicas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="esm2_t30_150M", help="an ESM-2 alias (random weights)")
    parser.add_argument("--sequences", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--devices", default=None, help="one device [default: cuda:0, else cpu (every core)]")
    args = parser.parse_args()
    seqs = [seq[:1022] for _, seq in synthetic_sequences(args.sequences, seed=5)]
    residues = sum(map(len, seqs))
    devices = args.devices or ("cuda:0" if cuda_device_count() else "cpu")
    setup = build_engine(ModelConfig(model=args.model, load_format="dummy", dtype=args.dtype, devices=devices),
                         EmbedConfig())  # fmt: skip
    device, dtype, fused = setup.devices[:1], setup.dtype, setup.model
    plain = replace(fused, model=random_model(esm2_config(args.model)).to(DTYPES[dtype]).eval())  # same seed
    replicas = {
        "transformers GELU": build_replicas(plain, device, EmbedConfig())[0],
        "fused GELU": setup.replicas[0],
    }
    budget = setup.batch.max_tokens
    batches = [[seqs[i] for i in rows] for rows in plan_batches([len(s) for s in seqs], budget, 64)]
    print(f"{args.model}, {dtype}, {device[0].name}: {len(seqs)} proteins, {residues:,} residues, {args.rounds} rounds")

    def run(replica) -> tuple[float, np.ndarray]:
        if device[0].is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        pooled = [replica.embed_batch(batch).pooled for batch in batches]  # pooling copies to the host: synced
        vectors = np.concatenate([next(iter(p.values())) for p in pooled])
        return residues / (time.perf_counter() - start), vectors

    rates: dict[str, list[float]] = {name: [] for name in replicas}
    vectors = {}
    for replica in replicas.values():
        replica.embed_batch(seqs[:4])  # warm-up
    for r in range(args.rounds):
        for name in list(replicas)[:: 1 if r % 2 == 0 else -1]:
            rate, vectors[name] = run(replicas[name])
            rates[name].append(rate)
    for name, values in rates.items():
        print(f"{name:>18}: median {statistics.median(values):8,.0f} residues/s  (rounds: "
              f"{', '.join(f'{v:,.0f}' for v in values)})")  # fmt: skip
    a, b = vectors.values()
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    ratio = statistics.median(rates["fused GELU"]) / statistics.median(rates["transformers GELU"])
    print(f"fused / transformers: {ratio:.3f}x; lowest cosine between their embeddings {cos.min():.6f}")


if __name__ == "__main__":
    main()
