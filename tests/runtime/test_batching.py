import random

import pytest

from esm2cli.runtime.batching import (
    SPECIAL_TOKENS,
    WIDTH_BUCKET,
    WIDTH_STEPS_PER_OCTAVE,
    ladder,
    pack_batches,
    padded_tokens,
    padded_width,
    plan_batches,
    token_bucket,
)


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


def test_widths_come_from_a_small_ladder_and_fit():
    widths = {padded_width(n) for n in range(1, 4001)}
    assert all(w % WIDTH_BUCKET == 0 for w in widths)
    assert len({padded_width(n) for n in range(1, 1023)}) == 1024 // WIDTH_BUCKET  # up to ESM-2's 1,024 tokens
    assert len(widths) <= 1024 // WIDTH_BUCKET + 2 * WIDTH_STEPS_PER_OCTAVE  # two more octaves, to 4,096
    for n in range(1, 4001):
        width = padded_width(n)
        assert n + SPECIAL_TOKENS <= width  # every sequence fits, with <cls> and <eos>
        assert width - (n + SPECIAL_TOKENS) < max(WIDTH_BUCKET, (n + SPECIAL_TOKENS) / WIDTH_STEPS_PER_OCTAVE)
        assert padded_width(n + 1) >= width  # monotone


def test_ladder_rungs_per_octave():
    rungs = sorted({ladder(n, 32, 4) for n in range(1, 1 << 15)})
    octave = [r for r in rungs if 4096 < r <= 8192]
    assert octave == [5120, 6144, 7168, 8192]
    assert rungs[:4] == [32, 64, 96, 128]


def test_token_bucket_stays_in_the_budget_unless_the_tokens_do_not():
    for tokens in range(1, 5000, 7):
        bucket = token_bucket(tokens, budget=4096)
        assert tokens <= bucket
        assert bucket <= max(4096, tokens)
    assert token_bucket(4000, budget=4096) == 4096
    assert token_bucket(5000, budget=4096) == 5000


def test_budget_counts_the_padded_width():
    # 300 residues pad to 320 tokens: three fit in 960 tokens, while 302-token rows would fit in 906
    assert [len(b) for b in plan_batches([300] * 3, max_tokens=959, max_batch=64)] == [2, 1]
    assert [len(b) for b in plan_batches([300] * 3, max_tokens=960, max_batch=64)] == [3]
    assert padded_tokens([300, 10]) == 2 * padded_width(300) == 640


def test_graph_buckets_climb_the_token_ladder_to_the_budget():
    from esm2cli.runtime.batching import token_bucket, token_buckets

    buckets = token_buckets(32768)
    assert buckets[0] == 1024 and buckets[-1] == 32768 and buckets == sorted(set(buckets))
    for tokens in (1024, 1025, 3000, 9000, 20000, 32768):  # the bucket a batch runs in wastes <= a quarter
        fit = min(b for b in buckets if b >= tokens)
        assert fit == token_bucket(tokens, 32768) or tokens <= 1024
        assert fit <= max(1024, 1.25 * tokens)
    assert token_buckets(700) == [700]  # a budget under the smallest bucket is its own bucket


@pytest.mark.parametrize("seed", range(5))
def test_packed_batches_hold_every_index_once_within_the_budget(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 1500) for _ in range(500)]
    batches = pack_batches(lengths, max_tokens=1024, max_batch=8)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= 8
        assert len(b) == 1 or sum(lengths[i] + SPECIAL_TOKENS for i in b) <= 1024


def test_packed_batches_fill_the_gap_with_the_longest_that_fits():
    # 502 + 302 tokens leave 220: 250 does not fit, 200 does (202); the 18 left hold neither 20-residue protein.
    # Filling with the shortest instead would take both 20s and leave 176 tokens unused.
    lengths = [500, 300, 250, 200, 20, 20]
    assert pack_batches(lengths, max_tokens=1024, max_batch=64) == [[0, 1, 3], [2, 4, 5]]


def test_packed_batches_take_equal_lengths_in_input_order():
    # a long protein's windows are equal lengths: they must reach the stitcher in order, as heads and as fills
    lengths = [1000, 1000, 1000, 10, 1000, 10]
    assert pack_batches(lengths, max_tokens=1024, max_batch=64) == [[0, 3], [1, 5], [2], [4]]


def test_packed_batches_compute_fewer_tile_rows_than_sorted_ones():
    from esm2cli.model.invariant import padded_rows

    rng = random.Random(3)
    lengths = [rng.randint(30, 1000) for _ in range(400)]

    def rows(batches):
        return sum(padded_rows(sum(lengths[i] + SPECIAL_TOKENS for i in b)) for b in batches)

    real = sum(n + SPECIAL_TOKENS for n in lengths)
    packed, sorted_ = rows(pack_batches(lengths, 1024, 64)), rows(plan_batches(lengths, 1024, 64))
    assert packed / real < 1.03 and 1.10 < sorted_ / real


def test_packed_batches_keep_the_count_cap_and_give_a_long_sequence_its_own():
    assert [len(b) for b in pack_batches([5] * 130, max_tokens=10**9, max_batch=64)] == [64, 64, 2]
    assert pack_batches([3000, 10], max_tokens=1000, max_batch=64) == [[0], [1]]
    assert pack_batches([40] * 30, max_tokens=1024, max_batch=64) == [list(range(24)), list(range(24, 30))]
    assert pack_batches([], 100, 4) == []


def test_packed_batches_take_an_exact_fit():
    # 510 residues + <cls> + <eos> = 512 tokens: two fill 1,024 exactly; 418 + 300 + 300 do too (420 + 302 + 302)
    assert pack_batches([510, 510], max_tokens=1024, max_batch=64) == [[0, 1]]
    assert pack_batches([300, 418, 300], max_tokens=1024, max_batch=64) == [[1, 0, 2]]
    assert pack_batches([510, 510], max_tokens=1023, max_batch=64) == [[0], [1]]  # one token short: two batches
