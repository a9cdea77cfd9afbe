"""The forward's numbers pinned to FORWARD_REVISION: a change of arithmetic without a bump fails here.

Stored files carry FORWARD_REVISION in their identity, so that vectors computed one way are never merged with
vectors computed another way. Nothing else notices a change of the arithmetic (another pooling tree, another
tiling, another order of a sum) that keeps the numbers close: every other test compares with a tolerance or
against the forward itself. This one hashes the tiny models' float32 outputs for fixed inputs and compares the
hash with the one recorded in forward_digests.json for this torch, this FORWARD_REVISION and this CPU.

The key names the CPU because the digest depends on it: MKL and oneDNN pick their kernels by instruction set
(AVX2 or AVX512, and for half precision AVX512-BF16/FP16 or AMX tiles, which accumulate in another order), and
the vectorised exp/log/erf of softmax and GELU by ATen's CPU capability. The thread count does not enter (the
matmuls run on fixed tiles; checked below with 1 and 2 threads).
"""

from __future__ import annotations

import hashlib
import json
import platform
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from esm2cli.config import ModelConfig
from esm2cli.model.invariant import FORWARD_REVISION
from esm2cli.model.load import load_model
from helpers import TINY, TINY_ESMC, pack, random_seqs

DIGESTS = Path(__file__).with_name("forward_digests.json")
# CPU features that change which half-precision gemm kernel oneDNN runs (their sums round in another order).
HALF_KERNEL_FLAGS = ("avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16")
MODELS = [("esm2", "float32"), ("esm2", "bfloat16"), ("esm2", "float16"), ("esmc", "float32"), ("esmc", "bfloat16")]
SEQS = random_seqs([1, 9, 40, 130, 300], seed=17)  # 300 residues: more than one matmul tile and pooling level


def cpu_key() -> str:
    """The CPU as the kernels see it: vendor, ATen's capability (DEFAULT, AVX2, AVX512), half-precision features."""
    vendor, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        first = cpuinfo.read_text().split("\n\n")[0].splitlines()  # the first processor's fields
        fields = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in first)}
        vendor = fields.get("vendor_id", vendor)
        flags = set(fields.get("flags", "").split())
    return " ".join([vendor, torch.backends.cpu.get_cpu_capability(), *sorted(flags & set(HALF_KERNEL_FLAGS))])


KEY = f"torch {torch.__version__}, FORWARD_REVISION {FORWARD_REVISION}, {cpu_key()}"


def _fill(model: torch.nn.Module) -> None:
    """Every parameter drawn by numpy from a seed of its own name (not torch's init, not the order of modules):
    norm scales 1 + N(0, 0.2), everything else, biases included, N(0, 0.2)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            rng = np.random.default_rng(zlib.crc32(name.encode()))
            values = torch.from_numpy(rng.standard_normal(tuple(p.shape)) * 0.2).float()
            p.copy_(values + 1 if p.ndim == 1 and "norm" in name.lower() and name.endswith("weight") else values)


def _save(family: str, path: Path) -> str:
    model: torch.nn.Module
    if family == "esm2":
        from transformers import EsmForMaskedLM

        from esm2cli.model.architecture import bundled_tokenizer, esm2_architecture

        model = EsmForMaskedLM(esm2_architecture(**TINY))
        bundled_tokenizer().save_pretrained(path)
    else:
        from transformers import EsmcConfig, EsmcForMaskedLM

        t = TINY_ESMC
        config = EsmcConfig(
            hidden_size=t["hidden"], num_hidden_layers=t["layers"], num_attention_heads=t["heads"],
            intermediate_size=t["ffn"],
        )  # fmt: skip
        model = EsmcForMaskedLM(config)
    _fill(model)
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folders = {family: _save(family, tmp_path_factory.mktemp(family)) for family in ("esm2", "esmc")}
    return {
        (family, dtype): load_model(ModelConfig(model=folders[family], dtype=dtype), lm_head=True)
        for family, dtype in MODELS
    }


def _outputs(loaded):
    """Every number the forward gives a file or a score, in a fixed order: per layer mean and <cls> vectors and
    residue rows, then the LM head's log-probabilities at masked and unmasked residues."""
    forward = loaded.forward
    layers = (0, 1, loaded.num_layers)
    batch = pack(loaded, SEQS)
    for pooling in ("mean", "bos"):
        out = forward.embed(batch, layers, pooling=pooling, per_token=True)
        for layer in layers:
            yield out.pooled[layer]
            yield from out.per_token[layer]
    masked = [0, 4, 20, 64, 299]
    scored = pack(loaded, SEQS, masked=masked)
    rows = np.concatenate([scored.rows(i, [0, at]) for i, at in enumerate(masked)])
    yield forward.lm_log_probs(scored, rows).numpy()


def _digest(loaded) -> str:
    sha = hashlib.sha256()
    for array in _outputs(loaded):
        sha.update(np.ascontiguousarray(array, dtype=np.float32).tobytes())
    return sha.hexdigest()


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_the_forward_computes_what_its_revision_recorded(models, threads):
    by_threads = []
    for count in (1, 2):
        torch.set_num_threads(count)
        by_threads.append({f"{family}-{dtype}": _digest(models[family, dtype]) for family, dtype in MODELS})
    got = by_threads[0]
    assert by_threads[1] == got, "the forward's numbers depend on the thread count"
    recorded = json.loads(DIGESTS.read_text())["digests"].get(KEY)
    if recorded is None:
        pytest.skip(
            f"no forward digest recorded for {KEY!r}: if this torch and CPU compute the forward as intended "
            f'(the other tests pass), record it in {DIGESTS.name} under "digests": {json.dumps({KEY: got})}'
        )
    changed = sorted(name for name in got if got[name] != recorded.get(name))
    assert not changed, (
        f"the forward's arithmetic changed for {', '.join(changed)} under {KEY!r}: bump FORWARD_REVISION "
        f"(esm2cli/model/invariant.py) and record the new digests under the new key, or undo the change"
    )
