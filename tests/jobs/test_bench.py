import json
import time
from dataclasses import replace

import pytest
import torch
from click.testing import CliRunner
from torch.utils.flop_counter import FlopCounterMode

from esm2cli.cli import cli
from esm2cli.config import BatchConfig, ModelConfig, ModeledGPU
from esm2cli.jobs.bench import (
    BenchReport,
    BenchRow,
    _keep_rows_on_interrupt,
    card_of,
    check_plot_path,
    device_counts,
    format_report,
    model_flops,
    run_bench,
    run_modeled_bench,
)
from esm2cli.jobs.workload import synthetic_sequences
from esm2cli.model.load import load_model


def test_model_flops_match_torchs_flop_counter(tiny_model_dir):
    loaded = load_model(ModelConfig(model=tiny_model_dir, dtype="float32"), keep_reference=True)
    loaded.reference.set_attn_implementation("eager")  # torch's counter skips the CPU flash kernel, not matmuls
    for length in (10, 200):
        ids = torch.tensor([[loaded.cls_id] + [int(loaded.token_lut[ord("M")])] * length + [loaded.eos_id]])
        with FlopCounterMode(display=False) as counter, torch.inference_mode():
            loaded.reference(input_ids=ids, attention_mask=torch.ones_like(ids))
        assert model_flops([length], loaded.num_layers, loaded.hidden_size) == pytest.approx(
            counter.get_total_flops(), rel=0.01
        )


def test_model_flops_of_a_swiglu_block_match_torchs_flop_counter(tiny_esmc_dir):
    """ESM C: four projections and SwiGLU's three matrices a layer (LoadedModel.ffn_weights = 3·h·f)."""
    from transformers import EsmcModel

    loaded = load_model(ModelConfig(model=tiny_esmc_dir, dtype="float32"))
    reference = EsmcModel.from_pretrained(tiny_esmc_dir, attn_implementation="eager").eval()
    assert loaded.ffn_weights == 3 * 64 * 96
    for length in (10, 200):
        ids = torch.tensor([[loaded.cls_id] + [int(loaded.token_lut[ord("M")])] * length + [loaded.eos_id]])
        with FlopCounterMode(display=False) as counter, torch.inference_mode():
            reference(input_ids=ids)
        got = model_flops([length], loaded.num_layers, loaded.hidden_size, ffn_weights=loaded.ffn_weights)
        assert got == pytest.approx(counter.get_total_flops(), rel=0.01)


def test_bench_scales_over_simulated_devices(tiny_model_dir):
    seqs = ["M" * n for n in (30, 50, 70, 90, 110, 130)]
    report = run_bench(
        ModelConfig(model=tiny_model_dir, load_format="auto", dtype="float32"), seqs, gpus=3,
        batch=BatchConfig(max_tokens=256, batch_size=4), peak_seconds=0.1,
    )  # fmt: skip
    assert report.device_kind == "simulated" and [r.devices for r in report.rows] == [1, 2, 3]
    assert report.duration_s is None  # one pass over the sequences per count
    assert 0 <= report.padding_fraction < 0.5
    assert report.rows[0].speedup == pytest.approx(1.0)
    for row in report.rows:
        assert row.sequences == len(seqs) and row.residues == sum(map(len, seqs))
        assert row.residues_per_s > 0 and 0 < row.mfu <= 1.0
        assert list(row.busy_share) == [f"sim:{i}" for i in range(row.devices)]
        assert all(0 <= share <= 1.05 for share in row.busy_share.values())
    assert "simulated devices sharing the CPU" in format_report(report)
    # The efficiency column says what it is measured against (it may pass 100% here).
    assert f"efficiency: residues/s over that of 1 simulated device(s) ({report.rows[0].residues_per_s:,.0f})" in (
        format_report(report)
    )


def test_bench_finishes_its_time_box(tiny_model_dir, monkeypatch):
    import esm2cli.jobs.bench as bench

    boxes = []  # per box: (its start, its end, the completion time of every batch that ran, devices)
    real_time_box = bench._time_box

    def watched_time_box(engine, batches, duration, say):
        done: list[float] = []

        def submit(seqs, submit=engine.submit):
            future = submit(seqs)
            future.add_done_callback(lambda f: f.cancelled() or done.append(time.perf_counter()))
            return future

        monkeypatch.setattr(engine, "submit", submit)
        start = time.perf_counter()
        result = real_time_box(engine, batches, duration, say)
        boxes.append((start, time.perf_counter(), done, len(engine.devices)))
        return result

    monkeypatch.setattr(bench, "_time_box", watched_time_box)
    seqs = [s for _, s in synthetic_sequences(64, seed=3, max_length=200)]
    lines = []
    report = run_bench(
        ModelConfig(model=tiny_model_dir, load_format="auto", dtype="float32"), seqs, gpus=2,
        batch=BatchConfig(max_tokens=512, batch_size=8), duration=1.5, peak_seconds=0.1, say=lines.append,
    )  # fmt: skip
    returned = time.perf_counter()
    assert [r.devices for r in report.rows] == [1, 2] and report.duration_s == 1.5
    for row, (start, end, done, devices) in zip(report.rows, boxes, strict=True):
        assert devices == row.devices and 1.5 <= row.seconds <= end - start
        assert row.sequences > len(seqs)  # the workload is cycled to fill the box
        # The box, then only the batches already running (one a device; one more if a device took a queued batch
        # as the box closed): those queued behind them are cancelled, 2 a device.
        late = sum(t > start + 1.5 for t in done)
        assert 1 <= late <= devices + 1, (late, devices)
    assert returned - boxes[-1][1] < report.rows[-1].seconds  # nothing runs on after the last box
    assert any(line.startswith("[2/2] 2 device(s)") for line in lines)  # progress, as it goes


def test_device_counts_double_up_to_the_largest():
    assert device_counts(1) == [1]
    assert device_counts(8) == [1, 2, 4, 8]
    assert device_counts(6) == [1, 2, 4, 6]


def test_cuda_names_map_to_modeled_cards():
    assert card_of("NVIDIA H100 80GB HBM3") == "h100"
    assert card_of("NVIDIA A100-SXM4-80GB") == "a100"
    assert card_of("NVIDIA A10G") == "a10g"
    assert card_of("NVIDIA L4") == "l4"
    assert card_of("Tesla V100-SXM2-16GB") is None


def test_modeled_bench_reports_host_efficiency_over_the_real_pipeline(tiny_model_dir):
    gpu = ModeledGPU(card="a100", count=2, overhead_ms=60)  # ~16 batches/s per card: easy for any host
    report = run_modeled_bench(
        ModelConfig(model=tiny_model_dir, load_format="auto", simulate=gpu), 2,
        batch=BatchConfig(batch_size=4), duration=1.5, max_length=300,
    )  # fmt: skip
    assert report.device_kind == "modeled" and report.card == "a100" and [r.devices for r in report.rows] == [1, 2]
    assert "MODEL of A100" in report.choices[0]
    for row in report.rows:
        held = sum(row.busy_share.values()) * row.seconds
        assert row.modeled_residues_per_s == pytest.approx(row.residues / (held / row.devices))
        assert row.host_efficiency == pytest.approx(row.residues_per_s / row.modeled_residues_per_s)
        assert 0.5 < row.host_efficiency <= 1.01  # the wall time, relative to the modeled hold
        # The workload is sized to the box: the modeled hold a card is about 1.5 s (on the second count, at most
        # the rate the host reached on the first).
        assert 0.5 * 1.5 < held / row.devices < 1.2 * 1.5, held
    text = format_report(report)
    assert "This is a MODEL of the GPUs" in text and "host eff." in text
    assert "efficiency: residues/s over linear scaling of 1 device(s)'" in text


def test_bench_cli_json(tiny_model_dir):
    result = CliRunner().invoke(
        cli,
        ["bench", "--gpus", "2", "-m", tiny_model_dir, "--load-format", "auto", "--sequences", "6",
         "--max-length", "100", "--json", "-q"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [row["devices"] for row in report["rows"]] == [1, 2]
    assert all(row["sequences"] == 6 for row in report["rows"])
    assert report["dtype"] in ("float32", "bfloat16")


def test_bench_cli_simulate_json_rows_per_count(tiny_model_dir):
    result = CliRunner().invoke(
        cli,
        ["bench", "--simulate", "H100", "--gpus", "4", "-m", tiny_model_dir, "--load-format", "auto",
         "--sequences", "40", "--max-length", "200", "--json", "-q"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["device_kind"] == "modeled" and report["card"] == "h100"
    assert [row["devices"] for row in report["rows"]] == [1, 2, 4]
    assert all(row["sequences"] == 40 and 0 < row["host_efficiency"] <= 1.01 for row in report["rows"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--simulate", "v100"], "'v100' is not one of 'a10g', 'l4', 'a100', 'h100', 'h200'"),
        (["--gpus", "0"], "0 is not in the range 1<=x<=64"),
        (["--gpus", "100000"], "is not in the range 1<=x<=64"),
        (["--mfu", "0.3"], "--mfu applies to modeled GPUs: add --simulate CARD"),
        (["--simulate", "a100", "--mfu", "1.5"], "is not in the range 0<x<=1"),
        (["--duration", "0"], "is not in the range x>=1"),
        (["--plot", "missing/dir/x.png"], "does not exist"),
        (["--plot", "scaling.txt"], "name it .png"),
    ],
)
def test_bench_refuses_bad_options_before_running(args, message, monkeypatch):
    import esm2cli.jobs.bench as bench

    ran = []
    for name in ("run_bench", "run_modeled_bench"):
        monkeypatch.setattr(bench, name, lambda *a, name=name, **k: ran.append(name))
    result = CliRunner().invoke(cli, ["bench", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert ran == []  # refused at once, not after the benchmark


def test_bench_plot_checks_matplotlib_and_writability(tmp_path, monkeypatch):
    import importlib.util

    assert check_plot_path(tmp_path / "x.png") is None
    assert "is a directory" in check_plot_path(tmp_path)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "matplotlib" else real(name))
    assert "needs matplotlib" in check_plot_path(tmp_path / "x.png")


def test_bench_without_gpus_simulates_on_the_cpu(monkeypatch, tiny_model_dir):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    result = CliRunner().invoke(
        cli, ["bench", "--gpus", "2", "-m", tiny_model_dir, "--load-format", "auto", "--sequences", "4", "--json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["device_kind"] == "simulated"
    assert "2 simulated device(s) sharing the CPU (this machine has 0 CUDA device(s))" in result.stderr


def test_a_bench_interrupted_after_a_count_keeps_its_rows():
    report = BenchReport(
        model="m", random_weights=True, dtype="float32", device_kind="simulated", duration_s=1.0, max_tokens=64,
        batch_size=1, max_length=10, padding_fraction=0.0, peak_gflops=1.0,
    )  # fmt: skip
    with _keep_rows_on_interrupt(report):
        report.rows.append(BenchRow(1, 1.0, 1, 1, 1.0, 1.0, 1.0, 0.1))
        raise KeyboardInterrupt
    assert report.interrupted and len(report.rows) == 1
    with pytest.raises(KeyboardInterrupt):
        with _keep_rows_on_interrupt(replace(report, rows=[], interrupted=False)):
            raise KeyboardInterrupt


def test_bench_errors_are_one_line_on_the_modeled_path(tmp_path):
    missing = CliRunner().invoke(cli, ["bench", "--simulate", "a100", "--gpus", "1", "-m", str(tmp_path / "nope")])
    assert missing.exit_code == 1 and "no such model directory" in missing.output
    assert "Traceback" not in missing.output
    fasta = tmp_path / "bad.fa"
    fasta.write_text(">a\nJJJ\n")
    bad = CliRunner().invoke(cli, ["bench", "--simulate", "a100", "--gpus", "1", "--input", str(fasta)])
    assert bad.exit_code == 2 and "no records to embed" in bad.output, bad.output
