"""esm2cli score against fair-esm's own ESM-2 (and its LM head) on the same weights, and the batching of inputs."""

import math
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from transformers import EsmForMaskedLM

from benchmarks.fair_esm_reference import (
    fair_esm_model,
    masked_log_probs,
    masked_log_probs_batch,
    pseudo_log_likelihood,
    unmasked_log_probs,
)
from esm2cli.cli import cli
from esm2cli.config import BatchConfig
from esm2cli.jobs.mutants import AMINO_ACIDS
from esm2cli.jobs.scoring import _Protein, chunked, log_prob_chunks, window_start
from esm2cli.jobs.workload import synthetic_sequences
from esm2cli.runtime.engine import Engine
from helpers import FakeDevice, write_fasta

LONG = (
    "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRVGDGTQDNLSGAEKAVQVKVKALPDAQFEVVHSLAKWKRQTLGQHDFSAGEGLYTHMKALRPDEDRL"
    "SPLHSVYVDQWDWERVMGDGERQFSTLKSTVEAIWAGIKATEAAVSEEFGLAPFLPDQIHFVHSQELLSRYPDLDAKGRERAIAKDLGAVFLVGIGGKLSDGHRHDV"
    "RAPDYDDWUESTPZOBX"  # ends with the non-standard residues ESM-2 has tokens for
)
PROTEINS = [(f"p{i}", seq) for i, (_, seq) in enumerate(synthetic_sequences(5, seed=3, max_length=60))]
PROTEINS += [("short", "MKV"), ("long", LONG)]
WINDOW = 40  # "long" is longer, so windows centred on each position are exercised


@pytest.fixture(scope="module")
def fair(tiny_model_dir):
    """fair-esm's ESM2 with the tiny model's encoder and LM head, loaded by transformers (not by esm2cli)."""
    model, alphabet = fair_esm_model(EsmForMaskedLM.from_pretrained(tiny_model_dir))
    return model, alphabet


@pytest.fixture(scope="module")
def fasta(tmp_path_factory):
    return write_fasta(tmp_path_factory.mktemp("score") / "wt.fa", PROTEINS)


def score(*args):
    return CliRunner().invoke(cli, ["score", *map(str, args)])


def score_ok(tmp_path, fasta, model_dir, *args, name="out.parquet"):
    out = tmp_path / name
    result = score(fasta, "-o", out, "-m", model_dir, "--dtype", "float32", "--truncate", WINDOW, *args)
    assert result.exit_code == 0, result.output
    return pq.read_table(out), result


def windowed(seq: str, pos: int) -> tuple[str, int]:
    """The window the README promises: W residues centring pos, clamped to the ends; pos within it."""
    start = min(max(pos - WINDOW // 2, 0), max(len(seq) - WINDOW, 0))
    return seq[start : start + WINDOW], pos - start


def ref_masked(fair, seq, pos):
    model, alphabet = fair
    window, at = windowed(seq, pos)
    return masked_log_probs(model, alphabet, window, at)


def ref_unmasked(fair, seq, pos):
    model, alphabet = fair
    window, at = windowed(seq, pos)
    return unmasked_log_probs(model, alphabet, window)[at]


def test_window_centres_the_position_and_stays_inside_the_protein():
    assert window_start(5, 30, 40) == 0
    assert window_start(0, 100, 40) == 0
    assert window_start(50, 100, 40) == 30  # 20 residues on the left, 19 on the right
    assert window_start(99, 100, 40) == 60
    for pos in range(100):
        start = window_start(pos, 100, 40)
        assert 0 <= start <= 60 and start <= pos < start + 40


def test_pll_agrees_with_fair_esm_one_masked_copy_per_pass(tmp_path, fasta, tiny_model_dir, fair):
    table, result = score_ok(tmp_path, fasta, tiny_model_dir, "--pll")
    assert table.column_names == ["id", "length", "pll", "pseudo_perplexity", "windowed"]
    assert table["id"].to_pylist() == [i for i, _ in PROTEINS]
    model, alphabet = fair
    want = []
    for _, seq in PROTEINS:  # each masked copy in its window, in fair-esm batches (faster than one per pass)
        lp = masked_log_probs_batch(model, alphabet, [windowed(seq, i) for i in range(len(seq))])
        want.append(lp[torch.arange(len(seq)), torch.tensor([alphabet.get_idx(aa) for aa in seq])].sum().item())
    got = table["pll"].to_pylist()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    short = [i for i, _ in PROTEINS].index("short")  # and once as fair-esm's examples do: one masked copy a pass
    assert got[short] == pytest.approx(pseudo_log_likelihood(model, alphabet, "MKV"), abs=1e-4)
    lengths = [len(s) for _, s in PROTEINS]
    assert table["length"].to_pylist() == lengths
    np.testing.assert_allclose(
        table["pseudo_perplexity"].to_pylist(), [math.exp(-p / n) for p, n in zip(got, lengths, strict=True)]
    )
    assert table["windowed"].to_pylist() == [n > WINDOW for n in lengths]
    longer = sum(n > WINDOW for n in lengths)
    assert 0 < longer < len(PROTEINS)
    assert f"scored {len(PROTEINS)} proteins" in result.stderr and f"{longer} longer than the window" in result.stderr


def mutants_csv(tmp_path, rows):
    path = tmp_path / "muts.csv"
    path.write_text("id,mutant\n" + "".join(f"{i},{m}\n" for i, m in rows))
    return path


def some_mutants():
    seqs = dict(PROTEINS)
    long = seqs["long"]
    return [
        ("p0", f"{seqs['p0'][0]}1A"),
        ("long", f"{long[0]}1W:{long[100]}101C:{long[-1]}{len(long)}G"),  # three windows of one protein
        ("p1", f"{seqs['p1'][4]}5{'A' if seqs['p1'][4] != 'A' else 'C'}"),
        ("short", "M1K:V3L"),
        ("p0", f"{seqs['p0'][0]}1A"),  # the same mutant twice: two rows
        ("short", "k2k"),  # synonymous, lower case: score 0, written as given
    ]


@pytest.mark.parametrize("method", ["masked-marginal", "wt-marginal"])
def test_mutant_scores_agree_with_fair_esm(tmp_path, fasta, tiny_model_dir, fair, method):
    rows = some_mutants()
    table, result = score_ok(
        tmp_path, fasta, tiny_model_dir, "--mutations", mutants_csv(tmp_path, rows), "--method", method
    )
    assert table.column_names == ["id", "mutant", "score"]
    assert list(zip(table["id"].to_pylist(), table["mutant"].to_pylist(), strict=True)) == rows
    seqs = dict(PROTEINS)
    _, alphabet = fair
    reference = ref_masked if method == "masked-marginal" else ref_unmasked
    want = []
    for rec_id, mutant in rows:
        total = 0.0
        for part in mutant.upper().split(":"):
            wt, pos, mt = part[0], int(part[1:-1]) - 1, part[-1]
            lp = reference(fair, seqs[rec_id], pos)
            total += (lp[alphabet.get_idx(mt)] - lp[alphabet.get_idx(wt)]).item()
        want.append(total)
    got = table["score"].to_pylist()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    assert got[-1] == 0.0 and got[0] == got[4]
    assert "scored 6 mutants of 4 proteins" in result.stderr


def test_all_substitutions_is_the_full_table_of_single_mutants(tmp_path, fasta, tiny_model_dir, fair):
    table, _ = score_ok(tmp_path, fasta, tiny_model_dir, "--all-substitutions")
    seqs = dict(PROTEINS)
    assert table.num_rows == sum(len(s) for s in seqs.values()) * 19 + sum(
        s.count(c) for s in seqs.values() for c in "XBUZO"
    )  # a non-standard wild type (X, B, U, Z, O) has all 20 amino acids as substitutions
    short = table.filter(table["id"].to_numpy(zero_copy_only=False) == "short")
    assert short["mutant"].to_pylist()[:3] == ["M1A", "M1C", "M1D"]
    assert len(short) == 3 * 19
    _, alphabet = fair
    lp = ref_masked(fair, "MKV", 1)
    want = {f"K2{aa}": (lp[alphabet.get_idx(aa)] - lp[alphabet.get_idx("K")]).item() for aa in AMINO_ACIDS if aa != "K"}
    got = {
        m: s for m, s in zip(short["mutant"].to_pylist(), short["score"].to_pylist(), strict=True) if m.startswith("K2")
    }
    assert got.keys() == want.keys()
    np.testing.assert_allclose([got[k] for k in want], list(want.values()), rtol=1e-5, atol=1e-4)
    # The same substitutions through --mutations give the same scores.
    csv = mutants_csv(tmp_path, [("short", m) for m in want])
    again, _ = score_ok(tmp_path, fasta, tiny_model_dir, "--mutations", csv, name="again.parquet")
    np.testing.assert_allclose(again["score"].to_pylist(), [got[k] for k in want], rtol=0, atol=1e-5)


def test_scores_do_not_depend_on_batch_mates(tmp_path, fasta, tiny_model_dir):
    alone, _ = score_ok(tmp_path, fasta, tiny_model_dir, "--pll", "--batch-size", "1", name="alone.parquet")
    packed, _ = score_ok(
        tmp_path, fasta, tiny_model_dir, "--pll", "--max-tokens", "4096", "--devices", "sim:3", name="packed.parquet"
    )
    np.testing.assert_allclose(alone["pll"].to_pylist(), packed["pll"].to_pylist(), rtol=1e-6, atol=1e-5)


class FakeScorer:
    """A replica whose log-probabilities are a function of (input, row); records what it computed."""

    def __init__(self, name, delay=0.0):
        self.device = FakeDevice(name)
        self.delay = delay
        self.seen = []
        self.read = []

    def lm_log_probs(self, items):
        time.sleep(self.delay)  # a busy replica: with pull dispatch the other takes the next batch
        self.seen.append([(seq, masked) for seq, masked, _ in items])
        self.read.extend(read for _, _, read in items)
        return [
            np.array([[hash((seq, masked, r, v)) % 997 for v in range(33)] for r in read], np.float32)
            for seq, masked, read in items
        ]


def proteins_for(seqs, positions=None):
    from esm2cli.io.fasta import parse_record

    return [_Protein(parse_record(f"s{i}", s, i + 1), positions or list(range(len(s)))) for i, s in enumerate(seqs)]


def test_each_distinct_input_is_computed_once_and_batched_under_the_budget():
    replicas = [FakeScorer("a", delay=0.05), FakeScorer("b", delay=0.05)]
    long = PROTEINS[-1][1][:32]
    seqs = [long, "GSHM", long]  # the third is the first again
    proteins = proteins_for(seqs)
    proteins[1].positions = [2, 2, 2]  # three mutants at one position: one masked copy
    batch = BatchConfig(batch_size=64, max_tokens=150)
    with Engine(replicas) as engine:
        chunks = list(log_prob_chunks(engine, chunked(proteins), batch, window=20, masked=True))
    computed = [item for r in replicas for b in r.seen for item in b]
    assert len(computed) == len(set(computed)) == 32 + 1  # one masked window per position of `long`, one of GSHM
    assert all(sum(len(s) + 2 for s, _ in b) <= 150 for r in replicas for b in r.seen)  # packed tokens
    assert all(r.seen for r in replicas)  # spread over both replicas
    assert sum(len(c.proteins) for c in chunks) == 3
    lp = {id(p): c.log_probs(p) for c in chunks for p in c.proteins}
    np.testing.assert_array_equal(lp[id(proteins[0])], lp[id(proteins[2])])
    assert lp[id(proteins[1])].shape == (3, 33)


def test_chunks_come_back_in_order_and_carry_their_results():
    replicas = [FakeScorer("a")]
    proteins = proteins_for(["MKV", "GSHMKV", "ACDEFGHIK", "W"])
    with Engine(replicas) as engine:
        chunks = list(
            log_prob_chunks(engine, chunked(proteins, positions=5), BatchConfig(max_tokens=64), window=4, masked=False)
        )
    assert [[p.record.sequence for p in c.proteins] for c in chunks] == [["MKV", "GSHMKV"], ["ACDEFGHIK"], ["W"]]
    # Unmasked windows return only the positions read: MKV and W whole; GSHMKV and ACDEFGHIK (longer than
    # the window of 4) from their centred windows, 6 and 9 rows in all instead of 3 x 4 and 6 x 4.
    want = [[0, 1, 2], [0, 1, 2], [2], [2, 3], [0, 1, 2], [2], [2], [2], [2], [2, 3], [0]]
    assert sorted(map(list, replicas[0].read)) == sorted(want)
    for chunk in chunks:
        assert all(r is not None for r in chunk.results)
        for p in chunk.proteins:
            assert chunk.log_probs(p).shape == (len(p.record.sequence), 33)


def test_lm_head_is_loaded_only_when_asked(tiny_model_dir):
    from esm2cli.config import ModelConfig
    from esm2cli.model.load import load_model

    plain = load_model(ModelConfig(model=tiny_model_dir, dtype="float32"))
    assert not plain.forward.has_lm_head and not plain.forward.has_contact_head
    scoring = load_model(ModelConfig(model=tiny_model_dir, dtype="float32"), lm_head=True)
    assert scoring.forward.has_lm_head and scoring.forward.lm_decoder_tied  # the decoder is the token embeddings
    want = EsmForMaskedLM.from_pretrained(tiny_model_dir).lm_head
    mine = scoring.forward.lm
    pairs = [
        (mine["dense_w"], want.dense.weight),
        (mine["dense_b"], want.dense.bias),
        (mine["ln_w"], want.layer_norm.weight),
        (mine["ln_b"], want.layer_norm.bias),
        (mine["bias"], want.bias),
    ]
    for value, expected in pairs:
        assert torch.equal(value, expected)


def test_dummy_lm_head_is_random_repeatable_and_leaves_the_encoder_as_it_was():
    from esm2cli.config import ModelConfig
    from esm2cli.model.load import load_model

    cfg = ModelConfig(model="esm2_t6_8M", load_format="dummy", dtype="float32")
    a, b, plain = load_model(cfg, lm_head=True), load_model(cfg, lm_head=True), load_model(cfg)
    assert a.forward.has_lm_head and a.dummy
    for (name, x), y in zip(a.forward.lm.items(), b.forward.lm.values(), strict=True):
        assert torch.equal(x, y), name
    assert a.forward.lm["dense_w"].std() > 0
    encoder = {k: v for k, v in a.forward.state_dict().items() if not k.startswith("lm.")}
    for (name, x), y in zip(encoder.items(), plain.forward.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


def test_a_model_without_lm_head_is_refused(tmp_path, fasta, tiny_model_dir):
    from transformers import EsmModel

    encoder_only = tmp_path / "encoder-only"
    EsmModel.from_pretrained(tiny_model_dir, add_pooling_layer=False).save_pretrained(encoder_only)
    result = score(fasta, "--pll", "-o", tmp_path / "o.parquet", "-m", encoder_only, "--dtype", "float32")
    assert result.exit_code == 1
    assert "has no masked-LM head" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "o.parquet").exists()


def test_scores_into_a_link_are_written_to_the_file_it_names(tmp_path, fasta, tiny_model_dir):
    import os

    real, link = tmp_path / "data" / "pll.parquet", tmp_path / "pll.parquet"
    real.parent.mkdir()
    os.symlink(real, link)
    table, _ = score_ok(tmp_path, fasta, tiny_model_dir, "--pll", name="pll.parquet")
    # before: the commit's rename replaced the link with the scores and data/pll.parquet was never written
    assert os.path.islink(link)
    assert pq.read_table(real).column("id").to_pylist() == table.column("id").to_pylist() == [p for p, _ in PROTEINS]
