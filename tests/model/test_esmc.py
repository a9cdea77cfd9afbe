"""esm2cli's own ESM C forward against transformers' EsmcModel and EsmcForMaskedLM, one protein at a time."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from esm2cli.config import ModelConfig
from esm2cli.model.esmc import PackedEsmc
from esm2cli.model.load import load_model
from esm2cli.model.packed import PackedBatch
from helpers import EsmcReference, assert_biases_nonzero, build_tiny_esmc, random_seqs
from reference import cosine

SEQS = ["MKTAYIAKQRQISFVKSHFSRQ", "GSHMKVLAAGIVGLLLA", "MKV", "W" * 40 + "ACDEFGHIKLMNPQRSTVWYXBUZO" * 3]


@pytest.fixture(scope="module")
def loaded(tiny_esmc_dir):
    return load_model(ModelConfig(model=tiny_esmc_dir, dtype="float32"), lm_head=True)


@pytest.fixture(scope="module")
def ref(tiny_esmc_dir):
    return EsmcReference(tiny_esmc_dir)


def pack(loaded, seqs, masked=None):
    return PackedBatch.from_sequences(
        seqs, loaded.token_lut, cls_id=loaded.cls_id, eos_id=loaded.eos_id, mask_id=loaded.mask_id,
        token_dropout=False, masked=masked,
    )  # fmt: skip


def test_a_local_esmc_directory_loads_as_the_own_forward(loaded):
    assert loaded.family == "esmc" and isinstance(loaded.forward, PackedEsmc)
    assert (loaded.cls_id, loaded.eos_id, loaded.pad_id, loaded.mask_id) == (0, 2, 1, 32)
    assert loaded.context == 2046 and not loaded.forward.has_contact_head


def test_every_bias_the_forward_adds_is_nonzero(loaded):
    per_layer = {f"layers.{i}.{b}" for i in range(loaded.num_layers) for b in ("ln1_b", "ln2_b")}
    assert_biases_nonzero(loaded.forward, per_layer | {"lm.dense_b", "lm.ln_b", "lm.bias"})


def test_every_hidden_state_matches_transformers_one_protein_at_a_time(loaded, ref):
    batch = pack(loaded, SEQS)
    layers = list(range(loaded.num_layers + 1))
    out = loaded.forward(batch, layers)
    for i, seq in enumerate(SEQS):
        a, b = batch.cu_seqlens[i], batch.cu_seqlens[i + 1]
        for layer in layers:
            mine, want = out[layer][a:b].numpy(), ref.hidden(seq, layer)
            assert cosine(mine, want).min() >= 0.99999, (i, layer)
            # raw layer outputs grow with depth: compared relative to their scale; the last (normed) absolutely
            scale = 1.0 if layer == loaded.num_layers else max(1.0, float(np.abs(want).max()))
            np.testing.assert_allclose(mine, want, rtol=0, atol=1e-5 * scale)


def test_pooling_and_per_token_rows_match_transformers(loaded, ref):
    last = loaded.num_layers
    mean = loaded.forward.embed(pack(loaded, SEQS), [0, last], "mean", per_token=True)
    bos = loaded.forward.embed(pack(loaded, SEQS), [last], "bos")
    for i, seq in enumerate(SEQS):
        np.testing.assert_allclose(mean.pooled[last][i], ref.mean(seq), rtol=0, atol=1e-5)
        np.testing.assert_allclose(mean.pooled[0][i], ref.mean(seq, 0), rtol=0, atol=1e-6)
        np.testing.assert_allclose(mean.per_token[last][i], ref.per_token(seq), rtol=0, atol=1e-5)
        np.testing.assert_allclose(bos.pooled[last][i], ref.bos(seq), rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_protein_is_bitwise_the_same_alone_and_in_any_batch(tiny_esmc_dir, dtype):
    model = load_model(ModelConfig(model=tiny_esmc_dir, dtype=dtype), lm_head=True)
    last, seqs = model.num_layers, [*SEQS, *random_seqs()]
    alone = [model.forward.embed(pack(model, [s]), [1, last], per_token=True) for s in seqs]
    together = model.forward.embed(pack(model, seqs[::-1]), [1, last], per_token=True)
    for i, single in enumerate(alone):
        j = len(seqs) - 1 - i
        for layer in (1, last):
            np.testing.assert_array_equal(together.pooled[layer][j], single.pooled[layer][0])
            np.testing.assert_array_equal(together.per_token[layer][j], single.per_token[layer][0])
    masked = pack(model, seqs, masked=[0] * len(seqs))
    batched = model.forward.lm_log_probs(masked, masked.rows(2, [0, 1]))
    one = pack(model, [seqs[2]], masked=[0])
    np.testing.assert_array_equal(batched.numpy(), model.forward.lm_log_probs(one, one.rows(0, [0, 1])).numpy())


def test_lm_log_probs_match_esmc_for_masked_lm(loaded, ref):
    masked = [3, None, 1, 50]
    batch = pack(loaded, SEQS, masked=masked)
    for i, seq in enumerate(SEQS):
        rows = batch.rows(i, range(len(seq)))
        got = loaded.forward.lm_log_probs(batch, rows).numpy()
        assert got.shape == (len(seq), 64)
        np.testing.assert_allclose(got, ref.log_probs(seq, masked[i]), rtol=0, atol=2e-5)


def test_bfloat16_stays_close_to_float32(tiny_esmc_dir, loaded):
    half = load_model(ModelConfig(model=tiny_esmc_dir, dtype="bfloat16"))
    last = loaded.num_layers
    got = half.forward.embed(pack(half, SEQS), [last]).pooled[last]
    want = loaded.forward.embed(pack(loaded, SEQS), [last]).pooled[last]
    assert half.forward.dtype == torch.bfloat16 and cosine(got, want).min() >= 0.99


def test_residual_scaling_follows_the_depth(tmp_path):
    """s = sqrt(layers / 36): 1 at 36 layers, so a 36-layer model and a 4-layer one fold different factors."""
    deep = load_model(ModelConfig(model=build_tiny_esmc(tmp_path / "d", layers=36, hidden=32, heads=2, ffn=48),
                                  dtype="float32"))  # fmt: skip
    assert deep.forward.residual_scale == pytest.approx(1.0)
    ref = EsmcReference(str(tmp_path / "d"))
    got = deep.forward.embed(pack(deep, SEQS[:2]), [36]).pooled[36]
    np.testing.assert_allclose(got, np.stack([ref.mean(s) for s in SEQS[:2]]), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_a_300m_shaped_esmc_matches_transformers(tmp_path):
    """The 300M's shape (960 wide, 30 layers, 15 heads, SwiGLU 2560), random weights, two proteins."""
    folder = build_tiny_esmc(tmp_path / "m", layers=30, hidden=960, heads=15, ffn=2560)
    loaded = load_model(ModelConfig(model=folder, dtype="float32"))
    ref = EsmcReference(folder)
    seqs = SEQS[:2]
    out = loaded.forward.embed(pack(loaded, seqs), [30], per_token=True)
    for i, seq in enumerate(seqs):
        assert cosine(out.per_token[30][i], ref.per_token(seq)).min() >= 0.99999
        np.testing.assert_allclose(out.per_token[30][i], ref.per_token(seq), rtol=0, atol=1e-4)


@pytest.mark.parametrize("per_token", [False, True])
def test_the_cuda_graph_layout_gives_the_eager_vectors(loaded, per_token):
    """The buckets' static layout (dummy segments, empty slots) run eagerly on the CPU: the same bits as eager."""
    from esm2cli.model.graphs import GraphRunner

    last = loaded.num_layers
    runner = GraphRunner(loaded.forward, (last, 1), "mean", buckets=[512, 1024], max_seqs=12,
                         per_token_modes=(per_token,))  # fmt: skip
    runner.warmup()
    batch = pack(loaded, SEQS)
    got = runner.embed(batch, per_token)
    want = loaded.forward.embed(batch, (last, 1), "mean", per_token)
    assert runner.graph_batches == 1
    for layer in (last, 1):
        np.testing.assert_array_equal(got.pooled[layer], want.pooled[layer])
        if per_token:
            for a, b in zip(got.per_token[layer], want.per_token[layer], strict=True):
                np.testing.assert_array_equal(a, b)
