"""Batch planning: packed batches filled to a token budget (pack_batches, what the forwards run), and padded
batches of similar length (plan_batches, for forwards that pad every row to the widest). Pure Python, no torch."""

from __future__ import annotations

import bisect
from collections.abc import Sequence

SPECIAL_TOKENS = 2  # ESM-2 adds <cls> and <eos> to every sequence
# Every forward's width comes from a small ladder: the multiples of WIDTH_BUCKET up to 1,024 tokens, then
# WIDTH_STEPS_PER_OCTAVE steps an octave (multiples of 64 up to 2,048, of 128 up to 4,096...). oneDNN
# builds and caches one kernel per matmul shape; with widths of exactly longest + 2, 32,000 proteins
# made 985 shapes and ~1 GB of cached kernels on the CPU, with the ladder 43 (+4.3% padding). CUDA graphs
# captured per shape want the same small set.
WIDTH_BUCKET = 32
WIDTH_STEPS_PER_OCTAVE = 16
# Packed batches (sequences laid end to end, no padding) have a token count instead of a width: a coarser
# ladder of 4 steps an octave (at most 25% of extra tokens, ~12% on average) keeps the number of shapes (or graphs) low.
TOKEN_STEPS_PER_OCTAVE = 4
# The CUDA graphs' smallest token bucket for batch jobs, which fill their budget: smaller ones would only add
# captures (the server starts lower, for its short requests: esm2cli.runtime.engine.SERVER_SMALLEST_BUCKET).
SMALLEST_TOKEN_BUCKET = 1024


def ladder(n: int, step: int, per_octave: int) -> int:
    """The smallest rung at or above ``n`` of a ladder: multiples of ``step``, coarsening with size.

    Rungs are multiples of ``step`` while those are fine enough, then ``per_octave`` evenly spaced
    rungs between consecutive powers of two: the padding stays below ``step`` or ``n / per_octave``,
    whichever is larger, and the rungs up to N number about ``N / step`` for small N, then ``per_octave``
    more an octave.

    Args:
        n: What must fit (at least 1).
        step: The finest step, and the smallest rung.
        per_octave: Rungs between one power of two and the next, once those are coarser than ``step``.
    """
    n = max(n, 1)
    octave_top = 1 << (n - 1).bit_length()  # the power of two at or above n; the octave spans half of it
    unit = max(step, octave_top // (2 * per_octave))
    return -(-n // unit) * unit


def padded_width(longest: int, specials: int = SPECIAL_TOKENS) -> int:
    """Tokens per row of a padded batch whose longest sequence has ``longest`` residues (specials included).

    The one place batch widths are chosen: tokenising pads to this, and plan_batches counts it.
    """
    return ladder(longest + specials, WIDTH_BUCKET, WIDTH_STEPS_PER_OCTAVE)


def token_bucket(tokens: int, budget: int | None = None, per_octave: int = TOKEN_STEPS_PER_OCTAVE) -> int:
    """Tokens to allocate for a packed batch of ``tokens`` tokens (sequences end to end, no padding).

    Args:
        tokens: Real tokens in the batch (specials included).
        budget: The batch's token budget: no bucket exceeds it unless ``tokens`` alone does.
        per_octave: Rungs an octave (see ladder); more rungs, less padding, more shapes.
    """
    rung = ladder(tokens, WIDTH_BUCKET, per_octave)
    return max(tokens, min(rung, budget)) if budget else rung


def token_buckets(budget: int, smallest: int = SMALLEST_TOKEN_BUCKET) -> list[int]:
    """Every rung of the packed-token ladder from ``smallest`` up to ``budget``: the CUDA graphs a replica captures.

    A batch runs in the smallest bucket that holds it (its tokens padded with a dummy segment), so the
    padding is at most a quarter of a bucket (TOKEN_STEPS_PER_OCTAVE), not half as with halvings.
    """
    buckets = []
    n = min(smallest, budget)
    while True:
        rung = token_bucket(n, budget)
        buckets.append(rung)
        if rung >= budget:
            return buckets
        n = rung + 1


def plan_batches(
    lengths: Sequence[int], max_tokens: int, max_batch: int, specials: int = SPECIAL_TOKENS
) -> list[list[int]]:
    """Groups sequences into batches of similar length under a padded-token budget.

    Sequences are sorted by length, then each batch is filled while
    ``padded_width(widest) * count <= max_tokens`` and ``count <= max_batch``: the budget counts the
    width the batch is padded to. A sequence wider than the budget gets a batch of its own.

    Args:
        lengths: Residues per sequence (after truncation).
        max_tokens: Padded tokens per batch, specials included.
        max_batch: Sequences per batch at most.
        specials: Tokens added to every sequence.

    Returns:
        Batches of indices into ``lengths``; together they hold every index exactly once.
    """
    batches: list[list[int]] = []
    cur: list[int] = []
    widest = 0
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        width = padded_width(lengths[i], specials)
        if cur and (len(cur) >= max_batch or max(widest, width) * (len(cur) + 1) > max_tokens):
            batches.append(cur)
            cur, widest = [], 0
        cur.append(i)
        widest = max(widest, width)
    if cur:
        batches.append(cur)
    return batches


def pack_batches(
    lengths: Sequence[int], max_tokens: int, max_batch: int, specials: int = SPECIAL_TOKENS
) -> list[list[int]]:
    """Groups sequences into packed batches (laid end to end) of at most ``max_tokens`` tokens, filled up.

    esm2cli's forwards compute a packed batch's tokens, not a padded rectangle, and round its rows up to whole
    matmul tiles (esm2cli.model.invariant.ROW_TILE); a protein's numbers do not depend on its batch mates. So
    a batch starts with the longest sequence left, then takes, again and again, the longest that still fits
    (best fit): on the CPU's default budget of 1,024 tokens the computed rows beyond the real tokens fall to
    ~0.3% for a chunk of 4,096 proteins (~7% when the gap was filled with the shortest, ~16% for batches of
    similar length; benchmarks/pack_fill.py). A sequence longer than the budget gets a batch of its own.

    Args:
        lengths: Residues per sequence (after truncation).
        max_tokens: Tokens per batch, specials included.
        max_batch: Sequences per batch at most.
        specials: Tokens added to every sequence.

    Returns:
        Batches of indices into ``lengths``, longest first; together they hold every index exactly once.
    """
    # Sequences of one length are taken in input order (the rightmost of equal keys has the lowest index): a
    # long protein's windows then reach their stitcher in order and memory stays flat (runtime.windows).
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], -i))
    keys = [lengths[i] + specials for i in order]
    batches: list[list[int]] = []
    while order:
        batch, tokens = [order.pop()], keys.pop()
        while order and len(batch) < max_batch:
            fits = bisect.bisect_right(keys, max_tokens - tokens) - 1
            if fits < 0:
                break
            batch.append(order.pop(fits))
            tokens += keys.pop(fits)
        batches.append(batch)
    return batches


def padded_tokens(lengths: Sequence[int], specials: int = SPECIAL_TOKENS) -> int:
    """Tokens a batch of these lengths computes once padded (to the width bucket of its widest member)."""
    return padded_width(max(lengths), specials) * len(lengths) if lengths else 0
