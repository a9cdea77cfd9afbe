"""One modeled configuration of the real embed pipeline, for profiling the host (py-spy, cProfile).

Runs esm2cli.jobs.pipeline.embed_fasta once on N modeled GPUs over a synthetic FASTA sized to --seconds,
and prints the host efficiency with the process's CPU time per protein. Profile it with, for example:

    pip install py-spy
    py-spy record --threads --gil -r 250 -f raw -o gil.txt -- python -m benchmarks.host_profile --card h100 --gpus 8
    python -m benchmarks.host_profile --card h100 --gpus 8 --seconds 10
    python -m benchmarks.host_profile --card h100 --gpus 8 --old-checks   # the FASTA checks before their fast paths
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from esm2cli.config import BatchConfig, EmbedConfig, InputConfig, ModelConfig, ModeledGPU
from esm2cli.jobs.bench import _modeled_row, _seconds_per_residue
from esm2cli.jobs.pipeline import embed_fasta
from esm2cli.jobs.workload import draw_sequences, fasta_text
from esm2cli.runtime.engine import build_engine


def _old_checks() -> None:
    """Puts back the FASTA checks as they were before their fast paths (set(seq), per-character headers)."""
    import unicodedata

    from esm2cli.io import fasta

    def normalise(raw: str) -> str:
        seq = raw.translate(fasta._WHITESPACE).translate(fasta._ASCII_UPPER)
        return seq[:-1] if seq.endswith("*") else seq

    def check_sequence(seq: str) -> str | None:
        if not seq:
            return "empty sequence"
        return "outside the alphabet" if set(seq) - fasta.RESIDUES else None

    def check_text(text: str, what: str) -> str | None:
        for ch in text:
            if ch != "\t" and unicodedata.category(ch) in ("Cc", "Cs"):
                return f"{what} holds a control character"
        return None

    fasta.normalise, fasta.check_sequence, fasta.check_text = normalise, check_sequence, check_text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--card", default="h100")
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0, help="modeled device time of the workload")
    parser.add_argument("--model", default="esm2_t33_650M")
    parser.add_argument("--mfu", type=float, default=ModeledGPU(card="h100").mfu)
    parser.add_argument("--launch-ms", type=float, default=0.0)
    parser.add_argument("--per-token", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--queue-depth", type=int, default=2, help="batches waiting per replica")
    parser.add_argument("--old-checks", action="store_true", help="the FASTA checks before their fast paths")
    args = parser.parse_args()
    if args.old_checks:
        _old_checks()
    gpu = ModeledGPU(card=args.card, count=args.gpus, mfu=args.mfu, launch_ms=args.launch_ms)
    model = ModelConfig(model=args.model, load_format="dummy", simulate=gpu)
    embed = EmbedConfig(per_token=args.per_token)
    setup = build_engine(model, embed, BatchConfig(), queue_depth=args.queue_depth)
    sample = draw_sequences(4096, seed=args.seed + 10_000)
    per_residue = _seconds_per_residue(sample, setup)
    mean = sum(map(len, sample)) / len(sample)
    count = int(args.gpus * args.seconds / per_residue / mean)
    with tempfile.TemporaryDirectory(prefix="esm2cli-host-") as work:
        fasta = Path(work) / "in.fasta"
        fasta.write_text(fasta_text(draw_sequences(count, seed=args.seed)))
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        begin = time.perf_counter()
        with setup.engine:
            summary = embed_fasta(
                fasta, Path(work) / "out.parquet", model=replace(model, dtype=setup.dtype), embed=embed,
                batch=setup.batch, inputs=InputConfig(), setup=setup,
            )  # fmt: skip
        end = time.perf_counter()
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    row = _modeled_row(args.gpus, setup, summary, begin, end)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    print(
        f"{args.gpus} modeled {args.card.upper()} (MFU {args.mfu:g}, launch {args.launch_ms:g} ms, queue depth "
        f"{args.queue_depth}{', old FASTA checks' if args.old_checks else ''}), {args.model}: "
        f"{summary.sequences:,} proteins, {summary.residues:,} residues\n"
        f"device phase {row.seconds:.2f} s: {row.residues_per_s:,.0f} residues/s, {row.sequences_per_s:,.0f} "
        f"proteins/s; modeled ideal {row.modeled_residues_per_s:,.0f}: host efficiency {row.host_efficiency:.1%}\n"
        f"startup {row.startup_s:.2f} s, finish {row.finish_s:.2f} s, end to end {end - begin:.2f} s\n"
        f"process CPU {cpu:.2f} s: {cpu / summary.sequences * 1e6:.0f} us per protein "
        f"({cpu / (end - begin):.2f} cores busy on average)"
    )


if __name__ == "__main__":
    main()
