"""Loading ESM C: aliases and sizes, dummy weights, and strict checkpoints (missing or unexpected keys refused)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from esm2cli.config import ModelConfig
from esm2cli.errors import ConfigError, ModelLoadError
from esm2cli.model.architecture import model_family, resolve_source, resolve_truncate
from esm2cli.model.esmc_load import VOCABULARY, esmc_config, expected_keys, token_lut
from esm2cli.model.load import load_model
from helpers import build_tiny_esmc


@pytest.mark.parametrize(
    "alias, hub, shape",
    [
        ("esmc_300m", "biohub/ESMC-300M", (30, 960, 15, 2560)),
        ("esmc_600m", "biohub/ESMC-600M", (36, 1152, 18, 3072)),
        ("esmc_6b", "biohub/ESMC-6B", (80, 2560, 40, 6912)),
    ],
)
def test_the_three_sizes_by_alias_and_hub_id(alias, hub, shape):
    assert resolve_source(alias) == hub and model_family(alias) == "esmc" and model_family(hub) == "esmc"
    for name in (alias, hub):
        loaded = load_model(ModelConfig(model=name, load_format="dummy", dtype="bfloat16"), weights=False)
        cfg = loaded.config
        assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size) == shape
        assert cfg.vocab_size == 64 and loaded.family == "esmc" and loaded.forward is None


def test_vocabulary_is_transformers_esmc_tokenizer():
    from transformers import EsmcTokenizer

    tok = EsmcTokenizer()
    assert [tok.convert_ids_to_tokens(i) for i in range(len(VOCABULARY))] == VOCABULARY
    lut = token_lut()
    for residue in "ACDEFGHIKLMNPQRSTVWYXBUZO":  # each its own token, as in ESM-2's vocabulary
        assert lut[ord(residue)] == tok.convert_tokens_to_ids(residue)


def test_dummy_weights_are_seeded_and_have_an_lm_head():
    config = esmc_config("esmc_300m")
    small = dict(num_hidden_layers=2)
    for key, value in small.items():
        setattr(config, key, value)
    from esm2cli.model.esmc_load import build_forward, random_weights

    a = random_weights(config, lm_head=True)
    b = random_weights(config, lm_head=True)
    assert set(a) == expected_keys(2, lm_head=True) and all(torch.equal(a[k], b[k]) for k in a)
    model = build_forward(config, a, dtype=torch.float32, lm_head=True)
    assert model.hidden_size == 960 and model.has_lm_head and model.lm["decoder"].shape == (64, 960)


def test_model_family_reads_a_local_config(tiny_esmc_dir, tiny_model_dir):
    assert model_family(tiny_esmc_dir) == "esmc" and model_family(tiny_model_dir) == "esm2"
    assert resolve_truncate(tiny_esmc_dir, None) == 2046 and resolve_truncate(tiny_model_dir, None) == 1022
    assert resolve_truncate(tiny_model_dir, 3000) == 3000  # ESM-2's rotary positions extend
    with pytest.raises(ConfigError, match="over ESM C's context of 2046"):
        resolve_truncate(tiny_esmc_dir, 2047)


def _resave(src, dst, change):
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    weights = load_file(src / "model.safetensors")
    change(weights)
    save_file(weights, dst / "model.safetensors")
    return str(dst)


def test_missing_keys_are_refused_by_name(tiny_esmc_dir, tmp_path):
    from pathlib import Path

    def drop(w):
        del w["esmc.layers.1.self_attn.k_norm.weight"]
        del w["esmc.norm.weight"]

    folder = _resave(Path(tiny_esmc_dir), tmp_path / "m", drop)
    with pytest.raises(ModelLoadError) as info:
        load_model(ModelConfig(model=folder, dtype="float32"))
    text = str(info.value)
    assert "missing layers.1.self_attn.k_norm.weight, norm.weight" in text and "\n" not in text


def test_unexpected_keys_are_refused_by_name(tiny_esmc_dir, tmp_path):
    from pathlib import Path

    def add(w):
        w["esmc.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)

    folder = _resave(Path(tiny_esmc_dir), tmp_path / "m", add)
    with pytest.raises(ModelLoadError, match="unexpected layers.0.self_attn.q_proj.bias"):
        load_model(ModelConfig(model=folder, dtype="float32"))


def test_a_checkpoint_of_fewer_layers_than_its_config_is_refused(tiny_esmc_dir, tmp_path):
    from pathlib import Path

    folder = tmp_path / "m"
    _resave(Path(tiny_esmc_dir), folder, lambda w: None)
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = 4
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"missing layers\.3\..* and \d+ more"):
        load_model(ModelConfig(model=str(folder), dtype="float32"))


def test_an_encoder_only_checkpoint_embeds_but_does_not_score(tmp_path):
    folder = build_tiny_esmc(tmp_path / "enc", encoder_only=True)
    assert load_model(ModelConfig(model=folder, dtype="float32")).forward is not None
    with pytest.raises(ModelLoadError, match="has no masked-LM head"):
        load_model(ModelConfig(model=folder, dtype="float32"), lm_head=True)


def test_contacts_with_esmc_is_a_config_error(tiny_esmc_dir):
    with pytest.raises(ConfigError, match="no contact head"):
        load_model(ModelConfig(model=tiny_esmc_dir, dtype="float32"), contact_head=True)


def test_a_directory_of_another_architecture_is_refused(tmp_path):
    from transformers import BertConfig, BertModel

    config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    BertModel(config).save_pretrained(tmp_path / "bert")
    with pytest.raises(ModelLoadError, match="not an ESM-2 or ESM C encoder .model_type='bert'."):
        load_model(ModelConfig(model=str(tmp_path / "bert"), dtype="float32"))


def _esmc_with_tensor(tmp_path, source: str, part: str, edit) -> str:
    """A copy of an ESM C checkpoint whose first tensor named ``part`` is replaced by ``edit(tensor)``."""
    import shutil

    folder = tmp_path / "edited"
    shutil.copytree(source, folder)
    tensors = load_file(folder / "model.safetensors")
    key = next(k for k in sorted(tensors) if part in k)
    tensors[key] = edit(tensors[key])
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return str(folder)


def test_esmc_projection_of_wrong_shape_is_one_line(tmp_path, tiny_esmc_dir):
    # it died with a RuntimeError traceback from torch.cat while the forward was packed
    model_dir = _esmc_with_tensor(tmp_path, tiny_esmc_dir, "q_proj", lambda t: torch.zeros(t.shape[0], t.shape[1] + 1))
    with pytest.raises(ModelLoadError) as info:
        load_model(ModelConfig(model=model_dir, dtype="float32"))
    message = str(info.value)
    assert "layers.0.self_attn.q_proj.weight is" in message and "\n" not in message, message


def test_a_transposed_projection_is_refused_naming_both_shapes(tmp_path, tiny_esmc_dir):
    # As many numbers as the config's (64 x 96): a check of element counts would load it, and the fused gate/up
    # matmul would then fail (or compute another map) inside a batch.
    model_dir = _esmc_with_tensor(tmp_path, tiny_esmc_dir, "gate_proj", lambda t: t.t().contiguous())
    with pytest.raises(ModelLoadError) as info:
        load_model(ModelConfig(model=model_dir, dtype="float32"))
    message = str(info.value)
    assert "layers.0.mlp.gate_proj.weight is (64, 96), not (96, 64)" in message and "\n" not in message, message


@pytest.mark.parametrize("lm_head", [False, True])
def test_esmc_norm_of_wrong_shape_is_refused_at_load(tmp_path, tiny_esmc_dir, lm_head):
    # it loaded without a word and failed only inside the first batch, blamed on the device
    model_dir = _esmc_with_tensor(tmp_path, tiny_esmc_dir, "input_layernorm.weight", lambda t: torch.zeros(7))
    with pytest.raises(ModelLoadError) as info:
        load_model(ModelConfig(model=model_dir, dtype="float32"), lm_head=lm_head)
    assert "layers.0.input_layernorm.weight is (7,), not" in str(info.value), str(info.value)
