"""embed --contacts against fair-esm's return_contacts=True on the same weights."""

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from transformers import EsmModel

from benchmarks.fair_esm_reference import contacts, fair_esm_model
from esm2cli.cli import cli
from esm2cli.jobs.workload import synthetic_sequences
from helpers import write_fasta

TRUNCATE = 50
PROTEINS = [(f"p{i}", s) for i, (_, s) in enumerate(synthetic_sequences(8, seed=9, max_length=70))] + [
    ("one", "M"),
    ("odd", "MKXBUZOW"),
]


@pytest.fixture(scope="module")
def fair(tiny_model_dir):
    """fair-esm's ESM2 with the tiny model's encoder and contact head, loaded by transformers (not by esm2cli)."""
    return fair_esm_model(EsmModel.from_pretrained(tiny_model_dir, add_pooling_layer=False))


def embed(*args):
    return CliRunner().invoke(cli, ["embed", *map(str, args)])


def read_maps(path):
    table = pq.read_table(path)
    return table, [np.array(v, dtype=np.float32) for v in table["contacts"].to_pylist()]


@pytest.mark.parametrize("devices", ["cpu", "sim:3"])
def test_contacts_agree_with_fair_esm(tmp_path, tiny_model_dir, fair, devices):
    fasta = write_fasta(tmp_path / "in.fa", PROTEINS)
    out = tmp_path / "out.parquet"
    args = ["-m", tiny_model_dir, "--dtype", "float32", "--truncate", TRUNCATE, "--devices", devices]
    result = embed(fasta, "-o", out, "--contacts", *args)
    assert result.exit_code == 0, result.output
    table, maps = read_maps(out)
    model, alphabet = fair
    assert any(table["truncated"].to_pylist())
    for (_, seq), got in zip(PROTEINS, maps, strict=True):
        kept = seq[:TRUNCATE]  # as fair-esm's extraction truncates
        assert got.shape == (len(kept), len(kept))
        want = contacts(model, alphabet, [kept])[0].numpy()
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
        np.testing.assert_allclose(got, got.T, atol=1e-6)  # the head symmetrises
    # fair-esm batched (padding, batch mates) gives the same maps
    batch = contacts(model, alphabet, [s[:TRUNCATE] for _, s in PROTEINS])
    for got, want in zip(maps, batch, strict=True):
        np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-4)
    # the embeddings do not change with --contacts (eager attention instead of SDPA)
    plain = tmp_path / "plain.parquet"
    assert embed(fasta, "-o", plain, *args).exit_code == 0
    assert "contacts" not in pq.read_schema(plain).names
    np.testing.assert_allclose(
        np.array(table["embedding"].to_pylist()), np.array(pq.read_table(plain)["embedding"].to_pylist()), atol=1e-5
    )


def test_contacts_with_windows_are_refused(tmp_path, tiny_model_dir):
    fasta = write_fasta(tmp_path / "in.fa", PROTEINS[:2])
    result = embed(
        fasta, "-o", tmp_path / "o.parquet", "-m", tiny_model_dir, "--contacts", "--long-sequences", "window"
    )
    assert result.exit_code == 2 and "--contacts needs each protein in one window" in result.stderr


def test_a_model_without_contact_head_is_refused(tmp_path, tiny_model_dir):
    model = EsmModel.from_pretrained(tiny_model_dir, add_pooling_layer=False)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("contact_head")}
    headless = tmp_path / "headless"
    model.save_pretrained(headless, state_dict=state)
    fasta = write_fasta(tmp_path / "in.fa", PROTEINS[:2])
    result = embed(fasta, "-o", tmp_path / "o.parquet", "-m", headless, "--contacts", "--dtype", "float32")
    assert result.exit_code == 1 and "has no contact head" in result.stderr
    plain = embed(fasta, "-o", tmp_path / "o.parquet", "-m", headless, "--dtype", "float32")
    assert plain.exit_code == 0, plain.output  # embeddings alone do not need it


def test_dummy_weights_give_a_random_contact_head(tmp_path):
    fasta = write_fasta(tmp_path / "in.fa", [("a", "MKTAYIAKQR"), ("b", "GSHM")])
    out = tmp_path / "o.parquet"
    result = embed(fasta, "-o", out, "-m", "esm2_t6_8M", "--load-format", "dummy", "--contacts", "--devices", "cpu")
    assert result.exit_code == 0, result.output
    _, maps = read_maps(out)
    assert [m.shape for m in maps] == [(10, 10), (4, 4)]
    assert all(((m > 0) & (m < 1)).all() for m in maps) and maps[0].std() > 0
