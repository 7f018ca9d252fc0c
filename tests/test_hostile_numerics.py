"""Numerically exact merges and tensor-size safety, against hand-built checkpoints.

- F64 bases merge in fp64 (an fp64 formula, bit for bit), every other float in fp32 cast once;
- entries and tensors no input changes come out with the base's bytes (−0.0 included);
- tensors no merge computes with (FP8, bool, integers) are copied only when no input changes them;
- a merged value that is not finite in the output dtype is refused, nothing written;
- ``check``'s finiteness scan reads every dtype safetensors holds;
- shapes whose sizes overflow 64 bits are refused from headers and .diff metadata.
"""

from __future__ import annotations

import json
import os
import struct
from fractions import Fraction

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from peftcli.checkpoint.reader import open_checkpoint
from peftcli.cli import cli
from peftcli.errors import BadInputError
from peftcli.merging.arithmetic import combine as combine_phis
from peftcli.merging.engine import merge
from tests.safetensors_craft import make_file, write


def save(path, tensors: dict) -> str:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return str(path)


def pickled(path, tensors: dict) -> str:
    torch.save({k: v.clone() for k, v in tensors.items()}, str(path))
    return str(path)


def tensors_of(path: str) -> dict[str, torch.Tensor]:
    with open_checkpoint(path) as ckpt:
        return {n: ckpt.get(n).clone() for n in ckpt.tensors}


def bits(t: torch.Tensor) -> np.ndarray:
    """The raw bytes of ``t``, for comparisons that tell −0.0 from +0.0 and NaN payloads apart."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy()


def assert_same_bits(a: torch.Tensor, b: torch.Tensor, what: str = "") -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, what
    assert np.array_equal(bits(a), bits(b)), what


def fma(w: float, x: np.ndarray, acc: np.ndarray) -> np.ndarray:
    """acc + w·x rounded once (exact rationals): torch's ``add_(x, alpha=w)`` is a fused multiply-add."""
    return np.array([float(Fraction(a) + Fraction(w) * Fraction(v)) for a, v in zip(acc.tolist(), x.tolist())])


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_one_line_error(result, code: int, *words: str) -> None:
    assert "Traceback" not in result.output, result.output
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "internal error" not in lines[0], result.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


# -- hand-built checkpoints ----------------------------------------------------------------------


def _f64_with_zeros(shape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g, dtype=torch.float64)  # full 53-bit mantissas: no fp32 holds them
    flat = t.view(-1)
    flat[::7] = -0.0
    flat[3::11] = 0.0
    return t


def _base_tensors() -> dict[str, torch.Tensor]:
    h = torch.randn(8, 8, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    h.view(-1)[::5] = -0.0
    return {
        "w": _f64_with_zeros((64, 48), 1),
        "v": _f64_with_zeros((300,), 2),  # 1-D: a diff keeps it whole
        "u": _f64_with_zeros((10,), 4),  # no input changes it
        "h": h,
        "pos": torch.arange(16, dtype=torch.int64),
    }


def _finetune(base: dict, seed: int, mask_every: int = 2) -> dict:
    """``base`` with w and v changed at every ``mask_every``-th entry (seeded), h at one entry."""
    g = torch.Generator().manual_seed(seed)
    ft = {k: v.clone() for k, v in base.items()}
    for name in ("w", "v"):
        flat = ft[name].view(-1)
        flat[::mask_every] += torch.randn(flat[::mask_every].shape, generator=g, dtype=torch.float64) * 0.01
    ft["h"].view(-1)[1] = 0.5
    return ft


def _diff_mask(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Entries whose bytes differ."""
    n = a.element_size()
    return ~(bits(a).reshape(-1, n) == bits(b).reshape(-1, n)).all(axis=1)


# -- F64: fp64 arithmetic, the base's bits where nothing changes ---------------------------------


@pytest.mark.parametrize("whole", [False, True], ids=["ranged", "whole"])
def test_f64_linear_merge_is_the_fp64_formula(tmp_path, whole):
    base = _base_tensors()
    ft1, ft2 = _finetune(base, 10), _finetune(base, 11, mask_every=3)
    if whole:  # a pickled base: every tensor produced whole by produce()
        base_path = pickled(tmp_path / "base.bin", base)
    else:
        base_path = save(tmp_path / "base.safetensors", base)
    paths = [save(tmp_path / "ft1.safetensors", ft1), save(tmp_path / "ft2.safetensors", ft2)]
    out = str(tmp_path / "out.safetensors")
    lam = [0.7, -0.3]
    merge(base_path, paths, out, weights=lam, allow_pickle=True)
    got = tensors_of(out)
    for name in ("w", "v"):
        b = base[name].numpy().reshape(-1)
        phis = [ft[name].numpy().reshape(-1) - b for ft in (ft1, ft2)]  # fp64
        acc = np.zeros_like(b)
        for w, phi in zip(lam, phis):
            acc = fma(w, phi, acc)
        want = np.where(acc == 0, b, acc + b)  # θ₀ + 0 is θ₀, its sign of zero included
        assert np.array_equal(bits(got[name]), want.view(np.uint8)), name
        untouched = ~(_diff_mask(base[name], ft1[name]) | _diff_mask(base[name], ft2[name]))
        assert untouched.sum() > 0
        assert np.array_equal(bits(got[name]).reshape(-1, 8)[untouched], bits(base[name]).reshape(-1, 8)[untouched]), name
    assert_same_bits(got["u"], base["u"], "u")
    assert_same_bits(got["pos"], base["pos"], "pos")
    # BF16 in fp32, cast once: the changed entry is the formula, the rest (−0.0 too) the base's bits
    h, changed = base["h"].reshape(-1), _diff_mask(base["h"], ft1["h"]) | _diff_mask(base["h"], ft2["h"])
    assert changed.sum() == 1 and torch.signbit(h[::5]).any()
    assert np.array_equal(bits(got["h"]).reshape(-1, 2)[~changed], bits(h).reshape(-1, 2)[~changed])
    x = h.float()[changed]
    want = (x + lam[0] * (ft1["h"].reshape(-1).float()[changed] - x) + lam[1] * (ft2["h"].reshape(-1).float()[changed] - x))
    assert torch.equal(got["h"].reshape(-1)[changed], want.to(torch.bfloat16))


def test_f64_diff_merge_changes_only_the_kept_entries(tmp_path):
    from peftcli.diffing import DiffOptions, diff

    base = _base_tensors()
    ft = _finetune(base, 12)
    base_path = save(tmp_path / "base.safetensors", base)
    ft_path = save(tmp_path / "ft.safetensors", ft)
    d = str(tmp_path / "task.diff")
    diff(base_path, ft_path, d, DiffOptions(density=0.25))
    out = str(tmp_path / "out.safetensors")
    merge(base_path, [d], out)
    got = tensors_of(out)
    from peftcli.artifacts.sparse_diff import read_diff

    with read_diff(d) as sd:
        idx, val = sd.get("w")
        _, v_val = sd.get("v")
    b = base["w"].numpy().reshape(-1)
    want = b.copy()
    kept = idx.long().numpy()
    want[kept] = np.where(val.numpy() == 0, b[kept], b[kept] + val.numpy())
    assert np.array_equal(bits(got["w"]), want.view(np.uint8))
    vb = base["v"].numpy()
    assert np.array_equal(bits(got["v"]), np.where(v_val.numpy() == 0, vb, vb + v_val.numpy()).view(np.uint8))
    assert_same_bits(got["u"], base["u"])
    # the diff itself holds φ in fp64: θ₀ + φ gives θ_ft back where θ_ft − θ₀ is exact
    assert np.array_equal(val.numpy(), (ft["w"].numpy().reshape(-1) - b)[kept])


@pytest.mark.parametrize("method, density", [("ties", 0.5), ("dare", 0.6), ("dare-ties", 0.6)])
def test_f64_sparse_methods_are_fp64_and_ranged_equals_whole(tmp_path, method, density):
    base = _base_tensors()
    fts = [_finetune(base, 20), _finetune(base, 21, mask_every=3)]
    paths = [save(tmp_path / f"ft{i}.safetensors", ft) for i, ft in enumerate(fts)]
    outs = []
    for whole in (False, True):
        base_path = pickled(tmp_path / "base.bin", base) if whole else save(tmp_path / "base.safetensors", base)
        out = str(tmp_path / f"out{int(whole)}.safetensors")
        merge(base_path, paths, out, weights=[1.0, 0.5], method=method, density=density, seed=3, allow_pickle=True)
        outs.append(tensors_of(out))
    for name in ("w", "v"):
        assert_same_bits(outs[0][name], outs[1][name], name)
        b = base[name]
        phis = [ft[name] - b for ft in fts]
        acc = combine_phis(phis, [1.0, 0.5], method, density=density, seed=3, key=name, dtype=torch.float64)
        want = torch.where(acc == 0, b, acc + b)
        assert_same_bits(outs[0][name], want, name)
    assert_same_bits(outs[0]["u"], base["u"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["linear", "ties"])
def test_unchanged_entries_keep_negative_zero(tmp_path, dtype, method):
    g = torch.Generator().manual_seed(5)
    w = torch.randn(40, 30, generator=g).to(dtype)
    w.view(-1)[::3] = -0.0
    ft = w.clone()
    ft.view(-1)[1::4] += 0.25
    base_path = save(tmp_path / "base.safetensors", {"w": w})
    out = str(tmp_path / "out.safetensors")
    merge(base_path, [save(tmp_path / "ft.safetensors", {"w": ft})], out, method=method, density=1.0 if method == "ties" else None)
    got = tensors_of(out)["w"]
    same = ~_diff_mask(w, ft)
    n = w.element_size()
    assert np.array_equal(bits(got).reshape(-1, n)[same], bits(w).reshape(-1, n)[same])
    assert torch.signbit(got.view(-1)[::3][same[::3]]).all()  # the −0.0 entries


# -- refusals: what cannot be merged, what is not finite ---------------------------------------


def _with_fixed(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(6, 4, generator=g),
        "q": torch.randn(4, 4, generator=g).to(torch.float8_e4m3fn),
        "r": torch.randn(8, generator=g).to(torch.float8_e5m2),
        "m": torch.tensor([True, False, True, True]),
        "pos": torch.arange(5, dtype=torch.int64),
    }


@pytest.mark.parametrize(
    "name, dtype, change",
    [
        ("q", "F8_E4M3", lambda t: t.view(torch.uint8).view(-1).__setitem__(3, 0x11)),
        ("r", "F8_E5M2", lambda t: t.view(torch.uint8).view(-1).__setitem__(0, 0x3C)),
        ("m", "BOOL", lambda t: t.__setitem__(1, True)),
        ("pos", "I64", lambda t: t.__setitem__(0, 7)),
    ],
)
@pytest.mark.parametrize("whole", [False, True], ids=["ranged", "whole"])
def test_merge_refuses_a_changed_tensor_it_cannot_merge(tmp_path, name, dtype, change, whole):
    base = _with_fixed()
    ft = {k: v.clone() for k, v in base.items()}
    ft["w"] += 0.5
    change(ft[name])
    assert _diff_mask(base[name], ft[name]).any()
    base_path = pickled(tmp_path / "base.bin", base) if whole else save(tmp_path / "base.safetensors", base)
    out = tmp_path / "out.safetensors"
    ft_path = save(tmp_path / "ft.safetensors", ft)
    with pytest.raises(BadInputError, match=f"tensor '{name}' \\({dtype}\\) differs from the base") as err:
        merge(base_path, [ft_path], str(out), allow_pickle=True)
    assert err.value.hint and str(ft_path) in err.value.message
    assert not [f for f in os.listdir(tmp_path) if f.startswith("out")]  # nothing written, no temporary
    if not whole:
        result = invoke("merge", base_path, ft_path, "-o", out)
        assert_one_line_error(result, 1, repr(name), dtype)
        result = invoke("diff", base_path, ft_path, "-o", tmp_path / "x.diff", "--dense")
        assert_one_line_error(result, 1, repr(name), dtype)


def test_merge_copies_unchanged_fp8_bool_and_integer_tensors_verbatim(tmp_path):
    base = _with_fixed()
    ft = {k: v.clone() for k, v in base.items()}
    ft["w"] += 0.5
    base_path = save(tmp_path / "base.safetensors", base)
    out = str(tmp_path / "out.safetensors")
    merge(base_path, [save(tmp_path / "ft.safetensors", ft)], out)
    got = tensors_of(out)
    for name in ("q", "r", "m", "pos"):
        assert_same_bits(got[name], base[name], name)
    assert torch.equal(got["w"], base["w"] + 0.5)


def test_an_adapter_changing_an_fp8_weight_is_refused():
    from types import SimpleNamespace

    from peftcli.merging.sources import Source, refuse_unmergeable

    ckpt = SimpleNamespace(tensors={"q": SimpleNamespace(dtype="F8_E4M3"), "w": SimpleNamespace(dtype="F32")})
    refuse_unmergeable(Source("a", "adapter", {"w": lambda t: t}), ckpt)
    with pytest.raises(BadInputError, match="changes 'q', a F8_E4M3 tensor"):
        refuse_unmergeable(Source("a", "adapter", {"q": lambda t: t}), ckpt)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_sum_beyond_the_output_dtype_is_refused(tmp_path, dtype):
    # θ₀ + λφ finite in fp32 (the work dtype) but Inf once cast to F16/BF16: written silently before
    top = torch.finfo(dtype).max
    base = {"w": torch.full((4, 4), top / 2).to(dtype), "b": torch.zeros(3, dtype=dtype)}
    ft = {"w": base["w"].clone(), "b": base["b"]}
    ft["w"].view(-1)[5] = top
    phi = float(ft["w"].view(-1)[5]) - float(base["w"].view(-1)[5])
    target = (top + float(torch.finfo(torch.float32).max)) / 2 if dtype == torch.bfloat16 else 2 * top
    lam = (target - float(base["w"].view(-1)[5])) / phi
    total = torch.tensor(lam * phi, dtype=torch.float32) + base["w"].view(-1)[5].float()
    assert torch.isfinite(total) and torch.isinf(total.to(dtype))
    base_path = save(tmp_path / "base.safetensors", base)
    out = tmp_path / "out.safetensors"
    with pytest.raises(BadInputError, match=r"merging gives NaN or Inf in 'w'"):
        merge(base_path, [save(tmp_path / "ft.safetensors", ft)], str(out), weights=[lam])
    assert not [f for f in os.listdir(tmp_path) if f.startswith("out")]


def test_f64_overflow_is_refused(tmp_path):
    base = {"w": torch.full((3,), 1e300, dtype=torch.float64)}
    ft = {"w": torch.full((3,), 2e300, dtype=torch.float64)}
    out = tmp_path / "out.safetensors"
    base_path = save(tmp_path / "base.safetensors", base)
    with pytest.raises(BadInputError, match=r"NaN or Inf in 'w'"):
        merge(base_path, [save(tmp_path / "ft.safetensors", ft)], str(out), weights=[1e9])
    assert not out.exists()


# -- check's finiteness scan: every dtype ------------------------------------------------------


def test_nonfinite_reads_every_dtype():
    from peftcli.preflight import nonfinite
    from peftcli.checkpoint.dtypes import torch_dtype
    from peftcli.checkpoint.safetensors_format import DTYPES

    for name, (_, attr) in DTYPES.items():
        if attr is None or not hasattr(torch, attr):
            continue
        t = torch.zeros(5, dtype=torch_dtype(name))
        assert nonfinite(name, t, "h") is None, name
    e4 = torch.zeros(3, dtype=torch.uint8)
    e4[1] = 0x7F  # NaN in E4M3 (which has no Inf)
    problem = nonfinite("q", e4.view(torch.float8_e4m3fn), "h")
    assert problem and "1 NaN" in problem.message and "Inf" not in problem.message
    e5 = torch.tensor([0x7C, 0xFC, 0x7E, 0], dtype=torch.uint8)  # +Inf, −Inf, NaN in E5M2
    problem = nonfinite("r", e5.view(torch.float8_e5m2), "h")
    assert problem and "1 NaN and 2 Inf" in problem.message


def test_check_scan_base_reports_fp8_nan_and_skips_integers(tmp_path):
    from peftcli.preflight import check

    q = torch.zeros(4, 4, dtype=torch.uint8)
    q[2, 3] = 0xFF  # NaN in E4M3
    base = {
        "w": torch.ones(2, 2),
        "q": q.view(torch.float8_e4m3fn),
        "r": torch.tensor([0x7C, 0], dtype=torch.uint8).view(torch.float8_e5m2),
        "m": torch.tensor([True, False]),
        "i": torch.arange(3, dtype=torch.int32),
        "u": torch.arange(3, dtype=torch.uint8),
    }
    report = check(save(tmp_path / "base.safetensors", base), [], scan_base=True)
    messages = [p.message for p in report.base.problems]
    assert any(m.startswith("q: 1 NaN") for m in messages), messages
    assert any(m.startswith("r: 1 Inf") for m in messages), messages
    assert not any(m.startswith(("m:", "i:", "u:", "w:")) for m in messages), messages


# -- shapes whose sizes overflow 64 bits ------------------------------------------------------


OVERFLOWING = [[0, 2**62, 4], [2**63, 0], [0, 2**32, 2**32], [2**61, 0], [0, 2**64]]


@pytest.mark.parametrize("shape", OVERFLOWING, ids=str)
def test_header_refuses_shapes_that_overflow(tmp_path, shape):
    from peftcli.checkpoint.safetensors_format import read_header

    entries = {
        "a": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
    }
    path = write(tmp_path / "bad.safetensors", make_file(entries, struct.pack("<2f", 1.0, 2.0)))
    with pytest.raises(BadInputError, match="tensor 'a'.*overflows 64-bit sizes") as err:
        read_header(path)
    assert path in err.value.message and err.value.hint
    good = save(tmp_path / "good.safetensors", {"a": torch.zeros(0), "b": torch.ones(2)})
    assert_one_line_error(invoke("check", path, "--scan-base"), 1, "overflows 64-bit sizes")
    assert_one_line_error(invoke("diff", good, path, "-o", tmp_path / "x.diff", "--dense"), 1, "overflows 64-bit sizes")
    assert_one_line_error(invoke("merge", path, good, "-o", tmp_path / "m.safetensors"), 1, "overflows 64-bit sizes")
    assert not (tmp_path / "x.diff").exists() and not (tmp_path / "m.safetensors").exists()


def test_header_accepts_large_but_representable_empty_shapes(tmp_path):
    from peftcli.checkpoint.safetensors_format import read_header

    entries = {"a": {"dtype": "F32", "shape": [0, 2**40, 2**20], "data_offsets": [0, 0]}}
    path = write(tmp_path / "ok.safetensors", make_file(entries, b""))
    assert read_header(path).entries[0].shape == (0, 2**40, 2**20)
    with open_checkpoint(path) as ckpt:
        assert ckpt.get("a").shape == (0, 2**40, 2**20)


def test_diff_metadata_shapes_that_overflow_are_refused(tmp_path):
    """A sparse tensor's shape is only in the .diff's metadata: combine would allocate from it."""
    from peftcli.checkpoint.fingerprint import structure_hash
    from peftcli.combining import combine
    from peftcli.diffing import DiffOptions, diff

    base = {"w": torch.randn(8, 8, generator=torch.Generator().manual_seed(0))}
    ft = {"w": base["w"] + 1.0}
    d = str(tmp_path / "a.diff")
    diff(save(tmp_path / "b.safetensors", base), save(tmp_path / "f.safetensors", ft), d, DiffOptions(top_k=2))
    with open(d, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    meta = header.pop("__metadata__")
    shape = [2**32, 2**32]  # 2^64 elements: wraps to 0 in 64-bit arithmetic
    meta["shapes"] = json.dumps({"w": ["F32", shape]})
    meta["dense_tensors"] = json.dumps(["w"])  # combine sums a "whole" tensor into a buffer of its numel
    fp = json.loads(meta["base_fingerprint"])
    fp["tensors"]["w"] = ["F32", shape]
    fp["hash"], fp["content"] = structure_hash(fp["tensors"]), None
    meta["base_fingerprint"] = json.dumps(fp)
    bad = write(tmp_path / "bad.diff", make_file(header, raw[8 + n :], meta))
    with pytest.raises(BadInputError, match=r"tensor 'w' in 'shapes': the shape F32\[4294967296, 4294967296\] overflows"):
        combine([bad], "scale", str(tmp_path / "out.diff"), by=2.0)
    assert_one_line_error(invoke("combine", bad, "--op", "scale", "--by", "2", "-o", tmp_path / "o.diff"), 1, "overflows")


@pytest.mark.parametrize("whole", [False, True], ids=["ranged", "whole"])
def test_a_dtype_cast_beyond_range_is_refused(tmp_path, whole):
    # an untouched F32 tensor cast by --dtype F16: 1e5 became Inf silently before
    base = {"w": torch.ones(3, 3), "big": torch.tensor([1.0, 1e5])}
    ft = {"w": base["w"] + 1.0, "big": base["big"].clone()}
    base_path = pickled(tmp_path / "base.bin", base) if whole else save(tmp_path / "base.safetensors", base)
    ft_path = save(tmp_path / "ft.safetensors", ft)
    out = tmp_path / "out.safetensors"
    with pytest.raises(BadInputError, match=r"'big'.*float16"):  # φ = 0 there: θ₀ + 0, cast
        merge(base_path, [ft_path], str(out), dtype="F16", allow_pickle=True)
    assert not [f for f in os.listdir(tmp_path) if f.startswith("out")]
    merge(base_path, [ft_path], str(out), dtype="BF16", allow_pickle=True)  # in range: written
    assert torch.equal(tensors_of(str(out))["big"], base["big"].to(torch.bfloat16))


def test_check_cast_refuses_only_what_the_cast_made_infinite():
    from peftcli.merging.ranged import check_cast

    x = torch.tensor([1.0, 1e5])
    with pytest.raises(BadInputError, match="'t' holds values beyond the range of float16"):
        check_cast("t", x, x.to(torch.float16))
    check_cast("t", x, x.to(torch.bfloat16))
    inf = torch.tensor([1.0, float("inf")])
    check_cast("t", inf, inf.to(torch.float16))  # already Inf in the base: the scan's business, as with Copy


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_apply_to_keeps_the_base_bits_where_phi_is_zero(tmp_path, dtype):
    from peftcli.artifacts.sparse_diff import read_diff
    from peftcli.diffing import DiffOptions, diff

    base = {"w": _f64_with_zeros((20, 10), 7).to(dtype)}
    ft = {"w": base["w"].clone()}
    ft["w"].view(-1)[1::3] += 0.125
    b, f = save(tmp_path / "b.safetensors", base), save(tmp_path / "f.safetensors", ft)
    for options in (DiffOptions(dense=True), DiffOptions(density=0.5)):
        d = str(tmp_path / f"{options.method}.diff")
        diff(b, f, d, options)
        with read_diff(d) as sd:
            got = sd.apply_to("w", base["w"])
        same = ~_diff_mask(base["w"], ft["w"])
        n = base["w"].element_size()
        assert np.array_equal(bits(got).reshape(-1, n)[same], bits(base["w"]).reshape(-1, n)[same]), options
        if dtype == torch.float64:  # fp64: θ₀ + (θ_ft − θ₀) exactly here (a power of two added)
            kept = torch.from_numpy(~same) & (got.view(-1) != base["w"].view(-1))
            assert torch.equal(got.view(-1)[kept], ft["w"].view(-1)[kept])


def test_check_and_merge_agree_on_an_adapter_over_an_fp8_weight(tiny_llama, tmp_path):
    """check must say what merge says: a LoRA on a weight stored as F8_E4M3 cannot merge."""
    import shutil

    from safetensors.torch import load_file

    base = tmp_path / "fp8"
    shutil.copytree(tiny_llama, base)
    weights = load_file(str(base / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"
    weights[name] = weights[name].to(torch.float8_e4m3fn)
    save_file(weights, str(base / "model.safetensors"), metadata={"format": "pt"})
    runner = CliRunner()
    made = runner.invoke(cli, ["inject", "lora", tiny_llama, "-o", str(tmp_path / "lora"), "--targets", "q_proj"])
    assert made.exit_code == 0, made.output
    checked = runner.invoke(cli, ["check", str(base), str(tmp_path / "lora"), "--json"])
    doc = json.loads(checked.stdout)
    assert f"changes '{name}', a F8_E4M3 tensor" in doc["merge_refusal"]
    merged = runner.invoke(cli, ["merge", str(base), str(tmp_path / "lora"), "-o", str(tmp_path / "out")])
    assert merged.exit_code == 1 and f"changes '{name}', a F8_E4M3 tensor" in merged.stderr
    assert not (tmp_path / "out").exists()
