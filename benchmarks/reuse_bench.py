"""--reuse against a fresh run, and the server's cache hit against a miss, measured side by side in one run.

    python -m benchmarks.reuse_bench release --model esm2_t6_8M --old 900 --edited 10 --added 100
    python -m benchmarks.reuse_bench scale --rows 10000 100000
    python -m benchmarks.reuse_bench cache --model esm2_t12_35M --requests 40

`release`: an old release of N proteins is embedded (not timed); the new release is the old one with
``--edited`` proteins changed by one residue, plus ``--added`` new ones. Then, alternating, a fresh run of
the new release and a run with ``--reuse old.parquet``, each a real ``esm2cli embed`` process (startup,
model load and all), float32 on the CPU; their time and peak RSS, and the largest difference between the
two outputs.

`scale`: what reuse costs when the earlier output is large: an earlier output of R rows (random vectors of
the 8M model's width, written with the pipeline's own writer, with the identity of the run that reuses it)
and a new input of those R sequences plus 100 new ones; the reuse run's time and peak RSS against a run
that embeds only the 100 new ones (the same process startup and model). Also the index alone: its build
time and its bytes per row.

`cache`: ``esm2cli serve``'s app in this process (an ASGI client, no network): /predict latency of
sequences never seen (a miss: the model runs) against the same sequences again (a hit).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from esm2cli.jobs.workload import synthetic_sequences


def write_fasta(path: Path, records: list[tuple[str, str]]) -> None:
    with open(path, "w") as out:
        out.writelines(f">{rid}\n{seq}\n" for rid, seq in records)


def timed_embed(fasta: Path, output: Path, model: str, *extra: str) -> tuple[float, float, str]:
    """Runs ``esm2cli embed`` in a child; returns (seconds, peak RSS in MB, stderr)."""
    cmd = [sys.executable, "-m", "esm2cli", "embed", str(fasta), "-o", str(output), "-m", model, "--load-format",
           "dummy", "--dtype", "float32", "--devices", "cpu", "--overwrite", *extra]  # fmt: skip
    output.unlink(missing_ok=True)  # a rerun of the same command would be "already complete"
    start = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr = child.stderr.read()
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{stderr}")
    return seconds, usage.ru_maxrss / 1024, stderr.strip().splitlines()[-1]


def edit(seq: str) -> str:
    return seq[:5] + ("W" if seq[5] != "W" else "A") + seq[6:]


def release(args) -> None:
    import pyarrow.parquet as pq

    seqs = list(synthetic_sequences(args.old + args.added, seed=4, max_length=args.max_length))
    old = seqs[: args.old]
    step = max(1, args.old // max(1, args.edited))
    new = [(rid, edit(s) if i % step == 0 and i // step < args.edited else s) for i, (rid, s) in enumerate(old)]
    new += seqs[args.old :]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_fasta(tmp / "old.fa", old)
        write_fasta(tmp / "new.fa", new)
        timed_embed(tmp / "old.fa", tmp / "old.parquet", args.model)
        times: dict[str, list[tuple[float, float]]] = {"fresh": [], "reuse": []}
        for _ in range(args.rounds):
            t, rss, _ = timed_embed(tmp / "new.fa", tmp / "fresh.parquet", args.model)
            times["fresh"].append((t, rss))
            t, rss, line = timed_embed(
                tmp / "new.fa", tmp / "reuse.parquet", args.model, "--reuse", str(tmp / "old.parquet")
            )
            times["reuse"].append((t, rss))
        a, b = pq.read_table(tmp / "fresh.parquet"), pq.read_table(tmp / "reuse.parquet")
        diff = np.abs(np.array(a["embedding"].to_pylist()) - np.array(b["embedding"].to_pylist())).max()
        same = all(a[c].equals(b[c]) for c in a.column_names if c != "embedding")
    residues = sum(len(s) for _, s in new)
    print(f"{args.model}, float32, cpu: {args.old} old proteins -> {len(new)} new ({args.edited} edited, "
          f"{args.added} added; {residues:,} residues), {args.rounds} rounds alternating, "
          "whole processes:")  # fmt: skip
    for name, runs in times.items():
        print(
            f"  {name:6s} " + ", ".join(f"{t:.1f} s" for t, _ in runs) + f"; peak RSS {max(r for _, r in runs):.0f} MB"
        )
    ratio = min(t for t, _ in times["reuse"]) / min(t for t, _ in times["fresh"])
    print(f"  reuse / fresh (best of each): {ratio:.2f}; max |difference| {diff:.2e}; other columns equal: {same}")
    print(f"  reuse summary: {line}")


def _old_output(path: Path, seqs: list[tuple[str, str]], metadata: dict, hidden: int, layers: list[int]) -> None:
    """An earlier output of these sequences with random vectors, written as the pipeline writes its chunks."""
    from esm2cli.io.parquet import EmbeddingWriter
    from esm2cli.io.reuse import sequence_sha256
    from esm2cli.io.schema import Rows, build_schema

    schema = build_schema(hidden, layers, False, metadata)
    writer = EmbeddingWriter(path, schema, hidden, layers)
    rng = np.random.default_rng(0)
    for start in range(0, len(seqs), 4096):
        part = seqs[start : start + 4096]
        vectors = {layers[0]: rng.standard_normal((len(part), hidden), dtype=np.float32)}
        hashes = [sequence_sha256(s[:1022]) for _, s in part]
        writer.write(Rows([r for r, _ in part], [""] * len(part), [len(s) for _, s in part],
                          [len(s) > 1022 for _, s in part], vectors, {}, sequence_sha256=hashes))  # fmt: skip
    writer.commit()


def scale(args) -> None:
    from esm2cli.io.parquet import read_metadata
    from esm2cli.io.reuse import ReuseIndex, Wanted

    model = "esm2_t6_8M"
    print(f"{model} (hidden 320), float32, cpu; whole processes:")
    for rows in args.rows:
        seqs = list(synthetic_sequences(rows + 100, seed=6, max_length=400))
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            write_fasta(tmp / "probe.fa", seqs[:2])
            timed_embed(tmp / "probe.fa", tmp / "probe.parquet", model)  # the identity a run of this model records
            metadata = read_metadata(tmp / "probe.parquet")
            _old_output(tmp / "old.parquet", seqs[:rows], metadata, 320, metadata["layers"])
            write_fasta(tmp / "new.fa", seqs)
            write_fasta(tmp / "added.fa", seqs[rows:])
            base_t, base_rss, _ = timed_embed(tmp / "added.fa", tmp / "added.parquet", model)
            t, rss, line = timed_embed(tmp / "new.fa", tmp / "new.parquet", model, "--reuse", str(tmp / "old.parquet"))
            start = time.perf_counter()
            index = ReuseIndex(
                [str(tmp / "old.parquet")], metadata["identity"], Wanted(tuple(metadata["layers"]), 320, False, False)
            )
            build = time.perf_counter() - start
            per_row = (index._hi.nbytes + index._lo.nbytes + index._loc.nbytes) / len(index)
            index.close()
            size = (tmp / "old.parquet").stat().st_size / 1e6
        print(f"  {rows:,} earlier rows ({size:.0f} MB) + 100 new: reuse run {t:.1f} s, peak RSS {rss:.0f} MB; "
              f"the 100 new alone {base_t:.1f} s, {base_rss:.0f} MB; index {build:.2f} s, "
              f"{per_row:.0f} bytes/row")  # fmt: skip
        print(f"    {line}")


def cache(args) -> None:
    from fastapi.testclient import TestClient

    from esm2cli.config import EmbedConfig, ModelConfig, ServeConfig
    from esm2cli.serve.app import create_app

    model = ModelConfig(model=args.model, load_format="dummy", dtype="float32", devices="cpu")
    app = create_app(ServeConfig(public_metrics=True, max_wait_ms=0), model, EmbedConfig())
    seqs = [s for _, s in synthetic_sequences(args.requests, seed=8, max_length=600)]

    def latency(client: TestClient, seq: str) -> float:
        start = time.perf_counter()
        response = client.post("/predict", json={"sequence": seq})
        assert response.status_code == 200, response.text
        return time.perf_counter() - start

    with TestClient(app) as client:
        while client.get("/health").status_code != 200:
            time.sleep(0.1)
        miss = [latency(client, s) for s in seqs]
        hit = [latency(client, s) for s in seqs]
        metrics = {line.split()[0]: line.split()[1] for line in client.get("/metrics").text.splitlines()
                   if line.startswith("esm2cli_cache_")}  # fmt: skip
    mean_len = statistics.mean(len(s) for s in seqs)
    print(f"{args.model}, float32, cpu, /predict one sequence (mean {mean_len:.0f} residues), {len(seqs)} each:")
    slow, fast = statistics.median(miss), statistics.median(hit)
    print(f"  miss (the model runs): median {slow * 1e3:.1f} ms; hit: median {fast * 1e3:.2f} ms ({slow / fast:.0f}x)")
    print(f"  /metrics: {json.dumps(metrics)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("release")
    p.add_argument("--model", default="esm2_t6_8M")
    p.add_argument("--old", type=int, default=900)
    p.add_argument("--edited", type=int, default=10)
    p.add_argument("--added", type=int, default=100)
    p.add_argument("--max-length", type=int, default=600)
    p.add_argument("--rounds", type=int, default=2)
    p = sub.add_parser("scale")
    p.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000])
    p = sub.add_parser("cache")
    p.add_argument("--model", default="esm2_t12_35M")
    p.add_argument("--requests", type=int, default=40)
    args = parser.parse_args()
    {"release": release, "scale": scale, "cache": cache}[args.command](args)


if __name__ == "__main__":
    main()
