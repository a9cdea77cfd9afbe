import numpy as np
import pyarrow.parquet as pq
import pytest

from esm2cli.writer import BackgroundWriter, EmbeddingWriter, Rows, build_schema, read_metadata


def rows(ids, hidden=4):
    n = len(ids)
    return Rows(
        ids, [""] * n, [3] * n, [False] * n, {6: np.arange(n * hidden, dtype=np.float32).reshape(n, hidden)}, {}
    )


def writer(path):
    return EmbeddingWriter(path, build_schema(4, (6,), False, {"model": "m"}), 4, (6,))


def test_background_writer_commits_rows_in_order(tmp_path):
    out = tmp_path / "o.parquet"
    bg = BackgroundWriter(writer(out))
    for k in range(5):
        bg.write(rows([f"{k}-{i}" for i in range(3)]))
    bg.commit()
    table = pq.read_table(out)
    assert table["id"].to_pylist() == [f"{k}-{i}" for k in range(5) for i in range(3)]
    assert read_metadata(out) == {"model": "m"}
    assert not (tmp_path / "o.parquet.tmp").exists()


def test_background_writer_reports_errors_and_abort_leaves_nothing(tmp_path):
    out = tmp_path / "o.parquet"
    bg = BackgroundWriter(writer(out))
    bad = rows(["a"])
    bad.pooled = {6: np.zeros((1, 3), dtype=np.float32)}  # wrong width: the writer thread fails
    bg.write(bad)
    with pytest.raises(Exception):
        for _ in range(50):
            bg.write(rows(["b"]))
        bg.commit()
    bg.abort()
    assert not out.exists() and not (tmp_path / "o.parquet.tmp").exists()
