"""A database folder checked against its manifest: each missing, extra or changed piece refused by name."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from esm2cli.config import IndexConfig, ShardConfig
from esm2cli.errors import InputError
from esm2cli.search import manifest
from esm2cli.search.build import build_index
from esm2cli.search.index import Index
from searchdata import unit


@pytest.fixture
def db(synthetic, tmp_path):
    source = synthetic("v.parquet", unit(np.random.default_rng(3).standard_normal((600, 32))))
    folder = tmp_path / "db"
    for i in range(3):
        build_index([source], folder, IndexConfig(kind="flat", decoys=0), shard=ShardConfig(index=i, count=3))
    return folder


def test_a_complete_database_opens(db):
    record = manifest.load_manifest(db)
    assert [shard["rows"] for shard in record["shards"]] == [200, 200, 200] and record["shard_count"] == 3
    assert record["format_version"] == manifest.FORMAT_VERSION and record["identity"]["pooling"] == "mean"


def test_a_missing_shard_is_named(db):
    shutil.rmtree(db / manifest.shard_name(1, 3))
    with pytest.raises(InputError, match=r"shard-00001-of-00003: missing \(manifest.json lists it\)"):
        Index.open(db)


def test_an_extra_shard_is_named(db):
    shutil.copytree(db / manifest.shard_name(1, 3), db / manifest.shard_name(4, 8))
    with pytest.raises(InputError, match=r"shard-00004-of-00008: a shard that manifest.json does not list"):
        Index.open(db)


def test_a_file_whose_digest_differs_is_named_and_sizes_are_checked_without_verify(db):
    path = db / manifest.shard_name(2, 3) / "vectors.f32"
    data = bytearray(path.read_bytes())
    data[100] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"shard-00002-of-00003/vectors.f32: its SHA-256 differs"):
        Index.open(db)
    assert Index.open(db, verify=False).size == 600  # same size: only the digest tells
    with open(path, "ab") as out:
        out.write(b"\0" * 4)
    with pytest.raises(InputError, match=r"vectors.f32: 25,604 bytes where manifest.json records 25,600"):
        Index.open(db, verify=False)


def test_a_missing_file_of_a_shard_is_named(db):
    os.remove(db / manifest.shard_name(0, 3) / "ids.parquet")
    with pytest.raises(InputError, match=r"shard-00000-of-00003/ids.parquet: missing"):
        Index.open(db, verify=False)


def test_another_format_version_is_refused(db):
    record = json.loads((db / "manifest.json").read_text())
    record["format_version"] = 99
    (db / "manifest.json").write_text(json.dumps(record))
    with pytest.raises(InputError, match=r"manifest.json: a database of format version 99 .*reads version 1"):
        Index.open(db)


def _edit(db, edit) -> None:
    record = json.loads((db / "manifest.json").read_text())
    edit(record)
    (db / "manifest.json").write_text(json.dumps(record))


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda m: m["shards"][1].update(rows=10), "shards"),  # would search 10 of the shard's 200 vectors
        (lambda m: m["identity"].update(pooling="bos"), "identity"),  # would take bos queries for mean vectors
        (lambda m: m.update(hidden=16), "hidden"),
        (lambda m: m.update(kind="hnsw"), "kind"),
        (lambda m: m.update(rows=6), "rows"),
    ],
)  # fmt: skip
def test_a_manifest_edited_by_hand_is_refused_naming_the_field(db, edit, field):
    _edit(db, edit)
    with pytest.raises(InputError, match=rf"manifest.json: its '{field}' differs from the shards' own shard.json"):
        Index.open(db, verify=False)


def test_a_manifest_without_a_field_a_search_reads_is_an_input_error(db):
    _edit(db, lambda m: m.pop("identity"))
    with pytest.raises(InputError, match=r"manifest.json: no 'identity' field"):
        Index.open(db)


def test_a_folder_that_is_no_database_is_named(tmp_path):
    (tmp_path / "plain").mkdir()
    with pytest.raises(InputError, match=r"manifest.json: missing: not an esm2cli database"):
        Index.open(tmp_path / "plain")
    with pytest.raises(InputError, match=r"no such database folder"):
        Index.open(tmp_path / "nothing")
    (tmp_path / "plain" / "manifest.json").write_text("[1, 2]")
    with pytest.raises(InputError, match=r"not an esm2cli database record"):
        Index.open(tmp_path / "plain")


def test_a_database_short_of_shards_is_refused_naming_them(synthetic, tmp_path):
    source = synthetic("v.parquet", unit(np.random.default_rng(3).standard_normal((100, 32))))
    for i in (0, 2):
        build_index([source], tmp_path / "db", IndexConfig(kind="flat", decoys=0), shard=ShardConfig(index=i, count=4))
    with pytest.raises(InputError, match=r"2 of 4 shards are not built: 1, 3"):
        Index.open(tmp_path / "db")
