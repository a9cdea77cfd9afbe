"""esm2cli map through Click: every output written, the summary on stderr, bad input refused in one line with exit 2
and nothing written over, and a 4,500-point map whose page draws a sample."""

from __future__ import annotations

import errno
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from esm2cli.cli import cli
from helpers import embed_mean_and_bos, random_protein, write_like


def run(*args):
    return CliRunner().invoke(cli, ["map", *map(str, args)])


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, tiny_model_dir):
    records = [(f"p{i}", random_protein(15 + 7 * i)) for i in range(20)]
    return embed_mean_and_bos(tmp_path_factory.mktemp("cli-map"), records, tiny_model_dir)


def _one_line_exit_2(result, *words):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1, result.output
    for word in words:
        assert word in result.output


def test_map_writes_the_page_image_and_coordinates_with_labels_joined(outputs, tmp_path):
    labels = tmp_path / "labels.tsv"
    labels.write_text("id\tfold\n" + "".join(f"p{i}\t{'ab'[i % 2]}\n" for i in range(15)) + "stray\tc\n")
    page, png, coords = tmp_path / "m.html", tmp_path / "m.png", tmp_path / "c.parquet"
    result = run(outputs / "out.parquet", "-o", page, "--png", png, "--coords", coords, "--labels", labels)
    assert result.exit_code == 0, result.output
    assert "mapped 20 points (pca;" in result.stderr
    assert "15 points labelled, 5 unlabelled (5 ids absent from it, 0 with an empty 'fold')" in result.stderr
    assert "1 ids of" in result.stderr and result.stdout == ""
    assert "p3" in page.read_text() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = pq.read_table(coords)
    assert table["id"].to_pylist() == [f"p{i}" for i in range(20)]
    assert table["colour"].to_pylist() == ["ab"[i % 2] for i in range(15)] + ["unlabelled"] * 5


def test_the_same_proteins_in_two_inputs_are_mapped_with_a_warning(outputs, tmp_path):
    copy = tmp_path / "copy.parquet"
    shutil.copyfile(outputs / "out.parquet", copy)
    result = run(outputs / "out.parquet", copy, "-o", tmp_path / "m.html")
    assert result.exit_code == 0, result.output
    assert "mapped 40 points" in result.stderr
    assert "20 ids appear more than once (p0: 2 times)" in result.stderr
    alone = run(outputs / "out.parquet", "-o", tmp_path / "one.html")
    assert alone.exit_code == 0 and "more than once" not in alone.stderr


def test_a_file_named_twice_is_mapped_once_with_one_warning(outputs, tmp_path):
    # the inputs are expanded for the output checks and again for the map: the user is told once, not twice
    out, link = outputs / "out.parquet", tmp_path / "link.parquet"
    link.symlink_to(out)
    result = run(out, link, "-o", tmp_path / "m.html")
    assert result.exit_code == 0, result.output
    assert "mapped 20 points" in result.stderr
    assert result.stderr.count(f"{link} is named more than once (as {out}): it is read once") == 1, result.stderr


def test_an_existing_output_is_refused_and_kept_unless_overwrite(outputs, tmp_path):
    page, png = tmp_path / "m.html", tmp_path / "m.png"
    png.write_text("mine")
    result = run(outputs / "out.parquet", "-o", page, "--png", png)
    _one_line_exit_2(result, f"{png} already exists", "--overwrite")
    assert png.read_text() == "mine" and not page.exists()
    assert run(outputs / "out.parquet", "-o", page, "--png", png, "--overwrite", "-q").exit_code == 0
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_another_identity_is_refused_naming_what_differs(outputs, tmp_path):
    result = run(outputs / "out.parquet", outputs / "bos.parquet", "-o", tmp_path / "m.html")
    _one_line_exit_2(result, "bos.parquet", "vectors of another run", "pooling")
    assert not (tmp_path / "m.html").exists()


@pytest.mark.parametrize(
    ("labels", "words"),
    [("id\tfold\nP1\ta\n", ["none of its 1 ids (column 'id')"]),
     ("name\tfold\nq1\ta\n", ["none of its 1 ids (first column 'name')"]),
     ("id\n", ["one column only"])],
    ids=["no-id-in-input", "first-column-none-in-input", "no-label-column"],
)  # fmt: skip
def test_a_labels_file_that_joins_nothing_is_refused(outputs, tmp_path, labels, words):
    (tmp_path / "labels.tsv").write_text(labels)
    result = run(outputs / "out.parquet", "-o", tmp_path / "m.html", "--labels", tmp_path / "labels.tsv")
    _one_line_exit_2(result, "labels.tsv", *words)
    assert not (tmp_path / "m.html").exists()


def test_umap_on_fewer_points_than_neighbours_is_refused(outputs, tmp_path):
    result = run(outputs / "out.parquet", "-o", tmp_path / "m.html", "--method", "umap", "--neighbors", "25")
    _one_line_exit_2(result, "20 points, no more than --neighbors 25")
    assert not (tmp_path / "m.html").exists()


def test_a_bad_color_by_and_no_output_are_refused(outputs, tmp_path):
    _one_line_exit_2(run(outputs / "out.parquet", "-o", tmp_path / "m.html", "--color-by", "colour"), "not a field")
    assert run(outputs / "out.parquet").exit_code == 2


def test_a_map_of_4500_points_draws_a_sample_on_the_page_and_every_point_in_the_image(outputs, tmp_path):
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((6, 32))[rng.integers(0, 6, 4500)] + 0.3 * rng.standard_normal((4500, 32))
    path = write_like(outputs / "out.parquet", tmp_path / "big.parquet", vectors, row_group_size=1000)
    page, png = tmp_path / "m.html", tmp_path / "m.png"
    result = run(path, "-o", page, "--png", png, "--max-points", "1000", "--sample", "2000", "--color-by", "cluster",
                 "--clusters", "6")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "fitted on a uniform random sample of 2,000 points" in result.stderr
    assert "the page draws a uniform random sample of 1,000 of the 4,500 points" in result.stderr
    assert "of the 4,500 points" in page.read_text()
    assert page.read_text().count(r"\u003cb\u003es") == 1000  # one hover text (JSON-escaped) a drawn point
    from PIL import Image

    image = np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3)
    assert len(np.unique(image, axis=0)) > 6  # the density: cells of the clusters' colours


@pytest.mark.parametrize(("flag", "what"), [("-o", "page"), ("--coords", "coordinates")])
def test_an_output_onto_an_input_is_refused_even_with_overwrite(outputs, tmp_path, flag, what):
    vectors = shutil.copy(outputs / "out.parquet", tmp_path / "v.parquet")
    before = (tmp_path / "v.parquet").read_bytes()
    result = run(vectors, flag, vectors, "--overwrite")
    _one_line_exit_2(result, "v.parquet: is the input", f"name another file for the {what}")
    assert (tmp_path / "v.parquet").read_bytes() == before


def test_two_outputs_on_one_path_are_refused(outputs, tmp_path):
    same = tmp_path / "same"
    result = run(outputs / "out.parquet", "-o", same, "--coords", same)
    _one_line_exit_2(result, "named for the page and the coordinates")
    assert not same.exists()


def test_a_directory_as_the_page_is_refused_naming_the_page(outputs, tmp_path):
    _one_line_exit_2(run(outputs / "out.parquet", "-o", tmp_path), "is a directory: name a file for the page")


class _FullDisk:
    """A file handle whose writes fail as on a full disk; the rest is the real handle's."""

    def __init__(self, handle):
        self._handle = handle

    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self._handle, name)


def test_a_failed_write_is_one_line_and_keeps_the_old_page(outputs, tmp_path, monkeypatch):
    from esm2cli.io import storage

    page = tmp_path / "m.html"
    page.write_text("old")
    real = storage.AtomicFile.__enter__

    def enter(self):
        real(self)
        self.handle = _FullDisk(self.handle)
        return self

    monkeypatch.setattr(storage.AtomicFile, "__enter__", enter)
    result = run(outputs / "out.parquet", "-o", page, "--overwrite")
    assert result.exit_code == 1, result.output
    assert result.output.strip() == f"Error: {page}: cannot write the page (No space left on device)"
    assert page.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["m.html"]


def test_a_damaged_parquet_footer_is_refused_in_one_line(outputs, tmp_path):
    data = bytearray((outputs / "out.parquet").read_bytes())
    start = len(data) - 8 - int.from_bytes(data[-8:-4], "little")  # the footer: its thrift, its length, PAR1
    data[start : start + 64] = b"\xff" * 64
    (tmp_path / "bad.parquet").write_bytes(bytes(data))
    result = run(tmp_path / "bad.parquet", "-o", tmp_path / "m.html")
    _one_line_exit_2(result, "bad.parquet", "damaged")
    assert not (tmp_path / "m.html").exists()


def test_an_incomplete_part_folder_is_not_mapped_in_silence(outputs, tmp_path):
    parts = tmp_path / "parts"
    parts.mkdir()
    shutil.copy(outputs / "out.parquet", parts / "part-00000-of-00002.parquet")  # part 2 of 2 not yet written
    _one_line_exit_2(run(parts, "-o", tmp_path / "m.html"), str(parts), "1 of 2 shards are not finished")
    assert not (tmp_path / "m.html").exists()
    # a part named by itself is mapped: the user chose it, and is told what the run also holds
    result = run(parts / "part-00000-of-00002.parquet", "-o", tmp_path / "m.html")
    assert result.exit_code == 0, result.output
    assert "part-00001-of-00002.parquet is missing: the map holds 1 of the run's 2 parts" in result.stderr


def test_a_fit_sample_smaller_than_the_clusters_is_refused(outputs, tmp_path):
    result = run(outputs / "out.parquet", "-o", tmp_path / "m.html", "--sample", "5", "--clusters", "10")
    _one_line_exit_2(result, "--sample 5 (of 20 points), fewer than --clusters 10")
    assert not (tmp_path / "m.html").exists()


def test_umap_on_a_fit_sample_no_larger_than_the_neighbours_is_refused(outputs, tmp_path):
    args = ["--method", "umap", "--sample", "10", "--neighbors", "15", "--color-by", "length"]
    result = run(outputs / "out.parquet", "-o", tmp_path / "m.html", *args)
    _one_line_exit_2(result, "--sample 10 (of 20 points), no more than --neighbors 15")
    assert not (tmp_path / "m.html").exists()


def test_an_interrupted_map_says_nothing_was_written_and_leaves_no_page(outputs, tmp_path, monkeypatch):
    import signal

    from esm2cli.errors import Interrupted
    from esm2cli.search import mapping

    def interrupted(*args, **kwargs):
        raise Interrupted(signal.SIGINT)  # what interruptible's handler raises on SIGINT mid-build

    monkeypatch.setattr(mapping, "build_map", interrupted)
    page = tmp_path / "m.html"
    result = run(outputs / "out.parquet", "-o", page)
    assert result.exit_code == 130, result.output
    assert result.output.strip() == "interrupted: no output was written or replaced (a map does not resume: rerun it)"
    assert list(tmp_path.iterdir()) == []
