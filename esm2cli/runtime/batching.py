"""Batch planning: sort by length, cut by a padded-token budget. Pure Python, no torch."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from typing import TypeVar

T = TypeVar("T")

SPECIAL_TOKENS = 2  # ESM-2 adds <cls> and <eos> to every sequence


def plan_batches(
    lengths: Sequence[int], max_tokens: int, max_batch: int, specials: int = SPECIAL_TOKENS
) -> list[list[int]]:
    """Groups sequences into batches of similar length under a padded-token budget.

    Sequences are sorted by length, then each batch is filled while
    ``widest * count <= max_tokens`` and ``count <= max_batch``. A sequence wider than the
    budget gets a batch of its own.

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
        width = lengths[i] + specials
        if cur and (len(cur) >= max_batch or max(widest, width) * (len(cur) + 1) > max_tokens):
            batches.append(cur)
            cur, widest = [], 0
        cur.append(i)
        widest = max(widest, width)
    if cur:
        batches.append(cur)
    return batches


def padded_tokens(lengths: Sequence[int], specials: int = SPECIAL_TOKENS) -> int:
    """Tokens a batch of these lengths computes once padded to its widest member."""
    return (max(lengths) + specials) * len(lengths) if lengths else 0


def windows(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Yields consecutive lists of at most ``size`` items, so that sorting stays bounded in memory."""
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk
