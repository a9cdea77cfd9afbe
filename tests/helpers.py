"""Helpers shared by test modules (fixtures stay in conftest.py): packing, random proteins, a tiny random ESM C
saved with transformers, transformers' ESM C one protein at a time, and inputs that stream (FIFOs, bash's <(...))."""

from __future__ import annotations

import asyncio
import os
import random
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from esm2cli.model.packed import PackedBatch

# Lengths chosen to mix: one attention group per length class, padding inside groups, a 1-residue protein.
MIXED_LENGTHS = [1, 5, 17, 40, 41, 120, 7, 300, 64]


def random_seqs(lengths: Sequence[int] = MIXED_LENGTHS, seed: int = 3) -> list[str]:
    """Random residue strings of the given lengths."""
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), n)) for n in lengths]


def pack(loaded, seqs: Sequence[str], masked=None, token_dropout: bool = True) -> PackedBatch:
    """Packs residue strings with a LoadedModel's tokens."""
    return PackedBatch.from_sequences(
        seqs, loaded.token_lut, cls_id=loaded.cls_id, eos_id=loaded.eos_id, mask_id=loaded.mask_id,
        token_dropout=token_dropout, masked=masked,
    )  # fmt: skip


def header_offsets(data: bytes) -> list[int]:
    """The byte offset of every record's '>' (a '>' opening a line), found straight in the file's bytes."""
    return [i for i in range(len(data)) if data[i : i + 1] == b">" and (i == 0 or data[i - 1 : i] == b"\n")]


def byte_shard_sizes(source: bytes | str | os.PathLike, count: int) -> list[int]:
    """Records per shard when shard i owns the records whose '>' lies in bytes [i*size/count, (i+1)*size/count)."""
    data = source if isinstance(source, bytes) else open(source, "rb").read()
    sizes = [0] * count
    for offset in header_offsets(data):
        sizes[next(i for i in range(count) if offset < (i + 1) * len(data) // count)] += 1
    return sizes


TINY_ESMC = dict(layers=3, hidden=64, heads=4, ffn=96)


def build_tiny_esmc(path, seed: int = 5, *, layers=3, hidden=64, heads=4, ffn=96, encoder_only=False) -> str:
    """Saves a small ESM C (transformers' EsmcForMaskedLM, or EsmcModel alone) with random weights.

    Weights are drawn wider than the default init and the norms moved off 1, so that different proteins
    differ clearly and a skipped or misplaced norm shows; every bias (the init's are zero) is drawn nonzero, so
    that a bias dropped by esm2cli's forward changes its numbers against transformers'.
    """
    from transformers import EsmcConfig, EsmcForMaskedLM, EsmcModel

    torch.manual_seed(seed)
    config = EsmcConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=ffn,
        initializer_range=0.1,
    )  # fmt: skip
    model = (EsmcModel if encoder_only else EsmcForMaskedLM)(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(path)
    return str(path)


class OneProteinAtATime:
    """A reference model's vectors of one protein, from ``hidden(seq, layer)``: (tokens, H) with <cls> first."""

    def hidden(self, seq: str, layer: int) -> np.ndarray:
        raise NotImplementedError

    def mean(self, seq: str, layer: int = -1) -> np.ndarray:
        return self.hidden(seq, layer)[1 : len(seq) + 1].mean(0)

    def bos(self, seq: str, layer: int = -1) -> np.ndarray:
        return self.hidden(seq, layer)[0]

    def per_token(self, seq: str, layer: int = -1) -> np.ndarray:
        return self.hidden(seq, layer)[1 : len(seq) + 1]


class EsmcReference(OneProteinAtATime):
    """transformers' own ESM C, each protein alone, tokenised by its EsmcTokenizer."""

    def __init__(self, model_dir: str):
        from transformers import EsmcForMaskedLM, EsmcTokenizer

        self.tokenizer = EsmcTokenizer()
        self.model = EsmcForMaskedLM.from_pretrained(model_dir).eval()
        self.num_layers = self.model.config.num_hidden_layers

    def _ids(self, seq: str, masked: int | None = None) -> torch.Tensor:
        ids = self.tokenizer(seq, return_tensors="pt")["input_ids"]
        if masked is not None:
            ids[0, masked + 1] = self.tokenizer.mask_token_id
        return ids

    def hidden(self, seq: str, layer: int) -> np.ndarray:
        with torch.no_grad():
            states = self.model.esmc(input_ids=self._ids(seq), output_hidden_states=True).hidden_states
        return states[layer % (self.num_layers + 1)][0].numpy()

    def log_probs(self, seq: str, masked: int | None = None) -> np.ndarray:
        """(residues, 64) log-softmax of the LM head at each residue, with residue ``masked`` (0-based) masked."""
        with torch.no_grad():
            logits = self.model(input_ids=self._ids(seq, masked)).logits[0, 1 : len(seq) + 1]
        return torch.log_softmax(logits, dim=-1).numpy()

    def token(self, residue: str) -> int:
        return self.tokenizer.convert_tokens_to_ids(residue)


TINY = dict(layers=3, hidden=32, heads=4)


def assert_biases_nonzero(module: torch.nn.Module, expected: set[str]) -> None:
    """A zero bias hides a forward that drops it: every comparison with transformers would still pass."""
    biases = {name: p for name, p in module.named_parameters() if name.endswith(("_b", "bias"))}
    assert biases.keys() == expected
    assert all(bool((p != 0).all()) for p in biases.values()), sorted(n for n, p in biases.items() if (p == 0).any())


def build_tiny_esm2(path, seed: int = 7) -> str:
    """Saves a small ESM-2 (real architecture and tokenizer, random weights) with save_pretrained.

    The weights are drawn wider than the default init so that embeddings of different sequences
    differ clearly and a comparison can fail; every bias (the init's are zero) is drawn nonzero for the same
    reason: a bias dropped by esm2cli's forward or its LM head changes its numbers against transformers'.
    """
    from transformers import EsmForMaskedLM

    from esm2cli.model.architecture import bundled_tokenizer, esm2_architecture

    torch.manual_seed(seed)
    model = EsmForMaskedLM(esm2_architecture(**TINY, initializer_range=0.2))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or "layer_norm" in name:
                p.add_(torch.randn_like(p) * 0.2)  # non-trivial norms, so that a skipped norm shows
            elif name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.05)
        # The LM head's output bias, wider: a score test fails clearly when it is dropped.
        model.lm_head.bias.add_(torch.randn_like(model.lm_head.bias) * 0.5)
    model.save_pretrained(path)
    bundled_tokenizer().save_pretrained(path)
    return str(path)


FAIR_ESM_NAME = "esm2_t3_tiny_UR50D"  # fair-esm picks its ESM-2 loader by the "esm2" prefix of the file name


def write_fair_esm_checkpoint(
    folder: Path, name: str = FAIR_ESM_NAME, layers: int = 3, hidden: int = 32, heads: int = 4, seed: int = 3,
    regression: bool = True,
) -> Path:  # fmt: skip
    """Saves a random ESM-2 built with fair-esm's own ESM2 class, in the layout of fair-esm's downloads.

    ``{"model": encoder.sentence_encoder.* and encoder.lm_head.* weights, "cfg": {"model": Namespace}}``,
    and ``<name>-contact-regression.pt`` beside it, as fair-esm's hub loader expects.
    """
    import argparse

    from esm.model.esm2 import ESM2

    torch.manual_seed(seed)
    model = ESM2(num_layers=layers, embed_dim=hidden, attention_heads=heads, alphabet="ESM-1b", token_dropout=True)
    with torch.no_grad():  # wider than the default init, so that different sequences differ clearly
        for pname, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.2 if "layer_norm" in pname else 0.05))
    state = model.state_dict()
    weights = {}
    for key, value in state.items():
        if key.startswith("contact_head."):
            continue
        prefix = "encoder." if key.startswith("lm_head.") else "encoder.sentence_encoder."
        weights[prefix + key] = value.clone()
    args = argparse.Namespace(
        _name="esm2", encoder_layers=layers, encoder_embed_dim=hidden, encoder_ffn_embed_dim=4 * hidden,
        encoder_attention_heads=heads, token_dropout=True, attention_dropout=0.0, dropout=0.0, max_positions=1024,
    )  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.pt"
    torch.save({"model": weights, "cfg": {"model": args, "task": argparse.Namespace(_name="masked_lm")},
                "args": None, "extra_state": {"epoch": 1}}, path)  # fmt: skip
    if regression:
        contact = {k: v.clone() for k, v in state.items() if k.startswith("contact_head.")}
        torch.save({"model": contact}, folder / f"{name}-contact-regression.pt")
    return path


def embed_cli(fasta, out, model, *extra, check: bool = False):
    """``esm2cli embed FASTA -o OUT -m MODEL`` in float32 on the CPU, through Click; ``check``: it must succeed."""
    from click.testing import CliRunner

    from esm2cli.cli import cli

    args = ["embed", str(fasta), "-o", str(out), "-m", model, "--dtype", "float32", "--devices", "cpu"]
    result = CliRunner().invoke(cli, [*args, *map(str, extra)])
    if check:
        assert result.exit_code == 0, result.output
    return result


def embed_mean_and_bos(root, records: Sequence[tuple[str, str]], model):
    """``root/in.fasta`` of ``records`` and its outputs by ``model`` (embed_cli): out.parquet of mean pooling and
    bos.parquet of bos pooling, two identities; returns ``root``."""
    fasta = write_fasta(root / "in.fasta", records)
    embed_cli(fasta, root / "out.parquet", model, check=True)
    embed_cli(fasta, root / "bos.parquet", model, "--pooling", "bos", check=True)
    return root


def write_fasta(path, records: Sequence[tuple[str, str]], width: int = 60) -> str:
    with open(path, "w", encoding="utf-8") as out:
        for rec_id, seq in records:
            out.write(f">{rec_id}\n")
            out.writelines(seq[i : i + width] + "\n" for i in range(0, len(seq), width))
    return str(path)


@dataclass
class FakeDevice:
    name: str


class FakeEmbedder:
    """Sets v[0] = len(seq), so order and padding bugs show; records which batches it ran."""

    def __init__(self, name: str, fail_on: str | None = None, delay: float = 0.0, hidden: int = 4, start=None):
        """``start``: a threading.Barrier its first batch waits at, so that every replica holds a batch before
        any finishes one (on a loaded machine a worker's thread may start after the others ran everything)."""
        self.device = FakeDevice(name)
        self.fail_on = fail_on
        self.delay = delay
        self.hidden = hidden
        self.start = start
        self.seen: list[list[str]] = []

    def embed_batch(self, seqs):
        import time

        from esm2cli.io.schema import Embeddings

        if self.start is not None:
            start, self.start = self.start, None
            start.wait(10)
        if self.delay:
            time.sleep(self.delay)
        if self.fail_on is not None and self.fail_on in seqs:
            raise RuntimeError(f"boom on {self.device.name}")
        self.seen.append(list(seqs))
        out = np.zeros((len(seqs), self.hidden), dtype=np.float32)
        out[:, 0] = [len(s) for s in seqs]
        out[:, 1] = [sum(map(ord, s)) % 1000 for s in seqs]
        return Embeddings({0: out}, {})


def random_protein(n: int) -> str:
    """A random protein of ``n`` residues, the same for the same ``n``."""
    rng = random.Random(n)
    return "".join(rng.choice("ACDEFGHIKLMNPQRSTVWY") for _ in range(n))


def fed_fifo(path, data: bytes) -> threading.Thread:
    """Makes a named FIFO at ``path`` and a thread that writes ``data`` into it once (its open waits for a reader)."""
    os.mkfifo(path)

    def feed():
        with open(path, "wb") as out:
            out.write(data)

    thread = threading.Thread(target=feed, daemon=True)
    thread.start()
    return thread


def run_esm2cli(*args, piped: dict[str, str] | None = None, input: str | None = None,
                timeout: float = 120) -> subprocess.CompletedProcess:  # fmt: skip
    """Runs ``python -m esm2cli ARGS`` in a subprocess that must end within ``timeout`` (a hang fails the test).

    Args:
        piped: Arguments to replace by a bash process substitution: ``{"@FASTA@": path}`` passes ``<(cat path)``
            (/dev/fd/63, a pipe) where the argument @FASTA@ stands.
        input: Text on stdin.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("ESM2CLI_")}
    command = [sys.executable, "-m", "esm2cli", *map(str, args)]
    if piped:
        line = shlex.join(command)
        for placeholder, path in piped.items():
            line = line.replace(placeholder, f"<(cat {shlex.quote(str(path))})")
        command = ["bash", "-c", line]
    return subprocess.run(command, input=input, capture_output=True, text=True, env=env, timeout=timeout)


def within(seconds: float, fn, *args):
    """fn(*args) on a thread that must finish in time: a blocking open fails the test instead of hanging it."""
    result: list = []
    thread = threading.Thread(target=lambda: result.append(fn(*args)), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{getattr(fn, '__name__', fn)} blocked for {seconds} s"
    return result[0]


def eventually(condition, deadline: float = 30, what: str = ""):
    """Polls condition() until it is truthy and returns that value; fails after ``deadline`` s, a bound generous
    enough that only a broken behaviour reaches it (a loaded machine is slow, never that slow)."""
    end, pause = time.monotonic() + deadline, 0.001
    while not (value := condition()):
        assert time.monotonic() < end, f"not within {deadline} s: {what or getattr(condition, '__name__', condition)}"
        time.sleep(pause)
        pause = min(pause * 2, 0.05)  # quick for what is almost there, light on the CPU for what takes a while
    return value


async def eventually_async(condition, deadline: float = 30, what: str = ""):
    """eventually() inside an event loop: polls between the loop's other tasks, which it must not block."""
    end = time.monotonic() + deadline
    while not (value := condition()):
        assert time.monotonic() < end, f"not within {deadline} s: {what or getattr(condition, '__name__', condition)}"
        await asyncio.sleep(0.001)
    return value


def write_like(template, path, vectors, *, ids=None, row_group_size: int = 1024) -> str:
    """Writes ``vectors`` as an esm2cli output shaped and labelled as ``template`` (a real embed output): its schema
    and metadata (so its identity), with rows of synthetic ids, lengths and these vectors; a quick large input."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from esm2cli.io.schema import WRITE_OPTIONS

    schema = pq.read_schema(template)
    n = len(vectors)
    ids = ids if ids is not None else [f"s{i}" for i in range(n)]
    hidden = schema.field("embedding").type.list_size
    flat = pa.array(np.ascontiguousarray(vectors, np.float32).ravel(), pa.float32())
    columns = {
        "id": pa.array(ids, pa.string()), "description": pa.array([f"{i} synthetic" for i in ids], pa.string()),
        "length": pa.array(np.arange(n) % 500 + 20, pa.int32()), "truncated": pa.array(np.zeros(n, bool)),
        "windows": pa.array(np.ones(n, np.int32)), "sequence_sha256": pa.array([None] * n, pa.string()),
        "embedding": pa.FixedSizeListArray.from_arrays(flat, hidden),
    }  # fmt: skip
    table = pa.table([columns[f.name] for f in schema], schema=schema)
    pq.write_table(table, path, row_group_size=row_group_size, **WRITE_OPTIONS)
    return str(path)
