"""Checks that need a CUDA device (skipped without one): run by benchmarks/gpu_check.sh on a GPU machine."""

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from conftest import write_fasta
from esm2cli.cli import cli
from reference import DirectReference, cosine

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype, floor", [("float32", 0.9999), ("bfloat16", 0.999)])
def test_embed_on_cuda_matches_direct_cpu_computation(tmp_path, tiny_model_dir, proteins, dtype, floor):
    fa = write_fasta(tmp_path / "in.fa", proteins)
    out = tmp_path / "out.parquet"
    result = CliRunner().invoke(cli, ["embed", fa, "-o", str(out), "-m", tiny_model_dir, "--devices", "auto",
                                      "--dtype", dtype])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "cuda:0" in result.output
    direct = DirectReference(tiny_model_dir)
    table = pq.read_table(out)
    want = np.stack([direct.mean(seq[:1022]) for _, seq in proteins])
    assert cosine(np.array(table["embedding"].to_pylist()), want).min() >= floor


def test_auto_dtype_is_bf16_on_a_bf16_gpu():
    from esm2cli.runtime.devices import resolve_devices, resolve_dtype

    assert resolve_dtype("auto", resolve_devices("auto")) == (
        "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    )
