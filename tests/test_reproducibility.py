"""The same protein, the same numbers, end to end: bit for bit (not within a tolerance) whatever the batch limits,
the order of the FASTA, the device count, a resume, or the way in (embed, serve over HTTP, the Python API, score).

For one device type, dtype and torch version (docs/performance.md, "Reproducibility").
"""

from __future__ import annotations

import random
import threading

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from live_server import live_server, wait_healthy

from esm2cli.cli import cli
from helpers import write_fasta

LENGTHS = [1, 4, 9, 17, 30, 31, 33, 60, 64, 100, 130, 250, 7, 45, 12, 300, 80, 2, 21, 160]


def _records(seed: int = 5) -> list[tuple[str, str]]:
    rng = np.random.default_rng(seed)
    return [(f"p{i}", "".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), n))) for i, n in enumerate(LENGTHS)]


RECORDS = _records()


def _embed(tmp_path, name, records, *args) -> dict[str, np.ndarray]:
    fasta = write_fasta(tmp_path / f"{name}.fa", records)
    out = tmp_path / f"{name}.parquet"
    result = CliRunner().invoke(cli, ["embed", fasta, "-o", str(out), *map(str, args)])
    assert result.exit_code == 0, result.output
    table = pq.read_table(out)
    return dict(zip(table["id"].to_pylist(), np.array(table["embedding"].to_pylist(), dtype=np.float32), strict=True))


def _assert_bitwise(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    moved = [k for k in want if not np.array_equal(got[k], want[k])]
    assert not moved, (
        f"{len(moved)} proteins moved, e.g. {moved[0]}: max |diff| {np.abs(got[moved[0]] - want[moved[0]]).max()}"
    )


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def clean(request, tiny_model_dir, tmp_path_factory):
    """The clean run's vectors: the FASTA as it is, the default limits, one CPU device."""
    model = ["-m", tiny_model_dir, "--dtype", request.param, "--devices", "cpu"]
    return model, _embed(tmp_path_factory.mktemp("clean"), "clean", RECORDS, *model)


def test_other_limits_order_and_single_proteins_give_the_clean_vectors(tmp_path, clean):
    model, want = clean
    shuffled = RECORDS[:]
    random.Random(3).shuffle(shuffled)
    _assert_bitwise(_embed(tmp_path, "shuffled", shuffled, *model, "--max-tokens", "1024", "--batch-size", "3"), want)
    _assert_bitwise(_embed(tmp_path, "small", shuffled, *model, "--max-tokens", "1024", "--chunk-size", "7"), want)
    _assert_bitwise(_embed(tmp_path, "one", RECORDS, *model, "--batch-size", "1"), want)
    for rec in RECORDS[::6]:  # a FASTA of one protein
        _assert_bitwise(_embed(tmp_path, f"single-{rec[0]}", [rec], *model), {rec[0]: want[rec[0]]})


def test_four_simulated_devices_and_shards_give_the_clean_vectors(tmp_path, clean):
    model, want = clean
    four = [a if a != "cpu" else "sim:4" for a in model]
    _assert_bitwise(_embed(tmp_path, "four", RECORDS, *four, "--batch-size", "2"), want)
    parts: dict[str, np.ndarray] = {}
    for shard in range(3):
        parts |= _embed(tmp_path, f"shard{shard}", RECORDS, *model, "--shard-index", shard, "--shard-count", 3)
    _assert_bitwise(parts, want)


def test_a_resumed_run_equals_the_clean_one(tmp_path, clean):
    from esm2cli.config import BatchConfig, EmbedConfig, InputConfig, ModelConfig
    from esm2cli.errors import Interrupted
    from esm2cli.jobs.pipeline import embed_fasta

    model, want = clean
    fasta = write_fasta(tmp_path / "in.fa", RECORDS)
    out = tmp_path / "resumed.parquet"
    configs = dict(
        model=ModelConfig(model=model[1], dtype=model[3], devices="cpu"), embed=EmbedConfig(),
        batch=BatchConfig(chunk_size=4, batch_size=3), inputs=InputConfig(),
    )  # fmt: skip

    def interrupt_after_eight(total, residues=None):
        seen = [0]

        def update(rows, residues):
            seen[0] += rows
            if seen[0] >= 8:
                raise Interrupted(2)

        return update

    with pytest.raises(Interrupted):
        embed_fasta(fasta, out, progress_factory=interrupt_after_eight, **configs)
    assert not out.exists()
    embed_fasta(fasta, out, **configs)
    table = pq.read_table(out)
    got = dict(zip(table["id"].to_pylist(), np.array(table["embedding"].to_pylist(), dtype=np.float32), strict=True))
    _assert_bitwise(got, want)


def test_the_python_api_gives_the_clean_vectors(clean):
    from esm2cli import Embedder

    model, want = clean
    ids = [rec_id for rec_id, _ in RECORDS]
    with Embedder(model[1], devices="cpu", dtype=model[3], batch_size=5) as embedder:
        together = embedder.embed([seq for _, seq in RECORDS])
        _assert_bitwise(dict(zip(ids, together, strict=True)), want)
        alone = {rec_id: embedder.embed(seq) for rec_id, seq in RECORDS[::4]}
    _assert_bitwise(alone, {k: want[k] for k in alone})


def test_the_server_gives_the_clean_vectors_alone_and_batched(clean):
    from esm2cli.config import EmbedConfig, ModelConfig, ServeConfig
    from esm2cli.runtime.engine import build_engine
    from esm2cli.serve.app import create_app

    model, want = clean
    config = ModelConfig(model=model[1], devices="cpu", dtype=model[3])
    embed = EmbedConfig()
    app = create_app(ServeConfig(), config, embed, loader=lambda: build_engine(config, embed))
    got: dict[str, np.ndarray] = {}
    with live_server(app) as url, httpx.Client(base_url=url, timeout=120) as client:
        wait_healthy(client)

        def one(rec_id: str, seq: str) -> None:
            with httpx.Client(base_url=url, timeout=120) as own:
                answer = own.post("/predict", json={"sequence": seq, "id": rec_id})
            assert answer.status_code == 200, answer.text
            got[rec_id] = np.array(answer.json()["embedding"], dtype=np.float32)

        threads = [threading.Thread(target=one, args=rec) for rec in RECORDS[:8]]  # the batcher mixes them
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for rec_id, seq in RECORDS[8:11]:
            one(rec_id, seq)
        answer = client.post("/predict/batch", json={"sequences": [{"sequence": s, "id": i} for i, s in RECORDS[11:]]})
        assert answer.status_code == 200, answer.text
        for item in answer.json()["results"]:
            got[item["id"]] = np.array(item["embedding"], dtype=np.float32)
    _assert_bitwise(got, want)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_scores_do_not_move_with_the_batches(tmp_path, tiny_model_dir, dtype):
    fasta = write_fasta(tmp_path / "wt.fa", RECORDS[5:12])

    def pll(name, *args):
        out = tmp_path / f"{name}.parquet"
        args = ["score", fasta, "-o", str(out), "-m", tiny_model_dir, "--dtype", dtype, "--pll", *map(str, args)]
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, result.output
        return pq.read_table(out)["pll"].to_pylist()

    alone = pll("alone", "--batch-size", "1")
    assert pll("packed", "--max-tokens", "4096", "--devices", "sim:3") == alone
    assert pll("small", "--max-tokens", "1024", "--batch-size", "5") == alone


def test_the_8m_architecture_in_float32_gives_the_clean_vectors(tmp_path):
    model = ["-m", "esm2_t6_8M", "--load-format", "dummy", "--dtype", "float32", "--devices", "cpu"]
    records = RECORDS[::2]
    want = _embed(tmp_path, "clean", records, *model)
    shuffled = records[::-1]
    _assert_bitwise(_embed(tmp_path, "shuffled", shuffled, *model, "--max-tokens", "1024", "--batch-size", "3"), want)
    _assert_bitwise(_embed(tmp_path, "one", records, *model, "--batch-size", "1"), want)


def test_the_file_records_what_bit_identity_holds_for(tmp_path, tiny_model_dir):
    import torch

    from esm2cli.io.parquet import read_metadata

    _embed(tmp_path, "meta", RECORDS[:3], "-m", tiny_model_dir, "--dtype", "bfloat16", "--devices", "sim:2")
    meta = read_metadata(tmp_path / "meta.parquet")
    assert meta["dtype"] == "bfloat16"
    from esm2cli.model.invariant import FORWARD_REVISION

    want = {"torch": torch.__version__, "device_type": ["cpu"], "batch_invariant": True}
    assert meta["numerics"] == {**want, "forward_revision": FORWARD_REVISION}
