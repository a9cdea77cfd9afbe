"""Modeled GPUs: the time formula, a wait that releases the GIL, real shapes, and the real pipeline around them."""

import threading
import time
from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest

from esm2cli.config import GPU_PEAKS, BatchConfig, EmbedConfig, InputConfig, ModelConfig, ModeledGPU
from esm2cli.errors import DeviceError
from esm2cli.jobs.pipeline import embed_fasta
from esm2cli.model.architecture import ARCHITECTURES
from esm2cli.model.load import load_model
from esm2cli.runtime.batching import token_bucket
from esm2cli.runtime.devices import modeled_devices
from esm2cli.runtime.engine import build_engine
from esm2cli.runtime.modeled import ModeledReplica
from helpers import write_fasta


@pytest.fixture(scope="module")
def shape_650m():
    """The 650M architecture without weights (meta device): what a modeled card needs."""
    return load_model(ModelConfig(model="esm2_t33_650M", load_format="dummy", dtype="bfloat16"), weights=False)


def _replica(loaded, gpu: ModeledGPU, embed: EmbedConfig | None = None):
    (device,) = modeled_devices(gpu)
    return ModeledReplica(loaded, device, embed or EmbedConfig(), gpu, "bfloat16")


def _expected_seconds(lengths, gpu: ModeledGPU) -> float:
    """The formula written out: packed FLOPs of ESM-2 over (published peak x MFU), plus the call overhead."""
    layers, hidden, _ = ARCHITECTURES["esm2_t33_650M"]
    tokens = [n + 2 for n in lengths]  # <cls> and <eos> included
    rows = token_bucket(sum(tokens))  # the matmuls run on the CUDA graph's token bucket
    flops = layers * (24 * hidden * hidden * rows + sum(4 * hidden * t * t for t in tokens))
    return flops / (GPU_PEAKS[gpu.card]["bfloat16"] * gpu.mfu) + gpu.overhead_ms / 1000


@pytest.mark.parametrize("lengths", [[300] * 16, [100, 120, 1000], [50]])
def test_a_modeled_card_holds_each_batch_for_its_flops_over_peak_times_mfu_plus_overhead(shape_650m, lengths):
    gpu = ModeledGPU(card="a10g", mfu=0.45, overhead_ms=40)
    replica = _replica(shape_650m, gpu)
    expected = _expected_seconds(lengths, gpu)
    assert replica.seconds(lengths) == pytest.approx(expected, rel=1e-9)
    asked = []

    class Clock(threading.Event):  # the card's clock, recording each wait it is asked for
        def wait(self, timeout=None):
            asked.append(timeout)
            return super().wait(timeout)

    replica._clock = Clock()
    start = time.perf_counter()
    out = replica.embed_batch(["M" * n for n in lengths])
    elapsed = time.perf_counter() - start
    start = time.perf_counter()
    threading.Event().wait(expected)  # the baseline: this machine's oversleep on a bare wait as long
    bare = time.perf_counter() - start
    # One wait, for what is left of the modeled time; on the wall, at least that time and less than a second
    # hold over the bare wait (a loaded machine oversleeps both alike).
    assert len(asked) == 1 and 0 < asked[0] <= expected, (asked, expected)
    assert expected * 0.99 <= elapsed < bare + expected, (elapsed, bare, expected)
    assert replica.held_s == pytest.approx(expected) and replica.calls == 1
    (pooled,) = out.pooled.values()
    assert pooled.shape == (len(lengths), 1280) and pooled.dtype == np.float32


def test_mfu_and_overhead_change_the_time_as_the_formula_says(shape_650m):
    lengths = [400] * 20
    slow = _replica(shape_650m, ModeledGPU(card="a100", mfu=0.2, overhead_ms=5)).seconds(lengths)
    fast = _replica(shape_650m, ModeledGPU(card="a100", mfu=0.4, overhead_ms=5)).seconds(lengths)
    assert slow - 0.005 == pytest.approx(2 * (fast - 0.005))
    h100 = _replica(shape_650m, ModeledGPU(card="h100", mfu=0.2, overhead_ms=5)).seconds(lengths)
    ratio = GPU_PEAKS["h100"]["bfloat16"] / GPU_PEAKS["a100"]["bfloat16"]
    assert slow - 0.005 == pytest.approx(ratio * (h100 - 0.005))


def test_modeled_cards_wait_without_the_gil(shape_650m):
    gpu = ModeledGPU(card="a10g", count=4, mfu=0.45, overhead_ms=300)
    replicas = [ModeledReplica(shape_650m, d, EmbedConfig(), gpu, "bfloat16") for d in modeled_devices(gpu)]
    start = time.perf_counter()
    replicas[0].embed_batch(["MKV"])
    alone = time.perf_counter() - start  # the baseline: one 0.3 s call, on this machine now
    threads = [threading.Thread(target=r.embed_batch, args=(["MKV"],)) for r in replicas]
    start = time.perf_counter()
    [t.start() for t in threads]
    [t.join() for t in threads]
    together = time.perf_counter() - start
    # Four calls overlap, as kernels on four GPUs do: about one call's time, where holding the GIL takes four.
    assert together < 2 * alone, (together, alone)


def test_launch_time_holds_the_gil(shape_650m):
    gpu = ModeledGPU(card="h100", count=3, mfu=0.45, overhead_ms=0, launch_ms=150)
    replicas = [ModeledReplica(shape_650m, d, EmbedConfig(), gpu, "bfloat16") for d in modeled_devices(gpu)]
    threads = [threading.Thread(target=r.embed_batch, args=(["MKV"],)) for r in replicas]
    start = time.perf_counter()
    [t.start() for t in threads]
    [t.join() for t in threads]
    # One Python thread at a time: at least the three launches' CPU time end to end (a bound that load can only
    # help to meet, so it needs no baseline).
    assert time.perf_counter() - start >= 3 * 0.15 * 0.95


def test_per_token_outputs_have_the_real_shapes(shape_650m):
    replica = _replica(shape_650m, ModeledGPU(card="l4", overhead_ms=0), EmbedConfig(layers=(6, -1), per_token=True))
    out = replica.embed_batch(["MKV", "M" * 40])
    assert set(out.pooled) == {6, 33} and set(out.per_token) == {6, 33}
    assert [a.shape for a in out.per_token[33]] == [(3, 1280), (40, 1280)]
    assert all(a.dtype == np.float32 for a in out.per_token[6])


def test_unknown_cards_and_counts_are_refused():
    with pytest.raises(DeviceError, match="no model of the GPU 'v100'"):
        modeled_devices(ModeledGPU(card="v100"))
    with pytest.raises(DeviceError, match="at least 1"):
        modeled_devices(ModeledGPU(card="a100", count=0))


def test_modeled_runtime_resolves_gpu_defaults_without_loading_weights():
    setup = build_engine(
        ModelConfig(model="esm2_t33_650M", load_format="dummy", simulate=ModeledGPU(card="h200", count=3)),
        EmbedConfig(),
    )
    assert [d.name for d in setup.devices] == ["h200:0", "h200:1", "h200:2"]
    assert setup.dtype == "bfloat16"  # every modeled card computes bf16 natively
    assert setup.batch.max_tokens == BatchConfig().for_devices(True).max_tokens  # the GPU token budget
    assert setup.model.forward is None  # no memory, no weights


def test_the_real_pipeline_writes_real_parquet_around_modeled_cards(tmp_path, tiny_model_dir, proteins):
    gpu = ModeledGPU(card="a100", count=2, overhead_ms=1)
    model = ModelConfig(model=tiny_model_dir, load_format="auto", simulate=gpu)
    embed = EmbedConfig(truncate=500)
    setup = build_engine(model, embed, BatchConfig(max_tokens=2048, batch_size=8))
    fasta = write_fasta(tmp_path / "in.fa", proteins)
    out = tmp_path / "out.parquet"
    with setup.engine:
        summary = embed_fasta(
            fasta,
            out,
            model=replace(model, dtype=setup.dtype),
            embed=embed,
            batch=setup.batch,
            inputs=InputConfig(),
            setup=setup,
        )
    table = pq.read_table(out)
    assert table["id"].to_pylist() == [rec_id for rec_id, _ in proteins]
    assert table["length"].to_pylist() == [len(seq) for _, seq in proteins]
    assert np.array(table["embedding"].to_pylist()).shape == (len(proteins), 32)
    assert summary.sequences == len(proteins) and sum(r.calls for r in setup.replicas) >= 2
    assert sum(r.held_s for r in setup.replicas) > 0


def test_the_prediction_printed_beside_a_real_card_sums_the_modeled_batches(shape_650m):
    from esm2cli.jobs.bench import _predicted_rate

    batches = [["M" * 300] * 16, ["M" * 100] * 40, ["M" * 1000] * 4]
    gpu = ModeledGPU(card="h100")  # the defaults, as the real bench's comparison uses them
    seconds = sum(_expected_seconds([len(s) for s in b], gpu) for b in batches)
    residues = sum(len(s) for b in batches for s in b)
    assert _predicted_rate(batches, 1, "h100", "bfloat16", shape_650m) == pytest.approx(residues / seconds)
    assert _predicted_rate(batches, 4, "h100", "bfloat16", shape_650m) == pytest.approx(4 * residues / seconds)
