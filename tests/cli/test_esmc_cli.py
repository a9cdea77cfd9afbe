"""ESM C behind every command: embed, score and serve against transformers' ESM C one protein at a time."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from live_server import live_server, make_app, wait_healthy

from esm2cli.cli import cli
from esm2cli.jobs.workload import synthetic_sequences
from helpers import EsmcReference, write_fasta
from reference import cosine

SEQS = ["MKTAYIAKQRQISFVKSHFSRQ", "GSHMKVLAAGIVGLLLA", "MKV", "W" * 40 + "ACDEFGHIKLMNPQRSTVWYXBUZO" * 3]
LONG = "M" + "".join(s for _, s in synthetic_sequences(8, seed=3))[:1399]  # 1,400 residues: over ESM-2's 1,022


@pytest.fixture(scope="module")
def ref(tiny_esmc_dir):
    return EsmcReference(tiny_esmc_dir)


@pytest.fixture
def fasta(tmp_path):
    return write_fasta(tmp_path / "in.fa", [(f"p{i}", s) for i, s in enumerate([*SEQS, LONG])])


def embed(model, fasta, out, *args):
    args = ["embed", fasta, "-o", str(out), "-m", model, "--dtype", "float32", "-q", *map(str, args)]
    return CliRunner().invoke(cli, args)


def vectors(path, column="embedding"):
    return np.array(pq.read_table(path)[column].to_pylist(), dtype=np.float32)


@pytest.mark.parametrize("devices", ["cpu", "sim:4"])
def test_embed_layers_match_transformers_and_long_proteins_are_whole(tmp_path, fasta, tiny_esmc_dir, ref, devices):
    out = tmp_path / "o.parquet"
    run = embed(tiny_esmc_dir, fasta, out, "--layers", "0,-1", "--devices", devices)
    assert run.exit_code == 0, run.output
    table = pq.read_table(out)
    assert table["length"].to_pylist()[-1] == len(LONG) and table["truncated"].to_pylist() == [False] * 5
    for column, layer in (("embedding_l0", 0), ("embedding_l3", 3)):
        want = np.stack([ref.mean(s, layer) for s in [*SEQS, LONG]])
        got = vectors(out, column)
        assert cosine(got, want).min() >= 0.99999
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_bos_pooling_and_per_token_rows(tmp_path, fasta, tiny_esmc_dir, ref):
    out = tmp_path / "o.parquet"
    run = embed(tiny_esmc_dir, fasta, out, "--pooling", "bos", "--per-token")
    assert run.exit_code == 0, run.output
    np.testing.assert_allclose(vectors(out), np.stack([ref.bos(s) for s in [*SEQS, LONG]]), rtol=0, atol=1e-5)
    rows = pq.read_table(out)["per_token"].to_pylist()
    for got, seq in zip(rows, [*SEQS, LONG], strict=True):
        np.testing.assert_allclose(np.array(got, dtype=np.float32), ref.per_token(seq), rtol=0, atol=1e-5)


def test_windows_use_the_truncate_width_and_reuse_copies_rows(tmp_path, fasta, tiny_esmc_dir):
    first = tmp_path / "w1.parquet"
    run = embed(tiny_esmc_dir, fasta, first, "--truncate", "30", "--long-sequences", "window", "--window-overlap", "10")
    assert run.exit_code == 0, run.output
    assert pq.read_table(first)["windows"].to_pylist()[3] > 1
    again = tmp_path / "w2.parquet"
    args = ["--truncate", "30", "--long-sequences", "window", "--window-overlap", "10", "--reuse", first]
    run = CliRunner().invoke(cli, ["embed", fasta, "-o", str(again), "-m", tiny_esmc_dir, "--dtype", "float32",
                                   *map(str, args)])  # fmt: skip
    assert run.exit_code == 0, run.output
    assert "5 reused" in run.stderr
    np.testing.assert_array_equal(vectors(again), vectors(first))


def test_an_esm2_output_is_not_reused_for_esmc(tmp_path, fasta, tiny_esmc_dir, tiny_model_dir):
    old = tmp_path / "esm2.parquet"
    assert embed(tiny_model_dir, fasta, old, "--truncate", "2046").exit_code == 0  # the options alike
    new = tmp_path / "esmc.parquet"
    run = CliRunner().invoke(cli, ["embed", fasta, "-o", str(new), "-m", tiny_esmc_dir, "--dtype", "float32",
                                   "--reuse", str(old)])  # fmt: skip
    assert run.exit_code == 0, run.output
    assert "was made with model_family 'esm2' (this run: 'esmc'); other weights" in run.stderr
    assert "every row is computed" in run.stderr
    assert vectors(new).shape[1] == 64
    families = [json.loads(pq.read_schema(p).metadata[b"esm2cli"])["identity"]["model_family"] for p in (old, new)]
    assert families == ["esm2", "esmc"]


@pytest.mark.parametrize(
    "args, named, code",
    [
        (["--contacts"], "is an ESM C model, which has no contact head", 2),
        (["--truncate", "3000"], "--truncate 3000 is over ESM C's context of 2046 residues", 2),
    ],
)
def test_bad_options_are_one_line_and_write_nothing(tmp_path, fasta, tiny_esmc_dir, args, named, code):
    out = tmp_path / "o.parquet"
    run = embed(tiny_esmc_dir, fasta, out, *args)
    assert run.exit_code == code, run.output
    assert named in run.stderr and len(run.stderr.strip().splitlines()) == 1 and "Traceback" not in run.output
    assert not out.exists() and not any(tmp_path.glob("o.parquet*"))


def test_a_directory_of_another_architecture_is_one_line(tmp_path, fasta):
    from transformers import BertConfig, BertModel

    config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    BertModel(config).save_pretrained(tmp_path / "bert")
    out = tmp_path / "o.parquet"
    run = embed(str(tmp_path / "bert"), fasta, out)
    assert run.exit_code == 1, run.output
    assert "not an ESM-2 or ESM C encoder (model_type='bert')" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and not out.exists()


def test_dummy_esmc_300m_gives_960_wide_vectors(tmp_path):
    fa = write_fasta(tmp_path / "in.fa", [("a", "MKTAYIAKQRQ"), ("b", "GSHMKV")])
    out = tmp_path / "o.parquet"
    run = CliRunner().invoke(cli, ["embed", fa, "-o", str(out), "-m", "esmc_300m", "--load-format", "dummy",
                                   "--dtype", "bfloat16", "--devices", "cpu", "-q"])  # fmt: skip
    assert run.exit_code == 0, run.output
    got = vectors(out)
    assert got.shape == (2, 960) and np.isfinite(got).all() and not np.allclose(got[0], got[1])


def score(model, fasta, out, *args):
    return CliRunner().invoke(cli, ["score", fasta, "-o", str(out), "-m", model, "--dtype", "float32", "-q", *args])


def test_pll_matches_transformers_masked_lm(tmp_path, tiny_esmc_dir, ref):
    seqs = SEQS[:3]
    fa = write_fasta(tmp_path / "wt.fa", [(f"p{i}", s) for i, s in enumerate(seqs)])
    run = score(tiny_esmc_dir, fa, tmp_path / "s.parquet", "--pll", "--devices", "sim:4")
    assert run.exit_code == 0, run.output
    want = [sum(ref.log_probs(s, i)[i, ref.token(s[i])] for i in range(len(s))) for s in seqs]
    np.testing.assert_allclose(pq.read_table(tmp_path / "s.parquet")["pll"].to_pylist(), want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("method", ["masked-marginal", "wt-marginal"])
def test_mutant_scores_match_transformers_masked_lm(tmp_path, tiny_esmc_dir, ref, method):
    wt = SEQS[0]
    fa = write_fasta(tmp_path / "wt.fa", [("p", wt)])
    (tmp_path / "m.csv").write_text("id,mutant\np,M1A\np,T3W:Y5C\np,Q22K\n")
    run = score(tiny_esmc_dir, fa, tmp_path / "s.parquet", "--mutations", str(tmp_path / "m.csv"), "--method", method)
    assert run.exit_code == 0, run.output

    def one(pos, mt):
        lp = ref.log_probs(wt, pos if method == "masked-marginal" else None)[pos]
        return lp[ref.token(mt)] - lp[ref.token(wt[pos])]

    want = [one(0, "A"), one(2, "W") + one(4, "C"), one(21, "K")]
    np.testing.assert_allclose(pq.read_table(tmp_path / "s.parquet")["score"].to_pylist(), want, rtol=0, atol=1e-4)


def test_serve_routes_answer_with_esmc(tiny_esmc_dir, ref):
    with live_server(make_app(tiny_esmc_dir)) as url, httpx.Client(base_url=url, timeout=60) as client:
        wait_healthy(client)
        single = client.post("/predict", json={"sequence": SEQS[0]}).json()
        models = client.get("/v1/models").json()
        model_id = models["data"][0]["id"]
        openai = client.post("/v1/embeddings", json={"model": model_id, "input": SEQS[:2]}).json()
    np.testing.assert_allclose(single["embedding"], ref.mean(SEQS[0]), rtol=0, atol=1e-5)
    got = np.array([d["embedding"] for d in openai["data"]], dtype=np.float32)
    np.testing.assert_allclose(got, np.stack([ref.mean(s) for s in SEQS[:2]]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("command", [["score", "--pll"], ["embed", "--long-sequences", "window"]])
def test_esmc_truncate_refusal_suggests_only_what_can_work(tmp_path, tiny_esmc_dir, command):
    fasta = write_fasta(tmp_path / "a.fa", [("p1", "MKTAYIAK")])
    name, *options = command
    result = CliRunner().invoke(
        cli,
        [name, fasta, "-o", str(tmp_path / "o.parquet"), "-m", tiny_esmc_dir, "--devices", "cpu", "--truncate",
         "3000", *options],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "--long-sequences window" not in result.output, result.output


def test_esmc_truncate_refusal_suggests_windows_where_they_can_be_asked_for(tmp_path, tiny_esmc_dir):
    fasta = write_fasta(tmp_path / "a.fa", [("p1", "MKTAYIAK")])
    result = CliRunner().invoke(
        cli,
        ["embed", fasta, "-o", str(tmp_path / "o.parquet"), "-m", tiny_esmc_dir, "--devices", "cpu", "--truncate",
         "3000"],
    )  # fmt: skip
    assert result.exit_code == 2 and "use --truncate 2046 or less, or --long-sequences window" in result.output
