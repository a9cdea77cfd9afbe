"""esm2cli's own ESM C forward against transformers' EsmcModel, side by side in one run, on the same batches.

"ref" is transformers' ``EsmcModel`` on padded batches (SDPA, an attention mask, mean pooled on the device,
one copy back); "own" is a runtime replica of esm2cli's packed ESM C forward (CUDA graphs per token bucket on
a GPU in bf16/fp16). Both get the same random weights (``--load-format dummy``'s seeded draw, loaded into
EsmcModel with ``load_state_dict(strict=True)``) and the same batches, planned as the pipeline plans them, and run
in turn batch by batch so that a busy machine slows both alike. Printed: residues/s of each, own/ref, MFU
counted on real residues (model FLOPs of a SwiGLU block, esm2cli.runtime.modeled.model_flops) over the
card's published dense peak, host ms a forward (from the call to the moment the host waits for the copy
back), and the lowest cosine between the two forwards' pooled vectors.

``--own-only`` runs only esm2cli's forward (the 6B on one card: no room for two copies, and nothing to learn
from transformers' padded forward there).

    python benchmarks/esmc_ab.py --model esmc_300m --sequences 6 --max-length 300          # the CPU, float32
    python benchmarks/esmc_ab.py --model esmc_600m --dtype bfloat16 --sequences 1500 --json  # a GPU
    python benchmarks/esmc_ab.py --model esmc_6b --dtype bfloat16 --own-only --json
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
from esm2cli.model.architecture import esmc_alias
from esm2cli.model.esmc_load import esmc_config, random_weights
from esm2cli.model.load import LoadedModel, load_model, token_ids
from esm2cli.runtime.devices import Device
from esm2cli.runtime.modeled import model_flops
from esm2cli.runtime.replica import build_replicas


class RefForward:
    """transformers' EsmcModel on padded batches, mean pooled over residues on the device."""

    def __init__(self, loaded: LoadedModel, alias: str, device: torch.device, dtype: torch.dtype):
        from transformers import EsmcModel

        config = esmc_config(alias)
        config._attn_implementation = "sdpa"
        with torch.device("meta"):
            model = EsmcModel(config)
        weights = random_weights(config, lm_head=False, dtype=dtype)  # the same seeded draw as the dummy load
        model.load_state_dict(weights, strict=True, assign=True)
        inv_freq = model.rotary_emb.compute_default_rope_parameters(config)[0]
        model.rotary_emb.inv_freq, model.rotary_emb.original_inv_freq = inv_freq, inv_freq.clone()
        self.model = model.to(device).eval()
        self.loaded, self.device = loaded, device
        self.host_s: list[float] = []

    @torch.inference_mode()
    def __call__(self, seqs: list[str]) -> np.ndarray:
        start = time.perf_counter()
        ids = torch.from_numpy(token_ids(self.loaded, seqs)).to(self.device)
        mask = (ids != self.loaded.pad_id).long()
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        pooled = residue_mean(hidden, seqs)
        self.host_s.append(time.perf_counter() - start)
        return pooled.cpu().numpy()


class OwnForward:
    """A runtime replica of esm2cli's packed ESM C forward (graphs captured first on a GPU)."""

    def __init__(self, loaded: LoadedModel, device: Device, budget: int):
        (self.replica,) = build_replicas(loaded, [device], EmbedConfig(truncate=2046), BatchConfig(max_tokens=budget))
        self.replica.warm_up()
        self.layer = loaded.num_layers
        self.host_s: list[float] = []

    def __call__(self, seqs: list[str]) -> np.ndarray:
        start = time.perf_counter()
        out = self.replica.embed_batch(seqs).pooled[self.layer]
        graphs = self.replica.graphs
        self.host_s.append((graphs.launched_at if graphs is not None else self.replica.forward.launched_at) - start)
        return out


def run(loaded, alias, device: Device, seqs: list[str], *, budget: int, rounds: int, own_only: bool,
        plan: str = "sorted") -> dict:  # fmt: skip
    torch_device = torch.device(device.torch_device)
    batches = batches_of(seqs, budget, plan)
    forwards = {"own": OwnForward(loaded, device, budget)}
    if not own_only:
        forwards["ref"] = RefForward(loaded, alias, torch_device, loaded.forward.dtype)
    for b in batches[:2]:  # first calls allocate and pick kernels
        for fn in forwards.values():
            fn(b)
    for fn in forwards.values():
        fn.host_s.clear()
    worst = [1.0]

    def compare(outs: dict[str, np.ndarray]) -> None:
        if "ref" in outs:
            worst.append(lowest_cosine(outs["ref"], outs["own"]))

    seconds = side_by_side(forwards, batches, rounds=rounds, device=torch_device, compare=compare)
    residues = rounds * sum(len(s) for s in seqs)
    flops = rounds * model_flops(
        [len(s) for s in seqs], loaded.num_layers, loaded.hidden_size, ffn_weights=loaded.ffn_weights
    )
    row = {"budget": budget, "batches": len(batches), "residues": residues}
    for name, fn in forwards.items():
        row[f"{name}_residues_per_s"] = residues / seconds[name]
        row[f"{name}_flops_per_s"] = flops / seconds[name]
        row[f"{name}_host_ms"] = 1e3 * statistics.median(fn.host_s)
    if not own_only:
        row["own_over_ref"] = seconds["ref"] / seconds["own"]
        row["lowest_cosine"] = min(worst)
    graphs = forwards["own"].replica.graphs
    row["graph_batches"] = graphs.graph_batches if graphs is not None else 0
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="esmc_300m", choices=["esmc_300m", "esmc_600m", "esmc_6b"])
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on a GPU, float32 on the CPU")
    parser.add_argument("--device", default=None, help="cuda:0 or cpu (default: cuda:0 when there is one)")
    parser.add_argument("--budget", type=int, default=None, help="tokens a batch (default: 32768 GPU, 1024 CPU)")
    parser.add_argument("--sequences", type=int, default=None, help="proteins (default: 1500 GPU, 6 CPU)")
    parser.add_argument("--max-length", type=int, default=1022)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--plan", choices=sorted(PLANS), default="sorted", help="how batches are cut (ab_runs.PLANS)")
    parser.add_argument("--own-only", action="store_true", help="only esm2cli's forward (no transformers copy)")
    parser.add_argument(
        "--batch-dependent",
        action="store_true",
        help="esm2cli's forward without batch invariance (plain matmuls), to see what invariance costs",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    cuda = torch.cuda.is_available() if args.device is None else args.device.startswith("cuda")
    name = args.device or ("cuda:0" if cuda else "cpu")
    dtype = args.dtype or ("bfloat16" if cuda else "float32")
    n = args.sequences or (1500 if cuda else 6)
    budget = args.budget or (32768 if cuda else 1024)
    seqs = [s for _, s in synthetic_sequences(n, seed=11, max_length=args.max_length)]
    start = time.perf_counter()
    loaded = load_model(ModelConfig(model=args.model, load_format="dummy", dtype=dtype))
    load_s = time.perf_counter() - start
    loaded.forward.batch_invariant = not args.batch_dependent
    before = matmul_peak(torch.device(name), loaded.forward.dtype)
    row = run(loaded, esmc_alias(args.model), Device(name, name), seqs, budget=budget, rounds=args.rounds,
              own_only=args.own_only, plan=args.plan)  # fmt: skip
    card = card_name(torch.device(name)) if cuda else None
    published = GPU_PEAKS.get(card, {}).get(dtype) if card else None
    # The measured peak bounds what any forward can gain: own/ref can be at most peak / ref's FLOP/s.
    # Measured before and after (a shared machine's load changes during a long run): the higher one.
    peak = max(before, matmul_peak(torch.device(name), loaded.forward.dtype))
    for which in ("own", "ref"):
        if f"{which}_flops_per_s" in row:
            row[f"{which}_mfu_measured"] = row[f"{which}_flops_per_s"] / peak
            if published:
                row[f"{which}_mfu_published"] = row[f"{which}_flops_per_s"] / published
    report = {"model": args.model, "dtype": dtype, "device": name, "card": card, "sequences": n, "plan": args.plan,
              "threads": torch.get_num_threads(), "load_s": load_s, "published_peak_flops": published,
              "matmul_peak_flops": peak,
              **row}  # fmt: skip
    if args.json:
        print(json.dumps(report, indent=1))
        return
    line = f"{args.model} {dtype} on {name} ({card or 'CPU'}), {n} proteins ({args.plan} batches), "
    line += f"{row['residues']:,} residues"
    line += " (batch-dependent): " if args.batch_dependent else ": "
    line += f"own {row['own_residues_per_s']:,.1f} residues/s"
    if "ref_residues_per_s" in row:
        line += f", transformers {row['ref_residues_per_s']:,.1f}, own/ref {row['own_over_ref']:.2f}x"
        line += f", lowest cos {row['lowest_cosine']:.6f}"
        line += f"; MFU over the measured {peak / 1e9:,.0f} GFLOP/s matmul peak: own {row['own_mfu_measured']:.1%},"
        line += f" transformers {row['ref_mfu_measured']:.1%} (own/ref at most {1 / row['ref_mfu_measured']:.2f}x)"
    if published:
        line += f"; own MFU {row['own_mfu_published']:.1%} of the published {dtype} peak"
    line += f"; host ms a forward own {row['own_host_ms']:.2f}"
    print(line)


if __name__ == "__main__":
    main()
