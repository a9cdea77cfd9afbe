"""Width buckets against exact widths: padding, distinct shapes, and the bf16 shift, in one run.

Exact widths pad each batch to its longest protein + 2; buckets pad to esm2cli.runtime.batching.padded_width
(multiples of 32 up to 1,024 tokens). For synthetic proteins of UniProt-like lengths this reports, under
the CPU and GPU token budgets, the padded tokens computed and the distinct batch shapes (each one a set of
kernels the CPU's oneDNN compiles and caches, or a CUDA graph). Then it embeds ``--embed`` proteins with
the 8M architecture (random weights) in bf16 both ways and in fp32 with exact widths, and reports how far
each bf16 result lies from fp32: the shift bucketing adds is the difference between the two rows.

    python -m benchmarks.width_buckets [--sequences 32000] [--embed 300]
"""

from __future__ import annotations

import argparse
from contextlib import contextmanager
from unittest import mock

import numpy as np

from esm2cli.config import DEFAULT_MAX_TOKENS, EmbedConfig, ModelConfig
from esm2cli.jobs.workload import draw_sequences
from esm2cli.runtime import batching, replica
from esm2cli.runtime.batching import SPECIAL_TOKENS, padded_tokens, plan_batches


def _exact(longest: int, specials: int = SPECIAL_TOKENS) -> int:
    return longest + specials


@contextmanager
def exact_widths():
    """Pads every batch to its longest protein + 2, as esm2cli did before the buckets."""
    with mock.patch.object(batching, "padded_width", _exact), mock.patch.object(replica, "padded_width", _exact):
        yield


def shapes_and_padding(lengths: list[int], max_tokens: int) -> tuple[int, float]:
    """(distinct batch shapes, padding as a fraction of the tokens computed) under the current widths."""
    planned = plan_batches(lengths, max_tokens, 64)
    shapes = {(len(rows), batching.padded_width(max(lengths[i] for i in rows))) for rows in planned}
    real = sum(n + SPECIAL_TOKENS for n in lengths)
    return len(shapes), 1 - real / sum(padded_tokens([lengths[i] for i in rows]) for rows in planned)


def embed_all(seqs: list[str], dtype: str) -> np.ndarray:
    from esm2cli.runtime.engine import build_engine

    setup = build_engine(
        ModelConfig(model="esm2_t6_8M", load_format="dummy", dtype=dtype, devices="cpu"), EmbedConfig()
    )
    rep, out = setup.replicas[0], np.empty((len(seqs), setup.model.hidden_size), np.float32)
    for rows in plan_batches([len(s) for s in seqs], setup.batch.max_tokens, setup.batch.batch_size):
        out[rows] = next(iter(rep.embed_batch([seqs[i] for i in rows]).pooled.values()))
    return out


def shift(a: np.ndarray, b: np.ndarray) -> str:
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return f"max |diff| {np.abs(a - b).max():.2e}, lowest cosine {cos.min():.7f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequences", type=int, default=32000)
    parser.add_argument("--embed", type=int, default=300)
    args = parser.parse_args()
    lengths = [min(len(s), 1022) for s in draw_sequences(args.sequences)]
    for kind, budget in DEFAULT_MAX_TOKENS.items():
        with exact_widths():
            before = shapes_and_padding(lengths, budget)
        after = shapes_and_padding(lengths, budget)
        print(
            f"{args.sequences} proteins, {kind} budget {budget}: exact widths {before[0]} shapes, "
            f"{before[1]:.1%} padding; buckets {after[0]} shapes, {after[1]:.1%} padding"
        )
    seqs = [s[:1022] for s in draw_sequences(args.embed, seed=1)]
    with exact_widths():
        fp32 = embed_all(seqs, "float32")
        bf16_exact = embed_all(seqs, "bfloat16")
    fp32_buckets = embed_all(seqs, "float32")
    bf16_buckets = embed_all(seqs, "bfloat16")
    print(f"{args.embed} proteins, 8M architecture: fp32 buckets against fp32 exact: {shift(fp32_buckets, fp32)}")
    print(f"  bf16 exact widths against fp32: {shift(bf16_exact, fp32)}")
    print(f"  bf16 buckets against fp32:      {shift(bf16_buckets, fp32)}")
    print(f"  bf16 buckets against bf16 exact: {shift(bf16_buckets, bf16_exact)}")


if __name__ == "__main__":
    main()
