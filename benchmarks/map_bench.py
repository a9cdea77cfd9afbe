"""esm2cli map at scale: build time, page size and peak memory, one subprocess a case.

The inputs are synthetic but esm2cli-shaped: a real embed run of 20 proteins with esm2_t6_8M's architecture
(random weights, ``--load-format dummy``: 320 dims) gives the schema and the metadata (so the identity), and N rows
of that schema are written beside it: ids, descriptions naming one of a few families, lengths, and unit vectors
around 50 random centres. The vectors are not a model's; what is measured is the map's reading, fitting,
transforming and writing, which depend only on N and the width.

Each case runs ``python -m esm2cli map`` in a subprocess of its own; the peak is the kernel's (ru_maxrss of the
finished child). The page, PNG and coordinates are written every time.

    python benchmarks/map_bench.py --case pca:100000 --case pca:1000000 --case umap:20000 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HIDDEN = 320  # esm2_t6_8M
FAMILIES = ("kinase", "protease", "transporter", "ligase", "hydrolase", "uncharacterized protein")
WRITE_ROWS = 50_000  # rows of the synthetic input built at a time (its row groups are embed's)


def _template(work: Path) -> Path:
    from esm2cli.jobs.workload import write_fasta

    out = work / "template.parquet"
    if not out.exists():
        fasta = work / "template.fa"
        write_fasta(str(fasta), 20)
        command = [sys.executable, "-m", "esm2cli", "embed", str(fasta), "-o", str(out), "-m", "esm2_t6_8M",
                   "--load-format", "dummy", "--dtype", "float32", "--devices", "cpu", "-q"]  # fmt: skip
        subprocess.run(command, check=True)
    return out


def _write_input(template: Path, path: Path, n: int, seed: int = 0) -> None:
    """n rows of the template's schema and metadata, written WRITE_ROWS at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pq.read_schema(template)
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((50, HIDDEN)).astype(np.float32)
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, n, WRITE_ROWS):
            rows = min(WRITE_ROWS, n - start)
            which = rng.integers(0, len(centres), rows)
            vectors = centres[which] + 0.6 * rng.standard_normal((rows, HIDDEN), np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            ids = [f"UPI{start + i:010d}" for i in range(rows)]
            words = [f"{ids[i]} {FAMILIES[which[i] % len(FAMILIES)]} {which[i]}" for i in range(rows)]
            columns = {
                "id": pa.array(ids),
                "description": pa.array(words),
                "length": pa.array(rng.integers(30, 1000, rows).astype(np.int32)),
                "truncated": pa.array(np.zeros(rows, bool)),
                "windows": pa.array(np.ones(rows, np.int32)),
                "sequence_sha256": pa.array([None] * rows, pa.string()),
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), HIDDEN),
            }  # fmt: skip
            writer.write_table(pa.table([columns[f.name] for f in schema], schema=schema), row_group_size=8192)


def _run(data: Path, work: Path, method: str, name: str) -> dict:
    page, png, coords = work / f"{name}.html", work / f"{name}.png", work / f"{name}.coords.parquet"
    command = [sys.executable, "-m", "esm2cli", "map", str(data), "-o", str(page), "--png", str(png), "--coords",
               str(coords), "--method", method, "--color-by", "description:(kinase|protease|transporter|ligase)",
               "--overwrite"]  # fmt: skip
    started = time.perf_counter()
    child = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - started
    stderr = child.stderr.read() if child.stderr else ""
    if status != 0:
        raise SystemExit(f"{name}: esm2cli map failed:\n{stderr}")
    return {
        "case": name,
        "seconds": round(seconds, 1),
        "peak_rss_mb": round(usage.ru_maxrss / 1024),  # Linux: KiB
        "page_mb": round(page.stat().st_size / 1e6, 1),
        "png_kb": round(png.stat().st_size / 1e3),
        "summary": stderr.strip().splitlines()[-6:],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", action="append", default=[], help="METHOD:N, e.g. pca:1000000")
    parser.add_argument("--work", default=None, help="Where the inputs are built [default: a temporary folder].")
    parser.add_argument("--json", default=None, help="Also write the results here.")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="map-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    template = _template(work)
    results = []
    for case in args.case or ["pca:100000", "pca:1000000"]:
        method, n = case.split(":")
        data = work / f"input-{n}.parquet"
        if not data.exists():
            _write_input(template, data, int(n))
        results.append(_run(data, work, method, f"{method}-{n}"))
        print(json.dumps(results[-1]), flush=True)
    print("| case | build (s) | peak RSS (MB) | page (MB) | PNG (kB) |")
    print("| --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['case']} | {r['seconds']} | {r['peak_rss_mb']:,} | {r['page_mb']} | {r['png_kb']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
