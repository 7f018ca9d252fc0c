"""nuslerp, multislerp and passthrough layer stacking (mergekit's): each against an fp64
reference written from mergekit's formula (loops over vectors, numpy, not the kernel's Gram
coefficients), the ranged merge byte-equal to the whole-tensor merge, a mergekit YAML equal to
the same merge given as flags, and bad input refused in one line with nothing written."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from peftcli.checkpoint.writer import save_state_dict
from peftcli.cli import cli
from peftcli.diffing import DiffOptions, diff
from peftcli.errors import BadInputError, UsageError
from peftcli.merging import ranged
from peftcli.merging.arithmetic import combine
from peftcli.merging.engine import merge
from tests.helpers import assert_error, noisy_copy, whole_tensor_path

# --------------------------------------------------------------------------- references


def _vectors(x: np.ndarray, vectors: str) -> np.ndarray:
    """The vectors of ``x`` as the rows of a matrix, as mergekit's view/transpose picks them."""
    if vectors == "tensor":
        return x.reshape(1, -1)
    if vectors == "rows":
        return x.reshape(-1, x.shape[-1])
    return np.swapaxes(x, 0, -1).reshape(-1, x.shape[0])  # mergekit's transpose(0, -1)


def _unvectors(m: np.ndarray, shape, vectors: str) -> np.ndarray:
    if vectors in ("tensor", "rows"):
        return m.reshape(shape)
    swapped = list(shape)
    swapped[0], swapped[-1] = swapped[-1], swapped[0]
    return np.swapaxes(m.reshape(swapped), 0, -1)


def _nuslerp_ref(t: float, v0: np.ndarray, v1: np.ndarray, vectors: str) -> np.ndarray:
    """mergekit's nuslerp(t, v0, v1) in fp64, one vector at a time."""
    a, b = _vectors(v0, vectors), _vectors(v1, vectors)
    out = np.empty_like(a)
    for r in range(len(a)):
        au = a[r] / max(np.linalg.norm(a[r]), 1e-7)
        bu = b[r] / max(np.linalg.norm(b[r]), 1e-7)
        theta = np.arccos(np.clip(np.sum(au * bu), -1, 1))
        s = np.sin(theta)
        if abs(s) < 1e-8:
            out[r] = (1 - t) * a[r] + t * b[r]
        else:
            out[r] = (np.sin((1 - t) * theta) * a[r] + np.sin(t * theta) * b[r]) / s
    return _unvectors(out, v0.shape, vectors)


def _multislerp_ref(xs: list[np.ndarray], weights: list[float], normalize: bool = True, eps: float = 1e-8) -> np.ndarray:
    """mergekit's multislerp on whole fp64 vectors."""
    flat = np.stack([x.reshape(-1) for x in xs])
    w = np.asarray(weights, dtype=np.float64)
    if normalize:
        w = w / w.sum()
    norms = np.linalg.norm(flat, axis=1, keepdims=True)
    unit = flat / (norms + eps)
    mean = (unit * w[:, None]).sum(0)
    mean_norm = np.linalg.norm(mean)
    if mean_norm < eps:
        assert len(xs) == 2
        return (flat[0] * w[0] + flat[1] * w[1]).reshape(xs[0].shape)
    mean = mean / mean_norm
    dots = (unit * mean).sum(-1, keepdims=True)
    tangent = ((unit - dots * mean) * w[:, None]).sum(0)
    tn = np.linalg.norm(tangent) + eps
    result = mean * np.cos(tn) + tangent * (np.sin(tn) / tn)
    return (result * (norms[:, 0] * w).sum()).reshape(xs[0].shape)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.double().numpy()


# --------------------------------------------------------------------------- formulas


@pytest.mark.parametrize("vectors", ["tensor", "rows", "columns"])
@pytest.mark.parametrize("shape", [(7, 5), (3, 4, 5), (11,)], ids=str)
@pytest.mark.parametrize("origin", ["base", "zero"])
def test_nuslerp_follows_the_fp64_reference(vectors, shape, origin):
    g = torch.Generator().manual_seed(sum(shape))
    base, pa, pb = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3))
    if len(shape) > 1:
        pb[0] = 2.5 * pa[0]  # a parallel slice: the linear fallback where vectors are slices
        pa[1] = 0.0  # a zero slice: mergekit's clamped norm, θ = π/2
    weights = [0.3, 0.9]
    got = combine([pa, pb], weights, "nuslerp", base=base, dtype=torch.float64, nuslerp_vectors=vectors, origin=origin)
    t = 0.9 / 1.2
    if origin == "base":
        expected = _np(base) + _nuslerp_ref(t, _np(pa), _np(pb), vectors)
    else:
        expected = _nuslerp_ref(t, _np(base + pa), _np(base + pb), vectors)
    np.testing.assert_allclose(_np(got), expected, rtol=1e-9, atol=1e-9)


def test_nuslerp_by_hand():
    base = torch.zeros(2, dtype=torch.float64)
    e1, e2 = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 2.0], dtype=torch.float64)
    # a quarter circle: t = 1/2 is 45°, sin(π/4)/sin(π/2) of each vector
    mid = combine([e1, e2], [1.0, 1.0], "nuslerp", base=base, dtype=torch.float64)
    np.testing.assert_allclose(_np(mid), [np.sqrt(0.5), 2 * np.sqrt(0.5)], rtol=1e-12)
    same = combine([e1, 3 * e1], [3.0, 1.0], "nuslerp", base=base, dtype=torch.float64)  # parallel: linear at t = 1/4
    np.testing.assert_allclose(_np(same), [1.5, 0.0], rtol=1e-12)


@pytest.mark.parametrize("origin", ["base", "zero"])
@pytest.mark.parametrize("normalize", [True, False])
def test_multislerp_follows_the_fp64_reference(origin, normalize):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(9, 6, generator=g, dtype=torch.float64)
    phis = [torch.randn(9, 6, generator=g, dtype=torch.float64) * s for s in (0.5, 1.0, 2.0)]
    weights = [0.2, 0.5, 0.3] if normalize or origin == "zero" else [0.4, 1.0, 0.6]  # zero: as given, Σw = 1
    got = combine(phis, weights, "multislerp", base=base, dtype=torch.float64, origin=origin, weights_as_given=not normalize)
    if origin == "base":
        expected = _np(base) + _multislerp_ref([_np(p) for p in phis], weights, normalize)
    else:
        expected = _multislerp_ref([_np(base + p) for p in phis], weights, normalize)
    np.testing.assert_allclose(_np(got), expected, rtol=1e-9, atol=1e-9)


def test_multislerp_by_hand_and_its_refusals():
    base = torch.zeros(2, dtype=torch.float64)
    e1, e2 = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)
    mid = combine([e1, e2], [1.0, 1.0], "multislerp", base=base, dtype=torch.float64)
    np.testing.assert_allclose(_np(mid), [np.sqrt(0.5), np.sqrt(0.5)], rtol=1e-6)  # the arc's midpoint (eps shifts it by ~1e-8)
    opposite = combine([e1, -e1], [1.0, 1.0], "multislerp", base=base, dtype=torch.float64)  # two inputs: the linear fallback
    np.testing.assert_allclose(_np(opposite), [0.0, 0.0], atol=1e-12)
    with pytest.raises(BadInputError, match="weighted directions of 'w' cancel"):
        combine([e1, -e1, e2 - e2], [1.0, 1.0, 1.0], "multislerp", base=base, key="w", dtype=torch.float64)
    with pytest.raises(UsageError, match="weights sum to 0"):
        combine([e1, e2], [1.0, -1.0], "multislerp", base=base)
    with pytest.raises(UsageError, match="eps must be > 0"):
        combine([e1, e2], [1.0, 1.0], "multislerp", base=base, eps=0.0)


# --------------------------------------------------------------------------- ranged == whole

SHAPES = {"a.weight": (37, 29), "b.weight": (1000,), "c.bias": (5,), "d.weight": (64, 3), "e.weight": (3, 4, 70)}


@pytest.fixture()
def models(tmp_path):
    def build(dtype: torch.dtype):
        gen = torch.Generator().manual_seed(0)
        base = {n: torch.randn(s, generator=gen).to(dtype) for n, s in SHAPES.items()}
        base["steps"] = torch.arange(6, dtype=torch.int64)
        paths = [str(tmp_path / f"base-{dtype}")]
        save_state_dict(base, paths[0])
        for seed in (1, 2, 3):
            g = torch.Generator().manual_seed(seed)
            ft = {n: (t + 0.3 * torch.randn(t.shape, generator=g).to(dtype)) if t.is_floating_point() else t for n, t in base.items()}
            paths.append(str(tmp_path / f"ft{seed}-{dtype}"))
            save_state_dict(ft, paths[-1])
        return paths

    return build


def _bytes(path: str) -> bytes:
    with open(os.path.join(path, "model.safetensors"), "rb") as f:
        return f.read()


def _st(path: str) -> dict:
    return load_file(os.path.join(path, "model.safetensors"))


CASES = {
    "nuslerp-tensor": ("nuslerp", 2, {"nuslerp_vectors": "tensor"}),
    "nuslerp-rows": ("nuslerp", 2, {"nuslerp_vectors": "rows", "origin": "zero"}),
    "nuslerp-columns": ("nuslerp", 2, {"nuslerp_vectors": "columns"}),
    "multislerp": ("multislerp", 3, {}),
    "multislerp-zero": ("multislerp", 3, {"origin": "zero"}),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype, out_dtype", [(torch.float32, None), (torch.bfloat16, "F16"), (torch.float64, None)], ids=str)
def test_ranged_merge_equals_the_whole_tensor_merge(models, tmp_path, monkeypatch, case, dtype, out_dtype):
    method, k, options = CASES[case]
    base, *fts = models(dtype)
    few = str(tmp_path / "few.diff")
    diff(base, fts[0], few, DiffOptions(top_k=20))  # touches a few tensors: elsewhere 0 (or θ₀)
    inputs = [few, *fts[1:k]]
    monkeypatch.setattr(ranged, "RANGE", 64)  # rows of 1000 and 70 entries span several ranges
    from peftcli.merging.methods._sphere_kernel import SphereTask

    ran = []
    real = SphereTask.run
    monkeypatch.setattr(SphereTask, "run", lambda self, ctx: (ran.append(self.name), real(self, ctx))[1])
    opts = dict(weights=[0.7, 0.4, 0.5][:k], method=method, options=options, dtype=out_dtype)
    merge(base, inputs, str(tmp_path / "ranged"), **opts)
    assert sorted(ran) == sorted(SHAPES)
    whole_tensor_path(monkeypatch)
    merge(base, inputs, str(tmp_path / "whole"), **opts)
    assert _bytes(str(tmp_path / "ranged")) == _bytes(str(tmp_path / "whole"))


@pytest.mark.parametrize("case", ["nuslerp-columns", "nuslerp-rows", "multislerp"])
def test_a_merged_checkpoint_is_the_reference_of_its_models(models, tmp_path, monkeypatch, case):
    method, k, options = CASES[case]
    base, *fts = models(torch.float32)
    monkeypatch.setattr(ranged, "RANGE", 64)
    weights = [0.7, 0.4, 0.5][:k]
    out = str(tmp_path / "m")
    merge(base, fts[:k], out, method=method, weights=weights, options=options)
    merged, b0, points = _st(out), _st(base), [_st(f) for f in fts[:k]]
    around = options.get("origin", "base") == "base"
    for name in SHAPES:
        xs = [_np(p[name]) - (_np(b0[name]) if around else 0) for p in points]
        if method == "nuslerp":
            expected = _nuslerp_ref(0.4 / 1.1, xs[0], xs[1], options["nuslerp_vectors"])
        else:
            expected = _multislerp_ref(xs, weights)
        expected = expected + (_np(b0[name]) if around else 0)
        np.testing.assert_allclose(_np(merged[name]), expected, rtol=1e-5, atol=1e-5, err_msg=name)
    assert torch.equal(merged["steps"], b0["steps"])


# --------------------------------------------------------------------------- CLI, check, errors


@pytest.mark.parametrize(
    "method, flags, options",
    [
        ("nuslerp", ["--nuslerp-vectors", "rows", "--origin", "zero"], {"nuslerp_vectors": "rows", "origin": "zero"}),
        ("multislerp", ["--weights-as-given", "--eps", "1e-6"], {"weights_as_given": True, "eps": 1e-6}),
    ],
)
def test_cli_merge_and_check_estimate(models, tmp_path, method, flags, options):
    base, *fts = models(torch.float32)
    out = str(tmp_path / "m")
    result = CliRunner().invoke(cli, ["merge", base, *fts[:2], "--method", method, *flags, "--weights", "1,0.5", "-o", out])
    assert result.exit_code == 0, result.output
    merge(base, fts[:2], str(tmp_path / "api"), method=method, weights=[1.0, 0.5], options=options)
    assert _bytes(out) == _bytes(str(tmp_path / "api"))
    report = json.loads(CliRunner().invoke(cli, ["check", base, *fts[:2], "--method", method, "--json"]).stdout)
    assert report["merge_refusal"] is None and report["merge"]["method"] == method
    assert report["merge"]["changed_tensors"] == len(SHAPES) and report["merge"]["peak_bytes"] > 0


@pytest.mark.parametrize(
    "method, n, extra, words",
    [
        ("nuslerp", 3, [], "nuslerp merges exactly 2 models, got 3"),
        ("nuslerp", 1, [], "nuslerp merges exactly 2 models, got 1"),
        ("nuslerp", 2, ["--weights", "1,-1"], "nuslerp's weights sum to 0"),
        ("nuslerp", 2, ["--nuslerp-vectors", "diagonal"], "diagonal"),
        ("nuslerp", 2, ["--eps", "1e-6"], "nuslerp takes no eps"),
        ("multislerp", 1, [], "multislerp merges at least 2 models, got 1"),
        ("multislerp", 2, ["--weights", "1,-1"], "multislerp's weights sum to 0"),
        ("multislerp", 2, ["--eps", "-1"], "eps must be > 0"),
        ("multislerp", 2, ["--origin", "zero", "--weights-as-given", "--weights", "1,2"], "needs weights summing to 1, got 3.0"),
        ("multislerp", 2, ["--nuslerp-vectors", "rows"], "multislerp takes no nuslerp-vectors"),
        ("multislerp", 2, ["--density", "0.5"], "multislerp takes no density"),
    ],
)
def test_bad_calls_are_one_line_errors_and_nothing_is_written(models, tmp_path, method, n, extra, words):
    base, *fts = models(torch.float32)
    out = str(tmp_path / "m")
    result = CliRunner().invoke(cli, ["merge", base, *fts[:n], "--method", method, *extra, "-o", out])
    assert_error(result, 2, words, out)


# --------------------------------------------------------------------------- mergekit configurations


@pytest.fixture(scope="module")
def llamas(tiny_llama, tmp_path_factory):
    d = tmp_path_factory.mktemp("mk")
    return tiny_llama, noisy_copy(tiny_llama, str(d / "a"), 1), noisy_copy(tiny_llama, str(d / "b"), 2), noisy_copy(tiny_llama, str(d / "c"), 3)


def _config(tmp_path, text: str, **paths) -> str:
    path = tmp_path / "merge.yml"
    path.write_text(text.format(**paths))
    return str(path)


NUSLERP = """\
models:
  - model: {a}
    parameters:
      weight: 0.3
  - model: {b}
    parameters:
      weight: 0.7
merge_method: nuslerp
base_model: {base}
parameters:
  nuslerp_flatten: false
  nuslerp_row_wise: true
dtype: float32
"""
NUSLERP_NO_BASE = """\
models:
  - model: {a}
    parameters:
      weight: 1.0
  - model: {b}
    parameters:
      weight: 0.5
merge_method: nuslerp
"""
MULTISLERP = """\
models:
  - model: {a}
    parameters:
      weight: 0.5
  - model: {b}
    parameters:
      weight: 0.3
  - model: {c}
    parameters:
      weight: 0.2
merge_method: multislerp
base_model: {base}
parameters:
  normalize_weights: false
  eps: 1.0e-7
"""
MULTISLERP_NO_BASE = """\
models:
  - model: {a}
    parameters:
      weight: 1.0
  - model: {b}
    parameters:
      weight: 2.0
merge_method: multislerp
"""


@pytest.mark.parametrize(
    "text, flags",
    [
        (NUSLERP, lambda base, a, b, c: [base, a, b, "--method", "nuslerp", "--weights", "0.3,0.7", "--nuslerp-vectors", "columns", "--dtype", "F32"]),
        (NUSLERP_NO_BASE, lambda base, a, b, c: [a, a, b, "--method", "nuslerp", "--weights", "1.0,0.5", "--origin", "zero"]),
        (MULTISLERP, lambda base, a, b, c: [base, a, b, c, "--method", "multislerp", "--weights", "0.5,0.3,0.2", "--weights-as-given", "--eps", "1e-7"]),
        (MULTISLERP_NO_BASE, lambda base, a, b, c: [a, a, b, "--method", "multislerp", "--weights", "1,2", "--origin", "zero"]),
    ],
    ids=["nuslerp", "nuslerp-no-base", "multislerp", "multislerp-no-base"],
)
def test_a_mergekit_config_merges_as_the_same_flags(llamas, tmp_path, text, flags):
    base, a, b, c = llamas
    out, flagged = str(tmp_path / "config"), str(tmp_path / "flags")
    result = CliRunner().invoke(cli, ["merge", "--config", _config(tmp_path, text, base=base, a=a, b=b, c=c), "-o", out])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(cli, ["merge", *flags(base, a, b, c), "-o", flagged])
    assert result.exit_code == 0, result.output
    assert _bytes(out) == _bytes(flagged)


def test_a_mergekit_nuslerp_without_base_is_the_reference_of_the_models(llamas, tmp_path):
    base, a, b, _ = llamas
    out = str(tmp_path / "m")
    assert CliRunner().invoke(cli, ["merge", "--config", _config(tmp_path, NUSLERP_NO_BASE, a=a, b=b), "-o", out]).exit_code == 0
    merged, ta, tb = _st(out), _st(a), _st(b)
    for name in ta:
        expected = _nuslerp_ref(0.5 / 1.5, _np(ta[name]), _np(tb[name]), "tensor")
        np.testing.assert_allclose(_np(merged[name]), expected, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize(
    "text, words",
    [
        (NUSLERP.replace("      weight: 0.7\n", ""), "weight"),
        (NUSLERP.replace("  - model: {b}", "  - model: {c}\n    parameters:\n      weight: 0.1\n  - model: {b}"), "nuslerp merges exactly 2 models besides base_model, got 3"),
        (NUSLERP.replace("  - model: {a}", "  - model: {base}\n    parameters:\n      weight: 0.1\n  - model: {a}"), "base_model: nuslerp's base_model cannot be one of its two models"),
        (NUSLERP.replace("nuslerp_flatten: false", "nuslerp_flatten: 0"), "nuslerp_flatten"),
        (NUSLERP.replace("nuslerp_flatten: false", "nuslerp_spread: 1"), "parameters.nuslerp_spread"),
        (MULTISLERP.replace("eps: 1.0e-7", "eps: [1, 2]"), "eps"),
        (MULTISLERP.replace("normalize_weights: false", "int8_mask: true"), "parameters.int8_mask"),
        (MULTISLERP_NO_BASE.replace("      weight: 2.0", "      weight: -1.0"), "multislerp's weights sum to 0"),
    ],
)
def test_bad_mergekit_configs_are_one_line_errors(llamas, tmp_path, text, words):
    base, a, b, c = llamas
    out = str(tmp_path / "m")
    result = CliRunner().invoke(cli, ["merge", "--config", _config(tmp_path, text, base=base, a=a, b=b, c=c), "-o", out])
    assert_error(result, 2, words, out)


# --------------------------------------------------------------------------- passthrough (layer stacking)

STACK = """\
slices:
  - sources:
    - model: {a}
      layer_range: [0, 2]
  - sources:
    - model: {b}
      layer_range: [1, 2]
  - sources:
    - model: {c}
      layer_range: [0, 1]
merge_method: passthrough
"""


def _layer(name: str) -> tuple[int | None, str]:
    import re

    m = re.search(r"\.layers\.(\d+)\.", name)
    return (int(m.group(1)), name[: m.start(1)] + "{}" + name[m.end(1) :]) if m else (None, name)


def test_passthrough_stacks_layers_that_transformers_loads_bit_for_bit(llamas, tmp_path):
    from transformers import AutoModelForCausalLM

    _, a, b, c = llamas
    out = str(tmp_path / "stacked")
    result = CliRunner().invoke(cli, ["merge", "--config", _config(tmp_path, STACK, a=a, b=b, c=c), "-o", out, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["method"] == "passthrough" and [i["path"] for i in report["inputs"]] == [a, b, c]
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["num_hidden_layers"] == 4
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 4 and len(model.model.layers) == 4
    loaded = model.state_dict()
    sources = {p: _st(p) for p in (a, b, c)}
    origin = {0: (a, 0), 1: (a, 1), 2: (b, 1), 3: (c, 0)}  # output layer -> (model, its layer)
    checked = 0
    for name, value in loaded.items():
        index, pattern = _layer(name)
        if index is None:  # embeddings from the first slice's model, final norm and head from the last's
            src = sources[a if "embed" in name else c][name]
        else:
            model_path, j = origin[index]
            src = sources[model_path][pattern.format(j)]
        assert value.dtype == src.dtype and torch.equal(value.view(torch.uint8), src.view(torch.uint8)), name
        checked += 1
    assert checked == len(_st(out)) == 3 + 4 * (len(sources[a]) - 3) // 2  # every tensor written is checked
    assert not torch.equal(sources[a]["model.norm.weight"], sources[c]["model.norm.weight"])  # the rule is seen


def test_passthrough_casts_with_dtype(llamas, tmp_path):
    _, a, b, _ = llamas
    text = STACK.replace("  - sources:\n    - model: {c}\n      layer_range: [0, 1]\n", "") + "dtype: float16\n"
    out = str(tmp_path / "half")
    result = CliRunner().invoke(cli, ["merge", "--config", _config(tmp_path, text, a=a, b=b), "-o", out])
    assert result.exit_code == 0, result.output
    stacked, sa, sb = _st(out), _st(a), _st(b)
    assert torch.equal(stacked["model.layers.2.mlp.up_proj.weight"], sb["model.layers.1.mlp.up_proj.weight"].half())
    assert torch.equal(stacked["model.embed_tokens.weight"], sa["model.embed_tokens.weight"].half())
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert config["num_hidden_layers"] == 3 and "float16" in (config.get("dtype"), config.get("torch_dtype"))


@pytest.fixture(scope="module")
def wider(llamas, tmp_path_factory):
    """A model of another architecture size: tiny llama's config with another intermediate_size."""
    import shutil

    path = str(tmp_path_factory.mktemp("wider") / "m")
    shutil.copytree(llamas[1], path)
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config["intermediate_size"] = 256
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return path


@pytest.mark.parametrize(
    "text, words",
    [
        (STACK.replace("layer_range: [1, 2]", "layer_range: [1, 3]"), "slices.sources.layer_range: [1, 3] is not within the 2 layers"),
        (STACK.replace("layer_range: [1, 2]", "layer_range: [2, 2]"), "slices.sources.layer_range: [2, 2] is not within"),
        (STACK.replace("layer_range: [1, 2]", "layer_range: [-1, 2]"), "slices.sources.layer_range: [-1, 2]"),
        (STACK.replace("layer_range: [1, 2]", "layer_range: [1]"), "slices.sources.layer_range"),
        (STACK.replace("      layer_range: [1, 2]", "      layer_range: [1, 2]\n      parameters:\n        scale: 0.5"), "slices.sources.parameters"),
        (STACK.replace("    - model: {c}", "    - model: {c}\n      layer_range: [0, 1]\n    - model: {a}"), "slices.sources: passthrough takes exactly one model per slice"),
        (STACK + "base_model: {a}\n", "base_model"),
        (STACK + "tokenizer_source: base\n", "tokenizer_source"),
        (STACK.replace("  - sources:\n    - model: {b}", "  - weight: 1\n    sources:\n    - model: {b}"), "slices.weight"),
        (STACK.replace("model: {b}", "model: {wider}"), "has intermediate_size 256 but"),
    ],
)
def test_bad_passthrough_configs_are_one_line_errors_and_nothing_is_written(llamas, wider, tmp_path, text, words):
    _, a, b, c = llamas
    out = str(tmp_path / "m")
    result = CliRunner().invoke(cli, ["merge", "--config", _config(tmp_path, text, a=a, b=b, c=c, wider=wider), "-o", out])
    assert_error(result, 2, words, out)


def test_passthrough_needs_a_directory_and_is_not_a_recipe_merge(llamas, tmp_path):
    from peftcli.merging.mergekit_config import with_config

    _, a, b, c = llamas
    config = _config(tmp_path, STACK, a=a, b=b, c=c)
    result = CliRunner().invoke(cli, ["merge", "--config", config, "-o", str(tmp_path / "x.safetensors")])
    assert_error(result, 2, "a stacked model is a model directory", str(tmp_path / "x.safetensors"))
    with pytest.raises(UsageError, match="merge_method: passthrough stacks layers"):
        with_config(config, None, (), {}, [])  # a recipe's merge step: never merged as something else


def test_passthrough_of_one_tied_model_repeats_its_layers(tiny_llama_tied, tmp_path):
    from transformers import AutoModelForCausalLM

    text = STACK.replace("{b}", "{a}").replace("{c}", "{a}")
    out = str(tmp_path / "deep")
    result = CliRunner().invoke(cli, ["merge", "--config", _config(tmp_path, text, a=tiny_llama_tied), "-o", out])
    assert result.exit_code == 0, result.output
    stacked, source = _st(out), _st(tiny_llama_tied)
    assert "lm_head.weight" not in stacked and set(stacked) - {n for n in stacked if ".layers." in n} == set(source) - {n for n in source if ".layers." in n}
    model = AutoModelForCausalLM.from_pretrained(out)
    assert len(model.model.layers) == 4 and model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    for i, j in enumerate([0, 1, 1, 0]):
        name = "model.layers.{}.self_attn.o_proj.weight"
        assert torch.equal(model.state_dict()[name.format(i)], source[name.format(j)])


def test_passthrough_refuses_layers_that_are_not_alike(llamas, tmp_path):
    _, a, b, c = llamas
    odd = str(tmp_path / "odd")
    sd = _st(b)
    sd["model.layers.1.mlp.up_proj.weight"] = sd["model.layers.1.mlp.up_proj.weight"][:-1].clone()  # a shape its config does not say
    save_state_dict(sd, odd, source_dir=b)
    out = str(tmp_path / "m")
    result = CliRunner().invoke(cli, ["merge", "--config", _config(tmp_path, STACK, a=a, b=odd, c=c), "-o", out])
    assert_error(result, 2, f"layer 1 of {odd} holds other tensors than layer 0 of {a}", out)


@pytest.fixture(scope="module")
def qwen2s(tmp_path_factory):
    """Two tiny Qwen2 models whose layer_types differ per layer (full, then sliding attention)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    d = tmp_path_factory.mktemp("qwen2_stack")
    config = Qwen2Config(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        use_sliding_window=True, sliding_window=4, max_window_layers=1,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(str(d / "a"))
    return noisy_copy(str(d / "a"), str(d / "b"), 1), noisy_copy(str(d / "a"), str(d / "c"), 2)


def test_passthrough_restacks_layer_types(qwen2s, tmp_path):
    """transformers 5 writes Qwen2's layer_types (one attention kind per layer): the stacked
    model's list follows its layers, so each layer keeps its own kind of attention."""
    from transformers import AutoModelForCausalLM

    a, b = qwen2s
    with open(os.path.join(a, "config.json")) as f:
        assert json.load(f)["layer_types"] == ["full_attention", "sliding_attention"]  # the case is real
    text = STACK.replace("{c}", "{a}").replace("layer_range: [0, 1]", "layer_range: [1, 2]")  # a 0-1, b 1, a 1
    out = str(tmp_path / "stacked")
    result = CliRunner().invoke(cli, ["merge", "--config", _config(tmp_path, text, a=a, b=b), "-o", out])
    assert result.exit_code == 0, result.output
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention", "sliding_attention"]
    assert [layer.self_attn.layer_type for layer in model.model.layers] == model.config.layer_types
    assert model.config.max_window_layers == 1  # the older way of saying it agrees
    swapped = STACK.replace("{c}", "{a}").replace("layer_range: [0, 2]", "layer_range: [1, 2]")  # sliding, then b's 1, a's 0
    result = CliRunner().invoke(cli, ["merge", "--config", _config(tmp_path, swapped, a=a, b=b), "-o", str(tmp_path / "swapped")])
    assert_error(result, 2, "full attention after sliding attention", str(tmp_path / "swapped"))


def test_passthrough_refuses_per_layer_lists_it_cannot_restack(qwen2s, tmp_path):
    import shutil

    a, b = qwen2s
    for key, value, words in (("layer_types", ["full_attention"], "layer_types is not a list of its 2 layers' entries"),
                              ("rope_layers", [1, 0], "lists rope_layers per layer")):
        odd = str(tmp_path / key)
        shutil.copytree(b, odd)
        with open(os.path.join(odd, "config.json")) as f:
            config = json.load(f)
        config[key] = value
        with open(os.path.join(odd, "config.json"), "w") as f:
            json.dump(config, f)
        out = str(tmp_path / f"m_{key}")
        result = CliRunner().invoke(cli, ["merge", "--config", _config(tmp_path, STACK.replace("{c}", "{a}"), a=a, b=odd), "-o", out])
        assert_error(result, 2, words, out)
