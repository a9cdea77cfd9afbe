"""The ESM C step of gpu_check.sh: the 600M and the 6B in bf16 on one card, random weights.

The 600M side by side with transformers' EsmcModel on the same batches (esmc_ab.run); the 6B with esm2cli's
forward alone (one card holds one copy comfortably, and transformers' padded forward teaches nothing more).
Per model: residues/s, MFU counted on real residues (model FLOPs of a SwiGLU block) over the card's published
dense peak, host ms a forward, CUDA-graph batches, and for the 600M own/ref and the lowest cosine. Writes
``esmc-<size>.json`` under --out and prints one summary line per model.

    python3 benchmarks/esmc_gpu.py --out gpu-results
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch

from benchmarks.ab_runs import card_name
from benchmarks.esmc_ab import run
from esm2cli.config import GPU_PEAKS, ModelConfig
from esm2cli.jobs.workload import synthetic_sequences
from esm2cli.model.load import load_model
from esm2cli.runtime.devices import Device

# (alias, proteins, token budget, transformers beside it)
_STEPS = (("esmc_600m", 1500, 32768, True), ("esmc_6b", 400, 32768, False))


def one(alias: str, n: int, budget: int, with_ref: bool, out: Path) -> str:
    seqs = [s for _, s in synthetic_sequences(n, seed=11, max_length=1022)]
    start = time.perf_counter()
    loaded = load_model(ModelConfig(model=alias, load_format="dummy", dtype="bfloat16"))
    load_s = time.perf_counter() - start
    row = run(loaded, alias, Device("cuda:0", "cuda:0"), seqs, budget=budget, rounds=1, own_only=not with_ref)
    card = card_name(torch.device("cuda:0"))
    peak = GPU_PEAKS.get(card or "", {}).get("bfloat16")
    for which in ("own", "ref"):
        if peak and f"{which}_flops_per_s" in row:
            row[f"{which}_mfu_published"] = row[f"{which}_flops_per_s"] / peak
    (out / f"esmc-{alias.split('_')[1]}.json").write_text(json.dumps({"model": alias, "card": card,
                                                                      "load_s": load_s, **row}, indent=1))  # fmt: skip
    line = f"{alias} bf16 on {card}: own {row['own_residues_per_s']:,.0f} residues/s"
    if peak:
        line += f", MFU {row['own_mfu_published']:.1%} of the published peak"
    line += f", host ms a forward {row['own_host_ms']:.2f}, graph batches {row['graph_batches']}/{row['batches']}"
    if with_ref:
        line += f"; transformers {row['ref_residues_per_s']:,.0f}, own/ref {row['own_over_ref']:.2f}x"
        line += f", lowest cos {row['lowest_cosine']:.5f}"
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu-results")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for alias, n, budget, with_ref in _STEPS:
        print(one(alias, n, budget, with_ref, out), flush=True)
        gc.collect()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
