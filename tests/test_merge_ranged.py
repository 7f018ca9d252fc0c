"""Merging by ranges (peftcli.merging.ranged) writes exactly the bytes of merging whole tensors.

The reference is the whole-tensor path of the engine (``produce`` with ``arithmetic.combine``),
forced by opening the inputs without their ranged streams. Ranges are made tiny so every tensor
spans many of them, and the values are multiples of 1/64 so TIES meets many equal magnitudes at
its cut, spread over several ranges.
"""

from __future__ import annotations

import os


import pytest
import torch

from peftcli.checkpoint.reader import open_checkpoint
from peftcli.checkpoint.writer import SafetensorsStreamWriter, TensorSpec, save_state_dict
from peftcli.diffing import DiffOptions, diff
from peftcli.errors import BadInputError, UsageError
from peftcli.merging import ranged
from peftcli.merging.engine import merge
from peftcli.merging.pipeline import ReadAhead, WriteBehind
from tests.helpers import whole_tensor_path

SHAPES = {"a.weight": (37, 29), "b.weight": (1000,), "c.bias": (5,), "d.weight": (64, 3)}


def _grid(shape, gen, lo, hi):
    """Values k/64, k an integer in [lo, hi): exact in every float dtype here, with many equal magnitudes."""
    return torch.randint(lo, hi, shape, generator=gen).float() / 64


@pytest.fixture()
def models(tmp_path):
    def build(dtype: torch.dtype):
        gen = torch.Generator().manual_seed(0)
        base = {n: _grid(s, gen, -50, 50).to(dtype) for n, s in SHAPES.items()}
        base["steps"] = torch.arange(6, dtype=torch.int64)  # not floating: copied byte for byte
        paths = [str(tmp_path / "base")]
        save_state_dict(base, paths[0])
        for seed in (1, 2):
            g = torch.Generator().manual_seed(seed)
            ft = {n: (t + _grid(t.shape, g, -3, 4).to(dtype)) if t.is_floating_point() else t for n, t in base.items()}
            paths.append(str(tmp_path / f"ft{seed}"))
            save_state_dict(ft, paths[-1])
        return paths

    return build


TASK = {"linear": "Linear", "ties": "Ties", "dare": "Dare", "dare-ties": "Dare"}  # the ranged task of each method


def _bytes(path: str) -> bytes:
    with open(os.path.join(path, "model.safetensors"), "rb") as f:
        return f.read()


def _runs(monkeypatch) -> dict[str, int]:
    """How often each ranged task ran (so a test can tell the ranged path was taken)."""
    runs: dict[str, int] = {}
    for cls in (ranged.Linear, ranged.Ties, ranged.Dare, ranged.Copy, ranged.Cast):
        real = cls.run

        def run(self, ctx, real=real, name=cls.__name__):
            runs[name] = runs.get(name, 0) + 1
            return real(self, ctx)

        monkeypatch.setattr(cls, "run", run)
    return runs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize(
    "method, weights, density, out_dtype",
    [
        ("linear", [0.7, 1.3], None, None), ("ties", [0.3, 1.1], 0.5, None), ("ties", [1.0, 1.0], 0.25, "BF16"),
        ("linear", [1.0, -0.6], None, "F32"), ("dare", [0.8, -0.5], 0.3, None), ("dare-ties", [1.2, 0.4], 0.6, "F16"),
    ],
)
def test_ranged_merge_of_checkpoints_equals_the_whole_tensor_merge(models, tmp_path, monkeypatch, dtype, method, weights, density, out_dtype):
    base, *fts = models(dtype)
    monkeypatch.setattr(ranged, "RANGE", 64)  # every floating tensor but one spans several ranges
    runs = _runs(monkeypatch)
    opts = dict(weights=weights, method=method, density=density, dtype=out_dtype)
    merge(base, fts, str(tmp_path / "ranged"), **opts)
    assert runs.get(TASK[method]) == len(SHAPES)
    whole_tensor_path(monkeypatch)
    merge(base, fts, str(tmp_path / "whole"), **opts)
    assert _bytes(str(tmp_path / "ranged")) == _bytes(str(tmp_path / "whole"))


@pytest.mark.parametrize("method, density", [("linear", None), ("ties", 0.4), ("dare", 0.5), ("dare-ties", 0.7)])
@pytest.mark.parametrize("options", [DiffOptions(density=0.3), DiffOptions(dense=True, values="fp32")], ids=["sparse", "dense"])
def test_ranged_merge_of_diffs_and_a_cast_equals_the_whole_tensor_merge(models, tmp_path, monkeypatch, method, density, options):
    base, *fts = models(torch.bfloat16)
    diffs = []
    for i, ft in enumerate(fts):
        diffs.append(str(tmp_path / f"{i}.diff"))
        diff(base, ft, diffs[-1], options)
    monkeypatch.setattr(ranged, "RANGE", 50)
    runs = _runs(monkeypatch)
    opts = dict(weights=[0.9, 0.6], method=method, density=density, dtype="F16")
    merge(base, diffs, str(tmp_path / "ranged"), **opts)
    assert runs.get(TASK[method]) == len(SHAPES)
    assert runs.get("Copy") == 1  # the int64 tensor, which no diff covers: copied, not cast
    whole_tensor_path(monkeypatch)
    merge(base, diffs, str(tmp_path / "whole"), **opts)
    assert _bytes(str(tmp_path / "ranged")) == _bytes(str(tmp_path / "whole"))


@pytest.mark.parametrize("method", ["dare", "dare-ties"])
def test_dare_leaves_out_inputs_that_do_not_touch_a_tensor_without_changing_a_bit(models, tmp_path, monkeypatch, method):
    # The whole-tensor path gives every input a (zero) φ and draws every input's mask; the
    # ranged task draws only for the inputs that touch the tensor. A sparse diff of 20 entries
    # leaves most tensors to the second input alone.
    base, ft1, ft2 = models(torch.float32)
    few = str(tmp_path / "few.diff")
    diff(base, ft1, few, DiffOptions(top_k=20))
    with open_checkpoint(base) as b:
        floating = sum(1 for n in b if b.tensors[n].dtype == "F32")
    monkeypatch.setattr(ranged, "RANGE", 128)
    opts = dict(weights=[1.5, 0.7], method=method, density=0.4, seed=7)
    runs = _runs(monkeypatch)
    merge(base, [few, ft2], str(tmp_path / "ranged"), **opts)
    assert runs.get("Dare") == floating
    whole_tensor_path(monkeypatch)
    merge(base, [few, ft2], str(tmp_path / "whole"), **opts)
    assert _bytes(str(tmp_path / "ranged")) == _bytes(str(tmp_path / "whole"))
    merge(base, [few, ft2], str(tmp_path / "reseeded"), **{**opts, "seed": 8})
    assert _bytes(str(tmp_path / "reseeded")) != _bytes(str(tmp_path / "whole"))  # the seed is used


def test_untouched_tensors_are_copied_or_cast_and_stdout_gets_the_same_bytes(tiny_llama, tmp_path, monkeypatch):
    import io

    from peftcli.injection import inject
    from peftcli.methods import METHODS

    run = str(tmp_path / "lora")
    inject(tiny_llama, "lora", METHODS["lora"].config_cls(), run)  # q and v only: the rest is untouched
    monkeypatch.setattr(ranged, "RANGE", 100)
    runs = _runs(monkeypatch)
    out = str(tmp_path / "out.safetensors")
    merge(tiny_llama, [run], out, dtype="BF16")
    with open_checkpoint(tiny_llama) as b, open_checkpoint(out) as m:
        untouched = [n for n in b if ".q_proj." not in n and ".v_proj." not in n]
        assert runs.get("Cast") == len(untouched) > 0
        for name in untouched:  # the whole-tensor definition: Tensor.to
            assert m.read_bytes(name) == b.get(name).to(torch.bfloat16).view(torch.int16).numpy().tobytes(), name
    merge(tiny_llama, [run], str(tmp_path / "same.safetensors"))
    assert runs.get("Copy") == len(untouched)
    stream = io.BytesIO()
    merge(tiny_llama, [run], None, stream=stream)
    assert stream.getvalue() == open(tmp_path / "same.safetensors", "rb").read()


def test_a_nan_in_a_late_range_is_refused_and_nothing_is_written(models, tmp_path, monkeypatch):
    base, ft, _ = models(torch.float32)
    with open_checkpoint(ft) as ckpt:
        sd = {n: ckpt.get(n) for n in ckpt}
    sd["b.weight"][900] = float("nan")
    bad = str(tmp_path / "bad")
    save_state_dict(sd, bad)
    monkeypatch.setattr(ranged, "RANGE", 64)
    out = tmp_path / "merged"
    with pytest.raises(BadInputError, match="merging gives NaN or Inf in 'b.weight'"):
        merge(base, [bad], str(out))
    assert not out.exists() and not [n for n in os.listdir(tmp_path) if "peftcli-tmp" in n]


def test_read_ahead_reads_in_order_and_raises_on_the_consumer_thread(tmp_path):
    data = bytes(range(256)) * 40
    path = tmp_path / "f"
    path.write_bytes(data)
    requests = [(str(path), 0, 100), (str(path), 5000, 3000), (str(path), 10, 0), (str(path), 10230, 100)]
    with ReadAhead(iter(requests), count=2, nbytes=3000) as reads:
        for _, offset, n in requests[:3]:
            buf, got = reads.next()
            assert bytes(got.numpy()) == data[offset : offset + n]
            reads.give(buf)
        with pytest.raises(BadInputError, match="shrank"):  # 10 bytes short of the end
            reads.next()


def test_write_behind_writes_in_order_and_raises_what_the_writer_raised():
    class Writer:
        def __init__(self):
            self.seen = []

        def write_partial(self, name, data):
            if name == "bad":
                raise OSError(28, "No space left on device")
            self.seen.append((name, bytes(data)))

    w = Writer()
    done = []
    behind = WriteBehind(w, limit=4)
    for i in range(5):
        behind.put("t", bytes([i]) * 3, done=lambda i=i: done.append(i))
    behind.put("bad", b"x")
    with pytest.raises(OSError, match="No space"):
        for _ in range(1000):  # a later put or the close raises it
            behind.put("t", b"y")
        behind.close()
    behind.__exit__(OSError, None, None)
    assert w.seen == [("t", bytes([i]) * 3) for i in range(5)] and done == [0, 1, 2, 3, 4]


def test_partial_writes_must_complete_each_tensor_in_order():
    import io

    specs = [TensorSpec("x", "F32", (3,)), TensorSpec("y", "U8", (2,))]
    buf = io.BytesIO()
    w = SafetensorsStreamWriter(buf, specs)
    assert not w.write_partial("x", torch.tensor([1.0, 2.0]))
    with pytest.raises(UsageError, match="half written"):
        w.write("x", torch.zeros(3))
    with pytest.raises(UsageError, match="out of order"):
        w.write_partial("y", b"\x00")
    with pytest.raises(UsageError, match="more than its 12"):
        w.write_partial("x", torch.tensor([3.0, 4.0]))
    assert w.write_partial("x", torch.tensor([3.0]))
    with pytest.raises(UsageError, match="promised U8"):
        w.write_partial("y", torch.zeros(1))
    assert w.write_partial("y", b"\x07\x08")
    w.finish()
    from safetensors.torch import load

    got = load(buf.getvalue())
    assert got["x"].tolist() == [1.0, 2.0, 3.0] and got["y"].tolist() == [7, 8]
