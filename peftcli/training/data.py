"""Training data: JSONL, CSV and TSV files, the task they imply, and label mappings.

Columns decide the task (``--task`` overrides):
- ``prompt`` + ``completion``  → supervised prompt→completion, loss on the completion only (``sft``)
- ``messages`` (JSON lines)     → chat ``sft``: a conversation rendered with the chat template,
  loss on the assistant turns only (``peftcli.training.chat``)
- ``text``/``sentence`` + ``label`` → sequence classification (``classify``)
- ``text`` alone               → causal language modelling (``lm``)

``--columns text=review,label=sentiment`` maps a file's own column names to those roles
(``text``, ``label``, ``prompt``, ``completion``) before the task is detected; the named
columns must be in every JSON line, or in a CSV/TSV file's header row. A column of the
file named like a role that ``--columns`` gives to another column is ignored.

The first example's shape decides between the two kinds of ``sft``: after a ``messages`` row
every row needs ``messages``, after a ``prompt``/``completion`` row every row needs those.

TSV/CSV files may have a header row naming those columns; a file without one (AG News)
is read positionally: one column is ``text``, two are ``text, label``. A first row that
names some known columns but not all, or whose label appears in no other row of a file whose
other labels all repeat (``review, sentiment`` over ``pos``/``neg``), is a header with names
peftcli does not know: an error, never an example. A ``.csv`` whose first row is one field
holding tabs is a tab-separated file misnamed: an error saying so, never one text per line. Every malformed line is an error naming
the file and the line number; so is a line longer than ``MAX_LINE_CHARS`` or JSON nested
deeper than Python parses.

Labels are strings as written; a label of plain ASCII digits (an optional ``-``, at most 18
digits) sorts by its value, so ``"2"`` comes before ``"10"`` and ``"0"``/``"1"`` keep their
meaning as ids (``²`` or ``--5`` are just strings).
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field

from peftcli.errors import BadInputError, UsageError
from peftcli.training.chat import check_messages

TASKS = ("lm", "sft", "classify")
_JSONL_HINT = 'a .jsonl data file has one JSON object per line, e.g. {"text": "..."}'
_CSV_HINT = "the file is not well-formed CSV/TSV; check its quoting on that line"
KNOWN_COLUMNS = {"text", "sentence", "label", "prompt", "completion", "idx", "id"}
MAX_LINE_CHARS = 16 * 2**20  # a data line (an example) longer than 16 Mi characters is refused, not allocated
_HEADER_HINT = (
    "name the columns in a header row (text or sentence, label, prompt, completion), map yours with "
    "`columns` text=COLUMN,label=COLUMN, or remove the header"
)
ROLES = ("text", "label", "prompt", "completion")  # what --columns maps a file's columns to
_COLUMNS_HINT = "e.g. `columns` text=review,label=sentiment (roles: text, label, prompt, completion)"
COLUMNS_HELP = "use the data's columns COLUMN as ROLE (text, label, prompt, completion), e.g. text=review,label=sentiment"
_TABS_HINT = "it looks tab-separated: rename it to .tsv"


def parse_columns(spec: str | None) -> dict[str, str] | None:
    """``--columns ROLE=COLUMN,...`` as {role: column}; None when not given."""
    if spec is None:
        return None
    mapping: dict[str, str] = {}
    for part in spec.split(","):
        role, sep, column = (x.strip() for x in part.partition("="))
        if not sep or not role or not column:
            raise UsageError(f"`columns`: {part.strip()!r} is not ROLE=COLUMN", _COLUMNS_HINT)
        if role not in ROLES:
            raise UsageError(f"`columns`: unknown role {role!r} (for column {column!r})", _COLUMNS_HINT)
        if role in mapping:
            raise UsageError(f"`columns` gives the role {role!r} twice ({mapping[role]!r} and {column!r})", "give each role one column")
        other = next((r for r, c in mapping.items() if c == column), None)
        if other is not None:
            raise UsageError(f"`columns` gives the column {column!r} two roles ({other} and {role})", "give each column one role")
        mapping[role] = column
    return mapping


def _mapped(row: dict, mapping: dict[str, str]) -> dict:
    """``row`` with ``mapping``'s columns renamed to their roles; a column named like a mapped
    role (``text`` when ``text=review``) is dropped: the user chose another one for it."""
    out = {k: v for k, v in row.items() if k not in mapping and k not in mapping.values()}
    out.update({role: row[column] for role, column in mapping.items()})
    return out


def _missing_column(path: str, lineno: int, column: str, columns) -> BadInputError:
    names = [str(c)[:40] for c in columns]
    listed = ", ".join(names[:20]) + (f", … ({len(names)} in all)" if len(names) > 20 else "")
    return BadInputError(
        f"{path}:{lineno}: no column {column!r} (named by `columns`); the file's columns: {listed or 'none'}",
        "give `columns` the names the file uses",
    )


def _lines(f, path: str):
    """The lines of text file ``f``, each read at most ``MAX_LINE_CHARS`` at a time: a longer
    line is an error, not an allocation of its whole length."""
    lineno = 0
    while True:
        line = f.readline(MAX_LINE_CHARS + 1)
        if not line:
            return
        lineno += 1
        if len(line) > MAX_LINE_CHARS:
            raise BadInputError(
                f"{path}:{lineno}: line longer than {MAX_LINE_CHARS:,} characters", "split the example, or shorten it: longer texts are truncated to `max_length` tokens anyway"
            )
        yield line


@dataclass
class Example:
    text: str = ""  # lm / classify input, or sft prompt
    completion: str = ""  # sft only
    label: str | None = None  # classify only, as written in the file
    messages: list[dict] | None = None  # chat sft only: the validated conversation
    line: int = field(default=0, compare=False)  # where the example is in its file (for errors found later)


@dataclass
class Dataset:
    path: str
    task: str
    examples: list[Example]
    labels: list[str] = field(default_factory=list)  # classify: sorted distinct labels (the mapping index → label)
    chat: bool = False  # sft from messages rows

    def label_ids(self, mapping: list[str]) -> list[int]:
        index = {label: i for i, label in enumerate(mapping)}
        out = []
        for n, ex in enumerate(self.examples):
            if ex.label not in index:
                raise BadInputError(
                    f"{self.path}: example {n + 1} has label {ex.label!r}, unknown to the training labels {mapping}",
                    "evaluation data must use the training data's labels",
                )
            out.append(index[ex.label])
        return out


def _rows_jsonl(path: str, mapping: dict[str, str] | None = None):
    with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark is not data
        for lineno, line in enumerate(_lines(f, path), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BadInputError(f"{path}:{lineno}: not valid JSON: {exc.msg}", _JSONL_HINT) from None
            except RecursionError:
                raise BadInputError(f"{path}:{lineno}: JSON nested too deeply to read", _JSONL_HINT) from None
            if not isinstance(row, dict):
                raise BadInputError(f"{path}:{lineno}: each line must be a JSON object", _JSONL_HINT)
            if mapping:
                missing = next((c for c in mapping.values() if c not in row), None)
                if missing is not None:
                    raise _missing_column(path, lineno, missing, row)
                row = _mapped(row, mapping)
            yield lineno, row


def _rows_delimited(path: str, delimiter: str, mapping: dict[str, str] | None = None):
    with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: a BOM must not hide the header
        quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL  # TSV text keeps its quotes
        reader = csv.reader(_lines(f, path), delimiter=delimiter, quoting=quoting)
        try:
            first = next(reader, None)
        except csv.Error as exc:
            raise BadInputError(f"{path}:1: {exc}", _CSV_HINT) from None
        if first is None:
            return
        if delimiter == "," and len(first) == 1 and "\t" in first[0]:  # one text per line, label and all: refuse
            raise BadInputError(f"{path}:1: the first row holds tabs and no commas", f"{_TABS_HINT} (or write it as .jsonl if its texts hold tabs)")
        header = [c.strip().lower() for c in first]
        if mapping:
            columns, rows = _mapped_header(path, first, mapping), []
        elif header and all(c in KNOWN_COLUMNS for c in header) and len(set(header)) == len(header):
            columns, rows = header, []
        elif any(c in KNOWN_COLUMNS for c in header):
            unknown = sorted({c for c in header if c not in KNOWN_COLUMNS})
            what = f"columns peftcli does not know: {', '.join(unknown)}" if unknown else "a column twice"
            raise BadInputError(f"{path}:1: the first row looks like a header ({', '.join(first)}) but names {what}", _HEADER_HINT)
        else:
            if len(first) == 1:
                columns = ["text"]
            elif len(first) == 2:
                columns = ["text", "label"]
            else:
                raise BadInputError(
                    f"{path}:1: {len(first)} columns and no header", "add a header row naming the columns (text, label, prompt, completion)"
                )
            rows = [(1, first)]
        for lineno, values in rows:
            yield lineno, dict(zip(columns, values))
        try:
            for values in reader:
                lineno = reader.line_num
                if not values or values == [""]:
                    continue
                if len(values) != len(columns):
                    tabs = delimiter == "," and any("\t" in v for v in values)
                    raise BadInputError(
                        f"{path}:{lineno}: {len(values)} fields, expected {len(columns)}: {', '.join(columns)}",
                        f"give every row {len(columns)} fields; "
                        + ("a text may not contain a tab" if delimiter == "\t" else _TABS_HINT if tabs else 'quote a text that contains commas: "a, b"'),
                    )
                yield lineno, dict(zip(columns, values))
        except csv.Error as exc:
            raise BadInputError(f"{path}:{reader.line_num}: {exc}", _CSV_HINT) from None


def _mapped_header(path: str, first: list[str], mapping: dict[str, str]) -> list[str]:
    """The column names of a header row under ``--columns`` (compared as the header's known
    names are: stripped, case-insensitive); a header is then required."""
    header = [c.strip().lower() for c in first]
    roles = {column.lower(): role for role, column in mapping.items()}
    for column in mapping.values():
        if header.count(column.lower()) != 1:
            if column.lower() in header:
                raise BadInputError(f"{path}:1: the header names the column {column!r} twice ({', '.join(first)})", "give each column its own name")
            raise _missing_column(path, 1, column, first)
    # A column named like a mapped role but not chosen for it is ignored (as in _mapped).
    return [roles.get(h, "unused:" + h if h in mapping else h) for h in header]


def _rows(path: str, mapping: dict[str, str] | None = None):
    lower = path.lower()
    if lower.endswith((".jsonl", ".json", ".ndjson")):
        return _rows_jsonl(path, mapping)
    if lower.endswith(".tsv"):
        return _rows_delimited(path, "\t", mapping)
    if lower.endswith(".csv"):
        return _rows_delimited(path, ",", mapping)
    raise UsageError(f"{path}: unknown data format", "use a .jsonl, .csv or .tsv file")


def detect_task(columns: set[str]) -> str | None:
    if "messages" in columns or {"prompt", "completion"} <= columns:
        return "sft"
    if "label" in columns and columns & {"text", "sentence"}:
        return "classify"
    if "text" in columns or "sentence" in columns:
        return "lm"
    return None


def load_dataset(path: str, task: str | None = None, limit: int | None = None, columns: str | None = None) -> Dataset:
    """Read ``path``; ``task`` overrides detection. ``limit`` keeps the first N examples;
    ``columns``: the ``--columns`` mapping (``text=review,label=sentiment``)."""
    if not os.path.isfile(path):
        raise BadInputError(f"{path}: no such data file", "check the path; the data is a .jsonl, .csv or .tsv file")
    if task is not None and task not in TASKS:
        raise UsageError(f"unknown `task` {task!r}", "choose lm, sft or classify")
    mapping = parse_columns(columns)
    examples: list[Example] = []
    detected = task
    chat = False
    first_line = 0  # the line of the first example: 1 when a delimited file has no header
    try:
        for lineno, row in _rows(path, mapping):
            columns = set(row)
            row_task = detect_task(columns)
            if detected is None:
                detected = row_task
                if detected is None:
                    raise BadInputError(
                        f"{path}:{lineno}: cannot tell the task from columns {sorted(columns)}",
                        "use text (lm), prompt+completion (sft) or text/sentence+label (classify), or map yours with `columns` text=COLUMN,...",
                    )
            if not first_line:
                chat = detected == "sft" and "messages" in row
            examples.append(_example(path, lineno, row, detected, chat))
            first_line = first_line or lineno
            if limit is not None and len(examples) >= limit:
                break
    except UnicodeDecodeError:
        raise BadInputError(f"{path}: not UTF-8 text", "re-save the file as UTF-8") from None
    if not examples:
        raise BadInputError(f"{path}: no examples", "the data file is empty")
    if detected == "classify" and first_line == 1 and path.lower().endswith((".tsv", ".csv")):
        _refuse_header_as_data(path, examples)
    labels = sorted({ex.label for ex in examples}, key=_label_order) if detected == "classify" else []
    if detected == "classify" and task is None and len(labels) < 2:
        raise BadInputError(f"{path}: only one distinct label ({labels[0]!r})", "classification needs at least two classes")
    return Dataset(path=path, task=detected, examples=examples, labels=labels, chat=chat)


def _refuse_header_as_data(path: str, examples: list[Example]) -> None:
    """A headerless text,label file whose first label appears nowhere else while every other
    label repeats: that row is a header with unknown names (``review, sentiment``), not an
    example of a class of its own."""
    from collections import Counter

    counts = Counter(ex.label for ex in examples)
    first = examples[0].label
    others = [n for label, n in counts.items() if label != first]
    if all(is_integer_label(label) for label in counts if label != first) and is_integer_label(first):
        return  # integer ids throughout: a first row of a rare class, not a header's column name
    if counts[first] == 1 and others and all(n >= 2 for n in others):
        raise BadInputError(
            f"{path}:1: the first row ({examples[0].text[:40]!r}, {first!r}) looks like a header: its label {first!r} "
            "appears in no other row",
            _HEADER_HINT,
        )


def is_integer_label(label: str) -> bool:
    """Plain ASCII digits with an optional leading '-', short enough to be an id (not '²', '--5')."""
    digits = label[1:] if label.startswith("-") else label
    return 0 < len(digits) <= 18 and digits.isascii() and digits.isdigit()


def _label_order(label: str):
    # Integer labels sort numerically ("2" before "10"), so "0"/"1" keep their meaning as ids.
    return (0, int(label), "") if is_integer_label(label) else (1, 0, label)


def _field(path: str, lineno: int, row: dict, names: tuple[str, ...]) -> str:
    for name in names:
        value = row.get(name)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                raise BadInputError(f"{path}:{lineno}: field {name!r} must be a string or number", "write it as a JSON string or number, not a list, object or boolean")
            return str(value)
    raise BadInputError(
        f"{path}:{lineno}: missing field {' or '.join(repr(n) for n in names)}",
        "every example needs the columns of its task: text (lm), prompt+completion (sft), text/sentence+label (classify); "
        "`columns` maps other names to them",
    )


def _example(path: str, lineno: int, row: dict, task: str, chat: bool = False) -> Example:
    if task == "sft" and chat:
        if "messages" not in row:
            raise BadInputError(f"{path}:{lineno}: missing field 'messages'", "the first row is a conversation (messages): give every row one")
        if "prompt" in row or "completion" in row:
            raise BadInputError(f"{path}:{lineno}: both 'messages' and prompt/completion", "give each row one of the two shapes")
        return Example(messages=check_messages(path, lineno, row["messages"]), line=lineno)
    if task == "sft":
        return Example(text=_field(path, lineno, row, ("prompt",)), completion=_field(path, lineno, row, ("completion",)), line=lineno)
    text = _field(path, lineno, row, ("text", "sentence"))
    if task == "classify":
        label = _field(path, lineno, row, ("label",)).strip()
        if not label:
            raise BadInputError(f"{path}:{lineno}: empty label", "give every classification example a label")
        return Example(text=text, label=label, line=lineno)
    return Example(text=text, line=lineno)
