"""peftcli merge --config: mergekit's YAML configurations, written as mergekit's documentation
shows them, merge bit for bit as the same merge given as flags (and as mergekit's formula in
fp64 for linear, task_arithmetic and ties); what peftcli does not read is refused naming the key."""

from __future__ import annotations

import os

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from peftcli.cli import cli
from tests.helpers import noisy_copy


@pytest.fixture(scope="module")
def models(tiny_llama, tmp_path_factory):
    d = tmp_path_factory.mktemp("mk")
    return tiny_llama, noisy_copy(tiny_llama, str(d / "a"), 1), noisy_copy(tiny_llama, str(d / "b"), 2)


def _run(args: list[str]):
    return CliRunner().invoke(cli, ["merge", *args])


def _bytes(path: str) -> bytes:
    with open(os.path.join(path, "model.safetensors"), "rb") as f:
        return f.read()


def _config(tmp_path, text: str, **paths) -> str:
    path = tmp_path / "merge.yml"
    path.write_text(text.format(**paths))
    return str(path)


LINEAR = """\
models:
  - model: {base}
    parameters:
      weight: 1.0
  - model: {a}
    parameters:
      weight: 0.5
  - model: {b}
    parameters:
      weight: 0.5
merge_method: linear
dtype: float32
"""
TASK_ARITHMETIC = """\
models:
  - model: {a}
    parameters:
      weight: 0.7
  - model: {b}
    parameters:
      weight: 0.3
merge_method: task_arithmetic
base_model: {base}
parameters:
  lambda: 0.5
dtype: float32
tokenizer_source: base
"""
TIES = """\
models:
  - model: {base}
    # no parameters necessary for base model
  - model: {a}
    parameters:
      density: 0.5
      weight: 0.5
  - model: {b}
    parameters:
      density: 0.5
      weight: 0.3
merge_method: ties
base_model: {base}
parameters:
  normalize: true
dtype: float32
"""
DARE_TIES = """\
models:
  - model: {base}
  - model: {a}
    parameters:
      density: 0.53
      weight: 0.4
  - model: {b}
    parameters:
      density: 0.53
      weight: 0.3
merge_method: dare_ties
base_model: {base}
parameters:
  int8_mask: true
dtype: bfloat16
"""
SLERP = """\
slices:
  - sources:
      - model: {base}
        layer_range: [0, {layers}]
      - model: {a}
        layer_range: [0, {layers}]
merge_method: slerp
base_model: {base}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.7]  # the docs' [0, 0.5, 0.3, 0.7, 1]: tiny_llama has 2 layers
    - filter: mlp
      value: [1, 0.3]
    - value: 0.5 # fallback for rest of tensors
dtype: float16
"""
MODEL_STOCK = """\
models:
  - model: {a}
  - model: {b}
merge_method: model_stock
base_model: {base}
dtype: float32
"""
DELLA = """\
models:
  - model: {a}
    parameters:
      weight: 1
      density: 0.5
      epsilon: 0.1
  - model: {b}
    parameters:
      weight: 0.5
      density: 0.5
      epsilon: 0.1
merge_method: della
base_model: {base}
parameters:
  lambda: 1.2
  normalize: true
dtype: float32
"""
BREADCRUMBS_TIES = """\
models:
  - model: {a}
    parameters:
      weight: 1.0
  - model: {b}
    parameters:
      weight: 0.5
merge_method: breadcrumbs_ties
base_model: {base}
parameters:
  density: 0.5
  gamma: 0.02
  lambda: 2.0
"""
KARCHER = """\
models:
  - model: {a}
  - model: {b}
merge_method: karcher
parameters:
  max_iter: 5
  tol: 0.0001
"""
PASSTHROUGH = """\
slices:
  - sources:
    - model: {a}
      layer_range: [0, 1]
  - sources:
    - model: {b}
      layer_range: [1, 2]
merge_method: passthrough
dtype: float16
"""


def _layers(base: str) -> int:
    from peftcli.merging.mergekit_config import _layers as count

    return count(base)


# (config, flags of the same merge: "base", "a", "b" stand for the paths)
SAME_AS_FLAGS = {
    "linear": (LINEAR, ["base", "a", "b", "--weights", "0.25,0.25", "--dtype", "F32"]),
    "task_arithmetic": (TASK_ARITHMETIC, ["base", "a", "b", "--weights", "0.35,0.15", "--dtype", "F32"]),
    "ties": (TIES, ["base", "a", "b", "--method", "ties", "--density", "0.5", "--weights", "0.5,0.3", "--dtype", "F32"]),
    "dare_ties": (DARE_TIES, ["base", "a", "b", "--method", "dare-ties", "--density", "0.53", "--weights", "0.4,0.3", "--dtype", "BF16"]),
    "slerp": (SLERP, ["base", "base", "a", "--method", "slerp", "--t", "0.5", "--t-attention", "0.0,0.7", "--t-mlp", "1.0,0.3", "--dtype", "F16"]),
    "model_stock": (MODEL_STOCK, ["base", "a", "b", "--method", "model-stock", "--dtype", "F32"]),
    "breadcrumbs_ties": (BREADCRUMBS_TIES, ["base", "a", "b", "--method", "breadcrumbs-ties", "--density", "0.5", "--gamma", "0.02", "--weights", "2.0,1.0"]),
    "karcher": (KARCHER, ["a", "a", "b", "--method", "karcher", "--max-iter", "5", "--tol", "0.0001"]),
    "della": (DELLA, ["base", "a", "b", "--method", "della", "--density", "0.5", "--epsilon", "0.1", "--scale", "1.2", "--weights", "1.0,0.5", "--dtype", "F32"]),
}


@pytest.mark.parametrize("name", list(SAME_AS_FLAGS))
def test_config_merges_as_the_same_flags(models, tmp_path, name):
    base, a, b = models
    text, flags = SAME_AS_FLAGS[name]
    paths = {"base": base, "a": a, "b": b}
    config = _config(tmp_path, text, layers=_layers(base), **paths)
    result = _run(["--config", config, "-o", str(tmp_path / "cfg")])
    assert result.exit_code == 0, result.output
    result = _run([paths.get(f, f) for f in flags] + ["-o", str(tmp_path / "flags")])
    assert result.exit_code == 0, result.output
    assert _bytes(str(tmp_path / "cfg")) == _bytes(str(tmp_path / "flags"))


def _thetas(models):
    return [{k: v.double() for k, v in load_file(os.path.join(m, "model.safetensors")).items()} for m in models]


def _ties_ref(phis, weights, density):
    """mergekit's ties: magnitude trim to the density, sign of Σ wφ elected, Σ of the agreeing / Σ of their weights."""
    trimmed = []
    for phi in phis:
        k = int(density * phi.numel())
        flat = phi.flatten()
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[flat.abs().topk(k).indices] = True
        trimmed.append((flat * keep).reshape(phi.shape))
    w = torch.tensor(weights, dtype=torch.float64).view(-1, *[1] * phis[0].dim())
    stacked = torch.stack(trimmed) * w
    sign = torch.where(stacked.sum(0) >= 0, 1.0, -1.0).double()  # mergekit's get_mask(method=sum)
    mask = torch.sign(stacked) == sign
    divisor = (w * mask).sum(0)
    divisor[divisor == 0] = 1
    return (stacked * mask).sum(0) / divisor


@pytest.mark.parametrize("name", ["linear", "task_arithmetic", "ties"])
def test_config_is_mergekits_formula_in_fp64(models, tmp_path, name):
    base, a, b = models
    config = _config(tmp_path, SAME_AS_FLAGS[name][0], base=base, a=a, b=b)
    result = _run(["--config", config, "-o", str(tmp_path / "cfg")])
    assert result.exit_code == 0, result.output
    merged = load_file(str(tmp_path / "cfg" / "model.safetensors"))
    t0, ta, tb = _thetas([base, a, b])
    for key, value in merged.items():
        if name == "linear":
            expected = (1.0 * t0[key] + 0.5 * ta[key] + 0.5 * tb[key]) / 2.0
        elif name == "task_arithmetic":
            expected = t0[key] + 0.5 * (0.7 * (ta[key] - t0[key]) + 0.3 * (tb[key] - t0[key]))
        else:
            expected = t0[key] + _ties_ref([ta[key] - t0[key], tb[key] - t0[key]], [0.5, 0.3], 0.5)
        torch.testing.assert_close(value.double(), expected, rtol=1e-6, atol=1e-6, msg=key)


@pytest.mark.parametrize(
    "text, key",
    [
        (PASSTHROUGH.replace("layer_range: [1, 2]", "layer_range: [1, 9]"), "slices.sources.layer_range"),
        (TIES.replace("merge_method: ties", "merge_method: ties\nchat_template: chatml"), "chat_template"),
        (TIES.replace("density: 0.5\n      weight: 0.3", "density: 0.7\n      weight: 0.3"), "density"),
        (TIES.replace("normalize: true", "normalize: false"), "normalize"),
        (TIES.replace("normalize: true", "lambda: 2"), "lambda"),
        (TIES.replace("normalize: true", "rescale: true"), "rescale"),
        (TIES.replace("dtype: float32", "dtype: float8"), "dtype"),
        (TIES.replace("dtype: float32", "tokenizer_source: [base, union]"), "tokenizer_source"),  # union and models: tests/test_merge_vocab.py
        (TIES.replace("weight: 0.3", "weight: [0, 1]"), "weight"),
        (TIES.replace("weight: 0.3", "gamma: 0.1"), "models.parameters.gamma"),
        (LINEAR.replace("weight: 0.5\n  - model: {b}", "weight: 0.25\n  - model: {b}").replace("merge_method: linear", "merge_method: linear\nparameters:\n  normalize: false"), "normalize"),
        (SLERP.replace("- filter: mlp", "- filter: q_proj"), "t.filter"),
        (SLERP.replace("layer_range: [0, {layers}]", "layer_range: [0, 1]"), "slices.sources.layer_range"),
        (SLERP.replace("merge_method: slerp", "merge_method: slerp\nmodels:\n  - model: {a}"), "slices"),
        (DELLA.replace("      epsilon: 0.1\n", ""), "epsilon"),
        (MODEL_STOCK.replace("base_model: {base}\n", ""), "base_model"),
    ],
)
def test_what_peftcli_does_not_read_is_refused_naming_the_key(models, tmp_path, text, key):
    base, a, b = models
    config = _config(tmp_path, text, base=base, a=a, b=b, layers=_layers(base))
    out = tmp_path / "out"
    result = _run(["--config", config, "-o", str(out)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: mergekit config: {key}: "), result.output
    assert not out.exists()


@pytest.mark.timeout(60)
def test_an_unreadable_config_is_refused_as_a_mergekit_config(tmp_path):
    """The file is read as recipes are (regular, bounded, UTF-8, bounded YAML), and what is wrong
    with it is said of the mergekit config the user passed, never of a recipe."""
    cases = {
        "directory": (tmp_path / "dir", "is a directory, not a mergekit config file"),
        "fifo": (tmp_path / "fifo", "is not a regular file"),
        "binary": (tmp_path / "bin.yml", "not a text (UTF-8) file"),
        "yaml": (tmp_path / "bad.yml", "not valid YAML"),
        "nested": (tmp_path / "deep.yml", "nested deeper than"),
    }
    (tmp_path / "dir").mkdir()
    os.mkfifo(tmp_path / "fifo")  # reading would wait for a writer forever
    (tmp_path / "bin.yml").write_bytes(b"merge_method: linear\n\xff\xfe\n")
    (tmp_path / "bad.yml").write_text("models: [unclosed\n")
    (tmp_path / "deep.yml").write_text("models: " + "[" * 100 + "]" * 100 + "\n")
    for name, (path, message) in cases.items():
        result = _run(["--config", str(path), "-o", str(tmp_path / "out")])
        lines = result.output.strip().splitlines()
        assert result.exit_code == 1 and len(lines) == 1 and message in lines[0], (name, result.output)
        assert "recipe" not in lines[0] and "mergekit config" in lines[0], (name, lines[0])
    assert not (tmp_path / "out").exists()


def test_a_hub_id_is_not_downloaded(models, tmp_path):
    base, a, _ = models
    config = _config(tmp_path, TIES.replace("model: {b}", "model: mistralai/Mistral-7B-v0.1"), base=base, a=a, b="")
    result = _run(["--config", config, "-o", str(tmp_path / "out")])
    assert result.exit_code == 1 and "never downloads" in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_config_with_base_or_method_flags_is_a_usage_error(models, tmp_path):
    base, a, b = models
    config = _config(tmp_path, TIES, base=base, a=a, b=b)
    for extra in ([base, a], ["--method", "ties"], ["--density", "0.3"]):
        result = _run(["--config", config, *extra, "-o", str(tmp_path / "out")])
        assert result.exit_code == 2 and "--config" in result.output and "not" in result.output.split("--config", 1)[1], result.output
        assert "No such option" not in result.output
    assert not (tmp_path / "out").exists()


def test_slerp_filters_that_would_pick_another_t_than_mergekit_are_refused(tiny_gpt2, tmp_path):
    """GPT-2's attention is h.N.attn.*: mergekit's filter self_attn matches none of it (the
    fallback t), peftcli's attention family all of it; the config is refused, not merged."""
    other = noisy_copy(tiny_gpt2, str(tmp_path / "ft"), 3)
    text = SLERP.replace("slices:\n  - sources:\n      - model: {base}\n        layer_range: [0, {layers}]\n      - model: {a}\n        layer_range: [0, {layers}]\n",
                         "models:\n  - model: {base}\n  - model: {a}\n")
    config = _config(tmp_path, text, base=tiny_gpt2, a=other)
    result = _run(["--config", config, "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and result.output.startswith("error: mergekit config: t.filter: tensor ") and ".attn." in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_a_recipe_merge_step_takes_a_mergekit_config_as_the_command_does(models, tmp_path, monkeypatch):
    """`merge: {config: …}` in a recipe is the merge `peftcli merge --config` writes, byte for byte;
    a step with a config and its own method option, or with neither config nor inputs, is refused
    when the recipe is planned."""
    from peftcli.errors import UsageError
    from peftcli.recipes import execute, plan

    base, a, b = models
    config = _config(tmp_path, TIES, base=base, a=a, b=b)
    assert _run(["--config", config, "-o", str(tmp_path / "cli")]).exit_code == 0
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"steps:\n  merge: {{config: {config}, output: merged}}\n")
    execute(plan(str(recipe), workdir=str(tmp_path / "wd")))
    assert _bytes(str(tmp_path / "wd" / "merged")) == _bytes(str(tmp_path / "cli"))
    for body, message in ((f"config: {config}, method: ties, output: m", "`method` is not taken"),
                          (f"config: {config}, base: {base}, output: m", "gives BASE and INPUTS"),
                          ("output: m", "missing key 'base'")):
        recipe.write_text(f"steps:\n  merge: {{{body}}}\n")
        with pytest.raises(UsageError, match=message):
            plan(str(recipe), workdir=str(tmp_path / "wd2"))
