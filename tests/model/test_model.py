import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel, EsmModel

from esm2cli.config import EmbedConfig, ModelConfig
from esm2cli.errors import ConfigError, ModelLoadError
from esm2cli.model.architecture import ARCHITECTURES, esm2_config, resolve_source
from esm2cli.model.forward import PackedEsm2
from esm2cli.model.load import architecture_of, load_model
from esm2cli.runtime.devices import Device
from esm2cli.runtime.replica import build_replicas, resolve_layers
from reference import DirectReference, cosine

CPU = Device("cpu", "cpu")


@pytest.fixture(scope="module")
def direct(tiny_model_dir):
    return DirectReference(tiny_model_dir)


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(ModelConfig(model=tiny_model_dir, dtype="float32"))


def replica(loaded, **embed):
    return build_replicas(loaded, [CPU], EmbedConfig(**embed))[0]


def test_aliases_map_to_hub_ids():
    assert resolve_source("esm2_t33_650M") == "facebook/esm2_t33_650M_UR50D"
    assert resolve_source("esm2_t6_8M_UR50D") == "facebook/esm2_t6_8M_UR50D"
    assert resolve_source("someone/my-esm") == "someone/my-esm"
    assert architecture_of("facebook/esm2_t36_3B_UR50D") == "esm2_t36_3B"
    assert architecture_of("/models/esm2_t12_35M_UR50D/") == "esm2_t12_35M"
    assert architecture_of("someone/my-esm") is None


@pytest.mark.parametrize(
    "alias, nominal",
    [
        ("esm2_t6_8M", 8e6),
        ("esm2_t12_35M", 35e6),
        ("esm2_t30_150M", 150e6),
        ("esm2_t33_650M", 650e6),
        ("esm2_t36_3B", 3e9),
        ("esm2_t48_15B", 15e9),
    ],
)
def test_dummy_architectures_have_the_named_size(alias, nominal):
    with torch.device("meta"):
        model = EsmModel(esm2_config(alias), add_pooling_layer=False)
    params = sum(p.numel() for p in model.parameters())
    assert abs(params - nominal) / nominal < 0.1, params
    assert model.config.num_hidden_layers == ARCHITECTURES[alias][0]


def test_dummy_weights_are_random_but_repeatable():
    a = load_model(ModelConfig(model="esm2_t6_8M", load_format="dummy", dtype="float32"))
    b = load_model(ModelConfig(model="esm2_t6_8M", load_format="dummy", dtype="float32"))
    assert a.dummy and a.num_layers == 6 and a.hidden_size == 320
    for (name, pa), pb in zip(a.forward.state_dict().items(), b.forward.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name


def test_loads_only_the_encoder_in_inference_mode(loaded):
    assert isinstance(loaded.forward, PackedEsm2) and loaded.reference is None  # the weights are held once
    assert not loaded.forward.has_lm_head and not loaded.forward.has_contact_head
    assert not loaded.forward.training
    assert not any(p.requires_grad for p in loaded.forward.parameters())
    assert not loaded.dummy


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


def test_missing_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="no such model directory"):
        load_model(ModelConfig(model=str(tmp_path / "nope"), dtype="float32"))


def test_not_an_esm_model(tmp_path):
    BertModel(
        BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    ).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="not an ESM-2 or ESM C encoder .*bert"):
        load_model(ModelConfig(model=str(tmp_path), dtype="float32"))


def test_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(esm2_config("esm2_t6_8M").to_json_string())
    with pytest.raises(ModelLoadError, match="cannot load the weights"):
        load_model(ModelConfig(model=str(tmp_path), dtype="float32"))


def test_unreachable_hub_is_one_clear_error(tmp_path, monkeypatch):
    # HF_HUB_OFFLINE=1 (conftest) makes the hub unreachable at once, as on this machine; empty caches
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(ModelLoadError, match="esm2_t6_8M_UR50D is not in the Hugging Face cache .* HF_HUB_OFFLINE"):
        load_model(ModelConfig(model="esm2_t6_8M", dtype="float32"))


def test_unknown_dtype_and_format():
    with pytest.raises(ConfigError, match="dtype"):
        load_model(ModelConfig(model="esm2_t6_8M", dtype="int8"))
    with pytest.raises(ConfigError, match="load format"):
        load_model(ModelConfig(model="esm2_t6_8M", load_format="magic", dtype="float32"))


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
