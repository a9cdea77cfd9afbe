"""Packed batches (esm2cli.model.packed): packing on the host, the named layout of the device buffers, the
attention groups."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from esm2cli.config import ModelConfig
from esm2cli.model.load import load_model
from esm2cli.model.packed import BatchLayout, Layout, attention_groups, plan_groups, to_device
from helpers import pack, random_seqs


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(ModelConfig(model=tiny_model_dir, dtype="float32"))


def test_token_dropout_scales_by_the_mask_share_of_each_protein(loaded):
    batch = pack(loaded, ["MKVL", "AC"], masked=[1, None])
    # protein 0: 6 tokens, one masked; protein 1: none masked
    np.testing.assert_allclose(batch.scale[:6], [0.88 / (1 - 1 / 6)] * 2 + [0] + [0.88 / (1 - 1 / 6)] * 3, rtol=1e-6)
    np.testing.assert_allclose(batch.scale[6:], [0.88] * 4, rtol=1e-6)
    assert np.all(pack(loaded, ["MKVL"], masked=[1], token_dropout=False).scale == 1)


def test_attention_groups_cover_every_protein_once():
    assert [len(g) for g in attention_groups(np.array([100, 101, 100, 99]))] == [4]  # uniform: one call
    sizes = np.array([900, 5, 7, 300, 6, 310])
    groups = attention_groups(sizes)
    assert sorted(np.concatenate(groups).tolist()) == list(range(len(sizes)))
    assert len(groups) > 1  # the 900-token protein does not pad the 5-token ones
    assert all(sizes[g].max() - sizes[g].min() < 100 for g in groups)


def test_a_layout_round_trips_its_fields_and_refuses_a_mismatch():
    layout = Layout.of({"a": 3, "b": 0, "c": 2})
    assert layout.total == 5 and layout.names == ("a", "b", "c")
    assert layout.slices() == {"a": slice(0, 3), "b": slice(3, 3), "c": slice(3, 5)}
    fields = {"a": np.array([1, 2, 3]), "b": np.array([], dtype=np.int64), "c": np.array([7, 8])}
    flat = layout.pack(fields, np.int64)
    np.testing.assert_array_equal(flat, [1, 2, 3, 7, 8])
    for name, part in layout.split(torch.from_numpy(flat)).items():  # numpy in, torch out: the same cuts
        np.testing.assert_array_equal(part.numpy(), fields[name])
    with pytest.raises(ValueError, match="field c has 3 values, its layout 2"):
        layout.pack({**fields, "c": np.array([7, 8, 9])}, np.int64)
    with pytest.raises(ValueError, match="fields .* for a layout of"):
        layout.pack({"a": fields["a"], "c": fields["c"]}, np.int64)  # one left out
    with pytest.raises(ValueError, match="fields .* for a layout of"):
        layout.pack({"c": fields["c"], "b": fields["b"], "a": fields["a"]}, np.int64)  # out of order
    with pytest.raises(ValueError, match="a buffer of 6 values for a layout of 5"):
        layout.split(np.zeros(6))


def test_a_batch_layout_names_every_index_once():
    layout = BatchLayout.sized(tokens=10, seqs=2, segments=3, residues=6, extra={"keep": 4})
    assert dict(layout.ints.fields) == {
        "tokens": 10, "positions": 10, "cu_seqlens": 4, "pool_index": 10, "bos_rows": 2, "residue_rows": 6, "keep": 4,
    }  # fmt: skip
    assert dict(layout.floats.fields) == {"scale": 10, "inv_lengths": 3}


@pytest.mark.parametrize("groups", [False, True])
def test_to_device_round_trips_the_batch(loaded, groups):
    seqs = random_seqs([1, 5, 17, 40, 300])
    batch = pack(loaded, seqs, masked=[None, 2, None, 0, 10])
    db = to_device(batch, "cpu", groups=groups)
    np.testing.assert_array_equal(db.tokens.numpy(), batch.tokens)
    np.testing.assert_array_equal(db.positions.numpy(), batch.positions)
    np.testing.assert_array_equal(db.cu_seqlens.numpy(), batch.cu_seqlens)
    assert db.cu_seqlens.dtype == torch.int32
    np.testing.assert_array_equal(db.bos_rows.numpy(), batch.cu_seqlens[:-1])
    np.testing.assert_array_equal(db.residue_rows.numpy(), batch.residue_rows())
    np.testing.assert_allclose(db.scale.numpy(), batch.scale)
    np.testing.assert_allclose(db.inv_lengths.numpy(), [*(1 / np.array([1, 5, 17, 40, 300])), 0.0], rtol=1e-6)
    want_pool = np.full(batch.num_tokens, len(seqs))
    for i, (a, b) in enumerate(zip(batch.cu_seqlens[:-1], batch.cu_seqlens[1:], strict=True)):
        want_pool[a + 1 : b - 1] = i
    np.testing.assert_array_equal(db.pool_index.numpy(), want_pool)
    assert db.num_seqs == 5 and db.max_len == 302
    if not groups:
        assert db.groups == []
        return
    covered = np.concatenate([g.dest.numpy() for g in db.groups])
    assert sorted(covered.tolist()) == list(range(batch.num_tokens))  # every token goes back once
    fields, shapes = plan_groups(batch.seq_tokens, batch.cu_seqlens[:-1])
    assert len(shapes) == len(db.groups)
    for g, plan in enumerate(db.groups):
        np.testing.assert_array_equal(plan.gather.reshape(-1).numpy(), fields[f"group{g}.gather"])
