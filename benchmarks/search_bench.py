"""Search on many vectors: esm2cli's exact (flat) search against numpy and FAISS brute force, and IVF-PQ, side by side.

    PYTHONPATH=. python -m benchmarks.search_bench --vectors 1000000 --dims 320,1280 --queries 1000,200

The vectors are synthetic families: random centres (one per FAMILY_SIZE vectors, standard normal) plus Gaussian
noise (SPREAD per coordinate), unit-normalised; the queries are new members of random families, none of them in
the database. For each width a tiny random ESM-2 of that width embeds 12 proteins (a real ``embed`` output), and
its schema and metadata label a Parquet file of the synthetic vectors, so the databases are built by the real
``esm2cli index`` (a child process: its wall time and peak RSS from ``wait4``), with ``--decoys 0`` (no null model).

Measured, in one run, with the database's vectors in the page cache:
- sgemm peak: a 4096^3 float32 numpy matmul, best of 5 (the same BLAS threads as the rest).
- exact: ``Index.search_vectors`` of the flat database; numpy brute force (matmul over 256k-row blocks of the same
  memory-mapped file, argpartition, merge); FAISS ``IndexFlatIP`` over the same vectors in RAM,
  at the rows per BLAS call esm2cli's search sets (a process-wide FAISS setting: like with like). Queries/s and
  GFLOP/s (2 N d per query), best of ``--repeats``.
- IVF-PQ: ``Index.search_vectors`` of the ivf-pq database at several nprobe: recall@10 of the flat database's
  top 10, queries/s, and the index's size against the float32 vectors.
- the crossover: exact and IVF-PQ (at its calibrated nprobe) queries/s on smaller families (``--sweep``), built
  in-process with the same functions, where IVF-PQ overtakes the exact search.
- a projection for UniRef50 (65M) and UniRef100 (400M) from the measured rates, printed last.

The synthetic data lives under WORK and is deleted at the end (``--keep`` keeps it). At most one database's float32
vectors, the Parquet input (row groups of 32 MB, as embed writes them; float16 above 512 wide, to stay within ~8 GB
of files) and an IVF-PQ database exist at a time.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

WORK = Path("/tmp/esm2cli-search-bench")
FAMILY_SIZE = 50  # vectors per family on average: a query's 10 nearest are members of its family
SPREAD = 0.6  # noise per coordinate against a standard normal centre: a member's cosine with its centre ~0.86
BLOCK_ROWS = 1 << 18  # rows per write, and per numpy brute-force block
K = 10


def family_centres(n: int, dim: int, seed: int) -> np.ndarray:
    """One random centre per FAMILY_SIZE vectors."""
    return np.random.default_rng(seed).standard_normal((max(1, n // FAMILY_SIZE), dim), dtype=np.float32)


def members(centres: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` unit vectors, each a random family's centre plus noise."""
    picked = rng.integers(0, len(centres), count)
    rows = centres[picked] + SPREAD * rng.standard_normal((count, centres.shape[1]), dtype=np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def family_blocks(n: int, dim: int, seed: int) -> Iterator[np.ndarray]:
    """The database's n vectors, BLOCK_ROWS at a time (the same for a seed, whatever reads them)."""
    centres = family_centres(n, dim, seed)
    for number, start in enumerate(range(0, n, BLOCK_ROWS)):
        yield members(centres, min(BLOCK_ROWS, n - start), np.random.default_rng([seed, number]))


def queries_of(n: int, dim: int, count: int, seed: int) -> np.ndarray:
    """Queries: new members of the database's families (another stream of the same centres)."""
    return members(family_centres(n, dim, seed), count, np.random.default_rng([seed, 1 << 30]))


def template(dim: int) -> Path:
    """A real esm2cli output of a 1-layer random ESM-2 of this width (float16 storage above 512 wide)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import torch
    from transformers import EsmForMaskedLM

    from esm2cli.api import Embedder
    from esm2cli.model.architecture import bundled_tokenizer, esm2_architecture
    from helpers import random_protein, write_fasta

    folder = WORK / f"model-{dim}"
    out = WORK / f"template-{dim}.parquet"
    torch.manual_seed(dim)
    EsmForMaskedLM(esm2_architecture(layers=1, hidden=dim, heads=4)).save_pretrained(folder)
    bundled_tokenizer().save_pretrained(folder)
    fasta = write_fasta(WORK / f"template-{dim}.fasta", [(f"t{i}", random_protein(30 + 7 * i)) for i in range(12)])
    dtype = "float16" if dim > 512 else "float32"
    with Embedder(str(folder), devices="cpu", dtype="float32", output_dtype=dtype) as embedder:
        embedder.embed_fasta(fasta, out)
    return out


def write_parquet(like: Path, path: Path, blocks: Iterator[np.ndarray]) -> None:
    """The vectors as an esm2cli output of ``like``'s schema and metadata (so its identity), a row group a block."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from esm2cli.io.schema import WRITE_OPTIONS

    schema = pq.read_schema(like)
    value = schema.field("embedding").type.value_type
    start = 0
    with pq.ParquetWriter(path, schema, **{**WRITE_OPTIONS, "compression": "none"}) as out:
        for block in _row_groups(blocks, value.bit_width // 8):
            n, dim = block.shape
            ids = [f"s{i}" for i in range(start, start + n)]
            flat = pa.array(block.astype(value.to_pandas_dtype()).ravel(), value)
            columns = {"id": ids, "description": ids, "length": pa.array(np.arange(n) % 500 + 20, pa.int32()),
                       "truncated": pa.array(np.zeros(n, bool)), "windows": pa.array(np.ones(n, np.int32)),
                       "sequence_sha256": pa.array([None] * n, pa.string()),
                       "embedding": pa.FixedSizeListArray.from_arrays(flat, dim)}  # fmt: skip
            out.write_table(pa.table([columns[f.name] for f in schema], schema=schema))
            start += n


# The child reports its own VmHWM at exit: wait4's ru_maxrss would keep this (large) process's RSS at the fork.
_PEAK = ("import atexit, runpy, sys\n"
         "out = sys.argv.pop(1)\n"
         "def peak():\n"
         "    line = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]\n"
         "    open(out, 'w').write(line.split()[1])\n"
         "atexit.register(peak)\n"
         "runpy.run_module('esm2cli', run_name='__main__')\n")  # fmt: skip


def _row_groups(blocks: Iterator[np.ndarray], itemsize: int) -> Iterator[np.ndarray]:
    """The blocks cut into row groups of ROW_GROUP_BYTES, as embed writes them: what index reads at a time."""
    from esm2cli.io.schema import ROW_GROUP_BYTES

    for block in blocks:
        rows = max(1, ROW_GROUP_BYTES // (block.shape[1] * itemsize))
        yield from (block[start : start + rows] for start in range(0, len(block), rows))


def build(parquet: Path, db: Path, kind: str) -> dict:
    """``esm2cli index PARQUET -o DB --kind KIND --decoys 0`` in a child: seconds, peak RSS, bytes on disk."""
    peak = WORK / "peak.txt"
    command = [sys.executable, "-c", _PEAK, str(peak), "index", str(parquet), "-o", str(db), "--kind", kind,
               "--decoys", "0", "-q"]  # fmt: skip
    start = time.perf_counter()
    child = subprocess.Popen(command, env={**os.environ, "PYTHONPATH": os.getcwd()})
    anon = _peak_anon(child)
    seconds = time.perf_counter() - start
    if child.returncode:
        raise SystemExit(f"esm2cli index {parquet} --kind {kind} failed ({child.returncode})")
    files = {p.name: p.stat().st_size for p in db.rglob("*") if p.is_file()}
    return {"seconds": seconds, "peak_mb": int(peak.read_text()) / 1024, "anon_mb": anon / 1024, "files": files}


def _peak_anon(child: subprocess.Popen) -> int:
    """The child's largest RssAnon (kB), sampled every 20 ms until it exits: VmHWM also counts the file pages it
    maps or reads through a map (the page cache, which the kernel takes back), RssAnon only its own memory."""
    most = 0
    while child.poll() is None:
        try:
            with open(f"/proc/{child.pid}/status") as status:
                # an exiting child's status has no RssAnon line
                most = max([most] + [int(line.split()[1]) for line in status if line.startswith("RssAnon")])
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    return most


def sgemm_peak(size: int = 4096, repeats: int = 5) -> float:
    """GFLOP/s of a large float32 numpy matmul, best of ``repeats``."""
    a = np.random.default_rng(0).standard_normal((size, size), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((size, size), dtype=np.float32)
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def _timed(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def numpy_top_k(queries: np.ndarray, vectors: np.ndarray, k: int) -> np.ndarray:
    """Brute force: a matmul a block, argpartition, the blocks' best merged; rows (n, k), best first."""
    best_s = np.full((len(queries), 0), -np.inf, np.float32)
    best_r = np.zeros((len(queries), 0), np.int64)
    for start in range(0, len(vectors), BLOCK_ROWS):
        scores = queries @ np.asarray(vectors[start : start + BLOCK_ROWS]).T
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        best_s = np.concatenate([best_s, np.take_along_axis(scores, part, 1)], axis=1)
        best_r = np.concatenate([best_r, part + start], axis=1)
        keep = np.argsort(-best_s, axis=1)[:, :k]
        best_s, best_r = np.take_along_axis(best_s, keep, 1), np.take_along_axis(best_r, keep, 1)
    return best_r


def faiss_flat(vectors: np.ndarray):
    """A FAISS IndexFlatIP holding the vectors (in RAM)."""
    import faiss

    index = faiss.IndexFlatIP(vectors.shape[1])
    for start in range(0, len(vectors), BLOCK_ROWS):
        index.add(np.ascontiguousarray(vectors[start : start + BLOCK_ROWS], np.float32))
    return index


def rows_of(hits) -> np.ndarray:
    """Row numbers of Index.search_vectors' hits (ids are s<row>)."""
    return np.array([[int(hit.target[1:]) for hit in found] for found in hits], np.int64)


def recall(truth: np.ndarray, found: np.ndarray) -> float:
    return float(np.mean([len(set(t) & set(f)) / len(t) for t, f in zip(truth, found, strict=True)]))


def best_rate(call: Callable[[], object], count: int, repeats: int) -> float:
    """Queries/s of the best of ``repeats`` runs of ``call`` over ``count`` queries."""
    return count / min(_timed(call) for _ in range(repeats))


def interleaved_rates(calls: dict[str, Callable[[], object]], count: int, repeats: int) -> dict[str, float]:
    """Queries/s of each call's best run, the calls taken in turn ``repeats`` times: a slow spell of the machine
    (other jobs, the page cache settling after a build wrote the vectors) falls on every one alike, not on the
    first timed."""
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(repeats):
        for name, call in calls.items():
            best[name] = min(best[name], _timed(call))
    return {name: count / seconds for name, seconds in best.items()}


def exact_side_by_side(db: Path, queries: np.ndarray, repeats: int) -> tuple[dict, np.ndarray]:
    """Queries/s of the three exact searches over the same vectors, and the flat database's top 10."""
    from esm2cli.search.exact import open_vectors
    from esm2cli.search.index import Index

    index = Index.open(db, verify=False)
    n, dim = index.size, index.hidden
    vectors = open_vectors(str(next(db.glob("shard-*/vectors.f32"))), n, dim)
    np.asarray(vectors).sum()  # into the page cache before any timing
    truth = rows_of(index.search_vectors(queries, K))
    flat = faiss_flat(vectors)
    calls = {
        "esm2cli flat": lambda: index.search_vectors(queries, K),
        "numpy matmul + argpartition": lambda: numpy_top_k(queries, vectors, K),
        "FAISS IndexFlatIP": lambda: flat.search(queries, K),
    }
    rates = interleaved_rates(calls, len(queries), repeats)
    agree = {"numpy matmul + argpartition": recall(truth, numpy_top_k(queries, vectors, K)),
             "FAISS IndexFlatIP": recall(truth, flat.search(queries, K)[1]), "esm2cli flat": 1.0}  # fmt: skip
    flops = 2 * n * dim / 1e9
    table = {name: {"qps": rate, "gflops": rate * flops, "recall": agree[name]} for name, rate in rates.items()}
    return table, truth


def ivfpq_sweep(db: Path, queries: np.ndarray, truth: np.ndarray, repeats: int) -> dict:
    """Recall@10 of the flat top 10 and queries/s at nprobe 1, 2, 4 ... 256 (and the calibrated one)."""
    from esm2cli.search.index import Index

    index = Index.open(db, verify=False)
    calibrated = int(_shard_setting(db)["nprobe"])
    out = {}
    for nprobe in sorted({1, 2, 4, 8, 16, 32, 64, 128, 256, calibrated}):
        found = rows_of(index.search_vectors(queries, K, nprobe=nprobe))
        qps = best_rate(functools.partial(index.search_vectors, queries, K, nprobe=nprobe), len(queries), repeats)
        out[nprobe] = {"recall": recall(truth, found), "qps": qps, "calibrated": nprobe == calibrated}
    return out


def _shard_setting(db: Path) -> dict:
    record = json.loads(next(db.glob("shard-*/shard.json")).read_text())
    return {**record["search"]}


def crossover(dim: int, sizes: list[int], queries_count: int, seed: int) -> list[dict]:
    """Exact and IVF-PQ (calibrated, re-ranked) queries/s on families of each size, built in-process."""
    from esm2cli.search import ann, exact

    return [_crossover_point(ann, exact, dim, n, queries_count, seed) for n in sizes]


def _crossover_point(ann, exact, dim: int, n: int, queries_count: int, seed: int) -> dict:
    vectors = np.concatenate(list(family_blocks(n, dim, seed)))
    queries = queries_of(n, dim, queries_count, seed)
    sample = vectors[np.random.default_rng(seed).choice(n, ann.train_rows(n, dim), replace=False)]
    index = ann.fill(ann.train_ivfpq(sample, ann.ivf_shape(n, dim, len(sample)), seed), vectors)
    setting = ann.calibrate(index, vectors, "ivf-pq", seed)
    half = vectors.astype(np.float16)  # what an ivf-pq shard re-ranks from
    exact_qps = best_rate(lambda: exact.top_k(queries, vectors, K), queries_count, 2)
    ivf_qps = best_rate(lambda: ann.search(index, half, queries, K, setting), queries_count, 2)
    return {"vectors": n, "exact_qps": exact_qps, "ivfpq_qps": ivf_qps, **setting}


def run_width(dim: int, args: argparse.Namespace, queries_count: int) -> dict:
    """Builds the flat and the ivf-pq database of one width in turn and measures both; the data deleted after."""
    n = args.vectors
    like = template(dim)
    parquet = WORK / f"vectors-{dim}.parquet"
    write_parquet(like, parquet, family_blocks(n, dim, args.seed))
    queries = queries_of(n, dim, queries_count, args.seed)
    report: dict = {"dim": dim, "vectors": n, "queries": queries_count}
    report["build_flat"] = build(parquet, WORK / f"flat-{dim}", "flat")
    report["exact"], truth = exact_side_by_side(WORK / f"flat-{dim}", queries, args.repeats)
    shutil.rmtree(WORK / f"flat-{dim}")
    if dim not in args.ivfpq_dims:
        parquet.unlink()
        return report
    report["build_ivfpq"] = build(parquet, WORK / f"ivfpq-{dim}", "ivf-pq")
    parquet.unlink()
    report["ivfpq"] = ivfpq_sweep(WORK / f"ivfpq-{dim}", queries, truth, args.repeats)
    report["ivfpq_setting"] = _shard_setting(WORK / f"ivfpq-{dim}")
    shutil.rmtree(WORK / f"ivfpq-{dim}")
    return report


def print_width(report: dict, peak: float) -> None:
    dim, n = report["dim"], report["vectors"]
    print(f"\n## {n:,} x {dim} ({report['queries']} queries, k = {K}); sgemm peak {peak:.0f} GFLOP/s\n")
    print("| search | queries/s | GFLOP/s | of sgemm peak | recall@10 of esm2cli flat |")
    print("| --- | --- | --- | --- | --- |")
    for name, row in report["exact"].items():
        print(f"| {name} | {row['qps']:.1f} | {row['gflops']:.0f} | {row['gflops'] / peak:.0%} | {row['recall']:.4f} |")
    exact_qps = report["exact"]["esm2cli flat"]["qps"]
    faiss_qps = report["exact"]["FAISS IndexFlatIP"]["qps"]
    print(
        f"\nesm2cli flat / FAISS flat: {exact_qps / faiss_qps:.2f}x; flat build "
        f"{report['build_flat']['seconds']:.0f} s, peak RSS {report['build_flat']['peak_mb']:.0f} MB "
        f"(RssAnon {report['build_flat']['anon_mb']:.0f} MB)\n"
    )
    if "ivfpq" not in report:
        return
    files = report["build_ivfpq"]["files"]
    f32 = n * dim * 4
    print(f"IVF-PQ {report['ivfpq_setting']}; index.faiss {files['index.faiss'] / 1e6:.0f} MB = 1/"
          f"{f32 / files['index.faiss']:.1f} of the float32 vectors ({f32 / 1e6:.0f} MB); with vectors.f16 "
          f"{(files['index.faiss'] + files['vectors.f16']) / 1e6:.0f} MB\n")  # fmt: skip
    print("| nprobe | recall@10 | queries/s | x esm2cli flat |")
    print("| --- | --- | --- | --- |")
    for nprobe, row in report["ivfpq"].items():
        mark = " (calibrated)" if row["calibrated"] else ""
        print(f"| {nprobe}{mark} | {row['recall']:.4f} | {row['qps']:.0f} | {row['qps'] / exact_qps:.1f}x |")
    print("\n| build | seconds | peak RSS (VmHWM) MB | peak RssAnon MB | on disk MB |")
    print("| --- | --- | --- | --- | --- |")
    for kind in ("flat", "ivfpq"):
        row = report[f"build_{kind}"]
        print(f"| {kind} | {row['seconds']:.0f} | {row['peak_mb']:.0f} | {row['anon_mb']:.0f} | "
              f"{sum(row['files'].values()) / 1e6:.0f} |")  # fmt: skip


def print_crossover(rows: list[dict], dim: int) -> None:
    print(f"\n## Crossover, {dim} wide (in-process builds)\n")
    print("| vectors | exact queries/s | ivf-pq queries/s | nprobe | recall@10 | ivf-pq / exact |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['vectors']:,} | {row['exact_qps']:.0f} | {row['ivfpq_qps']:.0f} | {row['nprobe']} | "
              f"{row['recall_at_10']:.3f} | {row['ivfpq_qps'] / row['exact_qps']:.2f}x |")  # fmt: skip


def print_projection(report: dict) -> None:
    """Disk, RAM, build and query time for UniRef50 and UniRef100 from one width's measured rates."""
    n, dim = report["vectors"], report["dim"]
    flat_qps = report["exact"]["esm2cli flat"]["qps"]
    setting = report["ivfpq_setting"]["nprobe"]
    ivf_qps = report["ivfpq"][setting]["qps"]
    code = report["build_ivfpq"]["files"]["index.faiss"] / n
    print(f"\n## Projection, {dim} wide, from the rates above (one machine = this one's 2 shared cores)\n")
    print("| database | kind | disk | RAM to search fast | build, 1 machine | build, 64 machines | "
          "s per 1,000 queries, 1 machine | 64 machines |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, total in (("UniRef50", 65_000_000), ("UniRef100", 400_000_000)):
        scale = total / n
        flat_s = 1000 / flat_qps * scale  # exact reads every vector: linear in N
        ivf_s = 1000 / ivf_qps * np.sqrt(scale)  # nlist ~ sqrt(N) at a fixed nprobe: lists ~ sqrt(N) long
        for kind, disk, ram, built, query in (
            ("flat", 4 * dim * total, 4 * dim * total, report["build_flat"]["seconds"] * scale, flat_s),
            ("ivf-pq", (2 * dim + code) * total, code * total, report["build_ivfpq"]["seconds"] * scale, ivf_s),
        ):
            print(f"| {name} | {kind} | {disk / 1e9:,.0f} GB | {ram / 1e9:,.0f} GB | {built / 3600:,.1f} h | "
                  f"{built / 64 / 3600:,.2f} h | {query:,.0f} | {query / 64:,.1f} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vectors", type=int, default=1_000_000)
    parser.add_argument("--dims", default="320,1280", help="widths, comma-separated")
    parser.add_argument("--queries", default="1000,200", help="queries per width, comma-separated")
    parser.add_argument("--sweep", default="10000,30000,100000", help="crossover sizes (first width); '' for none")
    parser.add_argument("--ivfpq-dims", default="", help="widths that get an IVF-PQ database ('': every one)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep WORK (the synthetic data) at the end")
    args = parser.parse_args()
    dims = [int(d) for d in args.dims.split(",")]
    counts = [int(q) for q in args.queries.split(",")]
    args.ivfpq_dims = [int(d) for d in args.ivfpq_dims.split(",") if d] or dims
    WORK.mkdir(exist_ok=True)
    try:
        peak = sgemm_peak()
        print(f"sgemm peak {peak:.0f} GFLOP/s (4096^3 float32, numpy)", file=sys.stderr)
        sweep = [int(s) for s in args.sweep.split(",") if s]
        if sweep:
            print_crossover(crossover(dims[0], sweep, counts[0], args.seed), dims[0])
        for dim, count in zip(dims, counts, strict=True):
            report = run_width(dim, args, count)
            report["sgemm_peak"] = peak
            print_width(report, peak)
            if "ivfpq" in report:
                print_projection(report)
            print(json.dumps(report, default=str), file=sys.stderr)
            sys.stdout.flush()
    finally:
        if not args.keep:
            shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()
