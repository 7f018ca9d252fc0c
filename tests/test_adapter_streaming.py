"""Merging an adapter reads its tensors per target (issue #13): never the whole adapter at once.

The adapter's tensors are counted as ``Checkpoint.get`` hands them out of the adapter's file and as
they are freed (weak references); at no moment of a merge may more than one module's tensors (plus
the ones no module owns, VeRA's shared projections) be alive. The reader stays strict: a corrupt
adapter is refused with the error reading it whole gives, before any output appears.
"""

from __future__ import annotations

import json
import os
import struct
import weakref

import pytest
import torch
from click.testing import CliRunner

from peftcli.artifacts.adapter_dir import read_adapter
from peftcli.checkpoint.reader import Checkpoint, open_checkpoint
from peftcli.cli import cli
from peftcli.errors import BadInputError
from peftcli.injection import inject
from peftcli.merging import sources
from peftcli.merging.engine import merge
from peftcli.methods import METHODS
from tests.helpers import assert_error, edited_adapter, randomize_

# Per-tensor folds, several targets each (the tiny Llama's default targets, or every linear layer).
CASES = [
    ("lora", {"targets": "all-linear"}),
    ("loha", {}),
    ("lokr", {}),
    ("vera", {}),
    ("oft", {}),
    ("boft", {}),
    ("hra", {}),
    ("ia3", {}),
]


def _adapter(base: str, tmp_path, name: str, opts: dict) -> str:
    from peftcli.attach import load_adapted

    run = str(tmp_path / f"{name}-init")
    inject(base, name, METHODS[name].config_cls(**opts), run)
    adapted = load_adapted(base, run)
    randomize_([p for p in adapted.parameters() if p.requires_grad], seed=3, scale=0.1)
    adapted.save(str(tmp_path / name))
    return str(tmp_path / name)


def _module(key: str) -> str | None:
    """The Llama module an adapter key belongs to (``…layers.0.self_attn.q_proj``), None for shared ones."""
    parts = key.split(".")
    for i, p in enumerate(parts[:-1]):
        if p in ("self_attn", "mlp"):
            return ".".join(parts[: i + 2])
    return None


@pytest.mark.parametrize("name, opts", CASES, ids=[c[0] for c in CASES])
def test_merge_holds_one_modules_adapter_tensors_at_a_time(tiny_llama, tmp_path, monkeypatch, name, opts):
    run = _adapter(tiny_llama, tmp_path, name, opts)
    weights = os.path.realpath(os.path.join(run, "adapter_model.safetensors"))
    whole = read_adapter(run).tensors
    by_module: dict[str | None, int] = {}
    for key, t in whole.items():
        by_module[_module(key)] = by_module.get(_module(key), 0) + t.nbytes
    shared = by_module.pop(None, 0)
    assert len(by_module) >= 4, by_module  # several targets, or the bound below proves nothing
    bound = max(by_module.values()) + shared
    total = sum(by_module.values()) + shared
    assert bound < total

    live = {"bytes": 0, "peak": 0}
    real_get = Checkpoint.get

    def counted(self, key):
        t = real_get(self, key)
        if os.path.realpath(self.path) == weights:
            live["bytes"] += t.nbytes
            live["peak"] = max(live["peak"], live["bytes"])
            weakref.finalize(t, lambda n=t.nbytes: live.__setitem__("bytes", live["bytes"] - n))
        return t

    monkeypatch.setattr(Checkpoint, "get", counted)
    report = merge(tiny_llama, [run], str(tmp_path / "merged"))
    assert report.changed >= 4
    assert 0 < live["peak"] <= bound, (live["peak"], bound, total)


@pytest.mark.parametrize("name", ["loha", "vera", "oft"])
def test_streamed_merge_writes_the_bytes_of_the_whole_adapters_fold(tiny_llama, tmp_path, monkeypatch, name):
    run = _adapter(tiny_llama, tmp_path, name, {})
    merge(tiny_llama, [run], str(tmp_path / "streamed.safetensors"))
    monkeypatch.setattr(sources, "_streamed_deltas", lambda method, cfg, tensors, base: method.deltas(cfg, dict(tensors.items()), base))
    merge(tiny_llama, [run], str(tmp_path / "whole.safetensors"))
    assert (tmp_path / "streamed.safetensors").read_bytes() == (tmp_path / "whole.safetensors").read_bytes()


def _merge_refused(base: str, run: str, tmp_path) -> str:
    out = str(tmp_path / "merged")
    with pytest.raises(BadInputError) as whole:
        read_adapter(run)  # the error reading the adapter whole gives
        raise AssertionError("the adapter was read")
    result = CliRunner().invoke(cli, ["merge", base, run, "-o", out])
    assert_error(result, 1, whole.value.message, out)
    return whole.value.message


def test_truncated_adapter_is_refused_before_any_output(tiny_llama, tmp_path):
    run = _adapter(tiny_llama, tmp_path, "loha", {})
    weights = os.path.join(run, "adapter_model.safetensors")
    data = open(weights, "rb").read()
    with open(weights, "wb") as f:
        f.write(data[:-100])  # the last tensor's values cut short
    assert "truncat" in _merge_refused(tiny_llama, run, tmp_path)


def test_integer_adapter_tensor_is_refused_before_any_output(tiny_llama, tmp_path):
    run = _adapter(tiny_llama, tmp_path, "loha", {})
    weights = os.path.join(run, "adapter_model.safetensors")
    data = bytearray(open(weights, "rb").read())
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    key = sorted(k for k in header if k != "__metadata__")[-1]
    header[key]["dtype"] = "I32"  # same width as F32: the header stays consistent
    text = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(text) == n
    with open(weights, "wb") as f:
        f.write(data[:8] + text + data[8 + n :])
    assert "not floating-point" in _merge_refused(tiny_llama, run, tmp_path)


def test_non_finite_module_is_refused_as_the_whole_adapter_refuses_it(tiny_llama, tmp_path):
    src = _adapter(tiny_llama, tmp_path, "loha", {})
    last = sorted(k for k in read_adapter(src).tensors if k.endswith("hada_w1_a"))[-1]
    run = edited_adapter(src, tmp_path / "nan", tensors=lambda t: t[last].view(-1)[0].fill_(float("nan")))
    adapter = read_adapter(run)
    method = METHODS["loha"]
    with pytest.raises(BadInputError) as whole, open_checkpoint(tiny_llama) as base:  # the whole adapter's error
        method.deltas(method.config_from_adapter(adapter.config), dict(adapter.tensors), base)
    out = str(tmp_path / "merged")
    assert_error(CliRunner().invoke(cli, ["merge", tiny_llama, run, "-o", out]), 1, whole.value.message, out)
    assert torch.isnan(adapter.tensors[last]).any()

