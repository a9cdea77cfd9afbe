"""The null model behind search E-values: decoy queries, the exceedance rate they measure, its fitted tail.

A decoy is a query unrelated to every database protein: a database sequence with its residues shuffled (same
composition and length, no homology left), or a random sequence of background composition. The builder embeds
the decoys with the database's model, searches them, and hands their top-K cosines to ``fit_null``.

For a score s, r(s) is the chance that one unrelated target scores >= s: the count of decoy-target pairs scoring
>= s over decoys x targets. Where the decoys saw enough such pairs the count itself is used; above that, a tail
log r(s) = a - lambda*s (the exponential tail of the Gumbel extreme-value law, the form of BLAST's Karlin-Altschul
statistics), lambda fit by maximum likelihood on the pairs above a threshold and a set so that the tail meets the
empirical curve. E(s, N) = N * r(s): the number of targets of a database of N expected to score >= s against a
query unrelated to all of them. docs/evalues.md shows its calibration on held-out decoys.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field

import numpy as np

from esm2cli.config import __version__
from esm2cli.errors import ConfigError, InputError, StorageError
from esm2cli.io.fasta import read_records
from esm2cli.io.records import RecordHasher
from esm2cli.io.schema import is_damage, open_parquet
from esm2cli.io.storage import file_stamp, is_stream, open_input
from esm2cli.search.vectors import VectorInput

# Top cosines of each decoy the builder keeps: counts are exact down to the score where a decoy has K hits above
# it, so E-values are measured (not extrapolated) up to about K for every decoy, ~100x the usual cut-off of 10.
DECOY_TOP_K = 1000
MIN_DECOYS = 10  # with fewer, the score of E = 1 rests on fewer than 10 decoy hits
FORMAT = "esm2cli-null"
FORMAT_VERSION = 1
METHOD = "empirical exceedance rate of decoy queries, exponential (Gumbel) tail"
# The empirical rate is used where at least this many decoy-target pairs score above (a count of 10 is known to
# about +-30%, Poisson); past it the fitted tail, anchored there, takes over.
JOIN_PAIRS = 10
# lambda is fit on the pairs above the score an average decoy exceeds TAIL_PER_DECOY times (at least TAIL_PAIRS
# of them: lambda to +-14%). Cosine tails fall faster than exponential (a bounded score; Gaussian-like for random
# directions), so a slope fit lower down is too shallow at the top and E too large (conservative) there. Measured
# on held-out decoys (benchmarks/calibration.py, synthetic set, 1,000 decoys): hits at E <= 0.001 came to 0.4 of
# the nominal rate with this threshold, 0.1 with one at 3 per decoy.
TAIL_PER_DECOY = 0.25
TAIL_PAIRS = 50
CURVE_POINTS_PER_DECADE = 32  # the stored curve: one point each time the pair count grows 7.5%

# Amino-acid frequencies of UniProtKB/Swiss-Prot (release statistics, %): the background of random decoys.
UNIPROT_COMPOSITION = {
    "A": 8.25, "R": 5.53, "N": 4.06, "D": 5.46, "C": 1.38, "Q": 3.93, "E": 6.72, "G": 7.07, "H": 2.27, "I": 5.91,
    "L": 9.65, "K": 5.80, "M": 2.41, "F": 3.86, "P": 4.74, "S": 6.64, "T": 5.35, "W": 1.10, "Y": 2.92, "V": 6.86,
}  # fmt: skip


# ---- the model -------------------------------------------------------------------------------------------


@dataclass
class NullModel:
    """The rate at which an unrelated target reaches a cosine, as measured on decoys: what null.json holds.

    Attributes:
        description: The null the decoys make (decoy_sequences' line).
        decoys, targets, top_k: How many decoy queries, against how many database vectors, top cosines of each.
        lam, a: The tail log r(s) = a - lam*s, used above ``join``.
        threshold: The score above which lam was fit.
        join: The highest score of the empirical curve, where the tail takes over (continuous there).
        exact_from: The empirical counts are exact at and above it; below, a decoy with K hits above a score may
            have had more (its top K only were kept), so the rate there is a lower bound.
        scores, rates: The empirical curve, scores ascending, rates r(s) strictly falling.
    """

    description: str
    decoys: int
    targets: int
    top_k: int
    lam: float
    a: float
    threshold: float
    join: float
    exact_from: float
    scores: list[float] = field(repr=False)
    rates: list[float] = field(repr=False)
    method: str = METHOD
    esm2cli_version: str = __version__

    def to_json(self) -> dict:
        """The model as null.json holds it."""
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION, "esm2cli_version": self.esm2cli_version,
            "method": self.method, "description": self.description, "decoys": self.decoys,
            "targets": self.targets, "top_k": self.top_k, "lambda": self.lam, "a": self.a,
            "tail_threshold": self.threshold, "join": self.join, "exact_from": self.exact_from,
            "curve": {"score": list(self.scores), "rate": list(self.rates)},
        }  # fmt: skip

    @classmethod
    def from_json(cls, data: dict, path: str = "null.json") -> NullModel:
        """The model of a null.json's content.

        Raises:
            InputError: The data is no esm2cli null model, of a format this version cannot read, or broken
                (a missing or mistyped field, a curve that rises); the message names ``path``.
        """
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise InputError(f"{path}: not an esm2cli null model (no format {FORMAT!r})")
        if data.get("format_version") != FORMAT_VERSION:
            raise InputError(
                f"{path}: null model format version {data.get('format_version')!r}; this esm2cli reads "
                f"{FORMAT_VERSION} (rebuild the database, or use the esm2cli that built it)"
            )
        try:
            model = cls(
                description=_typed(data, "description", str), decoys=_typed(data, "decoys", int),
                targets=_typed(data, "targets", int), top_k=_typed(data, "top_k", int),
                lam=_typed(data, "lambda", float), a=_typed(data, "a", float),
                threshold=_typed(data, "tail_threshold", float), join=_typed(data, "join", float),
                exact_from=_typed(data, "exact_from", float), scores=_floats(data, "score"),
                rates=_floats(data, "rate"), method=_typed(data, "method", str),
                esm2cli_version=_typed(data, "esm2cli_version", str),
            )  # fmt: skip
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{path}: broken null model ({exc})") from None
        problem = model._problem()
        if problem:
            raise InputError(f"{path}: broken null model ({problem})")
        return model

    def _problem(self) -> str | None:
        scores, rates = np.array(self.scores), np.array(self.rates)
        if min(self.decoys, self.targets, self.top_k) < 1 or not scores.size or scores.shape != rates.shape:
            return "counts below 1, or a curve without points or of unequal lengths"
        if not (self.lam > 0 and math.isfinite(self.lam + self.a)):
            return f"lambda {self.lam}, a {self.a}: lambda must be positive and both finite"
        if (np.diff(scores) <= 0).any() or (np.diff(rates) >= 0).any() or not (0 < rates).all() or rates[0] > 1:
            return "the curve's scores must rise and its rates fall, within (0, 1]"
        if not math.isclose(self.a - self.lam * self.join, math.log(rates[-1]), rel_tol=1e-9, abs_tol=1e-9):
            return "the tail does not meet the curve at the join"
        return None

    def evalue(self, scores: np.ndarray, targets: int) -> np.ndarray:
        """E for hits of cosine ``scores`` in a database of ``targets`` vectors.

        E is the number of database vectors expected to score >= the score against a query unrelated to all of
        them: targets x r(score), r from the decoys' counts where they saw enough, the fitted tail above. Falls
        as the score rises; at most ``targets``. A NaN score gets a NaN.

        Raises:
            ValueError: ``targets`` is below 1 (this is a bug).
        """
        if targets < 1:
            raise ValueError(f"evalue: a database of {targets} targets; this is a bug")
        return targets * np.exp(self._log_rate(np.asarray(scores, np.float64)))

    def score_for(self, evalue: float, targets: int) -> float:
        """The score whose E is ``evalue`` in a database of ``targets`` (hits at or above it have E <= evalue,
        up to rounding); -inf when every hit has (``evalue`` >= targets)."""
        if not evalue > 0 or targets < 1:
            raise ValueError(f"score_for: E {evalue} in {targets} targets; this is a bug")
        want = math.log(evalue / targets)
        xs, logs = np.array(self.scores), np.log(self.rates)
        if want >= 0:
            return float("-inf")
        if want > logs[0]:
            return float(xs[0] - (want - logs[0]) / self.lam)
        if want >= logs[-1]:
            return float(np.interp(-want, -logs, xs))
        return (self.a - want) / self.lam

    def _log_rate(self, scores: np.ndarray) -> np.ndarray:
        xs, logs = np.array(self.scores), np.log(self.rates)
        log_rate = np.interp(scores, xs, logs)
        below, above = scores < xs[0], scores > self.join
        log_rate[below] = np.minimum(0.0, logs[0] + self.lam * (xs[0] - scores[below]))
        log_rate[above] = self.a - self.lam * scores[above]
        log_rate[np.isnan(scores)] = np.nan
        return log_rate


def _typed(data: dict, key: str, kind: type):
    value = data[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise TypeError(f"{key!r} is {value!r}, not {kind.__name__}")
    return value


def _floats(data: dict, key: str) -> list[float]:
    values = data["curve"][key]
    if not isinstance(values, list) or not all(isinstance(v, int | float) and math.isfinite(v) for v in values):
        raise TypeError(f"curve {key!r} is not a list of finite numbers")
    return [float(v) for v in values]


def fit_null(decoy_scores: np.ndarray, targets: int, description: str) -> NullModel:
    """The null model of some decoys' top cosines against a database.

    Args:
        decoy_scores: (decoys, K) the top K cosines of each decoy query against the database's vectors, K at
            most ``targets`` (min(DECOY_TOP_K, targets)); any order within a row.
        targets: The database's vector count.
        description: The null the decoys make (decoy_sequences' line).

    Raises:
        ConfigError: Fewer than MIN_DECOYS decoys.
        InputError: Every decoy score is the same: the vectors cannot tell unrelated proteins apart.
        ValueError: Scores of another shape, K > targets, or a NaN or infinite score (this is a bug).
    """
    scores = _checked(decoy_scores, targets)
    decoys, top_k = scores.shape
    pairs = np.sort(scores.ravel())
    if pairs[0] == pairs[-1]:
        raise InputError(
            f"all {pairs.size} decoy scores are {pairs[0]:.6g}: the database's vectors do not tell unrelated "
            "proteins apart, so no E-value can be fit"
        )
    lam, threshold = _tail_slope(pairs, decoys)
    xs, rates = _curve(pairs, decoys * targets)
    exact_from = float(scores[:, -1].max()) if top_k < targets else float(pairs[0])
    a = math.log(rates[-1]) + lam * xs[-1]
    return NullModel(
        description=description, decoys=decoys, targets=targets, top_k=top_k, lam=lam, a=a,
        threshold=threshold, join=xs[-1], exact_from=exact_from, scores=xs, rates=rates,
    )  # fmt: skip


def _checked(decoy_scores: np.ndarray, targets: int) -> np.ndarray:
    """The scores as float64, each row descending; refused when they cannot be decoys' top K."""
    scores = np.asarray(decoy_scores, np.float64)
    if scores.ndim != 2 or scores.shape[1] < 1:
        raise ValueError(f"fit_null: decoy scores of shape {scores.shape}, not (decoys, K); this is a bug")
    if scores.shape[0] < MIN_DECOYS:
        raise ConfigError(f"{scores.shape[0]} decoys: at least {MIN_DECOYS} are needed to fit E-values")
    if scores.shape[1] > targets:
        raise ValueError(f"fit_null: the top {scores.shape[1]} of {targets} targets; this is a bug")
    if not np.isfinite(scores).all():
        raise ValueError("fit_null: a decoy score is NaN or infinite; this is a bug")
    return -np.sort(-scores, axis=1)


def _tail_slope(pairs: np.ndarray, decoys: int) -> tuple[float, float]:
    """lambda by maximum likelihood (an exponential's: exceedances over their sum) above the threshold."""
    wanted = min(max(math.ceil(TAIL_PER_DECOY * decoys), TAIL_PAIRS), pairs.size - 1)
    threshold = pairs[pairs.size - 1 - wanted]
    if threshold == pairs[-1]:  # the top scores all tie: the threshold moves down to the next distinct score
        threshold = pairs[pairs < pairs[-1]][-1]
    over = pairs[pairs > threshold]
    return float(over.size / (over - threshold).sum()), float(threshold)


def _curve(pairs: np.ndarray, pair_count: int) -> tuple[list[float], list[float]]:
    """The empirical rate at geometrically spaced counts of pairs, from all of them up to JOIN_PAIRS."""
    total = pairs.size
    low = min(JOIN_PAIRS, total)
    levels = np.geomspace(low, total, max(2, round(CURVE_POINTS_PER_DECADE * math.log10(total / low)) + 1))
    xs = np.unique(pairs[total - np.unique(np.round(levels).astype(np.int64))])
    counts = total - np.searchsorted(pairs, xs, side="left")
    return xs.tolist(), (counts / pair_count).tolist()


# ---- decoys ----------------------------------------------------------------------------------------------


def decoy_sequences(db_inputs: list[VectorInput], fasta: str | None, count: int, seed: int) -> tuple[list[str], str]:
    """Decoy queries for a database: residue-shuffled database sequences, else random background sequences.

    The database's sequences are read from ``fasta`` when given, else from the input FASTA its outputs name
    (metadata "input") when that file is readable and is still what was embedded (its records' sha256 equals the
    identity's ``input_sha256``; a byte-range shard's file its recorded size and stamp). Records are matched to
    the database's rows by id. Without such a FASTA, the decoys are random sequences of UniProt amino-acid
    composition whose lengths are drawn from the database's ``length`` column.

    Args:
        db_inputs: The database's outputs (search.vectors.open_inputs).
        fasta: A FASTA the outputs were embedded from, or None.
        count: How many decoys.
        seed: The same seed (and inputs) gives the same decoys.

    Returns:
        The decoy sequences and a one-line description of the null they make.

    Raises:
        ConfigError: ``count`` is below 1.
        InputError: ``fasta`` holds none of the database's ids, or an output cannot be read.
        FastaError: ``fasta`` is missing or not FASTA.
    """
    if count < 1:
        raise ConfigError(f"decoys: {count}; at least 1 is needed")
    rng = np.random.default_rng(seed)
    ids, lengths = _annotations(db_inputs)
    picks = _sample(rng, len(ids), count)
    wanted = {ids[i] for i in picks}
    found, source, why = _database_sequences(db_inputs, fasta, wanted)
    chosen = [found[ids[i]] for i in picks if ids[i] in found]
    if not chosen:
        return _background(rng, lengths, count), (
            f"{count} random sequences of UniProt amino-acid composition with the database's lengths ({why})"
        )
    distinct = len({ids[i] for i in picks if ids[i] in found})
    if len(chosen) < count:  # some sampled ids are not in the FASTA: more shuffles of the ones that are
        chosen += [chosen[i] for i in rng.integers(0, len(chosen), count - len(chosen))]
    shuffled = [_shuffle(rng, seq) for seq in chosen]
    copies = "database sequences" if distinct == count else f"copies of {distinct} database sequences"
    return shuffled, f"{count} residue-shuffled {copies} (from {source})"


def _sample(rng: np.random.Generator, rows: int, count: int) -> np.ndarray:
    """Row indices: distinct while the database has enough rows, then drawn again."""
    first = rng.choice(rows, size=min(rows, count), replace=False)
    return np.concatenate([first, rng.integers(0, rows, count - len(first))]) if count > rows else first


def _shuffle(rng: np.random.Generator, seq: str) -> str:
    residues = np.frombuffer(seq.encode("ascii"), np.uint8)
    return rng.permutation(residues).tobytes().decode("ascii")


def _background(rng: np.random.Generator, lengths: np.ndarray, count: int) -> list[str]:
    alphabet = np.frombuffer("".join(UNIPROT_COMPOSITION).encode(), np.uint8)
    weights = np.array(list(UNIPROT_COMPOSITION.values()))
    drawn = np.maximum(rng.choice(lengths, size=count), 1)
    residues = rng.choice(alphabet, size=int(drawn.sum()), p=weights / weights.sum())
    ends = np.cumsum(drawn)
    return [residues[end - n : end].tobytes().decode("ascii") for n, end in zip(drawn, ends, strict=True)]


def _database_sequences(
    db_inputs: Sequence[VectorInput], fasta: str | None, wanted: set[str]
) -> tuple[dict[str, str], str, str]:
    """The wanted ids' sequences, where they were read from, and (when none) why none could be read."""
    if fasta is not None:
        given, _ = _collect(fasta, wanted)
        if not given:
            raise InputError(f"{fasta}: holds none of the database's records (records are matched by id)")
        return given, os.path.basename(fasta), ""
    found: dict[str, str] = {}
    sources: list[str] = []
    why: list[str] = []
    for path, identity in _named_inputs(db_inputs):
        seqs, problem = _embedded_input(path, identity, wanted)
        if problem is not None:
            why.append(problem)
            continue
        found.update(seqs)
        sources.append(os.path.basename(path))
    return found, ", ".join(sources), "; ".join(why) or "the outputs name no input FASTA"


def _named_inputs(db_inputs: Sequence[VectorInput]) -> Iterator[tuple[str, dict]]:
    """Each distinct (input FASTA, its run identity) the outputs name."""
    seen = set()
    for source in db_inputs:
        path, identity = source.metadata.get("input"), source.metadata.get("identity") or {}
        key = (path, identity.get("input_sha256"), str(identity.get("input_slice")))
        if isinstance(path, str) and key not in seen:
            seen.add(key)
            yield path, identity


def _embedded_input(path: str, identity: dict, wanted: set[str]) -> tuple[dict[str, str], str | None]:
    """The wanted sequences of the input a run names, or why it is not the file that run embedded.

    A run of the whole file recorded the sha256 of its records: the file is read and hashed again. A byte-range
    shard's hash covers only its slice, so its file is checked by the size and stamp it recorded (as merge does).
    """
    if is_stream(path):
        return {}, f"the input {path!r} was a stream"
    try:
        stamp = file_stamp(path)
        found, digest = _collect(path, wanted)
    except (InputError, StorageError):
        return {}, f"{path} cannot be read"
    piece = identity.get("input_slice")
    if piece is not None:
        same = (stamp["size"], str(stamp["modified"])) == (piece.get("size"), piece.get("stamp"))
    else:
        same = digest == identity.get("input_sha256")
    return (found, None) if same else ({}, f"{path} changed since it was embedded")


def _collect(path: str, wanted: set[str]) -> tuple[dict[str, str], str]:
    """The sequences of the wanted ids in a FASTA (an id's first valid record), and the sha256 of its records."""
    hasher, found = RecordHasher(), dict[str, str]()
    for record in read_records(path):
        hasher.update(record)
        if record.problem is None and record.id in wanted:
            found.setdefault(record.id, record.sequence)
    return found, hasher.hexdigest()


def _annotations(db_inputs: Sequence[VectorInput]) -> tuple[list[str], np.ndarray]:
    """The ids and lengths of every database row, in order (only those two columns are read)."""
    ids: list[str] = []
    lengths: list[np.ndarray] = []
    for source in db_inputs:
        found_ids, found_lengths = _file_annotations(source.path)
        ids += found_ids
        lengths.append(found_lengths)
    if not ids:
        raise InputError("the database holds no proteins")
    return ids, np.concatenate(lengths).astype(np.int64)


def _file_annotations(path: str) -> tuple[list[str], np.ndarray]:
    from esm2cli.io import hdf5

    with ExitStack() as stack:
        handle = stack.enter_context(open_input(path))
        if hdf5.is_hdf5(path):
            source = stack.enter_context(hdf5.require().File(handle, "r"))
            sets = [source[key] for key in source if key != hdf5.PER_TOKEN_GROUP]
            ids = [_text(d.attrs.get("original_id", "")) for d in sets]
            return ids, np.array([int(d.attrs.get("length", 0)) for d in sets], np.int64)
        try:
            table = open_parquet(handle).read(columns=["id", "length"])
        except OSError as exc:
            if is_damage(exc):
                raise InputError(f"{path} is damaged (a Parquet page fails its checksum)") from None
            raise
        return table.column("id").to_pylist(), table.column("length").to_numpy().astype(np.int64)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
