"""Exact top-k by inner product over a memory-mapped file of unit vectors.

A float32 file is searched by one faiss.knn (BLAS under it) over the whole map, read in place: the search holds
the queries and FAISS's one (queries x SCORE_BYTES) score buffer beyond the page cache. Float16 vectors are copied
to float32 a block (BLOCK_BYTES) at a time, and the blocks' best merged in a faiss.ResultHeap, as FAISS's
``contrib/big_batch_search.py`` does. The candidates are then scored again in float64, one query at a time, so a
score depends on the two vectors alone and not on the block shapes BLAS saw: a database built in shards gives the
very scores, and so the very hits, of one built whole. Ties are broken by row, lowest first."""

from __future__ import annotations

import numpy as np

BLOCK_BYTES = 64 << 20  # float16 database rows copied to float32 at a time
SCORE_BYTES = 64 << 20  # float32 (queries x database rows) scores FAISS holds at a time
QUERY_BS = 4096  # queries FAISS multiplies at a time (its default)
RESCORE_BYTES = 16 << 20  # float64 candidate rows scored at a time
# Candidates kept per query beyond k before the float64 scores decide: a vector whose float32 score lands on the
# other side of the k-th by rounding (1e-7) is still among them.
MARGIN = 8


def open_vectors(path: str, rows: int, hidden: int, dtype: str = "float32") -> np.ndarray:
    """The (rows, hidden) vectors of a raw file, memory-mapped read-only (an empty array for no rows)."""
    if rows == 0:
        return np.zeros((0, hidden), np.dtype(dtype))
    return np.memmap(path, dtype=np.dtype(dtype), mode="r", shape=(rows, hidden))


def block_rows(hidden: int, itemsize: int = 4) -> int:
    """Rows per block: BLOCK_BYTES of them (at least 1,024, so small widths still make large matmuls)."""
    return max(1024, BLOCK_BYTES // (hidden * itemsize))


def candidates(queries: np.ndarray, vectors: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``count`` rows of highest inner product with each query (float32 scores, unordered ties), block by block.

    Args:
        queries: (n, hidden) float32.
        vectors: (rows, hidden) float32 or float16, a memory map or an array.
        count: Candidates per query; rows past the database's size are -1 with score -inf.

    Returns:
        (scores, rows), both (n, count), best first.
    """
    import faiss

    _score_rows(len(queries))
    if vectors.dtype == np.float32 and vectors.flags.c_contiguous:
        # FAISS reads a float32 map as it is: one call over every row, no block copied, and one score buffer,
        # which FAISS allocates (and the kernel zeroes) per call: per block it cost 0.82x IndexFlatIP at 1M x 320.
        scores, rows = faiss.knn(queries, vectors, count, metric=faiss.METRIC_INNER_PRODUCT)
    else:
        scores, rows = _blockwise(faiss, queries, vectors, count)
    rows = rows.astype(np.int64)
    return np.where(rows >= 0, scores, -np.inf).astype(np.float32), rows


def _score_rows(queries: int) -> None:
    """Sets the database rows FAISS scores against the queries at a time: SCORE_BYTES of float32 scores.

    FAISS's default, 1,024 rows, is too thin a matmul for BLAS (1,000 queries of 200k x 320: 31 GFLOP/s so, 90
    with 64k rows). Scores move by float32 rounding at most, which the float64 re-scoring removes. A process-wide
    FAISS setting: each search sets its own.
    """
    import faiss

    faiss.cvar.distance_compute_blas_query_bs = max(1, min(queries, QUERY_BS))
    faiss.cvar.distance_compute_blas_database_bs = max(1024, SCORE_BYTES // (4 * max(1, min(queries, QUERY_BS))))


def _blockwise(faiss, queries: np.ndarray, vectors: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """candidates' search of vectors FAISS cannot read as they are (float16): a float32 copy a block at a time."""
    heap = faiss.ResultHeap(len(queries), count, keep_max=True)
    step = block_rows(vectors.shape[1], vectors.dtype.itemsize)
    for start in range(0, len(vectors), step):
        block = np.ascontiguousarray(vectors[start : start + step], dtype=np.float32)
        scores, rows = faiss.knn(queries, block, min(count, len(block)), metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(np.ascontiguousarray(scores), np.ascontiguousarray(rows + start))
    heap.finalize()
    return heap.D, heap.I


def rescore(queries: np.ndarray, vectors: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Inner products of each query with its candidate rows, summed in float64 in one fixed order, as float32.

    Args:
        queries: (n, hidden).
        vectors: (rows, hidden), a memory map or an array.
        rows: (n, c) row numbers; -1 for none (scored -inf).
    """
    n, width = rows.shape
    out = np.full((n, width), -np.inf, np.float32)
    if n == 0 or width == 0:
        return out
    hidden = queries.shape[1]
    per = max(1, RESCORE_BYTES // (8 * hidden * width))
    for start in range(0, n, per):
        taken = rows[start : start + per]
        valid = taken >= 0
        gathered = np.asarray(vectors[np.where(valid, taken, 0).ravel()], np.float64).reshape(*taken.shape, hidden)
        products = (gathered * queries[start : start + per, None, :].astype(np.float64)).sum(axis=2)
        out[start : start + per] = np.where(valid, products, -np.inf).astype(np.float32)
    return out


def best(scores: np.ndarray, keys: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best of each row of (scores, keys): highest score first, ties by the lower key; -inf entries last."""
    order = np.lexsort((keys, -scores.astype(np.float64)), axis=1)[:, :k]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(keys, order, axis=1)


def top_k(queries: np.ndarray, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The exact k best rows of ``vectors`` for each query: (scores float32, rows int64), each (n, k), best first.

    Rows past the database's size are -1 (score -inf).
    """
    if len(vectors) == 0:
        return np.full((len(queries), k), -np.inf, np.float32), np.full((len(queries), k), -1, np.int64)
    _, rows = candidates(queries, vectors, min(k + MARGIN, len(vectors)))
    scores = rescore(queries, vectors, rows)
    scores, rows = best(scores, np.where(rows >= 0, rows, np.iinfo(np.int64).max), k)
    if rows.shape[1] < k:  # fewer rows than k: pad
        pad = k - rows.shape[1]
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        rows = np.pad(rows, ((0, 0), (0, pad)), constant_values=-1)
    return scores, np.where(np.isfinite(scores), rows, -1)
