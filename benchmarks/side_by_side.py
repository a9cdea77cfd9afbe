"""esm2cli against fair-esm and two plain transformers loops: same FASTA, same random weights, one run.

Methods, timed on the model compute (loading excluded), each on every protein of the input:
  esm2cli            esm2cli embed with its defaults (dtype auto, token budget auto)
  esm2cli-fp32       esm2cli embed --dtype float32
  esm2cli-1rep       esm2cli embed --devices cpu (one replica using every core, instead of one per core)
  fair-esm           fair-esm's extraction loop (esm-extract --include mean) with fair-esm's own ESM-2 code
  first-draft        64 sequences in file order, padded to the longest, default attention, fp32
  sorted-bf16        transformers, sorted into 4096-token batches, SDPA, weights converted to bf16 once

Agreement is each method's mean embedding against fair-esm fp32: the lowest cosine over proteins, raw
and after subtracting the file's mean fair-esm embedding (mean embeddings share a large common part).

    python benchmarks/side_by_side.py --model esm2_t30_150M --sequences 300 [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, EsmModel

from benchmarks.fair_esm_reference import extract_mean, fair_esm_model
from esm2cli import __version__
from esm2cli.config import BatchConfig, EmbedConfig, InputConfig, ModelConfig
from esm2cli.io.fasta import read_records
from esm2cli.jobs.bench import measure_matmul_peak, model_flops
from esm2cli.jobs.pipeline import embed_fasta
from esm2cli.jobs.workload import write_fasta
from esm2cli.model.architecture import esm2_config


def _saverandom_model(alias: str, directory: Path) -> str:
    from esm2cli.model.architecture import bundled_tokenizer
    from esm2cli.model.load import random_model

    random_model(esm2_config(alias)).save_pretrained(directory)
    bundled_tokenizer().save_pretrained(directory)
    return str(directory)


def _mean_pool(hidden: torch.Tensor, ids: torch.Tensor, tokenizer) -> np.ndarray:
    keep = (ids != tokenizer.pad_token_id) & (ids != tokenizer.cls_token_id) & (ids != tokenizer.eos_token_id)
    keep = keep.unsqueeze(-1).to(hidden.dtype)
    return ((hidden * keep).sum(1) / keep.sum(1)).float().numpy()


def first_draft(model_dir: str, records: list[tuple[str, str]]) -> tuple[dict, float]:
    """The loop a first draft writes: 64 at a time in file order, padded to the longest, fp32."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = EsmModel.from_pretrained(model_dir, add_pooling_layer=False).eval()
    out, start = {}, time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(records), 64):
            chunk = records[i : i + 64]
            enc = tokenizer([s for _, s in chunk], return_tensors="pt", padding=True, truncation=True, max_length=1024)
            hidden = model(**enc).last_hidden_state
            for (rec_id, _), vec in zip(chunk, _mean_pool(hidden, enc["input_ids"], tokenizer), strict=True):
                out[rec_id] = vec
    return out, time.perf_counter() - start


def sorted_bf16(model_dir: str, records: list[tuple[str, str]], max_tokens: int = 4096) -> tuple[dict, float]:
    """A plain but sensible loop: sorted by length, token-budget batches, SDPA, bf16 weights."""
    from esm2cli.runtime.batching import plan_batches

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = EsmModel.from_pretrained(model_dir, add_pooling_layer=False, attn_implementation="sdpa")
    model = model.to(torch.bfloat16).eval()
    out, start = {}, time.perf_counter()
    with torch.inference_mode():
        for rows in plan_batches([len(s) for _, s in records], max_tokens, 64):
            enc = tokenizer([records[i][1] for i in rows], return_tensors="pt", padding=True)
            hidden = model(**enc).last_hidden_state
            for i, vec in zip(rows, _mean_pool(hidden, enc["input_ids"], tokenizer), strict=True):
                out[records[i][0]] = vec
    return out, time.perf_counter() - start


def run_esm2cli(fasta: str, model_dir: str, work: Path, dtype: str, devices: str = "auto") -> tuple[dict, float, str]:
    import pyarrow.parquet as pq

    from esm2cli.io.parquet import read_metadata

    out = work / f"esm2cli-{dtype}-{devices}.parquet"
    summary = embed_fasta(
        fasta, out, model=ModelConfig(model=model_dir, dtype=dtype, devices=devices), embed=EmbedConfig(),
        batch=BatchConfig(), inputs=InputConfig(), overwrite=True,
    )  # fmt: skip
    table = pq.read_table(out)
    vectors = dict(zip(table["id"].to_pylist(), np.array(table["embedding"].to_pylist()), strict=True))
    return vectors, summary.seconds, read_metadata(out)["dtype"]


def agreement(got: dict, reference: dict, centre: np.ndarray) -> tuple[float, float]:
    ids = list(reference)
    a = np.stack([got[i] for i in ids]).astype(np.float64)
    b = np.stack([reference[i] for i in ids]).astype(np.float64)

    def cos(x, y):
        return float(((x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)).min())

    return cos(a, b), cos(a - centre, b - centre)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="esm2_t30_150M", help="an ESM-2 alias: its architecture, random weights")
    parser.add_argument("--sequences", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--input", help="a FASTA file instead of synthetic proteins")
    parser.add_argument("--skip", default="", help="comma-separated methods to leave out")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    work = Path(tempfile.mkdtemp(prefix="esm2cli-side-by-side-"))
    fasta = args.input or str(work / "proteins.fasta")
    if not args.input:
        write_fasta(fasta, args.sequences, seed=args.seed)
    records = [(r.id, r.sequence[:1022]) for r in read_records(fasta) if r.problem is None]
    residues = sum(len(s) for _, s in records)
    model_dir = _saverandom_model(args.model, work / "model")
    hf = EsmModel.from_pretrained(model_dir, add_pooling_layer=False)
    cfg = hf.config
    flops = model_flops([len(s) for _, s in records], cfg.num_hidden_layers, cfg.hidden_size)
    print(f"{len(records)} proteins, {residues:,} residues; {args.model} architecture, random weights; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}",
          flush=True)  # fmt: skip

    fair, alphabet = fair_esm_model(hf)
    start = time.perf_counter()
    reference = {k: v[cfg.num_hidden_layers].numpy() for k, v in extract_mean(fair, alphabet, fasta).items()}
    results = {"fair-esm": (reference, time.perf_counter() - start, "float32")}
    print(f"  fair-esm done in {results['fair-esm'][1]:.1f} s", flush=True)
    del fair
    for name, run in [
        ("esm2cli", lambda: run_esm2cli(fasta, model_dir, work, "auto")),
        ("esm2cli-fp32", lambda: run_esm2cli(fasta, model_dir, work, "float32")),
        ("esm2cli-1rep", lambda: run_esm2cli(fasta, model_dir, work, "auto", devices="cpu")),
        ("sorted-bf16", lambda: (*sorted_bf16(model_dir, records), "bfloat16")),
        ("first-draft", lambda: (*first_draft(model_dir, records), "float32")),
    ]:
        if name in skip:
            continue
        results[name] = run()
        print(f"  {name} done in {results[name][1]:.1f} s", flush=True)

    centre = np.stack(list(reference.values())).mean(0)
    peaks = {dtype: measure_matmul_peak("cpu", dtype) for dtype in {r[2] for r in results.values()}}
    rows = []
    for name, (vectors, seconds, dtype) in results.items():
        raw, centred = agreement(vectors, reference, centre)
        rate = residues / seconds
        rows.append({
            "method": name, "dtype": dtype, "seconds": seconds, "residues_per_s": rate,
            "gflops": flops / seconds / 1e9, "mfu": flops / seconds / peaks[dtype],
            "min_cosine": raw, "min_centred_cosine": centred,
        })  # fmt: skip
    by_name = {r["method"]: r for r in rows}
    print(f"\n{'method':>13} {'dtype':>9} {'residues/s':>11} {'vs first-draft':>15} {'vs fair-esm':>12} "
          f"{'MFU':>6} {'min cos':>9} {'centred':>9}")  # fmt: skip
    for r in rows:
        vs_draft = r["residues_per_s"] / by_name["first-draft"]["residues_per_s"] if "first-draft" in by_name else 0
        vs_fair = r["residues_per_s"] / by_name["fair-esm"]["residues_per_s"]
        print(f"{r['method']:>13} {r['dtype']:>9} {r['residues_per_s']:>11,.0f} {vs_draft:>14.2f}x {vs_fair:>11.2f}x "
              f"{r['mfu']:>6.1%} {r['min_cosine']:>9.6f} {r['min_centred_cosine']:>9.6f}")  # fmt: skip
    print("\nmeasured matmul peak: " + ", ".join(f"{d} {p / 1e9:,.0f} GFLOP/s" for d, p in peaks.items()))
    if args.json:
        meta = {"esm2cli": __version__, "torch": torch.__version__, "proteins": len(records), "residues": residues,
                "model": args.model, "peaks_gflops": {d: p / 1e9 for d, p in peaks.items()}}  # fmt: skip
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
