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
        total = self._total[layer]
        # Divided straight into float32 (the same bits as dividing in float64, then casting): no float64 quotient
        # of L x hidden beside the sums, which doubled what a very long protein held at its end.
        out = np.empty(total.shape, dtype=np.float32)
        return np.divide(total, self._count[layer][:, None], out=out, casting="same_kind")


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
    when the batch brought them back (window mode asks for them). ``take`` sums a window's per-residue
    vectors into its protein's WindowSums as its batch comes back, as esm2cli embed does, so that a request
    holds L x hidden per layer for a long protein, never every window's rows until its last is in.
    """

    def __init__(self, embed, seqs: Sequence[str]):
        self.embed = embed
        self.items: list[str] = []
        self.parts: list[list[int]] = []  # per sequence: its items
        self._windows: dict[int, tuple[WindowSums, int]] = {}  # window item -> (its protein's sums, its start)
        self._sums: list[WindowSums | None] = []  # per sequence: its sums (None: a sequence of one item)
        for seq in seqs:
            first = len(self.items)
            if embed.long_sequences == "window" and len(seq) > embed.truncate:
                starts = window_starts(len(seq), embed.truncate, embed.window_overlap)
                self.items += [seq[s : s + embed.truncate] for s in starts]
                self.parts.append(list(range(first, len(self.items))))
                sums = WindowSums(len(seq), starts)
                self._windows.update((first + k, (sums, s)) for k, s in enumerate(starts))
                self._sums.append(sums)
            else:
                self.items.append(seq)
                self.parts.append([first])
                self._sums.append(None)

    def take(self, item: int, result: dict) -> dict:
        """One item's result as it comes back: a window's per-residue vectors go into its protein's sums;
        returns what the request keeps of it (the pooled vectors, never the per-residue ones)."""
        tokens = result.get("tokens", {})
        if item in self._windows:
            sums, start = self._windows.pop(item)
            for layer, window in tokens.items():
                sums.add(layer, start, window)
        return {k: v for k, v in result.items() if k != "tokens"}

    def rows(self, results: Sequence[dict]) -> list[dict]:
        """One {layer: vector} per request sequence, windows stitched (every item's result taken)."""
        out = []
        for ids, sums in zip(self.parts, self._sums, strict=True):
            if sums is None:
                out.append(results[ids[0]])
                continue
            out.append({
                layer: stitch_pooled(self.embed.pooling, sums.tokens(layer), [results[i][layer] for i in ids])
                for layer in results[ids[0]]
            })  # fmt: skip
        return out
