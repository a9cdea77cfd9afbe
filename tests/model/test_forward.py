"""The packed forward (esm2cli.model.forward) against transformers' ESM-2 and fair-esm's own, one protein at a time."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from transformers import EsmForMaskedLM, EsmModel
from transformers.models.esm import modeling_esm

from esm2cli.config import ModelConfig
from esm2cli.jobs.workload import synthetic_sequences
from esm2cli.model.forward import PackedEsm2
from esm2cli.model.graphs import GraphRunner
from esm2cli.model.load import load_model
from esm2cli.model.packed import PackedBatch
from helpers import assert_biases_nonzero, write_fair_esm_checkpoint
from reference import cosine

# Lengths chosen to mix: one attention group per length class, padding inside groups, a 1-residue protein.
LENGTHS = [1, 5, 17, 40, 41, 120, 7, 300, 64]


def _seqs(lengths=LENGTHS, seed=3) -> list[str]:
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), n)) for n in lengths]


def _pack(loaded, seqs, masked=None, token_dropout=True) -> PackedBatch:
    return PackedBatch.from_sequences(
        seqs, loaded.token_lut, cls_id=loaded.cls_id, eos_id=loaded.eos_id, mask_id=loaded.mask_id,
        token_dropout=token_dropout, masked=masked,
    )  # fmt: skip


def _hf_hidden(model: EsmModel, ids: list[int]) -> list[np.ndarray]:
    """transformers' hidden_states of one protein alone (no padding), float32."""
    t = torch.tensor([ids])
    with torch.no_grad():
        states = model(input_ids=t, attention_mask=torch.ones_like(t), output_hidden_states=True).hidden_states
    return [s[0].float().numpy() for s in states]


def _assert_close(got: np.ndarray, want: np.ndarray, atol: float = 1e-5, min_cos: float = 0.99999) -> None:
    assert got.shape == want.shape
    assert cosine(got, want).min() >= min_cos
    np.testing.assert_allclose(got, want, atol=atol, rtol=0)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    loaded = load_model(
        ModelConfig(model=tiny_model_dir, dtype="float32"), lm_head=True, contact_head=True, keep_reference=True
    )
    return loaded, PackedEsm2.from_hf(loaded.reference, loaded.reference_lm_head)


@pytest.fixture(scope="module")
def hf_tiny(tiny_model_dir):
    full = EsmForMaskedLM.from_pretrained(tiny_model_dir).eval()
    full.esm.set_attn_implementation("eager")  # its attention maps feed predict_contacts
    return full


def test_every_hidden_state_equals_transformers_per_token(tiny, hf_tiny):
    loaded, packed = tiny
    seqs = _seqs()
    batch = _pack(loaded, seqs)
    layers = tuple(range(loaded.num_layers + 1))
    got = packed.forward(batch, layers)
    for i in range(len(seqs)):
        a, b = batch.cu_seqlens[i], batch.cu_seqlens[i + 1]
        want = _hf_hidden(hf_tiny.esm, batch.tokens[a:b].tolist())
        for layer in layers:
            _assert_close(got[layer][a:b].numpy(), want[layer])


@pytest.mark.parametrize("alias", ["esm2_t6_8M", "esm2_t12_35M"])
def test_named_sizes_equal_transformers(alias):
    loaded = load_model(ModelConfig(model=alias, load_format="dummy", dtype="float32"), keep_reference=True)
    packed = PackedEsm2.from_hf(loaded.reference)
    seqs = _seqs([3, 50, 130, 77], seed=11)
    batch = _pack(loaded, seqs)
    n = loaded.num_layers
    got = packed.forward(batch, (0, n // 2, n))
    for i in range(len(seqs)):
        a, b = batch.cu_seqlens[i], batch.cu_seqlens[i + 1]
        want = _hf_hidden(loaded.reference, batch.tokens[a:b].tolist())
        for layer in (0, n // 2, n):
            _assert_close(got[layer][a:b].numpy(), want[layer])


def test_equals_fair_esm_own_model_per_token_and_contacts(tmp_path):
    import esm

    from esm2cli.model import fair_esm

    path = write_fair_esm_checkpoint(tmp_path)
    with torch.serialization.safe_globals([argparse.Namespace]):
        ref, alphabet = esm.pretrained.load_model_and_alphabet_local(str(path))
    ref.eval()
    packed = PackedEsm2.from_hf(fair_esm.load_checkpoint(path).eval())
    seqs = _seqs([9, 33, 120], seed=5)
    ids = [alphabet.encode("<cls>" + s + "<eos>") for s in seqs]  # fair-esm's own tokenisation
    batch = PackedBatch.from_token_ids(ids, mask_id=alphabet.mask_idx)
    got = packed.forward(batch, (0, 1, 3))
    result = packed.embed(batch, (3,), contacts=True)
    for i, seq_ids in enumerate(ids):
        with torch.no_grad():
            out = ref(torch.tensor([seq_ids]), repr_layers=[0, 1, 3], return_contacts=True)
        a, b = batch.cu_seqlens[i], batch.cu_seqlens[i + 1]
        for layer in (0, 1, 3):
            _assert_close(got[layer][a:b].numpy(), out["representations"][layer][0].numpy())
        np.testing.assert_allclose(result.contacts[i], out["contacts"][0].numpy(), atol=1e-5)


def test_every_bias_the_forward_adds_is_nonzero(tiny):
    loaded, forward = tiny
    per_layer = {f"layers.{i}.{b}" for i in range(loaded.num_layers) for b in ("ln1_b", "qkv_b", "out_b", "ln2_b")}
    per_layer |= {f"layers.{i}.{b}" for i in range(loaded.num_layers) for b in ("fc1_b", "fc2_b")}
    assert_biases_nonzero(forward, per_layer | {"final_ln_b", "lm.dense_b", "lm.ln_b", "lm.bias"})
    assert forward.contact_b != 0


def test_a_protein_does_not_depend_on_its_batch_mates(tiny):
    loaded, packed = tiny
    seqs = _seqs()
    together = packed.embed(_pack(loaded, seqs), (1, 3), per_token=True)
    for i, seq in enumerate(seqs):
        alone = packed.embed(_pack(loaded, [seq]), (1, 3), per_token=True)
        for layer in (1, 3):  # bit for bit (tests/model/test_invariant.py covers more compositions and dtypes)
            assert np.array_equal(together.pooled[layer][i], alone.pooled[layer][0])
            assert np.array_equal(together.per_token[layer][i], alone.per_token[layer][0])


def test_the_batch_dependent_forward_agrees_within_rounding(tiny):
    """``batch_invariant = False`` (kept to measure what invariance costs) computes the same maths."""
    loaded, packed = tiny
    batch = _pack(loaded, _seqs())
    want = packed.embed(batch, (1, 3), per_token=True)
    packed.batch_invariant = False
    try:
        got = packed.embed(batch, (1, 3), per_token=True)
    finally:
        packed.batch_invariant = True
    for layer in (1, 3):
        np.testing.assert_allclose(got.pooled[layer], want.pooled[layer], atol=1e-5, rtol=0)


@pytest.mark.parametrize("pooling", ["mean", "bos"])
def test_pooling_and_per_token_rows_in_the_order_asked(tiny, hf_tiny, pooling):
    loaded, packed = tiny
    seqs = _seqs()
    batch = _pack(loaded, seqs)
    layers = (3, 0, 2)
    out = packed.embed(batch, layers, pooling=pooling, per_token=True)
    assert list(out.pooled) == list(layers) and out.contacts == []
    for i, seq in enumerate(seqs):
        a, b = batch.cu_seqlens[i], batch.cu_seqlens[i + 1]
        want = _hf_hidden(hf_tiny.esm, batch.tokens[a:b].tolist())
        for layer in layers:
            rows = want[layer][1 : len(seq) + 1]
            vec = rows.mean(0) if pooling == "mean" else want[layer][0]
            assert out.pooled[layer].dtype == np.float32 and out.pooled[layer].shape == (len(seqs), 32)
            np.testing.assert_allclose(out.pooled[layer][i], vec, atol=1e-5, rtol=0)
            np.testing.assert_allclose(out.per_token[layer][i], rows, atol=1e-5, rtol=0)


def test_lm_log_probs_equal_transformers_masked_lm(tiny, hf_tiny):
    loaded, packed = tiny
    seqs = _seqs()
    masked = [0, None, 3, 20, None, 119, 6, 150, 1]
    batch = _pack(loaded, seqs, masked=masked)
    rows = np.concatenate([batch.rows(i, range(len(s))) for i, s in enumerate(seqs)])
    got = packed.lm_log_probs(batch, rows).numpy()
    at = 0
    for i, seq in enumerate(seqs):
        a, b = batch.cu_seqlens[i], batch.cu_seqlens[i + 1]
        ids = torch.tensor([batch.tokens[a:b].tolist()])
        assert masked[i] is None or ids[0, masked[i] + 1] == loaded.mask_id
        with torch.no_grad():
            logits = hf_tiny(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, 1:-1]
        np.testing.assert_allclose(got[at : at + len(seq)], torch.log_softmax(logits, -1).numpy(), atol=1e-5)
        at += len(seq)


def test_contacts_equal_transformers_predict_contacts(tiny, hf_tiny):
    loaded, packed = tiny
    seqs = _seqs()
    out = packed.embed(_pack(loaded, seqs), (3,), contacts=True)
    for i, seq in enumerate(seqs):
        ids = torch.tensor([[loaded.cls_id, *loaded.token_lut[np.frombuffer(seq.encode(), np.uint8)], loaded.eos_id]])
        with torch.no_grad():
            want = hf_tiny.esm.predict_contacts(ids, torch.ones_like(ids))[0].numpy()
        assert out.contacts[i].shape == (len(seq), len(seq))
        np.testing.assert_allclose(out.contacts[i], want, atol=1e-5)


def test_bfloat16_within_bounds_of_float32(tiny_model_dir, tiny):
    loaded, packed = tiny
    bf16 = load_model(ModelConfig(model=tiny_model_dir, dtype="bfloat16"), keep_reference=True)
    packed16 = PackedEsm2.from_hf(bf16.reference)
    assert packed16.dtype == torch.bfloat16
    seqs = [s for _, s in synthetic_sequences(20, seed=2, max_length=400)]
    fp32 = packed.embed(_pack(loaded, seqs), (3,)).pooled[3]
    low = packed16.embed(_pack(bf16, seqs), (3,)).pooled[3]
    assert low.dtype == np.float32
    assert cosine(low, fp32).min() >= 0.999  # the bounds tests/runtime/test_replica.py holds replicas to
    centre = fp32.mean(0)
    assert cosine(low - centre, fp32 - centre).min() >= 0.99


def test_never_calls_transformers_esm_modules(tiny, monkeypatch):
    loaded, packed = tiny

    def refuse(self, *args, **kwargs):
        raise AssertionError(f"{type(self).__name__} was called")

    for name in ("EsmModel", "EsmEmbeddings", "EsmLayer", "EsmAttention", "EsmSelfAttention", "EsmIntermediate",
                 "EsmOutput", "EsmLMHead", "EsmContactPredictionHead", "EsmRotaryEmbedding"):  # fmt: skip
        monkeypatch.setattr(getattr(modeling_esm, name), "forward", refuse)
    batch = _pack(loaded, _seqs(), masked=[1] * len(LENGTHS))
    out = packed.embed(batch, (0, 3), per_token=True, contacts=True)
    assert np.isfinite(out.pooled[3]).all() and len(out.contacts) == len(LENGTHS)
    assert torch.isfinite(packed.lm_log_probs(batch, np.arange(4))).all()
    runner = GraphRunner(packed, (3,), "mean", buckets=[2048], max_seqs=16, capture=False)
    runner.warmup()
    assert np.isfinite(runner.embed(batch).pooled[3]).all()


# ---------------------------------------------------------------------------------------------------------
# On a CUDA device


@pytest.fixture(scope="module")
def cuda_models(tiny_model_dir):
    fp32 = load_model(ModelConfig(model="esm2_t12_35M", load_format="dummy", dtype="float32"), keep_reference=True)
    bf16 = load_model(ModelConfig(model="esm2_t12_35M", load_format="dummy", dtype="bfloat16"), keep_reference=True)
    return fp32, PackedEsm2.from_hf(fp32.reference), PackedEsm2.from_hf(bf16.reference.to("cuda"))


@pytest.mark.gpu
def test_cuda_varlen_bf16_agrees_with_cpu_fp32(cuda_models):
    loaded, cpu, gpu = cuda_models
    assert gpu.uses_varlen()
    seqs = [s for _, s in synthetic_sequences(40, seed=4, max_length=1022)]
    want = cpu.embed(_pack(loaded, seqs), (12,)).pooled[12]
    got = gpu.embed(_pack(loaded, seqs), (12,)).pooled[12]
    assert cosine(got, want).min() >= 0.99
    centre = want.mean(0)
    assert cosine(got - centre, want - centre).min() >= 0.98


def test_bf16_rotary_table_is_the_float32_formula():
    """In bf16 the table comes from the formula in float32, not from the model's bf16-rounded inv_freq."""
    bf16 = load_model(ModelConfig(model="esm2_t6_8M", load_format="dummy", dtype="bfloat16"))
    packed = bf16.forward
    assert packed.dtype == torch.bfloat16 and packed.rot_cos.dtype == torch.float32
    d = packed.head_dim
    angles = 1025 * (1.0 / 10000 ** (np.arange(0, d, 2, dtype=np.float64) / d))
    want_cos = np.cos(np.concatenate([angles, angles]))
    want_sin = np.sin(np.concatenate([angles, angles])) * np.repeat([-1.0, 1.0], d // 2)
    np.testing.assert_allclose(packed.rot_cos[1025].numpy(), want_cos, atol=2e-4)
    np.testing.assert_allclose(packed.rot_sin[1025].numpy(), want_sin, atol=2e-4)


def test_varlen_attention_needs_a_scale_keyword(monkeypatch):
    """torch 2.10's varlen_attn has no scale=: the forward must not call it (SDPA instead)."""
    from torch.nn.attention import varlen

    from esm2cli.model import forward

    def without_scale(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None):
        raise AssertionError("called")

    def with_scale(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None):
        raise AssertionError("called")

    monkeypatch.setattr(varlen, "varlen_attn", without_scale)
    monkeypatch.setattr(forward, "_VARLEN", [])
    assert forward._varlen() is None
    monkeypatch.setattr(varlen, "varlen_attn", with_scale)
    monkeypatch.setattr(forward, "_VARLEN", [])
    assert forward._varlen() is with_scale


def test_every_tensor_moves_with_the_model_emb_layer_norm_and_contact_weights():
    """emb_layer_norm_before checkpoints and the contact head: .to() moves their weights too."""
    import copy

    from esm2cli.model.architecture import esm2_architecture

    torch.manual_seed(1)
    encoder = EsmModel(esm2_architecture(2, 32, 4, emb_layer_norm_before=True), add_pooling_layer=False).eval()
    with torch.no_grad():
        encoder.embeddings.layer_norm.weight.add_(torch.randn(32) * 0.5)  # a norm that shows when skipped
    packed = PackedEsm2.from_hf(encoder)
    assert packed.emb_ln_w is not None and packed.contact_w is not None
    ids = [0, 5, 8, 13, 9, 2]
    got = packed.forward(PackedBatch.from_token_ids([np.array(ids)], mask_id=32), (0, 2))
    want = _hf_hidden(encoder, ids)
    _assert_close(got[0].numpy(), want[0])
    _assert_close(got[2].numpy(), want[2])
    moved = copy.deepcopy(packed).to("meta")
    assert moved.emb_ln_w.device.type == "meta" and moved.contact_w.device.type == "meta"
    assert {t.device.type for t in [*moved.parameters(), *moved.buffers()]} == {"meta"}
    half = copy.deepcopy(packed).to(torch.float16)
    assert half.emb_ln_w.dtype == torch.float16
