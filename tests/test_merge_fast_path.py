"""merge's torch-free path (merging.fast_linear, fast_kernel): the torch path's bytes, without torch.

The reference is the torch path itself (``engine.merge``, which never takes the fast path),
compared byte for byte: every output file (safetensors with its provenance metadata, config
and tokenizer files) and the --json report; and the fp64 formula θ₀ + Σ λᵢ(θᵢ − θ₀).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from peftcli.checkpoint.reader import open_checkpoint
from peftcli.checkpoint.writer import save_state_dict
from peftcli.cli import cli
from peftcli.merging import fast_linear
from peftcli.merging.engine import merge
from peftcli.merging.fast_kernel import fma32

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _model(src: str, out: str, dtype: torch.dtype, seed: int | None, scale: float = 0.01) -> str:
    """``src``'s tensors in ``dtype``; with ``seed``, plus seeded noise (a "fine-tune")."""
    g = torch.Generator().manual_seed(seed or 0)
    with open_checkpoint(src) as ckpt:
        sd = {n: ckpt.get(n).float() for n in ckpt}
    if seed is not None:
        sd = {n: t + scale * torch.randn(t.shape, generator=g) for n, t in sd.items()}
    save_state_dict({n: t.to(dtype) for n, t in sd.items()}, out, source_dir=src)
    return out


def _files(path: str) -> dict[str, bytes]:
    if os.path.isfile(path):
        return {"": open(path, "rb").read()}
    return {f: open(os.path.join(path, f), "rb").read() for f in sorted(os.listdir(path))}


@pytest.fixture(scope="module", params=list(DTYPES))
def models(request, tiny_llama, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"fast-{request.param}")
    dtype = DTYPES[request.param]
    base = _model(tiny_llama, str(d / "base"), dtype, None)
    fts = [_model(base, str(d / f"ft{i}"), dtype, i) for i in (1, 2, 3)]
    return request.param, base, fts


@pytest.mark.parametrize("weights", ["1,0.8", "-0.5", "0.8,-0.5,0.3"])
def test_fast_path_writes_the_torch_paths_bytes(models, weights, tmp_path):
    dtype, base, fts = models
    lam = [float(w) for w in weights.split(",")]
    inputs = fts[: len(lam)]
    result = CliRunner().invoke(cli, ["merge", base, *inputs, "--weights", weights, "-o", str(tmp_path / "fast"), "--json"])
    assert result.exit_code == 0, result.output
    torch_report = merge(base, inputs, str(tmp_path / "slow"), weights=lam)  # the library call: the torch path
    fast, slow = _files(str(tmp_path / "fast")), _files(str(tmp_path / "slow"))
    assert list(fast) == list(slow) and all(fast[f] == slow[f] for f in fast)  # safetensors + metadata, config, tokenizer
    report = json.loads(result.stdout)
    assert report == {**torch_report.to_json(), "output": str(tmp_path / "fast"), "bytes": report["bytes"]}
    assert report["bytes"] == torch_report.bytes
    # And both are θ₀ + Σ λᵢ(θᵢ − θ₀) in fp64, rounded once to the dtype (up to fp32 accumulation).
    with open_checkpoint(base) as b, open_checkpoint(str(tmp_path / "fast")) as m:
        tops = [open_checkpoint(f) for f in inputs]
        for n in b:
            t0 = b.get(n).double()
            ref = t0 + sum(w * (t.get(n).double() - t0) for w, t in zip(lam, tops))
            scale = t0.abs() + sum(abs(w) * t.get(n).double().abs() for w, t in zip(lam, tops))
            tol = torch.finfo(DTYPES[dtype]).eps * (4 * scale + 1e-30)  # a few roundings of the terms' size
            assert ((m.get(n).double() - ref).abs() <= tol).all(), n
        for t in tops:
            t.close()


def test_a_fast_path_merge_imports_no_torch(models, tmp_path):
    dtype, base, fts = models
    if dtype != "BF16":  # one subprocess is enough: the path is the same for every dtype
        pytest.skip("checked on BF16")
    out = str(tmp_path / "m.safetensors")
    code = (
        "import sys\nfrom peftcli.cli import cli\n"
        f"try:\n    cli.main(['merge', {base!r}, {fts[0]!r}, {fts[1]!r}, '--weights', '1,0.8', '-o', {out!r}], prog_name='peftcli')\n"
        "except SystemExit as e:\n    assert not e.code, e.code\n"
        "sys.stderr.write(repr('torch' in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().endswith("False"), proc.stderr
    merge(base, fts[:2], str(tmp_path / "t.safetensors"), weights=[1.0, 0.8])
    assert open(out, "rb").read() == open(tmp_path / "t.safetensors", "rb").read()


def test_fma_matches_torch_at_halfway_points_and_subnormals():
    """Sums that land on an fp32 halfway point in fp64 (double rounding would err) and subnormal results."""
    rng = np.random.default_rng(0)
    n = 1 << 16
    acc = (1 + rng.integers(0, 1 << 23, n) * 2.0**-23).astype(np.float32)
    # λφ = half an fp32 ulp of acc less a tail far below fp64's precision at acc's scale: the
    # fp64 sum rounds onto the halfway point; the tail decides the correct fp32 rounding.
    lam = np.float32(1 + 2.0**-23)
    phi = (2.0**-24 * (1 - 2.0**-23) * np.where(rng.random(n) < 0.5, 1, -1)).astype(np.float32)  # λφ = ±(2⁻²⁴ − 2⁻⁷⁰)
    tiny = rng.standard_normal(n // 4).astype(np.float32) * np.float32(1e-38)
    cases = [(acc, phi, lam), (tiny, rng.standard_normal(n // 4).astype(np.float32) * np.float32(1e-38), np.float32(0.3))]
    for a, p, w in cases:
        want = torch.from_numpy(a.copy()).add_(torch.from_numpy(p), alpha=float(w)).numpy()
        got = a.copy()
        fma32(p, w, got, np.empty(len(a)), np.empty(len(a), np.int64))
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    naive = (acc.astype(np.float64) + np.float64(lam) * phi).astype(np.float32)  # what the fixup corrects
    assert not np.array_equal(naive.view(np.uint32), torch.from_numpy(acc.copy()).add_(torch.from_numpy(phi), alpha=float(lam)).numpy().view(np.uint32))


def test_overflow_is_refused_as_the_torch_path_refuses_it(tiny_llama, tmp_path):
    base = _model(tiny_llama, str(tmp_path / "base"), torch.float16, None)
    with open_checkpoint(base) as ckpt:
        sd = {n: ckpt.get(n) for n in ckpt}
    name = sorted(sd)[-1]
    sd[name] = sd[name].clone().fill_(60000.0)
    save_state_dict(sd, str(tmp_path / "ft"), source_dir=base)
    args = ["merge", base, str(tmp_path / "ft"), "--weights", "2", "-o", str(tmp_path / "out")]
    assert fast_linear.plan(base, [str(tmp_path / "ft")], str(tmp_path / "out"), _opts("2")) is not None
    fast = CliRunner().invoke(cli, args)
    with pytest.raises(Exception) as slow:
        merge(base, [str(tmp_path / "ft")], str(tmp_path / "out2"), weights=[2.0])
    hint = slow.value.hint.replace("`weights`", "--weights")  # the CLI names options as flags
    assert fast.exit_code == 1 and fast.output.strip() == f"error: {slow.value.message} ({hint})"
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / "out2")


def _opts(weights: str, **more):
    from peftcli.merging.options import merge_options

    return merge_options({"weights": weights, **more})


def test_what_the_fast_path_does_not_take_goes_the_torch_way(models, tmp_path):
    dtype, base, fts = models
    out = str(tmp_path / "o")
    assert fast_linear.plan(base, fts[:2], out, _opts("1,0.8")) is not None
    assert fast_linear.plan(base, fts[:2], out, _opts("1,0.8", method="ties", density=0.5)) is None
    assert fast_linear.plan(base, fts[:2], out, _opts("1,0.8", dtype="F32" if dtype != "F32" else "F16")) is None
    assert fast_linear.plan(base, fts[:2], None, _opts("1,0.8")) is None  # stdout
    assert fast_linear.plan(base, [fts[0], str(tmp_path / "x.diff")], out, _opts("1,0.8")) is None
    assert fast_linear.plan(base, [fts[0], str(tmp_path / "missing")], out, _opts("1,0.8")) is None
    os.environ["ATEN_CPU_CAPABILITY"] = "default"  # torch's kernels without a fused multiply-add
    try:
        assert fast_linear.plan(base, fts[:2], out, _opts("1,0.8")) is None
    finally:
        del os.environ["ATEN_CPU_CAPABILITY"]


def test_shards_get_the_real_hashes_in_every_header(models, tmp_path):
    """The header is written with placeholder hashes and patched once they are known: in every shard."""
    dtype, base, fts = models
    if dtype != "F16":
        pytest.skip("checked on F16")
    args = ["--weights", "0.8,-0.5", "--max-shard-size", "40KB"]
    result = CliRunner().invoke(cli, ["merge", base, *fts[:2], *args, "-o", str(tmp_path / "fast")])
    assert result.exit_code == 0, result.output
    merge(base, fts[:2], str(tmp_path / "slow"), weights=[0.8, -0.5], max_shard_size="40KB")
    fast, slow = _files(str(tmp_path / "fast")), _files(str(tmp_path / "slow"))
    assert len([f for f in fast if f.endswith(".safetensors")]) > 2
    assert list(fast) == list(slow) and all(fast[f] == slow[f] for f in fast)
    assert b"0" * 64 not in b"".join(fast.values())
