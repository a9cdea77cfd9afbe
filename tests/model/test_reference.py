"""esm2cli against fair-esm (facebookresearch/esm), the reference ESM-2 implementation, on the same weights."""

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from transformers import EsmModel

from benchmarks.fair_esm_reference import extract_mean, fair_esm_model
from esm2cli.cli import cli
from esm2cli.jobs.workload import synthetic_sequences
from helpers import write_fasta
from reference import cosine


@pytest.fixture(scope="module")
def fair(tiny_model_dir):
    return fair_esm_model(EsmModel.from_pretrained(tiny_model_dir, add_pooling_layer=False))


@pytest.fixture(scope="module")
def fasta(tmp_path_factory):
    records = list(synthetic_sequences(200, seed=5, max_length=1300))
    return write_fasta(tmp_path_factory.mktemp("ref") / "proteins.fa", records)


@pytest.mark.parametrize(
    "extra, truncate",
    [([], 1022), (["--devices", "sim:4"], 1022), (["--truncate", "100", "--layers", "2"], 100)],
)
def test_mean_embeddings_agree_with_fair_esm_extract(tmp_path, fasta, fair, tiny_model_dir, extra, truncate):
    layer = 2 if "--layers" in extra else 3
    out = tmp_path / "out.parquet"
    result = CliRunner().invoke(
        cli, ["embed", fasta, "-o", str(out), "-m", tiny_model_dir, "--dtype", "float32", *extra]
    )
    assert result.exit_code == 0, result.output
    model, alphabet = fair
    ref = extract_mean(model, alphabet, fasta, repr_layers=[layer], truncation_seq_length=truncate)
    table = pq.read_table(out)
    ids = table["id"].to_pylist()
    assert sorted(ids) == sorted(ref) and len(ids) == len(set(ids)) == 200
    got = np.array(table["embedding"].to_pylist(), dtype=np.float32)
    want = np.stack([ref[i][layer].numpy() for i in ids])
    assert cosine(got, want).min() >= 0.9999
    centre = want.mean(0)  # mean embeddings share a large common part; compare what differs too
    assert cosine(got - centre, want - centre).min() >= 0.999
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
