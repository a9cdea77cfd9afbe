"""esm2cli map: the vectors of esm2cli outputs in two dimensions, as a page, an image and coordinates."""

from __future__ import annotations

import sys
import time

import click

from esm2cli.cli.console import interruptible, one_line_errors, setup_logging, use_s3_endpoint
from esm2cli.cli.options import log_options, overwrite_option, s3_endpoint_option
from esm2cli.config import (
    DEFAULT_CLUSTERS,
    DEFAULT_MAP_POINTS,
    DEFAULT_MAP_SAMPLE,
    DEFAULT_NEIGHBORS,
    MAP_METHODS,
    MapConfig,
)


def _progress(quiet: bool):
    from tqdm import tqdm

    bar = tqdm(unit="vec", unit_scale=True, file=sys.stderr, disable=True if quiet else None, dynamic_ncols=True)
    return bar, bar.update


def _outputs(output, png, svg, coords) -> dict[str, str]:
    named = {"html": output, "png": png, "svg": svg, "coords": coords}
    named = {kind: str(path) for kind, path in named.items() if path}
    if not named:
        raise click.UsageError("name an output: -o map.html, --png, --svg or --coords")
    return named


def _write(result, kind: str, path: str, heading: str, max_points: int) -> None:
    from esm2cli.io.storage import write_errors
    from esm2cli.search.figure import KINDS, write_coords, write_image, write_page

    with write_errors(path, KINDS[kind]):  # the new file is aborted, an old one kept
        if kind == "html":
            write_page(result, path, result.method, heading)
        elif kind == "coords":
            write_coords(result, path)
        else:
            write_image(result, path, kind, heading, max_points=max_points)


@click.command(name="map")
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--output", envvar="ESM2CLI_OUTPUT", help="The HTML page to write (self-contained).")
@click.option("--png", default=None, help="Also write the map as a PNG image (every point).")
@click.option("--svg", default=None, help="Also write the map as an SVG image (its points rasterized).")
@click.option("--coords", default=None, help="Also write id, x, y and colour of every point as Parquet.")
@click.option("--method", type=click.Choice(MAP_METHODS), default="pca", show_default=True,
              help="pca: exact and deterministic; umap: keeps neighbourhoods, seeded (docs/map.md).")  # fmt: skip
@click.option("--color-by", default=None,
              help="length, truncated, windows, cluster, description:REGEX (the matched words, or the regex's "
              "first group), or a column of --labels [default: the labels' first column beside the id, else "
              "cluster].")  # fmt: skip
@click.option("--labels", default=None,
              help="A TSV (or .csv) with a header, joined by id: its column 'id', else its first column.")  # fmt: skip
@click.option("--clusters", type=click.IntRange(min=2), default=DEFAULT_CLUSTERS, show_default=True,
              help="k of --color-by cluster (FAISS k-means on the vectors).")  # fmt: skip
@click.option("--neighbors", type=click.IntRange(min=2), default=DEFAULT_NEIGHBORS, show_default=True,
              help="UMAP's n_neighbors.")  # fmt: skip
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds UMAP, k-means and every sample.")
@click.option("--sample", type=click.IntRange(min=3), default=DEFAULT_MAP_SAMPLE, show_default=True,
              help="The most points the projection and k-means are fitted on; the rest are transformed.")  # fmt: skip
@click.option("--max-points", type=click.IntRange(min=1), default=DEFAULT_MAP_POINTS, show_default=True,
              help="The most points the page draws (a random sample past it, said on the page); images draw "
              "all.")  # fmt: skip
@click.option("--layer", type=int, default=None, help="The layer to map from outputs of several layers.")
@click.option("--title", default=None, help="The title of the page and image [default: the first input].")
@overwrite_option("Replace existing outputs; each old one stays until its new one is complete.")
@s3_endpoint_option("S3-compatible endpoint for s3:// inputs and outputs.")
@log_options
def map_command(inputs, output, png, svg, coords, method, color_by, labels, clusters, neighbors, seed, sample,
                max_points, layer, title, overwrite, s3_endpoint_url, verbose, quiet):  # fmt: skip
    """Map the vectors of esm2cli outputs in two dimensions: an interactive page, an image, coordinates.

    Every input must hold vectors of one identity (model, layer, pooling, dtype). Hover a point for its
    id, description and length; find one with the page's search box.

    \b
    Examples:
      esm2cli map out.parquet -o map.html
      esm2cli map parts/ -o map.html --png map.png --color-by 'description:(kinase|protease)'
      esm2cli map out.parquet -o map.html --labels families.tsv --color-by family --method umap
    """
    with interruptible("interrupted: no output was written or replaced (a map does not resume: rerun it)"):
        setup_logging(verbose, quiet)
        from esm2cli.search.figure import check_outputs, page_notes
        from esm2cli.search.mapping import build_map

        use_s3_endpoint(s3_endpoint_url)
        outputs = _outputs(output, png, svg, coords)
        config = MapConfig(method=method, layer=layer, seed=seed, neighbors=neighbors, sample=sample,
                           color_by=color_by, labels=labels, clusters=clusters, max_points=max_points)  # fmt: skip
        with one_line_errors():
            files = check_outputs(outputs, inputs, overwrite)
            bar, update = _progress(quiet)
            with bar:
                result = build_map(files, config, progress=update)
            started = time.perf_counter()
            heading = title or f"{inputs[0]}: {method.upper()}, coloured by {result.colouring.title}"
            for kind, path in outputs.items():
                _write(result, kind, path, heading, max_points)
            result.seconds["write"] = time.perf_counter() - started
        if not quiet:
            spent = ", ".join(f"{step} {seconds:.1f} s" for step, seconds in result.seconds.items())
            click.echo(f"mapped {len(result.points):,} points ({method}; {spent}) -> {', '.join(outputs.values())}",
                       err=True)  # fmt: skip
            for note in page_notes(result)[1:]:
                click.echo(f"  {note}", err=True)
