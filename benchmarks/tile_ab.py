"""One matmul three ways, side by side: what the batch-invariant tiles cost against one plain call.

For each of an ESM-2 architecture's four matmuls (fused QKV, attention output, the feed-forward's two), over
--rows packed rows: "plain" one F.linear call (the batch-dependent forward), "batched" the 256-row tiles as
one batched gemm over a stride-0 weight (invariant.batched_tiles: float32 and CUDA; half precision on the CPU
ran it before forward revision 2), "by-tile" one gemm call
a tile (invariant.tile_by_tile: what half precision runs on the CPU). Each runs in turn, 7 rounds, the
median kept. Printed: milliseconds and the ratio of plain to each (above 1: faster than plain).

    python benchmarks/tile_ab.py --model esm2_t6_8M --rows 1024 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from esm2cli.model.architecture import ARCHITECTURES, DTYPES
from esm2cli.model.invariant import batched_tiles, pad_rows, tile_by_tile


def _median_ms(fns: dict, reps: int, rounds: int = 7) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(reps):
                fn()
            times[name].append((time.perf_counter() - start) / reps * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def _ways(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> dict:
    # In half precision the batched tiles read a (K, N) copy made in the call, as esm2cli ran them before one
    # call a tile (the copy made them ~10% faster than a stride-0 transposed weight).
    wb = w if w.dtype == torch.float32 else None
    return {
        "plain": lambda: F.linear(x, w, b),
        "batched": lambda: batched_tiles(pad_rows(x), wb if wb is not None else w.t().contiguous().t(), b),
        "by-tile": lambda: tile_by_tile(pad_rows(x), w, b),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="esm2_t6_8M", choices=sorted(ARCHITECTURES))
    parser.add_argument("--rows", type=int, default=1024, help="packed rows a call (the CPU's default budget)")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    dtype, (_, hidden, _) = DTYPES[args.dtype], ARCHITECTURES[args.model]
    gen = torch.Generator().manual_seed(0)
    rows = []
    for k, n in [(hidden, 3 * hidden), (hidden, hidden), (hidden, 4 * hidden), (4 * hidden, hidden)]:
        x = torch.randn(args.rows, k, generator=gen).to(dtype)
        w, b = (torch.randn(n, k, generator=gen) / k**0.5).to(dtype), torch.randn(n, generator=gen).to(dtype)
        fns = _ways(x, w, b)
        ms = _median_ms(fns, reps=max(2, int(2e9 / (2 * args.rows * k * n))))
        rows.append({"in": k, "out": n, "ms": ms, "over_plain": {name: ms["plain"] / t for name, t in ms.items()}})
    if args.json:
        print(json.dumps({"model": args.model, "rows": args.rows, "dtype": args.dtype, "matmuls": rows}, indent=1))
        return
    print(f"{args.model} matmuls, {args.rows} rows, {args.dtype}, {torch.get_num_threads()} threads")
    for r in rows:
        cells = "  ".join(f"{name} {t:7.2f} ms ({r['over_plain'][name]:.2f}x)" for name, t in r["ms"].items())
        print(f"  {r['in']:>5} -> {r['out']:<5} {cells}")
    total = {name: sum(r["ms"][name] for r in rows) for name in rows[0]["ms"]}
    print("  all four: " + "  ".join(f"{name} {total['plain'] / t:.2f}x" for name, t in total.items()))


if __name__ == "__main__":
    main()
