"""LoRA's rank_pattern / alpha_pattern: PEFT's adapters with them merged and attached as PEFT
reads them, inject's --rank-pattern/--alpha-pattern written so that PEFT loads them, the
matching rule against PEFT's own ``get_pattern_key``, and the refusals."""

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
from peftcli.errors import UsageError
from peftcli.injection import inject
from peftcli.merging.engine import merge
from peftcli.methods import rank_patterns
from peftcli.methods.lora import LoraConfig
from peftcli.training.config import TrainConfig
from peftcli.training.loop import train
from tests.helpers import assert_error, batch, edited_adapter, lm_rows, output_tensor, randomize_

peft = pytest.importorskip("peft")

# q_proj of layer 0 rank 6, every v_proj rank 2, o_proj alpha 3; the rest r=4, alpha 8.
RANKS = {r"layers\.0\.self_attn\.q_proj": 6, "v_proj": 2}
ALPHAS = {"o_proj": 3}


def _forward(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return output_tensor(model(**inputs))


def _peft_load(base: str, adapter: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(load_base_model(base), adapter).eval()


@pytest.fixture(scope="module", params=["lora", "rslora"])
def peft_adapter(request, tiny_llama, tmp_path_factory):
    """(adapter dir, PEFT's logits, PEFT's merged state dict) of a PEFT LoRA with patterns, B random."""
    out = str(tmp_path_factory.mktemp(request.param) / "adapter")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"], rank_pattern=RANKS,
                          alpha_pattern=ALPHAS, use_rslora=request.param == "rslora")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(load_base_model(tiny_llama), cfg)
    randomize_([p for n, p in model.named_parameters() if "lora_" in n], seed=1, scale=0.1)
    model.save_pretrained(out)
    theirs = _peft_load(tiny_llama, out)
    logits = _forward(theirs, batch())
    merged = {k: v.detach().clone() for k, v in theirs.merge_and_unload().state_dict().items()}
    return out, logits, merged


def test_peft_adapter_has_the_pattern_ranks(peft_adapter):
    tensors = load_file(os.path.join(peft_adapter[0], "adapter_model.safetensors"))
    a = {k.split("model.layers.")[1].split(".lora_A")[0]: t.shape[0] for k, t in tensors.items() if "lora_A" in k}
    assert a == {"0.self_attn.q_proj": 6, "1.self_attn.q_proj": 4, "0.self_attn.v_proj": 2, "1.self_attn.v_proj": 2,
                 "0.self_attn.o_proj": 4, "1.self_attn.o_proj": 4}


def test_merge_equals_peft_merge_and_unload(tiny_llama, peft_adapter, tmp_path):
    adapter, _, theirs = peft_adapter
    merge(tiny_llama, [adapter], str(tmp_path / "merged"))
    ours = load_file(str(tmp_path / "merged" / "model.safetensors"))
    stored = load_file(os.path.join(tiny_llama, "model.safetensors"))
    changed = set()
    for name, t in ours.items():
        assert torch.allclose(t, theirs[name], atol=1e-5), (name, (t - theirs[name]).abs().max())
        if not torch.equal(t, stored[name]):
            changed.add(name.split(".")[-2])
    assert changed == {"q_proj", "v_proj", "o_proj"}


def test_attached_forward_equals_peft(tiny_llama, peft_adapter):
    adapter, theirs, _ = peft_adapter
    ours = _forward(load_adapted(tiny_llama, adapter).eval(), batch())
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()


def test_alpha_pattern_is_not_ignored(tiny_llama, peft_adapter, tmp_path):
    """Not vacuous: without alpha_pattern o_proj's scale is 8/4, not 3/4, and the logits differ."""
    adapter, theirs, _ = peft_adapter
    edited = edited_adapter(adapter, tmp_path / "no-alpha", config=lambda c: c.update(alpha_pattern={}))
    ours = _forward(load_adapted(tiny_llama, edited).eval(), batch())
    assert not torch.allclose(ours, theirs, atol=1e-3)


def test_matching_is_peft_get_pattern_key():
    """The 0.15-on reading against PEFT's own function, on keys whose readings differ."""
    from peft.utils.other import get_pattern_key

    keys = [r"^q_proj", "layers.1.self_attn.q_proj", r"model\.layers\.0\.self_attn\.v_proj", "o_proj|k_proj", "a)|(v_proj",
            r"layers\.(0|1)\.mlp\..*", "proj"]
    modules = [f"model.layers.{i}.{m}" for i in (0, 1) for m in ("self_attn.q_proj", "self_attn.v_proj", "self_attn.k_proj",
                                                                  "self_attn.o_proj", "mlp.up_proj")] + ["q_proj"]
    for i in range(len(keys)):
        pattern = {k: n + 1 for n, k in enumerate(keys[i:] + keys[:i])}  # every key first once
        for module in modules:
            want = pattern.get(get_pattern_key(list(pattern), module), 0)
            assert rank_patterns.values(tuple(pattern.items()), (), module, 0, 0, rank_patterns.CURRENT)[0] == want, (pattern, module)


def test_adapter_without_peft_version_is_read_only_where_releases_agree(tiny_llama, peft_adapter, tmp_path):
    adapter, theirs, _ = peft_adapter
    assert "peft_version" in json.load(open(os.path.join(adapter, "adapter_config.json")))
    # PEFT 0.14 matches ".*\.{key}$": the same modules for these keys, so no version is needed.
    plain = edited_adapter(adapter, tmp_path / "no-version", config=lambda c: c.pop("peft_version"))
    assert torch.allclose(_forward(load_adapted(tiny_llama, plain).eval(), batch()), theirs, atol=1e-5)
    # PEFT before 0.14 took one key for both dicts: layer 0's q_proj matches rank_pattern's key
    # first, which alpha_pattern lacks, so it kept alpha 8 there where PEFT 0.15 on gives it 3.
    both = edited_adapter(adapter, tmp_path / "both", config=lambda c: (c.pop("peft_version"), c.update(alpha_pattern={"q_proj": 3})))
    result = CliRunner().invoke(cli, ["merge", tiny_llama, both, "-o", str(tmp_path / "m")])
    assert_error(result, 1, "PEFT releases read rank_pattern/alpha_pattern differently for model.layers.0.self_attn.q_proj")


def test_injected_patterns_train_and_load_in_peft(tiny_llama, tmp_path):
    data = tmp_path / "lm.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in lm_rows(16)))
    run = str(tmp_path / "run")
    cfg = LoraConfig(rank=4, targets="all-linear", rank_pattern=r"layers\.0\..*=2,v_proj=3", alpha_pattern="q_proj=5", rslora=True)
    budget = inject(tiny_llama, "lora", cfg, run)
    written = json.load(open(os.path.join(run, "adapter_config.json")))
    # layer 0's q_proj: a rank regex and another alpha regex, which PEFT before 0.14 read as one
    # key (alpha 8 there), so each changed module is written by its whole path instead
    assert written["alpha_pattern"]["model.layers.0.self_attn.q_proj"] == 5
    assert written["rank_pattern"]["model.layers.0.self_attn.q_proj"] == 2
    assert all(k.startswith("model.layers.") for k in [*written["rank_pattern"], *written["alpha_pattern"]])
    train(run, TrainConfig(data=str(data), steps=1, batch_size=4, lr=1e-2))
    tensors = load_file(os.path.join(run, "adapter_model.safetensors"))
    ranks = {k: t.shape[0] for k, t in tensors.items() if k.endswith("lora_A.weight")}
    assert ranks["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] == 2  # the first regex wins
    assert ranks["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"] == 3
    assert ranks["base_model.model.model.layers.1.mlp.up_proj.lora_A.weight"] == 4
    assert sum(t.numel() for t in tensors.values()) == budget.trainable
    assert all(t.abs().max() > 0 for k, t in tensors.items() if "lora_B" in k)  # trained: B moved off zero
    ours = _forward(load_adapted(tiny_llama, run).eval(), batch())
    theirs_model = _peft_load(tiny_llama, run)
    scaling = {n: m.scaling["default"] for n, m in theirs_model.named_modules() if isinstance(getattr(m, "scaling", None), dict)}
    assert scaling["base_model.model.model.layers.1.self_attn.q_proj"] == pytest.approx(5 / 4**0.5)
    assert scaling["base_model.model.model.layers.0.self_attn.q_proj"] == pytest.approx(5 / 2**0.5)
    assert scaling["base_model.model.model.layers.1.self_attn.v_proj"] == pytest.approx(8 / 3**0.5)
    assert torch.allclose(ours, _forward(theirs_model, batch()), atol=1e-5)


def test_plain_lora_config_is_unchanged_by_the_options(tiny_llama, tmp_path):
    inject(tiny_llama, "lora", LoraConfig(rank=4), str(tmp_path / "run"))
    written = json.load(open(tmp_path / "run" / "adapter_config.json"))
    assert written["rank_pattern"] == {} and written["alpha_pattern"] == {}
    from safetensors import safe_open

    with safe_open(str(tmp_path / "run" / "adapter_model.safetensors"), "pt") as f:
        assert "pattern" not in f.metadata()["peftcli.options"]


@pytest.mark.parametrize("args, message", [
    (["--rank-pattern", "nothing_here=2"], "--rank-pattern regex 'nothing_here' matches none of the 4 target modules"),
    (["--alpha-pattern", "up_proj=2"], "--alpha-pattern regex 'up_proj' matches none"),
    (["--rank-pattern", "q_proj=0"], "'q_proj=0': '0' is not a positive whole rank"),
    (["--rank-pattern", "q_proj=-3"], "'q_proj=-3': '-3' is not a positive whole rank"),
    (["--rank-pattern", "q_proj=2.5"], "'2.5' is not a positive whole rank"),
    (["--alpha-pattern", "q_proj=nan"], "'nan' is not a positive finite alpha"),
    (["--rank-pattern", "q_proj"], "--rank-pattern entry 'q_proj' is not REGEX=VALUE"),
    (["--rank-pattern", "q_proj=2,"], "--rank-pattern entry '' is not REGEX=VALUE"),
    (["--rank-pattern", "q_pr(oj=2"], "q_pr(oj"),
    (["--rank-pattern", "q_proj=100"], "--rank-pattern rank 100 is larger than min(out, in) = 64"),
])
def test_bad_patterns_are_one_line_usage_errors(tiny_llama, tmp_path, args, message):
    out = str(tmp_path / "run")
    result = CliRunner().invoke(cli, ["inject", "lora", "--rank", "4", *args, tiny_llama, "-o", out])
    assert_error(result, 2, message, out)


@pytest.mark.parametrize("key, value, message", [
    ("rank_pattern", {"q_proj": 0}, "'rank_pattern' must map module patterns to ranks"),
    ("rank_pattern", {"q_proj": 2.0}, "'rank_pattern' must map module patterns to ranks"),
    ("alpha_pattern", {"q_proj": -1}, "'alpha_pattern' must map module patterns to alphas"),
    ("alpha_pattern", ["q_proj"], "'alpha_pattern' must be a JSON object"),
    ("rank_pattern", {"q_pr(oj": 2}, "q_pr(oj"),
])
def test_bad_adapter_patterns_are_refused(tiny_llama, peft_adapter, tmp_path, key, value, message):
    edited = edited_adapter(peft_adapter[0], tmp_path / "bad", config=lambda c: c.update({key: value}))
    result = CliRunner().invoke(cli, ["merge", tiny_llama, edited, "-o", str(tmp_path / "m")])
    assert_error(result, 1, message, str(tmp_path / "m"))


def test_python_api_takes_peft_dicts(tiny_llama, tmp_path):
    from_dict = LoraConfig(rank=4, rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 3})
    from_text = LoraConfig(rank=4, rank_pattern="v_proj=2", alpha_pattern="q_proj=3")
    assert (from_dict.ranks, from_dict.alphas) == (from_text.ranks, from_text.alphas) == ((("v_proj", 2),), (("q_proj", 3.0),))
    inject(tiny_llama, "lora", from_dict, str(tmp_path / "run"))
    written = json.load(open(tmp_path / "run" / "adapter_config.json"))
    assert (written["rank_pattern"], written["alpha_pattern"]) == ({"v_proj": 2}, {"q_proj": 3})
    for bad in ({"v_proj": 2.0}, {"v_proj": True}, {"v_proj": 0}, {}):
        with pytest.raises(UsageError, match="rank_pattern"):
            LoraConfig(rank=4, rank_pattern=bad)
