"""PEFT adapter types peftcli reads and folds without injecting them (``READ_FOLD``): PEFT makes
the adapter (random trained values, so the fold is no identity), then ``merge`` equals PEFT's
merge_and_unload, ``check`` passes, ``convert --to diff --dense`` added to the base is the merge,
``inspect`` names the type; what peftcli cannot fold exactly is refused in one line, writing
nothing; inject, attach and train refuse a read-only type by name."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from peftcli.attach import load_adapted, load_base_model
from peftcli.cli import cli
from peftcli.methods import METHODS, READ_FOLD, method_for_adapter_config

peft = pytest.importorskip("peft")


def _run(args):
    result = CliRunner().invoke(cli, args)
    return result.exit_code, result.output


def _peft_adapter(base: str, out: str, config, seed: int = 0) -> dict:
    """PEFT's adapter of ``config`` on ``base`` with random trained values, saved to ``out``;
    returns PEFT's merge_and_unload state dict."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(load_base_model(base), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    model.eval()
    model.save_pretrained(out)
    return {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}


def _edited(src: str, dst: str, config: dict | None = None, tensors: dict | None = None, drop: tuple = ()) -> str:
    os.makedirs(dst)
    cfg = json.load(open(os.path.join(src, "adapter_config.json")))
    json.dump({**cfg, **(config or {})}, open(os.path.join(dst, "adapter_config.json"), "w"))
    t = load_file(os.path.join(src, "adapter_model.safetensors"))
    save_file({k: v for k, v in {**t, **(tensors or {})}.items() if k not in drop}, os.path.join(dst, "adapter_model.safetensors"))
    return dst


def _folds_as_peft(base: str, adapter: str, reference: dict, peft_type: str, tmp_path) -> None:
    """check passes; merge equals PEFT's merge_and_unload; the dense diff added to the base too; inspect names the type."""
    base_sd = load_file(os.path.join(base, "model.safetensors"))
    changed = {n for n in base_sd if not torch.allclose(base_sd[n].float(), reference[n].float(), atol=1e-4)}
    assert changed, "PEFT's merge changed nothing"
    code, out = _run(["check", base, adapter])
    assert code == 0 and "ok" in out, out
    code, out = _run(["merge", base, adapter, "-o", str(tmp_path / "merged"), "--quiet"])
    assert code == 0, out
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert set(merged) == set(base_sd)
    for name, t in merged.items():
        assert torch.allclose(t.float(), reference[name].float(), atol=1e-5, rtol=0), name
    _dense_diff_is_the_merge(base, adapter, base_sd, reference, changed, tmp_path)
    code, out = _run(["inspect", adapter])
    assert code == 0 and peft_type in out, out


def _dense_diff_is_the_merge(base, adapter, base_sd, reference, changed, tmp_path) -> None:
    from peftcli.artifacts.sparse_diff import read_diff

    code, out = _run(["convert", adapter, "--to", "diff", "--dense", "--base", base, "-o", str(tmp_path / "a.diff"), "--quiet"])
    assert code == 0, out
    diff = read_diff(str(tmp_path / "a.diff"))
    try:
        assert changed <= set(diff.names)
        for name in diff.names:
            idx, val = diff.get(name)
            dense = val if idx is None else torch.zeros(base_sd[name].numel()).index_put_((idx.long(),), val.float())
            applied = base_sd[name].float() + dense.float().view(base_sd[name].shape)
            assert torch.allclose(applied, reference[name].float(), atol=1e-5, rtol=0), name
    finally:
        diff.close()


def _refused(base: str, adapter: str, tmp_path, *words: str) -> None:
    """merge refuses the adapter in one line naming ``words`` and writes nothing; check fails it."""
    merged = str(tmp_path / "merged")
    code, out = _run(["merge", base, adapter, "-o", merged])
    line = out.strip()
    assert code != 0 and not os.path.exists(merged), out
    assert "\n" not in line and line.startswith("error: ") and all(w in line for w in words), out
    code, out = _run(["check", base, adapter])
    assert code == 1 and "FAIL" in out, out


def test_read_fold_types_are_a_registry_of_their_own():
    """Declared, not probed: READ_FOLD's methods are read_only, fold, and are no METHODS entry
    (so inject, train, recipes and inspect --budget, which read METHODS, never offer them);
    the test matrices over METHODS leave them out by construction, and this file covers each."""
    assert READ_FOLD and not set(READ_FOLD) & set(METHODS)
    assert all(m.read_only and m.folds and m.name == n for n, m in READ_FOLD.items())
    assert not any(m.read_only for m in METHODS.values())
    from tests import matrices

    covered = {"ln-tuning", "fourierft", "shira", "c3a", "randlora", "miss"}  # the types this file folds against PEFT
    assert set(READ_FOLD) == set(matrices.read_fold_only()) == covered
    assert not set(READ_FOLD) & set(matrices.one_pass())


# -- LN tuning ----------------------------------------------------------------------------------

LN_CASES = {
    "llama-default": ("llama", {}),  # PEFT's own targets for Llama: both RMSNorms of each layer and the final one
    "bert-list": ("bert", dict(target_modules=["LayerNorm"])),  # weight and bias
    "gpt2-regex-exclude": ("gpt2", dict(target_modules=r".*ln_(1|2|f)", exclude_modules=["h.1.ln_2"])),
}


@pytest.fixture(scope="module")
def ln_adapters(tiny_llama, tiny_bert, tiny_gpt2, tmp_path_factory):
    root, models = tmp_path_factory.mktemp("peft-ln"), {"llama": tiny_llama, "bert": tiny_bert, "gpt2": tiny_gpt2}
    return {case: (models[arch], str(root / case), _peft_adapter(models[arch], str(root / case), peft.LNTuningConfig(**kw)))
            for case, (arch, kw) in LN_CASES.items()}


@pytest.mark.parametrize("case", list(LN_CASES))
def test_peft_ln_tuning_adapter_folds_as_peft_merges_it(case, ln_adapters, tmp_path):
    base, adapter, reference = ln_adapters[case]
    _folds_as_peft(base, adapter, reference, "LN_TUNING", tmp_path)


LN0 = "base_model.model.model.layers.0.input_layernorm.ln_tuning_layers.weight"


@pytest.mark.parametrize("edit, words", [
    (dict(drop=(LN0,)), ("model.layers.0.input_layernorm.weight", "targets")),
    (dict(tensors={LN0: torch.ones(32)}), ("input_layernorm", "[32]", "[64]")),
    (dict(config={"ln_mystery_scale": 2.0}), ("ln_mystery_scale", "LN_TUNING")),  # a key PEFT 0.21 does not write
    (dict(config={"target_modules": ["post_attention_layernorm", "norm"]}), ("input_layernorm", "does not target")),
    (dict(tensors={"base_model.model.model.layers.0.mlp.ln_tuning_layers.weight": torch.ones(64)}), ("layers.0.mlp",)),
    (dict(config={"target_modules": None}), ("target_modules",)),
], ids=["missing-tensor", "wrong-shape", "unknown-key", "untargeted-copy", "no-base-tensor", "no-targets"])
def test_an_ln_tuning_adapter_peftcli_cannot_fold_exactly_is_refused_in_one_line(edit, words, ln_adapters, tmp_path):
    base, src, _ = ln_adapters["llama-default"]
    _refused(base, _edited(src, str(tmp_path / "edited"), **edit), tmp_path, *words)


def test_a_read_only_type_is_refused_by_attach_and_inject_by_name(ln_adapters, tiny_llama, tmp_path):
    from peftcli.errors import UsageError

    base, adapter, _ = ln_adapters["llama-default"]
    with pytest.raises(UsageError, match="ln-tuning .* read-and-fold only"):
        load_adapted(base, adapter)
    code, out = _run(["inject", "ln-tuning", tiny_llama, "-o", str(tmp_path / "run")])
    assert code == 2 and out.strip().startswith("error: ln-tuning (LN_TUNING) adapters are read-and-fold only"), out
    assert "\n" not in out.strip()
    assert not os.path.exists(tmp_path / "run")


# -- LoRA with bias "all" / "lora_only" -----------------------------------------------------------

BIAS_CASES = {
    "bert-all": ("bert", dict(r=2, bias="all", target_modules=["query", "value"])),  # LayerNorm and pooler biases too
    "bert-lora-only": ("bert", dict(r=2, bias="lora_only", target_modules=["query", "output.dense"])),
    "gpt2-all-conv1d": ("gpt2", dict(r=2, bias="all", target_modules=["c_attn"], fan_in_fan_out=True)),
    "bert-all-lora-bias": ("bert", dict(r=2, bias="all", lora_bias=True, target_modules=["query", "key"])),
    "llama-lora-only-no-biases": ("llama", dict(r=2, bias="lora_only", target_modules=["q_proj"])),  # nothing to save
}


@pytest.fixture(scope="module")
def bias_adapters(tiny_llama, tiny_bert, tiny_gpt2, tmp_path_factory):
    root, models = tmp_path_factory.mktemp("peft-lora-bias"), {"llama": tiny_llama, "bert": tiny_bert, "gpt2": tiny_gpt2}
    return {case: (models[arch], str(root / case), _peft_adapter(models[arch], str(root / case), peft.LoraConfig(**kw)))
            for case, (arch, kw) in BIAS_CASES.items()}


@pytest.mark.parametrize("case", list(BIAS_CASES))
def test_peft_lora_adapter_with_trained_biases_folds_as_peft_merges_it(case, bias_adapters, tmp_path):
    base, adapter, reference = bias_adapters[case]
    if case.startswith("bert-all"):  # the biases of modules LoRA does not adapt are merged too
        assert not torch.equal(load_file(os.path.join(base, "model.safetensors"))["pooler.dense.bias"], reference["pooler.dense.bias"])
    _folds_as_peft(base, adapter, reference, "LORA", tmp_path)


Q0 = "base_model.model.encoder.layer.0.attention.self.query."


@pytest.mark.parametrize("case, edit, words", [
    ("bert-all", dict(drop=("base_model.model.pooler.dense.bias",)), ("pooler.dense.bias", "saves")),
    ("bert-lora-only", dict(drop=(Q0 + "base_layer.bias",)), ("query.bias",)),
    ("bert-all", dict(tensors={Q0 + "base_layer.bias": torch.ones(32)}), ("query.base_layer.bias", "[32]", "[64]")),
    ("bert-lora-only", dict(tensors={"base_model.model.encoder.layer.0.attention.self.key.bias": torch.ones(64)}), ("key.bias",)),
    ("bert-all", dict(config={"bias": "some"}), ("bias", "'some'")),
], ids=["all-missing", "lora-only-missing", "wrong-shape", "lora-only-untargeted", "unknown-bias"])
def test_a_lora_bias_adapter_peftcli_cannot_fold_exactly_is_refused_in_one_line(case, edit, words, bias_adapters, tmp_path):
    base, src, _ = bias_adapters[case]
    _refused(base, _edited(src, str(tmp_path / "edited"), **edit), tmp_path, *words)


def test_a_lora_bias_adapter_is_refused_by_attach_naming_bias(bias_adapters):
    from peftcli.errors import BadInputError

    base, adapter, _ = bias_adapters["bert-all"]
    with pytest.raises(BadInputError, match="bias='all'.*reads and folds it only"):
        load_adapted(base, adapter)


# -- FourierFT ----------------------------------------------------------------------------------

FOURIER_CASES = {
    "llama-qv": ("llama", dict(n_frequency=50, scaling=100.0, target_modules=["q_proj", "v_proj"])),  # v: 32×64
    "gpt2-conv1d-seed": ("gpt2", dict(n_frequency=40, random_loc_seed=5, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
    "bert-regex": ("bert", dict(n_frequency=30, scaling=20.0, target_modules=r".*\.(query|output\.dense)")),
    "bert-layer1": ("bert", dict(n_frequency=30, target_modules=["query", "value"], layers_to_transform=[1])),
}


@pytest.fixture(scope="module")
def fourier_adapters(tiny_llama, tiny_bert, tiny_gpt2, tmp_path_factory):
    root, models = tmp_path_factory.mktemp("peft-fourierft"), {"llama": tiny_llama, "bert": tiny_bert, "gpt2": tiny_gpt2}
    return {case: (models[arch], str(root / case), _peft_adapter(models[arch], str(root / case), peft.FourierFTConfig(**kw)))
            for case, (arch, kw) in FOURIER_CASES.items()}


@pytest.mark.parametrize("case", list(FOURIER_CASES))
def test_peft_fourierft_adapter_folds_as_peft_merges_it(case, fourier_adapters, tmp_path):
    base, adapter, reference = fourier_adapters[case]
    _folds_as_peft(base, adapter, reference, "FOURIERFT", tmp_path)


@pytest.mark.parametrize("case", list(FOURIER_CASES))
def test_fourierft_frequencies_are_those_peft_draws_bit_for_bit(case, fourier_adapters):
    """PEFT does not save the frequencies: they are drawn again, and equal PEFT's layers' own."""
    from peftcli.methods.read_fold.fourierft import frequencies

    base, adapter, _ = fourier_adapters[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.PeftModel.from_pretrained(load_base_model(base), adapter)
    layers = [m for m in model.modules() if isinstance(m, peft.tuners.fourierft.FourierFTLayer)]
    assert layers
    for layer in layers:
        want = layer.indices["default"]
        got = frequencies(layer.out_features, layer.in_features, layer.fourierft_n_frequency["default"],
                          layer.fourierft_random_loc_seed["default"])
        assert got.dtype == want.dtype and torch.equal(got, want)


F0 = "base_model.model.model.layers.0.self_attn."


@pytest.mark.parametrize("edit, words", [
    (dict(drop=(F0 + "q_proj.fourierft_spectrum",)), ("fourierft_spectrum", "model.layers.0.self_attn.q_proj")),
    (dict(tensors={F0 + "v_proj.fourierft_spectrum": torch.ones(49)}), ("v_proj", "[49]", "n_frequency")),
    (dict(config={"fourier_mystery": 1}), ("fourier_mystery", "FOURIERFT")),
    (dict(config={"n_frequency_pattern": {"q_proj": 20}}), ("n_frequency_pattern",)),
    (dict(config={"bias": "all"}), ("bias",)),
    (dict(tensors={F0 + "k_proj.fourierft_spectrum": torch.ones(50)}), ("k_proj", "does not target")),
    (dict(tensors={F0 + "q_proj.fourierft_spectrum": torch.full((50,), 3e38)}, config={"scaling": 1e30}), ("q_proj", "not finite")),
], ids=["missing-tensor", "wrong-shape", "unknown-key", "n-frequency-pattern", "bias", "untargeted", "overflow"])
def test_a_fourierft_adapter_peftcli_cannot_fold_exactly_is_refused_in_one_line(edit, words, fourier_adapters, tmp_path):
    base, src, _ = fourier_adapters["llama-qv"]
    _refused(base, _edited(src, str(tmp_path / "edited"), **edit), tmp_path, *words)


# -- SHiRA --------------------------------------------------------------------------------------

SHIRA_CASES = {
    "llama-qv": ("llama", dict(r=2, target_modules=["q_proj", "v_proj"], random_seed=3)),  # v: 32×64
    "bert-regex": ("bert", dict(r=1, target_modules=r".*\.(query|output\.dense)", random_seed=7)),
}


@pytest.fixture(scope="module")
def shira_adapters(tiny_llama, tiny_bert, tmp_path_factory):
    root, models = tmp_path_factory.mktemp("peft-shira"), {"llama": tiny_llama, "bert": tiny_bert}
    return {case: (models[arch], str(root / case), _peft_adapter(models[arch], str(root / case), peft.ShiraConfig(**kw)))
            for case, (arch, kw) in SHIRA_CASES.items()}


@pytest.mark.parametrize("case", list(SHIRA_CASES))
def test_peft_shira_adapter_folds_as_peft_merges_it(case, shira_adapters, tmp_path):
    base, adapter, reference = shira_adapters[case]
    _folds_as_peft(base, adapter, reference, "SHIRA", tmp_path)


def test_a_shira_adapter_with_windows_float_indices_folds_alike(shira_adapters, tmp_path):
    """PEFT on Windows saves the positions as float32 (and reads them back as integers)."""
    base, src, reference = shira_adapters["llama-qv"]
    t = load_file(os.path.join(src, "adapter_model.safetensors"))
    adapter = _edited(src, str(tmp_path / "win"), tensors={k: v.float() for k, v in t.items() if k.endswith("shira_indices")})
    _folds_as_peft(base, adapter, reference, "SHIRA", tmp_path)


S0 = "base_model.model.model.layers.0.self_attn."


def _moved(src: str, key: str, row: int) -> dict:
    idx = load_file(os.path.join(src, "adapter_model.safetensors"))[key].clone()
    idx[0, 0] = row
    return {key: idx}


@pytest.mark.parametrize("edit, words", [
    (lambda src: dict(drop=(S0 + "q_proj.shira_indices",)), ("q_proj", "shira_indices")),
    (lambda src: dict(drop=(S0 + "q_proj.shira_weight", S0 + "q_proj.shira_indices")), ("no SHiRA tensors", "q_proj")),
    (lambda src: dict(tensors={S0 + "v_proj.shira_weight": torch.ones(10)}), ("v_proj", "[10]")),
    (lambda src: dict(tensors=_moved(src, S0 + "q_proj.shira_indices", 64)), ("q_proj.shira_indices", "outside")),
    (lambda src: dict(tensors=_moved(src, S0 + "q_proj.shira_indices", -1)), ("q_proj.shira_indices", "outside")),
    (lambda src: dict(config={"shira_mystery": 1}), ("shira_mystery", "SHIRA")),
    (lambda src: dict(config={"mask_type": "custom"}), ("mask_type",)),
], ids=["missing-indices", "missing-module", "wrong-shape", "index-past-end", "negative-index", "unknown-key", "mask-type"])
def test_a_shira_adapter_peftcli_cannot_fold_exactly_is_refused_in_one_line(edit, words, shira_adapters, tmp_path):
    base, src, _ = shira_adapters["llama-qv"]
    _refused(base, _edited(src, str(tmp_path / "edited"), **edit(src)), tmp_path, *words)


# -- C3A ----------------------------------------------------------------------------------------

C3A_CASES = {
    "llama-qv": ("llama", dict(block_size=16, target_modules=["q_proj", "v_proj"], init_weights="gaussian")),  # v: 32×64
    "bert-layer1": ("bert", dict(block_size=32, target_modules=["query", "intermediate.dense"], layers_to_transform=[1])),
}


@pytest.fixture(scope="module")
def c3a_adapters(tiny_llama, tiny_bert, tmp_path_factory):
    root, models = tmp_path_factory.mktemp("peft-c3a"), {"llama": tiny_llama, "bert": tiny_bert}
    return {case: (models[arch], str(root / case), _peft_adapter(models[arch], str(root / case), peft.C3AConfig(**kw)))
            for case, (arch, kw) in C3A_CASES.items()}


@pytest.mark.parametrize("case", list(C3A_CASES))
def test_peft_c3a_adapter_folds_as_peft_merges_it(case, c3a_adapters, tmp_path):
    base, adapter, reference = c3a_adapters[case]
    _folds_as_peft(base, adapter, reference, "C3A", tmp_path)


def test_c3a_circulant_is_the_block_circulant_matrix_of_the_kernel():
    """An independent reference: block (p, q) of C is the circulant matrix whose first row is w[p, q]
    and each next row the one above shifted right by one, C[i, j] = w[p, q, (j - i) mod b]."""
    from peftcli.methods.read_fold.c3a import circulant

    w = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    want = torch.zeros(8, 12, dtype=torch.float64)
    for p in range(2):
        for q in range(3):
            for i in range(4):
                for j in range(4):
                    want[4 * p + i, 4 * q + j] = w[p, q, (j - i) % 4]
    assert torch.allclose(circulant(w), want, atol=1e-12)


C0 = "base_model.model.model.layers.0.self_attn."


@pytest.mark.parametrize("edit, words", [
    (dict(drop=(C0 + "q_proj.c3a_kernel",)), ("c3a_kernel", "model.layers.0.self_attn.q_proj")),
    (dict(tensors={C0 + "v_proj.c3a_kernel": torch.ones(2, 2, 16)}), ("v_proj", "[2, 2, 16]", "[2, 4, 16]")),
    (dict(config={"block_size": 24}), ("block_size 24", "does not divide")),
    (dict(config={"c3a_mystery": 1}), ("c3a_mystery", "C3A")),
    (dict(config={"block_size_pattern": {"q_proj": 8}}), ("block_size_pattern",)),
    (dict(tensors={C0 + "k_proj.c3a_kernel": torch.ones(2, 4, 16)}), ("k_proj", "does not target")),
], ids=["missing-tensor", "wrong-shape", "block-size", "unknown-key", "block-size-pattern", "untargeted"])
def test_a_c3a_adapter_peftcli_cannot_fold_exactly_is_refused_in_one_line(edit, words, c3a_adapters, tmp_path):
    base, src, _ = c3a_adapters["llama-qv"]
    _refused(base, _edited(src, str(tmp_path / "edited"), **edit), tmp_path, *words)


# -- RandLoRA -----------------------------------------------------------------------------------

RANDLORA_CASES = {
    "llama-qv": ("llama", dict(r=4, randlora_alpha=8, target_modules=["q_proj", "v_proj"])),  # v: 32×64, out < in
    "llama-up-down": ("llama", dict(r=5, target_modules=["up_proj", "down_proj"], sparse=True)),  # out > in and out < in, ⌈·⌉
    "gpt2-conv1d": ("gpt2", dict(r=8, randlora_alpha=16, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),
}


@pytest.fixture(scope="module")
def randlora_adapters(tiny_llama, tiny_gpt2, tmp_path_factory):
    root, models = tmp_path_factory.mktemp("peft-randlora"), {"llama": tiny_llama, "gpt2": tiny_gpt2}
    return {case: (models[arch], str(root / case), _peft_adapter(models[arch], str(root / case), peft.RandLoraConfig(**kw)))
            for case, (arch, kw) in RANDLORA_CASES.items()}


@pytest.mark.parametrize("case", list(RANDLORA_CASES))
def test_peft_randlora_adapter_folds_as_peft_merges_it(case, randlora_adapters, tmp_path):
    base, adapter, reference = randlora_adapters[case]
    _folds_as_peft(base, adapter, reference, "RANDLORA", tmp_path)


R0 = "base_model.model.model.layers.0.self_attn."


@pytest.mark.parametrize("edit, words", [
    (dict(drop=("base_model.randlora_A", "base_model.randlora_B")), ("randlora_A", "save_projection")),
    (dict(config={"save_projection": False}), ("save_projection",)),
    (dict(drop=(R0 + "q_proj.randlora_gamma",)), ("q_proj", "randlora_gamma")),
    (dict(tensors={R0 + "v_proj.randlora_lambda": torch.ones(4, 3)}), ("v_proj", "randlora_lambda")),
    # PEFT before 0.22 saves each layer's copy of the bases (this one then differs); 0.22 saves none.
    (dict(tensors={R0 + "q_proj.randlora_A": torch.ones(4, 1, 64)}),
     lambda views: ("q_proj.randlora_A", "differs") if views else ("q_proj", "no copy of the shared bases")),
    (dict(config={"randlora_mystery": 1}), ("randlora_mystery", "RANDLORA")),
    (dict(config={"bias": "all"}), ("bias",)),
], ids=["no-bases", "save-projection-false", "missing-gamma", "lambda-shape", "base-copy-differs", "unknown-key", "bias"])
def test_a_randlora_adapter_peftcli_cannot_fold_exactly_is_refused_in_one_line(edit, words, randlora_adapters, tmp_path):
    base, src, _ = randlora_adapters["llama-qv"]
    if callable(words):
        from peftcli.methods.read_fold.randlora import RandLora

        words = words(RandLora().config_from_adapter(json.load(open(os.path.join(src, "adapter_config.json")))).views)
    _refused(base, _edited(src, str(tmp_path / "edited"), **edit), tmp_path, *words)


# -- MiSS ---------------------------------------------------------------------------------------

MISS_CASES = {
    "llama-miss-remainder": ("llama", dict(r=5, target_modules=["q_proj", "v_proj", "down_proj"])),  # 64 % 5, 128 % 5: remainders
    "llama-bat": ("llama", dict(r=8, init_weights="bat", target_modules=["q_proj", "up_proj"])),
    "bert-mini": ("bert", dict(r=4, init_weights="mini", mini_r=8, target_modules=["query", "intermediate.dense"])),
}


@pytest.fixture(scope="module")
def miss_adapters(tiny_llama, tiny_bert, tmp_path_factory):
    root, models = tmp_path_factory.mktemp("peft-miss"), {"llama": tiny_llama, "bert": tiny_bert}
    return {case: (models[arch], str(root / case), _peft_adapter(models[arch], str(root / case), peft.MissConfig(**kw)))
            for case, (arch, kw) in MISS_CASES.items()}


@pytest.mark.parametrize("case", list(MISS_CASES))
def test_peft_miss_adapter_folds_as_peft_merges_it(case, miss_adapters, tmp_path):
    base, adapter, reference = miss_adapters[case]
    _folds_as_peft(base, adapter, reference, "MISS", tmp_path)


M0 = "base_model.model.model.layers.0.self_attn."


@pytest.mark.parametrize("case, edit, words", [
    ("llama-miss-remainder", dict(drop=(M0 + "q_proj.miss_block",)), ("miss_block", "model.layers.0.self_attn.q_proj")),
    ("llama-miss-remainder", dict(tensors={M0 + "v_proj.miss_block": torch.ones(5, 64)}), ("v_proj", "[5, 64]", "[5, 32]")),
    ("llama-bat", dict(config={"r": 6}), ("bat", "r = 6")),
    ("llama-miss-remainder", dict(config={"miss_mystery": 1}), ("miss_mystery", "MISS")),
    ("llama-miss-remainder", dict(config={"init_weights": "pissa"}), ("init_weights", "'pissa'")),
    ("llama-miss-remainder", dict(tensors={M0 + "k_proj.miss_block": torch.ones(5, 32)}), ("k_proj", "does not target")),
], ids=["missing-tensor", "wrong-shape", "bat-indivisible", "unknown-key", "unknown-init", "untargeted"])
def test_a_miss_adapter_peftcli_cannot_fold_exactly_is_refused_in_one_line(case, edit, words, miss_adapters, tmp_path):
    base, src, _ = miss_adapters[case]
    _refused(base, _edited(src, str(tmp_path / "edited"), **edit), tmp_path, *words)


@pytest.mark.parametrize("peft_type", ["FROBNICATE_TUNING", "VBLORA"])
def test_a_peft_type_peftcli_does_not_fold_is_refused_by_check_and_merge_naming_it(peft_type, ln_adapters, tmp_path):
    base, src, _ = ln_adapters["llama-default"]
    adapter = _edited(src, str(tmp_path / "other"), config={"peft_type": peft_type})
    _refused(base, adapter, tmp_path, peft_type)
    code, out = _run(["check", base, adapter])
    assert f"unsupported adapter method peft_type={peft_type!r}" in out, out
    with pytest.raises(Exception, match=peft_type):
        method_for_adapter_config(json.load(open(os.path.join(adapter, "adapter_config.json"))), adapter)


def test_docs_list_the_read_fold_types_of_the_registry():
    """docs/methods.md's read-and-fold table is READ_FOLD's: name, class and peft_type, in order."""
    text = open(os.path.join(os.path.dirname(__file__), "..", "docs", "methods.md"), encoding="utf-8").read()
    lines = text.split("| type | class |", 1)[1].splitlines()[2:]
    rows = [line.split("|")[1:-1] for line in lines[: lines.index("")]]
    assert [r[0].strip(" `") for r in rows] == list(READ_FOLD)
    for (name, cls, *_, peft_type) in rows:
        m = READ_FOLD[name.strip(" `")]
        assert cls.strip(" `") == f"{type(m).__module__.rsplit('.', 1)[0]}.{type(m).__name__}"
        assert peft_type.strip(" `") == m.peft_type
