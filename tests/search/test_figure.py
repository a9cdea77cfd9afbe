"""The map's files: the page opened by a real headless Chromium (points drawn, hover text, the search box), no
script or style fetched from the network, the PNG and SVG read back, the density past --max-points, coordinates."""

from __future__ import annotations

import io
import re
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from esm2cli.config import MapConfig
from esm2cli.search.colours import PALETTE
from esm2cli.search.figure import write_coords, write_image, write_page
from esm2cli.search.mapping import build_map
from helpers import write_like
from searchdata import clustered

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
N = 300


@pytest.fixture(scope="module")
def mapped(embedded, tmp_path_factory):
    """A map of 300 points in four k-means clusters, its page written."""
    root = tmp_path_factory.mktemp("figure")
    path = write_like(
        embedded / "out.parquet", root / "in.parquet", clustered(N, centers=4, hidden=32), row_group_size=64
    )
    result = build_map([path], MapConfig(color_by="cluster", clusters=4))
    write_page(result, str(root / "map.html"), "pca", "test map")
    return root, result


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("no Chromium on this machine (chromium, chromium-browser or google-chrome on PATH)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # SwiftShader: WebGL (Scattergl) drawn on the CPU, as on a machine without a GPU
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--use-angle=swiftshader", "--enable-unsafe-swiftshader"]
        )
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, mapped):
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto((mapped[0] / "map.html").as_uri())
    page.wait_for_function("document.getElementById('map') && document.getElementById('map')._fullLayout")
    page.wait_for_timeout(300)  # the WebGL frame
    yield page
    assert errors == []
    page.close()


def _colours(png: bytes) -> set[tuple[int, int, int]]:
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).reshape(-1, 3)
    return {tuple(int(v) for v in pixel) for pixel in np.unique(pixels, axis=0)}


def _hex(colour: str) -> tuple[int, int, int]:
    return tuple(int(colour[i : i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]


def test_the_page_draws_the_points_in_their_cluster_colours(page):
    area = page.locator("#map .nsewdrag").first.bounding_box()  # the plot area, within the axes
    assert area is not None and area["width"] > 100
    drawn = _colours(page.screenshot(clip=area))
    assert {_hex(colour) for colour in PALETTE[:4]} <= drawn  # every cluster's colour, drawn by WebGL


def test_a_points_hover_text_names_its_id_description_and_length(page, mapped):
    result = mapped[1]
    texts = page.evaluate("Object.fromEntries(document.getElementById('map').data.flatMap("
                          "t => (t.customdata || []).map((id, i) => [id, t.hovertext[i]])))")  # fmt: skip
    assert len(texts) == N
    row = 17
    assert texts["s17"] == (f"<b>s17</b><br>s17 synthetic<br>length {result.points.lengths[row]}<br>"
                            f"k-means cluster: cluster {result.points.clusters[row]}")  # fmt: skip


def test_the_search_box_finds_an_id_rings_it_and_shows_its_hover(page, mapped):
    result = mapped[1]
    page.fill("#search", "s42")
    page.press("#search", "Enter")
    page.wait_for_function("document.getElementById('search-status').textContent.startsWith('found')")
    ring = page.evaluate("(() => { const gd = document.getElementById('map'), r = gd._fullData[gd.data.length - 1];"
                         " return [r.x[0], r.y[0]]; })()")  # fmt: skip
    np.testing.assert_allclose(ring, result.points.xy[42], rtol=1e-6)
    page.wait_for_function("document.querySelector('#map .hoverlayer').textContent.includes('s42 synthetic')")
    page.fill("#search", "no-such-id")
    page.press("#search", "Enter")
    assert page.text_content("#search-status") == 'no point "no-such-id" on the page'


def test_the_page_fetches_nothing(mapped):
    text = (mapped[0] / "map.html").read_text()
    assert not re.search(r"<(script|link|img|iframe)\b[^>]*(src|href)\s*=\s*[\"']?(https?:)?//", text, re.I)
    assert not re.search(r"@import\s+(url\()?[\"']?(https?:)?//", text)
    assert "Plotly.newPlot" in text and "scattergl" in text


def test_the_png_and_svg_draw_every_point_in_colour(mapped, tmp_path):
    result = mapped[1]
    write_image(result, str(tmp_path / "m.png"), "png", "t", max_points=1000)
    colours = _colours((tmp_path / "m.png").read_bytes())
    assert {_hex(colour) for colour in PALETTE[:4]} <= colours
    write_image(result, str(tmp_path / "m.svg"), "svg", "t", max_points=1000)
    svg = (tmp_path / "m.svg").read_text()
    assert svg.lstrip().startswith("<?xml") and "<image" in svg  # the scatter rasterized into the SVG


def test_past_max_points_the_image_is_a_density_and_the_page_a_sample_said_so(embedded, tmp_path):
    path = write_like(embedded / "out.parquet", tmp_path / "in.parquet", clustered(N, centers=4, hidden=32))
    result = build_map([path], MapConfig(color_by="cluster", clusters=4, max_points=100))
    write_page(result, str(tmp_path / "map.html"), "pca", "t")
    assert f"the page draws a uniform random sample of 100 of the {N:,} points" in (tmp_path / "map.html").read_text()
    write_image(result, str(tmp_path / "m.png"), "png", "t", max_points=100)
    image = np.asarray(Image.open(tmp_path / "m.png").convert("RGB")).reshape(-1, 3)
    assert len(np.unique(image, axis=0)) > 4  # cells of each cluster's colour at several opacities


def test_coordinates_hold_every_point_with_its_colour(mapped, tmp_path):
    result = mapped[1]
    write_coords(result, str(tmp_path / "c.parquet"))
    table = pq.read_table(tmp_path / "c.parquet")
    assert table.column_names == ["id", "x", "y", "colour"] and table.num_rows == N
    np.testing.assert_array_equal(table["x"].to_numpy(), result.points.xy[:, 0])
    assert table["colour"][5].as_py() == f"cluster {result.points.clusters[5]}"
