"""E-value calibration on held-out decoys: for each E threshold, the hits per decoy query that reach it.

    PYTHONPATH=. python benchmarks/calibration.py synthetic --held-out 20000
    PYTHONPATH=. python benchmarks/calibration.py tiny --proteins 2000 --decoys 1000

A null model (esm2cli.search.null) is fit on the top cosines of ``--decoys`` decoy queries; then decoys of the
same generator, new seed, are searched and every score of theirs turned into an E-value. A query unrelated to
the database should see, on average, E hits with E-value <= E: the table prints, per threshold, the mean count
per held-out decoy with a 95% Poisson interval on it (from the total count), and observed / expected.

`synthetic`: a database of unit vectors in 64 dimensions, most of them in families (tight clusters around centres
of Zipf-distributed sizes), the rest and the decoys drawn from one anisotropic background (a shared mean direction,
falling variances, like real mean embeddings); no model. The held-out decoys' scores are computed in full, so a
count is exact even past the top K the fit kept.

`tiny`: real embeddings: synthetic proteins (esm2cli.jobs.workload) embedded with the tiny random ESM-2 of the
tests (tests/helpers.build_tiny_esm2) on the CPU, float32, the database written as ``esm2cli embed`` writes it;
decoys from ``decoy_sequences`` (residue-shuffled database proteins, found through the output's metadata), the
held-out ones with another seed. Also the held-out count of decoys of the other generator (random background
sequences) under the shuffled null: how much the choice of null moves E.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from esm2cli.search.null import DECOY_TOP_K, NullModel, fit_null

THRESHOLDS = (1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0)
_CHUNK = 512  # decoy rows scored at a time: bounds the full score matrix of the held-out set


@dataclass(frozen=True)
class Background:
    """An anisotropic distribution on the unit sphere: a shared mean direction plus falling per-axis spread."""

    mean: np.ndarray
    scales: np.ndarray

    @classmethod
    def draw(cls, rng: np.random.Generator, dim: int = 64, offset: float = 2.0) -> Background:
        mean = rng.normal(size=dim)
        return cls(offset * mean / np.linalg.norm(mean), 1 / np.sqrt(1 + np.arange(dim) / 4))

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return unit(self.mean + rng.normal(size=(n, self.mean.size)) * self.scales)


def unit(vectors: np.ndarray) -> np.ndarray:
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def synthetic_database(
    rng: np.random.Generator, size: int = 20_000, dim: int = 64, families: int = 300, spread: float = 0.08
) -> tuple[np.ndarray, Background]:
    """``size`` unit vectors, 80% of them in ``families`` clusters of Zipf-distributed sizes, and the background
    they (and the decoys) come from."""
    background = Background.draw(rng, dim)
    centres = background.sample(rng, families)
    weights = rng.zipf(1.6, families).astype(np.float64)
    members = rng.choice(families, size=int(size * 0.8), p=weights / weights.sum())
    clustered = centres[members] + rng.normal(size=(members.size, dim)) * spread
    return unit(np.vstack([clustered, background.sample(rng, size - members.size)])), background


def top_scores(queries: np.ndarray, database: np.ndarray, k: int) -> np.ndarray:
    """(queries, k) the top k cosines of each query, descending (what the index builder hands fit_null)."""
    out = np.empty((len(queries), k), np.float32)
    for start in range(0, len(queries), _CHUNK):
        scores = queries[start : start + _CHUNK] @ database.T
        top = np.partition(scores, scores.shape[1] - k, axis=1)[:, -k:]
        out[start : start + _CHUNK] = -np.sort(-top, axis=1)
    return out


def hits_per_threshold(model: NullModel, queries: np.ndarray, database: np.ndarray) -> np.ndarray:
    """Total hits with E <= each of THRESHOLDS over the queries, every query-target pair scored."""
    counts = np.zeros(len(THRESHOLDS), np.int64)
    for start in range(0, len(queries), _CHUNK):
        evalues = model.evalue(queries[start : start + _CHUNK] @ database.T, len(database))
        counts += [(evalues <= threshold).sum() for threshold in THRESHOLDS]
    return counts


def poisson_interval(total: int) -> tuple[float, float]:
    """95% interval of a Poisson mean from one count (the square-root approximation, exact enough past ~5)."""
    low = max(0.0, math.sqrt(total) - 0.98) ** 2 if total else 0.0
    return low, (math.sqrt(total + 1) + 0.98) ** 2


def table(counts: np.ndarray, queries: int, title: str) -> str:
    lines = [f"{title}", "", "| E threshold | hits per decoy (observed) | 95% interval | observed / expected |",
             "| --- | --- | --- | --- |"]  # fmt: skip
    for threshold, total in zip(THRESHOLDS, counts, strict=True):
        low, high = poisson_interval(int(total))
        lines.append(
            f"| {threshold:g} | {total / queries:.4g} ({total} in {queries}) | {low / queries:.3g}-{high / queries:.3g}"
            f" | {total / queries / threshold:.2f} |"
        )
    return "\n".join(lines)


def fitted(model: NullModel) -> str:
    return f"lambda {model.lam:.2f}, join at cosine {model.join:.4f}, exact from {model.exact_from:.4f}"


def run_synthetic(args: argparse.Namespace) -> None:
    rng = np.random.default_rng(args.seed)
    database, background = synthetic_database(rng, args.size)
    started = time.perf_counter()
    fit = top_scores(background.sample(rng, args.decoys), database, min(DECOY_TOP_K, len(database)))
    model = fit_null(fit, len(database), f"{args.decoys} background decoys")
    held = background.sample(np.random.default_rng(args.seed + 1), args.held_out)
    counts = hits_per_threshold(model, held, database)
    print(fitted(model), file=sys.stderr)
    title = (f"synthetic: {len(database)} vectors (64 dims, 300 families), fit on {args.decoys} decoys, "
             f"{args.held_out} held out ({time.perf_counter() - started:.0f} s)")  # fmt: skip
    print(table(counts, args.held_out, title))


def run_tiny(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from esm2cli.api import Embedder
    from esm2cli.jobs.workload import write_fasta
    from esm2cli.search.null import decoy_sequences
    from esm2cli.search.vectors import open_inputs, read_batches
    from helpers import build_tiny_esm2

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        fasta, output = f"{tmp}/db.fasta", f"{tmp}/db.parquet"
        write_fasta(fasta, args.proteins, seed=args.seed, max_length=args.max_length)
        with Embedder(build_tiny_esm2(Path(tmp) / "model"), devices="cpu", dtype="float32") as embedder:
            embedder.embed_fasta(fasta, output)
            inputs = open_inputs([output])
            database = np.concatenate([batch.vectors for batch in read_batches(inputs)])

            def decoys(seed: int, count: int) -> tuple[np.ndarray, str]:
                sequences, description = decoy_sequences(inputs, None, count, seed)
                return unit(embedder.embed(sequences)), description

            fit, description = decoys(args.seed + 1, args.decoys)
            held, _ = decoys(args.seed + 2, args.held_out)
            model = fit_null(top_scores(fit, database, min(DECOY_TOP_K, len(database))), len(database), description)
            counts = hits_per_threshold(model, held, database)
            random_decoys, other = decoy_sequences([_without_input(inputs[0])], None, args.held_out, args.seed + 3)
            other_counts = hits_per_threshold(model, unit(embedder.embed(random_decoys)), database)
    print(f"{description}; {other}", file=sys.stderr)
    print(fitted(model), file=sys.stderr)
    seconds = time.perf_counter() - started
    title = (f"tiny random ESM-2 ({len(database)} synthetic proteins), null: {description}, "
             f"{args.held_out} held out ({seconds:.0f} s)")  # fmt: skip
    print(table(counts, args.held_out, title))
    print()
    print(table(other_counts, args.held_out, "the same null, held-out decoys of the other generator: " + other))


def _without_input(source):
    """The output as if its input FASTA were gone: decoy_sequences falls back to background sequences."""
    from dataclasses import replace

    return replace(source, metadata={**source.metadata, "input": "-"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="case", required=True)
    synthetic = sub.add_parser("synthetic")
    synthetic.add_argument("--size", type=int, default=20_000)
    synthetic.add_argument("--decoys", type=int, default=1000)
    synthetic.add_argument("--held-out", type=int, default=5000)
    synthetic.add_argument("--seed", type=int, default=0)
    tiny = sub.add_parser("tiny")
    tiny.add_argument("--proteins", type=int, default=2000)
    tiny.add_argument("--decoys", type=int, default=1000)
    tiny.add_argument("--held-out", type=int, default=1000)
    tiny.add_argument("--max-length", type=int, default=300)
    tiny.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    (run_synthetic if args.case == "synthetic" else run_tiny)(args)


if __name__ == "__main__":
    main()
