"""The approximate kinds: IVF-PQ and HNSW find the exact neighbours (recall@10 >= 0.95, re-ranked scores are
cosines), in an index of at most 1/8 of the float32 vectors a vector."""

from __future__ import annotations

import numpy as np
import pytest

from esm2cli.config import IndexConfig
from esm2cli.errors import ConfigError
from esm2cli.search import ann
from esm2cli.search.build import build_index
from esm2cli.search.index import Index
from searchdata import clustered


@pytest.mark.parametrize("hidden", [32, 320, 480, 640, 1152, 1280, 2560, 5120])
def test_pq_codes_and_ids_fit_in_an_eighth_of_the_float32_vector(hidden):
    m = ann.pq_subquantizers(hidden)
    assert hidden % m == 0 and m + 8 <= 4 * hidden / 8
    assert m >= hidden // 8  # sub-vectors of 8 dimensions or fewer: codes fine enough to re-rank from


def test_ivf_shape_follows_the_square_root_and_the_sample():
    assert ann.ivf_shape(1_000_000, 1280, 52_428)["nlist"] == min(4000, 52_428 // 39)
    assert ann.ivf_shape(10_000, 320, 10_000) == {"nlist": 256, "m": 80, "nbits": 8}
    with pytest.raises(ConfigError, match="--kind flat"):
        ann.train_rows(100, 32)


@pytest.fixture(scope="module")
def databases(tmp_path_factory, embedded):
    from helpers import write_like

    root = tmp_path_factory.mktemp("ann")
    source = write_like(embedded / "out.parquet", root / "c.parquet", clustered(4000, seed=8), row_group_size=1000)
    for kind in ("flat", "ivf-pq", "hnsw"):
        build_index([source], root / kind, IndexConfig(kind=kind, decoys=0))
    return {kind: Index.open(root / kind) for kind in ("flat", "ivf-pq", "hnsw")}


def _recall(truth, found) -> float:
    pairs = zip(truth, found, strict=True)
    return float(np.mean([len({h.target for h in a} & {h.target for h in b}) / len(a) for a, b in pairs]))


@pytest.mark.parametrize("kind", ["ivf-pq", "hnsw"])
def test_recall_at_10_against_the_exact_search(databases, kind):
    queries = _fresh_queries()
    truth = databases["flat"].search_vectors(queries, 10)
    found = databases[kind].search_vectors(queries, 10)
    assert _recall(truth, found) >= 0.95
    setting = databases[kind].manifest["shards"][0]["search"]
    assert setting["recall_at_10"] >= 0.95 and ("nprobe" in setting) == (kind == "ivf-pq")
    shared = []
    for want, got in zip(truth, found, strict=True):
        exact = {h.target: h.score for h in want}
        shared += [(h.score, exact[h.target]) for h in got if h.target in exact]
    got, want = np.array(shared).T
    np.testing.assert_allclose(got, want, atol=2e-3)  # re-ranked: cosines of float16 rows, not PQ estimates


def _fresh_queries() -> np.ndarray:
    """Points around the database's centres (clustered's seed 8) that are no database vectors."""
    rng = np.random.default_rng(8)
    middle = rng.standard_normal((40, 32))
    picked = np.random.default_rng(99).integers(0, 40, 200)
    points = middle[picked] + 0.35 * np.random.default_rng(98).standard_normal((200, 32))
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)


def test_nprobe_given_is_the_one_used(databases):
    index = databases["ivf-pq"]
    queries = _fresh_queries()
    nlist = index._shards[0].index.nlist
    truth = databases["flat"].search_vectors(queries, 10)
    narrow = _recall(truth, index.search_vectors(queries, 10, nprobe=1))
    wide = _recall(truth, index.search_vectors(queries, 10, nprobe=nlist))
    assert narrow < wide
