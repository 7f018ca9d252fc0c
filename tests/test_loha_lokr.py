"""LoHa and LoKr: PEFT's adapters merge, check, convert and inspect in peftcli as PEFT folds them,
ours load in PEFT with the same outputs, and what peftcli does not fold is refused by name."""

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
from tests.helpers import batch, output_tensor, randomize_

peft = pytest.importorskip("peft")

LLAMA_LAYER0 = "model.layers.0.self_attn"
# (method, PEFT config kwargs): each changes the math or the layout of φ.
PEFT_CASES = {
    "loha-qv": ("LOHA", dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"])),
    "loha-all-patterns": ("LOHA", dict(
        r=2, alpha=3, target_modules="all-linear",
        rank_pattern={"gate_proj": 5}, alpha_pattern={f"{LLAMA_LAYER0}.k_proj": 7},
    )),
    "loha-layer1": ("LOHA", dict(r=3, alpha=5, target_modules=["o_proj", "down_proj"], layers_to_transform=[1])),
    # r = 8 on 64 = 8·8 and 32 = 4·8: full w1 and w2, scaled by α/r all the same.
    "lokr-full": ("LOKR", dict(r=8, alpha=4, target_modules=["q_proj", "v_proj", "up_proj"])),
    "lokr-decompose-both": ("LOKR", dict(r=1, alpha=3, decompose_both=True, target_modules="all-linear")),
    "lokr-factor": ("LOKR", dict(r=2, alpha=2, decompose_factor=4, target_modules=["k_proj", "down_proj"],
                                 rank_pattern={"down_proj": 3}, alpha_pattern={"k_proj": 5})),
    "lokr-factor-nondividing": ("LOKR", dict(r=1, alpha=1, decompose_factor=3, decompose_both=True, target_modules=["q_proj", "down_proj"])),
}


def _run(args):
    result = CliRunner().invoke(cli, args)
    return result.exit_code, result.output


def _peft_adapter(base: str, out: str, peft_type: str, kwargs: dict, seed: int = 0):
    """A PEFT adapter of ``peft_type`` on ``base`` with random φ (PEFT's init makes ΔW = 0),
    saved to ``out``; returns PEFT's merge_and_unload state dict and the adapted model's outputs."""
    from peft import LoHaConfig, LoKrConfig, get_peft_model

    config = (LoHaConfig if peft_type == "LOHA" else LoKrConfig)(**kwargs)
    model = get_peft_model(load_base_model(base), config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "hada_" in name or "lokr_" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    model.eval()
    model.save_pretrained(out)
    with torch.no_grad():
        outputs = output_tensor(model(**batch()))
    merged = {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}
    return merged, outputs


@pytest.fixture(scope="module")
def peft_adapters(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("peft-lycoris")
    return {case: (str(root / case), *_peft_adapter(tiny_llama, str(root / case), *spec)) for case, spec in PEFT_CASES.items()}


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_peft_adapter_merges_checks_and_converts_as_peft_folds_it(case, peft_adapters, tiny_llama, tmp_path):
    adapter, reference, _ = peft_adapters[case]
    base = load_file(os.path.join(tiny_llama, "model.safetensors"))
    changed = [n for n in base if not torch.equal(base[n], reference[n])]
    assert changed, "PEFT's merge changed nothing: the comparison would be vacuous"

    code, out = _run(["check", tiny_llama, adapter])
    assert code == 0 and "ok" in out, out

    code, out = _run(["merge", tiny_llama, adapter, "-o", str(tmp_path / "merged"), "--quiet"])
    assert code == 0, out
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert set(merged) == set(base)
    for name, t in merged.items():
        assert torch.allclose(t.float(), reference[name].float(), atol=1e-5, rtol=0), name

    code, out = _run(["convert", adapter, "--to", "diff", "--dense", "--base", tiny_llama, "-o", str(tmp_path / "a.diff"), "--quiet"])
    assert code == 0, out
    from peftcli.artifacts.sparse_diff import read_diff

    diff = read_diff(str(tmp_path / "a.diff"))
    try:
        assert set(diff.names) == set(changed)
        for name in changed:
            idx, val = diff.get(name)
            dense = val if idx is None else torch.zeros(base[name].numel()).index_put_((idx.long(),), val.float())
            assert torch.allclose(dense.float().view(base[name].shape), reference[name] - base[name], atol=1e-5, rtol=0), name
    finally:
        diff.close()


@pytest.mark.parametrize("case", ["loha-qv", "lokr-decompose-both"])
def test_peft_adapter_evaluates_in_peftcli_with_peft_outputs(case, peft_adapters, tiny_llama):
    adapter, _, theirs = peft_adapters[case]
    ours = load_adapted(tiny_llama, adapter).eval()
    with torch.no_grad():
        assert torch.allclose(output_tensor(ours(**batch())), theirs, atol=1e-5)


@pytest.mark.parametrize("case", ["loha-qv", "lokr-full"])
def test_inspect_names_the_method(case, peft_adapters):
    adapter = peft_adapters[case][0]
    peft_type = case.split("-")[0].upper()
    code, out = _run(["inspect", adapter, "--json"])
    assert code == 0, out
    assert json.loads(out)["adapter_config"]["peft_type"] == peft_type
    code, out = _run(["inspect", adapter])
    assert code == 0 and any(line.split()[:2] == ["adapter", peft_type] for line in out.splitlines()), out


@pytest.mark.parametrize("name", ["loha", "lokr"])
def test_inspect_budget_counts_what_inject_adds(name, tiny_llama, tmp_path):
    code, out = _run(["inspect", tiny_llama, "--budget", name, "--rank", "2", "--targets", "all-linear", "--json"])
    assert code == 0, out
    budget = json.loads(out)["budget"]
    inject(tiny_llama, name, METHODS[name].config_cls(rank=2, targets="all-linear"), str(tmp_path / "run"))
    saved = load_file(str(tmp_path / "run" / "adapter_model.safetensors"))
    assert budget["trainable_params"] == sum(t.numel() for t in saved.values()) > 0


@pytest.mark.parametrize(
    "name, opts",
    [("loha", {}), ("loha", {"rank": 3, "alpha": 6.0, "targets": "all-linear"}), ("lokr", {}),
     ("lokr", {"rank": 1, "decompose_both": True, "targets": "all-linear"}), ("lokr", {"rank": 2, "decompose_factor": 4}),
     ("loha", {"rank": 2, "targets": "all-linear", "bert": True}), ("lokr", {"rank": 2, "targets": "all-linear", "bert": True})],
)
def test_our_adapter_loads_in_peft_with_identical_outputs(name, opts, tiny_llama, tiny_bert, tmp_path):
    from peft import PeftModel

    opts = dict(opts)
    base = tiny_bert if opts.pop("bert", False) else tiny_llama  # BERT: an encoder, with biases outside ΔW

    run = str(tmp_path / "run")
    budget = inject(base, name, METHODS[name].config_cls(**opts), run, seed=2)
    adapted = load_adapted(base, run)
    trainable = [p for p in adapted.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == budget.trainable
    inputs = batch()
    with torch.no_grad():
        base_out = output_tensor(load_base_model(base)(**inputs))
        assert torch.allclose(output_tensor(adapted(**inputs)), base_out, atol=1e-6)  # ΔW = 0 at init
    randomize_(trainable, scale=0.3)
    with torch.no_grad():
        ours = output_tensor(adapted(**inputs))
    assert not torch.allclose(ours, base_out, atol=1e-4)
    adapted.save(str(tmp_path / "trained"))

    theirs = PeftModel.from_pretrained(load_base_model(base), str(tmp_path / "trained")).eval()
    with torch.no_grad():
        assert torch.allclose(ours, output_tensor(theirs(**inputs)), atol=1e-5)
    # PEFT creates the same parameters, shape for shape (so the layout is PEFT's, not only the outputs).
    theirs_phi = {k.replace(".default", ""): tuple(v.shape) for k, v in theirs.named_parameters() if "hada_" in k or "lokr_" in k}
    saved = load_file(os.path.join(tmp_path, "trained", "adapter_model.safetensors"))
    assert {k: tuple(v.shape) for k, v in saved.items()} == theirs_phi


def _edited(src: str, dst: str, config: dict | None = None, tensors: dict | None = None) -> str:
    os.makedirs(dst)
    cfg = json.load(open(os.path.join(src, "adapter_config.json")))
    json.dump({**cfg, **(config or {})}, open(os.path.join(dst, "adapter_config.json"), "w"))
    t = load_file(os.path.join(src, "adapter_model.safetensors"))
    save_file({**t, **(tensors or {})}, os.path.join(dst, "adapter_model.safetensors"))
    return dst


def _refused_alike(base: str, adapter: str, tmp_path, *words: str, check_words: tuple[str, ...] | None = None) -> None:
    """check and merge refuse the adapter, each in one line naming ``words`` (check: ``check_words``
    if given); merge writes nothing."""
    code, out = _run(["check", base, adapter])
    failed = [line for line in out.splitlines() if "FAIL" in line]
    assert code == 1 and len(failed) == 1 and all(w in failed[0] for w in (check_words or words)), out
    merged = str(tmp_path / "merged")
    code, out = _run(["merge", base, adapter, "-o", merged])
    assert code != 0 and not os.path.exists(merged), out
    line = out.strip()
    assert "\n" not in line and line.startswith("error: ") and all(w in line for w in words), out


@pytest.mark.parametrize("case, key, value", [
    ("loha-qv", "use_mystery_norm", True),  # a key PEFT 0.21 does not write: a newer PEFT's option
    ("lokr-full", "weight_decompose", True),  # LyCORIS's DoRA-style option, which PEFT's LoKr lacks
    ("loha-qv", "layers_pattern", "blocks"),
])
def test_a_config_key_peftcli_does_not_understand_is_refused_by_check_and_merge(case, key, value, peft_adapters, tiny_llama, tmp_path):
    adapter = _edited(peft_adapters[case][0], str(tmp_path / "edited"), config={key: value})
    _refused_alike(tiny_llama, adapter, tmp_path, key, "LoHa" if case.startswith("loha") else "LoKr")


@pytest.mark.parametrize("case, part", [("loha-qv", "hada_t1"), ("lokr-full", "lokr_t2")])
def test_a_convolution_cp_factor_is_refused_naming_it(case, part, peft_adapters, tiny_llama, tmp_path):
    key = f"base_model.model.{LLAMA_LAYER0}.q_proj.{part}"
    adapter = _edited(peft_adapters[case][0], str(tmp_path / "edited"), tensors={key: torch.ones(2, 2, 1, 1)})
    # check compares the keys with those the config creates, and names the tensor it does not create.
    _refused_alike(tiny_llama, adapter, tmp_path, part, "CP decomposition", check_words=(part, "unexpected"))


def test_a_peft_type_peftcli_does_not_fold_is_refused_naming_it(peft_adapters, tiny_llama, tmp_path):
    adapter = _edited(peft_adapters["loha-qv"][0], str(tmp_path / "edited"), config={"peft_type": "OFT"})
    _refused_alike(tiny_llama, adapter, tmp_path, "OFT")


def test_rank_in_the_config_must_match_the_tensors(peft_adapters, tiny_llama, tmp_path):
    # LoKr with full factors has no rank in its tensors, but α/r scales them: a wrong r would
    # silently change ΔW, so r must give the layout PEFT creates (here r=2 makes w2 rank-r).
    adapter = _edited(peft_adapters["lokr-full"][0], str(tmp_path / "edited"), config={"r": 2})
    _refused_alike(tiny_llama, adapter, tmp_path, "lokr_w2")


def test_gpt2_conv1d_is_refused_as_peft_refuses_it(tiny_gpt2, tmp_path):
    from peftcli.errors import UsageError

    with pytest.raises(UsageError, match="Conv1D"):
        inject(tiny_gpt2, "loha", METHODS["loha"].config_cls(), str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("case, parts", [("loha-qv", ("hada_w1_a", "hada_w2_a")), ("lokr-decompose-both", ("lokr_w1_a", "lokr_w2_a"))])
def test_an_update_not_finite_in_float32_is_refused_by_check_and_merge(case, parts, peft_adapters, tiny_llama, tmp_path):
    # Each part is finite in float32, but α/r·ΔW is not: merge would otherwise write Inf weights.
    src = peft_adapters[case][0]
    saved = load_file(os.path.join(src, "adapter_model.safetensors"))
    key = f"base_model.model.{LLAMA_LAYER0}.q_proj."
    adapter = _edited(src, str(tmp_path / "edited"), tensors={key + p: saved[key + p] * 1e25 for p in parts})
    _refused_alike(tiny_llama, adapter, tmp_path, "q_proj", "not finite in float32", check_words=("q_proj", "not finite in float32"))


@pytest.mark.parametrize("peft_type", ["LOHA", "LOKR"])
def test_rank_and_module_dropout_act_in_training_only(peft_type, tiny_llama, tmp_path):
    kwargs = dict(r=2, alpha=2, target_modules=["q_proj", "v_proj"], rank_dropout=0.5, module_dropout=0.3)
    if peft_type == "LOKR":
        kwargs.update(decompose_both=True, rank_dropout_scale=True)
    _, theirs = _peft_adapter(tiny_llama, str(tmp_path / "a"), peft_type, kwargs)
    ours = load_adapted(tiny_llama, str(tmp_path / "a")).eval()
    inputs = batch()
    with torch.no_grad():
        evaluated = output_tensor(ours(**inputs))
        assert torch.allclose(evaluated, theirs, atol=1e-5)  # no dropout when evaluating, as PEFT
        ours.train()
        trained = []
        for seed in range(4):
            torch.manual_seed(seed)
            trained.append(output_tensor(ours(**inputs)))
    assert any(not torch.allclose(t, evaluated, atol=1e-5) for t in trained)  # read, not ignored
    assert any(not torch.allclose(t, trained[0], atol=1e-5) for t in trained[1:])


def test_an_adapter_on_gpt2_conv1d_is_refused_by_check_and_merge(tiny_gpt2, tmp_path):
    # PEFT cannot make one (its LyCORIS layers refuse Conv1D), so a hand-made one is not folded
    # by guessing its orientation.
    adapter = tmp_path / "hand-made"
    adapter.mkdir()
    json.dump({"peft_type": "LOHA", "r": 2, "alpha": 2, "target_modules": ["c_attn"]}, open(adapter / "adapter_config.json", "w"))
    key = "base_model.model.transformer.h.0.attn.c_attn."
    save_file({key + "hada_w1_a": torch.ones(192, 2), key + "hada_w1_b": torch.ones(2, 64),
               key + "hada_w2_a": torch.ones(192, 2), key + "hada_w2_b": torch.ones(2, 64)}, str(adapter / "adapter_model.safetensors"))
    _refused_alike(tiny_gpt2, str(adapter), tmp_path, "Conv1D", "LoHa")
