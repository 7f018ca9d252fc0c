"""``peftcli inject lora --init eva --init-data FILE``: EVA against PEFT's own.

Reference: PEFT's ``initialize_lora_eva_weights`` on the same tiny base and the same token
batch (peftcli's ``encode``/``collate`` of the same JSONL), its incremental PCA made exact
(full SVD instead of its randomised low-rank one; one batch, which it fits twice before it
stops): the subspace each A spans and the rank (and α) distribution must be PEFT's. The
written adapter is plain LoRA with B = 0: PEFT loads it with the base's logits, and
``peftcli train`` trains it.
"""

from __future__ import annotations

import functools
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
from peftcli.training.batching import collate, encode, load_tokenizer
from peftcli.training.config import TrainConfig
from peftcli.training.data import load_dataset
from peftcli.training.loop import train
from tests.helpers import assert_error, batch, lm_rows

peft = pytest.importorskip("peft")
eva = pytest.importorskip("peft.tuners.lora.eva")

PREFIX = "base_model.model."
RANK, ALPHA, RHO = 4, 8, 2.0


def _write(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _sft_rows(n: int) -> list[dict]:
    """prompt+completion rows: only the completion's tokens reach EVA (PEFT's label mask)."""
    return [{"prompt": " ".join(f"w{(5 * j + i) % 40 + 4}" for j in range(6)), "completion": " ".join(f"w{(7 * j + 2 * i) % 40 + 4}" for j in range(8))}
            for i in range(n)]


def _peft_eva(base: str, data: str, targets: list[str], rank: int = RANK, **extra):
    """PEFT's EVA model on one batch of all of ``data``, its IPCA with a full (exact) SVD."""
    items = encode(load_dataset(data), load_tokenizer(base), 128)
    loader = [collate(items, load_tokenizer(base).pad_token_id)]
    cfg = peft.LoraConfig(r=rank, lora_alpha=ALPHA, target_modules=targets, init_lora_weights="eva", eva_config=peft.EvaConfig(rho=RHO), **extra)
    exact = functools.partial(eva.IncrementalPCA, lowrank=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(load_base_model(base), cfg)
        saved = eva.IncrementalPCA
        eva.IncrementalPCA = lambda **kw: exact(**{k: v for k, v in kw.items() if not k.startswith("lowrank")})
        try:
            eva.initialize_lora_eva_weights(model, dataloader=loader, show_progress_bar=False)
        finally:
            eva.IncrementalPCA = saved
    return model


@pytest.fixture(scope="module", params=["lm", "sft"])
def runs(request, tiny_llama, tmp_path_factory):
    """(base, data, our adapter directory, PEFT's EVA-initialised model)."""
    tmp = tmp_path_factory.mktemp(f"eva-{request.param}")
    data = _write(tmp / "data.jsonl", lm_rows(12) if request.param == "lm" else _sft_rows(12))
    run = str(tmp / "run")
    inject(tiny_llama, "lora", LoraConfig(rank=RANK, alpha=ALPHA, targets="all-linear", init="eva", init_data=data, eva_rho=RHO), run)
    with open(os.path.join(run, "adapter_config.json")) as f:
        targets = [t.rsplit(".", 1)[-1] for t in json.load(f)["target_modules"]]
    return tiny_llama, data, run, _peft_eva(tiny_llama, data, sorted(set(targets) | {"q_proj", "down_proj"}))


def _peft_as(model) -> dict[str, torch.Tensor]:
    return {n[len(PREFIX):-len(".lora_A.default.weight")]: p.detach() for n, p in model.named_parameters() if n.endswith("lora_A.default.weight")}


ALL = [f"model.layers.{i}.{p}" for i in range(2) for p in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
SHARED = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}  # same input as q_proj / gate_proj


def _group(module: str) -> str:
    """Targets that see the same input tensor share their components: q/k/v, gate/up."""
    head, _, last = module.rpartition(".")
    return f"{head}.{SHARED.get(last, last)}"


def _ours(run: str) -> tuple[dict, dict]:
    with open(os.path.join(run, "adapter_config.json")) as f:
        cfg = json.load(f)
    return cfg, {m: (cfg["rank_pattern"].get(m, RANK) if m in cfg["target_modules"] else 0) for m in ALL}


def test_ranks_and_alphas_equal_peft(runs):
    """The rank distribution is PEFT's: per group of targets sharing one input, the same ranks
    (which of q/k/v takes a rank at a tie PEFT leaves to an unstable sort; the group's first
    target, whose components the others share, gets the most in both), 0 for a target dropped;
    α scaled by k/r, as PEFT's adjust_scaling_factors."""
    _, _, run, theirs = runs
    ours_cfg, ours = _ours(run)
    peft_a = _peft_as(theirs)
    peft = {m: peft_a[m].shape[0] if m in peft_a else 0 for m in ALL}
    assert sum(ours.values()) == sum(peft.values()) == RANK * len(ALL)
    for group in sorted({_group(m) for m in ALL}):
        members = [m for m in ALL if _group(m) == group]
        assert sorted(ours[m] for m in members) == sorted(peft[m] for m in members), group
        assert ours[group] == peft[group] == max(ours[m] for m in members)
    assert len(set(ours.values())) > 1  # the distribution is not trivially r everywhere
    theirs_cfg = theirs.peft_config["default"]
    for cfg in (ours_cfg["alpha_pattern"], theirs_cfg.alpha_pattern):
        ranks = ours if cfg is ours_cfg["alpha_pattern"] else peft
        assert {m: float(a) for m, a in cfg.items()} == {m: ALPHA * k / RANK for m, k in ranks.items() if k not in (0, RANK)}
    saved = theirs_cfg.to_dict()  # what PEFT's save_pretrained writes
    assert ours_cfg["init_lora_weights"] == saved["init_lora_weights"] == "eva"
    assert ours_cfg["eva_config"] == saved["eva_config"]


def test_a_spans_peft_subspace(runs):
    """Each A's rows span the subspace PEFT's do (projectors within 1e-4; the leading rows of
    the larger where a tie gave one of a group more), orthonormal; B = 0."""
    _, _, run, theirs = runs
    tensors = load_file(os.path.join(run, "adapter_model.safetensors"))
    peft_a = _peft_as(theirs)
    compared = 0
    for module in ALL:
        key = f"{PREFIX}{module}.lora_A.weight"
        if key not in tensors or module not in peft_a:
            continue
        a, b = tensors[key].double(), tensors[key.replace("lora_A", "lora_B")]
        assert not b.any() and b.shape[1] == a.shape[0]
        assert torch.allclose(a @ a.T, torch.eye(a.shape[0], dtype=torch.float64), atol=1e-5)
        k = min(a.shape[0], peft_a[module].shape[0])
        a, a_theirs = a[:k], peft_a[module][:k].double()
        gap = (a.T @ a - a_theirs.T @ a_theirs).abs().max()
        assert gap <= 1e-4, (module, float(gap))
        compared += 1
    assert compared >= len(ALL) - 4


def test_peft_loads_it_as_base_and_train_trains_it(runs, tmp_path):
    """PEFT reads the adapter (init_lora_weights "eva") with our A's and the base's logits; train runs on it."""
    import shutil

    base, data, run, _ = runs
    inputs = batch(vocab=40)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(load_base_model(base), run)
    tensors = load_file(os.path.join(run, "adapter_model.safetensors"))
    loaded_as = _peft_as(loaded)
    assert loaded_as and len(loaded_as) == sum(k.endswith(".lora_A.weight") for k in tensors)  # PEFT built every LoRA module
    for module, a in loaded_as.items():
        assert torch.equal(a, tensors[f"{PREFIX}{module}.lora_A.weight"])
    with torch.no_grad():
        assert torch.equal(loaded.eval()(**inputs).logits, load_base_model(base)(**inputs).logits)
    copy = str(tmp_path / "run")
    shutil.copytree(run, copy)
    train(copy, TrainConfig(data=data, steps=1, batch_size=4, lr=5e-2, warmup_steps=0, schedule="constant"))
    after = load_file(os.path.join(copy, "adapter_model.safetensors"))
    assert set(after) == set(tensors) and any(not torch.equal(after[k], tensors[k]) for k in tensors)


def test_gpt2_conv1d_equals_peft(tiny_gpt2, tmp_path):
    """GPT-2's Conv1D (weights stored [in, out]): A [k, in] spans PEFT's, ranks PEFT's; PEFT loads it at the base."""
    data = _write(tmp_path / "d.jsonl", lm_rows(8))
    run = str(tmp_path / "run")
    inject(tiny_gpt2, "lora", LoraConfig(rank=2, alpha=ALPHA, targets="c_attn,c_fc", init="eva", init_data=data, eva_rho=RHO), run)
    theirs = _peft_as(_peft_eva(tiny_gpt2, data, ["c_attn", "c_fc"], rank=2, fan_in_fan_out=True))
    tensors = load_file(os.path.join(run, "adapter_model.safetensors"))
    ours = {k[len(PREFIX):-len(".lora_A.weight")]: t.double() for k, t in tensors.items() if k.endswith("lora_A.weight")}
    assert {m: a.shape for m, a in ours.items()} == {m: a.shape for m, a in theirs.items()} and len(ours) >= 2
    for m, a in ours.items():
        assert (a.T @ a - theirs[m].double().T @ theirs[m].double()).abs().max() <= 1e-4, m
    inputs = batch(vocab=40)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(load_base_model(tiny_gpt2), run)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(**inputs).logits, load_base_model(tiny_gpt2)(**inputs).logits)


def test_sft_prompts_do_not_reach_eva(tiny_llama, tmp_path):
    """Layer 0's q_proj sees each token's normed embedding alone (no attention yet): with other
    prompts and the same completions its A is the same, as only completion tokens are used."""
    rows = _sft_rows(10)
    other = [{**r, "prompt": " ".join(f"w{44 + (i + j) % 10}" for j in range(3 + i % 4))} for i, r in enumerate(rows)]
    out = []
    for name, data in (("a", rows), ("b", other)):
        run = str(tmp_path / name)
        cfg = LoraConfig(rank=3, targets="q_proj", layers="0", init="eva", init_data=_write(tmp_path / f"{name}.jsonl", data))
        inject(tiny_llama, "lora", cfg, run)
        out.append(load_file(os.path.join(run, "adapter_model.safetensors")))
    key = f"{PREFIX}model.layers.0.self_attn.q_proj.lora_A.weight"
    assert out[0].keys() == out[1].keys() == {key, key.replace("lora_A", "lora_B")}
    assert torch.allclose(out[0][key], out[1][key], atol=1e-6)


def _invoke(args):
    return CliRunner().invoke(cli, ["inject", "lora", *args])


def test_errors(tiny_llama, tmp_path):
    out = str(tmp_path / "out")
    assert_error(_invoke(["--init", "eva", tiny_llama, "-o", out]), 2, "--init-data", out)
    assert_error(_invoke(["--eva-rho", "3", tiny_llama, "-o", out]), 2, "--eva-rho", out)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert_error(_invoke(["--init", "eva", "--init-data", str(empty), tiny_llama, "-o", out]), 1, "no examples", out)
    short = _write(tmp_path / "short.jsonl", [{"text": "w4 w5 w6"}])
    line = assert_error(_invoke(["--init", "eva", "--init-data", short, tiny_llama, "-o", out]), 1, "tokens", out)
    assert "3 tokens" in line and "= 16" in line  # w4 w5 w6 (no <s>); round(2·8)
    labelled = _write(tmp_path / "cls.jsonl", [{"text": "w4 w5", "label": "a"}, {"text": "w6", "label": "b"}])
    assert_error(_invoke(["--init", "eva", "--init-data", labelled, tiny_llama, "-o", out]), 2, "classification", out)
    assert_error(_invoke(["--init", "eva", "--init-data", short, "--eva-rho", "0.5", tiny_llama, "-o", out]), 2, "--eva-rho", out)
    assert_error(_invoke(["--init", "eva", "--init-data", short, "--dora", tiny_llama, "-o", out]), 2, "--dora", out)
    # 2·32 > min(out, in) = 32 of v_proj (GQA)
    assert_error(_invoke(["--init", "eva", "--init-data", short, "-r", "32", tiny_llama, "-o", out]), 2, "min(out, in)", out)
