"""Long proteins whole: windows computed by hand with fair-esm's own model, window by window, then stitched."""

from __future__ import annotations

import random

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from transformers import EsmModel

from benchmarks.fair_esm_reference import fair_esm_model
from esm2cli.cli import cli
from esm2cli.runtime.windows import window_starts
from helpers import write_fasta

W, OVERLAP = 1022, 256
S = W - OVERLAP
# L = W, W + 1, 2W - overlap, around the end-aligned window (the last regular start moves), far beyond
LENGTHS = [300, W, W + 1, 2 * W - OVERLAP, 2 * W - OVERLAP + 1, 2 * S + W - 1, 2 * S + W, 2 * S + W + 1, 5000]


@pytest.fixture(scope="module")
def fair(tiny_model_dir):
    return fair_esm_model(EsmModel.from_pretrained(tiny_model_dir, add_pooling_layer=False))


@pytest.fixture(scope="module")
def proteins():
    rng = random.Random(3)
    return [(f"L{n}", "".join(rng.choice("ACDEFGHIKLMNPQRSTVWY") for _ in range(n))) for n in LENGTHS]


def fair_window(fair, seq: str) -> tuple[np.ndarray, np.ndarray]:
    """fair-esm's <cls> vector and per-residue vectors of one window embedded alone (last layer)."""
    model, alphabet = fair
    _, _, toks = alphabet.get_batch_converter()([("w", seq)])
    with torch.no_grad():
        rep = model(toks, repr_layers=[model.num_layers])["representations"][model.num_layers][0].numpy()
    return rep[0], rep[1 : len(seq) + 1]


def by_hand(fair, seq: str, width: int = W, overlap: int = OVERLAP) -> dict[str, np.ndarray]:
    """The README's rule, written out independently: starts, per-residue means, mean and bos."""
    length = len(seq)
    if length <= width:
        starts = [0]
    else:
        starts, start = [], 0
        while start + width < length:
            starts.append(start)
            start += width - overlap
        starts.append(length - width)
    sums = [None] * length
    counts = [0] * length
    bos = []
    for start in starts:
        cls_vec, tokens = fair_window(fair, seq[start : start + width])
        bos.append(cls_vec)
        for k, vec in enumerate(tokens):
            sums[start + k] = vec.astype(np.float64) if sums[start + k] is None else sums[start + k] + vec
            counts[start + k] += 1
    tokens = np.stack([sums[r] / counts[r] for r in range(length)])
    return {"starts": starts, "tokens": tokens, "mean": tokens.mean(0), "bos": np.mean(bos, axis=0)}


def embed(tmp_path, fasta, name, *extra) -> pq.ParquetFile:
    out = tmp_path / f"{name}.parquet"
    args = ["embed", fasta, "-o", str(out), "--dtype", "float32", "--devices", "sim:2", *map(str, extra)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return pq.read_table(out)


def test_window_starts_follow_the_rule():
    assert window_starts(W, W, OVERLAP) == [0]
    assert window_starts(W + 1, W, OVERLAP) == [0, 1]
    assert window_starts(2 * W - OVERLAP, W, OVERLAP) == [0, S]
    assert window_starts(2 * S + W, W, OVERLAP) == [0, S, 2 * S]
    assert window_starts(2 * S + W + 1, W, OVERLAP) == [0, S, 2 * S, 2 * S + 1]
    for n in range(1, 6000, 97):
        starts = window_starts(n, W, OVERLAP)
        assert starts[0] == 0 and min(starts[-1] + W, n) == n
        assert all(b - a <= S for a, b in zip(starts, starts[1:], strict=False))  # every residue covered


def test_windowed_embeddings_equal_fair_esm_window_by_window(tmp_path, tiny_model_dir, fair, proteins):
    fasta = write_fasta(tmp_path / "long.fa", proteins)
    table = embed(tmp_path, fasta, "mean", "-m", tiny_model_dir, "--long-sequences", "window", "--per-token")
    bos = embed(tmp_path, fasta, "bos", "-m", tiny_model_dir, "--long-sequences", "window", "--pooling", "bos")
    assert table["length"].to_pylist() == LENGTHS
    assert table["truncated"].to_pylist() == [False] * len(LENGTHS)
    for row, (rec_id, seq) in enumerate(proteins):
        want = by_hand(fair, seq)
        assert table["windows"][row].as_py() == len(want["starts"]), rec_id
        tokens = np.array(table["per_token"][row].as_py(), dtype=np.float32)
        assert tokens.shape == (len(seq), 32)
        np.testing.assert_allclose(tokens, want["tokens"], rtol=1e-4, atol=1e-4, err_msg=rec_id)
        np.testing.assert_allclose(table["embedding"][row].as_py(), want["mean"], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(bos["embedding"][row].as_py(), want["bos"], rtol=1e-4, atol=1e-5)


def test_proteins_that_fit_are_unchanged_bit_for_bit(tmp_path, tiny_model_dir, proteins):
    short = [p for p in proteins if len(p[1]) <= W]
    fasta = write_fasta(tmp_path / "short.fa", short + [proteins[-1]])
    plain = embed(tmp_path, fasta, "truncate", "-m", tiny_model_dir, "--per-token")
    windowed = embed(tmp_path, fasta, "window", "-m", tiny_model_dir, "--per-token", "--long-sequences", "window")
    n = len(short)
    assert plain["embedding"].slice(0, n).equals(windowed["embedding"].slice(0, n))
    assert plain["per_token"].slice(0, n).equals(windowed["per_token"].slice(0, n))
    assert plain["truncated"][n].as_py() and not windowed["truncated"][n].as_py()
    assert len(plain["per_token"][n]) == W and len(windowed["per_token"][n]) == 5000


def test_the_stitched_result_does_not_depend_on_batch_mates_or_devices(tmp_path, tiny_model_dir, proteins):
    rng = random.Random(9)
    others = [(f"s{i}", "".join(rng.choice("ACDEFGHIKLMNPQRSTVWY") for _ in range(rng.randint(900, 1022))))
              for i in range(12)]  # fmt: skip
    long_one = [proteins[-1]]
    alone = embed(tmp_path, write_fasta(tmp_path / "alone.fa", long_one), "alone", "-m", tiny_model_dir,
                  "--long-sequences", "window")  # fmt: skip
    crowd = embed(tmp_path, write_fasta(tmp_path / "crowd.fa", others + long_one + others[:3]), "crowd",
                  "-m", tiny_model_dir, "--long-sequences", "window", "--devices", "sim:3", "--max-tokens", "3000",
                  "--allow-duplicate-ids")  # fmt: skip
    got = np.array(crowd["embedding"][len(others)].as_py())
    np.testing.assert_allclose(got, alone["embedding"][0].as_py(), rtol=1e-5, atol=1e-6)


def test_error_mode_refuses_long_records_and_skip_invalid_applies(tmp_path, tiny_model_dir, proteins):
    fasta = write_fasta(tmp_path / "mixed.fa", proteins[:3])
    args = ["embed", fasta, "-o", str(tmp_path / "e.parquet"), "-m", tiny_model_dir, "--long-sequences", "error"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2
    assert "record #3 'L1023': 1023 residues, longer than 1022 (--long-sequences error" in result.output
    result = CliRunner().invoke(cli, [*args, "--skip-invalid"])
    assert result.exit_code == 0, result.output
    assert pq.read_table(tmp_path / "e.parquet")["id"].to_pylist() == ["L300", "L1022"]


def test_window_options_are_checked_and_recorded(tmp_path, tiny_model_dir, proteins):
    fasta = write_fasta(tmp_path / "one.fa", proteins[:1])
    args = ["embed", fasta, "-o", str(tmp_path / "x.parquet"), "-m", tiny_model_dir, "--long-sequences", "window"]
    bad = CliRunner().invoke(cli, [*args, "--truncate", "100", "--window-overlap", "100"])
    assert bad.exit_code == 2 and "--window-overlap 100 must be at least 0 and below the window of 100" in bad.output
    table = embed(tmp_path, fasta, "meta", "-m", tiny_model_dir, "--long-sequences", "window")
    from esm2cli.io.parquet import read_metadata

    meta = read_metadata(tmp_path / "meta.parquet")
    assert meta["window"]["width"] == W and meta["window"]["overlap"] == OVERLAP and "rule" in meta["window"]
    assert table["windows"].to_pylist() == [1]


def test_serve_gives_what_embed_gives_in_window_mode(tmp_path, tiny_model_dir, proteins):
    import httpx
    from live_server import live_server, make_app, wait_healthy

    from esm2cli.config import EmbedConfig

    chosen = [proteins[0], proteins[2], proteins[-1]]  # 300, 1023 and 5000 residues
    fasta = write_fasta(tmp_path / "some.fa", chosen)
    table = embed(tmp_path, fasta, "embed", "-m", tiny_model_dir, "--long-sequences", "window")
    app = make_app(tiny_model_dir, embed=EmbedConfig(long_sequences="window"))
    with live_server(app) as url, httpx.Client(base_url=url, timeout=120) as client:
        wait_healthy(client)
        body = {"sequences": [{"id": rid, "sequence": seq} for rid, seq in chosen]}
        answer = client.post("/predict/batch", json=body)
        assert answer.status_code == 200, answer.text
        items = answer.json()["results"]
        model_id = client.get("/v1/models").json()["data"][0]["id"]
        usage = client.post("/v1/embeddings", json={"input": chosen[-1][1], "model": model_id})
    assert [i["windows"] for i in items] == table["windows"].to_pylist() == [1, 2, 7]
    assert [i["truncated"] for i in items] == [False, False, False]
    for row, item in enumerate(items):
        np.testing.assert_allclose(item["embedding"], table["embedding"][row].as_py(), rtol=1e-4, atol=1e-5)
    assert usage.status_code == 200, usage.text
    assert usage.json()["usage"]["prompt_tokens"] == 7 * (W + 2)  # tokens as the model saw them: 7 windows
    np.testing.assert_allclose(usage.json()["data"][0]["embedding"], items[-1]["embedding"], rtol=1e-6)


@pytest.mark.parametrize("width, overlap", [(50, 0), (50, 10), (50, 49), (1022, 1021)])
def test_window_count_matches_the_listed_windows(width, overlap):
    from esm2cli.runtime.windows import window_count

    for length in (1, width - 1, width, width + 1, 3 * width + 7, 5000):
        assert window_count(length, width, overlap) == len(window_starts(length, width, overlap)), length


def test_windows_stream_into_their_protein_memory_stays_flat_with_a_large_overlap(tiny_model_dir):
    import weakref

    from esm2cli import Embedder

    width, overlap, length = 40, 39, 1500  # 1,461 windows of 40 residues
    rng = random.Random(5)
    seq = "".join(rng.choice("ACDEFGHIKLMNPQRSTVWY") for _ in range(length))
    options = dict(devices="cpu", dtype="float32", long_sequences="window", truncate=width, window_overlap=overlap)
    with Embedder(tiny_model_dir, **options, batch_size=32) as emb:
        replica = emb._setup.engine._workers[0].replica
        original, returned, most_alive = replica.embed_batch, [], [0]

        def tracked(seqs, **kw):  # how many windows' per-residue arrays are still held when a batch starts
            most_alive[0] = max(most_alive[0], sum(ref() is not None for ref in returned))
            result = original(seqs, **kw)
            returned.extend(weakref.ref(a) for arrays in result.per_token.values() for a in arrays)
            return result

        replica.embed_batch = tracked
        got = emb.embed([seq])
    windows = len(window_starts(length, width, overlap))
    assert len(returned) == windows
    assert most_alive[0] <= 8 * 32, most_alive  # a few batches in flight, not every window of the protein
    assert got.shape == (1, 32) and np.isfinite(got).all()  # the numbers: the fair-esm comparisons above


def test_an_overlap_that_multiplies_the_compute_is_warned_about(tmp_path, tiny_model_dir):
    fasta = write_fasta(tmp_path / "in.fa", [("long", "MKV" * 40)])
    args = ["-m", tiny_model_dir, "--devices", "cpu", "--long-sequences", "window", "--truncate", "50"]
    for overlap, warned in ((25, False), (40, True)):
        out = tmp_path / f"o{overlap}.parquet"
        result = CliRunner().invoke(cli, ["embed", fasta, "-o", str(out), *args, "--window-overlap", str(overlap)])
        assert result.exit_code == 0, result.output
        assert ("computes each residue of a long protein 5.0 times" in result.stderr) is warned, result.stderr


def test_window_sums_do_not_depend_on_the_order_windows_come_back_in():
    """A residue in three windows (overlap over half the width) gets the same bits whatever order its windows'
    batches finish in: sums run in window order, an early window waits for its turn."""
    from itertools import permutations

    from esm2cli.runtime.windows import WindowSums

    length, width, overlap = 50, 20, 14
    starts = window_starts(length, width, overlap)
    rng = np.random.default_rng(7)
    # Magnitudes far apart, so that a sum in another order rounds differently.
    windows = [(rng.standard_normal((width, 8)) * 10.0 ** rng.integers(-8, 8, (width, 8))).astype(np.float32)
               for _ in starts]  # fmt: skip
    results, totals = [], []
    for order in list(permutations(range(len(starts))))[::31][:24]:
        sums = WindowSums(length, starts)
        for i in order:
            sums.add(0, starts[i], windows[i])
        results.append(sums.tokens(0))
        # The float64 sums themselves: after the cast to float32 an order's last bit rarely shows, but it can.
        totals.append(sums._total[0].copy())
    assert all(np.array_equal(results[0], r) for r in results[1:])
    assert all(np.array_equal(totals[0], t) for t in totals[1:])
    shuffled = WindowSums(length, starts)
    shuffled.add(0, starts[-1], windows[-1])
    with pytest.raises(ValueError, match="this is a bug"):
        shuffled.tokens(0)  # stitched before every window is in
