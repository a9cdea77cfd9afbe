"""What forward_ab.py and esmc_ab.py share: the matmul peak, the card's name and the side-by-side loop."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from esm2cli.config import DEFAULT_BATCH_SIZE, GPU_PEAKS
from esm2cli.runtime.batching import pack_batches, plan_batches


def shortest_fill(lengths: list[int], max_tokens: int, max_batch: int, specials: int = 2) -> list[list[int]]:
    """The packer embed used before best fit: the longest sequences left, then the gap filled with the shortest."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], -i))
    short, long = 0, len(order) - 1
    batches: list[list[int]] = []
    while short <= long:
        batch, tokens = [order[long]], lengths[order[long]] + specials
        long -= 1
        for end in ("long", "short"):
            while short <= long and len(batch) < max_batch:
                i = order[long] if end == "long" else order[short]
                if tokens + lengths[i] + specials > max_tokens:
                    break
                batch.append(i)
                tokens += lengths[i] + specials
                long, short = (long - 1, short) if end == "long" else (long, short + 1)
        batches.append(batch)
    return batches


# "sorted": batches of similar length (fair to a forward that pads every row to the widest); "packed": as
# esm2cli embed plans them (best fit: the fewest padding rows of the last tile); "shortest-fill": the packer
# before best fit, to price the change.
PLANS = {"sorted": plan_batches, "packed": pack_batches, "shortest-fill": shortest_fill}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 8192, rounds: int = 20) -> float:
    """FLOP/s of a large square matmul on the device: the practical ceiling of a dense forward."""
    if device.type != "cuda":
        n, rounds = 1024, 5
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(rounds):
        a @ b
    sync(device)
    return 2 * n**3 * rounds / (time.perf_counter() - start)


def card_name(device: torch.device) -> str | None:
    """h100 or h200 (the keys of GPU_PEAKS) from the device's name."""
    name = torch.cuda.get_device_name(device).lower()
    return next((key for key in GPU_PEAKS if key in name), None)


def batches_of(seqs: list[str], budget: int, plan: str = "sorted") -> list[list[str]]:
    """The proteins cut into batches of ``budget`` tokens by one of PLANS."""
    return [[seqs[i] for i in b] for b in PLANS[plan]([len(s) for s in seqs], budget, DEFAULT_BATCH_SIZE)]


def residue_mean(hidden: torch.Tensor, seqs: list[str]) -> torch.Tensor:
    """A padded forward's (B, W, H) hidden states averaged over each protein's residues (<cls> and padding out)."""
    lengths = torch.tensor([len(s) for s in seqs], device=hidden.device)
    pos = torch.arange(hidden.shape[1], device=hidden.device)
    residues = (pos[None, :] >= 1) & (pos[None, :] <= lengths[:, None])
    return (hidden * residues[..., None]).sum(1) / lengths[:, None]


def lowest_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """The lowest cosine between matching rows of two (n, H) arrays."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


def side_by_side(
    forwards: dict[str, Callable[[list[str]], np.ndarray]],
    batches: list[list[str]],
    *,
    rounds: int,
    device: torch.device,
    compare: Callable[[dict[str, np.ndarray]], None],
) -> dict[str, float]:
    """Seconds each forward spent on every batch, ``rounds`` times, the forwards taking turns batch by batch.

    Each forward goes first in turn: the one after another finds the caches warm (or the machine busy), so a
    fixed order would price the order. ``compare`` gets each batch's outputs by name.
    """
    seconds = dict.fromkeys(forwards, 0.0)
    order = list(forwards.items())
    for r in range(rounds):
        for i, batch in enumerate(batches):
            outs = {}
            shift = (r * len(batches) + i) % len(order)
            for name, fn in order[shift:] + order[:shift]:
                sync(device)
                start = time.perf_counter()
                outs[name] = fn(batch)
                seconds[name] += time.perf_counter() - start
            compare(outs)
    return seconds
