"""Every corrupt-file case named by the foundation issue: one-line error, exit code 1."""

from __future__ import annotations

import json
import os
import struct

import pytest
from click.testing import CliRunner
from safetensors.torch import save_file
import torch

from peftcli.checkpoint.reader import open_checkpoint
from peftcli.cli import cli
from peftcli.errors import BadInputError
from tests.safetensors_craft import make_file, valid_two_tensors, write

F32_4 = struct.pack("<4f", 1, 2, 3, 4)
GOOD = valid_two_tensors()


def _entry(dtype="F32", shape=(2, 2), offsets=(0, 16)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


CASES = {
    "zero-length": (b"", "shorter than the 8-byte"),
    "five-bytes": (b"\x01\x02\x03\x04\x05", "shorter than the 8-byte"),
    "header-over-100MB": (struct.pack("<Q", 200 * 1024 * 1024) + b"{}", "over the 100 MB limit"),
    "header-past-eof": (struct.pack("<Q", 1000) + b"{}", "runs past the end"),
    "length-overflow": (b"\xff" * 8 + b"{}", "over the 100 MB limit"),
    "not-json": (make_file({}, b"", header_override=b"{not json"), "not valid JSON"),
    "not-utf8": (make_file({}, b"", header_override=b"\xff\xfe{}"), "not valid JSON"),
    "json-list": (make_file({}, b"", header_override=b"[1, 2]"), "not an object"),
    "unknown-dtype": (make_file({"a": _entry(dtype="F17")}, F32_4), "unknown dtype 'F17'"),
    "size-mismatch": (make_file({"a": _entry(shape=(3, 2), offsets=(0, 16))}, F32_4), "= 24 bytes but its byte range holds 16"),
    "negative-shape": (make_file({"a": _entry(shape=(-2, 2))}, F32_4), "invalid shape"),
    "bad-offsets": (make_file({"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [16, 0]}}, F32_4), "invalid data_offsets"),
    "out-of-bounds": (make_file({"a": _entry(shape=(8,), offsets=(0, 32))}, F32_4), "out of bounds"),
    "overlap": (
        make_file({"a": _entry(shape=(4,), offsets=(0, 16)), "b": _entry(shape=(2,), offsets=(8, 16))}, F32_4),
        "overlaps",
    ),
    "hole": (make_file({"a": _entry(shape=(2,), offsets=(8, 16))}, F32_4), "hole of 8 bytes"),
    "trailing-bytes": (GOOD + b"extra", "5 trailing bytes"),
    "duplicate-name": (
        make_file(
            {},
            F32_4 + F32_4,
            header_override=b'{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},'
            b'"a":{"dtype":"F32","shape":[4],"data_offsets":[16,32]}}',
        ),
        "has the key 'a' twice",
    ),
    "metadata-not-strings": (make_file({"a": _entry(shape=(4,))}, F32_4, metadata={"n": 1}), "__metadata__ must map"),
    "entry-not-object": (make_file({"a": 5}, b""), "is not an object"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_corrupt_file_is_a_one_line_error(case, tmp_path):
    content, message = CASES[case]
    path = write(tmp_path / "bad.safetensors", content)
    with pytest.raises(BadInputError) as info:
        open_checkpoint(path)
    assert message in str(info.value)

    result = CliRunner().invoke(cli, ["inspect", path])
    assert result.exit_code == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


def test_every_prefix_of_a_valid_file_is_rejected_cleanly(tmp_path):
    for n in range(len(GOOD)):
        path = write(tmp_path / f"p{n}.safetensors", GOOD[:n])
        with pytest.raises(BadInputError):
            open_checkpoint(path)


def _sharded(tmp_path, weight_map: dict, shards: dict[str, dict]):
    d = tmp_path / "sharded"
    d.mkdir()
    for name, tensors in shards.items():
        save_file(tensors, str(d / name))
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return str(d)


def test_index_naming_a_missing_shard(tmp_path):
    d = _sharded(tmp_path, {"a": "model-1.safetensors", "b": "model-2.safetensors"}, {"model-1.safetensors": {"a": torch.ones(1)}})
    with pytest.raises(BadInputError, match="'model-2.safetensors', which does not exist"):
        open_checkpoint(d)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_index_pointing_outside_the_directory(tmp_path, shard):
    write(tmp_path / "outside.safetensors", GOOD)
    d = _sharded(tmp_path, {"a": shard}, {})
    with pytest.raises(BadInputError, match="points outside"):
        open_checkpoint(d)


def test_duplicate_tensor_across_shards(tmp_path):
    d = _sharded(
        tmp_path,
        {"a": "model-1.safetensors"},
        {"model-1.safetensors": {"a": torch.ones(1)}, "model-2.safetensors": {"a": torch.zeros(1)}},
    )
    index = json.loads(open(os.path.join(d, "model.safetensors.index.json")).read())
    index["weight_map"]["b"] = "model-2.safetensors"  # make the index list both shards
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    with pytest.raises(BadInputError, match="also in"):
        open_checkpoint(d)


def test_index_out_of_step_with_its_shards(tmp_path):
    d = _sharded(
        tmp_path,
        {"a": "model-2.safetensors", "b": "model-2.safetensors"},
        {"model-1.safetensors": {"a": torch.ones(1)}, "model-2.safetensors": {"b": torch.zeros(1)}},
    )
    with pytest.raises(BadInputError, match="says tensor 'a' is in"):
        open_checkpoint(d)


def test_index_that_is_not_json(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "model.safetensors.index.json").write_text("{oops")
    with pytest.raises(BadInputError, match="cannot read shard index"):
        open_checkpoint(str(d))


def test_directory_without_a_checkpoint(tmp_path):
    with pytest.raises(BadInputError, match="no checkpoint in this directory"):
        open_checkpoint(str(tmp_path))


def test_shard_missing_from_the_index_and_empty_index(tmp_path):
    d = _sharded(
        tmp_path,
        {"a": "model-00001-of-00002.safetensors"},
        {"model-00001-of-00002.safetensors": {"a": torch.ones(1)}, "model-00002-of-00002.safetensors": {"b": torch.ones(1)}},
    )
    with pytest.raises(BadInputError, match="not in the index"):
        open_checkpoint(d)
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    with pytest.raises(BadInputError, match="lists no tensors"):
        open_checkpoint(str(tmp_path / "e"))


@pytest.mark.parametrize(
    "entries, message",
    [
        ({"a": {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}}, "byte boundary"),
        ({"__metadata__": [], "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, "__metadata__ must map"),
        ({"__metadata__": False, "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, "__metadata__ must map"),
    ],
)
def test_reference_library_rules_we_also_enforce(tmp_path, entries, message):
    raw = json.dumps(entries).encode()
    path = write(tmp_path / "x.safetensors", struct.pack("<Q", len(raw)) + raw + bytes(4))
    with pytest.raises(BadInputError, match=message):
        open_checkpoint(path)


def test_shape_with_an_absurdly_long_integer(tmp_path):
    raw = b'{"a":{"dtype":"F32","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,4]}}'
    path = write(tmp_path / "x.safetensors", struct.pack("<Q", len(raw)) + raw + bytes(4))
    with pytest.raises(BadInputError):
        open_checkpoint(path)
