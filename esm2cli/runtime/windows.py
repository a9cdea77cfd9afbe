"""Long proteins whole: overlapping windows of W residues, embedded as sequences of their own, stitched back.

The rule (also in the README and in each output's metadata): a window holds W residues (the --truncate
value). A protein of L <= W residues is one window, embedded exactly as a plain sequence. For L > W,
windows start at 0, S, 2S, ... (S = W - overlap) while start + W < L, plus one last window that ends at
the protein's end (start L - W). A residue's per-token vector is the plain mean over the windows that
hold it; the `mean` embedding is the mean of those vectors over all L residues; `bos` is the mean of the
windows' <cls> vectors.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from esm2cli.errors import ConfigError

WINDOW_RULE = (
    "windows of W residues start at 0, S, 2S, ... (S = W - overlap) while start + W < L, plus one ending at L; "
    "a residue's vector is the mean over the windows holding it; mean = the mean of those over L; "
    "bos = the mean of the windows' <cls> vectors"
)


def check_overlap(width: int, overlap: int) -> None:
    """Refuses an overlap that leaves no stride.

    Raises:
        ConfigError: overlap is negative or not below the window width.
    """
    if not 0 <= overlap < width:
        raise ConfigError(f"--window-overlap {overlap} must be at least 0 and below the window of {width} residues")


def window_starts(length: int, width: int, overlap: int) -> list[int]:
    """Where each window of a protein of ``length`` residues starts (one window when it fits)."""
    if length <= width:
        return [0]
    stride = width - overlap
    starts = list(range(0, length - width, stride))
    return starts + [length - width]


def window_count(length: int, width: int, overlap: int) -> int:
    """How many windows window_starts gives, without listing them (a huge protein must be refused cheaply)."""
    if length <= width:
        return 1
    return -(-(length - width) // (width - overlap)) + 1


class WindowSums:
    """A long protein's per-residue sums and counts, filled window by window as results arrive.

    Windows are summed in the order of their starts, whatever order their batches finish in: a float sum
    depends on the order of its terms, and a protein's vectors must not depend on how its windows were batched
    (three windows holding one residue could otherwise round differently). A window that comes back before
    its turn waits; the windows of a protein sit in one chunk, sorted together, so few ever wait.
    Memory is L x hidden per layer whatever the number of windows: a large overlap multiplies the
    windows (and the compute), never what is held for one protein.
    """

    def __init__(self, length: int, starts: Sequence[int]):
        self.length = length
        self._order = sorted(starts)
        self._next: dict = {}  # layer -> position in _order of the next window to sum
        self._early: dict = {}  # layer -> {start: window} of windows back before their turn
        self._total: dict = {}
        self._count: dict = {}

    def add(self, layer, start: int, window: np.ndarray) -> None:
        """Adds one window's per-residue vectors (window residues, hidden), starting at residue ``start``."""
        early = self._early.setdefault(layer, {})
        early[start] = window
        turn = self._next.get(layer, 0)
        while turn < len(self._order) and self._order[turn] in early:
            self._sum(layer, self._order[turn], early.pop(self._order[turn]))
            turn += 1
        self._next[layer] = turn

    def _sum(self, layer, start: int, window: np.ndarray) -> None:
        if layer not in self._total:
            self._total[layer] = np.zeros((self.length, window.shape[1]), dtype=np.float64)
            self._count[layer] = np.zeros(self.length, dtype=np.float64)
        self._total[layer][start : start + len(window)] += window
        self._count[layer][start : start + len(window)] += 1

    def tokens(self, layer) -> np.ndarray:
        """Float32 (L, hidden): each residue's mean over the windows that hold it (all of them added)."""
        if self._early.get(layer) or self._next.get(layer, 0) != len(self._order):
            raise ValueError("a protein stitched before all its windows were added; this is a bug")
        return (self._total[layer] / self._count[layer][:, None]).astype(np.float32)


def stitch_tokens(length: int, starts: Sequence[int], tokens: Sequence[np.ndarray]) -> np.ndarray:
    """Per-residue vectors of the whole protein: the mean over the windows that hold each residue.

    Args:
        length: L, the protein's residues.
        starts: Each window's first residue.
        tokens: Each window's per-residue vectors, shape (window residues, hidden).

    Returns:
        Float32 array of shape (L, hidden).
    """
    sums = WindowSums(length, starts)
    for start, window in zip(starts, tokens, strict=True):
        sums.add(0, start, window)
    return sums.tokens(0)


OVERLAP_COST_WARNING = 2.0  # past this many computations per residue, an overlap is worth a word


def overlap_cost(width: int, overlap: int) -> float:
    """How many times a long protein's residues are computed in windows: W / (W - overlap)."""
    return width / (width - overlap)


def overlap_warning(width: int, overlap: int) -> str | None:
    """What to tell the user when an overlap multiplies the compute of long proteins (None when it does not)."""
    cost = overlap_cost(width, overlap)
    if cost <= OVERLAP_COST_WARNING:
        return None
    return (
        f"--window-overlap {overlap} with windows of {width} residues computes each residue of a long protein "
        f"{cost:.1f} times (W / (W - overlap)): that much more time; an overlap of at most {width // 2} "
        "keeps it under 2"
    )


def stitch_pooled(pooling: str, stitched: np.ndarray | None, window_pooled: Sequence[np.ndarray]) -> np.ndarray:
    """The protein's pooled vector: the mean of its stitched residues, or of its windows' <cls> vectors."""
    if pooling == "mean":
        if stitched is None:
            raise ValueError("mean pooling of windows without their stitched residues; this is a bug")
        return np.asarray(stitched.mean(axis=0, dtype=np.float64), dtype=np.float32)
    return np.asarray(np.mean(np.stack(window_pooled), axis=0, dtype=np.float64), dtype=np.float32)


def computed_residues(length: int, embed) -> int:
    """Residues the model computes for a protein of ``length`` residues under ``embed`` (an EmbedConfig)."""
    width = embed.truncate
    if embed.long_sequences == "window" and length > width:
        return len(window_starts(length, width, embed.window_overlap)) * width
    return min(length, width)


def model_tokens(length: int, embed) -> int:
    """Tokens the model sees for a protein: its computed residues plus <cls> and <eos> per window."""
    windows = (
        len(window_starts(length, embed.truncate, embed.window_overlap)) if embed.long_sequences == "window" else 1
    )
    return computed_residues(length, embed) + 2 * windows


class WindowPlan:
    """The server's side of the rule: request sequences become batch items (one per window of a long
    protein in window mode), and the items' results become one row per sequence again.

    Each item's result is a dict {layer: pooled vector}, with "tokens": {layer: per-residue vectors}
    when the batch brought them back (window mode asks for them).
    """

    def __init__(self, embed, seqs: Sequence[str]):
        self.embed = embed
        self.items: list[str] = []
        self.parts: list[tuple[int, list[int] | None, list[int]]] = []
        for seq in seqs:
            first = len(self.items)
            if embed.long_sequences == "window" and len(seq) > embed.truncate:
                starts = window_starts(len(seq), embed.truncate, embed.window_overlap)
                self.items += [seq[s : s + embed.truncate] for s in starts]
                self.parts.append((len(seq), starts, list(range(first, len(self.items)))))
            else:
                self.items.append(seq)
                self.parts.append((len(seq), None, [first]))

    def rows(self, results: Sequence[dict]) -> list[dict]:
        """One {layer: vector} per request sequence, windows stitched."""
        out = []
        for length, starts, ids in self.parts:
            if starts is None:
                out.append({k: v for k, v in results[ids[0]].items() if k != "tokens"})
                continue
            layers = [k for k in results[ids[0]] if k != "tokens"]
            out.append({
                layer: stitch_pooled(
                    self.embed.pooling,
                    stitch_tokens(length, starts, [results[i]["tokens"][layer] for i in ids]),
                    [results[i][layer] for i in ids],
                )
                for layer in layers
            })  # fmt: skip
        return out
