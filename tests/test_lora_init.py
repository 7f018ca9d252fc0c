"""PEFT adapters whose init_lora_weights changes the base on load (PiSSA, OLoRA): reproduced or refused.

References are PEFT itself: ``PeftModel.from_pretrained`` on a fresh base (which re-runs the
initialisation and subtracts it from the base weights) then ``merge_and_unload`` and forward.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import typing
import warnings

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from peftcli.attach import load_adapted, load_base_model
from peftcli.cli import cli
from peftcli.errors import BadInputError
from peftcli.merging.engine import merge
from peftcli.methods.lora import base_init as lora_init
from tests.helpers import batch, edited_adapter, output_tensor, randomize_

peft = pytest.importorskip("peft")

# (arch, init, targets): OLoRA on GPT-2 only fits square Conv1D layers (PEFT factors the stored
# [in, out] weight), so it targets attn.c_proj; PiSSA takes the non-square c_attn (64 -> 192).
CASES = {
    "llama-pissa": ("llama", "pissa", ["q_proj", "v_proj"], {}),  # v_proj is 32×64 (GQA)
    "llama-olora": ("llama", "olora", ["q_proj", "v_proj"], {}),
    "llama-pissa-dora-rslora": ("llama", "pissa", ["q_proj", "v_proj"], dict(use_dora=True, use_rslora=True, lora_alpha=6)),
    "bert-pissa": ("bert", "pissa", ["query", "value"], {}),
    "bert-olora": ("bert", "olora", ["query", "value"], {}),
    "gpt2-pissa": ("gpt2", "pissa", ["c_attn"], {}),
    "gpt2-olora": ("gpt2", "olora", ["attn.c_proj"], {}),
}


def _bases(tiny_llama, tiny_bert, tiny_gpt2) -> dict[str, str]:
    return {"llama": tiny_llama, "bert": tiny_bert, "gpt2": tiny_gpt2}


def _peft_adapter(base: str, init, targets: list[str], out: str, **kw) -> str:
    """An adapter made by PEFT with ``init``, its A and B moved off their initial values (as training would)."""
    cfg = dict(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=init, fan_in_fan_out="gpt2" in base)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(load_base_model(base), peft.LoraConfig(**{**cfg, **kw}))
    randomize_([p for n, p in model.named_parameters() if "lora_" in n], seed=1, scale=0.1)
    model.save_pretrained(out)
    return out


def _peft_load(base: str, adapter: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(load_base_model(base), adapter).eval()


def _forward(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return output_tensor(model(**inputs))


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tiny_llama, tiny_bert, tiny_gpt2, tmp_path_factory):
    """(base, adapter, PEFT's logits, PEFT's merged state dict), built once per case."""
    arch, init, targets, kw = CASES[request.param]
    base = _bases(tiny_llama, tiny_bert, tiny_gpt2)[arch]
    adapter = _peft_adapter(base, init, targets, str(tmp_path_factory.mktemp(request.param) / "adapter"), **kw)
    theirs = _peft_load(base, adapter)
    logits = _forward(theirs, batch())
    merged = {k: v.detach().clone() for k, v in theirs.merge_and_unload().state_dict().items()}
    return base, adapter, logits, merged


def test_merge_equals_peft_merge_and_unload(case, tmp_path):
    base, adapter, _, theirs = case
    merge(base, [adapter], str(tmp_path / "merged"))
    ours = load_file(str(tmp_path / "merged" / "model.safetensors"))
    stored = load_file(os.path.join(base, "model.safetensors"))
    changed = 0
    for name, t in ours.items():
        assert torch.allclose(t, theirs[name], atol=1e-5), (name, (t - theirs[name]).abs().max())
        changed += not torch.equal(t, stored[name])
    assert changed >= 2
    # Not vacuous: W + s·B·A (the adapter read as plain LoRA) is far from PEFT's result.
    plain = str(tmp_path / "plain")
    merge(base, [edited_adapter(adapter, tmp_path / "as-plain", config=lambda c: c.update(init_lora_weights=True))], plain)
    worst = max((t - theirs[n]).abs().max().item() for n, t in load_file(os.path.join(plain, "model.safetensors")).items())
    assert worst > 1e-2  # a thousand times the tolerance


def test_attached_forward_equals_peft(case):
    base, adapter, theirs, _ = case
    ours = _forward(load_adapted(base, adapter), batch())
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
    assert not torch.allclose(ours, _forward(load_base_model(base), batch()), atol=1e-3)


# -- refusals ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_pissa(tiny_llama, tmp_path_factory) -> str:
    return _peft_adapter(tiny_llama, "pissa", ["q_proj", "v_proj"], str(tmp_path_factory.mktemp("pissa") / "a"))


def _with_init(adapter: str, value, out) -> str:
    return edited_adapter(adapter, out, config=lambda c: c.update(init_lora_weights=value))


def _check_and_merge(base: str, adapter: str, tmp_path) -> tuple[str, str]:
    """(check's FAIL line, merge's error line): both commands must fail, merge writing nothing."""
    runner = CliRunner()
    checked = runner.invoke(cli, ["check", base, adapter])
    assert checked.exit_code == 1, (checked.stdout, checked.stderr)
    fail = next(line for line in checked.stdout.splitlines() if line.startswith(f"{adapter}: FAIL"))
    merged = runner.invoke(cli, ["merge", base, adapter, "-o", str(tmp_path / "m")])
    assert merged.exit_code == 1 and not os.path.exists(tmp_path / "m"), (merged.stdout, merged.stderr)
    lines = merged.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and merged.stdout == ""
    return fail, lines[0][len("error: ") :]


@pytest.mark.parametrize("value", ["pissa_niter_4", "corda", "loftq", "lora_ga"])
def test_unreproducible_inits_are_refused_alike_by_check_merge_and_evaluate(tiny_llama, llama_pissa, value, tmp_path):
    adapter = _with_init(llama_pissa, value, tmp_path / "a")
    fail, error = _check_and_merge(tiny_llama, adapter, tmp_path)
    assert f"init_lora_weights={value!r}" in error and "path_initial_model_for_weight_conversion" in error
    assert error in fail  # check says what merge says, before merge runs
    with pytest.raises(BadInputError) as exc:
        load_adapted(tiny_llama, adapter)  # evaluate and train attach through here
    assert f"{exc.value.message} ({exc.value.hint})" == error


def test_olora_on_a_non_square_conv1d_is_refused(tiny_gpt2, tmp_path):
    """PEFT's OLoRA factors Conv1D's stored [in, out] weight, so it cannot load an adapter on c_attn."""
    from peftcli.injection import inject
    from peftcli.methods.lora import LoraConfig

    inject(tiny_gpt2, "lora", LoraConfig(rank=4, targets="c_attn"), str(tmp_path / "run"))
    adapter = _with_init(str(tmp_path / "run"), "olora", tmp_path / "a")
    fail, error = _check_and_merge(tiny_gpt2, adapter, tmp_path)
    assert "non-square Conv1D" in error and error in fail
    with pytest.raises(BadInputError, match="non-square Conv1D"):
        load_adapted(tiny_gpt2, adapter)


def test_a_rank_above_the_layer_size_is_refused(tiny_llama, tmp_path):
    """PiSSA's SVD has only min(out, in) components: PEFT cannot load r = 40 on a 32×64 v_proj."""
    from peftcli.artifacts.adapter_dir import write_adapter

    g = torch.Generator().manual_seed(0)
    key = "base_model.model.model.layers.0.self_attn.v_proj."
    tensors = {key + "lora_A.weight": torch.randn(40, 64, generator=g), key + "lora_B.weight": torch.randn(32, 40, generator=g)}
    config = {"peft_type": "LORA", "r": 40, "lora_alpha": 8, "target_modules": ["v_proj"], "init_lora_weights": "pissa"}
    write_adapter(str(tmp_path / "a"), config, tensors)
    fail, error = _check_and_merge(tiny_llama, str(tmp_path / "a"), tmp_path)
    assert "pissa needs r ≤ min(out, in) = 32" in error and "min(out, in) = 32" in fail
    with pytest.raises(BadInputError, match="pissa needs r"):
        load_adapted(tiny_llama, str(tmp_path / "a"))


# -- every value PEFT accepts --------------------------------------------------------------


def _peft_values() -> set:
    """init_lora_weights values from PEFT's own source: the config's annotation and the branches
    of ``LoraLayer.update_layer`` / ``reset_lora_parameters`` (a value PEFT adds appears here)."""
    from peft.tuners.lora import LoraConfig, LoraLayer

    values: set = {True, False}
    hint = typing.get_type_hints(LoraConfig)["init_lora_weights"]
    for arg in typing.get_args(hint):
        values |= set(typing.get_args(arg)) if typing.get_origin(arg) is typing.Literal else set()
    source = inspect.getsource(LoraLayer.update_layer) + inspect.getsource(LoraLayer.reset_lora_parameters)
    values |= set(re.findall(r'init_lora_weights\s*==\s*"([^"]+)"', source))
    for lowered in re.findall(r'init_lora_weights\.lower\(\)\s*==\s*"([^"]+)"', source):
        values |= {lowered, lowered.upper()}  # PEFT compares these case-insensitively
    for prefix in re.findall(r'init_lora_weights\.startswith\("([^"]+)"\)', source):
        values |= {prefix, prefix + "_niter_2"}
    return {v.replace("[number of iters]", "4") if isinstance(v, str) else v for v in values}


def test_the_values_read_from_peft_include_the_known_ones():
    assert {True, False, "gaussian", "eva", "olora", "OLORA", "pissa", "pissa_niter_4", "corda", "loftq", "orthogonal", "lora_ga"} <= _peft_values()


def _base_weights_changed(model, stored: dict) -> bool:
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert layers
    return any(
        not torch.equal(m.get_base_layer().weight, stored[name.removeprefix("base_model.model.") + ".weight"])
        for name, m in model.named_modules()
        if isinstance(m, LoraLayer)
    )


@pytest.mark.parametrize("value", [*sorted(_peft_values(), key=repr), None, 1, "PiSSA", "pissa_svd", "gaussianx"], ids=repr)
def test_every_init_value_is_reproduced_or_refused(tiny_llama, llama_pissa, value, tmp_path):
    """Against PEFT's load: where it leaves the base alone or changes it, peftcli's merge equals
    PEFT's, or peftcli refuses; where PEFT cannot load the adapter, peftcli refuses. A value PEFT
    loads is never refused as one PEFT does not accept (so a new PEFT value fails here)."""
    adapter = _with_init(llama_pissa, value, tmp_path / "a")
    stored = load_file(os.path.join(tiny_llama, "model.safetensors"))
    try:
        theirs = _peft_load(tiny_llama, adapter)
    except Exception:  # noqa: BLE001 - PEFT rejects the value, or cannot run its init from the files
        theirs = None
    try:
        merge(tiny_llama, [adapter], str(tmp_path / "m"))
    except BadInputError as exc:
        assert "init_lora_weights" in exc.message and (not isinstance(value, str) or repr(value) in exc.message)
        assert theirs is None or "does not accept" not in exc.message
        return
    assert theirs is not None, f"PEFT cannot load init_lora_weights={value!r}, peftcli merged it"
    changed = _base_weights_changed(theirs, stored)
    expected = theirs.merge_and_unload().state_dict()
    ours = load_file(str(tmp_path / "m" / "model.safetensors"))
    for name, t in ours.items():
        assert torch.allclose(t, expected[name], atol=1e-5), (value, changed, name)
    assert changed == (lora_init.base_init(value) is not None)


def test_check_passes_a_reproduced_adapter_and_reports_its_merge(tiny_llama, llama_pissa):
    result = CliRunner().invoke(cli, ["check", tiny_llama, llama_pissa, "--json"])
    assert result.exit_code == 0, (result.stdout, result.stderr)
    doc = json.loads(result.stdout)
    assert doc["ok"] and doc["merge"] is not None and doc["merge_refusal"] is None
