"""embed (pooled, windows, contacts), score and serve with transformers' ESM layers disabled: esm2cli's own
forward computes everything; transformers only reads configs, tokenizers and weights."""

from __future__ import annotations

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from live_server import live_server, make_app, wait_healthy
from transformers.models.esm import modeling_esm

from esm2cli.cli import cli
from helpers import write_fasta
from reference import cosine

ESM_MODULES = ("EsmModel", "EsmForMaskedLM", "EsmEmbeddings", "EsmEncoder", "EsmLayer", "EsmAttention",
               "EsmSelfAttention", "EsmSelfOutput", "EsmIntermediate", "EsmOutput", "EsmLMHead",
               "EsmContactPredictionHead", "EsmRotaryEmbedding")  # fmt: skip


SEQS = ["MKTAYIAKQRQISFVKSHFSRQ", "GSHMKVLAAGIVGLLLA", "MKV", "W" * 40 + "ACDEFGHIKLMNPQRSTVWY" * 3]


@pytest.fixture
def expected(tiny_model_dir):
    """Each sequence alone through transformers, computed before its layers are disabled."""
    from reference import DirectReference

    direct = DirectReference(tiny_model_dir)
    return np.stack([direct.mean(seq, 3) for seq in SEQS])


@pytest.fixture
def no_esm_layers(monkeypatch, expected):
    def refuse(self, *args, **kwargs):
        raise AssertionError(f"transformers' {type(self).__name__} was run")

    for name in ESM_MODULES:
        if hasattr(modeling_esm, name):
            monkeypatch.setattr(getattr(modeling_esm, name), "forward", refuse)


def test_embed_windows_contacts_and_score_run_without_transformers_layers(tmp_path, tiny_model_dir, expected,
                                                                           no_esm_layers):  # fmt: skip
    fa = write_fasta(tmp_path / "in.fa", [(f"p{i}", seq) for i, seq in enumerate(SEQS)])
    run = CliRunner().invoke(cli, ["embed", fa, "-o", str(tmp_path / "o.parquet"), "-m", tiny_model_dir,
                                   "--dtype", "float32", "--devices", "cpu", "-q"])  # fmt: skip
    assert run.exit_code == 0, run.output
    table = pq.read_table(tmp_path / "o.parquet")
    got = np.array(table["embedding"].to_pylist(), dtype=np.float32)
    assert cosine(got, expected).min() >= 0.9999
    window = CliRunner().invoke(cli, ["embed", fa, "-o", str(tmp_path / "w.parquet"), "-m", tiny_model_dir,
                                      "--dtype", "float32", "--truncate", "30", "--long-sequences", "window",
                                      "--window-overlap", "10", "-q"])  # fmt: skip
    assert window.exit_code == 0, window.output
    assert pq.read_table(tmp_path / "w.parquet")["windows"].to_pylist()[3] > 1
    contacts = CliRunner().invoke(cli, ["embed", fa, "-o", str(tmp_path / "c.parquet"), "-m", tiny_model_dir,
                                        "--dtype", "float32", "--contacts", "-q"])  # fmt: skip
    assert contacts.exit_code == 0, contacts.output
    score = CliRunner().invoke(cli, ["score", fa, "--pll", "-o", str(tmp_path / "s.parquet"), "-m", tiny_model_dir,
                                     "--dtype", "float32", "-q"])  # fmt: skip
    assert score.exit_code == 0, score.output
    assert np.isfinite(pq.read_table(tmp_path / "s.parquet")["pll"].to_numpy()).all()


def test_serve_runs_without_transformers_layers(tiny_model_dir, expected, no_esm_layers):
    with live_server(make_app(tiny_model_dir)) as url, httpx.Client(base_url=url, timeout=60) as client:
        wait_healthy(client)
        body = client.post("/predict", json={"sequence": SEQS[0]}).json()
    assert cosine(np.array([body["embedding"]]), expected[:1]).min() >= 0.9999


# ---------------------------------------------------------------------------------------------------------
# ESM C: transformers' EsmcModel and EsmcForMaskedLM are the reference only

ESMC_MODULES = ("EsmcModel", "EsmcForMaskedLM", "EsmcLayer", "EsmcAttention", "EsmcMLP", "EsmcLayerNorm",
                "EsmcRotaryEmbedding", "EsmcMaskedLMHead")  # fmt: skip


@pytest.fixture
def esmc_expected(tiny_esmc_dir):
    """Each sequence alone through transformers' ESM C, and its PLL, computed before its layers are disabled."""
    from helpers import EsmcReference

    ref = EsmcReference(tiny_esmc_dir)
    means = np.stack([ref.mean(seq) for seq in SEQS])
    plls = [sum(ref.log_probs(s, i)[i, ref.token(s[i])] for i in range(len(s))) for s in SEQS[:3]]
    return means, plls


@pytest.fixture
def no_esmc_layers(monkeypatch, esmc_expected):
    from transformers.models.esmc import modeling_esmc

    def refuse(self, *args, **kwargs):
        raise AssertionError(f"transformers' {type(self).__name__} was run")

    for name in ESMC_MODULES:
        monkeypatch.setattr(getattr(modeling_esmc, name), "forward", refuse)


def test_esmc_embed_score_and_serve_run_without_transformers_layers(tmp_path, tiny_esmc_dir, esmc_expected,
                                                                   no_esmc_layers):  # fmt: skip
    means, plls = esmc_expected
    fa = write_fasta(tmp_path / "in.fa", [(f"p{i}", seq) for i, seq in enumerate(SEQS)])
    for devices in ("cpu", "sim:4"):
        out = tmp_path / f"o-{devices.replace(':', '')}.parquet"
        run = CliRunner().invoke(cli, ["embed", fa, "-o", str(out), "-m", tiny_esmc_dir, "--dtype", "float32",
                                       "--devices", devices, "-q"])  # fmt: skip
        assert run.exit_code == 0, run.output
        got = np.array(pq.read_table(out)["embedding"].to_pylist(), dtype=np.float32)
        np.testing.assert_allclose(got, means, rtol=0, atol=1e-5)
    pll_fa = write_fasta(tmp_path / "pll.fa", [(f"p{i}", seq) for i, seq in enumerate(SEQS[:3])])
    score = CliRunner().invoke(cli, ["score", pll_fa, "--pll", "-o", str(tmp_path / "s.parquet"), "-m", tiny_esmc_dir,
                                     "--dtype", "float32", "-q"])  # fmt: skip
    assert score.exit_code == 0, score.output
    np.testing.assert_allclose(pq.read_table(tmp_path / "s.parquet")["pll"].to_pylist(), plls, rtol=0, atol=1e-4)
    with live_server(make_app(tiny_esmc_dir)) as url, httpx.Client(base_url=url, timeout=60) as client:
        wait_healthy(client)
        body = client.post("/predict", json={"sequence": SEQS[0]}).json()
    np.testing.assert_allclose(body["embedding"], means[0], rtol=0, atol=1e-5)
