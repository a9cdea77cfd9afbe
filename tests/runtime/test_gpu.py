"""Checks that need a CUDA device (skipped without one): run by benchmarks/gpu_check.sh on a GPU machine."""

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from esm2cli.cli import cli
from helpers import write_fasta
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


def test_two_replicas_on_one_card_capture_one_after_another_and_replay_the_eager_forward():
    from esm2cli.config import BatchConfig, EmbedConfig, ModelConfig
    from esm2cli.jobs.workload import synthetic_sequences
    from esm2cli.model.load import load_model
    from esm2cli.runtime.devices import Device
    from esm2cli.runtime.engine import Engine, _capture_graphs
    from esm2cli.runtime.replica import build_replicas

    loaded = load_model(ModelConfig(model="esm2_t6_8M", load_format="dummy", dtype="bfloat16"))
    cuda = Device("cuda:0", "cuda:0")
    replicas = build_replicas(loaded, [cuda, cuda], EmbedConfig(), BatchConfig(max_tokens=4096))
    _capture_graphs(replicas)
    for replica in replicas:
        graphs = replica.graphs
        assert graphs is not None and not graphs.failed
        assert all(st.graph is not None for st in graphs._static.values())  # every check against eager passed
    seqs = [s for _, s in synthetic_sequences(12, seed=5, max_length=300)]
    want = replicas[0].forward.embed(replicas[0].pack(seqs), (6,)).pooled[6]
    with Engine(replicas) as engine:
        results = [f.result() for f in [engine.submit(seqs) for _ in range(6)]]
    for result in results:
        assert cosine(result.pooled[6], want).min() >= 0.9999
    assert sum(r.graphs.graph_batches for r in replicas) == 6
