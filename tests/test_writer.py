import numpy as np
import pyarrow.parquet as pq
import pytest

from esm2cli.errors import OutputExistsError
from esm2cli.writer import BackgroundWriter, ChunkStore, Rows, build_schema, read_metadata, work_dir


def rows(ids, hidden=4):
    n = len(ids)
    return Rows(
        ids, [""] * n, [3] * n, [False] * n, {6: np.arange(n * hidden, dtype=np.float32).reshape(n, hidden)}, {}
    )


def store(target, key=None):
    key = key or {"run": 1}
    return ChunkStore(str(target), build_schema(4, (6,), False, {"model": "m", "run": key}), 4, (6,), key)


def test_chunks_are_written_in_the_background_and_merged_in_order(tmp_path):
    out = tmp_path / "o.parquet"
    chunks = store(out)
    assert chunks.open(overwrite=False) == set()
    bg = BackgroundWriter(chunks)
    for k in range(5):
        bg.write(k, rows([f"{k}-{i}" for i in range(3)]))
    bg.finish()
    chunks.commit(5, 15)
    table = pq.read_table(out)
    assert table["id"].to_pylist() == [f"{k}-{i}" for k in range(5) for i in range(3)]
    assert read_metadata(out) == {"model": "m", "run": {"run": 1}}
    assert not (tmp_path / ".o.parquet.tmp").exists() and not (tmp_path / "_o.parquet.parts").exists()


def test_finished_chunks_survive_and_are_reported_to_a_rerun(tmp_path):
    out = tmp_path / "o.parquet"
    first = store(out)
    first.open(overwrite=False)
    first.write(0, rows(["a"]))
    first.write(2, rows(["c"]))
    (tmp_path / "_o.parquet.parts" / ".chunk-000001.parquet.tmp").write_bytes(b"half written")
    assert store(out).open(overwrite=False) == {0, 2}
    with pytest.raises(OutputExistsError, match="other arguments"):
        store(out, key={"run": 2}).open(overwrite=False)
    assert store(out, key={"run": 2}).open(overwrite=True) == set()


def test_background_writer_reports_errors(tmp_path):
    chunks = store(tmp_path / "o.parquet")
    chunks.open(overwrite=False)
    bg = BackgroundWriter(chunks)
    bad = rows(["a"])
    bad.pooled = {6: np.zeros((1, 3), dtype=np.float32)}  # wrong width: the writer thread fails
    bg.write(0, bad)
    with pytest.raises((ValueError, TypeError, OSError)):  # pyarrow's complaint about the width
        for k in range(1, 50):
            bg.write(k, rows(["b"]))
        bg.finish()
    bg.abort()
    assert not (tmp_path / "o.parquet").exists()
    assert not list((tmp_path / "_o.parquet.parts").glob(".*.tmp"))


def test_work_dir_is_hidden_from_dataset_readers(tmp_path):
    assert work_dir(str(tmp_path / "part-00001-of-00004.parquet")).endswith("/_part-00001-of-00004.parquet.parts")
    assert (
        work_dir("s3://bucket/emb/part-00001-of-00004.parquet") == "s3://bucket/emb/_part-00001-of-00004.parquet.parts"
    )
