"""Pull dispatch against round-robin, on modeled GPUs, over the real embed pipeline with long proteins.

Same FASTA, same modeled cards, rounds alternating: esm2cli's Engine (every replica pulls the next
batch from one shared queue when it is free) against the dispatch it replaced (batches dealt to the
replicas in turn, each with a queue of its own, rebuilt here from that code). Long proteins are
embedded whole in windows (--long-sequences window), so batch costs vary: what round-robin handles
badly, as do uneven replicas (--slow-card: one card slower than the others). Prints the device-phase
time, the host efficiency (over the modeled ideal of these cards) and each device's busy share.

    python -m benchmarks.dispatch_bench --card a100 --gpus 4 --proteins 3000 --rounds 3
    python -m benchmarks.dispatch_bench --card a100 --gpus 4 --proteins 6000 --long-sequences truncate --slow-card 3
"""

from __future__ import annotations

import argparse
import itertools
import queue
import random
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

from esm2cli.config import BatchConfig, EmbedConfig, InputConfig, ModelConfig, ModeledGPU
from esm2cli.jobs.bench import _modeled_row
from esm2cli.jobs.pipeline import embed_fasta
from esm2cli.jobs.workload import draw_sequences, fasta_text
from esm2cli.runtime.engine import build_engine

_STOP = object()


class RoundRobinEngine:
    """The dispatch esm2cli had before pull dispatch: batch i goes to replica i mod N, which queues it."""

    def __init__(self, replicas, queue_depth: int = 2):
        self.replicas = list(replicas)
        self.queues = [queue.Queue(maxsize=queue_depth) for _ in self.replicas]
        self.busy = [0.0] * len(self.replicas)
        self.turn = itertools.cycle(range(len(self.replicas)))
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(len(self.replicas))]

    def _run(self, i: int) -> None:
        while (job := self.queues[i].get()) is not _STOP:
            seqs, options, future = job
            if not future.set_running_or_notify_cancel():
                continue
            start = time.perf_counter()
            try:
                future.set_result(self.replicas[i].embed_batch(seqs, **options))
            except Exception as exc:
                future.set_exception(exc)
            self.busy[i] += time.perf_counter() - start

    def submit(self, seqs, **options):
        from concurrent.futures import Future

        future = Future()
        self.queues[next(self.turn)].put((list(seqs), options, future))
        return future

    def oom_splits(self) -> int:
        return 0

    def __enter__(self):
        [t.start() for t in self.threads]
        return self

    def __exit__(self, *exc_info):
        for q in self.queues:
            q.put(_STOP)
        [t.join() for t in self.threads]


def workload(proteins: int, long_share: float, seed: int) -> list[str]:
    """UniProt-like proteins with a share of long ones (3,000-12,000 residues) spread through the file."""
    rng = random.Random(seed)
    seqs = draw_sequences(proteins, seed=seed)
    longs = draw_sequences(int(proteins * long_share), seed=seed + 1, max_length=2000)
    for short in longs:
        seqs[rng.randrange(len(seqs))] = (short * 12)[: rng.randrange(3000, 12000)]
    return seqs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--card", default="a100")
    parser.add_argument("--gpus", type=int, default=4)
    parser.add_argument("--proteins", type=int, default=3000)
    parser.add_argument("--long-share", type=float, default=0.05)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", default="esm2_t33_650M")
    parser.add_argument("--long-sequences", choices=["window", "truncate"], default="window")
    parser.add_argument(
        "--slow-card",
        type=float,
        default=1.0,
        help="the first card runs this many times slower (a throttled or shared GPU, or a mixed node)",
    )
    args = parser.parse_args()
    gpu = ModeledGPU(card=args.card, count=args.gpus)
    model = ModelConfig(model=args.model, load_format="dummy", simulate=gpu)
    embed = EmbedConfig(long_sequences=args.long_sequences)
    seqs = workload(args.proteins, args.long_share, seed=0)
    print(
        f"{args.gpus} modeled {args.card.upper()}, {args.model}: {len(seqs):,} proteins, {sum(map(len, seqs)):,} "
        f"residues, {sum(len(s) > 1022 for s in seqs)} over 1,022 ({args.long_sequences} mode); the first card "
        f"{args.slow_card:g}x slower"
    )
    results: dict[str, list] = {"round-robin": [], "pull (esm2cli)": []}
    with tempfile.TemporaryDirectory(prefix="esm2cli-dispatch-") as work:
        fasta = Path(work) / "in.fasta"
        fasta.write_text(fasta_text(seqs))
        for r in range(args.rounds):
            for name in list(results)[:: 1 if r % 2 == 0 else -1]:
                setup = build_engine(model, embed, BatchConfig())
                first = setup.replicas[0]
                first.gpu = replace(first.gpu, mfu=first.gpu.mfu / args.slow_card)
                if name == "round-robin":
                    setup = replace(setup, engine=RoundRobinEngine(setup.replicas))
                begin = time.perf_counter()
                with setup.engine:
                    summary = embed_fasta(
                        fasta, Path(work) / f"out-{r}-{name[:4]}.parquet", model=replace(model, dtype=setup.dtype),
                        embed=embed, batch=setup.batch, inputs=InputConfig(), setup=setup,
                    )  # fmt: skip
                results[name].append(_modeled_row(args.gpus, setup, summary, begin, time.perf_counter()))
    print(f"{'dispatch':>15} {'device phase':>12} {'host eff.':>9}  busy share per device (each round)")
    for name, rows in results.items():
        for row in rows:
            busy = " ".join(f"{share:.0%}" for share in row.busy_share.values())
            print(f"{name:>15} {row.seconds:>11.2f}s {row.host_efficiency:>9.1%}  {busy}")
    ratio = min(r.seconds for r in results["round-robin"]) / min(r.seconds for r in results["pull (esm2cli)"])
    print(f"pull over round-robin: {ratio:.2f}x (best round each)")


if __name__ == "__main__":
    main()
