"""POST /search over real HTTP on loopback: the hits of esm2cli search for the same FASTA, the bounds, keys and cache
partitions of /predict, 404 without a database, the search off the event loop, and a server whose vectors are not
the database's refused at startup (exit 2)."""

from __future__ import annotations

import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pandas as pd
import pytest
from click.testing import CliRunner
from live_server import bearer, live_server, metric, wait_healthy

from esm2cli.cli import cli
from esm2cli.config import EmbedConfig, ModelConfig, ServeConfig
from esm2cli.runtime.engine import build_engine
from esm2cli.search.index import Index
from esm2cli.serve.app import create_app
from helpers import embed_cli, random_protein, write_fasta

KEY_A, KEY_B = "search-key-a", "search-key-b"
DB_RECORDS = [(f"t{i}", random_protein(18 + 7 * i)) for i in range(16)]
# Database proteins themselves, one cut short and two the database does not hold.
QUERIES = [("q0", DB_RECORDS[3][1]), ("q1", DB_RECORDS[9][1]), ("q2", DB_RECORDS[12][1][:40]),
           ("q3", random_protein(55)), ("q4", random_protein(131))]  # fmt: skip
MAX_CLIENT_BATCH = len(QUERIES)


def run(*args):
    return CliRunner().invoke(cli, [*map(str, args)])


@pytest.fixture(scope="module")
def database(tmp_path_factory, tiny_model_dir):
    """A flat database of the tiny model with a null model (E-values), and the query FASTA."""
    root = tmp_path_factory.mktemp("search-db")
    embed_cli(write_fasta(root / "db.fasta", DB_RECORDS), root / "db.parquet", tiny_model_dir, check=True)
    built = run("index", root / "db.parquet", "-o", root / "db", "--decoys", "10", "--devices", "cpu", "-q")
    assert built.exit_code == 0, built.output
    write_fasta(root / "queries.fasta", QUERIES)
    return root


def search_app(model_dir, index, **serve):
    model = ModelConfig(model=model_dir, devices="cpu", dtype="float32")
    embed = EmbedConfig()
    return create_app(ServeConfig(**serve), model, embed, loader=lambda: build_engine(model, embed), index=index)


@pytest.fixture(scope="module")
def searching(database, tiny_model_dir):
    """A live server of the tiny model over the database, behind two API keys; its httpx client (no key sent)."""
    app = search_app(tiny_model_dir, database / "db", api_keys=(KEY_A, KEY_B), max_client_batch=MAX_CLIENT_BATCH)
    with live_server(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        wait_healthy(client)
        yield client


def post(client, key=KEY_A, **body):
    return client.post("/search", json={"sequences": [seq for _, seq in QUERIES], **body}, headers=bearer(key))


def test_search_answers_as_esm2cli_search(searching, database):
    result = run("search", database / "queries.fasta", "-d", database / "db", "-o", database / "hits.parquet",
                 "-k", "4", "--format", "parquet", "--devices", "cpu", "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    expected = pd.read_parquet(database / "hits.parquet")  # full precision (the TSV rounds E-values to 3 digits)
    answer = post(searching, k=4)
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    assert len(results) == len(QUERIES)
    for (query, _), hits in zip(QUERIES, results, strict=True):
        cli_hits = expected[expected["query"] == query]
        assert [hit["target"] for hit in hits] == cli_hits["target"].tolist(), query
        assert [hit["score"] for hit in hits] == pytest.approx(cli_hits["score"].tolist(), abs=1e-5)
        # An E-value moves by its slope times the score's change: a relative 1e-4 for a 1e-6 cosine here.
        assert [hit["evalue"] for hit in hits] == pytest.approx(cli_hits["evalue"].tolist(), rel=1e-3)
    assert results[0][0]["target"] == "t3" and results[1][0]["target"] == "t9"  # a database protein finds itself


def test_score_and_evalue_filters_keep_only_the_hits_that_pass(searching):
    everything = post(searching, k=16).json()["results"]
    scores = sorted(hit["score"] for hits in everything for hit in hits)
    evalues = sorted(hit["evalue"] for hits in everything for hit in hits)
    min_score, max_evalue = scores[len(scores) // 2], evalues[len(evalues) // 3]
    by_score = post(searching, k=16, min_score=min_score).json()["results"]
    assert by_score == [[hit for hit in hits if hit["score"] >= min_score] for hits in everything]
    by_evalue = post(searching, k=16, max_evalue=max_evalue).json()["results"]
    assert by_evalue == [[hit for hit in hits if hit["evalue"] <= max_evalue] for hits in everything]
    assert 0 < sum(map(len, by_evalue)) < sum(map(len, everything))


def test_a_key_is_required_and_the_cache_is_the_keys_own(searching):
    refused = searching.post("/search", json={"sequences": ["MKV"]})
    assert refused.status_code == 401 and "API key" in refused.json()["error"]
    seq = random_protein(77)
    hits = "esm2cli_cache_hits_total"
    before_a = metric(searching, hits, bearer(KEY_A))
    before_b = metric(searching, hits, bearer(KEY_B))
    assert searching.post("/predict", json={"sequence": seq}, headers=bearer(KEY_A)).status_code == 200
    assert searching.post("/search", json={"sequences": [seq]}, headers=bearer(KEY_A)).status_code == 200
    assert metric(searching, hits, bearer(KEY_A)) == before_a + 1  # /search used the vector /predict computed
    assert searching.post("/search", json={"sequences": [seq]}, headers=bearer(KEY_B)).status_code == 200
    assert metric(searching, hits, bearer(KEY_B)) == before_b  # ... and never another key's


def test_too_many_sequences_are_refused_as_predict_batch_refuses_them(searching):
    sequences = [random_protein(30)] * (MAX_CLIENT_BATCH + 1)
    batch = searching.post("/predict/batch", json={"sequences": sequences}, headers=bearer(KEY_A))
    search = searching.post("/search", json={"sequences": sequences}, headers=bearer(KEY_A))
    assert search.status_code == batch.status_code == 422
    assert search.json() == batch.json()
    bound = f"maximum allowed batch size {MAX_CLIENT_BATCH}"
    assert search.json()["error"] == f"batch size {MAX_CLIENT_BATCH + 1} > {bound}"
    empty = searching.post("/search", json={"sequences": []}, headers=bearer(KEY_A))
    assert empty.status_code == 422 and empty.json()["error"] == "sequences: empty list"


@pytest.mark.parametrize("k", [0, -1, len(DB_RECORDS) + 1])
def test_k_out_of_range_is_422_in_one_line(searching, database, k):
    answer = post(searching, k=k)
    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert error.startswith(f"k: {k} is out of range: ask for 1 to {len(DB_RECORDS)} hits")
    assert "\n" not in error and str(database) not in error  # the server's paths stay private


def test_search_requests_are_counted_by_endpoint(searching):
    ok = 'esm2cli_requests_total{endpoint="/search",status="200"}'
    before = metric(searching, ok, bearer(KEY_A))
    searched = metric(searching, "esm2cli_search_seconds_count", bearer(KEY_A))
    assert post(searching, k=1).status_code == 200
    assert metric(searching, ok, bearer(KEY_A)) == before + 1
    assert metric(searching, "esm2cli_search_seconds_count", bearer(KEY_A)) == searched + 1


def test_health_answers_while_a_search_runs(searching, monkeypatch):
    entered, release = threading.Event(), threading.Event()
    original = Index.search_vectors

    def held(self, *args, **kwargs):
        entered.set()
        release.wait(30)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Index, "search_vectors", held)
    with ThreadPoolExecutor(1) as pool:
        searched = pool.submit(post, searching, k=2)
        try:
            assert entered.wait(30), "the search never started"
            health = searching.get("/health", timeout=5)  # the event loop is free while the index searches
            assert health.status_code == 200
        finally:
            release.set()
        assert searched.result().status_code == 200


def test_without_an_index_search_is_404(server):
    answer = server.post("/search", json={"sequences": ["MKV"]})
    assert answer.status_code == 404
    assert answer.json() == {
        "error": "POST /search: this server has no search database (start it with --index DB)",
        "error_type": "NotFoundError",
    }


def test_a_server_of_other_options_refuses_to_start_naming_them(database, tiny_model_dir, tmp_path):
    args = [sys.executable, "-m", "esm2cli", "serve", "-m", tiny_model_dir, "--dtype", "float32", "--devices", "cpu",
            "--pooling", "bos", "--index", str(database / "db"), "--port", "0"]  # fmt: skip
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "the server's model and options" in last and "pooling was 'mean', now 'bos'" in last, last


def test_a_folder_that_holds_no_database_is_refused_before_the_model_loads(tmp_path):
    # A model that does not exist: the refusal names the database, so it came before any load was tried.
    result = run("serve", "-m", tmp_path / "no-model", "--index", tmp_path)
    assert result.exit_code == 2, result.output
    missing = f"{tmp_path}/manifest.json: missing: not an esm2cli database, or its build has not finished"
    assert result.stderr.strip().splitlines()[-1] == f"Error: {missing} (esm2cli index)"
