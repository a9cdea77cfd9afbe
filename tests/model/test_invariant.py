"""The batch-invariant primitives (esm2cli.model.invariant), bitwise: a row's numbers never depend on its mates."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from esm2cli.model.invariant import (
    POOL_CHUNK,
    ROW_TILE,
    PoolPlan,
    attention_width,
    mean_pool,
    padded_rows,
    pool_plan,
    tiled_linear,
    tree_sum,
    width_groups,
)

DTYPES = [torch.float32, torch.bfloat16]
# (in, out): the tiny test model's and the 8M model's matmuls; on this CPU a plain call of 1280 -> 320 over fewer
# than 256 rows sums in another order with 2 threads than with 1 (the module docstring).
SHAPES = [(32, 96), (128, 32), (320, 960), (320, 1280), (1280, 320)]


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("k", "n"), SHAPES)
def test_tiled_linear_rows_do_not_depend_on_the_other_rows(dtype, k, n, threads):
    gen = torch.Generator().manual_seed(k + n)
    w = torch.randn(n, k, generator=gen).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype)
    probe = torch.randn(37, k, generator=gen).to(dtype)
    alone = tiled_linear(probe, w, b)
    for threads_n in (1, 2):
        torch.set_num_threads(threads_n)
        for rows, at in [(37, 0), (300, 5), (300, 250), (1000, 600), (4 * ROW_TILE, 3 * ROW_TILE - 3)]:
            x = torch.randn(rows, k, generator=gen).to(dtype)
            x[at : at + 37] = probe
            got = tiled_linear(x, w, b)[at : at + 37]
            assert torch.equal(got, alone), (threads_n, rows, at)


@pytest.mark.parametrize("dtype", DTYPES)
def test_tiled_linear_is_the_linear_map(dtype):
    gen = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(300, 64, generator=gen), torch.randn(48, 64, generator=gen), torch.randn(48, generator=gen)
    got = tiled_linear(x.to(dtype), w.to(dtype), b.to(dtype)).float()
    assert got.shape == (300, 48)
    tol = 1e-5 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(got, F.linear(x, w, b), atol=tol, rtol=tol)
    assert torch.equal(tiled_linear(x, w)[:, :3], tiled_linear(x, w[:3]))  # no bias; the columns apart


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bias", [True, False])
def test_every_gemm_gets_whole_tiles(dtype, bias, monkeypatch):
    # A short last tile is a gemm of another shape, which may sum its rows in another order (on any hardware).
    import esm2cli.model.invariant as invariant

    calls: list[tuple[str, int]] = []

    def spy(name):
        real = getattr(torch, name)

        def call(*args, **kwargs):
            x = args[1] if name in ("addmm", "baddbmm") else args[0]
            calls.append((name, x.shape[-2]))
            return real(*args, **kwargs)

        return call

    for name in ("mm", "addmm", "bmm", "baddbmm"):
        monkeypatch.setattr(invariant.torch, name, spy(name))
    gen = torch.Generator().manual_seed(2)
    x, w = torch.randn(2 * ROW_TILE + 44, 32, generator=gen).to(dtype), torch.randn(24, 32, generator=gen).to(dtype)
    b = torch.randn(24, generator=gen).to(dtype) if bias else None
    assert tiled_linear(x, w, b).shape == (2 * ROW_TILE + 44, 24)
    per_tile = dtype != torch.float32  # the CPU in half precision: one gemm call a tile
    assert len(calls) == (3 if per_tile else 1)
    assert all(rows == ROW_TILE for _, rows in calls), calls


def test_padded_rows_are_whole_tiles():
    assert [padded_rows(n) for n in (0, 1, ROW_TILE, ROW_TILE + 1)] == [ROW_TILE, ROW_TILE, ROW_TILE, 2 * ROW_TILE]


def test_attention_width_is_the_proteins_own_rung():
    assert [attention_width(n) for n in (1, 32, 33, 1024, 1025, 1100)] == [32, 32, 64, 1024, 1088, 1152]
    sizes = np.array([40, 300, 35, 0, 64, 66])
    groups = width_groups(sizes)
    assert [w for w, _ in groups] == [64, 96, 320]
    assert [m.tolist() for _, m in groups] == [[0, 2, 4], [5], [1]]  # batch order; the empty segment left out
    for width, members in groups:
        assert all(attention_width(sizes[i]) == width for i in members)


def _pool(hidden, starts, lengths, **kw):
    fields = {k: torch.from_numpy(v) for k, v in pool_plan(np.array(starts), np.array(lengths), **kw).items()}
    plan = PoolPlan.of(fields["rows"], fields["valid"], fields["chunks"], len(lengths))
    inv = torch.tensor([1.0 / max(n, 1) for n in lengths], dtype=torch.float32)
    return mean_pool(hidden, plan, inv)


def test_mean_pool_is_the_mean_and_ignores_mates_and_padding():
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(400, 24, generator=gen)
    lengths, starts = [5, 100, 1, 37], [1, 8, 110, 113]
    got = _pool(hidden, starts, lengths)
    want = torch.stack([hidden[s : s + n].double().mean(0) for s, n in zip(starts, lengths, strict=True)]).float()
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    alone = _pool(hidden, [8], [100])[0]
    assert torch.equal(got[1], alone)
    assert torch.equal(_pool(hidden, [8, 200], [100, 150])[0], alone)  # a wider mate widens the tree
    padded = _pool(hidden, starts, lengths, chunks=64, width=64)  # a CUDA graph's static slots
    assert torch.equal(padded, got)
    moved = hidden.clone()
    moved[300:400] = hidden[8:108]
    assert torch.equal(_pool(moved, [300], [100])[0], alone)  # another place in the batch


def test_pool_plan_refuses_too_few_slots():
    with pytest.raises(ValueError, match="this is a bug"):
        pool_plan(np.array([0]), np.array([10 * POOL_CHUNK]), width=4)


def _tree(vectors: list[np.ndarray]) -> np.ndarray:
    """A power-of-two list of float32 vectors summed as the documented tree, written another way: adding halves
    (element i with element i + n/2) until one is left is the sum of the even-indexed ones plus the odd ones."""
    if len(vectors) == 1:
        return vectors[0]
    return _tree(vectors[0::2]) + _tree(vectors[1::2])


def _reference_mean(hidden: np.ndarray, first: int, n: int) -> np.ndarray:
    """One protein's mean pooled as invariant.py documents it, in numpy float32: 16-row chunks from its first
    residue (the last one zero-filled), each summed by the tree; the chunk sums, zero-filled to a power of two, by
    the tree again; times the float32 1 / n."""
    rows = hidden[first : first + n]
    chunks = []
    for start in range(0, n, 16):
        part = list(rows[start : start + 16])
        chunks.append(_tree(part + [np.zeros_like(rows[0])] * (16 - len(part))))
    wide = 1 << (len(chunks) - 1).bit_length()
    return _tree(chunks + [np.zeros_like(rows[0])] * (wide - len(chunks))) * np.float32(1.0 / n)


def test_mean_pool_sums_the_documented_tree_bitwise():
    # Another tree (32-row chunks, chunk sums added in a row, a sum over the whole protein) rounds otherwise:
    # values of many magnitudes make each order's float32 rounding show in the bits.
    rng = np.random.default_rng(5)
    hidden = (rng.standard_normal((1200, 8)) * 10.0 ** rng.uniform(-3, 3, (1200, 8))).astype(np.float32)
    lengths, starts = [1, 15, 16, 17, 100, 257, 513], [1, 3, 20, 40, 60, 170, 430]
    got = _pool(torch.from_numpy(hidden), starts, lengths).numpy()
    for row, (first, n) in enumerate(zip(starts, lengths, strict=True)):
        assert np.array_equal(got[row], _reference_mean(hidden, first, n)), n
    sequential = np.cumsum(hidden[170:427], axis=0, dtype=np.float32)[-1] * np.float32(1 / 257)
    assert not np.array_equal(got[5], sequential)  # the values do tell one order from another


def test_tree_sum_pairs_halves():
    x = torch.tensor([[[1.0], [2.0], [4.0], [8.0]]])
    assert tree_sum(x).tolist() == [[15.0]]


# ---------------------------------------------------------------------------------------------------------
# The forward: a protein's vectors bit for bit the same whatever shares its batch


def _models():
    from esm2cli.config import ModelConfig
    from esm2cli.model.load import load_model

    return load_model, ModelConfig


@pytest.fixture(scope="module", params=["tiny-float32", "tiny-bfloat16", "8M-float32"])
def model(request, tiny_model_dir):
    load_model, model_config = _models()
    name, dtype = request.param.split("-")
    if name == "tiny":
        cfg = model_config(model=tiny_model_dir, dtype=dtype)
    else:
        cfg = model_config(model="esm2_t6_8M", load_format="dummy", dtype=dtype)
    loaded = load_model(cfg, lm_head=name == "tiny")
    return loaded, loaded.forward


def _pack(loaded, seqs, masked=None):
    from esm2cli.model.packed import PackedBatch

    return PackedBatch.from_sequences(
        seqs, loaded.token_lut, cls_id=loaded.cls_id, eos_id=loaded.eos_id, mask_id=loaded.mask_id,
        token_dropout=loaded.forward.token_dropout, masked=masked,
    )  # fmt: skip


def _seqs(lengths, seed):
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWYX"), n)) for n in lengths]


PROBES = _seqs([1, 9, 33, 130, 260], seed=1)
MATES = _seqs([3, 12, 40, 41, 64, 200, 300, 15, 90], seed=2)


def _compositions(probes=PROBES):
    """Each probe alone, first, last, among short mates, among long ones, twice in one batch."""
    for i, probe in enumerate(probes):
        yield [probe], 0
        yield [probe, *MATES], 0
        yield [*MATES[::-1], probe], len(MATES)
        yield [*MATES[:3], probe, *MATES[3:5]], 3
        yield [*PROBES[:i], probe, *MATES[5:]], i
        yield [probe, *MATES[2:4], probe], 3


def test_a_protein_is_bitwise_the_same_in_every_batch(model):
    loaded, forward = model
    layers = tuple(sorted({0, 1, loaded.num_layers}))
    seen: dict[str, list] = {}
    probes = PROBES if loaded.hidden_size < 100 else PROBES[1::2]  # the 8M model: fewer, on a small CPU
    for n, (seqs, at) in enumerate(_compositions(probes)):
        for pooling in ("mean", "bos") if n < 12 else ("mean",):
            out = forward.embed(_pack(loaded, seqs), layers, pooling=pooling, per_token=True)
            got = [(out.pooled[layer][at], out.per_token[layer][at]) for layer in layers]
            first = seen.setdefault(f"{seqs[at]}-{pooling}", got)
            for (pooled, rows), (pooled0, rows0) in zip(got, first, strict=True):
                assert np.array_equal(pooled, pooled0) and np.array_equal(rows, rows0), (len(seqs[at]), len(seqs))
    hidden = forward.forward(_pack(loaded, [PROBES[2]]), layers)
    assert all(h.shape[0] == len(PROBES[2]) + 2 for h in hidden.values())  # no padding row comes back


def test_scores_are_bitwise_the_same_in_every_batch(model):
    loaded, forward = model
    if not forward.has_lm_head:
        pytest.skip("the dummy 8M model is loaded without its LM head")
    probe = PROBES[3]
    read = [0, 5, 64, 129]

    def scores(seqs, masked, at):
        batch = _pack(loaded, seqs, masked)
        rows = np.concatenate([batch.rows(i, read if i == at else [0]) for i in range(len(seqs))])
        out = forward.lm_log_probs(batch, rows).numpy()
        return out[at : at + len(read)]

    alone = scores([probe], [5], 0)
    np.testing.assert_allclose(np.exp(alone).sum(1), 1.0, rtol=1e-3)
    assert np.array_equal(scores([*MATES[:4], probe], [0, 1, None, 2, 5], 4), alone)
    assert np.array_equal(scores([probe, *MATES], [5] + [None] * len(MATES), 0), alone)


def test_graph_buckets_pad_without_moving_a_protein(model):
    from esm2cli.model.graphs import GraphRunner

    loaded, forward = model
    layers = (loaded.num_layers,)
    runner = GraphRunner(forward, layers, "mean", buckets=[512, 1024, 2048], max_seqs=16, per_token_modes=(True,))
    runner.warmup()
    for seqs, at in list(_compositions(PROBES[1::2])):
        batch = _pack(loaded, seqs)
        got = runner.embed(batch, per_token=True)
        want = forward.embed(batch, layers, per_token=True)
        assert np.array_equal(got.pooled[layers[0]], want.pooled[layers[0]])
        assert np.array_equal(got.per_token[layers[0]][at], want.per_token[layers[0]][at])
    assert runner.graph_batches == 12


# ---------------------------------------------------------------------------------------------------------
# On a CUDA device: flash varlen, tiled cuBLAS matmuls and the graph buckets keep it


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_cuda_forward_and_graphs_are_bitwise_batch_invariant(dtype):
    from esm2cli.config import ModelConfig
    from esm2cli.model.forward import PackedEsm2
    from esm2cli.model.graphs import GraphRunner
    from esm2cli.model.load import load_model
    from esm2cli.runtime.batching import token_buckets

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    loaded = load_model(ModelConfig(model="esm2_t12_35M", load_format="dummy", dtype=dtype), keep_reference=True)
    gpu = PackedEsm2.from_hf(loaded.reference.to("cuda"))
    layers = (gpu.num_layers,)
    runner = GraphRunner(gpu, layers, "mean", buckets=token_buckets(8192), max_seqs=64, per_token_modes=(True,))
    runner.warmup()
    seen: dict[str, np.ndarray] = {}
    for seqs, at in _compositions():
        batch = _pack(loaded, seqs)
        for out in (gpu.embed(batch, layers, per_token=True), runner.embed(batch, per_token=True)):
            got = np.concatenate([out.pooled[layers[0]][at][None], out.per_token[layers[0]][at]])
            first = seen.setdefault(seqs[at], got)
            assert np.array_equal(got, first), (dtype, len(seqs[at]), len(seqs))
    assert runner.capture == gpu.uses_varlen() and not runner.failed
