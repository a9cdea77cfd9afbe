import json

import pytest
import torch
from click.testing import CliRunner
from torch.utils.flop_counter import FlopCounterMode

from esm2cli.bench import format_report, model_flops, run_bench
from esm2cli.cli import cli
from esm2cli.config import EmbedConfig, ModelConfig
from esm2cli.devices import Device
from esm2cli.model import build_replicas, load_model


def test_model_flops_match_torchs_flop_counter(tiny_model_dir):
    loaded = load_model(ModelConfig(model=tiny_model_dir, dtype="float32"))
    rep = build_replicas(loaded, [Device("cpu", "cpu")], EmbedConfig())[0]
    loaded.model.set_attn_implementation("eager")  # torch's counter skips the CPU flash kernel, not matmuls
    for length in (10, 200):
        ids = rep.tokenize(["M" * length])
        with FlopCounterMode(display=False) as counter, torch.inference_mode():
            loaded.model(input_ids=ids, attention_mask=torch.ones_like(ids))
        assert model_flops([length], loaded.num_layers, loaded.hidden_size) == pytest.approx(
            counter.get_total_flops(), rel=0.01
        )


def test_bench_scales_over_simulated_devices(tiny_model_dir):
    seqs = ["M" * n for n in (30, 50, 70, 90, 110, 130)]
    report = run_bench(
        ModelConfig(model=tiny_model_dir, load_format="auto", dtype="float32"), seqs, gpus=3, max_tokens=256,
        batch_size=4, peak_seconds=0.1,
    )  # fmt: skip
    assert report.device_kind == "simulated" and [r.devices for r in report.rows] == [1, 2, 3]
    assert report.residues == sum(map(len, seqs)) and report.batches >= 2
    assert 0 <= report.padding_fraction < 0.5
    assert report.rows[0].speedup == pytest.approx(1.0)
    for row in report.rows:
        assert row.residues_per_s > 0 and 0 < row.mfu <= 1.0
        assert row.seconds >= sum(row.busy_share.values()) * row.seconds / max(row.devices, 1) * 0.9
        assert list(row.busy_share) == [f"sim:{i}" for i in range(row.devices)]
        assert all(0 < share <= 1.05 for share in row.busy_share.values())
    assert "simulated devices sharing the CPU" in format_report(report)


def test_bench_cli_json(tiny_model_dir):
    result = CliRunner().invoke(
        cli,
        ["bench", "--gpus", "2", "-m", tiny_model_dir, "--load-format", "auto", "--sequences", "6",
         "--max-length", "100", "--json", "-q"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["sequences"] == 6 and len(report["rows"]) == 2
    assert report["dtype"] in ("float32", "bfloat16")
