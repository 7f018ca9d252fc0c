"""``peftcli inject lora --init pissa|olora``: PEFT's initialisations that change the base.

References are PEFT itself: ``get_peft_model`` with ``init_lora_weights="pissa"``/``"olora"`` on
the same tiny base gives the initial A and B; ``PeftModel.from_pretrained`` on the ORIGINAL
base (which re-runs the initialisation and subtracts s·B₀·A₀ from the base weights) gives the
forward and, through ``merge_and_unload``, the merged weights that peftcli's must equal.
"""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from peftcli.attach import load_adapted, load_base_model
from peftcli.cli import cli
from peftcli.injection import inject
from peftcli.merging.engine import merge
from peftcli.methods.lora import LoraConfig
from peftcli.training.config import TrainConfig
from peftcli.training.loop import train
from tests.helpers import assert_error, batch, lm_rows, output_tensor

peft = pytest.importorskip("peft")

# (arch, peftcli options, PEFT LoraConfig options). GPT-2's Conv1D: PiSSA only (OLoRA is refused there).
CASES = {
    "llama-pissa": ("llama", dict(init="pissa", targets="q_proj,v_proj"), {}),  # v_proj is 32×64 (GQA)
    "llama-olora": ("llama", dict(init="olora", targets="q_proj,v_proj"), {}),
    "llama-pissa-dora-rslora": ("llama", dict(init="pissa", targets="q_proj,v_proj", dora=True, rslora=True, alpha=6),
                                dict(use_dora=True, use_rslora=True, lora_alpha=6)),
    "llama-olora-pattern": ("llama", dict(init="olora", targets="q_proj,v_proj", rank_pattern="v_proj=2", alpha_pattern="q_proj=3"),
                            dict(rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 3})),
    "bert-olora": ("bert", dict(init="olora", targets="query,value"), {}),
    "gpt2-pissa": ("gpt2", dict(init="pissa", targets="c_attn"), {}),
}


def _peft_targets(opts: dict) -> list[str]:
    return opts["targets"].split(",")


def _quiet(fn, *a, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **kw)


def _forward(model, inputs=None) -> torch.Tensor:
    with torch.no_grad():
        return output_tensor(model.eval()(**(inputs or batch())))


@pytest.fixture(scope="module")
def bases(tiny_llama, tiny_bert, tiny_gpt2) -> dict[str, str]:
    return {"llama": tiny_llama, "bert": tiny_bert, "gpt2": tiny_gpt2}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, bases, tmp_path_factory):
    """(case name, base, our run, PEFT's initialised model on the same base)."""
    arch, opts, peft_kw = CASES[request.param]
    base = bases[arch]
    run = str(tmp_path_factory.mktemp(request.param) / "run")
    cfg = LoraConfig(**{"rank": 4, "alpha": 8, **opts})
    inject(base, "lora", cfg, run)
    peft_cfg = dict(r=4, lora_alpha=8, target_modules=_peft_targets(opts), init_lora_weights=opts["init"], fan_in_fan_out=arch == "gpt2")
    theirs = _quiet(peft.get_peft_model, load_base_model(base), peft.LoraConfig(**{**peft_cfg, **peft_kw}))
    return request.param, base, run, theirs


def test_initial_a_and_b_equal_peft_init(case):
    """PEFT's SVD/QR on the same fp32 weight: the same factors, signs included."""
    _, _, run, theirs = case
    ours = load_file(os.path.join(run, "adapter_model.safetensors"))
    expected = {k: v.detach() for k, v in peft.get_peft_model_state_dict(theirs).items()}  # the keys save_pretrained writes
    assert set(ours) == set(expected)
    for key, t in ours.items():
        assert t.shape == expected[key].shape and torch.allclose(t, expected[key], atol=1e-5), (key, (t - expected[key]).abs().max())
    assert max(t.abs().max().item() for k, t in ours.items() if "lora_B" in k) > 0.1  # B is no zero matrix


def test_adapter_config_says_what_peft_runs_on_load(case):
    name, _, run, _ = case
    config = json.load(open(os.path.join(run, "adapter_config.json")))
    assert config["init_lora_weights"] == CASES[name][1]["init"]


def test_peft_loads_the_run_on_the_original_base_as_peftcli_does_and_as_the_base(case):
    """At init ΔW = 0 relative to the original model: PEFT's residual + s·B₀·A₀ is the base."""
    _, base, run, _ = case
    theirs = _quiet(peft.PeftModel.from_pretrained, load_base_model(base), run)
    original = _forward(load_base_model(base))
    ours = _forward(load_adapted(base, run))
    assert torch.allclose(ours, _forward(theirs), atol=1e-5), (ours - _forward(theirs)).abs().max()
    assert torch.allclose(ours, original, atol=1e-5)
    # Not vacuous: PEFT's layers hold a residual far from the original weights.
    stored = load_file(os.path.join(base, "model.safetensors"))
    moved = [
        (m.get_base_layer().weight - stored[n.removeprefix("base_model.model.") + ".weight"]).abs().max().item()
        for n, m in theirs.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)
    ]
    assert moved and min(moved) > 1e-2


@pytest.fixture(scope="module")
def trained(bases, tmp_path_factory):
    """A PiSSA run (and an OLoRA one) after one training step with a large learning rate."""
    d = tmp_path_factory.mktemp("trained")
    data = d / "lm.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in lm_rows(8)))
    runs = {}
    for init in ("pissa", "olora"):
        run = str(d / init)
        inject(bases["llama"], "lora", LoraConfig(rank=4, init=init, targets="q_proj,v_proj,o_proj"), run)
        before = load_file(os.path.join(run, "adapter_model.safetensors"))
        train(run, TrainConfig(data=str(data), steps=1, batch_size=4, lr=5e-2, warmup_steps=0, schedule="constant"))
        after = load_file(os.path.join(run, "adapter_model.safetensors"))
        assert any(not torch.equal(before[k], after[k]) for k in before)  # the step changed φ
        runs[init] = run
    return bases["llama"], runs


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_after_a_training_step_peft_loads_what_peftcli_trained(trained, init):
    base, runs = trained
    theirs = _forward(_quiet(peft.PeftModel.from_pretrained, load_base_model(base), runs[init]))
    ours = _forward(load_adapted(base, runs[init]))
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
    assert not torch.allclose(ours, _forward(load_base_model(base)), atol=1e-3)  # training moved the model


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_merge_of_a_trained_run_equals_peft_merge_and_unload(trained, init, tmp_path):
    base, runs = trained
    theirs = _quiet(peft.PeftModel.from_pretrained, load_base_model(base), runs[init]).merge_and_unload().state_dict()
    merge(base, [runs[init]], str(tmp_path / "m"))
    ours = load_file(str(tmp_path / "m" / "model.safetensors"))
    stored = load_file(os.path.join(base, "model.safetensors"))
    changed = 0
    for name, t in ours.items():
        assert torch.allclose(t, theirs[name], atol=1e-5), (name, (t - theirs[name]).abs().max())
        changed += not torch.equal(t, stored[name])
    assert changed >= 3


def test_convert_to_lora_gives_a_plain_lora_relative_to_the_original_base(trained, tmp_path):
    """ΔW of a trained PiSSA run relative to W is s·(B·A − B₀·A₀): rank ≤ 2r, so a plain LoRA of
    rank 2r (init_lora_weights true) holds it, as PEFT's path_initial_model_for_weight_conversion."""
    base, runs = trained
    out = str(tmp_path / "plain")
    result = CliRunner().invoke(cli, ["convert", runs["pissa"], "--to", "lora", "--rank", "8", "-o", out])
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert json.load(open(os.path.join(out, "adapter_config.json")))["init_lora_weights"] is True
    theirs = _forward(_quiet(peft.PeftModel.from_pretrained, load_base_model(base), runs["pissa"]))
    plain = _forward(_quiet(peft.PeftModel.from_pretrained, load_base_model(base), out))
    assert torch.allclose(plain, theirs, atol=1e-5), (plain - theirs).abs().max()


def test_inject_prints_that_the_adapter_is_relative_to_the_residual_base(tiny_llama, tmp_path):
    result = CliRunner().invoke(cli, ["inject", "lora", "--init", "pissa", tiny_llama, "-o", str(tmp_path / "r")])
    assert result.exit_code == 0, result.stderr
    assert "init_lora_weights='pissa'" in result.stdout and "residual base" in result.stdout
    plain = CliRunner().invoke(cli, ["inject", "lora", tiny_llama, "-o", str(tmp_path / "p")])
    assert "residual" not in plain.stdout


# -- refusals: one line, nothing written ---------------------------------------------------


@pytest.mark.parametrize("arch, args, message", [
    ("llama", ["--init", "pissa", "--rank", "40", "--targets", "v_proj"], "larger than min(out, in) = 32"),
    ("llama", ["--init", "olora", "--rank-pattern", "v_proj=40", "--targets", "q_proj,v_proj"], "larger than min(out, in) = 32"),
    ("gpt2", ["--init", "olora", "--targets", "attn.c_proj"], "olora on the Conv1D layer"),
    ("llama", ["--init", "pissa_niter_4"], "pissa_niter_4 is not offered"),
    ("llama", ["--init", "pissa", "--lora-bias"], "--lora-bias goes with plain LoRA only"),
    ("llama", ["--init", "svd"], "--init must be one of kaiming, gaussian, orthogonal, pissa, olora"),
])
def test_bad_inputs_are_one_line_errors_and_write_nothing(bases, tmp_path, arch, args, message):
    out = str(tmp_path / "run")
    result = CliRunner().invoke(cli, ["inject", "lora", *args, bases[arch], "-o", out])
    assert_error(result, 2, message, out)
