"""The output schema users read, pinned whole: Parquet columns (names, types, nullability), the metadata keys,
and the HDF5 layout (dataset dtypes and shapes, attribute names and types), pooled and per-token, one layer
and several. The expected schema is written out here from the README's table, not built by the writer."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from esm2cli.cli import cli
from esm2cli.io.hdf5 import PER_TOKEN_GROUP
from helpers import TINY

HIDDEN = TINY["hidden"]
RECORDS = [("p1", "MKTAYIAKQRQISFVKSHFSRQ"), ("p2", "GSHMLEDPV")]
HEADERS = {"p1": "first protein", "p2": ""}

# The README's metadata (`esm2cli` key): what every output records about how it was made.
METADATA_KEYS = {
    "model", "model_source", "random_weights", "layers", "pooling", "dtype", "truncate", "long_sequences", "input",
    "output_dtype", "allow_duplicate_ids", "esm2cli_version", "numerics", "identity",
}  # fmt: skip
IDENTITY_KEYS = {
    "input_sha256", "input_records", "model_identity", "model_family", "dtype", "layers", "pooling", "per_token",
    "truncate", "skip_invalid", "shard", "long_sequences", "window_overlap", "output_dtype",
}  # fmt: skip

CASES = {
    "pooled, one layer": ([], ["embedding"], []),
    "per-token, one layer": (["--per-token"], ["embedding"], ["per_token"]),
    "pooled, two layers": (["--layers", "1,-1"], ["embedding_l1", "embedding_l3"], []),
    "per-token, two layers": (
        ["--layers", "1,-1", "--per-token"],
        ["embedding_l1", "embedding_l3"],
        ["per_token_l1", "per_token_l3"],
    ),
}


def expected_schema(pooled: list[str], per_token: list[str]) -> pa.Schema:
    vector = pa.list_(pa.field("item", pa.float32(), nullable=True), HIDDEN)
    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("description", pa.string(), nullable=False),
        pa.field("length", pa.int32(), nullable=False),
        pa.field("truncated", pa.bool_(), nullable=False),
        pa.field("windows", pa.int32(), nullable=False),
        pa.field("sequence_sha256", pa.string(), nullable=True),  # null only in tables not written by esm2cli
    ]
    fields += [pa.field(name, vector, nullable=False) for name in pooled]
    fields += [pa.field(name, pa.list_(pa.field("item", vector, nullable=True)), nullable=False) for name in per_token]
    return pa.schema(fields)


@pytest.fixture(scope="module")
def fasta(tmp_path_factory):
    path = tmp_path_factory.mktemp("schema") / "in.fa"
    path.write_text("".join(f"{f'>{i} {HEADERS[i]}'.rstrip()}\n{seq}\n" for i, seq in RECORDS))
    return str(path)


def embed(fasta, out, model, extra):
    args = ["embed", fasta, "-o", str(out), "-m", model, "--dtype", "float32", "--devices", "cpu", "-q", *extra]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return out


def assert_same_fields(got: pa.Schema, want: pa.Schema) -> None:
    """Field by field, so that a failure names the column; nullability and the list item fields included."""
    assert got.names == want.names
    for name in want.names:
        g, w = got.field(name), want.field(name)
        assert (g.type, g.nullable) == (w.type, w.nullable), f"{name}: {g.type} nullable={g.nullable}"
        if pa.types.is_list(w.type) or pa.types.is_fixed_size_list(w.type):
            assert g.type.value_field.nullable == w.type.value_field.nullable, name
    assert got.remove_metadata().equals(want, check_metadata=False)


@pytest.mark.parametrize("case", list(CASES))
def test_parquet_schema_is_the_documented_one(tmp_path, fasta, tiny_model_dir, case):
    extra, pooled, per_token = CASES[case]
    out = embed(fasta, tmp_path / "out.parquet", tiny_model_dir, extra)
    schema = pq.read_schema(out)
    assert_same_fields(schema, expected_schema(pooled, per_token))
    assert set(schema.metadata) == {b"esm2cli"}  # one key, JSON: nothing else leaks into the footer
    meta = json.loads(schema.metadata[b"esm2cli"])
    assert set(meta) == METADATA_KEYS
    assert set(meta["identity"]) == IDENTITY_KEYS
    assert meta["layers"] == ([1, 3] if "--layers" in extra else [3])
    assert meta["identity"]["per_token"] == bool(per_token)
    table = pq.read_table(out)
    assert table["id"].to_pylist() == ["p1", "p2"]
    assert table["description"].to_pylist() == ["first protein", ""]
    assert table["length"].to_pylist() == [len(s) for _, s in RECORDS]
    assert table["windows"].to_pylist() == [1, 1] and table["truncated"].to_pylist() == [False, False]
    for name in per_token:
        assert [len(v) for v in table[name].to_pylist()] == [len(s) for _, s in RECORDS]


def test_python_api_table_has_the_cli_schema(tmp_path, fasta, tiny_model_dir):
    from esm2cli import Embedder

    with Embedder(tiny_model_dir, devices="cpu", dtype="float32") as embedder:
        table = embedder.embed_fasta(fasta)
    assert_same_fields(table.schema, expected_schema(["embedding"], []))


def test_merged_parts_keep_the_schema(tmp_path, fasta, tiny_model_dir):
    for i in range(2):
        embed(fasta, tmp_path / "parts", tiny_model_dir, ["--shard-count", "2", "--shard-index", str(i)])
    result = CliRunner().invoke(cli, ["merge", str(tmp_path / "parts"), "-o", str(tmp_path / "all.parquet")])
    assert result.exit_code == 0, result.output
    schema = pq.read_schema(tmp_path / "all.parquet")
    assert_same_fields(schema, expected_schema(["embedding"], []))
    meta = json.loads(schema.metadata[b"esm2cli"])
    assert set(meta) == METADATA_KEYS | {"parts"} and meta["identity"]["shard"] == "merged"


# The README's HDF5 layout: a dataset per protein, with these attributes, of these types.
DATASET_ATTRS = {"original_id": str, "description": str, "length": np.integer, "truncated": np.bool_,
                 "windows": np.integer, "sequence_sha256": str}  # fmt: skip
FILE_ATTRS = {"esm2cli", "model", "model_source", "pooling", "dtype", "truncate", "esm2cli_version", "layers"}


@pytest.mark.parametrize("case", list(CASES))
def test_hdf5_layout_is_the_documented_one(tmp_path, fasta, tiny_model_dir, case):
    extra, pooled, per_token = CASES[case]
    out = embed(fasta, tmp_path / "out.h5", tiny_model_dir, extra)
    several = len(pooled) > 1
    with h5py.File(out, "r") as f:
        assert set(f.attrs) == FILE_ATTRS
        assert f.attrs["layers"].dtype == np.int64 and list(f.attrs["layers"]) == ([1, 3] if several else [3])
        assert [key for key in f if key != PER_TOKEN_GROUP] == ["p1", "p2"]  # input order
        assert (PER_TOKEN_GROUP in f) == bool(per_token)
        for rec_id, seq in RECORDS:
            dataset = f[rec_id]
            assert dataset.dtype == np.float32 and dataset.shape == ((2, HIDDEN) if several else (HIDDEN,))
            assert set(dataset.attrs) == set(DATASET_ATTRS)
            for name, kind in DATASET_ATTRS.items():
                assert isinstance(dataset.attrs[name], kind), (name, type(dataset.attrs[name]))
            assert dataset.attrs["length"] == len(seq) and dataset.attrs["description"] == HEADERS[rec_id]
            if per_token:
                residues = f[PER_TOKEN_GROUP][rec_id]
                assert residues.dtype == np.float32
                assert residues.shape == ((2, len(seq), HIDDEN) if several else (len(seq), HIDDEN))
                assert set(residues.attrs) == {"original_id"}
