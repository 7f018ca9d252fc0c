"""Property-based fuzzing of the training-data reader (``peftcli.training.data.load_dataset``).

Data files are generated as rows of strings (labels drawn among plain ids, words, unicode
digits such as ``²`` and ``٣``, ``--5``, header names known and unknown) and then written as
JSONL, CSV or TSV with mutations: a header row or none, a wrong delimiter, ragged rows, deep
JSON nesting, non-object lines, long lines. Every outcome must be a dataset whose examples and
labels are consistent (a classification's labels are exactly its examples' distinct labels,
sorted integers first; no header row became an example) or a ``PeftcliError`` whose message
is one line — never another exception.

Profiles as in tests/test_fuzz.py (``HYPOTHESIS_PROFILE``): ``ci`` (the default, few cases,
the same on every run) and ``long`` (a soak exploring new cases).
"""

from __future__ import annotations

import csv
import io
import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peftcli.errors import PeftcliError
from peftcli.training import data as data_mod
from peftcli.training.data import KNOWN_COLUMNS, is_integer_label, load_dataset

PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
if PROFILE not in ("ci", "long"):
    PROFILE = "ci"
CASES = {"ci": 40, "long": 3000}[PROFILE]
settings.register_profile(
    "peftcli-fuzz-data",
    deadline=None,
    derandomize=PROFILE == "ci",
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
    print_blob=True,
)
pytestmark = pytest.mark.timeout(300 if PROFILE == "ci" else 7200)

LABELS = ["0", "1", "2", "10", "-3", "pos", "neg", "²", "٣", "--5", "1e3", " 7", "Sci/Tech", "9" * 30]
HEADER_NAMES = ["text", "sentence", "label", "prompt", "completion", "id", "review", "sentiment", "Text", "LABEL", ""]
WORDS = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)


@st.composite
def tables(draw):
    """(header or None, rows): rows of text and label cells, sometimes ragged."""
    n = draw(st.integers(1, 8))
    width = draw(st.sampled_from([1, 2, 2, 3]))
    header = draw(st.lists(st.sampled_from(HEADER_NAMES), min_size=width, max_size=width)) if draw(st.booleans()) else None
    rows = []
    for _ in range(n):
        row = [draw(WORDS)] + [draw(st.sampled_from(LABELS) | WORDS) for _ in range(width - 1)]
        if draw(st.integers(0, 9)) == 0:  # a ragged row
            row = row[:-1] if len(row) > 1 else row + ["x"]
        rows.append(row)
    return header, rows


def _delimited(header, rows, delimiter: str, quote: bool) -> str:
    """Quoted as csv writes it, or the raw cells joined (a cell may then hold a delimiter or a newline)."""
    table = ([header] if header else []) + rows
    if not quote:
        return "".join(delimiter.join(row) + "\n" for row in table)
    out = io.StringIO()
    csv.writer(out, delimiter=delimiter, lineterminator="\n").writerows(table)
    return out.getvalue()


@st.composite
def jsonl_files(draw):
    lines = []
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.integers(0, 9))
        if kind == 0:
            depth = draw(st.sampled_from([5, 50, 5000, 200_000]))
            lines.append('{"text": ' + "[" * depth + "]" * depth + "}")
        elif kind == 1:
            lines.append(draw(st.sampled_from(["[1, 2]", '"text"', "null", "{", '{"text": NaN}', "\ufeff{}"])))
        else:
            row = {draw(st.sampled_from(HEADER_NAMES)): draw(WORDS) for _ in range(draw(st.integers(0, 3)))}
            if draw(st.booleans()):
                row["text"] = draw(WORDS)
            if draw(st.booleans()):
                row["label"] = draw(st.sampled_from(LABELS) | st.integers(-5, 5) | st.just(True) | st.just([1]) | st.floats(allow_nan=True))
            lines.append(json.dumps(row))
    return "\n".join(lines) + "\n"


def _check(path: str, task: str | None) -> None:
    try:
        ds = load_dataset(path, task)
    except PeftcliError as exc:
        assert "\n" not in exc.one_line() and exc.hint, exc.one_line()
        return
    assert ds.examples and ds.task in ("lm", "sft", "classify")
    if ds.task == "classify":
        assert all(ex.label for ex in ds.examples)
        assert set(ds.labels) == {ex.label for ex in ds.examples} and len(ds.labels) == len(set(ds.labels))
        ints = [label for label in ds.labels if is_integer_label(label)]
        assert ds.labels[: len(ints)] == sorted(ints, key=int)  # integers first, by value; the rest are strings
        assert ds.label_ids(ds.labels) == [ds.labels.index(ex.label) for ex in ds.examples]
        header = {ex.text.strip().lower() for ex in ds.examples[:1]} | {ds.examples[0].label.strip().lower()}
        assert not header <= KNOWN_COLUMNS, "a header row became an example"


@settings(settings.get_profile("peftcli-fuzz-data"), max_examples=CASES)
@given(table=tables(), fmt=st.sampled_from(["tsv", "csv", "tsv-as-csv", "csv-as-tsv"]), quote=st.booleans(), task=st.sampled_from([None, None, "classify", "lm"]))
def test_delimited_files_parse_consistently_or_fail_in_one_line(tmp_path, table, fmt, quote, task):
    header, rows = table
    delimiter = "\t" if fmt in ("tsv", "tsv-as-csv") else ","
    path = tmp_path / f"data.{fmt[-3:]}"
    path.write_text(_delimited(header, rows, delimiter, quote), encoding="utf-8")
    _check(str(path), task)


@settings(settings.get_profile("peftcli-fuzz-data"), max_examples=CASES)
@given(text=jsonl_files(), task=st.sampled_from([None, None, "classify", "sft"]))
def test_jsonl_files_parse_consistently_or_fail_in_one_line(tmp_path, text, task):
    path = tmp_path / "data.jsonl"
    path.write_text(text, encoding="utf-8")
    _check(str(path), task)


@pytest.mark.parametrize("name", ["data.jsonl", "data.tsv", "data.csv"])
def test_a_line_longer_than_the_bound_is_refused_before_it_is_read_whole(tmp_path, monkeypatch, name):
    monkeypatch.setattr(data_mod, "MAX_LINE_CHARS", 1000)  # the real bound (16 Mi) is tested by reasoning, not by 16 MB files
    path = tmp_path / name
    text = "x" * 1001
    path.write_text(json.dumps({"text": text}) + "\n" if name.endswith(".jsonl") else f"text\n{text}\n", encoding="utf-8")
    with pytest.raises(PeftcliError, match="line longer than 1,000 characters"):
        load_dataset(str(path))


def test_header_with_unknown_names_is_not_an_example(tmp_path):
    path = tmp_path / "reviews.tsv"
    path.write_text("review\tsentiment\n" + "".join(f"t{i}\t{'pos' if i % 2 else 'neg'}\n" for i in range(6)), encoding="utf-8")
    with pytest.raises(PeftcliError, match="looks like a header"):
        load_dataset(str(path))
    mixed = tmp_path / "mixed.tsv"
    mixed.write_text("text\tsentiment\na\tpos\nb\tneg\n", encoding="utf-8")
    with pytest.raises(PeftcliError, match="names columns peftcli does not know: sentiment"):
        load_dataset(str(mixed))


def test_unicode_digits_and_double_minus_are_string_labels(tmp_path):
    path = tmp_path / "labels.jsonl"
    rows = [{"text": "a", "label": "--5"}, {"text": "b", "label": "²"}, {"text": "c", "label": "10"}, {"text": "d", "label": "2"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert load_dataset(str(path)).labels == ["2", "10", "--5", "²"]


def test_a_rare_integer_class_in_the_first_row_is_data_not_a_header(tmp_path):
    """Integer labels throughout (SST-2, AG News ids): a first row whose class appears once is an
    example of a rare class; only a non-integer among integers reads as a header's name."""
    path = tmp_path / "ids.tsv"
    path.write_text("rare\t3\n" + "".join(f"t{i}\t{i % 2}\n" for i in range(8)), encoding="utf-8")
    data = load_dataset(str(path))
    assert data.labels == ["0", "1", "3"] and data.examples[0].text == "rare"
    named = tmp_path / "named.tsv"
    named.write_text("sentence\tlabel_id\n" + "".join(f"t{i}\t{i % 2}\n" for i in range(8)), encoding="utf-8")
    with pytest.raises(PeftcliError, match="looks like a header"):
        load_dataset(str(named))
