"""What the map knows of each point and what colours it: a field of the outputs (length, truncated, windows), words
of the description, k-means clusters, or a column of a labels file joined by id.

Categories keep one colour each in the page and the image: at most MAX_CATEGORIES are named, the rest are "other";
points without a value (an id absent from the labels, a description the pattern does not match) are grey.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from esm2cli.errors import ConfigError, InputError
from esm2cli.io.storage import open_input

FIELDS = ("length", "truncated", "windows", "cluster")  # besides description:REGEX and the labels' columns
UNLABELLED = "unlabelled"
NO_MATCH = "no match"
MAX_CATEGORIES = 20  # named in the legend; more distinct values than this share "other"
# Tableau's 10 and their light shades, greys left out (grey means "no value" here), with two of tab20b: 20 colours
# a reader tells apart, in the page and in the image alike.
PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf", "#393b79",
    "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d", "#9edae5", "#637939",
)  # fmt: skip
GREY = "#c7c7c7"  # no value
OTHER_GREY = "#7f7f7f"  # the categories past MAX_CATEGORIES
SEQUENTIAL = "viridis"  # plotly's Viridis and matplotlib's viridis are one colour map


@dataclass
class Points:
    """Every point of a map: what the outputs say of its protein, where it lies, and its k-means cluster."""

    ids: pa.Array
    descriptions: pa.Array
    lengths: np.ndarray
    truncated: np.ndarray
    windows: np.ndarray
    xy: np.ndarray  # float32 (n, 2)
    clusters: np.ndarray | None = None  # int32, with --color-by cluster

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class ColorBy:
    """What --color-by names: a field, description words (pattern) or a labels column."""

    field: str  # one of FIELDS, "description" or "labels"
    pattern: re.Pattern | None = None
    column: str | None = None

    def __str__(self) -> str:
        if self.pattern is not None:
            return f"description:{self.pattern.pattern}"
        return self.column if self.field == "labels" and self.column else self.field


@dataclass(frozen=True)
class Labels:
    """A labels file: its ids (from the column named 'id', else the first column) and its other columns as text."""

    path: str
    id_column: str
    named_id: bool
    ids: pa.Array
    columns: dict[str, pa.Array]

    def id_source(self) -> str:
        return f"column {self.id_column!r}" if self.named_id else f"first column {self.id_column!r}"


@dataclass
class Colouring:
    """The colour of every point: a category (codes into names), or a value on a sequential scale."""

    title: str
    names: list[str] = field(default_factory=list)  # legend order; the grey ones last
    colours: list[str] = field(default_factory=list)  # one a name
    codes: np.ndarray | None = None  # int32, a point's index into names (categorical)
    values: np.ndarray | None = None  # float64, NaN for a point without a value (continuous)
    span: tuple[float, float] | None = None  # the scale's ends: the values' 1st and 99th percentiles
    grey: str = UNLABELLED  # what a point without a value is called (continuous)
    notes: list[str] = field(default_factory=list)  # what the summary says of it

    @property
    def continuous(self) -> bool:
        return self.values is not None

    def column(self) -> pa.Array:
        """Each point's colour as --coords writes it: its category, or its value (null without one)."""
        if self.values is not None:
            return pa.array(self.values, pa.float64(), mask=np.isnan(self.values))
        assert self.codes is not None, "a categorical colouring without codes: this is a bug"
        return pc.take(pa.array(self.names, pa.string()), pa.array(self.codes))


def parse_color_by(value: str | None, labels: Labels | None) -> ColorBy:
    """--color-by as given; None means the labels' first column beside the id, or the k-means clusters.

    Raises:
        ConfigError: Not a field, an invalid pattern, or no such labels column (the columns named).
    """
    if value is None:
        return ColorBy("labels", column=next(iter(labels.columns))) if labels else ColorBy("cluster")
    if value in FIELDS:
        return ColorBy(value)
    if value.startswith("description:"):
        return ColorBy("description", pattern=_pattern(value.removeprefix("description:")))
    column = value.removeprefix("labels:")
    if labels is None:
        raise ConfigError(
            f"--color-by {value}: not a field ({', '.join(FIELDS)}, description:REGEX); "
            "name a labels file with --labels to colour by one of its columns"
        )
    if column not in labels.columns:
        have = ", ".join(labels.columns)
        raise ConfigError(f"--color-by {value}: {labels.path} has no column {column!r} (it has {have})")
    return ColorBy("labels", column=column)


def _pattern(text: str) -> re.Pattern:
    if not text:
        raise ConfigError("--color-by description:REGEX: the regular expression is empty")
    try:
        return re.compile(text, re.IGNORECASE)
    except re.error as exc:
        raise ConfigError(f"--color-by description:{text}: not a regular expression ({exc})") from None


def read_labels(path: str) -> Labels:
    """A TSV (or, named .csv, CSV) with a header line; every value read as text, so that id 007 stays 007.

    Raises:
        InputError: Empty, one column only, a row of another width, two columns of one name, or an id on two rows.
    """
    from pyarrow import csv as pacsv

    delimiter = "," if path.lower().endswith(".csv") else "\t"
    with open_input(path) as handle:
        data = handle.read()
    header = next(csv.reader(io.StringIO(data.split(b"\n", 1)[0].decode("utf-8", "replace")), delimiter=delimiter), [])
    names = [name.strip() for name in header]
    if not any(names):
        raise InputError(f"{path}: empty; a labels file starts with a header line naming its columns")
    if len(names) < 2:
        raise InputError(f"{path}: one column only ({names[0]!r}); a labels file holds the ids and a column of labels")
    if len(set(names)) < len(names):
        raise InputError(f"{path}: two columns named {next(n for n in names if names.count(n) > 1)!r}")
    try:
        table = pacsv.read_csv(
            pa.BufferReader(data),
            read_options=pacsv.ReadOptions(column_names=names, skip_rows=1),
            parse_options=pacsv.ParseOptions(delimiter=delimiter),
            convert_options=pacsv.ConvertOptions(column_types=dict.fromkeys(names, pa.string())),
        )
    except pa.ArrowInvalid as exc:
        raise InputError(f"{path}: not a {'CSV' if delimiter == ',' else 'TSV'} file ({exc})") from None
    id_column = "id" if "id" in names else names[0]
    ids = table.column(id_column).combine_chunks()
    _check_unique(path, ids)
    others = {name: table.column(name).combine_chunks() for name in names if name != id_column}
    return Labels(path, id_column, id_column == "id", ids, others)


def _check_unique(path: str, ids: pa.Array) -> None:
    counts = pc.value_counts(ids)
    repeated = pc.filter(counts, pc.greater(counts.field("counts"), 1))
    if len(repeated):
        first = repeated[0].as_py()
        raise InputError(f"{path}: id {first['values']!r} is on {first['counts']} rows; give each id one row")


def colour_points(points: Points, spec: ColorBy, labels: Labels | None = None) -> Colouring:
    """The colour of every point, by what --color-by names (parse_color_by).

    Raises:
        InputError: None of the labels' ids is an id of the points.
    """
    if spec.field == "length":
        return continuous("length", points.lengths.astype(np.float64))
    if spec.field == "truncated":
        return categories("truncated", points.truncated.astype(np.int32), ["not truncated", "truncated"])
    if spec.field == "windows":
        counts = np.unique(points.windows)
        names = [f"{n} window{'s' if n != 1 else ''}" for n in counts]
        return categories("windows", np.searchsorted(counts, points.windows).astype(np.int32), names)
    if spec.field == "cluster":
        assert points.clusters is not None, "--color-by cluster without clusters: this is a bug"
        k = int(points.clusters.max()) + 1
        return categories("k-means cluster", points.clusters, [f"cluster {i}" for i in range(k)])
    if spec.field == "description":
        assert spec.pattern is not None
        words = pa.array([_words(spec.pattern, d) for d in points.descriptions.to_pylist()], pa.string())
        colouring = by_text(f"description ~ /{spec.pattern.pattern}/i", words, NO_MATCH)
        unmatched = int(words.null_count)
        colouring.notes.append(f"{len(points) - unmatched:,} descriptions match, {unmatched:,} do not ({NO_MATCH!r})")
        return colouring
    assert labels is not None and spec.column is not None, f"--color-by {spec}: this is a bug"
    return _by_labels(points.ids, labels, spec.column)


def _words(pattern: re.Pattern, description: str | None) -> str | None:
    found = pattern.search(description or "")
    if found is None:
        return None
    text = found.group(1) if pattern.groups else found.group(0)
    return text.lower() if text else None


def _by_labels(ids: pa.Array, labels: Labels, column: str) -> Colouring:
    where = pc.index_in(ids, value_set=labels.ids)
    absent = int(where.null_count)
    if absent == len(ids):
        raise InputError(
            f"{labels.path}: none of its {len(labels.ids):,} ids ({labels.id_source()}) is an id of the input "
            f"(input ids such as {ids[0].as_py()!r}, labels ids such as {labels.ids[0].as_py()!r})"
        )
    values = pc.take(labels.columns[column], where)
    empty = int(pc.sum(pc.equal(values, "")).as_py() or 0)
    values = pc.if_else(pc.equal(values, ""), pa.scalar(None, pa.string()), values)
    unknown = len(labels.ids) - int(pc.sum(pc.is_in(labels.ids, value_set=ids)).as_py() or 0)
    title = f"{labels.path}: {column}"
    numbers = _as_numbers(values)
    colouring = continuous(title, numbers) if numbers is not None else by_text(title, values, UNLABELLED)
    unlabelled = absent + empty
    note = (
        f"labels {labels.path} (ids from its {labels.id_source()}): {len(ids) - unlabelled:,} points labelled, "
        f"{unlabelled:,} {UNLABELLED} ({absent:,} ids absent from it, {empty:,} with an empty {column!r})"
    )
    colouring.notes.append(note)
    if unknown:
        colouring.notes.append(f"{unknown:,} ids of {labels.path} are not in the input (not drawn)")
    return colouring


def _as_numbers(values: pa.Array) -> np.ndarray | None:
    """The values as numbers when every one present is a number and there are too many for categories."""
    present = values.drop_null()
    if len(present) == 0 or len(pc.unique(present)) <= MAX_CATEGORIES:
        return None
    try:
        numbers = pc.cast(values, pa.float64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    return numbers.to_numpy(zero_copy_only=False).astype(np.float64)


def continuous(title: str, values: np.ndarray, grey: str = UNLABELLED) -> Colouring:
    """Values on the sequential scale, its ends at the 1st and 99th percentiles (NaN: grey)."""
    present = values[~np.isnan(values)]
    low, high = np.percentile(present, [1, 99]).tolist() if len(present) else (0.0, 1.0)
    return Colouring(title, values=values, span=(low, high if high > low else low + 1.0), grey=grey)


def by_text(title: str, text: pa.Array, grey: str) -> Colouring:
    """Categories named by text (null: grey), the most frequent first."""
    encoded = text.dictionary_encode()
    codes = encoded.indices.fill_null(-1).to_numpy().astype(np.int32)
    names = encoded.dictionary.to_pylist()
    counts = np.bincount(codes[codes >= 0], minlength=len(names))
    order = sorted(range(len(names)), key=lambda i: (-counts[i], names[i]))
    rank = np.empty(len(names) + 1, np.int32)
    rank[order] = np.arange(len(names))
    rank[-1] = -1  # code -1 (grey) indexes the last slot
    return categories(title, rank[codes], [names[i] for i in order], grey)


def categories(title: str, codes: np.ndarray, names: list[str], grey: str = UNLABELLED) -> Colouring:
    """Categories in the order of names (codes index them; -1: grey), empty ones dropped, past MAX_CATEGORIES the
    least frequent merged into "other"."""
    counts = np.bincount(codes[codes >= 0], minlength=len(names))
    kept = [i for i in range(len(names)) if counts[i]]
    if len(kept) > MAX_CATEGORIES:
        largest = set(sorted(kept, key=lambda i: -counts[i])[: MAX_CATEGORIES - 1])
        kept = [i for i in kept if i in largest]
    new = np.full(len(names) + 1, -1, np.int32)
    new[kept] = np.arange(len(kept))
    out_names, colours = [names[i] for i in kept], list(PALETTE[: len(kept)])
    notes = []
    merged = int(np.count_nonzero(counts)) - len(kept)
    if merged:
        notes.append(f"{merged:,} categories past the {MAX_CATEGORIES - 1} largest are drawn as 'other'")
        other = np.ones(len(names) + 1, bool)
        other[kept] = False
        other[-1] = False
        new[other] = len(out_names)
        out_names.append(f"other ({merged:,} categories)")
        colours.append(OTHER_GREY)
    result = new[np.where(codes >= 0, codes, len(names))]
    if (result < 0).any():
        result[result < 0] = len(out_names)
        out_names.append(grey)
        colours.append(GREY)
    return Colouring(title, out_names, colours, codes=result.astype(np.int32), notes=notes)
