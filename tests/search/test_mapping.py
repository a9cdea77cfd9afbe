"""The map's projection: PCA equals scikit-learn's on the unit vectors, a bounded sample fits and every row is
transformed in place, k-means finds the clusters, UMAP is seeded, and too few points are refused."""

from __future__ import annotations

import numpy as np
import pytest

from esm2cli.config import MapConfig
from esm2cli.errors import InputError
from esm2cli.search.mapping import build_map, page_rows, project
from esm2cli.search.vectors import open_inputs
from searchdata import clustered, unit

HIDDEN = 32  # the tiny model's width, which the synthetic outputs share


def _centred(n: int, seed: int = 0, centers: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Vectors of a few well-separated centres (not unit: the map normalises them) and each one's centre."""
    rng = np.random.default_rng(seed)
    middle = rng.standard_normal((centers, HIDDEN)) * 3
    which = rng.integers(0, centers, n)
    return middle[which] + 0.2 * rng.standard_normal((n, HIDDEN)), which


def _same_up_to_sign(got: np.ndarray, want: np.ndarray, atol: float = 1e-4) -> None:
    for axis in range(2):
        sign = np.sign(np.dot(got[:, axis], want[:, axis]))
        np.testing.assert_allclose(got[:, axis] * sign, want[:, axis], atol=atol)


def test_pca_coordinates_are_sklearn_pca_of_the_unit_vectors(synthetic):
    from sklearn.decomposition import PCA

    vectors = clustered(300, hidden=HIDDEN) * np.random.default_rng(1).uniform(0.5, 3, (300, 1))
    path = synthetic("a.parquet", vectors, row_group_size=64)
    points, fitted_on, _ = project(open_inputs([path], command="map"), MapConfig())
    assert fitted_on == 300 and len(points) == 300
    assert points.ids.to_pylist() == [f"s{i}" for i in range(300)]
    want = PCA(n_components=2, svd_solver="full").fit_transform(unit(vectors).astype(np.float64))
    _same_up_to_sign(points.xy, want)


def test_a_sample_smaller_than_the_input_fits_on_it_and_transforms_every_row_in_place(synthetic):
    vectors = clustered(500, hidden=HIDDEN, seed=4)
    path = synthetic("a.parquet", vectors, row_group_size=64)
    points, fitted_on, _ = project(open_inputs([path], command="map"), MapConfig(sample=120))
    assert fitted_on == 120
    # Whatever sample it was fitted on, PCA is one affine map of every unit vector: a row placed out of order (or
    # left unwritten) by the second pass leaves a residual.
    design = np.hstack([unit(vectors).astype(np.float64), np.ones((500, 1))])
    coef, *_ = np.linalg.lstsq(design, points.xy.astype(np.float64), rcond=None)
    assert np.abs(design @ coef - points.xy).max() < 1e-4
    assert np.ptp(points.xy, axis=0).min() > 0.1  # the fit spread the points


def test_cluster_colouring_finds_the_centres(synthetic):
    vectors, centre = _centred(400)
    path = synthetic("a.parquet", vectors)
    result = build_map([path], MapConfig(color_by="cluster", clusters=4, sample=150))
    codes = result.colouring.codes
    assert result.colouring.names == [f"cluster {i}" for i in range(4)]
    for c in range(4):  # each centre's points share one cluster, a cluster of its own
        assert len(set(codes[centre == c])) == 1
    assert len({int(codes[centre == c][0]) for c in range(4)}) == 4


def test_umap_is_seeded_and_keeps_the_fitted_points_where_the_fit_put_them(synthetic):
    vectors, centre = _centred(260, seed=2)
    path = synthetic("a.parquet", vectors, row_group_size=64)
    inputs = open_inputs([path], command="map")
    config = MapConfig(method="umap", sample=200, neighbors=10, seed=3)
    first, fitted_on, _ = project(inputs, config)
    again, _, _ = project(inputs, config)
    assert fitted_on == 200 and np.isfinite(first.xy).all()
    np.testing.assert_array_equal(first.xy, again.xy)
    # neighbourhoods kept: every point (fitted or transformed) lies nearer its own centre's middle than another's
    middles = np.stack([first.xy[centre == c].mean(axis=0) for c in range(4)])
    nearest = np.linalg.norm(first.xy[:, None] - middles[None], axis=2).argmin(axis=1)
    assert (nearest == centre).mean() > 0.95


def test_umap_on_no_more_points_than_neighbours_is_refused(synthetic):
    path = synthetic("a.parquet", clustered(15, hidden=HIDDEN))
    with pytest.raises(InputError, match=r"15 points, no more than --neighbors 15"):
        build_map([path], MapConfig(method="umap"))


def test_more_clusters_than_points_is_refused(synthetic):
    path = synthetic("a.parquet", clustered(8, hidden=HIDDEN))
    with pytest.raises(InputError, match=r"8 points, fewer than --clusters 10"):
        build_map([path], MapConfig(color_by="cluster"))


def test_inputs_of_another_identity_are_refused(synthetic, embedded):
    path = synthetic("a.parquet", clustered(20, hidden=HIDDEN))
    with pytest.raises(InputError, match="vectors of another run"):
        build_map([path, embedded / "bos.parquet"], MapConfig())


def test_the_page_draws_a_seeded_sample_past_max_points():
    config = MapConfig(max_points=100)
    rows = page_rows(1000, config)
    assert len(rows) == 100 and len(set(rows.tolist())) == 100 and (np.diff(rows) > 0).all()
    np.testing.assert_array_equal(rows, page_rows(1000, config))
    np.testing.assert_array_equal(page_rows(100, config), np.arange(100))
