"""Replicas (esm2cli.runtime.replica): embed_batch against transformers, layers, OOM splits, the CUDA graphs a
replica plans, and the server's engine."""

import numpy as np
import pytest
import torch

from esm2cli.config import BatchConfig, EmbedConfig, ModelConfig, ServeConfig
from esm2cli.errors import ConfigError
from esm2cli.model.load import load_model
from esm2cli.runtime.devices import Device
from esm2cli.runtime.engine import SERVER_SMALLEST_BUCKET, build_server_engine
from esm2cli.runtime.replica import Replica, build_replicas, resolve_layers
from reference import cosine

CPU = Device("cpu", "cpu")


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(ModelConfig(model=tiny_model_dir, dtype="float32"))


def replica(loaded, **embed):
    return build_replicas(loaded, [CPU], EmbedConfig(**embed))[0]


def test_dtype_is_converted_once(tiny_model_dir):
    bf16 = load_model(ModelConfig(model=tiny_model_dir, dtype="bfloat16"))
    assert {p.dtype for p in bf16.forward.parameters()} == {torch.bfloat16}
    out = replica(bf16).embed_batch(["MKVLA"])
    assert out.pooled[3].dtype == np.float32  # pooling and output stay float32


def test_tokenize_matches_the_hf_tokenizer(loaded, direct):
    seqs = ["MKVLAXBUZO", "W", "ACDEFGHIKLMNPQRSTVWY"]
    packed = replica(loaded).pack(seqs)
    for i, seq in enumerate(seqs):  # each protein's packed tokens are the HF tokenizer's, without padding
        theirs = direct.tokenizer(seq, return_tensors="pt")["input_ids"][0].numpy()
        np.testing.assert_array_equal(packed.tokens[packed.cu_seqlens[i] : packed.cu_seqlens[i + 1]], theirs)


@pytest.mark.parametrize("layers", [(-1,), (0, 1, -1)])
@pytest.mark.parametrize("pooling", ["mean", "bos"])
def test_embed_batch_matches_direct_transformers(loaded, direct, proteins, layers, pooling):
    seqs = [seq[:300] for _, seq in proteins[:12]]
    out = replica(loaded, layers=layers, pooling=pooling).embed_batch(seqs)
    assert sorted(out.pooled) == sorted(layer % 4 for layer in layers)
    for layer in layers:
        got = out.pooled[layer % 4]
        want = np.stack([getattr(direct, pooling)(s, layer) for s in seqs])
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        assert cosine(got, want).min() >= 0.9999


def test_per_token_matches_direct_transformers(loaded, direct):
    seqs = ["MKVLAAGGW", "MK", "ACDEFGHIKLMNPQRSTVWY"]
    out = replica(loaded, per_token=True).embed_batch(seqs)
    for seq, got in zip(seqs, out.per_token[3], strict=True):
        assert got.shape == (len(seq), 32)
        np.testing.assert_allclose(got, direct.per_token(seq), rtol=1e-4, atol=1e-5)


def test_embedding_does_not_depend_on_batch_mates(loaded, proteins):
    rep = replica(loaded)
    target = proteins[0][1][:120]
    alone = rep.embed_batch([target]).pooled[3][0]
    mates = [proteins[i][1][:n] for i, n in [(1, 400), (2, 15), (3, 700)]]
    mixed = rep.embed_batch([mates[0], target, mates[1], mates[2]]).pooled[3][1]
    np.testing.assert_allclose(alone, mixed, rtol=1e-4, atol=1e-5)


def test_cpu_replicas_share_weights(loaded):
    sims = [Device(f"sim:{i}", "cpu") for i in range(3)]
    replicas = build_replicas(loaded, sims, EmbedConfig())
    assert all(r.forward is loaded.forward for r in replicas)


def test_layers_are_normalised_and_checked():
    assert resolve_layers((-1, 0, 33, -34), 33) == (33, 0)
    with pytest.raises(ConfigError, match="layer 34 is out of range .* 33 layers"):
        resolve_layers((34,), 33)
    with pytest.raises(ConfigError, match="out of range"):
        resolve_layers((-35,), 33)


@pytest.mark.gpu
def test_cuda_replica_matches_cpu(loaded, proteins):
    seqs = [seq[:500] for _, seq in proteins[:16]]
    cpu = replica(loaded).embed_batch(seqs).pooled[3]
    gpu_rep = build_replicas(loaded, [Device("cuda:0", "cuda:0")], EmbedConfig())[0]
    gpu = gpu_rep.embed_batch(seqs).pooled[3]
    assert isinstance(gpu, np.ndarray) and gpu.dtype == np.float32
    assert cosine(cpu, gpu).min() >= 0.9999


def test_cuda_oom_splits_the_batch_and_retries(loaded, monkeypatch, proteins):
    rep = replica(loaded)
    seqs = [seq[:80] for _, seq in proteins[:7]]
    whole = rep.embed_batch(seqs)
    original = type(rep)._forward

    def limited(self, batch, *args):
        if len(batch) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(self, batch, *args)

    monkeypatch.setattr(type(rep), "_forward", limited)
    split = rep.embed_batch(seqs)
    np.testing.assert_allclose(split.pooled[3], whole.pooled[3], rtol=1e-4, atol=1e-5)
    assert rep.oom_splits == 3  # 7 -> 3+4, 3 -> 1+2, 4 -> 2+2
    with pytest.raises(torch.cuda.OutOfMemoryError):
        monkeypatch.setattr(
            type(rep), "_forward", lambda self, batch, *args: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError())
        )
        rep.embed_batch(["MKV"])


def test_bfloat16_agrees_with_float32(tiny_model_dir, loaded, proteins):
    seqs = [seq[:400] for _, seq in proteins[:16]]
    fp32 = replica(loaded).embed_batch(seqs).pooled[3]
    bf16 = replica(load_model(ModelConfig(model=tiny_model_dir, dtype="bfloat16"))).embed_batch(seqs).pooled[3]
    assert cosine(bf16, fp32).min() >= 0.999
    centre = fp32.mean(0)
    assert cosine(bf16 - centre, fp32 - centre).min() >= 0.99


def test_a_cuda_replica_plans_graphs_for_its_batch_size_and_smallest_bucket(loaded, monkeypatch):
    """The graphs hold the configured batch size (a server's 100 is not cut to 64) from the smallest bucket up."""
    monkeypatch.setattr(type(loaded.forward), "uses_varlen", lambda self: True)  # as on CUDA in bf16
    cuda = Device("cuda:0", "cuda:0")
    batch = BatchConfig(batch_size=100, max_tokens=32768)
    rep = Replica(loaded, cuda, EmbedConfig(), loaded.forward, batch=batch, smallest_bucket=SERVER_SMALLEST_BUCKET)
    assert rep.graphs is not None and rep.graphs.max_seqs == 100
    assert rep.graphs.buckets[0] == SERVER_SMALLEST_BUCKET and rep.graphs.buckets[-1] == 32768
    assert min(b for b in rep.graphs.buckets if b >= 300 + 2) == 320  # a 300-residue request: 320 tokens
    default = Replica(loaded, cuda, EmbedConfig(), loaded.forward, batch=batch)
    assert default.graphs is not None and default.graphs.buckets[0] == 1024


@pytest.mark.parametrize("batching, size", [(True, 100), (False, 80)])
def test_the_server_engine_batches_as_the_server_does(tiny_model_dir, batching, size):
    serve = ServeConfig(batching=batching, max_batch_size=100, max_client_batch=80, max_tokens=4096)
    setup = build_server_engine(ModelConfig(model=tiny_model_dir, dtype="float32"), EmbedConfig(), serve)
    assert setup.batch.batch_size == size and setup.batch.max_tokens == 4096
