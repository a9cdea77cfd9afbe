"""fair-esm checkpoints (.pt) loaded directly: same embeddings as fair-esm's own model, and safe unpickling."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import esm
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from benchmarks.fair_esm_reference import extract_mean
from esm2cli.cli import cli
from esm2cli.config import ModelConfig
from esm2cli.errors import ModelLoadError
from esm2cli.jobs.workload import synthetic_sequences
from esm2cli.model.architecture import bundled_tokenizer
from esm2cli.model.load import load_model
from helpers import FAIR_ESM_NAME, write_fair_esm_checkpoint, write_fasta
from reference import cosine


def fair_esm_loads(path: Path):
    """fair-esm's own loader on the file (it unpickles argparse.Namespace, so allow it as fair-esm users must)."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        model, alphabet = esm.pretrained.load_model_and_alphabet_local(str(path))
    return model.eval(), alphabet


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_fair_esm_checkpoint(tmp_path_factory.mktemp("fair-esm"))


@pytest.fixture(scope="module")
def fasta(tmp_path_factory) -> str:
    records = list(synthetic_sequences(60, seed=9, max_length=700))
    return write_fasta(tmp_path_factory.mktemp("fa") / "proteins.fa", records)


def embed(args, expect=0):
    result = CliRunner().invoke(cli, ["embed", *args, "--dtype", "float32", "--devices", "cpu", "-q"])
    assert result.exit_code == expect, result.output
    return result


def test_the_fixture_is_a_checkpoint_fair_esm_reads(checkpoint):
    model, alphabet = fair_esm_loads(checkpoint)  # strict: every key of fair-esm's ESM2 is there
    assert model.num_layers == 3 and model.embed_dim == 32
    # esm2cli tokenises with its bundled vocabulary: it must be fair-esm's alphabet, token for token
    assert bundled_tokenizer().get_vocab() == alphabet.tok_to_idx


@pytest.mark.parametrize("layers", [(-1,), (1, -1)])
def test_embeddings_equal_fair_esm_on_the_same_file(tmp_path, checkpoint, fasta, layers):
    out = tmp_path / "out.parquet"
    embed([fasta, "-o", str(out), "-m", str(checkpoint), "--layers", ",".join(map(str, layers))])
    model, alphabet = fair_esm_loads(checkpoint)
    ref = extract_mean(model, alphabet, fasta, repr_layers=list(layers))
    table = pq.read_table(out)
    ids = table["id"].to_pylist()
    assert sorted(ids) == sorted(ref)
    for layer in layers:
        norm = layer % 4
        column = "embedding" if len(layers) == 1 else f"embedding_l{norm}"
        got = np.array(table[column].to_pylist(), dtype=np.float32)
        want = np.stack([ref[i][norm].numpy() for i in ids])
        assert cosine(got, want).min() >= 0.9999
        centre = want.mean(0)  # what differs between proteins agrees too, not only the common part
        assert cosine(got - centre, want - centre).min() >= 0.999


def test_contact_regression_file_is_optional(tmp_path, checkpoint):
    alone = tmp_path / checkpoint.name
    shutil.copy(checkpoint, alone)
    without = load_model(ModelConfig(model=str(alone), dtype="float32"))
    with_it = load_model(ModelConfig(model=str(checkpoint), dtype="float32"))
    for (name, a), b in zip(without.forward.state_dict().items(), with_it.forward.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert with_it.source == str(checkpoint) and not with_it.dummy


def test_file_name_found_in_the_torch_hub_cache(tmp_path, monkeypatch, fasta):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    path = write_fair_esm_checkpoint(tmp_path / "torch" / "hub" / "checkpoints")
    monkeypatch.chdir(tmp_path)  # the bare name is not a file here
    loaded = load_model(ModelConfig(model=path.name, dtype="float32"))
    assert loaded.source == str(path)
    embed([fasta, "-o", str(tmp_path / "o.parquet"), "-m", path.name])


def test_dummy_reads_only_the_size_of_a_checkpoint(checkpoint):
    loaded = load_model(ModelConfig(model=str(checkpoint), load_format="dummy", dtype="float32"))
    assert loaded.dummy and loaded.num_layers == 3 and loaded.hidden_size == 32


class _Payload:
    """Creates a file when unpickled by a loader that runs pickle code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_file_needing_another_global_is_refused_and_runs_nothing(tmp_path, fasta):
    marker = tmp_path / "pwned"
    path = tmp_path / "esm2_evil_UR50D.pt"
    torch.save({"model": {}, "cfg": {"model": _Payload(marker)}}, path)
    torch.load(path, weights_only=False)  # the payload is real: an unsafe loader runs it
    assert marker.exists()
    marker.unlink()
    with pytest.raises(ModelLoadError, match=r"refused: it needs the Python global .*open.*argparse\.Namespace"):
        load_model(ModelConfig(model=str(path), dtype="float32"))
    result = embed([fasta, "-o", str(tmp_path / "o.parquet"), "-m", str(path)], expect=1)
    assert not marker.exists()
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "refused" in lines[0] and "Traceback" not in result.output, result.output


@pytest.mark.parametrize(
    "damage, message",
    [
        ("truncate", "not a readable PyTorch checkpoint"),
        ("empty", "not a readable PyTorch checkpoint"),
        ("esm1b", "'roberta_large' checkpoint .* ESM-2 checkpoints only"),
        ("hf_state_dict", "not a fair-esm checkpoint"),
        ("more_layers", r"missing weights .* 4 layers x 32: encoder\.layer\.3\."),
        ("wider", "wrong shapes"),
        ("missing", "no such checkpoint file"),
        ("regression", "a contact regression file; pass the model's checkpoint"),
    ],
)
def test_unusable_files_fail_with_one_line(tmp_path, checkpoint, fasta, damage, message):
    path = tmp_path / f"{FAIR_ESM_NAME}.pt"
    if damage == "regression":
        path = tmp_path / f"{FAIR_ESM_NAME}-contact-regression.pt"
        shutil.copy(checkpoint.with_name(path.name), path)
    elif damage == "truncate":
        path.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "esm1b":
        torch.save({"args": argparse.Namespace(arch="roberta_large", layers=1), "model": {"x": torch.zeros(1)}}, path)
    elif damage == "hf_state_dict":
        torch.save({"embeddings.word_embeddings.weight": torch.zeros(33, 32)}, path)
    elif damage in ("more_layers", "wider"):
        data = torch.load(checkpoint, weights_only=False)
        if damage == "more_layers":
            data["cfg"]["model"].encoder_layers = 4
        else:
            key = "encoder.sentence_encoder.layers.0.fc1.weight"
            data["model"][key] = torch.zeros(256, 32)
        torch.save(data, path)
    with pytest.raises(ModelLoadError, match=message):
        load_model(ModelConfig(model=str(path), dtype="float32"))
    result = embed([fasta, "-o", str(tmp_path / "o.parquet"), "-m", str(path)], expect=1)
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_a_checkpoint_cut_anywhere_is_called_truncated_never_refused_for_half_a_global(tmp_path, capfd):
    from esm2cli.model.fair_esm import safe_load

    whole = tmp_path / "whole.pt"
    data = {"args": argparse.Namespace(arch="ESM-1b"), "model": {"w": torch.zeros(2, 2)}}
    torch.save(data, whole, _use_new_zipfile_serialization=False)  # fair-esm's older files: a plain pickle
    blob, cut = whole.read_bytes(), tmp_path / "cut.pt"
    for size in range(1, len(blob)):
        cut.write_bytes(blob[:size])
        with pytest.raises(ModelLoadError) as info:
            safe_load(cut)
        message = str(info.value)
        assert "truncated or corrupt" in message and "refused" not in message, (size, message)
        assert "()" not in message
    assert capfd.readouterr().err == ""  # no torch warning text


class _System:
    def __reduce__(self):
        return (os.system, ("true",))


def _a_script_class(monkeypatch):
    """A class as a training script defines it: pickled as __main__.Design."""
    design = type("Design", (), {"__module__": "__main__"})
    monkeypatch.setattr(sys.modules["__main__"], "Design", design, raising=False)
    return design()


@pytest.mark.parametrize("kind", ["script class", "blocked function"])
def test_a_refused_global_is_named_never_called_corrupt_nor_torch_advice(tmp_path, monkeypatch, fasta, kind):
    path = tmp_path / "esm2_custom_UR50D.pt"
    payload = _a_script_class(monkeypatch) if kind == "script class" else _System()
    torch.save({"model": {}, "cfg": {"model": payload}}, path)
    monkeypatch.delattr(sys.modules["__main__"], "Design", raising=False)  # the loading process has no such class
    glob = "__main__.Design" if kind == "script class" else f"{os.system.__module__}.system"
    with pytest.raises(ModelLoadError) as info:
        load_model(ModelConfig(model=str(path), dtype="float32"))
    message = str(info.value)
    assert f"refused: it needs the Python global {glob}; only plain weights load" in message, message
    assert "corrupt" not in message and "weights_only" not in message, message
    result = embed([fasta, "-o", str(tmp_path / "o.parquet"), "-m", str(path)], expect=1)
    assert len(result.output.strip().splitlines()) == 1 and "weights_only" not in result.output, result.output
