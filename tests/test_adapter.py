"""Bottleneck adapters: placements and budgets, a hand-written reference forward, CLI and errors.

PEFT lacks this method, so the reference is the plain base model with forward hooks that add
s·(W_up·σ(W_down·x + b_down) + b_up) by hand at the places each paper puts the adapter.
"""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from click.testing import CliRunner
from torch.nn import functional as F

from peftcli.artifacts.adapter_dir import read_adapter, write_adapter
from peftcli.attach import attach_adapter, load_adapted, load_base_model
from peftcli.cli import cli
from peftcli.errors import BadInputError, UsageError
from peftcli.injection import inject
from peftcli.methods.adapter import BottleneckAdapter, BottleneckAdapterConfig
from tests.helpers import batch, output_tensor

HIDDEN = 64  # every tiny fixture (peftcli.tiny): hidden size 64, 2 blocks
LAYERS = (0, 1)
# Per architecture: attention output projection, FFN output projection, FFN input module, FFN module.
LAYOUT = {
    "llama": ("model.layers.{}.self_attn.o_proj", "model.layers.{}.mlp.down_proj", "model.layers.{}.mlp", "model.layers.{}.mlp"),
    "bert": (
        "encoder.layer.{}.attention.output.dense", "encoder.layer.{}.output.dense",
        "encoder.layer.{}.intermediate", "encoder.layer.{}.output",
    ),
    "gpt2": ("transformer.h.{}.attn.c_proj", "transformer.h.{}.mlp.c_proj", "transformer.h.{}.mlp", "transformer.h.{}.mlp"),
}
STYLES = ("houlsby", "pfeiffer", "parallel")
SUFFIXES = ("adapter.down.weight", "adapter.down.bias", "adapter.up.weight", "adapter.up.bias")
ACT = {"relu": torch.relu, "gelu": F.gelu, "silu": F.silu}


@pytest.fixture(params=["llama", "bert", "gpt2"])
def arch_base(request, tiny_llama, tiny_bert, tiny_gpt2):
    return request.param, {"llama": tiny_llama, "bert": tiny_bert, "gpt2": tiny_gpt2}[request.param]


def placements(arch: str, style: str, layers=LAYERS) -> list[str]:
    attn, ffn_out, _, ffn = LAYOUT[arch]
    per_layer = {"houlsby": (attn, ffn_out), "pfeiffer": (ffn_out,), "parallel": (ffn,)}[style]
    return [p.format(i) for i in layers for p in per_layer]


def per_placement(h: int, b: int) -> int:
    return 2 * h * b + b + h  # W_down, b_down, W_up, b_up


def randomize_phi(adapted, seed: int = 1) -> None:
    """Random φ, with W_down large enough that f depends on what it reads and not only on the
    biases (the projection outputs the sequential adapters read are ~0.01 in the tiny models)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in sorted(adapted.phi_parameters().items()):
            p.copy_(torch.randn(p.shape, generator=g) * (3.0 if key.endswith("down.weight") else 0.1))


def _forward(model, inputs):
    with torch.no_grad():
        return output_tensor(model(**inputs))


def _f(phi: dict, module: str, x: torch.Tensor, act: str, s: float) -> torch.Tensor:
    wd, bd, wu, bu = (phi[f"{module}.{k}"] for k in SUFFIXES)
    return s * (ACT[act](x @ wd.T + bd) @ wu.T + bu)


def reference_forward(base: str, arch: str, style: str, phi: dict, act: str, s: float, inputs, layers=LAYERS):
    """The plain base model with the adapters added by hooks, from the papers' placements."""
    model = load_base_model(base)
    attn, ffn_out, ffn_in, ffn = LAYOUT[arch]
    handles = []

    def sequential(path):  # y = proj(x); y + s·f(y)
        return lambda m, args, y: y + _f(phi, path, y, act, s)

    for i in layers:
        if style in ("houlsby", "pfeiffer"):
            targets = [ffn_out.format(i)] + ([attn.format(i)] if style == "houlsby" else [])
            for path in targets:
                handles.append(model.get_submodule(path).register_forward_hook(sequential(path)))
        else:  # FFN(x) + s·f(x): read x where the FFN starts, add where its output projection ends
            captured = {}
            key = ffn.format(i)
            handles.append(model.get_submodule(ffn_in.format(i)).register_forward_pre_hook(
                lambda m, args, c=captured: c.__setitem__("x", args[0])
            ))
            handles.append(model.get_submodule(ffn_out.format(i)).register_forward_hook(
                lambda m, args, y, c=captured, key=key: y + _f(phi, key, c["x"], act, s)
            ))
    out = _forward(model, inputs)
    for h in handles:
        h.remove()
    return out


CASES = [(style, {}, "relu", 4.0 if style == "parallel" else 1.0) for style in STYLES] + [
    ("houlsby", {"activation": "gelu", "bottleneck": 7, "scaling": 0.5}, "gelu", 0.5),
    ("parallel", {"activation": "silu", "reduction_factor": 8, "scaling": 2.0}, "silu", 2.0),
]


@pytest.mark.parametrize("style, options, act, scaling", CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_outputs_match_hand_written_reference(arch_base, style, options, act, scaling, tmp_path):
    arch, base = arch_base
    run = str(tmp_path / "run")
    budget = inject(base, "adapter", BottleneckAdapterConfig(style=style, **options), run, seed=3)
    adapted = load_adapted(base, run)
    trainable = [p for p in adapted.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == adapted.num_trainable == budget.trainable

    inputs = batch()
    base_out = _forward(load_base_model(base), inputs)
    assert torch.equal(_forward(adapted, inputs), base_out)  # W_up = 0: exactly the base at step 0

    randomize_phi(adapted)
    ours = _forward(adapted, inputs)
    assert not torch.allclose(ours, base_out, atol=1e-3)
    adapted.save(str(tmp_path / "trained"))
    phi = {k: t.float() for k, t in read_adapter(str(tmp_path / "trained")).tensors.items()}
    assert sorted(phi) == sorted(f"{m}.{s}" for m in placements(arch, style) for s in SUFFIXES)
    expected = reference_forward(base, arch, style, phi, act, scaling, inputs)
    assert torch.allclose(ours, expected, atol=1e-5)


def test_layers_restricts_placements(tiny_gpt2, tmp_path):
    run = str(tmp_path / "run")
    inject(tiny_gpt2, "adapter", BottleneckAdapterConfig(style="houlsby", layers="1"), run)
    adapted = load_adapted(tiny_gpt2, run)
    randomize_phi(adapted)
    adapted.save(str(tmp_path / "trained"))
    phi = {k: t.float() for k, t in read_adapter(str(tmp_path / "trained")).tensors.items()}
    assert {k.rsplit(".adapter.", 1)[0] for k in phi} == set(placements("gpt2", "houlsby", layers=(1,)))
    inputs = batch()
    expected = reference_forward(tiny_gpt2, "gpt2", "houlsby", phi, "relu", 1.0, inputs, layers=(1,))
    assert torch.allclose(_forward(adapted, inputs), expected, atol=1e-5)


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("options, b", [([], HIDDEN // 16), (["--reduction-factor", "32"], 2), (["--bottleneck", "9"], 9)])
def test_budget_follows_the_formula(arch_base, style, options, b):
    arch, base = arch_base
    result = CliRunner().invoke(cli, ["inspect", base, "--budget", "adapter", "--style", style, *options, "--json"])
    assert result.exit_code == 0, result.stderr
    budget = json.loads(result.stdout)["budget"]
    assert [t["module"] for t in budget["targets"]] == placements(arch, style)
    assert all(t["params"] == per_placement(HIDDEN, b) for t in budget["targets"])
    assert budget["trainable_params"] == len(placements(arch, style)) * per_placement(HIDDEN, b)


def test_inject_cli_writes_config_and_tensors(tiny_llama, tmp_path):
    out = str(tmp_path / "houlsby")
    args = ["inject", "adapter", "--style", "houlsby", "--reduction-factor", "16", tiny_llama, "-o", out, "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.stderr
    b = HIDDEN // 16
    assert json.loads(result.stdout)["budget"]["trainable_params"] == 4 * per_placement(HIDDEN, b)
    config = json.load(open(os.path.join(out, "adapter_config.json")))
    assert config["peft_type"] == "PEFTCLI"
    assert config["base_model_name_or_path"] == os.path.abspath(tiny_llama)
    assert config["peftcli"] == {
        "method": "adapter", "style": "houlsby", "bottleneck": b, "reduction_factor": 16, "activation": "relu",
        "scaling": 1.0, "layers": None, "placements": placements("llama", "houlsby"),
    }
    tensors = read_adapter(out).tensors
    for m in placements("llama", "houlsby"):
        assert tuple(tensors[f"{m}.adapter.down.weight"].shape) == (b, HIDDEN)
        assert tuple(tensors[f"{m}.adapter.up.weight"].shape) == (HIDDEN, b)
        assert not tensors[f"{m}.adapter.up.weight"].any() and not tensors[f"{m}.adapter.down.bias"].any()
        assert tensors[f"{m}.adapter.down.weight"].abs().max() <= 1 / HIDDEN**0.5  # Kaiming-uniform bound
    inspect = json.loads(CliRunner().invoke(cli, ["inspect", out, "--json"]).stdout)
    assert inspect["format"] == "adapter" and inspect["num_params"] == 4 * per_placement(HIDDEN, b)


def test_inspect_budget_table(tiny_bert):
    result = CliRunner().invoke(cli, ["inspect", tiny_bert, "--budget", "adapter", "--style", "parallel"])
    assert result.exit_code == 0, result.stderr
    # The parallel adapter wraps each block's FFN output module (the table may group the layers as {0..1}).
    assert re.search(r"encoder\.layer\.(1|\{0\.\.1\})\.output(?![.\w])", result.stdout)
    assert f"{2 * per_placement(HIDDEN, 4):,}" in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--reduction-factor", "0"], "--reduction-factor must be positive"),
        (["--bottleneck", "0"], "--bottleneck must be positive"),
        (["--bottleneck", "65"], "larger than the hidden size 64"),
        (["--style", "serial"], "--style must be one of"),
        (["--activation", "tanh"], "--activation must be one of"),
        (["--scaling", "-1"], "--scaling must be a positive number"),
        (["--layers", "7"], "which this model does not have"),
    ],
)
def test_inject_errors_write_nothing(tiny_llama, tmp_path, args, message):
    out = str(tmp_path / "out")
    result = CliRunner().invoke(cli, ["inject", "adapter", *args, tiny_llama, "-o", out])
    assert result.exit_code == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not os.path.exists(out) and os.listdir(tmp_path) == []


def _llama_shapes(tiny_llama):
    from peftcli.checkpoint.reader import open_checkpoint

    with open_checkpoint(tiny_llama) as ckpt:
        return {t.name: t.shape for t in ckpt.tensors.values()}, ckpt.config


def test_unknown_family_is_recognised_by_names(tiny_llama):
    shapes, config = _llama_shapes(tiny_llama)
    rows = BottleneckAdapter().budget(shapes, {**config, "model_type": "mystery"}, BottleneckAdapterConfig(style="houlsby"))
    assert [r.module for r in rows] == placements("llama", "houlsby")


def test_unsupported_architectures_are_usage_errors():
    method, cfg = BottleneckAdapter(), BottleneckAdapterConfig()
    with pytest.raises(UsageError, match="looked for.*self_attn.o_proj.*output.dense"):
        method.budget({"blocks.0.proj.weight": (8, 8)}, {"model_type": "mystery"}, cfg)
    # OPT-like: FFN inline in the block, so only the sequential styles apply.
    shapes = {"decoder.layers.0.self_attn.out_proj.weight": (8, 8), "decoder.layers.0.fc1.weight": (16, 8),
              "decoder.layers.0.fc2.weight": (8, 16)}
    assert [r.module for r in method.budget(shapes, {"model_type": "opt", "hidden_size": 8}, cfg)] == ["decoder.layers.0.fc2"]
    with pytest.raises(UsageError, match="needs the FFN as one module"):
        method.budget(shapes, {"model_type": "opt"}, BottleneckAdapterConfig(style="parallel"))


def test_hidden_size_disagreeing_with_config_is_bad_input(tiny_llama):
    shapes, config = _llama_shapes(tiny_llama)
    with pytest.raises(BadInputError, match="outputs 64 features, but the hidden size is 32"):
        BottleneckAdapter().budget(shapes, {**config, "hidden_size": 32}, BottleneckAdapterConfig())


def _edit_config(run: str, **changes) -> None:
    path = os.path.join(run, "adapter_config.json")
    config = json.load(open(path))
    config["peftcli"].update(changes)
    with open(path, "w") as f:
        json.dump(config, f)


def test_mismatched_adapter_is_one_error_listing_what_failed(tiny_llama, tiny_bert, tmp_path):
    run = str(tmp_path / "run")
    inject(tiny_llama, "adapter", BottleneckAdapterConfig(), run)
    with pytest.raises(BadInputError, match="2 problem.*no such module in the base"):
        attach_adapter(load_base_model(tiny_bert), run)
    _edit_config(run, bottleneck=8)
    with pytest.raises(BadInputError, match=r"2 problem.*do not fit hidden size 64 with bottleneck 8"):
        attach_adapter(load_base_model(tiny_llama), run)
    _edit_config(run, bottleneck=4, placements=["model.layers.0.mlp.down_proj", "model.layers.5.mlp.down_proj"])
    with pytest.raises(BadInputError, match="layers.5.mlp.down_proj: listed in the adapter config but has no tensors.*"
                       "layers.1.mlp.down_proj: has tensors but is not among"):
        attach_adapter(load_base_model(tiny_llama), run)
    _edit_config(run, placements=None, style="parallel")
    with pytest.raises(BadInputError, match=r"is not this architecture's FFN module \(mlp\)"):
        attach_adapter(load_base_model(tiny_llama), run)


def test_bad_adapter_files_are_bad_input(tiny_llama, tmp_path):
    run = str(tmp_path / "run")
    inject(tiny_llama, "adapter", BottleneckAdapterConfig(), run)
    adapter = read_adapter(run)
    tensors = dict(adapter.tensors)
    tensors["model.layers.0.mlp.gate_proj.weight"] = torch.zeros(2)
    del tensors["model.layers.1.mlp.down_proj.adapter.up.bias"]
    write_adapter(str(tmp_path / "bad"), adapter.config, tensors)
    with pytest.raises(BadInputError, match="unexpected key model.layers.0.mlp.gate_proj.weight.*missing adapter.up.bias"):
        attach_adapter(load_base_model(tiny_llama), str(tmp_path / "bad"))
    _edit_config(run, style="serial")
    with pytest.raises(BadInputError, match="adapter config: `style` must be one of"):
        attach_adapter(load_base_model(tiny_llama), run)
    with pytest.raises(BadInputError, match="no peftcli section"):
        BottleneckAdapter().config_from_adapter({"peft_type": "PEFTCLI"})


def test_attaches_to_a_head_class_nesting_the_base(tiny_bert, tmp_path):
    run = str(tmp_path / "run")
    budget = inject(tiny_bert, "adapter", BottleneckAdapterConfig(style="parallel"), run)
    adapted = load_adapted(tiny_bert, run)
    randomize_phi(adapted)
    adapted.save(str(tmp_path / "trained"))
    with_head = load_adapted(tiny_bert, str(tmp_path / "trained"), model_class="BertForSequenceClassification")
    assert with_head.num_trainable == budget.trainable
    inputs = batch()
    with torch.no_grad():
        inner = with_head.model.bert(**inputs).last_hidden_state
    assert torch.allclose(inner, _forward(adapted, inputs), atol=1e-6)
