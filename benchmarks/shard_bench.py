"""A shard against its slice alone, and merge of many parts, measured side by side in one run.

    python -m benchmarks.shard_bench shard --records 2000000 --count 2000 --index 7 --inputs plain,bgzf,s3
    python -m benchmarks.shard_bench merge --parts 2000 --rows 200

`shard`: a FASTA of N short records is written once under /tmp (reused by later runs), with a BGZF copy
(Biopython's bgzf, as bgzip writes it) and an object on an S3 server on loopback (moto). Then, alternating,
``esm2cli embed IN --shard-count C --shard-index I`` and ``esm2cli embed SLICE`` over a file holding only that
shard's records, each a real process (startup, model load and all; the 8M model with random weights, float32,
on the CPU), for the plain file, the BGZF file and the S3 object. Reported: the median of each, their ratio,
and the bytes the shard read of its input to find its records (its own log line).

`merge`: P parts of R rows each (random vectors of the 8M model's width, written with the pipeline's own
writer and the identities of a byte-range run), then ``esm2cli merge`` in a child: its time and peak RSS, for
P parts and for P/10 parts of 10x the rows (the same rows in all), so that memory flat in the count shows.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

WORK = Path("/tmp/esm2cli-shard-bench")
_ALPHABET = np.frombuffer(b"ACDEFGHIKLMNPQRSTVWY", np.uint8)
_READ = re.compile(r"; (\d+) read to find its records")


def write_fasta(path: Path, records: int, seed: int = 0) -> None:
    """N records of 20-120 residues (~75 bytes each with the header), in 60-residue lines."""
    rng = np.random.default_rng(seed)
    with open(path, "wb") as out:
        for start in range(0, records, 100_000):
            count = min(100_000, records - start)
            lengths = rng.integers(20, 120, count)
            residues = _ALPHABET[rng.integers(0, 20, int(lengths.sum()))].tobytes()
            pieces, at = [], 0
            for i, n in enumerate(lengths.tolist()):
                seq = residues[at : at + n]
                at += n
                lines = b"\n".join(seq[j : j + 60] for j in range(0, n, 60))
                pieces.append(b">r%d\n%s\n" % (start + i, lines))
            out.write(b"".join(pieces))


def prepared(records: int) -> tuple[Path, Path]:
    """The plain file and its BGZF copy, written once."""
    WORK.mkdir(exist_ok=True)
    plain, packed = WORK / f"in-{records}.fa", WORK / f"in-{records}.fa.gz"
    if not plain.exists():
        write_fasta(plain.with_suffix(".tmp"), records)
        plain.with_suffix(".tmp").rename(plain)
    if not packed.exists():
        from Bio import bgzf

        with open(plain, "rb") as source, bgzf.BgzfWriter(str(packed.with_suffix(".tmp")), "wb") as out:
            while block := source.read(8 << 20):
                out.write(block)
        packed.with_suffix(".tmp").rename(packed)
    return plain, packed


def shard_slice(plain: Path, count: int, index: int) -> bytes:
    """The records whose '>' lies in the shard's byte range, found here by a plain scan of the bytes."""
    data = plain.read_bytes()
    start, stop = index * len(data) // count, (index + 1) * len(data) // count
    first = 0 if start == 0 else data.index(b"\n>", start - 1) + 1
    last = data.find(b"\n>", stop - 1)
    return data[first : len(data) if last < 0 else last + 1]


def bgzf_slice(packed: Path, count: int, index: int) -> bytes:
    """The BGZF shard's records, as the shard itself finds them (its text, decompressed, copied to a file)."""
    from esm2cli.io.split import open_slice

    with open_slice(str(packed), index, count, "bgzf") as piece:
        return Path(piece.path).read_bytes()


def timed(args: list[str], env: dict | None = None) -> tuple[float, str]:
    """Runs ``esm2cli ARGS`` in a child; returns (seconds, stderr)."""
    cmd = [sys.executable, "-m", "esm2cli", *args]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr}")
    return seconds, done.stderr


def embed_args(source: str, output: Path, model: str) -> list[str]:
    return ["embed", source, "-o", str(output), "-m", model, "--load-format", "dummy", "--dtype", "float32",
            "--devices", "cpu", "--overwrite", "-v"]  # fmt: skip


def compare(label: str, source: str, alone: Path, args, env: dict | None = None) -> dict:
    """Alternates the shard run and the slice-alone run; medians, ratio and the shard's bytes read."""
    shard_s, alone_s, read = [], [], 0
    out = WORK / "out"
    for _ in range(args.repeats):
        subprocess.run(["rm", "-rf", str(out)], check=True)
        seconds, stderr = timed([*embed_args(source, out, args.model), "--shard-count", str(args.count),
                                 "--shard-index", str(args.index)], env)  # fmt: skip
        shard_s.append(seconds)
        read = int(m.group(1)) if (m := _READ.search(stderr)) else -1
        (WORK / "alone.parquet").unlink(missing_ok=True)  # else the rerun is "already complete"
        seconds, _ = timed(embed_args(str(alone), WORK / "alone.parquet", args.model), env)
        alone_s.append(seconds)
    row = {"input": label, "shard_s": statistics.median(shard_s), "alone_s": statistics.median(alone_s),
           "bytes_read": read}  # fmt: skip
    row["ratio"] = row["shard_s"] / row["alone_s"]
    print(f"{label:6s} shard {row['shard_s']:6.1f} s  alone {row['alone_s']:6.1f} s  ratio {row['ratio']:.2f}  "
          f"bytes read by the shard {read:,}", flush=True)  # fmt: skip
    return row


def run_shard(args) -> None:
    plain, packed = prepared(args.records)
    alone = WORK / f"slice-{args.records}-{args.index}-of-{args.count}.fa"
    alone.write_bytes(shard_slice(plain, args.count, args.index))
    size = plain.stat().st_size
    print(f"{args.records:,} records, {size / 1e6:.0f} MB plain, {packed.stat().st_size / 1e6:.0f} MB BGZF; shard "
          f"{args.index} of {args.count}: slice {size // args.count:,} bytes, "
          f"{alone.read_bytes().count(b'>'):,} records", flush=True)  # fmt: skip
    if "plain" in args.inputs:
        compare("plain", str(plain), alone, args)
    if "bgzf" in args.inputs:  # its blocks, not the plain file's bytes, decide which records it holds
        own = WORK / f"slice-{args.records}-{args.index}-of-{args.count}-bgzf.fa"
        own.write_bytes(bgzf_slice(packed, args.count, args.index))
        print(f"bgzf shard {args.index}: {own.read_bytes().count(b'>'):,} records", flush=True)
        compare("bgzf", str(packed), own, args)
    if "s3" in args.inputs:
        compare_s3(plain, alone, args)


def compare_s3(plain: Path, alone: Path, args) -> None:
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    creds = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
    env = {**os.environ, **creds, "ESM2CLI_S3_ENDPOINT_URL": endpoint, "AWS_EC2_METADATA_DISABLED": "true"}
    try:
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="bench",
                              aws_secret_access_key="bench")  # fmt: skip
        client.create_bucket(Bucket="bench")
        client.upload_file(str(plain), "bench", "in.fa")
        compare("s3", "s3://bench/in.fa", alone, args, env)
    finally:
        server.stop()


def write_parts(prefix: Path, parts: int, rows: int, hidden: int) -> None:
    """P parts of a byte-range run over one (pretend) input, R rows each, as the pipeline writes them."""
    from esm2cli.io.parquet import EmbeddingWriter
    from esm2cli.io.schema import Rows, build_schema
    from esm2cli.io.split import slice_range

    prefix.mkdir(parents=True, exist_ok=True)
    size, rng = parts * rows * 75, np.random.default_rng(1)
    common = {"model_identity": "random:bench", "dtype": "float32", "layers": [-1], "pooling": "mean",
              "per_token": False, "truncate": 1022, "skip_invalid": False, "long_sequences": "truncate",
              "window_overlap": None}  # fmt: skip
    for index in range(parts):
        identity = {**common, "input_sha256": f"{index:064x}", "input_records": rows, "shard": [index, parts],
                    "input_slice": {"bytes": list(slice_range(size, index, parts)), "size": size, "stamp": "1",
                                    "format": "plain"}}  # fmt: skip
        schema = build_schema(hidden, [-1], False, {"identity": identity, "layers": [-1]})
        ids = [f"p{index}_{i}" for i in range(rows)]
        batch = Rows(ids=ids, descriptions=[""] * rows, lengths=[50] * rows, truncated=[False] * rows,
                     pooled={-1: rng.standard_normal((rows, hidden), dtype=np.float32)}, per_token={})  # fmt: skip
        writer = EmbeddingWriter(prefix / f"part-{index:05d}-of-{parts:05d}.parquet", schema, hidden, [-1])
        writer.write(batch)
        writer.commit()


def timed_merge(prefix: Path, output: Path) -> tuple[float, float]:
    output.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "esm2cli", "merge", str(prefix), "-o", str(output)]
    start = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr = child.stderr.read()
    _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(stderr)
    return time.perf_counter() - start, usage.ru_maxrss / 1024


def run_merge(args) -> None:
    import shutil

    import pyarrow.parquet as pq

    for parts, rows in ((args.parts, args.rows), (args.parts // 10, args.rows * 10)):
        prefix = WORK / f"parts-{parts}x{rows}"
        if not prefix.exists():
            write_parts(prefix, parts, rows, args.hidden)
        seconds, peak = timed_merge(prefix, WORK / "merged.parquet")
        merged = pq.ParquetFile(WORK / "merged.parquet")
        data = sum(f.stat().st_size for f in prefix.iterdir()) / 1e6
        print(f"{parts:5d} parts x {rows:5d} rows ({data:.0f} MB): merge {seconds:.1f} s, peak RSS {peak:.0f} MB, "
              f"{merged.metadata.num_rows:,} rows in {merged.num_row_groups} row groups", flush=True)  # fmt: skip
        if not args.keep:
            shutil.rmtree(prefix)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    shard = sub.add_parser("shard")
    shard.add_argument("--records", type=int, default=2_000_000)
    shard.add_argument("--count", type=int, default=2000)
    shard.add_argument("--index", type=int, default=7)
    shard.add_argument("--repeats", type=int, default=3)
    shard.add_argument("--model", default="esm2_t6_8M")
    shard.add_argument("--inputs", default="plain,bgzf,s3", help="which of plain, bgzf, s3 (comma-separated)")
    merge = sub.add_parser("merge")
    merge.add_argument("--parts", type=int, default=2000)
    merge.add_argument("--rows", type=int, default=200)
    merge.add_argument("--hidden", type=int, default=320)  # esm2_t6_8M's width
    merge.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    run_shard(args) if args.what == "shard" else run_merge(args)


if __name__ == "__main__":
    main()
