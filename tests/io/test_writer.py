import numpy as np
import pyarrow.parquet as pq
import pytest

from esm2cli.errors import OutputExistsError
from esm2cli.io.chunks import Chunk, ChunkStore, work_dir
from esm2cli.io.parquet import BackgroundWriter, EmbeddingWriter, read_metadata
from esm2cli.io.schema import ROW_GROUP_BYTES, Rows, build_schema


def rows(ids, hidden=4):
    n = len(ids)
    return Rows(
        ids, [""] * n, [3] * n, [False] * n, {6: np.arange(n * hidden, dtype=np.float32).reshape(n, hidden)}, {}
    )


def store(target, key=None):
    key = key or {"run": 1}
    return ChunkStore(str(target), build_schema(4, (6,), False, {"model": "m", "run": key}), 4, (6,), key)


def chunk(k, size=3):
    return Chunk(k * size, (k + 1) * size, f"{k:064x}")


def test_chunks_are_written_in_the_background_and_merged_in_order(tmp_path):
    out = tmp_path / "o.parquet"
    chunks = store(out)
    assert chunks.open(overwrite=False) == {}
    bg = BackgroundWriter(chunks)
    for k in range(5):
        bg.write(chunk(k), rows([f"{k}-{i}" for i in range(3)]))
    bg.finish()
    chunks.commit([chunk(k) for k in range(5)], 15)
    table = pq.read_table(out)
    assert table["id"].to_pylist() == [f"{k}-{i}" for k in range(5) for i in range(3)]
    assert read_metadata(out) == {"model": "m", "run": {"run": 1}}
    assert not list(tmp_path.glob(".o.parquet*.tmp")) and not (tmp_path / "_o.parquet.parts").exists()


def test_finished_chunks_survive_and_are_reported_to_a_rerun(tmp_path):
    out = tmp_path / "o.parquet"
    first = store(out)
    first.open(overwrite=False)
    first.write(chunk(0, 1), rows(["a"]))
    first.write(chunk(2, 1), rows(["c"]))
    (tmp_path / "_o.parquet.parts" / f".{chunk(1, 1).name}.tmp").write_bytes(b"half written")
    assert store(out).open(overwrite=False) == {0: chunk(0, 1), 2: chunk(2, 1)}
    with pytest.raises(OutputExistsError, match="other options .run was 1, now 2.: rerun with those options"):
        store(out, key={"run": 2}).open(overwrite=False)
    assert store(out, key={"run": 2}).open(overwrite=True) == {}


def test_background_writer_reports_errors(tmp_path):
    chunks = store(tmp_path / "o.parquet")
    chunks.open(overwrite=False)
    bg = BackgroundWriter(chunks)
    bad = rows(["a"])
    bad.pooled = {6: np.zeros((1, 3), dtype=np.float32)}  # wrong width: the writer thread fails
    bg.write(chunk(0, 1), bad)
    with pytest.raises(ValueError, match="multiple of the list_size"):  # pyarrow's complaint about the width
        for k in range(1, 50):
            bg.write(chunk(k, 1), rows(["b"]))
        bg.finish()
    bg.abort()
    assert not (tmp_path / "o.parquet").exists()
    assert not list((tmp_path / "_o.parquet.parts").glob(".*.tmp"))


def test_work_dir_is_hidden_from_dataset_readers(tmp_path):
    assert work_dir(str(tmp_path / "part-00001-of-00004.parquet")).endswith("/_part-00001-of-00004.parquet.parts")
    assert (
        work_dir("s3://bucket/emb/part-00001-of-00004.parquet") == "s3://bucket/emb/_part-00001-of-00004.parquet.parts"
    )


def test_row_groups_are_bounded_in_bytes(tmp_path):
    hidden = 64
    n, residues = 40, 4000  # 40 proteins of 4,000 residues: 41 MB of per-token floats
    per_token = [np.full((residues, hidden), i, dtype=np.float32) for i in range(n)]
    data = Rows([f"p{i}" for i in range(n)], [""] * n, [residues] * n, [False] * n,
                {6: np.zeros((n, hidden), np.float32)}, {6: per_token})  # fmt: skip
    path = tmp_path / "big.parquet"
    writer = EmbeddingWriter(path, build_schema(hidden, (6,), True, {}), hidden, (6,))
    writer.write(data)
    writer.commit()
    meta = pq.ParquetFile(path).metadata
    assert meta.num_row_groups >= 2 and meta.num_rows == n
    per_row = residues * hidden * 4
    assert all(meta.row_group(g).num_rows * per_row <= ROW_GROUP_BYTES for g in range(meta.num_row_groups))
    column = pq.read_table(path, columns=["per_token"])["per_token"]
    assert [column[i].values[0][0].as_py() for i in (0, n - 1)] == [0.0, float(n - 1)]


def test_merge_refuses_to_write_onto_one_of_its_parts(tmp_path):
    from esm2cli.io.merge import merge_parts

    parts = tmp_path / "emb"
    for i in range(2):
        w = EmbeddingWriter(parts / f"part-{i:05d}-of-00002.parquet", build_schema(4, (6,), False, {}), 4, (6,))
        w.write(rows([f"{i}"]))
        w.commit()
    before = (parts / "part-00001-of-00002.parquet").read_bytes()
    with pytest.raises(OutputExistsError, match="is one of the parts being merged"):
        merge_parts(str(parts), str(parts / "part-00001-of-00002.parquet"))
    assert (parts / "part-00001-of-00002.parquet").read_bytes() == before


def test_after_write_runs_once_a_chunk_is_written_and_its_rows_are_dropped(tmp_path):
    import gc
    import weakref

    out = tmp_path / "o.parquet"
    chunks = store(out)
    chunks.open(overwrite=False)
    seen = []  # per call: chunks on disk, and whether the chunk's pooled array is still alive
    alive = []

    def after_write():
        gc.collect()
        seen.append((len(list((tmp_path / "_o.parquet.parts").glob("*.parquet"))), alive[-1]() is not None))

    bg = BackgroundWriter(chunks, after_write=after_write)
    for k in range(3):
        r = rows([f"{k}-{i}" for i in range(3)])
        alive.append(weakref.ref(r.pooled[6]))
        bg.write(chunk(k), r)
        del r
        bg.finish() if k == 2 else None
    assert [n for n, _ in seen] == [1, 2, 3]
    assert seen[-1][1] is False  # the last chunk's rows were gone when the memory was handed back
