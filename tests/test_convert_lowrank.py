"""peftcli convert --to lora from anything foldable: --energy (per-weight rank by kept ‖ΔW‖²),
foldable adapters (LoHa, LoKr, DoRA, IA³, layers) and fine-tuned checkpoints (W_ft − W_base),
checked against fp64 SVD references, PEFT's own fold and convert_to_lora, and PEFT loading."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from peftcli.attach import load_adapted, load_base_model
from peftcli.cli import cli
from peftcli.injection import inject
from peftcli.lowrank import rank_for_energy
from peftcli.merging.engine import merge
from peftcli.methods.lora import LoraConfig
from tests.helpers import assert_error, batch, output_tensor, randomize_

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.stderr
    return result


def _json(*args) -> dict:
    return json.loads(_run(*args, "--json").stdout)


def _read_json(path) -> dict:
    with open(path) as f:
        return json.load(f)


def _fold(peft_dir: str) -> dict[str, torch.Tensor]:
    """B·A·(α/r) per base weight name of a LoRA adapter, read from its files (PEFT's layout)."""
    config = _read_json(os.path.join(peft_dir, "adapter_config.json"))
    tensors = load_file(os.path.join(peft_dir, "adapter_model.safetensors"))
    scale = config["lora_alpha"] / config["r"]
    out = {}
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key[len("base_model.model.") : -len(".lora_A.weight")]
            out[module + ".weight"] = (tensors[key.replace("lora_A", "lora_B")].double() @ a.double()) * scale
    return out


def _truncated(w: torch.Tensor, r: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r]


def _reference_rank(w: torch.Tensor, energy: float) -> int:
    s2 = torch.linalg.svdvals(w.double()) ** 2
    cs = torch.cumsum(s2, 0)
    return int((cs < energy * cs[-1]).sum()) + 1


def _trained_lora(base, root, rank=4, **kw):
    inject(base, "lora", LoraConfig(rank=rank, **kw), str(root / "init"))
    adapted = load_adapted(base, str(root / "init"))
    randomize_([p for p in adapted.parameters() if p.requires_grad], scale=0.3)
    adapted.save(str(root / "lora"))
    return adapted, str(root / "lora")


@pytest.fixture(scope="module")
def lora_diff(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("lowrank-diff")
    adapted, lora = _trained_lora(tiny_llama, root, rank=6, targets="q_proj,v_proj,up_proj")
    _run("convert", lora, "--to", "diff", "--dense", "--values", "fp32", "-o", root / "l.diff")
    return str(root / "l.diff"), adapted


# -- slice 1: --energy ------------------------------------------------------------------------


@pytest.mark.parametrize("energy", [0.5, 0.8, 0.95])
def test_energy_keeps_the_smallest_rank_per_weight_and_pads_the_rest(energy, lora_diff, tmp_path):
    diff, _ = lora_diff
    doc = _json("convert", diff, "--to", "lora", "--energy", energy, "-o", tmp_path / "e")
    phi = load_file(diff)
    ranks = {}
    for t in doc["tensors"]:
        w = phi[t["name"]]
        ranks[t["name"]] = _reference_rank(w, energy)
        assert t["rank"] == ranks[t["name"]], t
        s2 = torch.linalg.svdvals(w.double()) ** 2
        assert t["kept_energy"] == pytest.approx(float(s2[: t["rank"]].sum() / s2.sum()), abs=1e-6)
        assert t["kept_energy"] >= energy - 1e-6
    assert len(set(ranks.values())) > 1, "one rank for all: the per-weight choice is untested"
    assert doc["energy"] == energy and doc["rank"] == max(ranks.values())
    config = _read_json(tmp_path / "e" / "adapter_config.json")
    assert config["r"] == config["lora_alpha"] == doc["rank"] and config["rank_pattern"] == {}
    folded = _fold(str(tmp_path / "e"))  # the zero padding adds nothing: B·A is the rank-k truncation
    for name, k in ranks.items():
        assert torch.allclose(folded[name], _truncated(phi[name], k), atol=1e-5), name


def test_energy_one_reproduces_the_adapter_and_loads(lora_diff, tiny_llama, tmp_path):
    diff, adapted = lora_diff
    doc = _json("convert", diff, "--to", "lora", "--energy", "1", "-o", tmp_path / "full")
    assert doc["kept_energy"] == pytest.approx(1.0, abs=1e-6)
    # φ = B·A of a rank-6 LoRA: energy 1 keeps its 6 directions, not the fp32 rounding noise beyond
    assert all(t["rank"] == 6 for t in doc["tensors"]) and doc["rank"] == 6
    phi, folded = load_file(diff), _fold(str(tmp_path / "full"))
    assert all(torch.allclose(folded[n], phi[n].double(), atol=1e-5) for n in folded)
    back = load_adapted(tiny_llama, str(tmp_path / "full"))
    with torch.no_grad():
        assert torch.allclose(output_tensor(back(**batch())), output_tensor(adapted(**batch())), atol=1e-4)


def test_text_output_names_each_weights_rank_and_kept_energy(lora_diff, tmp_path):
    diff, _ = lora_diff
    out = _run("convert", diff, "--to", "lora", "--energy", "0.7", "-o", tmp_path / "t").stdout
    assert "model.layers.0.self_attn.q_proj.weight: rank " in out and "keeps " in out


def test_randomized_svd_of_a_large_matrix_keeps_the_top_directions(monkeypatch):
    import peftcli.lowrank as lowrank

    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 3, generator=g) @ torch.randn(3, 80, generator=g) + 1e-3 * torch.randn(96, 80, generator=g)
    calls = []
    monkeypatch.setattr(lowrank, "LOWRANK_MIN_SIDE", 64)  # what > 4096 on both sides takes, on a small matrix
    real = torch.svd_lowrank
    monkeypatch.setattr(torch, "svd_lowrank", lambda *a, **k: calls.append(k) or real(*a, **k))
    f = lowrank.factor(w, rank=3)
    assert calls, "the randomized SVD was not used"
    assert torch.allclose(f.b.double() @ f.a.double(), _truncated(w, 3), atol=1e-5)
    s2 = torch.linalg.svdvals(w.double()) ** 2
    assert f.kept / f.total == pytest.approx(float(s2[:3].sum() / s2.sum()), abs=1e-6)


def test_rank_for_energy_matches_the_cumulative_formula():
    s = torch.tensor([4.0, 2.0, 1.0, 0.0])  # σ² = 16, 4, 1, 0: shares 16/21, 20/21, 1
    assert [rank_for_energy(s, e) for e in (0.5, 16 / 21, 0.77, 0.96, 1.0)] == [1, 1, 2, 3, 3]
    assert rank_for_energy(torch.zeros(3), 0.9) == 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--rank", "2", "--energy", "0.5"], "give one"),
        (["--energy", "0"], "must be in (0, 1]"),
        (["--energy", "1.5"], "must be in (0, 1]"),
        (["--energy", "nan"], "--energy"),
        (["--rank", "0"], "--rank"),
    ],
)
def test_bad_rank_choices_are_usage_errors(args, message, lora_diff, tmp_path):
    diff, _ = lora_diff
    result = CliRunner().invoke(cli, ["convert", diff, "--to", "lora", *args, "-o", str(tmp_path / "x")])
    assert_error(result, 2, message)
    assert not os.path.exists(tmp_path / "x")


def test_energy_with_to_diff_is_refused(tiny_llama, tmp_path):
    _, lora = _trained_lora(tiny_llama, tmp_path)
    result = CliRunner().invoke(cli, ["convert", lora, "--to", "diff", "--dense", "--energy", "0.5", "-o", str(tmp_path / "x.diff")])
    assert_error(result, 2, "only applies with --to lora")


# -- slice 2: any foldable adapter → LoRA -----------------------------------------------------

PEFT_ADAPTERS = {
    "loha": ("LoHaConfig", dict(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    "lokr": ("LoKrConfig", dict(r=2, alpha=3, decompose_both=True, target_modules=["q_proj", "k_proj", "up_proj"])),
    "dora": ("LoraConfig", dict(r=3, lora_alpha=6, use_dora=True, target_modules=["q_proj", "o_proj", "gate_proj"])),
    "ia3": ("IA3Config", dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False)),
}


def _peft_adapter(base: str, out: str, config_class: str, kwargs: dict):
    """A PEFT adapter with random φ saved to ``out``; PEFT's merge_and_unload state dict and the adapted outputs."""
    import peft

    model = peft.get_peft_model(load_base_model(base), getattr(peft, config_class)(**kwargs))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ia3_" in name or "magnitude" in name:  # multiplicative: around 1
                p.mul_(1 + 0.3 * torch.randn_like(p))
            elif any(k in name for k in ("hada_", "lokr_", "lora_")):
                p.copy_(torch.randn_like(p) * 0.3)
    model.eval()
    model.save_pretrained(out)
    with torch.no_grad():
        outputs = output_tensor(model(**batch()))
    merged = {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}
    return merged, outputs


@pytest.fixture(scope="module")
def peft_adapters(tiny_llama, tmp_path_factory):
    pytest.importorskip("peft")
    root = tmp_path_factory.mktemp("lowrank-peft")
    return {case: (str(root / case), *_peft_adapter(tiny_llama, str(root / case), *spec)) for case, spec in PEFT_ADAPTERS.items()}


def _reference_deltas(tiny_llama, merged) -> dict[str, torch.Tensor]:
    base = load_file(os.path.join(tiny_llama, "model.safetensors"))
    deltas = {n: merged[n].double() - base[n].double() for n in base if n in merged and not torch.equal(merged[n], base[n])}
    assert deltas, "PEFT's merge changed nothing: the comparison would be vacuous"
    return deltas


@pytest.mark.parametrize("case", list(PEFT_ADAPTERS))
def test_full_rank_lora_of_an_adapter_folds_to_the_adapters_fold_and_loads_in_peft(case, peft_adapters, tiny_llama, tmp_path):
    from peft import PeftModel

    adapter, merged, outputs = peft_adapters[case]
    doc = _json("convert", adapter, "--to", "lora", "--energy", "1", "-o", tmp_path / "lora")
    assert doc["source"] == "adapter" and doc["dropped"] == []
    assert doc["kept_energy"] == pytest.approx(1.0, abs=1e-6)
    reference, folded = _reference_deltas(tiny_llama, merged), _fold(str(tmp_path / "lora"))
    assert set(folded) == set(reference)
    for name, delta in reference.items():
        assert torch.allclose(folded[name], delta, atol=1e-5), (name, float((folded[name] - delta).abs().max()))
    model = PeftModel.from_pretrained(load_base_model(tiny_llama), str(tmp_path / "lora")).eval()
    with torch.no_grad():
        assert torch.allclose(output_tensor(model(**batch())), outputs, atol=1e-4)


@pytest.mark.parametrize("case", list(PEFT_ADAPTERS))
def test_lower_rank_keeps_the_fp64_svd_share_of_the_adapters_delta(case, peft_adapters, tiny_llama, tmp_path):
    adapter, merged, _ = peft_adapters[case]
    doc = _json("convert", adapter, "--to", "lora", "--rank", "2", "-o", tmp_path / "r2")
    reference = _reference_deltas(tiny_llama, merged)
    total = kept = 0.0
    for t in doc["tensors"]:
        s2 = torch.linalg.svdvals(reference[t["name"]]) ** 2
        assert t["rank"] == 2 and t["kept_energy"] == pytest.approx(float(s2[:2].sum() / s2.sum()), abs=1e-6), t
        total, kept = total + float(s2.sum()), kept + float(s2[:2].sum())
    assert doc["kept_energy"] == pytest.approx(kept / total, abs=1e-6) and doc["kept_energy"] < 0.999
    folded = _fold(str(tmp_path / "r2"))
    assert all(torch.allclose(folded[n], _truncated(reference[n], 2), atol=1e-4) for n in folded)


@pytest.mark.parametrize("rank", [2, 0.9])
def test_matches_peft_convert_to_lora(rank, peft_adapters, tiny_llama, tmp_path):
    peft = pytest.importorskip("peft")
    convert_to_lora = getattr(peft.tuners, "convert_to_lora", None) or pytest.skip("this PEFT has no convert_to_lora")
    adapter, _, _ = peft_adapters["lokr"]
    model = peft.PeftModel.from_pretrained(load_base_model(tiny_llama), adapter)
    config, state = convert_to_lora(model, rank)
    flag = ["--rank", str(rank)] if isinstance(rank, int) else ["--energy", str(rank)]
    doc = _json("convert", adapter, "--to", "lora", *flag, "-o", tmp_path / "ours")
    ours = _fold(str(tmp_path / "ours"))
    for key, a in state.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[len("base_model.model.") : -len(".lora_A.weight")]
        theirs = state[key.replace("lora_A", "lora_B")].double() @ a.double()  # α = r: scale 1
        assert torch.allclose(ours[module + ".weight"], theirs, atol=1e-4), module
        if not isinstance(rank, int):
            chosen = next(t["rank"] for t in doc["tensors"] if t["name"] == module + ".weight")
            assert chosen == config.rank_pattern.get(module, config.r), module
    assert len(ours) == sum(k.endswith(".lora_A.weight") for k in state)


def test_what_a_lora_cannot_carry_is_reported_with_its_share(tiny_llama, tmp_path):
    from peftcli.methods.layers import LayersConfig

    inject(tiny_llama, "layers", LayersConfig(layers="1"), str(tmp_path / "init"))
    adapted = load_adapted(tiny_llama, str(tmp_path / "init"))
    randomize_([p for p in adapted.parameters() if p.requires_grad], scale=0.05)
    adapted.save(str(tmp_path / "layers"))
    doc = _json("convert", tmp_path / "layers", "--to", "lora", "--rank", "4", "-o", tmp_path / "lora")
    merge(tiny_llama, [str(tmp_path / "layers")], str(tmp_path / "merged"))  # the adapter's fold, written out
    base, merged = load_file(os.path.join(tiny_llama, "model.safetensors")), load_file(str(tmp_path / "merged" / "model.safetensors"))
    energy = {n: float((merged[n].double() - base[n].double()).pow(2).sum()) for n in base}
    total = sum(energy.values())
    dropped = {d["name"]: d["energy_share"] for d in doc["dropped"]}
    assert set(dropped) == {"model.layers.1.input_layernorm.weight", "model.layers.1.post_attention_layernorm.weight"}
    assert all(share == pytest.approx(energy[n] / total, rel=1e-5) and share > 0 for n, share in dropped.items())
    assert {t["name"] for t in doc["tensors"]} == {f"model.layers.1.{m}.weight" for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}


def test_unfoldable_adapters_and_ambiguous_directories_are_refused(tiny_llama, tiny_bert, tmp_path):
    from peftcli.methods.bitfit import BitFitConfig

    inject(tiny_bert, "bitfit", BitFitConfig(), str(tmp_path / "bitfit"))
    result = CliRunner().invoke(cli, ["convert", str(tmp_path / "bitfit"), "--to", "lora", "-o", str(tmp_path / "x")])
    assert_error(result, 1, "no linear layer", tmp_path / "x")
    _run("inject", "prompt", tiny_llama, "-o", tmp_path / "prompt")
    result = CliRunner().invoke(cli, ["convert", str(tmp_path / "prompt"), "--to", "lora", "-o", str(tmp_path / "x")])
    assert_error(result, 2, "adds computation", tmp_path / "x")
    _, lora = _trained_lora(tiny_llama, tmp_path)
    shutil.copy(os.path.join(tiny_llama, "model.safetensors"), lora)
    result = CliRunner().invoke(cli, ["convert", lora, "--to", "lora", "-o", str(tmp_path / "x")])
    assert_error(result, 2, "ambiguous", tmp_path / "x")


# -- slice 3: extraction from a fine-tuned checkpoint -----------------------------------------

L_RANK = 3


def _finetune(base: str, out, noise: float = 0.0, extra: dict | None = None, seed: int = 0) -> tuple[str, dict]:
    """A copy of ``base`` with W + L (rank L_RANK) + noise on every block's linear weight; ``extra``: name -> change."""
    shutil.copytree(base, out)
    weights = load_file(os.path.join(base, "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    lows = {}
    for name, w in weights.items():
        if ".layers." in name and name.endswith("_proj.weight"):
            low = (torch.randn(w.shape[0], L_RANK, generator=g) @ torch.randn(L_RANK, w.shape[1], generator=g)) * 0.02
            lows[name] = low
            weights[name] = w + low + noise * torch.randn(w.shape, generator=g)
    for name, change in (extra or {}).items():
        weights[name] = weights[name] + change
    save_file(weights, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    return str(out), lows


def _file_deltas(base: str, ft: str) -> dict[str, torch.Tensor]:
    a, b = load_file(os.path.join(base, "model.safetensors")), load_file(os.path.join(ft, "model.safetensors"))
    return {n: b[n].double() - a[n].double() for n in a}


def _logits(path: str, adapter: str | None = None) -> torch.Tensor:
    from peft import PeftModel

    model = load_base_model(path)
    if adapter:
        model = PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        return output_tensor(model.eval()(**batch()))


def test_extraction_at_the_rank_of_the_change_is_exact(tiny_llama, tmp_path):
    pytest.importorskip("peft")
    ft, lows = _finetune(tiny_llama, tmp_path / "ft")
    doc = _json("convert", ft, "--base", tiny_llama, "--to", "lora", "--rank", L_RANK, "-o", tmp_path / "lora")
    assert doc["source"] == "checkpoint" and doc["dropped"] == [] and doc["rank"] == L_RANK
    assert {t["name"] for t in doc["tensors"]} == set(lows)  # unchanged tensors are left out
    assert doc["kept_energy"] == pytest.approx(1.0, abs=1e-6)
    folded, deltas = _fold(str(tmp_path / "lora")), _file_deltas(tiny_llama, ft)
    for name in lows:
        assert torch.allclose(folded[name], _truncated(deltas[name], L_RANK), atol=1e-6), name
        assert torch.allclose(folded[name], lows[name].double(), atol=1e-5), name
    assert torch.allclose(_logits(tiny_llama, str(tmp_path / "lora")), _logits(ft), atol=1e-5)


def test_extraction_with_noise_keeps_the_top_directions(tiny_llama, tmp_path):
    pytest.importorskip("peft")
    ft, lows = _finetune(tiny_llama, tmp_path / "ft", noise=1e-3)
    doc = _json("convert", ft, "--base", tiny_llama, "--to", "lora", "--rank", L_RANK, "-o", tmp_path / "lora")
    folded, deltas = _fold(str(tmp_path / "lora")), _file_deltas(tiny_llama, ft)
    for t in doc["tensors"]:
        s2 = torch.linalg.svdvals(deltas[t["name"]]) ** 2
        assert t["kept_energy"] == pytest.approx(float(s2[:L_RANK].sum() / s2.sum()), abs=1e-6)
        assert torch.allclose(folded[t["name"]], _truncated(deltas[t["name"]], L_RANK), atol=1e-5), t["name"]
    assert 0.9 < doc["kept_energy"] < 1.0
    # base + extracted LoRA is far closer to the fine-tune than the base is: off by the dropped noise only
    base, ours, theirs = _logits(tiny_llama), _logits(tiny_llama, str(tmp_path / "lora")), _logits(ft)
    assert (ours - theirs).abs().max() < 0.1 * (base - theirs).abs().max()


def test_extraction_reports_what_a_lora_cannot_carry(tiny_llama, tmp_path):
    norm, embed = "model.layers.1.post_attention_layernorm.weight", "model.embed_tokens.weight"
    extra = {norm: torch.full((64,), 0.05), embed: torch.zeros(256, 64).index_fill_(0, torch.tensor([7]), 0.1)}
    ft, _ = _finetune(tiny_llama, tmp_path / "ft", extra=extra)
    doc = _json("convert", ft, "--base", tiny_llama, "--to", "lora", "--energy", "0.99", "-o", tmp_path / "lora")
    deltas = _file_deltas(tiny_llama, ft)
    total = sum(float(d.pow(2).sum()) for d in deltas.values())
    dropped = {d["name"]: d["energy_share"] for d in doc["dropped"]}
    assert set(dropped) == {norm, embed}
    for name, share in dropped.items():
        assert share == pytest.approx(float(deltas[name].pow(2).sum()) / total, rel=1e-5)
    assert "dropped 2 tensors" in _run("convert", ft, "--base", tiny_llama, "--to", "lora", "-o", tmp_path / "t").stdout


def test_extraction_refuses_what_is_not_a_finetune_of_the_base(tiny_llama, tiny_gpt2, tmp_path):
    ft, _ = _finetune(tiny_llama, tmp_path / "ft")
    result = CliRunner().invoke(cli, ["convert", ft, "--to", "lora", "-o", str(tmp_path / "x")])
    assert_error(result, 2, "needs the base", tmp_path / "x")
    result = CliRunner().invoke(cli, ["convert", str(tmp_path / "absent"), "--to", "lora", "-o", str(tmp_path / "x")])
    assert_error(result, 1, "does not exist", tmp_path / "x")
    result = CliRunner().invoke(cli, ["convert", tiny_gpt2, "--base", tiny_llama, "--to", "lora", "-o", str(tmp_path / "x")])
    assert_error(result, 1, "does not have the base's tensors", tmp_path / "x")
    weights = load_file(os.path.join(ft, "model.safetensors"))
    weights["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(64, 32)
    save_file(weights, os.path.join(ft, "model.safetensors"), metadata={"format": "pt"})
    result = CliRunner().invoke(cli, ["convert", ft, "--base", tiny_llama, "--to", "lora", "-o", str(tmp_path / "x")])
    assert_error(result, 1, "model.layers.0.self_attn.q_proj.weight", tmp_path / "x")
    other, _ = _finetune(tiny_llama, tmp_path / "other")
    config = _read_json(os.path.join(other, "config.json"))
    with open(os.path.join(other, "config.json"), "w") as f:
        json.dump({**config, "model_type": "mistral"}, f)
    result = CliRunner().invoke(cli, ["convert", other, "--base", tiny_llama, "--to", "lora", "-o", str(tmp_path / "x")])
    assert_error(result, 1, "mistral", tmp_path / "x")


# -- slice 4: merge --to-adapter --------------------------------------------------------------


@pytest.fixture(scope="module")
def two_loras(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("lowrank-two")
    (root / "a").mkdir(), (root / "b").mkdir()
    _, a = _trained_lora(tiny_llama, root / "a", rank=2, targets="q_proj,v_proj")
    _, b = _trained_lora(tiny_llama, root / "b", rank=4, targets="q_proj,k_proj,down_proj")
    return a, b


def _weighted_reference(a: str, b: str, wa: float, wb: float) -> dict[str, torch.Tensor]:
    fa, fb = _fold(a), _fold(b)  # independent of the merge: B·A·α/r from the adapters' own files
    return {n: wa * fa.get(n, 0) + wb * fb.get(n, 0) for n in set(fa) | set(fb)}


def test_merge_to_adapter_at_full_rank_is_the_weighted_sum_and_loads(two_loras, tiny_llama, tmp_path):
    a, b = two_loras
    doc = _json("merge", tiny_llama, a, b, "--weights", "1.0,-0.5", "--to-adapter", "--energy", "1", "-o", tmp_path / "ab")
    reference, folded = _weighted_reference(a, b, 1.0, -0.5), _fold(str(tmp_path / "ab"))
    assert doc["to"] == "lora" and set(folded) == set(reference) and doc["kept_energy"] == pytest.approx(1.0, abs=1e-6)
    assert doc["rank"] == 6  # q_proj: rank 2 + rank 4; the other weights padded up to it
    for name, delta in reference.items():
        assert torch.allclose(folded[name], delta, atol=1e-5), name
    merge(tiny_llama, [a, b], str(tmp_path / "merged"), weights=[1.0, -0.5])  # the checkpoint the adapter stands for
    assert torch.allclose(_logits(tiny_llama, str(tmp_path / "ab")), _logits(str(tmp_path / "merged")), atol=1e-5)


def test_merge_to_adapter_at_lower_rank_keeps_the_fp64_svd_share(two_loras, tiny_llama, tmp_path):
    a, b = two_loras
    doc = _json("merge", tiny_llama, a, b, "--to-adapter", "--rank", "3", "-o", tmp_path / "ab")
    reference = _weighted_reference(a, b, 1.0, 1.0)
    q = "model.layers.0.self_attn.q_proj.weight"
    t = next(t for t in doc["adapter_tensors"] if t["name"] == q)
    s2 = torch.linalg.svdvals(reference[q]) ** 2
    assert t["kept_energy"] == pytest.approx(float(s2[:3].sum() / s2.sum()), abs=1e-6) and t["kept_energy"] < 0.9999
    assert torch.allclose(_fold(str(tmp_path / "ab"))[q], _truncated(reference[q], 3), atol=1e-5)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--rank", "2"], "only applies with --to-adapter"),
        (["--to-adapter", "--method", "slerp", "--t", "0.5"], "slerp needs the base tensor"),
        (["--to-adapter", "--dtype", "BF16"], "--dtype does not apply"),
        (["--to-adapter", "--rank", "2", "--energy", "0.5"], "give one"),
    ],
)
def test_merge_to_adapter_refuses_what_does_not_apply(args, message, two_loras, tiny_llama, tmp_path):
    a, b = two_loras
    result = CliRunner().invoke(cli, ["merge", tiny_llama, a, b, *args, "-o", str(tmp_path / "x")])
    assert_error(result, 2, message.replace("`", ""), tmp_path / "x")


def test_a_rank_above_a_narrow_weight_keeps_that_weight_whole(lora_diff, tiny_llama, tmp_path):
    """tiny llama's v_proj is 32 wide: --rank 48 keeps it exactly (rank 32, all its energy) and
    the wider weights at 48, instead of refusing the whole conversion."""
    diff, _ = lora_diff
    doc = _json("convert", diff, "--to", "lora", "--rank", 48, "-o", tmp_path / "r")
    phi = load_file(diff)
    ranks = {t["name"]: t["rank"] for t in doc["tensors"]}
    narrow = [n for n in ranks if min(phi[n].shape) < 48]
    assert narrow and all(ranks[n] == min(phi[n].shape) for n in narrow)
    assert all(r == 48 for n, r in ranks.items() if n not in narrow)
    assert _read_json(tmp_path / "r" / "adapter_config.json")["r"] == 48
    folded = _fold(str(tmp_path / "r"))
    for name in ranks:
        assert torch.allclose(folded[name], _truncated(phi[name], min(48, *phi[name].shape)), atol=1e-5), name
    # peftcli reads what it wrote: check and merge take an r above a narrow module's
    result = CliRunner().invoke(cli, ["check", tiny_llama, str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    _run("merge", tiny_llama, tmp_path / "r", "-o", tmp_path / "m.safetensors")
    merged = load_file(str(tmp_path / "m.safetensors"))
    base = load_file(os.path.join(tiny_llama, "model.safetensors"))
    for name in ranks:
        assert torch.allclose((merged[name] - base[name]).double(), folded[name].double(), atol=1e-5), name
