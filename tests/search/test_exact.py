"""Exact top-k over a memory map, in one FAISS call or block by block: numpy's brute force, whatever the blocks."""

from __future__ import annotations

import numpy as np
import pytest

from esm2cli.search import exact
from searchdata import unit


@pytest.fixture(scope="module")
def database(tmp_path_factory):
    vectors = unit(np.random.default_rng(4).standard_normal((3000, 32)))
    path = tmp_path_factory.mktemp("exact") / "vectors.f32"
    vectors.tofile(path)
    return vectors, exact.open_vectors(str(path), len(vectors), 32)


def brute_force(queries, vectors, k):
    scores = queries.astype(np.float64) @ vectors.astype(np.float64).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


def test_top_k_equals_numpy_brute_force(database):
    vectors, mapped = database
    queries = unit(np.random.default_rng(5).standard_normal((50, 32)))
    scores, rows = exact.top_k(queries, mapped, 10)
    want_scores, want_rows = brute_force(queries, vectors, 10)
    np.testing.assert_allclose(scores, want_scores, atol=1e-4)
    assert np.array_equal(rows, want_rows)  # random vectors: no ties
    assert np.all(np.diff(scores, axis=1) <= 0)  # best first


def test_blocks_give_the_very_same_hits_as_one_search_of_the_map(database, monkeypatch):
    """A float32 map in one FAISS call, and the same vectors (strided, so copied) in blocks of 1,024 rows (three
    blocks and a part): bit-identical scores, the same rows."""
    vectors, mapped = database
    queries = unit(np.random.default_rng(6).standard_normal((20, 32)))
    whole = exact.top_k(queries, mapped, 7)
    monkeypatch.setattr(exact, "BLOCK_BYTES", 1)  # block_rows' floor of 1,024 rows
    assert exact.block_rows(32) == 1024
    strided = np.hstack([vectors, vectors])[:, :32]
    assert not strided.flags.c_contiguous
    blocked = exact.top_k(queries, strided, 7)
    assert np.array_equal(whole[0], blocked[0]) and np.array_equal(whole[1], blocked[1])


def test_float16_vectors_are_searched_a_block_at_a_time(database, monkeypatch):
    vectors, _ = database
    half = vectors.astype(np.float16)
    queries = unit(np.random.default_rng(8).standard_normal((15, 32)))
    monkeypatch.setattr(exact, "BLOCK_BYTES", 1)
    scores, rows = exact.top_k(queries, half, 5)
    want_scores, want_rows = brute_force(queries, half.astype(np.float32), 5)
    assert np.array_equal(rows, want_rows)
    np.testing.assert_allclose(scores, want_scores, atol=1e-4)


def test_a_score_depends_on_the_two_vectors_alone(database):
    """The same query scored alone or among others, against the whole map or a slice of it: the same bits."""
    _, mapped = database
    queries = unit(np.random.default_rng(7).standard_normal((9, 32)))
    rows = np.tile(np.arange(40, 60), (9, 1))
    together = exact.rescore(queries, mapped, rows)
    alone = exact.rescore(queries[3:4], mapped[40:60], rows[3:4] - 40)
    assert np.array_equal(together[3], alone[0])


def test_ties_go_to_the_lower_row_and_short_databases_pad():
    vectors = unit(np.array([[1, 0], [0, 1], [1, 0], [1, 1]], np.float32))
    scores, rows = exact.top_k(unit(np.array([[1, 0]], np.float32)), vectors, 6)
    assert rows[0].tolist() == [0, 2, 3, 1, -1, -1]
    assert np.isneginf(scores[0, 4:]).all()
    assert exact.top_k(np.ones((2, 2), np.float32), np.zeros((0, 2), np.float32), 3)[1].tolist() == [[-1] * 3] * 2
