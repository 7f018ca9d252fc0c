"""The streaming writer: read back by the reference library and transformers, atomic, safe."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from peftcli.checkpoint import atomic
from peftcli.checkpoint.reader import open_checkpoint
from peftcli.checkpoint.writer import CheckpointWriter, TensorSpec, parse_size, plan_shards, save_state_dict
from peftcli.errors import ResourceError, UsageError


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(4, 6, generator=g),
        "h": torch.randn(3, generator=g).to(torch.bfloat16),
        "f16": torch.randn(2, 2, generator=g).half(),
        "ids": torch.arange(5, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 3),
        "scalar": torch.tensor(3.5),
    }


def test_reference_library_reads_what_we_write(tmp_path):
    path = str(tmp_path / "out.safetensors")
    tensors = _tensors()
    save_state_dict(tensors, path, metadata={"method": "test"})
    loaded = load_file(path)
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t), name
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"format": "pt", "method": "test"}
    # The data buffer starts 8-byte aligned, as the reference writer does.
    with open(path, "rb") as f:
        assert (8 + int.from_bytes(f.read(8), "little")) % 8 == 0


def test_no_tensors_is_still_a_valid_file(tmp_path):
    path = str(tmp_path / "empty.safetensors")
    save_state_dict({}, path)
    assert load_file(path) == {}


def test_sharding_writes_a_standard_index(tmp_path, tiny_llama):
    with open_checkpoint(tiny_llama) as ckpt:
        sd = {n: ckpt.get(n).clone() for n in ckpt}
    out = str(tmp_path / "sharded")
    save_state_dict(sd, out, max_shard_size="100KB", source_dir=tiny_llama)
    files = sorted(os.listdir(out))
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) > 1 and all(f.endswith(f"-of-{len(shards):05d}.safetensors") for f in shards)
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= set(files)
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in sd.values())
    assert set(index["weight_map"]) == set(sd)
    for shard in shards:  # every shard within the limit unless it holds one oversized tensor
        tensors = load_file(os.path.join(out, shard))
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        assert size <= 100_000 or len(tensors) == 1
        for name, t in tensors.items():
            assert index["weight_map"][name] == shard and torch.equal(t, sd[name])


def test_transformers_loads_a_round_tripped_model(tmp_path, tiny_llama):
    from transformers import AutoModelForCausalLM

    with open_checkpoint(tiny_llama) as ckpt:
        sd = {n: ckpt.get(n) for n in ckpt}
        save_state_dict(sd, str(tmp_path / "rt"), max_shard_size="200KB", source_dir=tiny_llama, inputs=[tiny_llama])
    a = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    b = AutoModelForCausalLM.from_pretrained(str(tmp_path / "rt")).eval()
    ids = torch.tensor([[2, 10, 20, 30, 40]])
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


def test_every_file_of_a_directory_output_is_fsynced_before_the_rename(tmp_path, tiny_llama, monkeypatch):
    # Copied config and tokenizer files included: a crash after the rename must not leave a
    # complete-looking model with an empty config.json.
    synced, renamed = [], []
    real_fsync, real_replace = os.fsync, atomic._move_into_place

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    def replace(tmp, target, force):
        renamed.append(len(synced))  # how many fsyncs had happened when the output moved
        return real_replace(tmp, target, force)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(atomic, "_move_into_place", replace)
    with open_checkpoint(tiny_llama) as ckpt:
        sd = {n: ckpt.get(n) for n in ckpt}
    out = tmp_path / "rt"
    save_state_dict(sd, str(out), max_shard_size="200KB", source_dir=tiny_llama)
    files = sorted(os.listdir(out))
    assert "config.json" in files and any(f.startswith("tokenizer") for f in files) and "model.safetensors.index.json" in files
    before_rename = {os.path.basename(p) for p in synced[: renamed[0]]}
    assert set(files) <= before_rename, set(files) - before_rename


def test_output_files_get_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        save_state_dict({"w": torch.ones(2)}, str(tmp_path / "a.safetensors"))
        save_state_dict({"w": torch.ones(2)}, str(tmp_path / "d"))
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "a.safetensors").st_mode & 0o777 == 0o644
    assert os.stat(tmp_path / "d" / "model.safetensors").st_mode & 0o777 == 0o644


def test_an_exception_mid_write_leaves_nothing(tmp_path):
    target = str(tmp_path / "out")
    specs = [TensorSpec("a", "F32", (2,)), TensorSpec("b", "F32", (2,))]
    with pytest.raises(RuntimeError):
        with CheckpointWriter(target, specs) as w:
            w.write("a", torch.ones(2))
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_closing_before_every_tensor_is_written_is_refused(tmp_path):
    specs = [TensorSpec("a", "F32", (2,)), TensorSpec("b", "F32", (2,))]
    with pytest.raises(UsageError, match="before tensor 'b'"):
        with CheckpointWriter(str(tmp_path / "x.safetensors"), specs) as w:
            w.write("a", torch.ones(2))
    assert os.listdir(tmp_path) == []


def test_tensor_that_breaks_its_promise_is_refused(tmp_path):
    specs = [TensorSpec("a", "F32", (2,))]
    with pytest.raises(UsageError, match="promised F32"):
        with CheckpointWriter(str(tmp_path / "x.safetensors"), specs) as w:
            w.write("a", torch.ones(3))
    with pytest.raises(UsageError, match="out of order"):
        with CheckpointWriter(str(tmp_path / "y.safetensors"), specs) as w:
            w.write("b", torch.ones(2))
    assert os.listdir(tmp_path) == []


def test_disk_full_gives_a_resource_error_and_removes_the_temporary(tmp_path, monkeypatch):
    real_open_new_file = atomic.open_new_file

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

    import peftcli.checkpoint.writer as writer_mod

    monkeypatch.setattr(writer_mod, "open_new_file", lambda p: FullDisk(real_open_new_file(p)))
    with pytest.raises(ResourceError, match="no space left"):
        save_state_dict({"w": torch.ones(4)}, str(tmp_path / "out"))
    assert os.listdir(tmp_path) == []


def test_refuses_existing_output_without_force(tmp_path):
    target = str(tmp_path / "x.safetensors")
    save_state_dict({"w": torch.ones(2)}, target)
    with pytest.raises(UsageError, match="already exists.*`force`"):
        save_state_dict({"w": torch.zeros(2)}, target)
    save_state_dict({"w": torch.zeros(2)}, target, force=True)
    assert torch.equal(load_file(target)["w"], torch.zeros(2))
    # a directory output is replaced whole
    d = str(tmp_path / "d")
    save_state_dict({"w": torch.ones(2)}, d, max_shard_size=8)
    save_state_dict({"v": torch.ones(1)}, d, force=True)
    assert sorted(os.listdir(d)) == ["model.safetensors"]
    assert [p for p in os.listdir(tmp_path) if atomic.TEMP_MARK in p] == []


def test_never_writes_over_an_input(tmp_path, tiny_llama):
    with pytest.raises(UsageError, match="would overwrite the input"):
        save_state_dict({"w": torch.ones(2)}, tiny_llama, inputs=[tiny_llama], force=True)
    inner = os.path.join(tiny_llama, "model.safetensors")
    with pytest.raises(UsageError, match="would overwrite the input"):
        save_state_dict({"w": torch.ones(2)}, inner, inputs=[inner], force=True)
    with pytest.raises(UsageError, match="would overwrite the input"):  # replacing a directory holding an input
        save_state_dict({"w": torch.ones(2)}, os.path.dirname(tiny_llama), inputs=[inner], force=True)
    assert os.path.getsize(inner) > 1000


def test_a_killed_write_leaves_a_recognisable_temporary_that_the_next_run_removes(tmp_path):
    target = str(tmp_path / "out")
    script = textwrap.dedent(
        f"""
        import os, signal, torch
        from peftcli.checkpoint.writer import CheckpointWriter, TensorSpec
        specs = [TensorSpec("a", "F32", (1000,)), TensorSpec("b", "F32", (1000,))]
        with CheckpointWriter({target!r}, specs) as w:
            w.write("a", torch.ones(1000))
            os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == -signal.SIGKILL
    left = os.listdir(tmp_path)
    assert not os.path.exists(target)
    assert len(left) == 1 and atomic.TEMP_MARK in left[0] and left[0].startswith(".out")
    save_state_dict({"w": torch.ones(2)}, target)
    assert os.listdir(tmp_path) == ["out"]


def test_plan_shards_and_sizes():
    specs = [TensorSpec(str(i), "F32", (10,)) for i in range(5)]  # 40 bytes each
    assert [len(s) for s in plan_shards(specs, 100)] == [2, 2, 1]
    assert [len(s) for s in plan_shards(specs, 10)] == [1, 1, 1, 1, 1]  # oversized tensors get their own shard
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("1000") == 1000
    with pytest.raises(UsageError):
        parse_size("lots")
