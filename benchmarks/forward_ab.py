"""esm2cli's packed forward against the transformers forward it replaced, side by side in one run, same batches.

"old" is transformers' ``EsmModel`` on padded batches (SDPA, mean pooled on the device, one copy back), as
esm2cli ran it before; "new" is a runtime replica with esm2cli's packed forward (CUDA graphs per token bucket
on a GPU in bf16/fp16), batch-invariant as it runs by default; "dep" the same replica with
``batch_invariant = False`` (plain matmuls over every packed row, attention groups padded to their widest
member, pooling by ``index_add_``): the batch-dependent forward it replaced, to price invariance.
All three get the same batches of the same random-weight model, planned as the pipeline
plans them (sorted by length, token budget), and run in turn batch by batch so that a busy machine slows
both alike. Printed per token budget: real residues/s of each, new/old, MFU counted on real residues (model
FLOPs: 2 x parameters + attention a residue) over the card's published dense peak and over the matmul peak
measured here, host time per forward (from the call to the moment the host waits for the copy back), and the
lowest cosine between the two forwards' embeddings.

    python benchmarks/forward_ab.py --model esm2_t6_8M --dtype float32                    # the CPU
    python benchmarks/forward_ab.py --model esm2_t33_650M --budgets 16384,32768,65536 --json   # a GPU, bf16
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from benchmarks.ab_runs import PLANS, batches_of, card_name, lowest_cosine, matmul_peak, residue_mean, side_by_side
from esm2cli.config import GPU_PEAKS, BatchConfig, EmbedConfig, ModelConfig
from esm2cli.jobs.workload import synthetic_sequences
from esm2cli.model.architecture import DTYPES
from esm2cli.model.load import LoadedModel, load_model, token_ids
from esm2cli.runtime.devices import Device
from esm2cli.runtime.modeled import model_flops
from esm2cli.runtime.replica import build_replicas


class OldForward:
    """transformers' EsmModel on padded batches, mean pooled on the device: esm2cli's forward before its own."""

    def __init__(self, loaded: LoadedModel, device: torch.device):
        self.loaded, self.device = loaded, device
        self.model = loaded.reference.to(device)
        self.layer = loaded.num_layers
        self.host_s: list[float] = []

    @torch.inference_mode()
    def __call__(self, seqs: list[str]) -> np.ndarray:
        start = time.perf_counter()
        ids = torch.from_numpy(token_ids(self.loaded, seqs))
        ids = (ids.pin_memory() if self.device.type == "cuda" else ids).to(self.device, non_blocking=True)
        mask = (ids != self.loaded.pad_id).long()
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        pooled = residue_mean(hidden, seqs)
        self.host_s.append(time.perf_counter() - start)
        return pooled.cpu().numpy()


class NewForward:
    """A runtime replica of esm2cli's packed forward (graphs captured first on a GPU)."""

    def __init__(self, loaded: LoadedModel, device: Device, budget: int, invariant: bool = True):
        batch = BatchConfig(max_tokens=budget)
        (self.replica,) = build_replicas(loaded, [device], EmbedConfig(), batch)
        self.invariant = invariant
        self.replica.forward.batch_invariant = invariant  # before graphs are captured
        self.replica.warm_up()
        self.layer = loaded.num_layers
        self.host_s: list[float] = []

    def __call__(self, seqs: list[str]) -> np.ndarray:
        start = time.perf_counter()
        self.replica.forward.batch_invariant = self.invariant  # CPU replicas share one model
        out = self.replica.embed_batch(seqs).pooled[self.layer]
        launched = self.replica.forward.launched_at if self.replica.graphs is None else self.replica.graphs.launched_at
        self.host_s.append(launched - start)
        return out


def run_budget(loaded, device: Device, seqs: list[str], budget: int, rounds: int, plan: str) -> dict:
    torch_device = torch.device(device.torch_device)
    batches = batches_of(seqs, budget, plan)
    old, new = OldForward(loaded, torch_device), NewForward(loaded, device, budget)
    dep = NewForward(loaded, device, budget, invariant=False)
    runners = (("old", old), ("new", new), ("dep", dep))
    for b in batches[:2]:  # first calls allocate and pick kernels
        for _, fn in runners:
            fn(b)
    for _, fn in runners:
        fn.host_s.clear()
    worst, drift = [1.0], [0.0]

    def compare(outs: dict[str, np.ndarray]) -> None:
        worst.append(lowest_cosine(outs["old"], outs["new"]))
        drift.append(float(np.abs(outs["new"] - outs["dep"]).max()))

    seconds = side_by_side(dict(runners), batches, rounds=rounds, device=torch_device, compare=compare)
    residues = rounds * sum(len(s) for s in seqs)
    flops = rounds * model_flops([len(s) for s in seqs], loaded.num_layers, loaded.hidden_size)
    return {
        "budget": budget, "batches": len(batches), "residues": residues,
        "old_residues_per_s": residues / seconds["old"], "new_residues_per_s": residues / seconds["new"],
        "new_over_old": seconds["old"] / seconds["new"],
        "dep_residues_per_s": residues / seconds["dep"],
        "invariant_cost": seconds["new"] / seconds["dep"] - 1,  # the invariant forward's extra time
        "invariant_vs_dependent_max_abs_diff": max(drift),
        "old_flops_per_s": flops / seconds["old"], "new_flops_per_s": flops / seconds["new"],
        "old_host_ms": 1e3 * statistics.median(old.host_s), "new_host_ms": 1e3 * statistics.median(new.host_s),
        "graph_batches": new.replica.graphs.graph_batches if new.replica.graphs else 0,
        "lowest_cosine": min(worst),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="esm2_t6_8M")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on a GPU, float32 on the CPU")
    parser.add_argument("--device", default=None, help="cuda:0 or cpu (default: cuda:0 when there is one)")
    parser.add_argument("--budgets", default=None, help="token budgets, comma-separated (default: the device's)")
    parser.add_argument("--sequences", type=int, default=None, help="proteins (default: 1500 GPU, 60 CPU)")
    parser.add_argument("--max-length", type=int, default=1022)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--plan", choices=sorted(PLANS), default="sorted", help="how batches are cut (ab_runs.PLANS)")
    parser.add_argument("--card", default=None, help="a key of GPU_PEAKS for the published peak (h100, h200...)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    cuda = torch.cuda.is_available() if args.device is None else args.device.startswith("cuda")
    name = args.device or ("cuda:0" if cuda else "cpu")
    device = Device(name, name)
    dtype = args.dtype or ("bfloat16" if cuda else "float32")
    budgets = [int(b) for b in (args.budgets or ("16384,32768,65536" if cuda else "4096")).split(",")]
    n = args.sequences or (1500 if cuda else 60)
    seqs = [s for _, s in synthetic_sequences(n, seed=11, max_length=args.max_length)]
    loaded = load_model(ModelConfig(model=args.model, load_format="dummy", dtype=dtype), keep_reference=True)
    torch_device = torch.device(name)
    peak = matmul_peak(torch_device, DTYPES[dtype])
    card = args.card or (card_name(torch_device) if cuda else None)
    published = GPU_PEAKS.get(card, {}).get(dtype) if card else None
    rows = [run_budget(loaded, device, seqs, b, args.rounds, args.plan) for b in budgets]
    for row in rows:
        for which in ("old", "new"):
            row[f"{which}_mfu_measured"] = row[f"{which}_flops_per_s"] / peak
            if published:
                row[f"{which}_mfu_published"] = row[f"{which}_flops_per_s"] / published
    report = {"model": args.model, "dtype": dtype, "device": name, "card": card, "sequences": n, "plan": args.plan,
              "matmul_peak_flops": peak, "published_peak_flops": published, "rows": rows}  # fmt: skip
    if args.json:
        print(json.dumps(report, indent=1))
        return
    print(f"{args.model} {dtype} on {name} ({card or 'CPU'}): {n} proteins ({args.plan} batches),"
          f" matmul peak {peak / 1e9:,.0f} GFLOP/s"
          + (f", published {published / 1e9:,.0f}" if published else ""))  # fmt: skip
    for r in rows:
        mfu = f"{r['new_mfu_published']:.1%} of published, " if published else ""
        print(f"  budget {r['budget']:>6}: old {r['old_residues_per_s']:>10,.0f}  new {r['new_residues_per_s']:>10,.0f}"
              f" residues/s  new/old {r['new_over_old']:.2f}x  new MFU {mfu}{r['new_mfu_measured']:.1%} of measured"
              f"  host ms/forward old {r['old_host_ms']:.2f} new {r['new_host_ms']:.2f}"
              f"  lowest cos {r['lowest_cosine']:.6f}")  # fmt: skip
        print(f"      batch-invariant {r['new_residues_per_s']:>10,.0f}"
              f"  batch-dependent {r['dep_residues_per_s']:>10,.0f}"
              f" residues/s: invariance costs {r['invariant_cost']:+.1%}"
              f" (max |diff| between them {r['invariant_vs_dependent_max_abs_diff']:.2e})")  # fmt: skip


if __name__ == "__main__":
    main()
