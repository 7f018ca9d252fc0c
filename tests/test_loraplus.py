"""LoRA+ (``train --loraplus-ratio R``): lora_B and LoRA's 1-D parameters at R × the learning
rate, lora_A at it, as PEFT's ``create_loraplus_optimizer``; refused for other runs."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from peftcli.attach import load_base_model
from peftcli.cli import cli
from peftcli.injection import inject
from peftcli.methods.lora import LoraConfig
from peftcli.training.config import TrainConfig
from peftcli.training.loop import train
from tests.helpers import assert_error, edited_adapter, lm_rows

peft = pytest.importorskip("peft")

LR, RATIO = 1e-3, 16.0


@pytest.fixture(scope="module")
def lm_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "lm.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lm_rows(8)))
    return str(path)


@pytest.fixture
def optimizers(monkeypatch):
    """Every AdamW the run builds, as built."""
    built = []

    class Recording(torch.optim.AdamW):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(torch.optim, "AdamW", Recording)
    return built


def _lr_of(optimizer, names: dict[int, str]) -> dict[str, float]:
    """Parameter name -> its group's learning rate as built (before any scheduler step changes it)."""
    return {names[id(p)]: g.get("initial_lr", g["lr"]) for g in optimizer.param_groups for p in g["params"]}


def _peft_adapter(base: str, out: str, **kw) -> str:
    """A PEFT LoRA with B moved off zero (so lora_A gets a gradient too)."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(load_base_model(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **kw))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    model.save_pretrained(out)
    return out


@pytest.mark.parametrize("kw", [{}, {"use_dora": True}, {"lora_bias": True}], ids=["lora", "dora", "lora-bias"])
def test_groups_map_each_parameter_to_the_rate_peft_gives_it(tiny_llama, lm_data, tmp_path, optimizers, kw):
    adapter = _peft_adapter(tiny_llama, str(tmp_path / "run"), **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs_model = peft.PeftModel.from_pretrained(load_base_model(tiny_llama), adapter, is_trainable=True)
    from peft.optimizers import create_loraplus_optimizer

    theirs_opt = create_loraplus_optimizer(theirs_model, torch.optim.SGD, lr=LR, loraplus_lr_ratio=RATIO)  # the groups are the same for any class

    def key(name: str) -> str:  # PEFT's parameter name -> the adapter file's key
        name = name.replace(".default", "")
        return name[: -len(".weight")] if name.endswith("lora_magnitude_vector.weight") else name

    theirs = _lr_of(theirs_opt, {id(p): key(n) for n, p in theirs_model.named_parameters()})
    _, adapted = train(adapter, TrainConfig(data=lm_data, steps=1, batch_size=4, lr=LR, loraplus_ratio=RATIO), return_model=True)
    assert len(optimizers) == 1
    ours = _lr_of(optimizers[0], {id(p): n for n, p in adapted.phi_parameters().items()})
    assert ours == theirs
    assert sorted(set(theirs.values())) == [LR, LR * RATIO]
    assert json.load(open(os.path.join(adapter, "train_args.json")))["loraplus_ratio"] == RATIO


def _one_step(base: str, adapter: str, out, data: str, ratio: float | None) -> dict[str, torch.Tensor]:
    run = edited_adapter(adapter, out)
    train(run, TrainConfig(data=data, steps=1, batch_size=4, lr=LR, loraplus_ratio=ratio, warmup_steps=0, schedule="constant"))
    return load_file(os.path.join(run, "adapter_model.safetensors"))


def test_one_step_moves_b_ratio_times_as_far_and_a_as_without(tiny_llama, lm_data, tmp_path):
    adapter = _peft_adapter(tiny_llama, str(tmp_path / "adapter"))
    start = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    plain = _one_step(tiny_llama, adapter, tmp_path / "plain", lm_data, None)
    plus = _one_step(tiny_llama, adapter, tmp_path / "plus", lm_data, RATIO)
    for k, t in start.items():
        d_plain, d_plus = plain[k] - t, plus[k] - t
        assert d_plain.abs().max() > 0, k  # both A and B get a gradient (B ≠ 0)
        want = d_plain * (RATIO if "lora_B" in k else 1.0)
        # AdamW's first step is lr·g/(|g| + eps): the same g in both runs, so exactly the rate's ratio
        assert torch.allclose(d_plus, want, rtol=1e-4, atol=1e-7), (k, (d_plus - want).abs().max())


def test_loraplus_on_another_method_or_a_bad_ratio_is_a_usage_error(tiny_llama, lm_data, tmp_path):
    run = str(tmp_path / "ia3")
    CliRunner().invoke(cli, ["inject", "ia3", tiny_llama, "-o", run, "--quiet"])
    result = CliRunner().invoke(cli, ["train", run, "--data", lm_data, "--steps", "1", "--loraplus-ratio", "4"])
    assert_error(result, 2, "--loraplus-ratio applies to lora runs", os.path.join(run, "train_args.json"))
    full = CliRunner().invoke(cli, ["train", str(tmp_path / "full"), "--full", "--model", tiny_llama, "--data", lm_data, "--loraplus-ratio", "4"])
    assert_error(full, 2, "--loraplus-ratio applies to lora runs", str(tmp_path / "full"))
    lora = str(tmp_path / "lora")
    inject(tiny_llama, "lora", LoraConfig(rank=2), lora)
    for bad in ("0", "-2", "nan"):
        result = CliRunner().invoke(cli, ["train", lora, "--data", lm_data, "--loraplus-ratio", bad])
        assert result.exit_code == 2 and "--loraplus-ratio" in result.stderr, result.stderr


def test_the_groups_keep_phis_order_whatever_the_hash_seed():
    """AdamW's state is saved by position: the faster group must list lora_B in φ's own order
    (a set's order changes with PYTHONHASHSEED, and a resumed run would swap moments)."""
    from peftcli.training.one_pass import _param_groups

    named = {}
    for i in range(40):
        for part in ("lora_A", "lora_B"):
            named[f"base_model.model.layers.{i}.q_proj.{part}.weight"] = torch.nn.Parameter(torch.zeros(4, 4))
    groups = _param_groups(named, 0.0, set(), None, b_lr=1e-2)
    faster = [p for g in groups if g.get("lr") == 1e-2 for p in g["params"]]
    expected = [p for n, p in named.items() if "lora_B" in n]
    assert len(faster) == 40 and all(a is b for a, b in zip(faster, expected))
