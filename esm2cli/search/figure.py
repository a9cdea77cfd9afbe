"""The files of a map: the self-contained HTML page (plotly), the PNG or SVG image (matplotlib) and the coordinates
(Parquet). Each appears only when complete (storage.AtomicFile).

The page draws MapResult.shown (every point, or a sample past --max-points, said on the page); the image draws
every point, as a scatter up to --max-points and as a density past it, where a cell takes the colour of its most
frequent category (or its mean value) and an opacity growing with the log of its count.
"""

from __future__ import annotations

import html
import json

import numpy as np
import pyarrow as pa

from esm2cli.errors import ConfigError
from esm2cli.io.storage import AtomicFile, file_key
from esm2cli.search.colours import GREY, SEQUENTIAL, Colouring
from esm2cli.search.hits import check_output
from esm2cli.search.mapping import MapResult
from esm2cli.search.vectors import expand_inputs

DESCRIPTION_CHARS = 120  # of a description in the hover text
DENSITY_BINS = 600  # cells a side of the density image
AXES = {"pca": ("PC 1", "PC 2"), "umap": ("UMAP 1", "UMAP 2")}

# The search box: finds an id among the points drawn, rings it and opens its hover label. gd._fullData holds the
# decoded coordinates (gd.data may hold plotly's base64 typed arrays).
_SEARCH_JS = """
(function () {
  var gd = document.getElementById("map"), box = document.getElementById("search");
  var status = document.getElementById("search-status");
  function find(id) {
    for (var t = 0; t < gd.data.length; t++) {
      var ids = gd.data[t].customdata;
      if (!ids) continue;
      for (var i = 0; i < ids.length; i++) if (ids[i] === id) return [t, i];
    }
    return null;
  }
  function go() {
    var id = box.value.trim(), ring = gd.data.length - 1, hit = find(id);
    if (!hit) {
      status.textContent = id ? "no point " + JSON.stringify(id) + " on the page" : "";
      Plotly.restyle(gd, {x: [[]], y: [[]]}, [ring]);
      return;
    }
    var full = gd._fullData[hit[0]], x = full.x[hit[1]], y = full.y[hit[1]];
    // WebGL traces take a hover by position, not by point number
    Plotly.restyle(gd, {x: [[x]], y: [[y]]}, [ring]).then(function () {
      var layout = gd._fullLayout;
      Plotly.Fx.hover(gd, {xpx: layout.xaxis.d2p(x), ypx: layout.yaxis.d2p(y)}, "xy");
    });
    status.textContent = "found " + id + " (ringed)";
  }
  box.addEventListener("keydown", function (event) { if (event.key === "Enter") go(); });
  window.esm2cliFind = go;
})();
"""

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 0.5em 1em; }}
#bar {{ margin: 0.3em 0; }} #search {{ width: 20em; }} #search-status {{ margin-left: 1em; color: #555; }}
.note {{ margin: 0.2em 0; color: #444; font-size: 0.9em; }}
</style>
</head>
<body>
<div id="bar"><label>Find an id <input id="search" type="search" placeholder="an id, then Enter"></label>
<span id="search-status"></span></div>
{notes}
{plot}
<script>{search}</script>
</body>
</html>
"""


KINDS = {"html": "page", "png": "PNG image", "svg": "SVG image", "coords": "coordinates"}


def check_outputs(outputs: dict[str, str], inputs, overwrite: bool) -> list[str]:
    """Refuses, before any work, an output in the way: an input of the map (even with overwrite: the vectors are
    not an old map), a path named for two outputs, a directory, or an existing file without overwrite.

    Returns:
        The input files (vectors.expand_inputs), for the map to read: expanded once, a file named twice is
        warned of once.

    Raises:
        ConfigError: The output and what it collides with named.
        OutputExistsError: The file exists and overwrite is False.
        InputError: An input is missing (see vectors.expand_inputs).
    """
    read = expand_inputs(inputs, "map")
    named: dict[object, str] = {}
    for kind, path in outputs.items():
        key = file_key(path)
        if key in named:
            raise ConfigError(f"{path}: named for the {KINDS[named[key]]} and the {KINDS[kind]}; give each its own")
        named[key] = kind
        check_output(path, overwrite, read, what=KINDS[kind])
    return read


def page_notes(result: MapResult) -> list[str]:
    """What the page and the summary say of the map: points, fit, sample drawn and the colouring."""
    n = len(result.points)
    notes = [f"{n:,} points of {len(result.inputs)} input{'s' if len(result.inputs) != 1 else ''}"]
    if result.fitted_on < n:
        notes.append(f"the projection was fitted on a uniform random sample of {result.fitted_on:,} points")
    if result.sampled:
        notes.append(
            f"the page draws a uniform random sample of {len(result.shown):,} of the {n:,} points "
            "(the PNG and SVG draw every point, as a density)"
        )
    return notes + result.colouring.notes


def write_page(result: MapResult, path: str, method: str, title: str) -> None:
    """The page: every drawn point with its hover text, a legend (or colour bar) and the search box by id."""
    import plotly.graph_objects as go
    import plotly.io as pio

    figure = go.Figure(_traces(result))
    x_title, y_title = AXES[method]
    figure.update_layout(
        title=_text(title),
        template="plotly_white",
        height=820,
        xaxis_title=x_title,
        yaxis_title=y_title,
        legend={"itemsizing": "constant", "title": {"text": _text(result.colouring.title)}},
        hovermode="closest",
    )
    plot = pio.to_html(
        figure, include_plotlyjs=True, full_html=False, div_id="map", config={"scrollZoom": True, "displaylogo": False}
    )
    notes = "\n".join(f'<p class="note">{html.escape(note)}</p>' for note in page_notes(result))
    text = _PAGE.format(title=html.escape(title), notes=notes, plot=plot, search=_SEARCH_JS)
    with AtomicFile(path) as out:
        out.handle.write(text.encode("utf-8"))


def _traces(result: MapResult) -> list:
    import plotly.graph_objects as go

    rows, colouring = result.shown, result.colouring
    xy = result.points.xy[rows]
    ids = np.array(result.points.ids.take(pa.array(rows)).to_pylist(), dtype=object)
    hover = np.array(_hover(result, rows, ids), dtype=object)
    traces = []
    if colouring.continuous:
        assert colouring.values is not None and colouring.span is not None
        values = colouring.values[rows]
        valued = ~np.isnan(values)
        low, high = colouring.span
        marker = {"color": values[valued], "colorscale": SEQUENTIAL.capitalize(), "cmin": low, "cmax": high,
                  "size": 4, "colorbar": {"title": {"text": _text(colouring.title)}}}  # fmt: skip
        traces.append(_scatter(go, xy[valued], ids[valued], hover[valued], _text(colouring.title), marker))
        if (~valued).any():
            grey = {"color": GREY, "size": 4}
            traces.append(_scatter(go, xy[~valued], ids[~valued], hover[~valued], _text(colouring.grey), grey))
    else:
        assert colouring.codes is not None
        codes = colouring.codes[rows]
        for code, (name, colour) in enumerate(zip(colouring.names, colouring.colours, strict=True)):
            where = codes == code
            if where.any():
                label = f"{_text(name)} ({int(where.sum()):,})"
                traces.append(_scatter(go, xy[where], ids[where], hover[where], label, {"color": colour, "size": 4}))
    ring = {"size": 18, "color": "rgba(0,0,0,0)", "line": {"color": "black", "width": 2}}
    found = go.Scattergl(x=[], y=[], mode="markers", marker=ring, name="found", hoverinfo="skip", showlegend=False)
    traces.append(found)
    return traces


def _text(text: str) -> str:
    # plotly reads names and titles as its markup (<b>, <a href>): escaped, a label shows as it is written
    return html.escape(text, quote=False)


def _scatter(go, xy: np.ndarray, ids: np.ndarray, hover: np.ndarray, name: str, marker: dict):
    return go.Scattergl(
        x=xy[:, 0],
        y=xy[:, 1],
        mode="markers",
        name=name,
        marker=marker,
        customdata=ids.tolist(),
        hovertext=hover.tolist(),
        hovertemplate="%{hovertext}<extra></extra>",
    )


def _hover(result: MapResult, rows: np.ndarray, ids: np.ndarray) -> list[str]:
    points, column = result.points, result.colouring.column()
    take = pa.array(rows)
    descriptions = points.descriptions.take(take).to_pylist()
    colours = column.take(take).to_pylist()
    lengths = points.lengths[rows].tolist()
    title = html.escape(result.colouring.title)
    return [
        f"<b>{html.escape(i)}</b><br>{html.escape(_short(d))}<br>length {n:,}<br>{title}: "
        f"{html.escape(str(c)) if c is not None else result.colouring.grey}"
        for i, d, n, c in zip(ids, descriptions, lengths, colours, strict=True)
    ]


def _short(description: str | None) -> str:
    text = description or ""
    return text if len(text) <= DESCRIPTION_CHARS else text[: DESCRIPTION_CHARS - 1] + "…"


def write_image(result: MapResult, path: str, fmt: str, title: str, *, max_points: int) -> None:
    """Every point as a PNG or SVG: a rasterized scatter up to max_points, a density past it."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 8), dpi=150, layout="constrained")
    axes = figure.add_subplot()
    xy, colouring = result.points.xy, result.colouring
    if len(xy) <= max_points:
        _scatter_image(figure, axes, xy, colouring)
    else:
        _density_image(figure, axes, xy, colouring)
    # over the figure, not the axes: a long title (an input's path, a regex) is wrapped, not cut at the edges
    figure.suptitle(title, fontsize=10, wrap=True)
    x_title, y_title = AXES[result.method]
    axes.set_xlabel(x_title)
    axes.set_ylabel(y_title)
    with AtomicFile(path) as out:
        figure.savefig(out.handle, format=fmt)


def _scatter_image(figure, axes, xy: np.ndarray, colouring: Colouring) -> None:
    size = float(np.clip(20_000 / max(len(xy), 1), 0.5, 12))
    if colouring.continuous:
        assert colouring.values is not None and colouring.span is not None
        valued = ~np.isnan(colouring.values)
        axes.scatter(*xy[~valued].T, s=size, c=GREY, linewidths=0, rasterized=True, label=colouring.grey)
        drawn = axes.scatter(*xy[valued].T, s=size, c=colouring.values[valued], cmap=SEQUENTIAL,
                             vmin=colouring.span[0], vmax=colouring.span[1], linewidths=0, rasterized=True)  # fmt: skip
        figure.colorbar(drawn, ax=axes, label=colouring.title)
        return
    assert colouring.codes is not None
    for code, (name, colour) in enumerate(zip(colouring.names, colouring.colours, strict=True)):
        where = colouring.codes == code
        axes.scatter(*xy[where].T, s=size, c=colour, linewidths=0, rasterized=True, label=name)
    _legend(axes, colouring)


def _legend(axes, colouring: Colouring, handles: list | None = None) -> None:
    """The categories beside the axes; ``handles``: markers of their own, for an image that drew no points."""
    drawn = {"markerscale": 4} if handles is None else {"handles": handles}  # scattered points are tiny
    legend = axes.legend(title=colouring.title, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, **drawn)
    legend.get_title().set_fontsize(8)


def _density_image(figure, axes, xy: np.ndarray, colouring: Colouring) -> None:
    """A cell's colour is its most frequent category (or mean value); its opacity the log of its count."""
    from matplotlib import colormaps
    from matplotlib.colors import Normalize, to_rgba
    from matplotlib.lines import Line2D

    low, high = xy.min(axis=0), xy.max(axis=0)
    span = np.where(high > low, high - low, 1.0)
    cells = np.minimum(((xy - low) / span * DENSITY_BINS).astype(np.int64), DENSITY_BINS - 1)
    cell = cells[:, 1] * DENSITY_BINS + cells[:, 0]
    count = np.bincount(cell, minlength=DENSITY_BINS**2)
    rgba = np.zeros((DENSITY_BINS**2, 4))
    if colouring.continuous:
        assert colouring.values is not None and colouring.span is not None
        valued = ~np.isnan(colouring.values)
        sums = np.bincount(cell[valued], weights=colouring.values[valued], minlength=DENSITY_BINS**2)
        valued_count = np.bincount(cell[valued], minlength=DENSITY_BINS**2)
        norm = Normalize(*colouring.span)
        mean = np.divide(sums, valued_count, out=np.zeros_like(sums), where=valued_count > 0)
        rgba[:] = colormaps[SEQUENTIAL](norm(mean))
        rgba[valued_count == 0] = to_rgba(GREY)
        figure.colorbar(axes.scatter([], [], c=[], cmap=SEQUENTIAL, norm=norm), ax=axes, label=colouring.title)
    else:
        assert colouring.codes is not None
        k = len(colouring.names)
        per = np.bincount(cell * k + colouring.codes, minlength=DENSITY_BINS**2 * k).reshape(-1, k)
        palette = np.array([to_rgba(colour) for colour in colouring.colours])
        rgba[:] = palette[per.argmax(axis=1)]
        pairs = zip(colouring.names, colouring.colours, strict=True)
        handles = [Line2D([], [], ls="", marker="s", color=colour, label=name) for name, colour in pairs]
        _legend(axes, colouring, handles)
    rgba[:, 3] = np.log1p(count) / np.log1p(count.max())
    extent = (low[0], low[0] + span[0], low[1], low[1] + span[1])
    image = rgba.reshape(DENSITY_BINS, DENSITY_BINS, 4)
    axes.imshow(image, origin="lower", extent=extent, aspect="auto", interpolation="nearest")
    axes.text(0.01, 0.01, f"{len(xy):,} points as a density", transform=axes.transAxes, fontsize=8, color="#444")


def write_coords(result: MapResult, path: str) -> None:
    """id, x, y and colour (the category, or the value) of every point, as Parquet."""
    import pyarrow.parquet as pq

    points = result.points
    table = pa.table(
        {
            "id": points.ids,
            "x": pa.array(points.xy[:, 0], pa.float32()),
            "y": pa.array(points.xy[:, 1], pa.float32()),
            "colour": result.colouring.column(),
        }
    )
    metadata = {"esm2cli_map": json.dumps({"colour": result.colouring.title})}
    table = table.replace_schema_metadata(metadata)
    with AtomicFile(path) as out:
        pq.write_table(table, out.handle)
