"""The map: every vector of the inputs placed in two dimensions by PCA or UMAP, coloured (colours), and the points
the page draws.

The projection (and --color-by cluster's k-means) is fitted on a bounded uniform sample of the points and applied
to the rest a row group at a time, so memory holds the sample, the annotations and two numbers a point, never every
vector. An input of no more points than the sample is fitted on all of them (and read once).
"""

from __future__ import annotations

import logging
import os
import re
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from esm2cli.config import MAP_METHODS, MAP_SAMPLE_BYTES, MapConfig
from esm2cli.errors import ConfigError, InputError
from esm2cli.search.colours import Colouring, Points, colour_points, parse_color_by, read_labels
from esm2cli.search.vectors import VectorInput, open_inputs, read_batches, total_rows

log = logging.getLogger(__name__)
MIN_POINTS = 3  # fewer say nothing a map could show (and PCA needs two components' worth)
_PART = re.compile(r"^(.*)part-(\d+)-of-(\d+)(\.[^/]+)$")  # a part of a sharded run (embed --shard-count)


@dataclass
class MapResult:
    """A built map: its points, their colours, the points the page draws, and what it cost."""

    inputs: list[VectorInput]
    points: Points
    colouring: Colouring
    fitted_on: int  # points the projection was fitted on
    shown: np.ndarray  # the rows the page draws, sorted (all of them up to max_points)
    method: str = "pca"
    seconds: dict[str, float] = field(default_factory=dict)  # read, fit, transform

    @property
    def sampled(self) -> bool:
        return len(self.shown) < len(self.points)


def build_map(paths: Sequence[str | os.PathLike], config: MapConfig, progress: Callable[[int], None] | None = None):
    """Reads the inputs, projects every point and colours it.

    Args:
        paths: esm2cli outputs (files, part folders, prefixes), all of one vector identity.
        config: The method, colouring and bounds.
        progress: Called with the rows of each batch read (twice a row when the input exceeds the sample).

    Returns:
        A MapResult.

    Raises:
        InputError: An input is not an output of one identity, holds too few points for the method, or the
            labels file is bad (see colours.read_labels) or shares no id with the input.
        ConfigError: A bad --color-by, --method or --clusters.
    """
    if config.method not in MAP_METHODS:
        raise ConfigError(f"--method {config.method}: use {' or '.join(MAP_METHODS)}")
    labels = read_labels(config.labels) if config.labels else None
    spec = parse_color_by(config.color_by, labels)
    inputs = open_inputs(paths, layer=config.layer, command="map")
    _warn_missing_parts(inputs)
    _check_size(inputs, config, spec.field == "cluster")
    points, fitted_on, seconds = project(inputs, config, clusters=spec.field == "cluster", progress=progress)
    _warn_repeated_ids(points.ids)
    colouring = colour_points(points, spec, labels)
    return MapResult(inputs, points, colouring, fitted_on, page_rows(len(points), config), config.method, seconds)


def _warn_repeated_ids(ids: pa.Array) -> None:
    # the same proteins in two inputs (one run written twice, overlapping runs): each copy is a point of its own
    counts = pc.value_counts(ids)
    repeated = pc.filter(counts, pc.greater(counts.field("counts"), 1))
    if len(repeated):
        first = repeated[0]
        log.warning(
            "%d ids appear more than once (%s: %d times); each copy is a point of its own, and the page's "
            "search box rings the first it finds",
            len(repeated),
            first["values"],
            first["counts"],
        )


def _warn_missing_parts(inputs: list[VectorInput]) -> None:
    # parts named one by one (a folder of unfinished parts is refused by open_inputs): the user is told what is not
    runs: dict[tuple[str, str, str, int], set[int]] = {}
    for source in inputs:
        found = _PART.match(source.path)
        if found:
            prefix, index, count, suffix = found.groups()
            runs.setdefault((prefix, count, suffix, len(index)), set()).add(int(index))
    for (prefix, count, suffix, width), present in runs.items():
        missing = sorted(set(range(int(count))) - present)
        if missing:
            first = f"{prefix}part-{missing[0]:0{width}d}-of-{count}{suffix}"
            more = f" (and {len(missing) - 1:,} more)" if len(missing) > 1 else ""
            log.warning(
                "%s is missing%s: the map holds %d of the run's %d parts", first, more, len(present), int(count)
            )


def _check_size(inputs: list[VectorInput], config: MapConfig, clusters: bool) -> None:
    total = total_rows(inputs)
    where = inputs[0].path if len(inputs) == 1 else f"{len(inputs)} inputs"
    if total < MIN_POINTS:
        raise InputError(f"{where}: {total} points; a map needs at least {MIN_POINTS}")
    # UMAP and k-means see the fit sample, not every point
    fitted = sample_size(inputs, config)
    seen = f"{total} points" if fitted == total else f"--sample {fitted} (of {total} points)"
    if config.method == "umap" and fitted <= config.neighbors:
        raise InputError(
            f"{where}: {seen}, no more than --neighbors {config.neighbors}; UMAP needs more points than "
            "neighbours (lower --neighbors, or use --method pca)"
        )
    if clusters and fitted < config.clusters:
        raise InputError(f"{where}: {seen}, fewer than --clusters {config.clusters}")


def sample_size(inputs: Sequence[VectorInput], config: MapConfig) -> int:
    """The points fitted on: --sample, held to MAP_SAMPLE_BYTES of vectors, at most every point."""
    total = total_rows(inputs)
    return max(MIN_POINTS, min(total, config.sample, MAP_SAMPLE_BYTES // (4 * inputs[0].hidden)))


def project(
    inputs: Sequence[VectorInput],
    config: MapConfig,
    *,
    clusters: bool = False,
    progress: Callable[[int], None] | None = None,
) -> tuple[Points, int, dict[str, float]]:
    """Every point of the inputs in two dimensions (and its k-means cluster), in input order.

    Returns:
        The points, how many the projection was fitted on, and the seconds spent reading, fitting and
        transforming.
    """
    total = total_rows(inputs)
    size = sample_size(inputs, config)
    rng = np.random.default_rng(config.seed)
    chosen = np.sort(rng.choice(total, size, replace=False)) if size < total else np.arange(total)
    started = time.perf_counter()
    points, sample = _read(inputs, chosen, progress)
    seconds = {"read": time.perf_counter() - started}
    started = time.perf_counter()
    model, fitted_xy = _fit(sample, config)
    centroids = kmeans(sample, config.clusters, config.seed) if clusters else None
    seconds["fit"] = time.perf_counter() - started
    started = time.perf_counter()
    if size == total:
        points.xy = fitted_xy if fitted_xy is not None else _transform(model, sample)
        points.clusters = assign(centroids, sample) if centroids is not None else None
    else:
        del sample  # the second pass holds one batch at a time
        points.xy, points.clusters = _transform_all(inputs, model, (chosen, fitted_xy), centroids, progress)
    seconds["transform"] = time.perf_counter() - started
    return points, size, seconds


def _read(
    inputs: Sequence[VectorInput], chosen: np.ndarray, progress: Callable[[int], None] | None
) -> tuple[Points, np.ndarray]:
    """Every point's annotations, and the vectors of the chosen rows (sorted row numbers)."""
    sample = np.empty((len(chosen), inputs[0].hidden), np.float32)
    ids, descriptions, lengths, truncated, windows = [], [], [], [], []
    offset = taken = 0
    for batch in read_batches(inputs):
        rows = len(batch)
        picked = chosen[np.searchsorted(chosen, offset) : np.searchsorted(chosen, offset + rows)] - offset
        sample[taken : taken + len(picked)] = batch.vectors[picked]
        taken += len(picked)
        ids.append(pa.array(batch.ids, pa.string()))
        descriptions.append(pa.array(batch.descriptions, pa.string()))
        lengths.append(batch.lengths)
        truncated.append(batch.truncated)
        windows.append(batch.windows)
        offset += rows
        if progress is not None:
            progress(rows)
    points = Points(
        ids=pa.concat_arrays(ids),
        descriptions=pa.concat_arrays(descriptions),
        lengths=np.concatenate(lengths),
        truncated=np.concatenate(truncated),
        windows=np.concatenate(windows),
        xy=np.zeros((offset, 2), np.float32),
    )
    return points, sample


def _fit(sample: np.ndarray, config: MapConfig):
    """The fitted projection, and the sample's own coordinates where the method gives them (UMAP)."""
    if config.method == "pca":
        from sklearn.decomposition import PCA

        # covariance_eigh: exact, deterministic, and one pass over a sample of many more points than dimensions
        return PCA(n_components=2, svd_solver="covariance_eigh").fit(sample), None
    import umap

    log.info("fitting UMAP (n_neighbors %d, seed %d) on %d points", config.neighbors, config.seed, len(sample))
    reducer = umap.UMAP(n_neighbors=config.neighbors, n_components=2, random_state=config.seed)
    with warnings.catch_warnings():
        # a seed makes umap-learn run on one thread, and it warns so on every run: the docs say it once
        warnings.filterwarnings("ignore", message="n_jobs value", category=UserWarning)
        xy = reducer.fit_transform(sample).astype(np.float32)
    return reducer, xy


def _transform(model, vectors: np.ndarray) -> np.ndarray:
    return np.asarray(model.transform(vectors), np.float32)


def _transform_all(inputs, model, fitted: tuple[np.ndarray, np.ndarray | None], centroids, progress):
    """The second pass: each batch projected (a UMAP sample point keeps the place its fit gave it)."""
    chosen, fitted_xy = fitted
    total = total_rows(inputs)
    xy = np.empty((total, 2), np.float32)
    labels = np.empty(total, np.int32) if centroids is not None else None
    offset = 0
    for batch in read_batches(inputs):
        rows = slice(offset, offset + len(batch))
        if fitted_xy is None:
            xy[rows] = _transform(model, batch.vectors)
        else:
            xy[rows] = _umap_batch(model, batch.vectors, chosen, fitted_xy, offset)
        if labels is not None:
            labels[rows] = assign(centroids, batch.vectors)
        offset += len(batch)
        if progress is not None:
            progress(len(batch))
    return xy, labels


def _umap_batch(model, vectors: np.ndarray, chosen: np.ndarray, fitted_xy: np.ndarray, offset: int) -> np.ndarray:
    lo, hi = np.searchsorted(chosen, offset), np.searchsorted(chosen, offset + len(vectors))
    inside = np.zeros(len(vectors), bool)
    inside[chosen[lo:hi] - offset] = True
    out = np.empty((len(vectors), 2), np.float32)
    out[inside] = fitted_xy[lo:hi]
    if (~inside).any():
        out[~inside] = _transform(model, vectors[~inside])
    return out


def kmeans(sample: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k centroids of the sample by FAISS k-means (seeded: one input, one clustering)."""
    import faiss

    # nredo: FAISS seeds its centroids at random points, and one unlucky draw merges two clusters; the best of a
    # few runs seldom does. min_points_per_centroid 1: a small map is clustered without a warning on stderr.
    model = faiss.Kmeans(sample.shape[1], k, niter=25, nredo=5, seed=seed, verbose=False, min_points_per_centroid=1)
    model.train(np.ascontiguousarray(sample, np.float32))
    return np.asarray(model.centroids, np.float32)


def assign(centroids: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Each vector's nearest centroid (squared L2)."""
    distances = (vectors**2).sum(1)[:, None] - 2 * vectors @ centroids.T + (centroids**2).sum(1)[None, :]
    return distances.argmin(axis=1).astype(np.int32)


def page_rows(n: int, config: MapConfig) -> np.ndarray:
    """The rows the page draws: all of them, or a uniform seeded sample of max_points (sorted)."""
    if n <= config.max_points:
        return np.arange(n)
    return np.sort(np.random.default_rng(config.seed + 1).choice(n, config.max_points, replace=False))
