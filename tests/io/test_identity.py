"""The run identity: one builder (esm2cli.io.identity) for embed, score, the API, --reuse and the server's cache key.

Every option of every command is declared once, as in the identity or as changing no number; each identity
key that an option is declared to go to is in the identity the builder makes, and changes with the option.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from esm2cli.api import Embedder
from esm2cli.cli import cli
from esm2cli.config import EmbedConfig, InputConfig, ScoreConfig, ShardConfig
from esm2cli.errors import ModelLoadError
from esm2cli.io.chunks import ChunkStore
from esm2cli.io.identity import (
    NOT_NUMBERS,
    OPTIONS,
    WITHOUT_IDENTITY,
    describe_changes,
    embed_identity,
    identity_digest,
    model_identity,
    numbers_identity,
    request_identity,
    same_run,
    score_identity,
    stamp_weights,
)
from esm2cli.io.parquet import read_metadata
from esm2cli.io.records import Record, hash_records
from helpers import build_tiny_esm2, write_fasta

SEQS = ["MKTAYIAKQRQ", "GSHMLEDPV", "MVLSPADKTNV", "MKVLAW", "WWPPGG", "ACDEFGHIK"]
EVERY_KEY = EmbedConfig(contacts=True, long_sequences="window", per_token=True)  # every optional key present


def embed_id(embed: EmbedConfig = EVERY_KEY, **changes) -> dict:
    args = dict(input_sha256="ab" * 32, input_records=3, weights="sha256:00", dtype="float32", embed=embed,
                inputs=InputConfig(), shard=ShardConfig())  # fmt: skip
    return embed_identity(**{**args, **changes})


def score_id(score: ScoreConfig | None = None, **changes) -> dict:
    args = dict(input_sha256="ab" * 32, mutations_sha256="cd" * 32, weights="sha256:00", dtype="float32",
                score=score or ScoreConfig())  # fmt: skip
    return score_identity(**{**args, **changes})


# ---- every option declared once ------------------------------------------------------------------------------


def test_every_command_is_declared_once():
    assert set(cli.commands) == set(OPTIONS) - {"api"} | set(WITHOUT_IDENTITY)
    assert not set(OPTIONS) & set(WITHOUT_IDENTITY)


@pytest.mark.parametrize("command", sorted(set(OPTIONS) - {"api"}))
def test_every_option_is_in_the_identity_or_declared_as_changing_no_number(command):
    params = {p.name for p in cli.commands[command].params}
    undeclared = params - set(OPTIONS[command])
    assert not undeclared, f"esm2cli {command}: declare {sorted(undeclared)} in esm2cli.io.identity.OPTIONS"
    assert not set(OPTIONS[command]) - params, "a declared option that the command no longer has"


def test_every_argument_of_the_python_api_is_declared():
    params = set(inspect.signature(Embedder.__init__).parameters) - {"self"}
    assert params == set(OPTIONS["api"])


def index_id() -> dict:
    from esm2cli.config import IndexConfig
    from esm2cli.search.build import build_identity
    from esm2cli.search.vectors import VectorInput, vector_identity

    metadata = {"identity": embed_id()}
    source = VectorInput(path="a.parquet", rows=10, hidden=32, column="embedding", layer=3,
                         identity=vector_identity(metadata, 3), metadata=metadata)  # fmt: skip
    return build_identity([source], IndexConfig(kind="flat"), ShardConfig())


@pytest.mark.parametrize(
    ("command", "built"),
    [("embed", embed_id()), ("serve", request_identity(weights="w", dtype="float32", embed=EVERY_KEY)),
     ("api", embed_id()), ("score", score_id()), ("index", index_id())],
)  # fmt: skip
def test_each_declared_identity_key_is_in_the_identity_built(command, built):
    keys = {key for key in OPTIONS[command].values() if key is not NOT_NUMBERS}
    assert keys <= set(built), sorted(keys - set(built))


@pytest.mark.parametrize(
    "change",
    [{"layers": (1, -1)}, {"pooling": "bos"}, {"per_token": False}, {"truncate": 100}, {"contacts": False},
     {"long_sequences": "truncate"}, {"window_overlap": 100}],
)  # fmt: skip
def test_every_embedding_option_changes_the_numbers_identity(change):
    assert numbers_identity(embed_id(replace(EVERY_KEY, **change))) != numbers_identity(embed_id())


def test_a_new_embed_config_field_lands_in_the_identity_without_an_edit_of_the_builder():
    field_names = {f for f in EmbedConfig.__dataclass_fields__}
    assert field_names <= set(embed_id())


# ---- the six mutation survivors, each pinned -----------------------------------------------------------------


def test_the_dtype_is_in_the_reuse_identity():
    # Survivor 1: a bfloat16 output's rows must not stand in for a float32 run's.
    assert numbers_identity(embed_id(dtype="bfloat16")) != numbers_identity(embed_id(dtype="float32"))
    assert numbers_identity(embed_id(input_sha256="ff" * 32, shard=ShardConfig(index=1, count=2))) == numbers_identity(
        embed_id()
    )  # the input and the shard are no part of a row's numbers


def test_a_bfloat16_output_is_not_reused_by_a_float32_run(tmp_path, tiny_model_dir):
    fa = write_fasta(tmp_path / "in.fa", [(f"p{i}", s) for i, s in enumerate(SEQS)])
    old = tmp_path / "bf16.parquet"
    base = ["embed", fa, "-m", tiny_model_dir, "--devices", "cpu"]
    assert CliRunner().invoke(cli, [*base, "-o", str(old), "--dtype", "bfloat16"]).exit_code == 0
    result = CliRunner().invoke(cli, [*base, "-o", str(tmp_path / "f32.parquet"), "--dtype", "float32",
                                      "--reuse", str(old)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"not reused: {old} was made with dtype 'bfloat16' (this run: 'float32')" in result.output


def test_the_truncation_is_in_the_server_cache_key():
    # Survivor 2: the builder the server's cache keys on.
    short, long = (request_identity(weights="w", dtype="float32", embed=EmbedConfig(truncate=t)) for t in (100, 1022))
    assert short != long and identity_digest(short) != identity_digest(long)
    cache_key = request_identity(weights="w", dtype="float32", embed=EmbedConfig(truncate=100))
    assert identity_digest(cache_key) == identity_digest(short)  # the control: equal options, equal key


def test_the_server_cache_key_is_the_reuse_identity_of_the_same_options():
    embed = EmbedConfig(layers=(2,), pooling="bos", truncate=50)
    served = request_identity(weights="sha256:00", dtype="float32", embed=embed)
    assert served == numbers_identity(embed_id(embed))


def score(fasta, out, model, *extra):
    args = ["score", str(fasta), "-o", str(out), "-m", model, "--dtype", "float32", "--devices", "cpu", *extra]
    return CliRunner().invoke(cli, args)


def test_a_score_rerun_with_another_window_is_not_already_complete(tmp_path, tiny_model_dir):
    # Survivor 3.
    assert score_id(ScoreConfig(window=8)) != score_id(ScoreConfig(window=1022))
    fa = write_fasta(tmp_path / "in.fa", [("a", "MKTAYIAKQRQISFVKSHFSRQ"), ("b", "GSHMLEDPV")])
    out = tmp_path / "pll.parquet"
    assert score(fa, out, tiny_model_dir, "--pll").exit_code == 0
    again = score(fa, out, tiny_model_dir, "--pll")
    assert again.exit_code == 0 and "already complete" in again.output  # the control
    before = pq.read_table(out)["pll"].to_pylist()
    windowed = score(fa, out, tiny_model_dir, "--pll", "--truncate", "8", "--overwrite")
    assert windowed.exit_code == 0 and "already complete" not in windowed.output, windowed.output
    table = pq.read_table(out)
    assert table["windowed"].to_pylist() == [True, True] and table["pll"].to_pylist() != before
    assert read_metadata(out)["identity"]["window"] == 8


def test_an_edited_mutant_list_is_not_already_complete(tmp_path, tiny_model_dir):
    # Survivor 4: the list is named by its bytes, not its path.
    assert score_id(mutations_sha256="00" * 32) != score_id()
    fa = write_fasta(tmp_path / "wt.fa", [("a", "MKTAYIAKQRQISFVKSHFSRQ")])
    csv = tmp_path / "mutants.csv"
    csv.write_text("id,mutant\na,K2A\n")
    out = tmp_path / "scores.parquet"
    args = ("--mutations", str(csv))
    assert score(fa, out, tiny_model_dir, *args).exit_code == 0
    assert "already complete" in score(fa, out, tiny_model_dir, *args).output  # the control
    csv.write_text("id,mutant\na,K2W\n")
    refused = score(fa, out, tiny_model_dir, *args)
    assert refused.exit_code == 2 and "already complete" not in refused.output, refused.output
    redone = score(fa, out, tiny_model_dir, *args, "--overwrite")
    assert redone.exit_code == 0 and "already complete" not in redone.output, redone.output
    assert pq.read_table(out)["mutant"].to_pylist() == ["K2W"]


def test_a_reused_protein_of_exactly_truncate_residues_is_not_truncated(tmp_path, tiny_model_dir):
    # Survivor 5: the flag of a copied row is the fresh run's (longer than truncate, not as long).
    seqs = [("exact", "MKTAYIAKQR"), ("longer", "MKTAYIAKQRQ"), ("short", "MKV")]
    fa = write_fasta(tmp_path / "in.fa", seqs)
    base = ["embed", fa, "-m", tiny_model_dir, "--devices", "cpu", "--dtype", "float32", "--truncate", "10"]
    old, new = tmp_path / "old.parquet", tmp_path / "new.parquet"
    assert CliRunner().invoke(cli, [*base, "-o", str(old)]).exit_code == 0
    result = CliRunner().invoke(cli, [*base, "-o", str(new), "--reuse", str(old)])
    assert result.exit_code == 0 and "3 reused" in result.output.replace(",", ""), result.output
    assert pq.read_table(new)["truncated"].to_pylist() == [False, True, False]
    assert pq.read_table(old)["truncated"].to_pylist() == [False, True, False]


# Survivor 6 (the LM head's bias) is pinned by tests/jobs/test_scoring.py against fair-esm: the tiny model of
# tests/conftest.py carries a nonzero bias, checked here so that the pin cannot quietly go.
def test_the_tiny_test_model_has_a_nonzero_lm_bias(tiny_model_dir):
    from transformers import EsmForMaskedLM

    bias = EsmForMaskedLM.from_pretrained(tiny_model_dir).lm_head.bias.detach()
    assert bias.abs().min() > 0 and bias.std() > 0.1


# ---- identities recorded before a key existed; describing a change -----------------------------------------


def test_an_identity_written_before_the_model_family_existed_is_the_same_run():
    now = embed_id()
    old = {k: v for k, v in now.items() if k != "model_family"}
    assert same_run(old, now) and numbers_identity(old) == numbers_identity(now)
    assert not same_run({**old, "model_family": "esmc"}, now)
    assert not same_run(None, now) and not same_run({}, now)


def test_describe_changes_names_the_mutant_list_and_the_weights():
    changes = describe_changes(score_id(), score_id(mutations_sha256="00" * 32, weights="sha256:11"))
    assert changes == ["the model's weights changed", "the mutant list's content changed"]


# ---- the weights: named by the bytes loaded ------------------------------------------------------------------


def test_a_stamp_refuses_weights_rewritten_after_they_were_hashed(tmp_path):
    model = build_tiny_esm2(tmp_path / "m", seed=3)
    stamp = stamp_weights(model, "auto")
    assert stamp.identity == model_identity(model, "auto") and stamp.identity.startswith("sha256:")
    assert stamp.confirm(model) == stamp.identity  # the control: nothing changed
    time.sleep(0.01)
    build_tiny_esm2(tmp_path / "m", seed=4)
    with pytest.raises(ModelLoadError, match="the weights changed while they were loaded"):
        stamp.confirm(model)


def test_an_embedder_names_the_weights_it_loaded_not_those_there_when_it_writes(tmp_path):
    model = build_tiny_esm2(tmp_path / "m", seed=3)
    loaded = model_identity(model, "auto")
    fa = write_fasta(tmp_path / "in.fa", [(f"p{i}", s) for i, s in enumerate(SEQS)])
    out = tmp_path / "out.parquet"
    with Embedder(model, devices="cpu", dtype="float32") as embedder:
        build_tiny_esm2(tmp_path / "m", seed=4)  # the folder is re-saved after loading
        embedder.embed_fasta(fa, output=out)
        table = embedder.embed_fasta(fa)
    assert read_metadata(out)["identity"]["model_identity"] == loaded
    assert table.schema.metadata and b'"model_identity": "' + loaded.encode() in table.schema.metadata[b"esm2cli"]
    rerun = CliRunner().invoke(cli, ["embed", fa, "-o", str(out), "-m", model, "--dtype", "float32",
                                     "--devices", "cpu"])  # fmt: skip
    assert rerun.exit_code == 2 and "the model's weights changed" in rerun.output, rerun.output


def test_random_weights_of_a_checkpoint_are_named_by_its_architecture(tmp_path):
    from helpers import write_fair_esm_checkpoint

    pt = write_fair_esm_checkpoint(tmp_path / "a", layers=2, hidden=32)
    assert model_identity(str(pt), "dummy") is None  # named once its cfg is read, not by its path
    fa = write_fasta(tmp_path / "in.fa", [("p", "MKTAYIAKQR")])
    out = tmp_path / "out.parquet"
    args = ["embed", fa, "-o", str(out), "-m", str(pt), "--load-format", "dummy", "--dtype", "float32",
            "--devices", "cpu"]  # fmt: skip
    assert CliRunner().invoke(cli, args).exit_code == 0
    assert "already complete" in CliRunner().invoke(cli, args).output  # the control
    first = read_metadata(out)["identity"]["model_identity"]
    assert first.startswith("random:arch:")
    write_fair_esm_checkpoint(tmp_path / "a", layers=3, hidden=64, heads=4)  # the same file, a wider cfg
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and "the model's weights changed" in result.output, result.output


# ---- the input: every header byte ----------------------------------------------------------------------------


def write(path, descriptions):
    path.write_text("".join(f">p{i} {d}\n{s}\n" for i, (s, d) in enumerate(zip(SEQS, descriptions, strict=True))))
    return str(path)


def embed(fasta, out, model, *extra):
    args = ["embed", fasta, "-o", str(out), "-m", model, "--dtype", "float32", "--devices", "cpu", *extra]
    return CliRunner().invoke(cli, args)


def test_the_record_hash_covers_the_description():
    plain = Record(id="p1", description="old", sequence="MKV", position=1)
    edited = Record(id="p1", description="new", sequence="MKV", position=1)
    assert hash_records([plain]) != hash_records([edited])


@pytest.mark.parametrize("edit", ["id", "sequence"])
def test_other_edits_change_the_hash_too(edit):
    base = dict(id="p1", description="d", sequence="MKV", position=1)
    assert hash_records([Record(**base)]) != hash_records([Record(**{**base, edit: "MKW"})])


def test_a_description_edit_makes_a_complete_output_stale(tmp_path, tiny_model_dir):
    out = tmp_path / "out.parquet"
    fa = write(tmp_path / "in.fa", ["old"] * len(SEQS))
    assert embed(fa, out, tiny_model_dir).exit_code == 0
    again = embed(fa, out, tiny_model_dir)
    assert again.exit_code == 0 and "already complete" in again.output  # the control: nothing changed
    write(tmp_path / "in.fa", ["old", "old", "new header", "old", "old", "old"])
    refused = embed(fa, out, tiny_model_dir)
    assert refused.exit_code == 2, refused.output
    assert "the input's content changed" in refused.output and "already complete" not in refused.output
    assert pq.read_table(out)["description"].to_pylist() == ["old"] * len(SEQS)  # left as it was
    redone = embed(fa, out, tiny_model_dir, "--overwrite")
    assert redone.exit_code == 0 and "already complete" not in redone.output, redone.output
    assert pq.read_table(out)["description"].to_pylist() == ["old", "old", "new header", "old", "old", "old"]


def test_chunks_committed_before_a_description_edit_are_recomputed(tmp_path, tiny_model_dir, monkeypatch):
    out = tmp_path / "out.parquet"
    fa = write(tmp_path / "in.fa", ["old"] * len(SEQS))
    with monkeypatch.context() as patch:  # the first run stops after its last chunk, before the merge
        patch.setattr(ChunkStore, "commit", lambda self, chunks, rows: None)
        assert embed(fa, out, tiny_model_dir, "--chunk-size", "2").exit_code == 0
    work = tmp_path / "_out.parquet.parts"
    assert not out.exists() and len(list(work.glob("chunk-*.parquet"))) == 3
    write(tmp_path / "in.fa", ["old", "old", "new header", "old", "old", "old"])
    rerun = embed(fa, out, tiny_model_dir, "--chunk-size", "2")
    assert rerun.exit_code == 0, rerun.output
    assert "1 chunk(s) of an earlier run no longer match the input: recomputed" in rerun.output
    assert "4 resumed" in rerun.output.replace(",", "")
    table = pq.read_table(out)
    assert table["id"].to_pylist() == [f"p{i}" for i in range(len(SEQS))]
    assert table["description"].to_pylist() == ["old", "old", "new header", "old", "old", "old"]
    assert not work.exists()


def test_the_weights_hash_covers_every_weight_file(tmp_path):
    model = build_tiny_esm2(tmp_path / "m", seed=3)
    before = model_identity(model, "auto")
    extra = os.path.join(model, "extra.bin")
    np.zeros(4, np.float32).tofile(extra)
    assert model_identity(model, "auto") != before


def test_unfinished_work_recorded_before_the_model_family_existed_resumes(tmp_path, tiny_model_dir, monkeypatch):
    import json

    from esm2cli.io.chunks import CHUNK_MANIFEST

    out = tmp_path / "out.parquet"
    fa = write(tmp_path / "in.fa", ["d"] * len(SEQS))
    with monkeypatch.context() as patch:
        patch.setattr(ChunkStore, "commit", lambda self, chunks, rows: None)
        assert embed(fa, out, tiny_model_dir, "--chunk-size", "2").exit_code == 0
    manifest = tmp_path / "_out.parquet.parts" / CHUNK_MANIFEST
    options = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({k: v for k, v in options.items() if k != "model_family"}))  # as older runs wrote
    rerun = embed(fa, out, tiny_model_dir, "--chunk-size", "2")
    assert rerun.exit_code == 0 and "6 resumed" in rerun.output.replace(",", ""), rerun.output


def test_one_stream_is_a_fifo_named_twice_or_stdin_under_two_names(tmp_path):
    from esm2cli.io.identity import one_stream

    fifo, other = tmp_path / "a.fifo", tmp_path / "b.fifo"
    os.mkfifo(fifo)
    os.mkfifo(other)
    assert one_stream(fifo, fifo) and one_stream("-", "-")
    assert not one_stream(fifo, other)
    code = "import sys; from esm2cli.io.identity import one_stream; sys.exit(0 if one_stream('-', '/dev/stdin') else 3)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    piped = subprocess.run([sys.executable, "-c", code], input=b"x", env=env)
    assert piped.returncode == 0  # '-' and /dev/stdin are one pipe
