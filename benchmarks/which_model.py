"""The "which model" table: each ESM-2 and ESM C size's shape, context, compute and weights, and (measured here
for the sizes named in --measure) residues/s of esm2cli's own forward on this machine's CPU.

GFLOP a residue is model_flops (esm2cli.runtime.modeled) of a 300-residue protein over its residues: the
projections, the feed-forward (4h GELU for ESM-2, SwiGLU for ESM C) and attention at that length. Weights are
the encoder's parameters (no LM head) in bfloat16 (2 bytes each; float32 doubles them). Residues/s: one
replica, float32, the same 4 synthetic proteins (median 300 residues) for every size, random weights
(--load-format dummy: the compute is that of the trained weights), after one warm-up batch.

    python benchmarks/which_model.py --measure esm2_t6_8M,esm2_t33_650M,esmc_300m,esmc_600m
"""

from __future__ import annotations

import argparse
import time

import torch

from esm2cli.config import BatchConfig, EmbedConfig, ModelConfig
from esm2cli.jobs.workload import synthetic_sequences
from esm2cli.model.architecture import ARCHITECTURES, ESMC_ARCHITECTURES, context_of, model_family
from esm2cli.model.load import load_model
from esm2cli.runtime.batching import plan_batches
from esm2cli.runtime.devices import Device
from esm2cli.runtime.modeled import model_flops
from esm2cli.runtime.replica import build_replicas

_LENGTH = 300


def encoder_parameters(layers: int, hidden: int, ffn_weights: int, vocab: int, esmc: bool) -> int:
    """Parameters of the encoder: token embeddings, per layer 4 projections (+ biases for ESM-2), the
    feed-forward, the norms; the final norm."""
    norms = (4 + 2) * hidden if esmc else 4 * hidden  # ESM C adds the q and k norms (scale only)
    biases = 0 if esmc else 4 * hidden + (4 * hidden + hidden)  # ESM-2: QKV/out, fc1 (4h) and fc2 biases
    final = hidden if esmc else 2 * hidden  # ESM C's final norm has no bias
    return vocab * hidden + layers * (4 * hidden * hidden + ffn_weights + norms + biases) + final


def shape_row(alias: str) -> dict:
    loaded = load_model(ModelConfig(model=alias, load_format="dummy", dtype="bfloat16"), weights=False)
    esmc = loaded.family == "esmc"
    layers, hidden = loaded.num_layers, loaded.hidden_size
    params = encoder_parameters(layers, hidden, loaded.ffn_weights, loaded.config.vocab_size, esmc)
    flops = model_flops([_LENGTH], layers, hidden, ffn_weights=loaded.ffn_weights) / _LENGTH
    return {"model": alias, "family": "ESM C" if esmc else "ESM-2", "width": hidden, "layers": layers,
            "context": context_of(loaded.family), "gflop_per_residue": flops / 1e9, "params": params,
            "weights_gb_bf16": 2 * params / 1e9}  # fmt: skip


def measure(alias: str, seqs: list[str]) -> float:
    """Residues/s of one float32 replica on the CPU over ``seqs`` (after a warm-up batch)."""
    loaded = load_model(ModelConfig(model=alias, load_format="dummy", dtype="float32"))
    (replica,) = build_replicas(loaded, [Device("cpu", "cpu")], EmbedConfig(truncate=context_of(loaded.family)),
                                BatchConfig(max_tokens=1024))  # fmt: skip
    batches = [[seqs[i] for i in b] for b in plan_batches([len(s) for s in seqs], 1024, 64)]
    replica.embed_batch(batches[0])
    start = time.perf_counter()
    for b in batches:
        replica.embed_batch(b)
    return sum(map(len, seqs)) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measure", default="", help="aliases to time on the CPU, comma-separated")
    args = parser.parse_args()
    seqs = [s for _, s in synthetic_sequences(4, seed=5, max_length=600)]
    rates = {alias: measure(alias, seqs) for alias in filter(None, args.measure.split(","))}
    print(f"CPU: {torch.get_num_threads()} threads; {len(seqs)} proteins, {sum(map(len, seqs)):,} residues")
    print("| model | family | width | layers | context (residues) | GFLOP a residue | weights (bf16) "
          "| residues/s, CPU |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for alias in [*ARCHITECTURES, *ESMC_ARCHITECTURES]:
        r = shape_row(alias)
        rate = f"{rates[alias]:,.0f}" if alias in rates else "not measured"
        assert model_family(alias) == ("esmc" if r["family"] == "ESM C" else "esm2")
        print(f"| `{alias}` | {r['family']} | {r['width']:,} | {r['layers']} | {r['context']:,} | "
              f"{r['gflop_per_residue']:.2f} | {r['weights_gb_bf16']:.2f} GB | {rate} |")  # fmt: skip


if __name__ == "__main__":
    main()
