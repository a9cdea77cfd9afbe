import copy

import pytest
import torch
from transformers import EsmModel

from esm2cli.config import ModelConfig
from esm2cli.model.fused import FusedGeluIntermediate, fuse_gelu
from esm2cli.model.load import load_model


@pytest.fixture(scope="module")
def plain(tiny_model_dir):
    return EsmModel.from_pretrained(tiny_model_dir, add_pooling_layer=False).eval()


def _hidden(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True).hidden_states


def test_fused_gelu_computes_what_transformers_computes(plain):
    fused = fuse_gelu(copy.deepcopy(plain))
    assert all(isinstance(layer.intermediate, FusedGeluIntermediate) for layer in fused.encoder.layer)
    assert fused.state_dict().keys() == plain.state_dict().keys()
    ids = torch.randint(4, 24, (3, 40))
    for want, got in zip(_hidden(plain, ids), _hidden(fused, ids), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_fusing_twice_changes_nothing(plain):
    once = fuse_gelu(copy.deepcopy(plain))
    layers = [layer.intermediate for layer in once.encoder.layer]
    assert [layer.intermediate for layer in fuse_gelu(once).encoder.layer] == layers


def test_loaded_models_are_fused(tiny_model_dir):
    model = load_model(ModelConfig(model=tiny_model_dir, dtype="bfloat16")).model
    assert all(isinstance(layer.intermediate, FusedGeluIntermediate) for layer in model.encoder.layer)
    assert model.encoder.layer[0].intermediate.dense.weight.dtype == torch.bfloat16
