import random

import pytest

from esm2cli.runtime.batching import padded_tokens, plan_batches, windows


@pytest.mark.parametrize("seed", range(5))
def test_every_index_once_and_budget_kept(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 1500) for _ in range(500)]
    batches = plan_batches(lengths, max_tokens=4096, max_batch=64)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= 64
        assert len(b) == 1 or padded_tokens([lengths[i] for i in b]) <= 4096


def test_sorted_by_length_so_padding_is_small():
    lengths = [1000, 10, 1000, 10, 500, 10]
    batches = plan_batches(lengths, max_tokens=2100, max_batch=64)
    assert batches == [[1, 3, 5, 4], [0, 2]]


def test_count_cap_applies_under_a_large_budget():
    batches = plan_batches([5] * 130, max_tokens=10**9, max_batch=64)
    assert [len(b) for b in batches] == [64, 64, 2]


def test_oversized_sequence_gets_its_own_batch():
    batches = plan_batches([3000, 10], max_tokens=1000, max_batch=64)
    assert batches == [[1], [0]]


def test_specials_are_counted():
    # two sequences of 1022 residues take 2 * 1024 tokens, not 2 * 1023
    assert plan_batches([1022, 1022], max_tokens=2047, max_batch=64) == [[0], [1]]
    assert plan_batches([1022, 1022], max_tokens=2048, max_batch=64) == [[0, 1]]


def test_empty():
    assert plan_batches([], 100, 4) == []


def test_windows():
    assert list(windows(range(7), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(windows([], 3)) == []
