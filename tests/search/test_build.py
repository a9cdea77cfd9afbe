"""Building a database: shard by shard as whole, already complete, another build refused or replaced, bad inputs
refused with nothing written, a killed build resumed, the E-values' null fitted per shard and summed."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from esm2cli.config import IndexConfig, ShardConfig
from esm2cli.errors import ConfigError, InputError, OutputExistsError, OutputLockedError
from esm2cli.io.lock import OutputLock
from esm2cli.search import manifest
from esm2cli.search.build import build_index, shard_batches
from esm2cli.search.index import Index
from esm2cli.search.vectors import open_inputs, read_batches
from searchdata import clustered, flip_middle, unit

FLAT = IndexConfig(kind="flat", decoys=0)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def two_inputs(synthetic):
    """4,500 unit vectors in two files of row groups of 700: shard bounds fall inside files and row groups."""
    vectors = unit(np.random.default_rng(11).standard_normal((4500, 32)))
    first = synthetic("a.parquet", vectors[:3000], ids=[f"a{i}" for i in range(3000)], row_group_size=700)
    second = synthetic("b.parquet", vectors[3000:], ids=[f"b{i}" for i in range(1500)], row_group_size=700)
    return [first, second], vectors


def _build_shards(inputs, db, count, config=FLAT, **kwargs):
    for i in range(count):
        build_index(inputs, db, config, shard=ShardConfig(index=i, count=count), **kwargs)


def _hits(index, queries, k=10):
    return [[(h.target, h.score, h.rank) for h in row] for row in index.search_vectors(queries, k)]


def test_a_database_built_shard_by_shard_answers_as_one_built_whole(two_inputs, tmp_path):
    inputs, vectors = two_inputs
    build_index(inputs, tmp_path / "whole", FLAT)
    _build_shards(inputs, tmp_path / "sharded", 3)
    whole, sharded = Index.open(tmp_path / "whole"), Index.open(tmp_path / "sharded")
    queries = unit(np.random.default_rng(12).standard_normal((30, 32)))
    assert _hits(whole, queries) == _hits(sharded, queries)
    assert sharded.size == whole.size == 4500 and len(sharded.manifest["shards"]) == 3
    joined = b"".join(
        open(tmp_path / "sharded" / manifest.shard_name(i, 3) / "vectors.f32", "rb").read() for i in range(3)
    )
    assert joined == open(tmp_path / "whole" / manifest.shard_name(0, 1) / "vectors.f32", "rb").read()
    ids = pq.read_table(tmp_path / "sharded" / manifest.shard_name(1, 3) / "ids.parquet")
    assert ids["id"].to_pylist() == [f"a{i}" for i in range(1500, 3000)]


def test_shard_slices_are_contiguous_and_complete(two_inputs):
    inputs, _ = two_inputs
    sources = open_inputs(inputs)
    every = list(read_batches(sources))
    sliced = list(shard_batches(sources, 2900, 3800))
    assert [i for b in sliced for i in b.ids] == [i for b in every for i in b.ids][2900:3800]
    want = np.concatenate([b.vectors for b in every])[2900:3800]
    np.testing.assert_array_equal(np.concatenate([b.vectors for b in sliced]), want)


def test_a_rerun_is_already_complete_and_touches_nothing(two_inputs, tmp_path):
    inputs, _ = two_inputs
    db = tmp_path / "db"
    first = build_index(inputs, db, FLAT)
    record = (db / "manifest.json").read_bytes()
    stamp = os.stat(db / manifest.shard_name(0, 1) / "vectors.f32").st_mtime_ns
    again = build_index(inputs, db, FLAT)
    assert not first.already_complete and again.already_complete
    assert os.stat(db / manifest.shard_name(0, 1) / "vectors.f32").st_mtime_ns == stamp
    assert (db / "manifest.json").read_bytes() == record


def test_another_build_is_refused_by_name_then_replaced_with_overwrite(two_inputs, tmp_path):
    inputs, _ = two_inputs
    db = tmp_path / "db"
    build_index(inputs, db, FLAT)
    with pytest.raises(OutputExistsError, match=r"another build .*kind was 'flat', now 'hnsw'.*--overwrite"):
        build_index(inputs, db, IndexConfig(kind="hnsw", decoys=0))
    with pytest.raises(OutputExistsError, match=r"inputs changed"):
        build_index(inputs[:1], db, FLAT)
    assert Index.open(db).size == 4500  # the refusals changed nothing
    build_index(inputs, db, FLAT, shard=ShardConfig(index=0, count=2), overwrite=True)
    assert sorted(manifest.shard_folders(str(db))) == [manifest.shard_name(0, 2)]  # the old build's shard pruned
    with pytest.raises(InputError, match=r"1 of 2 shards are not built: 1"):
        Index.open(db)
    build_index(inputs, db, FLAT, shard=ShardConfig(index=1, count=2))
    assert Index.open(db).size == 4500


def test_bad_inputs_are_refused_by_name_and_nothing_is_written(embedded, synthetic, tmp_path):
    good = synthetic("good.parquet", unit(np.random.default_rng(1).standard_normal((50, 32))))
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"id": ["a"]}), plain)
    empty = synthetic("empty.parquet", np.zeros((0, 32), np.float32))
    damaged = synthetic("damaged.parquet", unit(np.random.default_rng(2).standard_normal((300, 32))))
    flip_middle(damaged)
    cases = [
        ([good, embedded / "bos.parquet"], r"bos.parquet: vectors of another run .*pooling was 'mean', now 'bos'"),
        ([plain], r"plain.parquet: not an esm2cli output"),
        ([empty], r"empty.parquet: holds no proteins"),
        ([damaged], r"damaged.parquet is damaged \(a Parquet page fails its checksum\)"),
    ]
    for inputs, message in cases:
        db = tmp_path / "db"
        with pytest.raises(InputError, match=message):
            build_index(inputs, db, FLAT)
        left = os.listdir(db) if db.exists() else []
        assert "manifest.json" not in left and not manifest.shard_folders(str(db)), left
        assert not [name for name in left if name.endswith(".tmp")], left


def test_an_ivf_pq_shard_needs_the_shared_quantizer_trained_first(tmp_path, synthetic):
    source = synthetic("c.parquet", clustered(3000, seed=3))
    config = IndexConfig(kind="ivf-pq", decoys=0)
    with pytest.raises(ConfigError, match=r"trained.faiss: missing.*--train-only"):
        build_index([source], tmp_path / "db", config, shard=ShardConfig(index=0, count=2))
    train_only = IndexConfig(kind="ivf-pq", decoys=0, train_only=True)
    trained = build_index([source], tmp_path / "db", train_only)
    assert trained.part == "trained.faiss" and not trained.already_complete
    assert build_index([source], tmp_path / "db", train_only).already_complete
    _build_shards([source], tmp_path / "db", 2, config)
    index = Index.open(tmp_path / "db")
    assert index.kind == "ivf-pq" and index.size == 3000
    with pytest.raises(ConfigError, match=r"--train-only trains the quantizer IVF-PQ shards share"):
        build_index([source], tmp_path / "db2", IndexConfig(kind="flat", train_only=True))


def test_a_second_build_of_one_shard_is_refused_naming_the_first(two_inputs, tmp_path):
    inputs, _ = two_inputs
    db = tmp_path / "db"
    os.makedirs(db)
    with OutputLock(str(db / manifest.shard_name(0, 1))):
        with pytest.raises(OutputLockedError, match=rf"shard-00000-of-00001 is being written .*pid {os.getpid()}"):
            build_index(inputs, db, FLAT)
    assert not (db / "manifest.json").exists()


def _run_index(inputs, db):
    env = {**os.environ, "PYTHONPATH": ROOT}
    command = [sys.executable, "-m", "esm2cli", "index", *map(str, inputs), "-o", str(db), "--kind", "flat",
               "--decoys", "0", "-q"]  # fmt: skip
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _kill_mid_build(inputs, db, reap) -> None:
    """SIGKILLs a build once its shard's vectors file is being written; tries again should one finish first."""
    for _ in range(5):
        proc = _run_index(inputs, db)
        reap(proc)
        while proc.poll() is None:
            tmp = [e for e in os.listdir(db) if e.endswith(".tmp")] if db.exists() else []
            if tmp and os.path.exists(db / tmp[0] / "vectors.f32") and os.path.getsize(db / tmp[0] / "vectors.f32"):
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                return
            time.sleep(0.001)
        assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
        shutil.rmtree(db)  # it finished first: start again from nothing
    pytest.fail("the build always finished before it could be killed")


@pytest.mark.slow
def test_a_killed_build_leaves_no_complete_looking_database_and_a_rerun_completes_it(synthetic, tmp_path, reap):
    vectors = np.random.default_rng(5).standard_normal((200_000, 32)).astype(np.float32)
    source = synthetic("big.parquet", vectors, row_group_size=2000)
    db = tmp_path / "db"
    _kill_mid_build([source], db, reap)
    with pytest.raises(InputError, match=r"manifest.json: missing"):
        Index.open(db)
    assert any(name.endswith(".tmp") for name in os.listdir(db))  # the killed build's folder, unfinished
    proc = _run_index([source], db)
    reap(proc)
    assert proc.wait(timeout=120) == 0, proc.stderr.read()
    assert not any(name.endswith(".tmp") for name in os.listdir(db))  # swept
    build_index([source], tmp_path / "fresh", FLAT)
    for name in ("vectors.f32", "ids.parquet"):
        shard = manifest.shard_name(0, 1)
        assert (db / shard / name).read_bytes() == (tmp_path / "fresh" / shard / name).read_bytes()
    assert Index.open(db).size == 200_000


def test_evalues_are_each_shards_null_at_its_size_summed(fake_null, two_inputs, tmp_path, tiny_model_dir):
    inputs, vectors = two_inputs
    config = IndexConfig(kind="flat", decoys=6, devices="cpu")
    _build_shards(inputs, tmp_path / "db", 2, config)
    index = Index.open(tmp_path / "db")
    assert index.has_evalues
    assert [fit[0].shape for fit in fake_null.fits] == [(6, fake_null.DECOY_TOP_K)] * 2
    assert [fit[1] for fit in fake_null.fits] == [2250, 2250]
    # The decoys were embedded with the inputs' model and searched against the shard's own rows.
    from esm2cli.api import Embedder

    with Embedder(tiny_model_dir, devices="cpu", dtype="float32") as embedder:
        decoys = unit(embedder.embed(fake_null.decoy_sequences(None, None, 6, 0)[0]))
    best = (decoys.astype(np.float64) @ vectors[:2250].astype(np.float64).T).max(axis=1)
    np.testing.assert_allclose(fake_null.fits[0][0][:, 0], best, atol=1e-5)
    models = [fake_null.NullModel.from_json(manifest.read_json(str(tmp_path / "db" / manifest.shard_name(i, 2) /
                                                                   "null.json"))) for i in range(2)]  # fmt: skip
    hits = index.search_vectors(vectors[:5], 3)
    for row in hits:
        for hit in row:
            want = sum(model.evalue(np.array([hit.score]), 2250)[0] for model in models)
            assert hit.evalue == pytest.approx(want, rel=1e-9)
    cut = index.search_vectors(vectors[:5], 3, max_evalue=hits[0][1].evalue)
    assert [h.target for h in cut[0]] == [h.target for h in hits[0][:2]]


def test_without_a_null_model_the_database_has_no_evalues(two_inputs, tmp_path):
    inputs, vectors = two_inputs
    build_index(inputs, tmp_path / "db", FLAT)
    index = Index.open(tmp_path / "db")
    assert not index.has_evalues and index.search_vectors(vectors[:1], 2)[0][0].evalue is None
    with pytest.raises(ConfigError, match="no null model"):
        index.search_vectors(vectors[:1], 2, max_evalue=1.0)


def test_a_folder_of_the_users_own_files_is_refused_and_left_as_it_was(two_inputs, tmp_path):
    inputs, _ = two_inputs
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(ConfigError, match=r"results holds files no database holds \(notes.txt\)"):
            build_index(inputs, folder, FLAT, overwrite=overwrite)
        assert os.listdir(folder) == ["notes.txt"]
    build_index(inputs, tmp_path / "empty", FLAT)  # a new folder, then the same one again: a database's own files
    assert build_index(inputs, tmp_path / "empty", FLAT).already_complete
