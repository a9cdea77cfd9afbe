"""How embeddings are encoded in Parquet: floats byte-split, never dictionary-encoded (bounded writer memory)."""

import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq

from esm2cli.io.parquet import EmbeddingWriter, concatenate
from esm2cli.io.schema import Rows, build_schema, write_options

HIDDEN = 320


def long_protein(residues: int) -> Rows:
    tokens = np.random.default_rng(0).standard_normal((residues, HIDDEN), dtype=np.float32)
    pooled = tokens.mean(axis=0, keepdims=True)
    return Rows(["p"], ["long"], [residues], [False], {6: pooled}, {6: [tokens]}, windows=[35])


def write(path, rows: Rows) -> None:
    writer = EmbeddingWriter(path, build_schema(HIDDEN, (6,), True, {"model": "m"}), HIDDEN, (6,))
    writer.write(rows)
    writer.commit()


PEAK_SCRIPT = """
import sys
import numpy as np
import pyarrow as pa
from esm2cli.io.parquet import EmbeddingWriter
from esm2cli.io.schema import Rows, build_schema
tokens = np.random.default_rng(0).standard_normal((3000, 320), dtype=np.float32)
writer = EmbeddingWriter(sys.argv[1], build_schema(320, (6,), True, {}), 320, (6,))
writer.write(Rows(["p"], [""], [3000], [False], {6: tokens[:1]}, {6: [tokens]}))
writer.commit()
print(pa.default_memory_pool().max_memory(), tokens.nbytes)
"""


def test_one_long_proteins_tokens_are_written_without_a_dictionary_of_their_values(tmp_path):
    # One row of 3,000 x 320 float32 (3.7 MB): dictionary-encoded, the writer held a hash table of all
    # 960,000 distinct values before it fell back to plain (~90 MB of Arrow memory here; 1.5 GB for 35,000
    # residues). A process of its own, so that Arrow's peak is this write's alone.
    out = tmp_path / "o.parquet"
    run = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(out)],
        capture_output=True, text=True, check=True, env={**os.environ, "ARROW_DEFAULT_MEMORY_POOL": "system"},
    )  # fmt: skip
    peak, data = map(int, run.stdout.split())
    assert peak < 6 * data
    tokens = np.random.default_rng(0).standard_normal((3000, HIDDEN), dtype=np.float32)
    back = pq.read_table(out)
    np.testing.assert_array_equal(back["per_token"][0].values.flatten().to_numpy().reshape(-1, HIDDEN), tokens)
    np.testing.assert_array_equal(np.array(back["embedding"][0].as_py(), np.float32), tokens[0])


def test_floats_are_byte_split_and_the_other_columns_keep_their_dictionary(tmp_path):
    write(tmp_path / "part.parquet", long_protein(50))
    concatenate(
        [str(tmp_path / "part.parquet")] * 2, str(tmp_path / "o.parquet"), pq.read_schema(tmp_path / "part.parquet")
    )
    for name in ("part.parquet", "o.parquet"):
        group = pq.ParquetFile(tmp_path / name).metadata.row_group(0)
        encodings = {group.column(i).path_in_schema: group.column(i).encodings for i in range(group.num_columns)}
        assert "BYTE_STREAM_SPLIT" in encodings["per_token.list.element.list.element"]
        assert "BYTE_STREAM_SPLIT" in encodings["embedding.list.element"]
        assert not any("DICTIONARY" in e for e in encodings["per_token.list.element.list.element"])
        assert "RLE_DICTIONARY" in encodings["id"]


def test_write_options_name_each_leaf_of_nested_columns():
    schema = build_schema(4, (6, 7), True, {}, contacts=True)
    options = write_options(schema)
    assert sorted(options["use_byte_stream_split"]) == sorted([
        "embedding_l6.list.element",
        "embedding_l7.list.element",
        "per_token_l6.list.element.list.element",
        "per_token_l7.list.element.list.element",
        "contacts.list.element.list.element",
    ])  # fmt: skip
    assert set(options["use_dictionary"]) == {"id", "description", "length", "truncated", "windows", "sequence_sha256"}
