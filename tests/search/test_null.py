"""The null model of search E-values: calibrated on held-out decoys, monotone, stored and read back; the decoys."""

import json
import math
from collections import Counter
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from benchmarks.calibration import synthetic_database, top_scores
from esm2cli.errors import ConfigError, FastaError, InputError
from esm2cli.io.fasta import scan_fasta
from esm2cli.io.storage import file_stamp
from esm2cli.search.null import (
    DECOY_TOP_K,
    JOIN_PAIRS,
    UNIPROT_COMPOSITION,
    NullModel,
    decoy_sequences,
    fit_null,
)
from esm2cli.search.vectors import VectorInput, open_inputs
from helpers import embed_cli, random_protein, write_fasta

# ---- calibration ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic():
    """A database of 20,000 unit vectors in families, a null fit on 500 background decoys, 500 held-out ones."""
    rng = np.random.default_rng(11)
    database, background = synthetic_database(rng, 20_000)
    fit = top_scores(background.sample(rng, 500), database, DECOY_TOP_K)
    held = background.sample(np.random.default_rng(12), 500) @ database.T
    return fit_null(fit, len(database), "500 background decoys"), held, len(database)


def _hits(model, held, targets, threshold):
    return (model.evalue(held, targets) <= threshold).sum() / len(held)


def test_held_out_decoys_see_about_e_hits_at_e(synthetic):
    model, held, targets = synthetic
    assert 0.5 <= _hits(model, held, targets, 1.0) <= 2.0
    assert 0.05 <= _hits(model, held, targets, 0.1) <= 0.2
    assert 5.0 <= _hits(model, held, targets, 10.0) <= 20.0


def test_evalue_falls_with_the_score_and_is_continuous(synthetic):
    model, _, targets = synthetic
    grid = np.linspace(-1.0, 1.0, 200_001)
    evalues = model.evalue(grid, targets)
    assert (np.diff(evalues) <= 0).all() and evalues.max() <= targets and evalues.min() > 0
    for edge in (model.scores[0], model.join):  # where the left extrapolation and the tail meet the curve
        below, above = model.evalue(np.array([edge - 1e-9, edge + 1e-9]), targets)
        assert above == pytest.approx(below, rel=1e-6)
    assert np.isnan(model.evalue(np.array([np.nan]), targets)).all()
    assert model.evalue(np.array([0.5]), 2 * targets)[0] == pytest.approx(2 * model.evalue(np.array([0.5]), targets)[0])


def test_the_curve_is_the_count_of_decoy_pairs_at_or_above():
    rng = np.random.default_rng(3)
    scores = rng.normal(0.3, 0.05, (40, 25))
    model = fit_null(scores, 25, "x")  # K = targets: every pair is counted
    pairs = scores.ravel()
    for score in model.scores:
        assert model.evalue(np.array([score]), 25)[0] == pytest.approx((pairs >= score).sum() / 40)
    assert (pairs >= model.join).sum() >= JOIN_PAIRS
    assert model.exact_from == pairs.min()


def test_an_exponential_tail_is_recovered():
    rng = np.random.default_rng(5)
    targets, rate = 2_000, 40.0
    scores = rng.exponential(1 / rate, (300, targets))  # P(score >= s) = exp(-40 s) for every target
    model = fit_null(-np.sort(-scores, axis=1)[:, :100], targets, "x")
    assert model.lam == pytest.approx(rate, rel=0.15)
    far = np.array([0.45, 0.55])  # past every decoy pair: the tail alone
    assert (far > model.join).all()
    np.testing.assert_allclose(model.evalue(far, targets), targets * np.exp(-rate * far), rtol=0.6)
    assert model.exact_from == np.sort(scores, axis=1)[:, -100].max()  # below it a decoy may have had more hits


def test_score_for_inverts_evalue(synthetic):
    model, _, targets = synthetic
    for evalue in (1e-5, 1e-2, 0.5, 3.0, 50.0, 500.0, 5_000.0):
        score = model.score_for(evalue, targets)
        assert model.evalue(np.array([score]), targets)[0] == pytest.approx(evalue, rel=1e-9)
    assert model.score_for(targets, targets) == -math.inf


# ---- edges --------------------------------------------------------------------------------------------------


def test_too_few_decoys_are_refused():
    with pytest.raises(ConfigError, match="5 decoys: at least 10"):
        fit_null(np.random.default_rng(0).random((5, 3)), 10, "x")


def test_equal_scores_are_refused_naming_why():
    with pytest.raises(InputError, match="all 60 decoy scores are 0.5: .* no E-value can be fit"):
        fit_null(np.full((20, 3), 0.5), 10, "x")


@pytest.mark.parametrize(
    ("scores", "targets", "match"),
    [
        (np.zeros(30), 10, "shape"),
        (np.random.default_rng(0).random((20, 11)), 10, "top 11 of 10 targets"),
        (np.array([[0.1, np.nan]] * 20), 10, "NaN"),
    ],
)
def test_scores_that_cannot_be_decoys_top_k_are_a_bug(scores, targets, match):
    with pytest.raises(ValueError, match=f"{match}.*this is a bug"):
        fit_null(scores, targets, "x")


def test_tied_top_scores_still_give_a_tail():
    scores = np.random.default_rng(1).random((50, 4)) * 0.5
    scores[:, 0] = 0.99  # every decoy's best hit ties (a duplicated database vector, say)
    model = fit_null(scores, 10, "x")
    assert 0 < model.lam < math.inf and model.threshold < 0.99
    assert model.evalue(np.array([0.99]), 10)[0] == pytest.approx(1.0, rel=1e-6)


def test_evalue_asks_for_a_database():
    model = fit_null(np.random.default_rng(2).random((20, 3)), 5, "x")
    with pytest.raises(ValueError, match="this is a bug"):
        model.evalue(np.array([0.5]), 0)


# ---- null.json ----------------------------------------------------------------------------------------------


def test_json_round_trip_gives_the_same_evalues(synthetic):
    model, held, targets = synthetic
    data = json.loads(json.dumps(model.to_json()))
    assert data["format_version"] == 1 and data["decoys"] == 500 and data["top_k"] == DECOY_TOP_K
    assert {"lambda", "a", "method", "description", "esm2cli_version", "curve"} <= set(data)
    again = NullModel.from_json(data)
    assert again == model
    np.testing.assert_array_equal(again.evalue(held[:5], targets), model.evalue(held[:5], targets))


def _broken(data, **changes):
    return {**data, **changes}


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda d: [], "not an esm2cli null model"),
        (lambda d: _broken(d, format="other"), "not an esm2cli null model"),
        (lambda d: _broken(d, format_version=9), "format version 9; this esm2cli reads 1"),
        (lambda d: {k: v for k, v in d.items() if k != "lambda"}, "broken null model .*'lambda'"),
        (lambda d: _broken(d, decoys="many"), "'decoys' is 'many', not int"),
        (lambda d: _broken(d, **{"lambda": -1.0}), "lambda must be positive"),
        (lambda d: _broken(d, curve={**d["curve"], "rate": d["curve"]["rate"][::-1]}), "rates fall"),
        (lambda d: _broken(d, curve={"score": [0.1, None], "rate": [0.1, 0.01]}), "finite numbers"),
        (lambda d: _broken(d, a=d["a"] + 1), "does not meet the curve"),
    ],
)
def test_broken_null_json_is_refused_naming_the_file(synthetic, change, match):
    data = change(synthetic[0].to_json())
    with pytest.raises(InputError, match=f"^db/null.json: .*{match}"):
        NullModel.from_json(data, "db/null.json")


# ---- decoys -------------------------------------------------------------------------------------------------

PROTEINS = [(f"p{i}", random_protein(30 + 3 * i)) for i in range(40)]


def _output(tmp_path, records, name="out.parquet", metadata=None):
    """A database output as decoy_sequences reads it: ids, lengths and the run's metadata."""
    path = tmp_path / name
    table = pa.table({"id": [r for r, _ in records], "length": pa.array([len(s) for _, s in records], pa.int32())})
    pq.write_table(table, path)
    meta = metadata or {"identity": {"input_sha256": "0" * 64}}
    return VectorInput(str(path), len(records), 8, "embedding", -1, {}, meta)


def _sorted(seq):
    return "".join(sorted(seq))


def test_shuffles_of_the_fasta_keep_each_protein_composition_and_length(tmp_path):
    fasta = write_fasta(tmp_path / "db.fasta", PROTEINS)
    decoys, description = decoy_sequences([_output(tmp_path, PROTEINS)], fasta, 25, seed=1)
    originals = {_sorted(s): s for _, s in PROTEINS}
    assert len(decoys) == 25 and len({_sorted(d) for d in decoys}) == 25  # 25 distinct proteins, each once
    assert all(_sorted(d) in originals and d != originals[_sorted(d)] for d in decoys)
    assert description == "25 residue-shuffled database sequences (from db.fasta)"


def test_decoys_are_seeded(tmp_path):
    fasta = write_fasta(tmp_path / "db.fasta", PROTEINS)
    inputs = [_output(tmp_path, PROTEINS)]
    assert decoy_sequences(inputs, fasta, 10, seed=4) == decoy_sequences(inputs, fasta, 10, seed=4)
    assert decoy_sequences(inputs, fasta, 10, seed=4)[0] != decoy_sequences(inputs, fasta, 10, seed=5)[0]
    assert decoy_sequences(inputs, None, 10, seed=4) == decoy_sequences(inputs, None, 10, seed=4)


def test_more_decoys_than_proteins_and_a_partial_fasta_shuffle_what_there_is(tmp_path):
    fasta = write_fasta(tmp_path / "part.fasta", PROTEINS[:10])
    decoys, description = decoy_sequences([_output(tmp_path, PROTEINS)], fasta, 100, seed=2)
    assert len(decoys) == 100 and {_sorted(d) for d in decoys} <= {_sorted(s) for _, s in PROTEINS[:10]}
    assert description == "100 residue-shuffled copies of 10 database sequences (from part.fasta)"
    whole = write_fasta(tmp_path / "db.fasta", PROTEINS)
    assert decoy_sequences([_output(tmp_path, PROTEINS)], whole, 41, seed=2)[1] == (
        "41 residue-shuffled copies of 40 database sequences (from db.fasta)"
    )


def test_without_a_fasta_decoys_are_background_of_the_database_lengths(tmp_path):
    lengths = [(f"q{i}", "A" * n) for i, n in enumerate((50, 120, 333))]
    decoys, description = decoy_sequences([_output(tmp_path, lengths)], None, 400, seed=3)
    assert {len(d) for d in decoys} == {50, 120, 333}
    assert description.startswith("400 random sequences of UniProt amino-acid composition with the database's lengths")
    counts = Counter("".join(decoys))
    total = sum(counts.values())
    expected = {k: v / sum(UNIPROT_COMPOSITION.values()) for k, v in UNIPROT_COMPOSITION.items()}
    assert set(counts) == set(expected)
    assert max(abs(counts[k] / total - p) for k, p in expected.items()) < 0.005  # ~80,000 residues drawn


def test_a_fasta_of_none_of_the_database_is_refused(tmp_path):
    fasta = write_fasta(tmp_path / "other.fasta", [("zz", "MKV")])
    with pytest.raises(InputError, match="other.fasta: holds none of the database's records"):
        decoy_sequences([_output(tmp_path, PROTEINS)], fasta, 5, seed=0)
    with pytest.raises(FastaError, match="missing.fasta"):
        decoy_sequences([_output(tmp_path, PROTEINS)], str(tmp_path / "missing.fasta"), 5, seed=0)
    with pytest.raises(ConfigError, match="decoys: 0"):
        decoy_sequences([_output(tmp_path, PROTEINS)], fasta, 0, seed=0)


def test_a_byte_range_shard_input_is_checked_by_its_stamp(tmp_path):
    fasta = write_fasta(tmp_path / "db.fasta", PROTEINS)
    stamp = file_stamp(fasta)
    piece = {"bytes": [0, 100], "size": stamp["size"], "stamp": str(stamp["modified"]), "format": "plain"}
    same = _output(
        tmp_path, PROTEINS, metadata={"input": fasta, "identity": {"input_sha256": "x", "input_slice": piece}}
    )
    assert "residue-shuffled" in decoy_sequences([same], None, 5, seed=0)[1]
    moved = replace(same, metadata={"input": fasta, "identity": {"input_slice": {**piece, "stamp": "1"}}})
    assert "db.fasta changed since it was embedded" in decoy_sequences([moved], None, 5, seed=0)[1]


@pytest.fixture(scope="module")
def embedded(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("null")
    fasta = write_fasta(root / "db.fasta", PROTEINS[:12])
    embed_cli(fasta, root / "db.parquet", tiny_model_dir, check=True)
    embed_cli(fasta, root / "db.h5", tiny_model_dir, check=True)
    return root


@pytest.mark.parametrize("name", ["db.parquet", "db.h5"])
def test_an_output_s_own_input_fasta_is_used_while_it_is_what_was_embedded(embedded, name):
    inputs = open_inputs([embedded / name])
    assert inputs[0].metadata["identity"]["input_sha256"] == scan_fasta(embedded / "db.fasta").sha256
    decoys, description = decoy_sequences(inputs, None, 12, seed=0)
    assert description == "12 residue-shuffled database sequences (from db.fasta)"
    assert sorted(map(_sorted, decoys)) == sorted(_sorted(s) for _, s in PROTEINS[:12])


def test_an_edited_or_missing_input_fasta_gives_background_decoys(embedded, tmp_path):
    inputs = open_inputs([embedded / "db.parquet"])
    edited = tmp_path / "edited.fasta"
    write_fasta(edited, [*PROTEINS[:11], ("p11", "MKV")])
    moved = [replace(inputs[0], metadata={**inputs[0].metadata, "input": str(edited)})]
    _, description = decoy_sequences(moved, None, 5, seed=0)
    assert description.startswith("5 random sequences") and "edited.fasta changed since it was embedded" in description
    gone = [replace(inputs[0], metadata={**inputs[0].metadata, "input": str(tmp_path / "gone.fasta")})]
    assert "gone.fasta cannot be read" in decoy_sequences(gone, None, 5, seed=0)[1]
