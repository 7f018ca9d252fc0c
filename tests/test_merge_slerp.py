"""SLERP merges (peftcli.merging.methods.slerp) against an fp64 reference written here.

The reference follows the definition (normalised vectors, ω = arccos(â·b̂), the sin weights,
linear interpolation when |â·b̂| > 0.9995) and mergekit's gradients (np.interp over the
layers), independently of the kernel's code.
"""

from __future__ import annotations

import math
import os

import numpy as np

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from peftcli.checkpoint.writer import save_state_dict
from peftcli.cli import cli
from peftcli.errors import UsageError
from peftcli.merging.arithmetic import combine
from peftcli.merging.engine import merge
from peftcli.merging.methods._slerp_kernel import coefficients
from tests.helpers import whole_tensor_path

LAYERS = 4


def _shapes() -> dict[str, tuple[int, ...]]:
    shapes = {"model.embed_tokens.weight": (700, 400), "model.norm.weight": (16,)}  # 280,000 elements: two ranges
    for i in range(LAYERS):
        shapes[f"model.layers.{i}.self_attn.q_proj.weight"] = (16, 16)
        shapes[f"model.layers.{i}.mlp.up_proj.weight"] = (32, 16)
        shapes[f"model.layers.{i}.input_layernorm.weight"] = (16,)
    return shapes


@pytest.fixture()
def models(tmp_path):
    gen = torch.Generator().manual_seed(0)
    base = {n: torch.randn(s, generator=gen) for n, s in _shapes().items()}
    paths = [str(tmp_path / "base.safetensors")]
    save_state_dict(base, paths[0])
    for k in (1, 2):  # two fine-tunes, far enough from the base that slerp is not linear
        ft = {n: t + 0.8 * torch.randn(t.shape, generator=gen) for n, t in base.items()}
        paths.append(str(tmp_path / f"ft{k}.safetensors"))
        save_state_dict(ft, paths[-1])
    return paths


def _reference(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    a64, b64 = a.double().flatten(), b.double().flatten()
    dot = float(a64 @ b64) / (float(a64.norm()) * float(b64.norm()))
    if abs(dot) > 0.9995:
        return ((1 - t) * a64 + t * b64).view(a.shape)
    omega = math.acos(dot)
    return ((math.sin((1 - t) * omega) * a64 + math.sin(t * omega) * b64) / math.sin(omega)).view(a.shape)


def _t(values: list[float], name: str) -> float:
    """mergekit's gradient: layer i of L at i/(L-1), np.interp over evenly spaced anchors."""
    if ".layers." not in name:
        return values[0]
    i = int(name.split(".layers.")[1].split(".")[0])
    return float(np.interp(i / (LAYERS - 1), np.linspace(0, 1, len(values)), values))


def test_slerp_of_two_checkpoints_follows_the_fp64_formula_with_t_schedules_per_family(models, tmp_path):
    base, a, b = models
    out = str(tmp_path / "m.safetensors")
    result = CliRunner().invoke(
        cli, ["merge", base, a, b, "--method", "slerp", "--t", "0.3", "--t-attention", "0,0.5,1", "--t-mlp", "1,0.2", "-o", out]
    )
    assert result.exit_code == 0, result.output
    merged, ta, tb = load_file(out), load_file(a), load_file(b)
    for name in _shapes():
        values = [0, 0.5, 1] if "self_attn" in name else [1, 0.2] if ".mlp." in name else [0.3]
        expected = _reference(ta[name], tb[name], _t(values, name))
        torch.testing.assert_close(merged[name].double(), expected, rtol=1e-5, atol=1e-5, msg=name)
    # the schedules do what they say at their ends: layer 0's attention is A, the last layer's B
    assert torch.allclose(merged["model.layers.0.self_attn.q_proj.weight"], ta["model.layers.0.self_attn.q_proj.weight"], atol=1e-6)
    assert torch.allclose(merged[f"model.layers.{LAYERS - 1}.self_attn.q_proj.weight"], tb[f"model.layers.{LAYERS - 1}.self_attn.q_proj.weight"], atol=1e-6)


def test_near_parallel_tensors_interpolate_linearly(tmp_path):
    # B = 2A: â·b̂ = 1, where ω = 0 would divide by sin 0; the fallback gives (1 − t)A + t·2A.
    a = torch.randn(64, generator=torch.Generator().manual_seed(3))
    base = torch.zeros(64)
    out = combine([a, 2 * a], [1.0, 1.0], "slerp", base=base, t=0.25)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, 0.75 * a + 0.5 * a)
    assert coefficients(1.0, 1.0, 0.9996, 0.25) == (0.75, 0.25)  # above the threshold: linear
    s_a, s_b = coefficients(1.0, 1.0, 0.999, 0.25)  # below it: the sin weights
    omega = math.acos(0.999)
    assert (s_a, s_b) == pytest.approx((math.sin(0.75 * omega) / math.sin(omega), math.sin(0.25 * omega) / math.sin(omega)), rel=1e-12)
    assert s_a + s_b > 1.0  # not the linear weights


def test_slerp_bytes_are_reproducible_and_the_ranged_kernel_equals_the_whole_tensor_one(models, tmp_path, monkeypatch):
    base, a, b = models
    runs = []
    for k in range(2):
        out = str(tmp_path / f"r{k}.safetensors")
        merge(base, [a, b], out, method="slerp", options={"t": "0,0.5,1", "t_mlp": "0.7"})
        runs.append(open(out, "rb").read())
    whole_tensor_path(monkeypatch)
    out = str(tmp_path / "whole.safetensors")
    merge(base, [a, b], out, method="slerp", options={"t": "0,0.5,1", "t_mlp": "0.7"})
    runs.append(open(out, "rb").read())
    assert runs[0] == runs[1] == runs[2]


def test_a_diff_and_a_checkpoint_are_models_base_plus_phi(models, tmp_path):
    base, a, b = models
    out = str(tmp_path / "m.safetensors")
    merge(base, [base, b], out, method="slerp", options={"t": "0.5"})  # mergekit's layout: the base is model A
    merged, t0, tb = load_file(out), load_file(base), load_file(b)
    for name in _shapes():
        torch.testing.assert_close(merged[name].double(), _reference(t0[name], tb[name], 0.5), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--t", "0,0.2,0.4,0.6,0.8"], "--t has 5 values but the base has 4 layers"),
        (["--t", "0.5", "--t-mlp", "0,0.1,0.2,0.3,0.4,0.5"], "--t-mlp has 6 values"),
        (["--t", "1.5"], "--t value 1.5 is outside [0, 1]"),
        (["--t", "0.5", "--t-attention", "-0.1,1"], "--t-attention value -0.1 is outside [0, 1]"),
        (["--t", "0.5,x"], "--t '0.5,x' is not a number"),
        ([], "slerp needs --t"),
        (["--t", "0.5", "--weights", "1,1"], "slerp takes no --weights"),
        (["--t", "0.5", "--density", "0.5"], "slerp takes no density"),
        (["--t", "0.5", "THIRD"], "slerp merges exactly 2 models, got 3"),
    ],
)
def test_bad_slerp_options_are_one_line_errors_and_nothing_is_written(models, tmp_path, extra, words):
    base, a, b = models
    out = str(tmp_path / "m.safetensors")
    extra = [a if e == "THIRD" else e for e in extra]
    result = CliRunner().invoke(cli, ["merge", base, a, b, "--method", "slerp", *extra, "-o", out])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], result.output
    assert not os.path.exists(out)


def test_the_t_options_of_other_methods_are_refused():
    with pytest.raises(UsageError, match="linear takes no t"):
        combine([torch.ones(2)], [1.0], "linear", t="0.5")
