"""Masked-LM scoring, side by side in one run: esm2cli's batched masked copies against one masked copy per pass.

Every method computes the pseudo-log-likelihood of the same proteins with the same random weights (the
named ESM-2 size, as --load-format dummy builds it); a PLL needs one masked copy per residue, exactly the
inputs a masked-marginal scan of every position needs. Timed on the compute only (loading excluded):

  esm2cli             scoring.pseudo_log_likelihoods over an Engine on --devices (auto: one replica per GPU,
                      or one single-threaded replica per CPU core): the distinct masked copies sorted and
                      batched under the token budget, spread over the replicas
  loop                the same model and LM head (the same esm2cli replica), one masked copy per forward pass,
                      with torch's default threads (every core)
  fair-esm            fair-esm's own ESM2 with the same weights, one masked copy per forward pass, as its
                      variant-prediction example loops, torch's default threads (float32 only; needs fair-esm)
  esm2cli-1core       esm2cli on one replica with one thread (CPU only) ...
  loop-1core          ... against the loop with one thread: what batching alone gains on the same core

The methods run in turn, --rounds times over (each round runs every method once, so that a machine whose
load drifts weighs on all of them alike); each method's best round counts. Ratios are each method's time
over esm2cli's (a -1core method's over esm2cli-1core's). Agreement: the largest PLL difference from the loop.

    python -m benchmarks.score_bench --model esm2_t12_35M --proteins 3 --length 120
    python -m benchmarks.score_bench --model esm2_t33_650M --dtype bfloat16 --methods esm2cli,loop   # a GPU
"""

from __future__ import annotations

import argparse
import platform
import random
import time

import torch

from esm2cli.config import DEFAULT_MAX_TOKENS, BatchConfig, EmbedConfig, ModelConfig
from esm2cli.jobs.mutants import AMINO_ACIDS
from esm2cli.jobs.scoring import pseudo_log_likelihoods
from esm2cli.model.load import load_model
from esm2cli.runtime.devices import resolve_devices, resolve_dtype
from esm2cli.runtime.engine import Engine
from esm2cli.runtime.replica import build_replicas

_CPU_THREADS = torch.get_num_threads()


def proteins(count: int, length: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(AMINO_ACIDS) for _ in range(length)) for _ in range(count)]


def batched(loaded, devices: str, seqs: list[str], batch: BatchConfig, threads: int | None = None):
    replicas = build_replicas(loaded, resolve_devices(devices), EmbedConfig())
    for replica in replicas:
        replica.cpu_threads = threads or replica.cpu_threads
    with Engine(replicas) as engine:
        pseudo_log_likelihoods(engine, [seqs[0][:20]], loaded.token_lut, batch)  # warm-up
        start = time.perf_counter()
        plls = pseudo_log_likelihoods(engine, seqs, loaded.token_lut, batch)
        if any(d.is_cuda for d in resolve_devices(devices)):
            torch.cuda.synchronize()
        return plls, time.perf_counter() - start


def one_per_pass(loaded, device: str, seqs: list[str], threads: int | None = None) -> tuple[list[float], float]:
    torch.set_num_threads(threads or _CPU_THREADS)  # the engine's CPU workers may have lowered it
    replica = build_replicas(loaded, resolve_devices(device)[:1], EmbedConfig())[0]
    replica.cpu_threads = None
    lut = loaded.token_lut
    replica.lm_log_probs([(seqs[0][:20], 0, [0])])  # warm-up
    start = time.perf_counter()
    plls = [sum(float(replica.lm_log_probs([(s, i, [i])])[0][0, lut[ord(aa)]]) for i, aa in enumerate(s)) for s in seqs]
    return plls, time.perf_counter() - start


def fair_esm(loaded, device: str, seqs: list[str]) -> tuple[list[float], float]:
    from benchmarks.fair_esm_reference import fair_esm_model, masked_log_probs, pseudo_log_likelihood

    torch.set_num_threads(_CPU_THREADS)
    model, alphabet = fair_esm_model(loaded.reference, loaded.reference_lm_head)
    model = model.to(resolve_devices(device)[0].torch_device)
    masked_log_probs(model, alphabet, seqs[0][:20], 0)  # warm-up
    start = time.perf_counter()
    plls = [pseudo_log_likelihood(model, alphabet, s) for s in seqs]
    return plls, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="esm2_t12_35M")
    parser.add_argument("--proteins", type=int, default=3)
    parser.add_argument("--length", type=int, default=120)
    parser.add_argument("--dtype", default="float32", help="auto, float32, bfloat16 (the same for every method)")
    parser.add_argument("--devices", default="auto")
    parser.add_argument("--max-tokens", type=int, default=None, help="[default: as esm2cli score]")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--methods", default="esm2cli,loop,fair-esm,esm2cli-1core,loop-1core")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    devices = resolve_devices(args.devices)
    on_cuda = any(d.is_cuda for d in devices)
    dtype = resolve_dtype(args.dtype, devices)
    methods = args.methods.split(",")
    if dtype != "float32" and "fair-esm" in methods:
        methods.remove("fair-esm")  # fair-esm's ESM2 is compared in float32 only
    if on_cuda:
        methods = [m for m in methods if not m.endswith("-1core")]
    max_tokens = args.max_tokens or DEFAULT_MAX_TOKENS["cuda" if on_cuda else "cpu"]
    batch = BatchConfig(batch_size=args.batch_size, max_tokens=max_tokens)
    seqs = proteins(args.proteins, args.length)
    inputs = sum(map(len, seqs))
    loaded = load_model(
        ModelConfig(model=args.model, load_format="dummy", dtype=dtype), lm_head=True, keep_reference=True
    )
    where = torch.cuda.get_device_name(0) if on_cuda else f"{platform.processor() or 'CPU'}, {_CPU_THREADS} threads"
    print(
        f"score bench: {args.model} (random weights), {dtype}, {args.proteins} proteins x {args.length} residues "
        f"= {inputs:,} masked copies (PLL), on {where}; max_tokens {max_tokens}, batch size {args.batch_size}",
        flush=True,
    )
    first_device = "cuda:0" if on_cuda else "cpu"
    runs = {
        "esm2cli": lambda: batched(loaded, args.devices, seqs, batch),
        "esm2cli-1core": lambda: batched(loaded, "cpu", seqs, batch, threads=1),
        "loop": lambda: one_per_pass(loaded, first_device, seqs),
        "loop-1core": lambda: one_per_pass(loaded, first_device, seqs, threads=1),
        "fair-esm": lambda: fair_esm(loaded, first_device, seqs),
    }
    results: dict[str, tuple[list[float], float]] = {}
    for round_ in range(1, args.rounds + 1):
        for name in methods:
            plls, seconds = runs[name]()
            if name not in results or seconds < results[name][1]:
                results[name] = (plls, seconds)
            print(f"  round {round_} {name:<13} {seconds:8.2f} s  {inputs / seconds:9,.1f} masked copies/s", flush=True)
    print("best round of each:")
    reference = results.get("loop") or results.get("fair-esm")
    for name, (plls, seconds) in results.items():
        base_name = "esm2cli-1core" if name.endswith("-1core") else "esm2cli"
        base = results.get(base_name)
        ratio = f"{seconds / base[1]:6.2f}x {base_name}'s time" if base else ""
        agree = (
            f"max |PLL - loop| {max(abs(a - b) for a, b in zip(plls, reference[0], strict=True)):.2e}"
            if reference
            else ""
        )
        rate = f"{inputs / seconds:9,.1f} masked copies/s"
        print(f"  {name:<13} {seconds:8.2f} s {rate}  {ratio}  {agree}", flush=True)


if __name__ == "__main__":
    main()
