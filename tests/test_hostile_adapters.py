"""Adapters that are wrong in ways the reader used to accept: every command refuses them alike.

Each case edits a valid adapter of the tiny Llama (in tmp_path) and is then read by ``check``,
``merge`` and ``attach_adapter``: all three refuse it with a one-line error naming the same
thing (the key, module or option), where merge used to write a model ("wrote ... 4 of 21
tensors changed") or crash with an internal error.
"""

from __future__ import annotations

import math

import pytest
import torch
from click.testing import CliRunner

from peftcli.attach import attach_adapter, load_base_model
from peftcli.cli import cli
from peftcli.errors import BadInputError
from peftcli.injection import inject
from peftcli.methods.ia3 import IA3Config
from peftcli.methods.lora import LoraConfig
from tests.helpers import edited_adapter

P = "base_model.model."
Q0 = P + "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def adapters(tiny_llama, tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile-adapters")
    inject(tiny_llama, "lora", LoraConfig(rank=2), str(d / "lora"))
    inject(tiny_llama, "ia3", IA3Config(), str(d / "ia3"))
    return {"lora": str(d / "lora"), "ia3": str(d / "ia3")}


def _trained(t):
    """Non-zero B's, so that a ΔW exists to be wrong."""
    g = torch.Generator().manual_seed(0)
    for k in t:
        if k.endswith("lora_B.weight"):
            t[k] = torch.randn(t[k].shape, generator=g)


def _extra_module(path, d_out=64, d_in=64):
    def edit(t):
        _trained(t)
        t[f"{P}{path}.lora_A.weight"] = torch.ones(2, d_in)
        t[f"{P}{path}.lora_B.weight"] = torch.ones(d_out, 2)

    return edit


# name: (source adapter, tensor edit, config edit, text both check and merge must name)
CASES = {
    "bool-weights": ("lora", lambda t: t.update({k: v != 0 for k, v in t.items()}), None, "is BOOL, not floating-point"),
    "int64-weights": ("lora", lambda t: t.update({k: v.long() for k, v in t.items()}), None, "is I64, not floating-point"),
    # o_proj exists in the base, but target_modules (q_proj, v_proj) does not select it: PEFT
    # would ignore these tensors, so merging them would give another model than PEFT's.
    "untargeted-module": ("lora", _extra_module("model.layers.0.self_attn.o_proj"), None, "model.layers.0.self_attn.o_proj"),
    "no-such-module": ("lora", _extra_module("model.layers.0.mlp.nonexistent"), None, "model.layers.0.mlp.nonexistent"),
    "empty-target-modules": ("lora", _trained, lambda c: c.update(target_modules=[]), "'target_modules' is empty"),
    "alpha-1e300": ("lora", _trained, lambda c: c.update(lora_alpha=1e300), "lora_alpha/r = 5e+299 does not fit a float32"),
    # A scaling that fits float32, on weights whose scaled product does not.
    "alpha-1e30": ("lora", lambda t: t.update({k: torch.full_like(v, 1e5) for k, v in t.items()}),
                   lambda c: c.update(lora_alpha=1e30), "is not finite in float32"),
    "modules-to-save-naming-nothing": ("lora", _trained, lambda c: c.update(modules_to_save=["nothing_here"]),
                                       "modules_to_save names nothing_here"),
    "ia3-feedforward-outside-targets": ("ia3", None, lambda c: c.update(feedforward_modules=["model.layers.0.mlp.gate_proj"]),
                                        "'feedforward_modules' names model.layers.0.mlp.gate_proj"),
    "ia3-empty-target-modules": ("ia3", None, lambda c: c.update(target_modules=[]), "'target_modules' is empty"),
    "0-d-lora-weight": ("lora", lambda t: t.update({Q0 + ".lora_A.weight": torch.tensor(1.0)}), None, "q_proj.lora_A.weight: shape [], expected"),
    "1-d-lora-weight": ("lora", lambda t: t.update({Q0 + ".lora_B.weight": torch.ones(64)}), None, "q_proj.lora_B.weight: shape [64], expected"),
}


def _one_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr and "internal error" not in result.stderr, result.stderr
    return lines[0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_check_merge_and_attach_refuse_alike(case, adapters, tiny_llama, tmp_path):
    source, tensors, config, needle = CASES[case]
    bad = edited_adapter(adapters[source], tmp_path / "bad", tensors=tensors, config=config)

    checked = CliRunner().invoke(cli, ["check", tiny_llama, bad])
    assert checked.exit_code == 1, checked.output
    assert needle in checked.stdout + checked.stderr, checked.stdout

    out = tmp_path / "merged"
    merged = CliRunner().invoke(cli, ["merge", tiny_llama, bad, "-o", str(out)])
    assert merged.exit_code == 1, merged.output
    assert needle in _one_error_line(merged)
    assert not out.exists()

    with pytest.raises(BadInputError) as info:
        attach_adapter(load_base_model(tiny_llama), bad)
    assert needle in info.value.message


def test_a_valid_adapter_still_passes_every_command(adapters, tiny_llama, tmp_path):
    """The control: the unedited adapters (with a trained B) are accepted by check, merge and attach."""
    good = edited_adapter(adapters["lora"], tmp_path / "good", tensors=_trained)
    for path in (good, adapters["ia3"]):
        assert CliRunner().invoke(cli, ["check", tiny_llama, path]).exit_code == 0
        merged = CliRunner().invoke(cli, ["merge", tiny_llama, path, "-o", str(tmp_path / ("m" + path[-3:]))])
        assert merged.exit_code == 0, merged.output
        attach_adapter(load_base_model(tiny_llama), path)


def test_the_scaled_update_bound_refuses_only_what_overflows(adapters, tiny_llama, tmp_path):
    """A large but representable ΔW passes (the bound is not a limit on α): s·B·A is compared
    with float32's range, computed exactly where the cheap bound s·r·max|B|·max|A| exceeds it."""
    big = 1e15  # s = 5e14; with |A|,|B| = 1e5 and r = 2 the bound 1e25·... fits float32
    ok = edited_adapter(
        adapters["lora"], tmp_path / "ok", tensors=lambda t: t.update({k: torch.full_like(v, 1e5) for k, v in t.items()}),
        config=lambda c: c.update(lora_alpha=big),
    )
    assert 2 * (big / 2) * 1e5 * 1e5 < 3.4e38 and math.isfinite(big)
    attach_adapter(load_base_model(tiny_llama), ok)
