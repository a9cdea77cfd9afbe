"""The approximate kinds: FAISS's IVF-PQ and HNSW over a shard's vectors, and the exact re-ranking of what they find.

An approximate index only proposes candidates (CANDIDATES(k) of them); their scores are then computed exactly from
the shard's float16 vectors (exact.rescore), so a reported score is a cosine, never a quantised estimate. How far
to search (IVF-PQ's nprobe, HNSW's efSearch) is measured when a shard is built: the least that finds
TARGET_RECALL of the true 10 nearest neighbours of a sample of the shard's own vectors, after re-ranking.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from esm2cli.errors import ConfigError
from esm2cli.search import exact

TARGET_RECALL = 0.95
CALIBRATION_QUERIES = 200  # shard vectors searched to measure the recall of each setting
HNSW_LINKS = 32  # neighbours per node (FAISS's M): memory 2 x 32 x 4 bytes a vector beside the vectors
HNSW_EF_CONSTRUCTION = 80
TRAIN_BYTES = 256 << 20  # the training sample of IVF-PQ at most (rows x hidden float32)
MIN_TRAIN_ROWS = 256
POINTS_PER_CENTROID = 39  # FAISS's k-means wants at least this many training points per centroid


def candidate_count(k: int) -> int:
    """Candidates an approximate index proposes for a top-k, re-ranked exactly: max(10 k, 100)."""
    return max(10 * k, 100)


def pq_subquantizers(hidden: int) -> int:
    """PQ sub-quantizers: the largest divisor of ``hidden`` up to hidden / 4 whose one-byte codes and the 8-byte id
    FAISS keeps per vector fit in 1/8 of the float32 vector (4 hidden bytes)."""
    fitting = [m for m in range(1, hidden // 4 + 1) if hidden % m == 0 and 8 * (m + 8) <= 4 * hidden]
    return fitting[-1] if fitting else 1


def ivf_shape(total_rows: int, hidden: int, sample_rows: int) -> dict:
    """nlist (about 4 sqrt(N), no more than the sample trains), PQ sub-quantizers and bits per code."""
    nlist = max(1, min(round(4 * math.sqrt(total_rows)), sample_rows // POINTS_PER_CENTROID))
    nbits = max(1, min(8, int(math.log2(max(2, sample_rows // POINTS_PER_CENTROID)))))
    return {"nlist": nlist, "m": pq_subquantizers(hidden), "nbits": nbits}


def train_rows(total_rows: int, hidden: int) -> int:
    """The training sample's rows: every row up to TRAIN_BYTES of them.

    Raises:
        ConfigError: Fewer than MIN_TRAIN_ROWS vectors: too few to train a quantizer.
    """
    if total_rows < MIN_TRAIN_ROWS:
        raise ConfigError(f"--kind ivf-pq needs at least {MIN_TRAIN_ROWS} vectors (the inputs hold {total_rows}): "
                          "use --kind flat, which is exact")  # fmt: skip
    return min(total_rows, max(MIN_TRAIN_ROWS, TRAIN_BYTES // (4 * hidden)))


def train_ivfpq(sample: np.ndarray, shape: dict, seed: int):
    """An IVF-PQ index (inner product) trained on ``sample``, holding no vectors yet."""
    import faiss

    hidden = sample.shape[1]
    factory = f"IVF{shape['nlist']},PQ{shape['m']}x{shape['nbits']}"
    index = faiss.index_factory(hidden, factory, faiss.METRIC_INNER_PRODUCT)
    ivf: Any = faiss.downcast_index(faiss.extract_index_ivf(index))  # the IndexIVFPQ, whose stubs FAISS lacks
    ivf.cp.seed = seed
    ivf.pq.cp.seed = seed
    index.train(np.ascontiguousarray(sample, np.float32))
    return index


def fill(index, vectors: np.ndarray):
    """Adds a shard's vectors to an index (trained IVF-PQ, or a new HNSW) block by block; rows are ids 0..n-1."""
    step = exact.block_rows(vectors.shape[1], vectors.dtype.itemsize)
    for start in range(0, len(vectors), step):
        index.add(np.ascontiguousarray(vectors[start : start + step], np.float32))
    return index


def new_hnsw(hidden: int):
    """An empty HNSW index over inner products."""
    import faiss

    index = faiss.IndexHNSWFlat(hidden, HNSW_LINKS, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    return index


def propose(index, queries: np.ndarray, count: int, setting: dict) -> np.ndarray:
    """The ``count`` candidate rows the index proposes per query (-1 for none), under a search setting."""
    import faiss

    count = min(count, index.ntotal)
    # Per-call parameters, not the index's own fields: threads of a server share one index.
    params: Any
    if "nprobe" in setting:
        params = faiss.SearchParametersIVF()
        params.nprobe = int(setting["nprobe"])
    else:
        params = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]
        params.efSearch = max(int(setting["ef_search"]), count)
    _, rows = index.search(np.ascontiguousarray(queries, np.float32), count, params=params)
    return rows.astype(np.int64)


def search(index, vectors: np.ndarray, queries: np.ndarray, k: int, setting: dict) -> tuple[np.ndarray, np.ndarray]:
    """The top k of a shard through its index: candidates proposed, re-scored exactly from ``vectors``, best first.

    Returns:
        (scores float32, rows int64), each (n, k); -1 rows (score -inf) where fewer were found.
    """
    rows = propose(index, queries, candidate_count(k), setting)
    scores = exact.rescore(queries, vectors, rows)
    keys = np.where(rows >= 0, rows, np.iinfo(np.int64).max)
    scores, rows = exact.best(scores, keys, k)
    if rows.shape[1] < k:
        pad = k - rows.shape[1]
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        rows = np.pad(rows, ((0, 0), (0, pad)), constant_values=-1)
    return scores, np.where(np.isfinite(scores), rows, -1)


def calibrate(index, vectors: np.ndarray, kind: str, seed: int) -> dict:
    """The least search setting (nprobe, or efSearch) whose re-ranked recall@10 reaches TARGET_RECALL on a sample of
    the shard's own vectors (each query's own row left out), with the recall measured; the widest tried otherwise.
    """
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(len(vectors), size=min(CALIBRATION_QUERIES, len(vectors)), replace=False))
    queries = np.ascontiguousarray(vectors[picked], np.float32)
    k = min(10, len(vectors) - 1)
    if k < 1:
        return {**_settings(index, kind)[-1], "recall_at_10": 1.0}
    _, truth = exact.top_k(queries, vectors, k + 1)
    setting: dict = {}
    recall = 0.0
    for setting in _settings(index, kind):
        _, found = search(index, vectors, queries, k + 1, setting)
        recall = _recall(truth, found, picked, k)
        if recall >= TARGET_RECALL:
            break
    return {**setting, "recall_at_10": round(recall, 4)}


def _settings(index, kind: str) -> list[dict]:
    if kind == "ivf-pq":
        import faiss

        nlist = faiss.extract_index_ivf(index).nlist
        probes = sorted({min(2**i, nlist) for i in range(int(math.log2(nlist)) + 2)})
        return [{"nprobe": p} for p in probes]
    most = max(candidate_count(10), index.ntotal)
    return [{"ef_search": ef} for ef in (100, 200, 400, 800, 1600) if ef < most] + [{"ef_search": most}]


def _recall(truth: np.ndarray, found: np.ndarray, own: np.ndarray, k: int) -> float:
    """The share of each query's true k neighbours (itself left out) among the k found (itself left out)."""
    hits = 0
    for row, want, got in zip(own, truth, found, strict=True):
        want_set = [r for r in want if r != row and r >= 0][:k]
        got_set = set([r for r in got if r != row and r >= 0][:k])
        hits += len(set(want_set) & got_set)
    return hits / (k * len(own))
