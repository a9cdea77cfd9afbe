"""How full each batch plan fills its batches: rows computed over real tokens, no model run (a second or two).

esm2cli's forward computes a packed batch's tokens rounded up to whole matmul tiles (ROW_TILE rows), so the
rows beyond the real tokens are pure cost; a plan of similar-length batches, as a padded forward wants, is
priced the same way (its batches run packed). Printed per pool size (proteins planned together: a chunk of
embed, a wave of the server) and token budget: rows/real for every plan of ab_runs.PLANS and the batches.

    python benchmarks/pack_fill.py
    python benchmarks/pack_fill.py --pools 60,4096 --budgets 1024,4096 --max-length 1022
"""

from __future__ import annotations

import argparse
import json
import time

from benchmarks.ab_runs import PLANS
from esm2cli.config import DEFAULT_BATCH_SIZE
from esm2cli.jobs.workload import draw_sequences
from esm2cli.model.invariant import padded_rows
from esm2cli.runtime.batching import SPECIAL_TOKENS


def fill(lengths: list[int], budget: int, plan: str) -> dict:
    """One plan's batches of ``lengths`` under ``budget``: rows computed over real tokens, batches, seconds."""
    start = time.perf_counter()
    batches = PLANS[plan](lengths, budget, DEFAULT_BATCH_SIZE)
    seconds = time.perf_counter() - start
    if sorted(i for b in batches for i in b) != list(range(len(lengths))):
        raise AssertionError(f"{plan} lost or repeated a protein")
    real = sum(n + SPECIAL_TOKENS for n in lengths)
    rows = sum(padded_rows(sum(lengths[i] + SPECIAL_TOKENS for i in b)) for b in batches)
    return {"plan": plan, "rows_over_real": rows / real, "batches": len(batches), "plan_seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pools", default="60,200,4096", help="proteins planned together, comma-separated")
    parser.add_argument("--budgets", default="1024,4096", help="token budgets, comma-separated")
    parser.add_argument("--max-length", type=int, default=1022)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = []
    for pool in (int(p) for p in args.pools.split(",")):
        lengths = [len(s) for s in draw_sequences(pool, seed=11, max_length=args.max_length)]
        for budget in (int(b) for b in args.budgets.split(",")):
            rows += [{"pool": pool, "budget": budget, **fill(lengths, budget, plan)} for plan in PLANS]
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    for r in rows:
        print(f"pool {r['pool']:>6}  budget {r['budget']:>6}  {r['plan']:>13}: rows/real {r['rows_over_real']:.4f}"
              f"  {r['batches']:>5} batches  planned in {r['plan_seconds'] * 1e3:.1f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
