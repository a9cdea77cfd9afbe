"""Loading a model (esm2cli.model.load): sources, dummy weights, dtypes and the errors of each kind of failure."""

import pytest
import torch
from transformers import BertConfig, BertModel, EsmModel

from esm2cli.config import ModelConfig
from esm2cli.errors import ConfigError, ModelLoadError
from esm2cli.model.architecture import ARCHITECTURES, esm2_config, resolve_source
from esm2cli.model.forward import PackedEsm2
from esm2cli.model.load import architecture_of, load_model


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(ModelConfig(model=tiny_model_dir, dtype="float32"))


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


def _esm2_edited(tmp_path, source: str, edit) -> str:
    """A copy of an ESM-2 checkpoint with layer 1's query weight passed through ``edit`` (None deletes it)."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "edited"
    shutil.copytree(source, folder)
    tensors = load_file(folder / "model.safetensors")
    key = next(k for k in sorted(tensors) if "layer.1.attention.self.query.weight" in k)
    if (edited := edit(tensors[key])) is None:
        del tensors[key]
    else:
        tensors[key] = edited
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return str(folder)


@pytest.mark.parametrize("lm_head", [False, True])
def test_esm2_checkpoint_missing_a_tensor_is_refused(tmp_path, tiny_model_dir, lm_head):
    # transformers would fill it with fresh random numbers: other embeddings each run under the same identity
    folder = _esm2_edited(tmp_path, tiny_model_dir, lambda t: None)
    with pytest.raises(ModelLoadError) as info:
        load_model(ModelConfig(model=folder, dtype="float32"), lm_head=lm_head)
    message = str(info.value)
    assert "missing" in message and "layer.1.attention.self.query.weight" in message and "\n" not in message


def test_esm2_tensor_of_wrong_shape_is_named(tmp_path, tiny_model_dir):
    folder = _esm2_edited(tmp_path, tiny_model_dir, lambda t: torch.zeros(t.shape[0], t.shape[1] + 1))
    with pytest.raises(ModelLoadError) as info:
        load_model(ModelConfig(model=folder, dtype="float32"))
    message = str(info.value)
    assert "layer.1.attention.self.query.weight is (32, 33), not (32, 32)" in message, message
    assert "above report" not in message and "\n" not in message


def test_tiny_checkpoint_loads_with_every_head(tiny_model_dir):
    # the strict check must not refuse a valid save_pretrained directory (its decoder is tied, not stored)
    loaded = load_model(ModelConfig(model=tiny_model_dir, dtype="float32"), lm_head=True, contact_head=True)
    assert loaded.forward is not None
