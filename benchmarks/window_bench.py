"""Window mode against truncate mode, side by side on one FASTA where about 10% of the proteins are long.

    python -m benchmarks.window_bench --model esm2_t12_35M --sequences 200 --rounds 2

Both modes run the real `esm2cli embed` pipeline (in this process, random weights of the named size, the
same engine settings), alternating, on the same input. Reported: residues the model computed (windows
count every residue they hold), the time, tokens/s and the ratio window/truncate, and the extra compute the
windows cost.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

from esm2cli.config import BatchConfig, EmbedConfig, InputConfig, ModelConfig
from esm2cli.jobs.bench import model_flops
from esm2cli.jobs.pipeline import embed_fasta
from esm2cli.jobs.workload import synthetic_sequences
from esm2cli.model.architecture import ARCHITECTURES
from esm2cli.runtime.windows import computed_residues, window_starts


def write_input(path: Path, count: int, long_share: float, seed: int) -> list[int]:
    """UniProt-like proteins, a ``long_share`` of them replaced by 1,100-4,000-residue ones."""
    rng = random.Random(seed)
    lengths = []
    with open(path, "w") as out:
        for rec_id, seq in synthetic_sequences(count, seed=seed, max_length=1022):
            if rng.random() < long_share:
                seq = "".join(rng.choice("ACDEFGHIKLMNPQRSTVWY") for _ in range(rng.randint(1100, 4000)))
            out.write(f">{rec_id}\n{seq}\n")
            lengths.append(len(seq))
    return lengths


def run(fasta: Path, out: Path, model: str, embed: EmbedConfig, devices: str) -> float:
    start = time.perf_counter()
    embed_fasta(str(fasta), str(out), model=ModelConfig(model=model, load_format="dummy", devices=devices),
                embed=embed, batch=BatchConfig(), inputs=InputConfig(), overwrite=True)  # fmt: skip
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="esm2_t12_35M")
    parser.add_argument("--sequences", type=int, default=200)
    parser.add_argument("--long-share", type=float, default=0.10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--devices", default="auto")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    modes = {"truncate": EmbedConfig(), "window": EmbedConfig(long_sequences="window")}
    with tempfile.TemporaryDirectory() as tmp:
        fasta = Path(tmp) / "in.fa"
        lengths = write_input(fasta, args.sequences, args.long_share, args.seed)
        long = sum(n > 1022 for n in lengths)
        tokens = {m: sum(computed_residues(n, e) for n in lengths) for m, e in modes.items()}
        layers, hidden, _ = ARCHITECTURES[args.model]
        items = {
            "truncate": [min(n, 1022) for n in lengths],
            "window": [min(n, 1022) for n in lengths for _ in window_starts(n, 1022, 256)],
        }
        flops = {m: model_flops(items[m], layers, hidden) for m in modes}
        times: dict[str, list[float]] = {m: [] for m in modes}
        for round_ in range(args.rounds):
            for mode, embed in modes.items():  # a fresh output each time: a rerun would be "already complete"
                out = Path(tmp) / f"{mode}-{round_}.parquet"
                times[mode].append(run(fasta, out, args.model, embed, args.devices))
    print(f"{args.model}, {args.sequences} proteins ({long} longer than 1,022 residues, {sum(lengths):,} residues), "
          f"devices {args.devices}, {args.rounds} rounds alternating:")  # fmt: skip
    rate, flop_rate = {}, {}
    for mode in modes:
        best = min(times[mode])
        rate[mode] = tokens[mode] / best
        flop_rate[mode] = flops[mode] / best
        rounds = ", ".join(f"{t:.1f}" for t in times[mode])
        print(f"  {mode:8s}: {tokens[mode]:,} residues computed, best {best:.1f} s ({rounds}), "
              f"{rate[mode]:,.0f} residues/s")  # fmt: skip
    print(
        f"window/truncate model FLOP/s: {flop_rate['window'] / flop_rate['truncate']:.3f} (a 1,022-token window "
        "costs more per token than a short protein: attention grows with the square of the length)"
    )
    print(f"window/truncate speed (residues computed per second): {rate['window'] / rate['truncate']:.3f}; "
          f"windows compute {tokens['window'] / tokens['truncate'] - 1:.1%} more residues "
          f"and cover {sum(lengths) / tokens['truncate'] - 1:.1%} more of the input")  # fmt: skip


if __name__ == "__main__":
    main()
