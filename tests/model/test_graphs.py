"""CUDA graphs of the packed forward (esm2cli.model.graphs): the bucket layout run eagerly on the CPU, capture
with torch.cuda stood in for (which stream, one at a time, the check against eager), and the real thing on a card."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch

from esm2cli.config import ModelConfig
from esm2cli.jobs.workload import synthetic_sequences
from esm2cli.model import graphs
from esm2cli.model.forward import PackedEsm2
from esm2cli.model.graphs import GraphRunner, capture_stream
from esm2cli.model.load import load_model
from esm2cli.runtime.batching import token_buckets
from helpers import pack, random_seqs
from reference import cosine


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    loaded = load_model(ModelConfig(model=tiny_model_dir, dtype="float32"), keep_reference=True)
    return loaded, PackedEsm2.from_hf(loaded.reference)


def test_the_bucket_layout_round_trips_a_batch(tiny):
    """What _fill writes under each field's name is what the forward reads under it."""
    loaded, packed = tiny
    runner = GraphRunner(packed, (3, 1), "mean", buckets=[512], max_seqs=6, per_token_modes=(True,))
    runner.warmup()
    st = runner._static[(512, True)]
    batch = pack(loaded, random_seqs([5, 9, 30]))
    with torch.inference_mode():  # as embed: the buffers are inference tensors
        n = runner._fill(st, batch, True)
    ints = st.layout.ints.split(st.ints)
    floats = st.layout.floats.split(st.floats)
    t, b = batch.num_tokens, batch.num_seqs
    assert st.layout.ints.names == (
        "tokens", "positions", "cu_seqlens", "pool_index", "bos_rows", "residue_rows", "keep",
        "pool.rows", "pool.valid", "pool.chunks",  # mean pooling's fixed-order sums (model.invariant)
    )  # fmt: skip
    assert st.ints.numel() == st.layout.ints.total and st.floats.numel() == st.layout.floats.total
    np.testing.assert_array_equal(ints["tokens"][:t].numpy(), batch.tokens)
    np.testing.assert_array_equal(ints["positions"][:t].numpy(), batch.positions)
    np.testing.assert_array_equal(ints["cu_seqlens"][: b + 1].numpy(), batch.cu_seqlens)
    assert int(ints["cu_seqlens"][-1]) == 512  # dummy and empty segments close the bucket
    np.testing.assert_array_equal(ints["bos_rows"][:b].numpy(), batch.cu_seqlens[:-1])
    np.testing.assert_array_equal(ints["residue_rows"][: batch.lengths.sum()].numpy(), batch.residue_rows())
    np.testing.assert_allclose(floats["scale"][:t].numpy(), batch.scale)
    np.testing.assert_allclose(floats["inv_lengths"][:b].numpy(), 1 / batch.lengths)
    assert n == 2 * (b + batch.lengths.sum())  # two layers of pooled and residue rows
    with pytest.raises(ValueError, match="per_token=False in a bucket laid out for True"), torch.inference_mode():
        runner._fill(st, batch, False)
    small = runner._allocate(256, True)
    with pytest.raises(ValueError, match="buffer of .* for a layout of"), torch.inference_mode():
        runner._fill(replace(st, host_ints=small.host_ints), batch, True)  # another bucket's buffers


@pytest.mark.parametrize("per_token", [False, True])
def test_bucketed_inputs_give_the_eager_result(tiny, per_token):
    """The graph runner's layout (dummy segments up to the bucket, empty slots), run eagerly on the CPU."""
    loaded, packed = tiny
    seqs = random_seqs()
    runner = GraphRunner(packed, (3, 1), "mean", buckets=[512, 1024], max_seqs=12, per_token_modes=(per_token,))
    assert not runner.capture  # the CPU: no graphs, the same buffers
    runner.warmup()
    small = random_seqs([5, 9, 30], seed=8)
    for batch_seqs, bucket in ((seqs, 1024), (small, 512)):
        batch = pack(loaded, batch_seqs)
        assert runner.bucket_for(batch, per_token) == bucket
        got = runner.embed(batch, per_token=per_token)
        want = packed.embed(batch, (3, 1), per_token=per_token)
        for layer in (3, 1):  # the bucket's padding never moves a real protein's numbers
            assert np.array_equal(got.pooled[layer], want.pooled[layer])
            if per_token:
                for g, w in zip(got.per_token[layer], want.per_token[layer], strict=True):
                    assert np.array_equal(g, w)
    assert runner.graph_batches == 2 and runner.eager_batches == 0
    too_many = pack(loaded, random_seqs([4] * 13))  # more proteins than slots: eager
    assert runner.bucket_for(too_many, per_token) is None
    runner.embed(too_many, per_token=per_token)
    assert runner.eager_batches == 1


def test_buckets_share_one_output_and_results_are_copies(tiny):
    loaded, packed = tiny
    runner = GraphRunner(packed, (3,), "mean", buckets=[256, 1024], max_seqs=8, per_token_modes=(False, True))
    runner.warmup()
    outs = [runner._output(st, mode) for (_, mode), st in runner._static.items()]
    assert len({o.data_ptr() for o in outs}) == 1  # one buffer, the largest bucket's rows
    assert runner._out is not None and runner._out.shape[0] == max(o.shape[0] for o in outs)
    first_batch = pack(loaded, random_seqs([5, 9]))
    first = runner.embed(first_batch, per_token=True)
    kept = {layer: [a.copy() for a in rows] for layer, rows in first.per_token.items()}
    runner.embed(pack(loaded, random_seqs([300, 200, 100], seed=9)), per_token=True)  # overwrites the buffer
    for g, w in zip(first.per_token[3], kept[3], strict=True):
        np.testing.assert_array_equal(g, w)
    np.testing.assert_allclose(first.pooled[3], packed.embed(first_batch, (3,)).pooled[3], atol=1e-5, rtol=0)


def test_a_failed_capture_warns_once_and_runs_eagerly(tiny, monkeypatch):
    loaded, packed = tiny
    runner = GraphRunner(packed, (3,), "mean", buckets=[1024], max_seqs=8, capture=True)

    def broken(st, per_token):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(runner, "_capture", broken)
    with pytest.warns(UserWarning, match="capture failed.*running eagerly"):
        runner.warmup()
    batch = pack(loaded, random_seqs([5, 9]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        out = runner.embed(batch)
    np.testing.assert_array_equal(out.pooled[3], packed.embed(batch, (3,)).pooled[3])
    assert runner.failed and runner.eager_batches == 1


# ---------------------------------------------------------------------------------------------------------
# Capture, with torch.cuda stood in for: the forward itself runs on the CPU


class _Cuda:
    """Records what capture asks of torch.cuda: streams (and their device), captures (thread, stream, when)."""

    def __init__(self):
        self.streams: list[_Stream] = []
        self.captures: list[tuple[str, float, float, object]] = []  # thread, start, end, stream
        self.replays = 0
        self.current = _Stream(None)
        self.default_capture_stream_used = False

    def install(self, monkeypatch) -> None:
        cuda = self

        class Graph:
            def replay(self):  # captured nothing: replays nothing
                cuda.replays += 1

        class Capture:
            def __init__(self, graph, pool=None, stream=None):
                self.stream = stream
                if stream is None:
                    cuda.default_capture_stream_used = True

            def __enter__(self):
                self.start = time.perf_counter()
                time.sleep(0.02)  # long enough for a concurrent capture to overlap, were one allowed

            def __exit__(self, *exc):
                cuda.captures.append((threading.current_thread().name, self.start, time.perf_counter(), self.stream))

        def stream(device=None):
            made = _Stream(device)
            cuda.streams.append(made)
            return made

        monkeypatch.setattr(graphs, "_CAPTURE_STREAMS", {})
        monkeypatch.setattr(torch.cuda, "Stream", stream)
        monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
        monkeypatch.setattr(torch.cuda, "graph", Capture)
        monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: (0, 1))
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: cuda.current)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
        monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())


class _Stream:
    def __init__(self, device):
        self.device = device

    def wait_stream(self, other):
        pass


@pytest.fixture
def fake_cuda(monkeypatch):
    cuda = _Cuda()
    cuda.install(monkeypatch)
    return cuda


def test_capture_uses_a_stream_of_its_own_device(fake_cuda):
    one = capture_stream(torch.device("cuda", 1))
    zero = capture_stream(torch.device("cuda", 0))
    assert (one.device, zero.device) == (1, 0)
    assert capture_stream(torch.device("cuda", 1)) is one  # one stream a device, made once
    assert len(fake_cuda.streams) == 2


def test_runner_captures_on_the_device_stream_and_drops_a_graph_that_disagrees(tiny, fake_cuda, caplog):
    """A graph that replays nothing (NaN left in the output) is caught by the check against eager."""
    loaded, packed = tiny
    runner = GraphRunner(packed, (3,), "mean", buckets=[256, 512], max_seqs=4, capture=True)
    with caplog.at_level(logging.WARNING, logger="esm2cli.model.graphs"):
        runner.warmup()
    assert not fake_cuda.default_capture_stream_used
    assert [c[3] for c in fake_cuda.captures] == [fake_cuda.streams[0]] * 2 and fake_cuda.streams[0].device == 0
    assert fake_cuda.replays == 2  # one check a bucket
    assert all(st.graph is None for st in runner._static.values())
    assert caplog.text.count("does not replay the eager forward") == 2
    batch = pack(loaded, random_seqs([5, 9]))
    np.testing.assert_allclose(
        runner.embed(batch).pooled[3], packed.embed(batch, (3,)).pooled[3], atol=1e-5, rtol=0
    )  # the bucket's inputs, run eagerly
    assert fake_cuda.replays == 2 and runner.graph_batches == 1


def test_a_graph_that_agrees_with_eager_is_kept_and_replayed(tiny, fake_cuda, monkeypatch, caplog):
    loaded, packed = tiny
    runner = GraphRunner(packed, (3,), "mean", buckets=[256], max_seqs=4, capture=True)
    replays = []

    def faithful(st):  # stands for a graph that captured the forward
        replays.append(st.tokens)
        runner._forward(st, False, out=runner._output(st, False))

    monkeypatch.setattr(runner, "_replay", faithful)
    with caplog.at_level(logging.WARNING, logger="esm2cli.model.graphs"):
        runner.warmup()
    assert "does not replay" not in caplog.text
    assert runner._static[(256, False)].graph is not None
    batch = pack(loaded, random_seqs([5, 9]))
    np.testing.assert_allclose(runner.embed(batch).pooled[3], packed.embed(batch, (3,)).pooled[3], atol=1e-5, rtol=0)
    assert replays == [256, 256]  # the check, then the batch


def test_captures_from_two_threads_run_one_after_another(tiny, fake_cuda):
    _, packed = tiny
    runners = [GraphRunner(packed, (3,), "mean", buckets=[256, 512], max_seqs=4, capture=True) for _ in range(2)]
    threads = [threading.Thread(target=r.warmup, name=f"warm-{i}") for i, r in enumerate(runners)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    spans = sorted((start, end, name) for name, start, end, _ in fake_cuda.captures)
    assert len(spans) == 4 and {name for _, _, name in spans} == {"warm-0", "warm-1"}
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False)), spans  # no two overlap
    names = [name for _, _, name in spans]
    assert names in (["warm-0"] * 2 + ["warm-1"] * 2, ["warm-1"] * 2 + ["warm-0"] * 2)  # a runner's buckets together


# ---------------------------------------------------------------------------------------------------------
# On a CUDA device


@pytest.fixture(scope="module")
def cuda_model():
    bf16 = load_model(ModelConfig(model="esm2_t12_35M", load_format="dummy", dtype="bfloat16"), keep_reference=True)
    return bf16, PackedEsm2.from_hf(bf16.reference.to("cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("per_token", [False, True])
def test_cuda_graphs_replay_the_eager_forward(cuda_model, per_token):
    loaded, gpu = cuda_model
    runner = GraphRunner(gpu, (6, 12), "mean", buckets=token_buckets(8192), max_seqs=64,
                         per_token_modes=(per_token,))  # fmt: skip
    assert runner.capture
    runner.warmup()
    assert not runner.failed and all(st.graph is not None for st in runner._static.values())
    seqs = [s for _, s in synthetic_sequences(60, seed=6, max_length=1022)]
    for chunk in (seqs[:3], seqs[3:20], seqs[20:21]):
        batch = pack(loaded, chunk)
        got, want = runner.embed(batch, per_token), gpu.embed(batch, (6, 12), per_token=per_token)
        for layer in (6, 12):
            assert cosine(got.pooled[layer], want.pooled[layer]).min() >= 0.9999
            if per_token:
                for g, w in zip(got.per_token[layer], want.per_token[layer], strict=True):
                    assert cosine(g, w).min() >= 0.999
    assert runner.graph_batches == 3


@pytest.mark.gpu
def test_two_runners_on_one_card_warmed_from_two_threads(cuda_model):
    loaded, gpu = cuda_model
    runners = [GraphRunner(gpu, (12,), "mean", buckets=token_buckets(4096), max_seqs=16) for _ in range(2)]
    threads = [threading.Thread(target=r.warmup) for r in runners]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed capture warns
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    batch = pack(loaded, [s for _, s in synthetic_sequences(8, seed=2, max_length=400)])
    want = gpu.embed(batch, (12,)).pooled[12]
    for runner in runners:
        assert not runner.failed and all(st.graph is not None for st in runner._static.values())
        assert cosine(runner.embed(batch).pooled[12], want).min() >= 0.9999
        assert runner.graph_batches == 1


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_each_card_captures_on_its_own_stream():
    bf16 = load_model(ModelConfig(model="esm2_t6_8M", load_format="dummy", dtype="bfloat16"), keep_reference=True)
    batch = pack(bf16, random_seqs([50, 120]))
    for index in (1, 0):  # the second card first: torch's shared capture stream would be made there
        model = PackedEsm2.from_hf(bf16.reference.to(f"cuda:{index}"))
        runner = GraphRunner(model, (6,), "mean", buckets=[1024], max_seqs=4)
        runner.warmup()
        assert capture_stream(model.device).device == torch.device("cuda", index)
        assert not runner.failed and runner._static[(1024, False)].graph is not None
        assert cosine(runner.embed(batch).pooled[6], model.embed(batch, (6,)).pooled[6]).min() >= 0.9999
