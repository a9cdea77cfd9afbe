"""--output-dtype float16: halffloat Parquet lists and float16 HDF5 datasets, within 1e-3 (relative) of float32,
read back by merge and --reuse."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from esm2cli.cli import cli
from esm2cli.io.schema import build_schema, vector_dtype
from helpers import embed_cli, write_fasta

RECORDS = [(f"p{i}", "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ"[: 4 + (i * 7) % 29]) for i in range(12)]


def test_the_schema_stores_vectors_in_the_dtype_asked_for():
    half = build_schema(8, [-1], True, {}, dtype="float16")
    assert half.field("embedding").type == pa.list_(pa.float16(), 8)
    assert half.field("per_token").type == pa.list_(pa.list_(pa.float16(), 8))
    assert vector_dtype(half.field("per_token").type) == np.float16
    assert build_schema(8, [-1], False, {}).field("embedding").type == pa.list_(pa.float32(), 8)


def test_float16_parquet_is_halffloat_within_1e_3_of_float32(tmp_path, tiny_model_dir):
    fasta = write_fasta(tmp_path / "in.fa", RECORDS)
    embed_cli(fasta, tmp_path / "f32.parquet", tiny_model_dir, "--per-token", check=True)
    embed_cli(fasta, tmp_path / "f16.parquet", tiny_model_dir, "--per-token", "--output-dtype", "float16", check=True)
    full, half = pq.read_table(tmp_path / "f32.parquet"), pq.read_table(tmp_path / "f16.parquet")
    assert half.schema.field("embedding").type.value_type == pa.float16()
    want = np.array(full["embedding"].to_pylist(), np.float32)
    got = half["embedding"].combine_chunks().flatten().to_numpy().reshape(want.shape)
    assert got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float32), want, rtol=1e-3, atol=1e-3 * np.abs(want).max())
    tokens = np.concatenate([np.array(v, np.float32) for v in half["per_token"].to_pylist()])
    np.testing.assert_allclose(tokens, np.concatenate([np.array(v) for v in full["per_token"].to_pylist()]),
                               rtol=1e-3, atol=1e-3)  # fmt: skip
    assert (tmp_path / "f16.parquet").stat().st_size < 0.75 * (tmp_path / "f32.parquet").stat().st_size


def test_float16_hdf5_datasets_are_float16(tmp_path, tiny_model_dir):
    h5py = pytest.importorskip("h5py")
    fasta = write_fasta(tmp_path / "in.fa", RECORDS)
    embed_cli(fasta, tmp_path / "f32.h5", tiny_model_dir, check=True)
    embed_cli(fasta, tmp_path / "f16.h5", tiny_model_dir, "--output-dtype", "float16", check=True)
    with h5py.File(tmp_path / "f16.h5") as half, h5py.File(tmp_path / "f32.h5") as full:
        assert half["p3"].dtype == np.float16 and full["p3"].dtype == np.float32
        np.testing.assert_allclose(half["p3"][()].astype(np.float32), full["p3"][()], rtol=1e-3, atol=1e-3)


def test_float16_parts_merge_and_serve_as_reuse(tmp_path, tiny_model_dir):
    fasta = write_fasta(tmp_path / "in.fa", RECORDS)
    for index in range(3):
        embed_cli(fasta, tmp_path / "emb", tiny_model_dir, "--output-dtype", "float16", "--shard-count", 3,
                  "--shard-index", index, check=True)  # fmt: skip
    merged = CliRunner().invoke(cli, ["merge", str(tmp_path / "emb"), "-o", str(tmp_path / "all.parquet")])
    assert merged.exit_code == 0, merged.output
    table = pq.read_table(tmp_path / "all.parquet")
    assert table.schema.field("embedding").type.value_type == pa.float16()
    assert table["id"].to_pylist() == [rec_id for rec_id, _ in RECORDS]
    more = write_fasta(tmp_path / "more.fa", [*RECORDS, ("new", "MKVLW")])
    result = embed_cli(more, tmp_path / "more.parquet", tiny_model_dir, "--output-dtype", "float16", "--reuse",
                       tmp_path / "all.parquet", check=True)  # fmt: skip
    assert f"{len(RECORDS)} reused from" in result.output and "1 computed" in result.output
    again = pq.read_table(tmp_path / "more.parquet")
    assert again.slice(0, len(RECORDS))["embedding"].equals(table["embedding"])  # copied bit for bit


def test_the_python_api_writes_float16_tables_and_returns_float32_arrays(tmp_path, tiny_model_dir):
    from esm2cli import Embedder

    fasta = write_fasta(tmp_path / "in.fa", RECORDS[:4])
    with Embedder(tiny_model_dir, devices="cpu", dtype="float32", output_dtype="float16") as half:
        table = half.embed_fasta(fasta)
        arrays = half.embed([seq for _, seq in RECORDS[:4]])
    assert table.schema.field("embedding").type.value_type == pa.float16() and arrays.dtype == np.float32
    stored = np.array(table["embedding"].to_pylist(), np.float32)
    np.testing.assert_allclose(stored, arrays, rtol=1e-3, atol=1e-3)


def _overflowing_model(tmp_path, residues: str | None = None) -> str:
    """A tiny ESM-2 whose token embeddings (layer 0) reach ~1e5, beyond float16: every token's, or only those of
    ``residues`` (the <cls> row then stays small)."""
    import torch
    from transformers import AutoTokenizer, EsmForMaskedLM

    from helpers import build_tiny_esm2

    model_dir = build_tiny_esm2(tmp_path / "big")
    model = EsmForMaskedLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = slice(None) if residues is None else tokenizer.convert_tokens_to_ids(list(residues))
    with torch.no_grad():
        model.esm.embeddings.word_embeddings.weight[rows] *= 1e6
    model.save_pretrained(model_dir)
    return model_dir


F16_LAYER_0 = ["--devices", "cpu", "--dtype", "float32", "--layers", "0", "--output-dtype", "float16"]


def test_float16_output_refuses_pooled_values_out_of_range(tmp_path):
    model_dir = _overflowing_model(tmp_path)
    fasta = write_fasta(tmp_path / "a.fa", [("p1", "MKTAYIAK"), ("p2", "GGSS")])
    out = tmp_path / "out.parquet"
    result = CliRunner().invoke(cli, ["embed", fasta, "-o", str(out), "-m", model_dir, *F16_LAYER_0])
    assert result.exit_code == 2, result.output  # docs/output-format.md: stopped with one line, never inf
    assert "p1: embedding holds" in result.output and "beyond float16's range (65504)" in result.output
    assert not out.exists()


def test_float16_output_refuses_per_token_values_out_of_range(tmp_path):
    model_dir = _overflowing_model(tmp_path, residues="W")  # only p2's W overflows; <cls> (the bos pool) does not
    fasta = write_fasta(tmp_path / "a.fa", [("p1", "MKTAYIAK"), ("p2", "GGSWS")])
    args = ["embed", fasta, "-m", model_dir, *F16_LAYER_0, "--pooling", "bos"]
    pooled = CliRunner().invoke(cli, [*args, "-o", str(tmp_path / "pooled.parquet")])
    assert pooled.exit_code == 0, pooled.output  # the control: the pooled vectors fit float16
    out = tmp_path / "out.parquet"
    result = CliRunner().invoke(cli, [*args, "-o", str(out), "--per-token"])
    assert result.exit_code == 2, result.output
    assert "p2: per_token holds" in result.output and "beyond float16's range (65504)" in result.output
    assert not out.exists()


@pytest.mark.parametrize("role", ["output", "reuse", "merge"])
def test_foreign_metadata_is_one_line(tmp_path, tiny_model_dir, role):
    import pyarrow as pa
    import pyarrow.parquet as pq

    fasta = write_fasta(tmp_path / "a.fa", [("p1", "MKTAYIAK")])
    foreign = pa.table({"id": ["p1"]}).replace_schema_metadata({b"esm2cli": b"[1, 2]"})
    path = tmp_path / ("parts/part-00000-of-00001.parquet" if role == "merge" else "other.parquet")
    path.parent.mkdir(exist_ok=True)
    pq.write_table(foreign, path)
    base = ["-m", tiny_model_dir, "--devices", "cpu"]
    args = {
        "output": ["embed", fasta, "-o", str(path), *base],
        "reuse": ["embed", fasta, "-o", str(tmp_path / "new.parquet"), *base, "--reuse", str(path)],
        "merge": ["merge", str(path.parent), "-o", str(tmp_path / "all.parquet")],
    }[role]
    result = CliRunner().invoke(cli, args)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)  # no trace
    assert result.exit_code == (0 if role == "reuse" else 2), result.output  # reuse skips it with a line
    assert str(path) in result.output and (role != "reuse" or "is not an esm2cli output" in result.output)
