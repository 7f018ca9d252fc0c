"""Breadcrumbs, Breadcrumbs-TIES, DELLA and DELLA-linear (issue #14 §2) against fp64 references
written here, step by step after mergekit's published algorithms (sparsify.py's
magnitude_outliers and della_magprune, generalized_task_arithmetic's election), with loops
over entries instead of the kernels' partitions and vectorised ranks; the ranged merge equal
byte for byte to the whole-tensor one; the CLI flags, ``check``'s estimate and one-line errors.
"""

from __future__ import annotations

import json
import os
from decimal import Decimal

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from peftcli.checkpoint.writer import save_state_dict
from peftcli.cli import cli
from peftcli.diffing import DiffOptions, diff
from peftcli.errors import UsageError
from peftcli.merging import ranged
from peftcli.merging.arithmetic import combine, dare_seed
from peftcli.merging.engine import merge
from peftcli.merging.methods._sparse_kernel import CrumbsTask, RowTask, SparseTask
from tests.helpers import assert_error, whole_tensor_path


def _grid(shape, gen, lo=-6, hi=7) -> torch.Tensor:
    """Values k/16: many equal magnitudes, so the ranks' tie-breaking is exercised."""
    return torch.randint(lo, hi, shape, generator=gen).float() / 16


# --------------------------------------------------------------------------- references


def _crumbs_ref(phi: np.ndarray, d: float, g: float) -> np.ndarray:
    """mergekit's magnitude_outliers: sort ascending, drop n_bot smallest and n_top largest.

    Counts as int(d·N), int(γ·N) on the decimals (K at least 1); equal magnitudes ordered so
    that the lower flat index ranks higher; the kept slice ends at N − n_top (mergekit's
    ``[n_bot:-n_top]``, read as intended when n_top = 0)."""
    flat = phi.reshape(-1).astype(np.float64)
    n = flat.size
    if d >= 1:
        return flat.reshape(phi.shape)
    target = max(1, int(Decimal(repr(d)) * n))
    n_top = int(Decimal(repr(g)) * n)
    n_bot = n - target - n_top
    if n_bot < 0:
        n_top += n_bot
        n_bot = 0
    ascending = sorted(range(n), key=lambda j: (abs(flat[j]), -j))
    out = np.zeros(n)
    for j in ascending[n_bot : n - n_top]:
        out[j] = flat[j]
    return out.reshape(phi.shape)


def _elect(weighted: list[np.ndarray], weights: list[float], normalize: bool) -> np.ndarray:
    """TIES' sum election over fp64 arrays, entry by entry."""
    out = np.zeros(weighted[0].size)
    for e in range(out.size):
        values = [w.flat[e] for w in weighted]
        sign = 1.0 if sum(values) >= 0 else -1.0
        agree = [i for i, v in enumerate(values) if v != 0 and np.sign(v) == sign]
        total = sum(values[i] for i in agree)
        divisor = sum(weights[i] for i in agree) if normalize else 1.0
        out[e] = total / divisor if agree and divisor != 0 else total
    return out.reshape(weighted[0].shape)


def _della_ref(phi: np.ndarray, d: float, eps: float, seed: int, key: str, i: int) -> np.ndarray:
    """DELLA's MagPrune along dimension 1 (a 1-D tensor: one row), kept entries divided by p."""
    if d >= 1:
        return phi.astype(np.float64)
    gen = torch.Generator().manual_seed(dare_seed(seed, key, i))
    u = torch.rand(phi.size, generator=gen).double().numpy()
    x = phi.astype(np.float64).reshape(1, -1, 1) if phi.ndim == 1 else phi.astype(np.float64).reshape(phi.shape[0], phi.shape[1], -1)
    flat_u = u.reshape(x.shape)
    out = np.zeros(x.shape)
    a_, b_, c_ = x.shape
    for a in range(a_):
        for c in range(c_):
            column = [(abs(x[a, j, c]), -j) for j in range(b_)]
            order = sorted(range(b_), key=lambda j: column[j])  # rank 0: the smallest
            for rank, j in enumerate(order):
                p = d if b_ == 1 else (d - eps) + 2 * eps * rank / (b_ - 1)
                if flat_u[a, j, c] < p:
                    out[a, j, c] = x[a, j, c] / p
    return out.reshape(phi.shape)


# --------------------------------------------------------------------------- breadcrumbs


def test_breadcrumbs_by_hand():
    # N = 10, d = 0.3, γ = 0.1: the largest |φ| (−9) goes, the next three stay, the rest go.
    phi = torch.tensor([1.0, -9.0, 2.0, 7.0, -3.0, 0.5, 6.0, -5.0, 0.0, 4.0])
    out = combine([phi], [1.0], "breadcrumbs", density=0.3, gamma=0.1)
    assert out.tolist() == [0, 0, 0, 7.0, 0, 0, 6.0, -5.0, 0, 0]
    # equal magnitudes at both cuts: the lower flat index ranks higher
    tied = torch.tensor([2.0, -2.0, 2.0, 1.0, -1.0, 1.0, 1.0, 0.5])  # N = 8, T = 1, K = 4
    out = combine([tied], [1.0], "breadcrumbs", density=0.5, gamma=0.125)
    assert out.tolist() == [0, -2.0, 2.0, 1.0, -1.0, 0, 0, 0]


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs-ties"])
@pytest.mark.parametrize("density, gamma", [(0.3, 0.05), (0.5, 0.01), (0.1, 0.2), (0.9, 0.1), (0.29, 0.0), (1.0, 0.1)])
def test_breadcrumbs_follows_the_fp64_reference(method, density, gamma, monkeypatch):
    monkeypatch.setattr(ranged, "RANGE", 16)  # the cuts' equal entries are counted across ranges
    gen = torch.Generator().manual_seed(int(density * 100 + gamma * 1000))
    for shape in [(100,), (37, 29), (7,)]:  # 7 entries: ⌊γ·N⌋ = 0, where mergekit drops all
        phis = [_grid(shape, gen) for _ in range(3)]
        weights = [0.75, 1.25, 0.5] if method.endswith("ties") else [0.75, -1.25, 0.5]  # dyadic: the election sums exactly
        got = combine(phis, weights, method, density=density, gamma=gamma).double().numpy()
        sparse = [_crumbs_ref(p.numpy(), density, gamma) * w for p, w in zip(phis, weights)]
        expected = _elect(sparse, weights, normalize=False) if method.endswith("ties") else sum(sparse)
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6, err_msg=f"{shape}")
        if shape == (7,) and density < 1:  # the density's share survives (⌊γ·7⌋ = 0)
            assert np.count_nonzero(_crumbs_ref(phis[0].numpy(), density, gamma)) <= max(1, int(density * 7))


# --------------------------------------------------------------------------- della


@pytest.mark.parametrize("method", ["della", "della-linear"])
@pytest.mark.parametrize("shape", [(9, 13), (40,), (3, 5, 4), (6, 1)])
def test_della_follows_the_fp64_reference(method, shape, monkeypatch):
    monkeypatch.setattr(ranged, "RANGE", 16)  # rows drawn and ranked a block at a time
    gen = torch.Generator().manual_seed(5)
    phis = [_grid(shape, gen) for _ in range(2)]
    weights = [1.0, 0.6]
    d, eps, scale = 0.4, 0.2, 1.5
    got = combine(phis, weights, method, density=d, epsilon=eps, scale=scale, seed=3, key="k.weight").double().numpy()
    sparse = [_della_ref(p.numpy(), d, eps, 3, "k.weight", i) * w for i, (p, w) in enumerate(zip(phis, weights))]
    expected = (_elect(sparse, weights, normalize=True) if method == "della" else sum(sparse)) * scale
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_della_keeps_the_density_on_average_and_large_magnitudes_more_often():
    # distinct magnitudes per row: column j of row r has rank j (the largest last)
    phi = (torch.arange(1, 501, dtype=torch.float32) * torch.ones(400, 1)).contiguous()
    kept = torch.zeros(phi.shape)
    for seed in range(5):
        out = combine([phi], [1.0], "della-linear", density=0.5, epsilon=0.3, seed=seed, key="w")
        kept += out != 0
        survivors = out != 0
        p = 0.2 + 0.6 * (torch.arange(500) / 499.0)
        torch.testing.assert_close(out[survivors], (phi / p)[survivors])  # rescaled by 1/p
    rate = kept / 5
    assert abs(float(rate.mean()) - 0.5) < 0.01
    assert abs(float(rate[:, :50].mean()) - 0.23) < 0.03 and abs(float(rate[:, -50:].mean()) - 0.77) < 0.03


def test_della_masks_depend_on_the_seed_and_the_tensor_name():
    phi = _grid((30, 30), torch.Generator().manual_seed(1))
    a = combine([phi], [1.0], "della", density=0.5, seed=1, key="x")
    assert torch.equal(a, combine([phi], [1.0], "della", density=0.5, seed=1, key="x"))
    assert not torch.equal(a, combine([phi], [1.0], "della", density=0.5, seed=2, key="x"))
    assert not torch.equal(a, combine([phi], [1.0], "della", density=0.5, seed=1, key="y"))


# --------------------------------------------------------------------------- ranged == whole

SHAPES = {"a.weight": (37, 29), "b.weight": (1000,), "c.bias": (5,), "d.weight": (64, 3), "e.weight": (3, 4, 5)}
OPTIONS = {
    "breadcrumbs": {"density": 0.4, "gamma": 0.05}, "breadcrumbs-ties": {"density": 0.6, "gamma": 0.1},
    "della": {"density": 0.5, "epsilon": 0.2}, "della-linear": {"density": 0.3, "epsilon": 0.1, "scale": 0.8},
}


@pytest.fixture()
def models(tmp_path):
    def build(dtype: torch.dtype):
        gen = torch.Generator().manual_seed(0)
        base = {n: _grid(s, gen, -50, 50).to(dtype) for n, s in SHAPES.items()}
        base["steps"] = torch.arange(6, dtype=torch.int64)
        paths = [str(tmp_path / f"base-{dtype}")]
        save_state_dict(base, paths[0])
        for seed in (1, 2):
            g = torch.Generator().manual_seed(seed)
            ft = {n: (t + _grid(t.shape, g, -3, 4).to(dtype)) if t.is_floating_point() else t for n, t in base.items()}
            paths.append(str(tmp_path / f"ft{seed}-{dtype}"))
            save_state_dict(ft, paths[-1])
        return paths

    return build


def _bytes(path: str) -> bytes:
    with open(os.path.join(path, "model.safetensors"), "rb") as f:
        return f.read()


@pytest.mark.parametrize("method", list(OPTIONS))
@pytest.mark.parametrize("dtype, out_dtype", [(torch.float32, None), (torch.bfloat16, "F16"), (torch.float64, None)], ids=str)
def test_ranged_merge_equals_the_whole_tensor_merge(models, tmp_path, monkeypatch, method, dtype, out_dtype):
    base, *fts = models(dtype)
    monkeypatch.setattr(ranged, "RANGE", 64)  # every tensor but two spans several ranges
    runs: dict[str, list] = {"SparseTask": [], "RowTask": [], "CrumbsTask": []}
    for cls in (SparseTask, RowTask, CrumbsTask):
        real = cls.run
        monkeypatch.setattr(cls, "run", lambda self, ctx, real=real, key=cls.__name__: (runs[key].append(self.name), real(self, ctx))[1])
    opts = dict(weights=[0.9, 0.6], method=method, options=OPTIONS[method], dtype=out_dtype, seed=4)
    merge(base, fts, str(tmp_path / "ranged"), **opts)
    if method.startswith("della"):  # by blocks of rows, but b.weight: a row of 1000 > 64 entries, held whole
        assert runs["SparseTask"] == ["b.weight"] and len(runs["RowTask"]) == len(SHAPES) - 1
    else:  # a cut pass per input, then one pass to combine
        assert len(runs["CrumbsTask"]) == len(SHAPES) and not runs["RowTask"] and not runs["SparseTask"]
    whole_tensor_path(monkeypatch)
    merge(base, fts, str(tmp_path / "whole"), **opts)
    assert _bytes(str(tmp_path / "ranged")) == _bytes(str(tmp_path / "whole"))


@pytest.mark.parametrize("method", ["breadcrumbs-ties", "della"])
def test_inputs_that_do_not_touch_a_tensor_are_left_out_without_changing_a_bit(models, tmp_path, monkeypatch, method):
    base, ft1, ft2 = models(torch.float32)
    few = str(tmp_path / "few.diff")
    diff(base, ft1, few, DiffOptions(top_k=20))  # touches a few tensors: most are ft2's alone
    monkeypatch.setattr(ranged, "RANGE", 128)
    opts = dict(weights=[1.5, 0.7], method=method, options=OPTIONS[method], seed=7)
    merge(base, [few, ft2], str(tmp_path / "ranged"), **opts)
    whole_tensor_path(monkeypatch)
    merge(base, [few, ft2], str(tmp_path / "whole"), **opts)
    assert _bytes(str(tmp_path / "ranged")) == _bytes(str(tmp_path / "whole"))


def test_a_merged_checkpoint_is_the_base_plus_the_reference(models, tmp_path):
    base, *fts = models(torch.float32)
    out = str(tmp_path / "m")
    merge(base, fts, out, method="breadcrumbs", weights=[1.0, 0.5], options={"density": 0.5, "gamma": 0.02})
    merged, b0, (t1, t2) = load_file(os.path.join(out, "model.safetensors")), load_file(os.path.join(base, "model.safetensors")), (
        load_file(os.path.join(f, "model.safetensors")) for f in fts
    )
    for name in SHAPES:
        phis = [(t[name].double() - b0[name].double()).numpy() for t in (t1, t2)]
        expected = b0[name].double().numpy() + _crumbs_ref(phis[0], 0.5, 0.02) + 0.5 * _crumbs_ref(phis[1], 0.5, 0.02)
        np.testing.assert_allclose(merged[name].double().numpy(), expected, rtol=1e-6, atol=1e-6, err_msg=name)
    assert torch.equal(merged["steps"], b0["steps"])


# --------------------------------------------------------------------------- CLI, check, errors


@pytest.mark.parametrize(
    "method, flags",
    [
        ("breadcrumbs", ["--density", "0.5", "--gamma", "0.05"]),
        ("breadcrumbs-ties", ["--density", "0.5"]),
        ("della", ["--density", "0.5", "--epsilon", "0.1", "--scale", "1.2"]),
        ("della-linear", ["--density", "0.4"]),
    ],
)
def test_cli_merge_and_check_estimate(models, tmp_path, method, flags):
    base, *fts = models(torch.float32)
    out = str(tmp_path / "m")
    result = CliRunner().invoke(cli, ["merge", base, *fts, "--method", method, *flags, "--weights", "1,0.5", "-o", out])
    assert result.exit_code == 0, result.output
    options = {f.lstrip("-"): float(v) for f, v in zip(flags[::2], flags[1::2])}
    merge(base, fts, str(tmp_path / "api"), method=method, weights=[1.0, 0.5], options=options)
    assert _bytes(out) == _bytes(str(tmp_path / "api"))
    checked = CliRunner().invoke(cli, ["check", base, *fts, "--method", method, "--json"])
    report = json.loads(checked.stdout)
    assert report["merge_refusal"] is None and report["merge"]["method"] == method
    assert report["merge"]["changed_tensors"] == len(SHAPES) and report["merge"]["peak_bytes"] > 0


@pytest.mark.parametrize(
    "method, extra, words",
    [
        ("breadcrumbs", [], "breadcrumbs needs a density"),
        ("breadcrumbs", ["--density", "0.5", "--gamma", "1.5"], "gamma must be in [0, 1), got 1.5"),
        ("breadcrumbs-ties", ["--density", "0.5", "--gamma", "-0.1"], "gamma must be in [0, 1)"),
        ("breadcrumbs", ["--density", "0.9", "--gamma", "0.2"], "density 0.9 plus gamma 0.2 exceeds 1"),
        ("breadcrumbs", ["--density", "0.5", "--epsilon", "0.1"], "breadcrumbs takes no epsilon"),
        ("della", ["--density", "0.9"], "epsilon 0.15 with density 0.9 puts keep probabilities outside (0, 1)"),
        ("della", ["--density", "0.5", "--epsilon", "-0.1"], "epsilon -0.1 with density 0.5"),
        ("della-linear", ["--density", "0.2", "--epsilon", "0.2"], "epsilon 0.2 with density 0.2"),
        ("della", ["--density", "0.5", "--weights", "1,-1"], "della needs weights ≥ 0, got -1.0"),
        ("della", ["--density", "1.5"], "density must be in (0, 1], got 1.5"),
        ("della", ["--density", "0.5", "--gamma", "0.1"], "della takes no gamma"),
        ("ties", ["--density", "0.5", "--scale", "2"], "ties takes no scale"),
    ],
)
def test_bad_parameters_are_one_line_errors_and_nothing_is_written(models, tmp_path, method, extra, words):
    base, *fts = models(torch.float32)
    out = str(tmp_path / "m")
    result = CliRunner().invoke(cli, ["merge", base, *fts, "--method", method, *extra, "-o", out])
    assert_error(result, 2, words, out)


def test_della_with_density_one_keeps_every_entry_whatever_epsilon():
    phi = _grid((8, 8), torch.Generator().manual_seed(2))
    assert torch.equal(combine([phi], [1.0], "della-linear", density=1.0, epsilon=0.5), phi)
    with pytest.raises(UsageError, match="epsilon 0.5 with density 0.5"):
        combine([phi], [1.0], "della-linear", density=0.5, epsilon=0.5)


# --------------------------------------------------------------------------- model stock


def _stock_ref(theta0: torch.Tensor, thetas: list[torch.Tensor]) -> np.ndarray:
    """mergekit's model_stock (filter_wise false) in fp64: t from the mean pairwise cosine of the
    offsets, then t·mean(θᵢ) + (1 − t)·θ₀."""
    w0 = theta0.double().numpy().reshape(-1)
    ws = [t.double().numpy().reshape(-1) for t in thetas]
    offsets = [w - w0 for w in ws]
    cosines = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            norm = np.linalg.norm(offsets[i]) * np.linalg.norm(offsets[j])
            cosines.append(min(1.0, max(-1.0, float(offsets[i] @ offsets[j]) / max(norm, 1e-6))))
    cos, k = float(np.mean(cosines)), len(ws)
    t = k * cos / (1 + (k - 1) * cos)
    return (t * sum(ws) / k + (1 - t) * w0).reshape(theta0.shape)


def _st(path: str) -> dict:
    return load_file(os.path.join(path, "model.safetensors"))


def test_model_stock_by_hand():
    base, phi = torch.zeros(4), torch.tensor([1.0, 2.0, 0.0, -1.0])
    ortho = torch.tensor([2.0, -1.0, 3.0, 0.0])  # φ·ortho = 0: cos 0, t 0, θ₀
    assert torch.equal(combine([phi, ortho], [1.0, 1.0], "model-stock", base=base), base)
    same = combine([phi, phi], [1.0, 1.0], "model-stock", base=base)  # cos 1, t 1: θ₀ + φ
    torch.testing.assert_close(same, phi)
    from peftcli.errors import BadInputError

    with pytest.raises(BadInputError, match="mean cosine -1"):  # 1 + (k − 1)·cos = 0: t undefined
        combine([phi, -phi], [1.0, 1.0], "model-stock", base=base, key="w")


def test_model_stock_of_three_checkpoints_follows_the_fp64_reference(models, tmp_path):
    base, *fts = models(torch.float32)
    third = str(tmp_path / "ft3")
    g = torch.Generator().manual_seed(9)
    save_state_dict({n: t + _grid(t.shape, g, -3, 4) if t.is_floating_point() else t for n, t in _st(fts[0]).items()}, third)
    out = str(tmp_path / "m")
    result = CliRunner().invoke(cli, ["merge", base, *fts, third, "--method", "model-stock", "-o", out])
    assert result.exit_code == 0, result.output
    merged, theta0 = _st(out), _st(base)
    thetas = [_st(p) for p in (*fts, third)]
    for name in SHAPES:
        expected = _stock_ref(theta0[name], [t[name] for t in thetas])
        np.testing.assert_allclose(merged[name].double().numpy(), expected, rtol=1e-5, atol=1e-5, err_msg=name)
    assert torch.equal(merged["steps"], theta0["steps"])
    checked = json.loads(CliRunner().invoke(cli, ["check", base, *fts, third, "--method", "model-stock", "--json"]).stdout)
    assert checked["merge_refusal"] is None and checked["merge"]["changed_tensors"] == len(SHAPES)


@pytest.mark.parametrize("dtype, out_dtype", [(torch.float32, None), (torch.bfloat16, "F16"), (torch.float64, None)], ids=str)
def test_model_stock_ranged_equals_whole_and_an_untouching_input_counts_as_zero(models, tmp_path, monkeypatch, dtype, out_dtype):
    base, ft1, ft2 = models(dtype)
    few = str(tmp_path / "few.diff")
    diff(base, ft1, few, DiffOptions(top_k=20))  # most tensors untouched by this input: φ = 0 there
    monkeypatch.setattr(ranged, "RANGE", 64)
    merge(base, [few, ft2], str(tmp_path / "ranged"), method="model-stock", dtype=out_dtype)
    if dtype == torch.float32:  # an untouching input counts with φ = 0 (mergekit sees θ₀ there)
        merge(base, [few], str(tmp_path / "few"), method="linear")  # θ₀ + φ_few, the diff applied
        merged, theta0, t_few, t2 = _st(str(tmp_path / "ranged")), _st(base), _st(str(tmp_path / "few")), _st(ft2)
        untouched = 0
        for name in SHAPES:
            expected = _stock_ref(theta0[name], [t_few[name], t2[name]])
            np.testing.assert_allclose(merged[name].double().numpy(), expected, rtol=1e-5, atol=1e-5, err_msg=name)
            untouched += torch.equal(t_few[name], theta0[name])
        assert untouched >= 2  # cosine 0 with the zero φ: t = 0, θ₀ itself
    whole_tensor_path(monkeypatch)
    merge(base, [few, ft2], str(tmp_path / "whole"), method="model-stock", dtype=out_dtype)
    assert _bytes(str(tmp_path / "ranged")) == _bytes(str(tmp_path / "whole"))


@pytest.mark.parametrize(
    "extra, words",
    [
        (["ONLY_ONE"], "model-stock merges at least 2 models, got 1"),
        (["--weights", "1,1"], "model-stock takes no --weights"),
        (["--density", "0.5"], "model-stock takes no density"),
    ],
)
def test_bad_model_stock_calls_are_one_line_errors(models, tmp_path, extra, words):
    base, *fts = models(torch.float32)
    inputs = fts[:1] if extra == ["ONLY_ONE"] else fts
    extra = [] if extra == ["ONLY_ONE"] else extra
    out = str(tmp_path / "m")
    result = CliRunner().invoke(cli, ["merge", base, *inputs, "--method", "model-stock", *extra, "-o", out])
    assert_error(result, 2, words, out)


# --------------------------------------------------------------------------- karcher


def _karcher_ref(thetas: list[torch.Tensor], max_iter: int = 10, tol: float = 1e-5) -> np.ndarray:
    """mergekit's karcher_merge_tensors on whole fp64 vectors (not on coefficients, as the kernel)."""
    ts = [t.double().numpy().reshape(-1) for t in thetas]
    norms = [float(np.linalg.norm(t)) for t in ts]
    units = [t / n for t, n in zip(ts, norms) if n > tol]
    if not units:
        return np.zeros(thetas[0].shape)
    a = 1.0 / len(units)
    u = sum(a * x for x in units)
    size = float(np.linalg.norm(u))
    u = units[0].copy() if size < tol else u / size
    for _ in range(max_iter):
        step = np.zeros_like(u)
        for x in units:
            dot = float(np.clip(u @ x, -1.0, 1.0))
            angle = np.arccos(dot)
            if angle >= tol:
                step += a * (angle / np.sin(angle)) * (x - dot * u)
        size = float(np.linalg.norm(step))
        if size < tol:
            break
        u = np.cos(size) * u + np.sin(size) * step / size
        if np.linalg.norm(u) > tol:
            u = u / np.linalg.norm(u)
    return (sum(norms) / len(ts) * u).reshape(thetas[0].shape)


def test_karcher_by_hand():
    base = torch.zeros(3)
    e1, e2 = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 2.0, 0.0])  # norms 1 and 2, 90° apart
    out = combine([e1, e2], [1.0, 1.0], "karcher", base=base)  # the midpoint of the arc, × mean norm 1.5
    torch.testing.assert_close(out, torch.tensor([1.5, 1.5, 0.0]) / 2**0.5)
    same = combine([e1, 3 * e1], [1.0, 1.0], "karcher", base=base)  # one direction: the mean norm along it
    torch.testing.assert_close(same, 2 * e1)
    from peftcli.errors import BadInputError

    with pytest.raises(BadInputError, match="opposite directions"):
        combine([e1, e1, -e1], [1.0] * 3, "karcher", base=base, key="w")  # u = e1 at the start: −e1 is its antipode


@pytest.mark.parametrize("max_iter", [0, 1, 10])
def test_karcher_follows_the_fp64_reference(max_iter):
    gen = torch.Generator().manual_seed(max_iter)
    base = torch.randn(40, 30, generator=gen)
    phis = [torch.randn(40, 30, generator=gen) * s for s in (0.5, 1.0, 2.0)]
    got = combine(phis, [1.0] * 3, "karcher", base=base, key="w", max_iter=max_iter)
    expected = _karcher_ref([base + p for p in phis], max_iter=max_iter)
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=1e-5, atol=1e-5)


def test_karcher_of_three_checkpoints_and_the_ranged_path(models, tmp_path, monkeypatch):
    base, *fts = models(torch.float32)
    few = str(tmp_path / "few.diff")
    diff(base, fts[0], few, DiffOptions(top_k=20))  # elsewhere this input is the point θ₀
    out = str(tmp_path / "m")
    monkeypatch.setattr(ranged, "RANGE", 64)
    result = CliRunner().invoke(cli, ["merge", base, *fts, few, "--method", "karcher", "--max-iter", "5", "--tol", "1e-6", "-o", out])
    assert result.exit_code == 0, result.output
    merge(base, [few], str(tmp_path / "few"), method="linear")  # θ₀ + φ_few
    merged, points = _st(out), [_st(p) for p in (*fts, str(tmp_path / "few"))]
    for name in SHAPES:
        expected = _karcher_ref([p[name] for p in points], max_iter=5, tol=1e-6)
        np.testing.assert_allclose(merged[name].double().numpy(), expected, rtol=1e-5, atol=1e-5, err_msg=name)
    checked = json.loads(CliRunner().invoke(cli, ["check", base, *fts, few, "--method", "karcher", "--json"]).stdout)
    assert checked["merge_refusal"] is None and checked["merge"]["changed_tensors"] == len(SHAPES)
    whole_tensor_path(monkeypatch)
    merge(base, [*fts, few], str(tmp_path / "whole"), method="karcher", options={"max_iter": 5, "tol": 1e-6})
    assert _bytes(out) == _bytes(str(tmp_path / "whole"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=str)
def test_karcher_ranged_equals_whole_in_other_dtypes(models, tmp_path, monkeypatch, dtype):
    base, *fts = models(dtype)
    monkeypatch.setattr(ranged, "RANGE", 64)
    merge(base, fts, str(tmp_path / "ranged"), method="karcher")
    whole_tensor_path(monkeypatch)
    merge(base, fts, str(tmp_path / "whole"), method="karcher")
    assert _bytes(str(tmp_path / "ranged")) == _bytes(str(tmp_path / "whole"))


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--max-iter", "-1"], "max-iter"),
        (["--tol", "-1e-5"], "tol must be ≥ 0, got -1e-05"),
        (["--weights", "1,1"], "karcher takes no --weights"),
        (["--density", "0.5"], "karcher takes no density"),
        (["--max-iter", "3", "--method", "model-stock"], "model-stock takes no max"),
    ],
)
def test_bad_karcher_calls_are_one_line_errors(models, tmp_path, extra, words):
    base, *fts = models(torch.float32)
    out = str(tmp_path / "m")
    result = CliRunner().invoke(cli, ["merge", base, *fts, "--method", "karcher", *extra, "-o", out])
    assert_error(result, 2, words, out)


def test_the_registry_with_the_new_methods_imports_neither_torch_nor_numpy():
    # `peftcli merge --help` builds its flags from the registry: the kernels load only when merging.
    import subprocess
    import sys

    code = "import sys, peftcli.merging.methods; print([m for m in ('torch', 'numpy') if m in sys.modules])"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, env=env, timeout=120)
    assert done.stdout.strip() == "[]", done.stderr
