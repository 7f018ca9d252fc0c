"""Every key of PEFT's LoraConfig and IA3Config is classified (read, ignored, or refused unless off), and an
adapter that switches on a LoRA variant peftcli does not implement is refused by name by check
and merge alike: folded as plain LoRA it would be a silently different model."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import pytest
from click.testing import CliRunner

from peftcli.cli import cli
from peftcli.methods.lora import config_keys
from tests.helpers import assert_error


@pytest.fixture(scope="module")
def lora(tiny_llama, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("lora_keys") / "lora")
    assert CliRunner().invoke(cli, ["inject", "lora", tiny_llama, "-o", out]).exit_code == 0
    return out


def _with(lora: str, tmp_path, **keys) -> str:
    out = str(tmp_path / "edited")
    shutil.copytree(lora, out)
    path = os.path.join(out, "adapter_config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(keys)
    with open(path, "w") as f:
        json.dump(config, f)
    return out


ON = {
    "alora_invocation_tokens": [5, 6],
    "layer_replication": [[0, 2], [1, 2]],
    "use_qalora": True,
    "megatron_config": {"tensor_model_parallel_size": 2},
    "arrow_config": {"top_k": 2},
    "kasa_config": {"r": 4},
    "monteclora_config": {"n": 2},
    "use_bdlora": {"lora_a_is_blockdiagonal": True},
    "astra_config": {"k": 1},
    "ensure_weight_tying": True,
}


@pytest.mark.parametrize("key", sorted(ON))
def test_a_lora_variant_peftcli_does_not_implement_is_refused_by_name(key, lora, tiny_llama, tmp_path):
    edited = _with(lora, tmp_path, **{key: ON[key]})
    out = str(tmp_path / "merged")
    assert_error(CliRunner().invoke(cli, ["merge", tiny_llama, edited, "-o", out]), 1, f"LoRA adapter config sets {key}, for", out)
    result = CliRunner().invoke(cli, ["check", tiny_llama, edited])
    assert result.exit_code == 1 and f"sets {key}, for" in result.stdout + result.stderr


def test_an_unknown_option_is_refused_unless_it_is_off(lora, tiny_llama, tmp_path):
    edited = _with(lora, tmp_path, future_variant_config={"k": 1})
    assert_error(CliRunner().invoke(cli, ["merge", tiny_llama, edited, "-o", str(tmp_path / "m")]), 1,
                 "sets future_variant_config = {\"k\": 1}, an option peftcli does not know")
    off = _with(lora, tmp_path / "off", future_variant_config=None, alora_invocation_tokens=None, use_qalora=False)
    assert CliRunner().invoke(cli, ["merge", tiny_llama, off, "-o", str(tmp_path / "ok")]).exit_code == 0


def test_layers_pattern_is_read_only_where_peftcli_finds_the_same_layer(lora, tiny_llama, tmp_path):
    odd = _with(lora, tmp_path, layers_to_transform=[0], layers_pattern="self_attn")
    assert_error(CliRunner().invoke(cli, ["merge", tiny_llama, odd, "-o", str(tmp_path / "m")]), 1, "layers_pattern \"self_attn\"")
    common = _with(lora, tmp_path / "common", layers_to_transform=[0, 1], layers_pattern="layers")
    assert CliRunner().invoke(cli, ["merge", tiny_llama, common, "-o", str(tmp_path / "ok")]).exit_code == 0


def test_every_field_of_peft_lora_config_is_classified_or_off_by_default():
    """A PEFT release that adds a LoRA option on by default fails here, not silently in a fold."""
    peft = pytest.importorskip("peft")
    defaults = peft.LoraConfig()
    known = set(config_keys.READ) | set(config_keys.IGNORED) | set(config_keys.OFF)
    for field in dataclasses.fields(peft.LoraConfig):
        if field.name in config_keys.OFF:
            assert config_keys.is_off(getattr(defaults, field.name)), field.name  # PEFT's default passes
        elif field.name not in known:
            assert config_keys.is_off(getattr(defaults, field.name)), f"{field.name}: classify it in config_keys"
    saved = defaults.to_dict()  # what save_pretrained writes: a default config passes the check
    config_keys.check_keys(json.loads(json.dumps(saved, default=str)))


def test_an_ia3_option_peftcli_does_not_know_is_refused(tiny_llama, tmp_path):
    ia3 = str(tmp_path / "ia3")
    assert CliRunner().invoke(cli, ["inject", "ia3", tiny_llama, "-o", ia3]).exit_code == 0
    edited = _with(ia3, tmp_path, future_scaling={"k": 2})
    out = str(tmp_path / "merged")
    assert_error(CliRunner().invoke(cli, ["merge", tiny_llama, edited, "-o", out]), 1, "IA3 adapter config has 'future_scaling'", out)


def test_every_field_of_peft_ia3_config_is_read():
    peft = pytest.importorskip("peft")
    from peftcli.methods.ia3.method import _IA3_KEYS
    from peftcli.methods.vera import ACCEPTED

    assert {f.name for f in dataclasses.fields(peft.IA3Config)} <= set(ACCEPTED) | set(_IA3_KEYS)
