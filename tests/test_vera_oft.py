"""VeRA, OFT and HRA: ours load in PEFT with the same outputs (after a training step), PEFT's merge in
peftcli as PEFT's merge_and_unload folds them, and what peftcli does not read is refused in one
line, writing nothing."""

from __future__ import annotations

import json
import os

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from peftcli.attach import load_adapted, load_base_model
from peftcli.cli import cli
from peftcli.injection import inject
from peftcli.methods import METHODS
from tests.helpers import batch, output_tensor

peft = pytest.importorskip("peft")

LAYER0 = "base_model.model.model.layers.0.self_attn."


def _run(args):
    result = CliRunner().invoke(cli, args)
    return result.exit_code, result.output


def _models(tiny_llama, tiny_bert, tiny_gpt2):
    return {"llama": tiny_llama, "bert": tiny_bert, "gpt2": tiny_gpt2}


def _peft_config(peft_type: str, kwargs: dict):
    return {"VERA": peft.VeraConfig, "OFT": peft.OFTConfig, "HRA": peft.HRAConfig}[peft_type](**kwargs)


def _peft_adapter(base: str, out: str, peft_type: str, kwargs: dict, seed: int = 0):
    """A PEFT adapter on ``base`` with random trained parameters (PEFT's init makes ΔW = 0),
    saved to ``out``; returns PEFT's merge_and_unload state dict and the adapted model's outputs."""
    model = peft.get_peft_model(load_base_model(base), _peft_config(peft_type, kwargs))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.eval()
    model.save_pretrained(out)
    with torch.no_grad():
        outputs = output_tensor(model(**batch()))
    merged = {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}
    return merged, outputs


def _one_step(adapted) -> None:
    """One Adam step on a loss of the outputs: φ trained as `peftcli train` trains it."""
    adapted.train()
    params = [p for p in adapted.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=0.2)
    out = output_tensor(adapted(**batch(seed=3))).float()
    # Not a norm of the outputs: BERT's last LayerNorm makes that constant, and its gradient zero.
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(4))).mean().backward()
    opt.step()
    adapted.eval()


def _ours_loads_in_peft(base: str, name: str, opts: dict, tmp_path) -> None:
    run = str(tmp_path / "run")
    budget = inject(base, name, METHODS[name].config_cls(**opts), run, seed=2)
    adapted = load_adapted(base, run)
    assert sum(p.numel() for p in adapted.parameters() if p.requires_grad) == budget.trainable
    inputs = batch()
    with torch.no_grad():
        base_out = output_tensor(load_base_model(base)(**inputs))
        assert torch.allclose(output_tensor(adapted(**inputs)), base_out, atol=1e-6)  # ΔW = 0 at init
    _one_step(adapted)
    with torch.no_grad():
        ours = output_tensor(adapted(**inputs))
    assert not torch.allclose(ours, base_out, atol=1e-4)
    adapted.save(str(tmp_path / "trained"))

    theirs = peft.PeftModel.from_pretrained(load_base_model(base), str(tmp_path / "trained"), is_trainable=True).eval()
    with torch.no_grad():
        assert torch.allclose(ours, output_tensor(theirs(**inputs)), atol=1e-5)
    # PEFT creates the same trainable parameters, shape for shape.
    theirs_phi = {k.replace(".default", ""): tuple(v.shape) for k, v in theirs.named_parameters() if v.requires_grad}
    saved = load_file(os.path.join(tmp_path, "trained", "adapter_model.safetensors"))
    assert {k: tuple(v.shape) for k, v in saved.items() if k.startswith("base_model.model.")} == theirs_phi


def _peft_merges_alike(base: str, adapter: str, reference: dict, theirs, tmp_path) -> None:
    """check passes; merge equals PEFT's merge_and_unload; attached, the outputs are PEFT's."""
    base_sd = load_file(os.path.join(base, "model.safetensors"))
    assert any(not torch.equal(base_sd[n], reference[n]) for n in base_sd), "PEFT's merge changed nothing"
    code, out = _run(["check", base, adapter])
    assert code == 0 and "ok" in out, out
    code, out = _run(["merge", base, adapter, "-o", str(tmp_path / "merged"), "--quiet"])
    assert code == 0, out
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert set(merged) == set(base_sd)
    for name, t in merged.items():
        assert torch.allclose(t.float(), reference[name].float(), atol=1e-5, rtol=0), name
    ours = load_adapted(base, adapter).eval()
    with torch.no_grad():
        assert torch.allclose(output_tensor(ours(**batch())), theirs, atol=1e-5)


def _edited(src: str, dst: str, config: dict | None = None, tensors: dict | None = None, drop: tuple = ()) -> str:
    os.makedirs(dst)
    cfg = json.load(open(os.path.join(src, "adapter_config.json")))
    json.dump({**cfg, **(config or {})}, open(os.path.join(dst, "adapter_config.json"), "w"))
    t = load_file(os.path.join(src, "adapter_model.safetensors"))
    save_file({k: v for k, v in {**t, **(tensors or {})}.items() if k not in drop}, os.path.join(dst, "adapter_model.safetensors"))
    return dst


def _refused(base: str, adapter: str, tmp_path, *words: str) -> None:
    """merge and evaluate-style loading refuse the adapter in one line naming ``words``; merge writes nothing."""
    merged = str(tmp_path / "merged")
    code, out = _run(["merge", base, adapter, "-o", merged])
    assert code != 0 and not os.path.exists(merged), out
    line = out.strip()
    assert "\n" not in line and line.startswith("error: ") and all(w in line for w in words), out
    code, out = _run(["check", base, adapter])
    assert code == 1 and "FAIL" in out, out


# -- VeRA ---------------------------------------------------------------------------------------

VERA_PEFT = {
    "llama-qv": ("llama", dict(r=4, target_modules=["q_proj", "v_proj"])),  # q 64×64, v 32×64: sliced corners
    "llama-all-layer1": ("llama", dict(r=3, target_modules=["k_proj", "o_proj", "up_proj", "down_proj"], layers_to_transform=[1],
                                        d_initial=0.2)),
    "gpt2-conv1d": ("gpt2", dict(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
    "bert-regex": ("bert", dict(r=5, target_modules=r".*\.(query|output\.dense)")),
}


@pytest.fixture(scope="module")
def vera_adapters(tiny_llama, tiny_bert, tiny_gpt2, tmp_path_factory):
    root, models = tmp_path_factory.mktemp("peft-vera"), _models(tiny_llama, tiny_bert, tiny_gpt2)
    return {case: (models[arch], str(root / case), *_peft_adapter(models[arch], str(root / case), "VERA", kw))
            for case, (arch, kw) in VERA_PEFT.items()}


@pytest.mark.parametrize("case", list(VERA_PEFT))
def test_peft_vera_adapter_merges_and_evaluates_as_peft(case, vera_adapters, tmp_path):
    base, adapter, reference, theirs = vera_adapters[case]
    _peft_merges_alike(base, adapter, reference, theirs, tmp_path)


@pytest.mark.parametrize("arch, opts", [
    ("llama", {}), ("llama", {"rank": 8, "targets": "all-linear", "d_initial": 0.05}), ("bert", {"rank": 4, "targets": "all-linear"}),
    ("gpt2", {"rank": 4, "targets": "all-linear"}),
])
def test_our_vera_adapter_trained_a_step_loads_in_peft_with_identical_outputs(arch, opts, tiny_llama, tiny_bert, tiny_gpt2, tmp_path):
    _ours_loads_in_peft(_models(tiny_llama, tiny_bert, tiny_gpt2)[arch], "vera", opts, tmp_path)


def test_injected_vera_projections_are_those_peft_draws(tiny_llama, tmp_path):
    inject(tiny_llama, "vera", METHODS["vera"].config_cls(rank=6, targets="all-linear"), str(tmp_path / "run"), seed=5)
    saved = load_file(str(tmp_path / "run" / "adapter_model.safetensors"))
    theirs = peft.get_peft_model(load_base_model(tiny_llama), peft.VeraConfig(r=6, target_modules="all-linear"))
    assert torch.equal(saved["base_model.vera_A"], theirs.base_model.vera_A["default"])
    assert torch.equal(saved["base_model.vera_B"], theirs.base_model.vera_B["default"])
    assert tuple(saved["base_model.vera_A"].shape) == (6, 128) and tuple(saved["base_model.vera_B"].shape) == (128, 6)


def test_inspect_budget_counts_what_vera_trains(tiny_llama, tmp_path):
    code, out = _run(["inspect", tiny_llama, "--budget", "vera", "--rank", "16", "--targets", "all-linear", "--json"])
    assert code == 0, out
    budget = json.loads(out)["budget"]
    theirs = peft.get_peft_model(load_base_model(tiny_llama), peft.VeraConfig(r=16, target_modules="all-linear"))
    assert budget["trainable_params"] == sum(p.numel() for p in theirs.parameters() if p.requires_grad) > 0
    code, out = _run(["inspect", tiny_llama, "--budget", "vera", "--rank", "16"])
    assert code == 0 and "q_proj" in out and "v_proj" in out, out


@pytest.mark.parametrize("edit, words", [
    (dict(drop=("base_model.vera_A", "base_model.vera_B")), ("vera_A", "save_projection")),
    (dict(config={"save_projection": False}), ("save_projection",)),
    (dict(config={"vera_mystery_scale": 2.0}), ("vera_mystery_scale", "VeRA")),  # a key PEFT 0.21 does not write
    (dict(config={"bias": "all"}), ("bias",)),
    (dict(tensors={LAYER0 + "q_proj.vera_lambda_b": torch.ones(32)}), ("q_proj", "vera_lambda_b")),
    (dict(tensors={LAYER0 + "v_proj.vera_lambda_d": torch.ones(5)}), ("v_proj", "vera_lambda_d")),
    (dict(tensors={"base_model.vera_A": torch.ones(4, 32)}), ("vera_A", "[4, 32]")),
    (dict(tensors={"base_model.vera_B": torch.ones(64, 4) * 1e30, LAYER0 + "q_proj.vera_lambda_b": torch.ones(64) * 1e30}),
     ("q_proj", "not finite")),
], ids=["no-projections", "save-projection-false", "unknown-key", "bias", "lambda-b-shape", "lambda-d-shape", "A-shape", "overflow"])
def test_a_vera_adapter_peftcli_cannot_fold_exactly_is_refused_in_one_line(edit, words, vera_adapters, tmp_path):
    base, src = vera_adapters["llama-qv"][:2]
    adapter = _edited(src, str(tmp_path / "edited"), **edit)
    _refused(base, adapter, tmp_path, *words)


def test_vera_options_are_checked_before_anything_is_written(tiny_llama, tmp_path):
    for args in (["--rank", "0"], ["--dropout", "1.5"], ["--d-initial", "nan"]):
        code, out = _run(["inject", "vera", *args, tiny_llama, "-o", str(tmp_path / "run")])
        assert code == 2 and out.strip().startswith("error: ") and "\n" not in out.strip(), out
        assert not os.path.exists(tmp_path / "run")


# -- OFT ----------------------------------------------------------------------------------------

OFT_PEFT = {
    "llama-qv-neumann": ("llama", dict(oft_block_size=8, target_modules=["q_proj", "v_proj"])),  # PEFT's default series
    "llama-r-exact": ("llama", dict(r=4, oft_block_size=0, use_cayley_neumann=False, target_modules="all-linear")),
    "llama-terms-layer1": ("llama", dict(oft_block_size=16, num_cayley_neumann_terms=3, target_modules=["o_proj", "down_proj"],
                                         layers_to_transform=[1])),
    "bert-exclude": ("bert", dict(oft_block_size=32, target_modules=["query", "value", "dense"], exclude_modules=["output.dense"])),
}




@pytest.fixture(scope="module")
def oft_adapters(tiny_llama, tiny_bert, tiny_gpt2, tmp_path_factory):
    root, models = tmp_path_factory.mktemp("peft-oft"), _models(tiny_llama, tiny_bert, tiny_gpt2)
    return {case: (models[arch], str(root / case), *_peft_adapter(models[arch], str(root / case), "OFT", kw))
            for case, (arch, kw) in OFT_PEFT.items()}


@pytest.mark.parametrize("case", list(OFT_PEFT))
def test_peft_oft_adapter_merges_and_evaluates_as_peft(case, oft_adapters, tmp_path):
    base, adapter, reference, theirs = oft_adapters[case]
    _peft_merges_alike(base, adapter, reference, theirs, tmp_path)


@pytest.mark.parametrize("arch, opts", [
    ("llama", {}), ("llama", {"block_size": 8, "targets": "all-linear", "neumann_terms": 4}),
    ("llama", {"blocks": 2, "exact_cayley": True}), ("bert", {"block_size": 16, "targets": "all-linear"}),
])
def test_our_oft_adapter_trained_a_step_loads_in_peft_with_identical_outputs(arch, opts, tiny_llama, tiny_bert, tiny_gpt2, tmp_path):
    _ours_loads_in_peft(_models(tiny_llama, tiny_bert, tiny_gpt2)[arch], "oft", opts, tmp_path)


def test_inspect_budget_counts_what_oft_trains(tiny_llama):
    code, out = _run(["inspect", tiny_llama, "--budget", "oft", "--block-size", "16", "--targets", "all-linear", "--json"])
    assert code == 0, out
    budget = json.loads(out)["budget"]
    theirs = peft.get_peft_model(load_base_model(tiny_llama), peft.OFTConfig(oft_block_size=16, target_modules="all-linear"))
    assert budget["trainable_params"] == sum(p.numel() for p in theirs.parameters() if p.requires_grad) > 0


@pytest.mark.parametrize("edit, words", [
    (dict(config={"coft": True}), ("coft",)),
    (dict(config={"block_share": True}), ("block_share",)),
    (dict(config={"bias": "oft_only"}), ("bias",)),
    (dict(config={"oft_mystery": 1}), ("oft_mystery", "OFT")),  # a key PEFT 0.21 does not write
    (dict(config={"peft_version": "0.17.1"}), ("use_cayley_neumann", "0.18")),  # another Neumann series
    (dict(config={"oft_block_size": 12}), ("12", "q_proj")),  # PEFT would silently use another block size
    (dict(config={"oft_block_size": 4}), ("oft_R.weight", "[8, 28]")),  # tensors of another block size
    (dict(tensors={LAYER0 + "q_proj.oft_R.weight": torch.full((8, 28), 1e20)}), ("q_proj", "not finite")),
], ids=["coft", "block-share", "bias", "unknown-key", "old-neumann", "non-dividing", "shape", "overflow"])
def test_an_oft_adapter_peftcli_cannot_fold_exactly_is_refused_in_one_line(edit, words, oft_adapters, tmp_path):
    base, src = oft_adapters["llama-qv-neumann"][:2]
    adapter = _edited(src, str(tmp_path / "edited"), **edit)
    _refused(base, adapter, tmp_path, *words)


@pytest.mark.parametrize("args, words", [
    (["--block-size", "12"], ("12", "does not divide")), (["--block-size", "8", "--blocks", "2"], ("blocks",)),
    (["--targets", "c_attn"], ("Conv1D",)),
])
def test_oft_options_are_checked_before_anything_is_written(args, words, tiny_llama, tiny_gpt2, tmp_path):
    base = tiny_gpt2 if "c_attn" in args else tiny_llama
    code, out = _run(["inject", "oft", *args, base, "-o", str(tmp_path / "run")])
    line = out.strip()
    assert code == 2 and line.startswith("error: ") and "\n" not in line and all(w in line for w in words), out
    assert not os.path.exists(tmp_path / "run")


# -- HRA ----------------------------------------------------------------------------------------

HRA_PEFT = {
    "llama-qv": ("llama", dict(r=4, target_modules=["q_proj", "v_proj"])),
    "llama-gs-odd": ("llama", dict(r=3, apply_GS=True, target_modules="all-linear")),  # Gram-Schmidt, an odd rank
    "bert-exclude-layer0": ("bert", dict(r=2, target_modules=["query", "dense"], exclude_modules=["output.dense"],
                                         layers_to_transform=[0])),
}


@pytest.fixture(scope="module")
def hra_adapters(tiny_llama, tiny_bert, tiny_gpt2, tmp_path_factory):
    root, models = tmp_path_factory.mktemp("peft-hra"), _models(tiny_llama, tiny_bert, tiny_gpt2)
    return {case: (models[arch], str(root / case), *_peft_adapter(models[arch], str(root / case), "HRA", kw))
            for case, (arch, kw) in HRA_PEFT.items()}


@pytest.mark.parametrize("case", list(HRA_PEFT))
def test_peft_hra_adapter_merges_and_evaluates_as_peft(case, hra_adapters, tmp_path):
    base, adapter, reference, theirs = hra_adapters[case]
    _peft_merges_alike(base, adapter, reference, theirs, tmp_path)


@pytest.mark.parametrize("arch, opts", [("llama", {}), ("llama", {"rank": 2, "targets": "all-linear"}), ("bert", {"rank": 4, "targets": "all-linear"})])
def test_our_hra_adapter_trained_a_step_loads_in_peft_with_identical_outputs(arch, opts, tiny_llama, tiny_bert, tiny_gpt2, tmp_path):
    _ours_loads_in_peft(_models(tiny_llama, tiny_bert, tiny_gpt2)[arch], "hra", opts, tmp_path)


def test_inspect_budget_counts_what_hra_trains(tiny_llama):
    code, out = _run(["inspect", tiny_llama, "--budget", "hra", "--rank", "4", "--targets", "all-linear", "--json"])
    assert code == 0, out
    theirs = peft.get_peft_model(load_base_model(tiny_llama), peft.HRAConfig(r=4, target_modules="all-linear"))
    assert json.loads(out)["budget"]["trainable_params"] == sum(p.numel() for p in theirs.parameters() if p.requires_grad) > 0


@pytest.mark.parametrize("edit, words", [
    (dict(config={"bias": "hra_only"}), ("bias",)),
    (dict(config={"hra_mystery": 1}), ("hra_mystery", "HRA")),  # a key PEFT 0.21 does not write
    (dict(config={"r": 2}), ("hra_u", "[64, 2]")),
    (dict(tensors={LAYER0 + "q_proj.hra_u": torch.zeros(64, 4)}), ("q_proj", "not finite")),  # û = u/‖u‖ of a zero column
], ids=["bias", "unknown-key", "rank", "zero-column"])
def test_an_hra_adapter_peftcli_cannot_fold_exactly_is_refused_in_one_line(edit, words, hra_adapters, tmp_path):
    base, src = hra_adapters["llama-qv"][:2]
    adapter = _edited(src, str(tmp_path / "edited"), **edit)
    _refused(base, adapter, tmp_path, *words)


@pytest.mark.parametrize("args, words", [(["--rank", "3"], ("odd",)), (["--targets", "c_attn"], ("Conv1D",))])
def test_hra_options_are_checked_before_anything_is_written(args, words, tiny_llama, tiny_gpt2, tmp_path):
    base = tiny_gpt2 if "c_attn" in args else tiny_llama
    code, out = _run(["inject", "hra", *args, base, "-o", str(tmp_path / "run")])
    line = out.strip()
    assert code == 2 and line.startswith("error: ") and "\n" not in line and all(w in line for w in words), out
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("method, case", [("vera", "gpt2-conv1d"), ("oft", "llama-r-exact"), ("hra", "llama-gs-odd")])
def test_convert_to_a_dense_diff_writes_what_peft_merges(method, case, vera_adapters, oft_adapters, hra_adapters, tmp_path):
    from peftcli.artifacts.sparse_diff import read_diff

    base, adapter, reference, _ = {"vera": vera_adapters, "oft": oft_adapters, "hra": hra_adapters}[method][case]
    code, out = _run(["convert", adapter, "--to", "diff", "--dense", "--base", base, "-o", str(tmp_path / "a.diff"), "--quiet"])
    assert code == 0, out
    base_sd = load_file(os.path.join(base, "model.safetensors"))
    changed = {n for n in base_sd if not torch.equal(base_sd[n], reference[n])}
    diff = read_diff(str(tmp_path / "a.diff"))
    try:
        assert changed and set(diff.names) == changed
        for name in changed:
            idx, val = diff.get(name)
            dense = val if idx is None else torch.zeros(base_sd[name].numel()).index_put_((idx.long(),), val.float())
            assert torch.allclose(dense.float().view(base_sd[name].shape), reference[name] - base_sd[name], atol=1e-5, rtol=0), name
    finally:
        diff.close()
