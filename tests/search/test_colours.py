"""What colours a map's points: labels joined by id (absent ids counted, none in common refused), description
words by a regex, fields of the outputs, and the categories past the palette merged."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from esm2cli.errors import ConfigError, InputError
from esm2cli.search.colours import (
    GREY,
    MAX_CATEGORIES,
    UNLABELLED,
    Points,
    categories,
    colour_points,
    parse_color_by,
    read_labels,
)

DESCRIPTIONS = ["Ser/Thr KINASE 2", "serine protease", "tyrosine kinase", "unknown protein", None, "protease 7"]


def _points(n: int = 6, descriptions=None) -> Points:
    return Points(
        ids=pa.array([f"q{i}" for i in range(n)], pa.string()),
        descriptions=pa.array(descriptions or [f"d{i}" for i in range(n)], pa.string()),
        lengths=np.arange(n, dtype=np.int32) * 10 + 5,
        truncated=np.array([i % 3 == 0 for i in range(n)]),
        windows=np.array([1, 1, 2, 1, 3, 1][:n] + [1] * max(0, n - 6), np.int32),
        xy=np.zeros((n, 2), np.float32),
    )


def _named(colouring) -> list[str]:
    return [colouring.names[code] for code in colouring.codes]


def test_labels_join_by_the_id_column_counting_the_ids_absent_from_them(tmp_path):
    path = tmp_path / "labels.tsv"
    path.write_text("family\tid\nkinase\tq0\nprotease\tq2\nkinase\tq3\n\tq4\nkinase\tnot-in-input\n")
    labels = read_labels(str(path))
    assert labels.id_column == "id" and list(labels.columns) == ["family"]
    colouring = colour_points(_points(), parse_color_by(None, labels), labels)
    assert _named(colouring) == ["kinase", UNLABELLED, "protease", "kinase", UNLABELLED, UNLABELLED]
    assert colouring.colours[colouring.names.index(UNLABELLED)] == GREY
    assert "3 points labelled, 3 unlabelled (2 ids absent from it, 1 with an empty 'family')" in colouring.notes[0]
    assert "1 ids of" in colouring.notes[1]
    assert colouring.column().to_pylist() == ["kinase", UNLABELLED, "protease", "kinase", UNLABELLED, UNLABELLED]


def test_without_an_id_column_the_first_column_holds_the_ids(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("name,group,score\nq1,a,1\nq5,b,2\n")
    labels = read_labels(str(path))
    assert labels.id_column == "name" and "first column 'name'" in labels.id_source()
    colouring = colour_points(_points(), parse_color_by("labels:group", labels), labels)
    assert _named(colouring) == [UNLABELLED, "a", UNLABELLED, UNLABELLED, UNLABELLED, "b"]


def test_labels_sharing_no_id_with_the_input_are_refused_naming_both(tmp_path):
    path = tmp_path / "labels.tsv"
    path.write_text("id\tfamily\nP12345\tkinase\n")
    labels = read_labels(str(path))
    with pytest.raises(InputError, match=r"none of its 1 ids \(column 'id'\) is an id of the input.*'q0'.*'P12345'"):
        colour_points(_points(), parse_color_by("family", labels), labels)


@pytest.mark.parametrize(
    ("text", "problem"),
    [("", "empty"), ("id\n", "one column only"), ("id\tid\n", "two columns named 'id'"),
     ("id\tf\na\tx\na\ty\n", "id 'a' is on 2 rows")],
    ids=["empty", "one-column", "repeated-column", "repeated-id"],
)  # fmt: skip
def test_bad_labels_files_are_one_line(tmp_path, text, problem):
    path = tmp_path / "labels.tsv"
    path.write_text(text)
    with pytest.raises(InputError, match=problem):
        read_labels(str(path))


def test_description_words_by_a_regex_ignore_case_and_take_its_group():
    points = _points(descriptions=DESCRIPTIONS)
    colouring = colour_points(points, parse_color_by("description:(kinase|protease)", None))
    assert _named(colouring) == ["kinase", "protease", "kinase", "no match", "no match", "protease"]
    assert "4 descriptions match, 2 do not" in colouring.notes[0]
    whole = colour_points(points, parse_color_by("description:ser\\w*", None))
    assert _named(whole) == ["ser", "serine", "no match", "no match", "no match", "no match"]


def test_fields_of_the_outputs():
    points = _points()
    assert _named(colour_points(points, parse_color_by("truncated", None)))[:2] == ["truncated", "not truncated"]
    assert _named(colour_points(points, parse_color_by("windows", None)))[:3] == ["1 window", "1 window", "2 windows"]
    length = colour_points(points, parse_color_by("length", None))
    assert length.continuous and length.values.tolist() == [5, 15, 25, 35, 45, 55]


@pytest.mark.parametrize(
    ("value", "problem"),
    [("colour", "not a field"), ("description:(", "not a regular expression"), ("description:", "empty")],
)
def test_bad_color_by_is_one_line(value, problem):
    with pytest.raises(ConfigError, match=problem):
        parse_color_by(value, None)


def test_past_the_palette_the_least_frequent_categories_are_other():
    codes = np.concatenate([np.full(30 - i, i) for i in range(30)]).astype(np.int32)
    colouring = categories("many", codes, [f"c{i}" for i in range(30)])
    assert len(colouring.names) == MAX_CATEGORIES and colouring.names[-1] == "other (11 categories)"
    assert colouring.names[:3] == ["c0", "c1", "c2"] and len(set(colouring.colours[:-1])) == MAX_CATEGORIES - 1
    assert (colouring.codes[codes >= MAX_CATEGORIES - 1] == MAX_CATEGORIES - 1).all()
