"""The reader against the reference safetensors library, on real and hand-made files."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from peftcli.checkpoint.reader import open_checkpoint
from peftcli.errors import BadInputError
from peftcli.summary import summarize
from tests.safetensors_craft import make_file, valid_two_tensors, write


def _reference_counts(files):
    num_tensors = num_params = 0
    per_dtype = {}
    for f in files:
        with safe_open(f, framework="pt") as sf:
            for k in sf.keys():
                sl = sf.get_slice(k)
                n = 1
                for d in sl.get_shape():
                    n *= d
                num_tensors += 1
                num_params += n
                per_dtype[sl.get_dtype()] = per_dtype.get(sl.get_dtype(), 0) + n
    return num_tensors, num_params, per_dtype


def test_summary_numbers_match_the_reference_library(any_model):
    with open_checkpoint(any_model) as ckpt:
        report = summarize(ckpt)
        files = ckpt.files
    num_tensors, num_params, per_dtype = _reference_counts(files)
    assert report["num_tensors"] == num_tensors
    assert report["num_params"] == num_params
    assert {k: v["params"] for k, v in report["dtypes"].items()} == per_dtype
    assert report["bytes"] == sum(os.path.getsize(f) for f in files)


def test_tensors_read_equal_the_reference_library(tiny_llama):
    ref = load_file(os.path.join(tiny_llama, "model.safetensors"))
    with open_checkpoint(tiny_llama) as ckpt:
        assert set(ckpt) == set(ref)
        for name, tensor in ref.items():
            assert torch.equal(ckpt.get(name), tensor), name


def test_sharded_directory_through_the_index(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    sd = model.state_dict()
    with open_checkpoint(str(tmp_path / "sharded")) as ckpt:
        assert ckpt.storage == "safetensors-sharded"
        assert len(ckpt.files) > 1
        for name in ckpt:
            assert torch.equal(ckpt.get(name), sd[name])


def test_bf16_and_empty_tensors_and_metadata(tmp_path):
    path = str(tmp_path / "x.safetensors")
    tensors = {"w": torch.randn(3, 5).to(torch.bfloat16), "e": torch.zeros(0, 4), "i": torch.arange(7)}
    save_file(tensors, path, metadata={"format": "pt", "who": "test"})
    with open_checkpoint(path) as ckpt:
        assert ckpt.metadata == {"format": "pt", "who": "test"}
        for name, t in tensors.items():
            got = ckpt.get(name)
            assert got.dtype == t.dtype and torch.equal(got, t)


def test_unaligned_tensor_is_read_correctly(tmp_path):
    # A 1-byte tensor first puts the F32 tensor at an odd offset: legal, and must still read right.
    data = bytes([7]) + struct.pack("<3f", 0.5, -1.5, 2.25)
    path = write(
        tmp_path / "odd.safetensors",
        make_file(
            {"u": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, "f": {"dtype": "F32", "shape": [3], "data_offsets": [1, 13]}},
            data,
        ),
    )
    with open_checkpoint(path) as ckpt:
        assert ckpt.get("f").tolist() == [0.5, -1.5, 2.25]
        assert ckpt.get("u").tolist() == [7]


def _bytes_read() -> int:
    """Bytes this process has read through any system call (read, pread, preadv ...)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar"))


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs Linux's /proc/self/io")
def test_opening_and_inspecting_read_only_the_header(tmp_path):
    # A 4 GB sparse file: summarising and listing it must read 8 + header bytes, not the data.
    # The count is the kernel's (every read system call of the process), so no way of reading
    # the data can hide from it; a warm-up on a small file first loads what the call imports.
    from click.testing import CliRunner

    from peftcli.cli import cli

    def sparse(name: str, n: int) -> str:
        entries = {"big": {"dtype": "F32", "shape": [n, n], "data_offsets": [0, 4 * n * n]}}
        path = str(tmp_path / name)
        with open(path, "wb") as f:
            f.write(make_file(entries, b""))
            f.truncate(f.tell() + 4 * n * n)
        return path

    small, big = sparse("small.safetensors", 4), sparse("big.safetensors", 32768)
    for path in (small, big):
        before = _bytes_read()
        with open_checkpoint(path) as ckpt:
            assert summarize(ckpt)["num_params"] == ckpt.tensors["big"].numel
        result = CliRunner().invoke(cli, ["inspect", path, "--tensors", "--json"])
        read = _bytes_read() - before
        assert result.exit_code == 0 and json.loads(result.stdout)["num_params"] == ckpt.tensors["big"].numel
    assert read < 64 * 1024, read  # the big file's data alone is 4.3 GB


def test_pickle_needs_the_flag_then_loads_weights_only(tmp_path):
    path = str(tmp_path / "pytorch_model.bin")
    torch.save({"w": torch.ones(2, 3)}, path)
    with pytest.raises(BadInputError, match="`allow_pickle`"):
        open_checkpoint(path)
    with pytest.raises(BadInputError, match="`allow_pickle`"):
        open_checkpoint(str(tmp_path))  # the directory form too
    with open_checkpoint(path, allow_pickle=True) as ckpt:
        assert ckpt.storage == "pickle"
        assert torch.equal(ckpt.get("w"), torch.ones(2, 3))


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_with_code_is_refused_even_with_the_flag(tmp_path):
    path = str(tmp_path / "evil.pt")
    torch.save({"w": torch.ones(1), "x": _Evil()}, path)
    with pytest.raises(BadInputError, match="weights_only"):
        open_checkpoint(path, allow_pickle=True)


def test_pickle_renamed_to_safetensors_is_named_as_such(tmp_path):
    path = str(tmp_path / "model.safetensors")
    torch.save({"w": torch.ones(1)}, path)
    with pytest.raises(BadInputError, match="pickle"):
        open_checkpoint(path)


def test_valid_crafted_file_reads(tmp_path):
    path = write(tmp_path / "ok.safetensors", valid_two_tensors())
    with open_checkpoint(path) as ckpt:
        assert ckpt.get("a").tolist() == [[1.0, 2.0], [3.0, 4.0]]
        assert ckpt.get("b").tolist() == [1, 2, 3, 4]


def test_tensors_outlive_the_checkpoint(tiny_llama):
    with open_checkpoint(tiny_llama) as ckpt:
        w = ckpt.get("model.layers.0.self_attn.q_proj.weight")
    import gc

    gc.collect()
    ref = load_file(os.path.join(tiny_llama, "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(w, ref)  # a dangling mapping would crash or give garbage here
    w.add_(1)  # the tensor owns its memory: changing it leaves the file untouched
    assert torch.equal(load_file(os.path.join(tiny_llama, "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"], ref)


@pytest.mark.parametrize("name_len", range(30, 60))
def test_header_length_bytes_never_look_like_a_pickle(tmp_path, name_len):
    # The header length's low byte can be 0x80 (pickle's magic); such files are still safetensors.
    from peftcli.checkpoint.writer import save_state_dict

    path = str(tmp_path / "h.safetensors")
    save_state_dict({"w" * name_len: torch.zeros(1)}, path)
    with open_checkpoint(path) as ckpt:
        assert len(ckpt) == 1


def test_a_fifo_is_refused_not_waited_on(tmp_path):
    path = str(tmp_path / "x.safetensors")
    os.mkfifo(path)
    with pytest.raises(BadInputError, match="not a regular file"):
        open_checkpoint(path)
