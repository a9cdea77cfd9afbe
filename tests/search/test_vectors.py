"""Vectors read back from outputs: Parquet and HDF5 alike, normalised, checked for one identity."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from esm2cli.errors import ConfigError, InputError
from esm2cli.search.vectors import expand_inputs, open_inputs, read_batches, unit_rows
from helpers import embed_cli, random_protein, write_fasta


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("vectors")
    fasta = write_fasta(root / "in.fasta", [(f"p{i}", random_protein(20 + 7 * i)) for i in range(9)])
    embed_cli(fasta, root / "out.parquet", tiny_model_dir, check=True)
    embed_cli(fasta, root / "out.h5", tiny_model_dir, check=True)
    embed_cli(fasta, root / "mean_bos.parquet", tiny_model_dir, "--pooling", "bos", check=True)
    embed_cli(fasta, root / "two.parquet", tiny_model_dir, "--layers", "1,-1", check=True)
    return root


def _read(paths, **kwargs):
    batches = list(read_batches(open_inputs(paths, **kwargs)))
    return [i for b in batches for i in b.ids], np.concatenate([b.vectors for b in batches])


def test_parquet_and_hdf5_give_the_same_unit_vectors(outputs):
    ids, vectors = _read([outputs / "out.parquet"])
    h5_ids, h5_vectors = _read([outputs / "out.h5"])
    table = pq.read_table(outputs / "out.parquet")
    raw = np.array(table.column("embedding").to_pylist(), np.float32)
    assert ids == table.column("id").to_pylist() == h5_ids
    np.testing.assert_allclose(vectors, raw / np.linalg.norm(raw, axis=1, keepdims=True), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(vectors, h5_vectors)


def test_a_multi_layer_run_needs_a_layer_and_reads_it(outputs):
    with pytest.raises(ConfigError, match="--layer"):
        open_inputs([outputs / "two.parquet"])
    ids, vectors = _read([outputs / "two.parquet"], layer=1)
    raw = np.array(pq.read_table(outputs / "two.parquet").column("embedding_l1").to_pylist(), np.float32)
    np.testing.assert_allclose(vectors, raw / np.linalg.norm(raw, axis=1, keepdims=True), rtol=1e-6, atol=1e-7)
    with pytest.raises(ConfigError, match="no layer 99"):
        open_inputs([outputs / "two.parquet"], layer=99)


def test_inputs_of_another_identity_are_refused_by_name(outputs):
    with pytest.raises(InputError, match=r"mean_bos.parquet: vectors of another run .*pooling was 'mean', now 'bos'"):
        open_inputs([outputs / "out.parquet", outputs / "mean_bos.parquet"])


def test_one_file_named_twice_is_read_once_with_a_warning(outputs, tmp_path, caplog):
    out = outputs / "out.parquet"
    link = tmp_path / "link.parquet"
    link.symlink_to(out)
    assert expand_inputs([out, out, link]) == [str(out)]
    assert f"{link} is named more than once (as {out}): it is read once" in caplog.text
    copy = tmp_path / "copy.parquet"
    copy.write_bytes(out.read_bytes())
    assert len(open_inputs([out, copy])) == 2  # another file of the same proteins is another input


def test_a_file_of_no_esm2cli_run_and_an_empty_folder_are_named(outputs, tmp_path):
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"id": ["a"]}), plain)
    with pytest.raises(InputError, match="plain.parquet: not an esm2cli output"):
        open_inputs([plain])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holding no esm2cli output"):
        expand_inputs([tmp_path / "empty"])
    with pytest.raises(InputError, match="no such file"):
        expand_inputs([tmp_path / "missing.parquet"])


def test_a_non_finite_vector_is_refused_naming_the_record():
    vectors = np.ones((3, 4), np.float32)
    vectors[1, 2] = np.nan
    with pytest.raises(InputError, match="record 'b' has a vector holding NaN"):
        unit_rows(vectors, ["a", "b", "c"], "x.parquet")
    assert np.array_equal(unit_rows(np.zeros((1, 4)), ["z"], "x"), np.zeros((1, 4), np.float32))


def test_a_part_folder_is_read_only_when_every_shard_of_the_run_is_there(tmp_path):
    folder = tmp_path / "parts"
    folder.mkdir()
    for i in (0, 2):
        (folder / f"part-{i:05d}-of-00003.parquet").write_bytes(b"")
    with pytest.raises(InputError, match=r"parts: 1 of 3 shards are not finished: 1"):
        expand_inputs([folder])  # not the two parts present, 2/3 of the proteins without a word
    (folder / "part-00001-of-00003.parquet").write_bytes(b"")
    assert [path.rsplit("/", 1)[1] for path in expand_inputs([folder])] == [
        f"part-{i:05d}-of-00003.parquet" for i in range(3)
    ]
