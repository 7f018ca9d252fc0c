"""peftcli merge --to-adapter with TIES, DARE and the other methods of the task vectors alone:
the ΔWs combined by the merge registry's kernel (θ₀ = 0), re-factored by truncated SVD; checked
against fp64 references of the methods written here, against a checkpoint merge of the same
inputs, and against PEFT's ``add_weighted_adapter`` on adapters of different ranks."""

from __future__ import annotations

import hashlib
import re
from decimal import ROUND_HALF_UP, Decimal

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from peftcli.cli import cli
from tests.helpers import assert_error
from tests.test_convert_lowrank import _fold, _json, _run, _trained_lora, _truncated

Q = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def loras(tiny_llama, tmp_path_factory):
    """Three LoRAs of the tiny llama: ranks 2 and 4 on overlapping modules, and a second rank 4."""
    root = tmp_path_factory.mktemp("to-adapter")
    for d in ("a", "b", "c"):
        (root / d).mkdir()
    _, a = _trained_lora(tiny_llama, root / "a", rank=2, targets="q_proj,v_proj")
    _, b = _trained_lora(tiny_llama, root / "b", rank=4, targets="q_proj,k_proj,down_proj")
    _, c = _trained_lora(tiny_llama, root / "c", rank=4, targets="q_proj,k_proj,down_proj")
    return a, b, c


# -- fp64 references of the methods, from their definitions (docs/merging.md), not from peftcli --


def _keep(density: float, n: int) -> int:
    return min(n, max(1, int((Decimal(repr(density)) * n).to_integral_value(ROUND_HALF_UP))))


def _trim(phi: torch.Tensor, density: float) -> torch.Tensor:
    flat = phi.flatten()
    k = _keep(density, flat.numel())
    order = sorted(range(flat.numel()), key=lambda j: (-abs(float(flat[j])), j))  # lower index first at equal |φ|
    out = torch.zeros_like(flat)
    out[order[:k]] = flat[order[:k]]
    return out.view(phi.shape)


def _dare_mask(seed: int, key: str, index: int, shape, density: float) -> torch.Tensor:
    digest = hashlib.sha256(f"{seed}\0{key}\0{index}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    return torch.rand(shape, generator=g, dtype=torch.float32) < density


def _elect(weighted: list[torch.Tensor], weights: list[float] | None) -> torch.Tensor:
    """Σ of the agreeing λᵢφ̃ᵢ (sign of the sum elected, zero elects +); divided by Σλ of the agreeing when ``weights``."""
    total = sum(weighted)
    sign = torch.where(total >= 0, 1.0, -1.0).double()
    agree = [(x * sign > 0) for x in weighted]
    out = sum(torch.where(g, x, 0.0) for g, x in zip(agree, weighted))
    if weights is None:
        return out
    divisor = sum(g.double() * w for g, w in zip(agree, weights))
    return torch.where(divisor == 0, 0.0, out / torch.where(divisor == 0, 1.0, divisor))


def _reference(method: str, deltas: list[dict], weights: list[float], density: float, seed: int = 0) -> dict:
    names = set().union(*deltas)
    out = {}
    for name in names:
        shape = next(d[name].shape for d in deltas if name in d)
        phis = [d.get(name, torch.zeros(shape, dtype=torch.float64)) for d in deltas]
        if method == "ties":
            out[name] = _elect([_trim(p, density) * w for p, w in zip(phis, weights)], weights)
        else:
            dropped = [torch.where(_dare_mask(seed, name, i, shape, density), p / density, 0.0) for i, p in enumerate(phis)]
            weighted = [p * w for p, w in zip(dropped, weights)]
            out[name] = _elect(weighted, None) if method == "dare-ties" else sum(weighted)
    return out


# -- 1: TIES, DARE, DARE-TIES on the ΔWs ------------------------------------------------------


@pytest.mark.parametrize("method, weights", [("ties", "1.0,0.5"), ("dare", "1.0,-0.5"), ("dare-ties", "0.7,0.9")])
def test_method_on_the_deltas_at_full_rank_is_the_fp64_reference(method, weights, loras, tiny_llama, tmp_path):
    a, b, _ = loras
    lam = [float(w) for w in weights.split(",")]
    doc = _json(
        "merge", tiny_llama, a, b, "--weights", weights, "--method", method, "--density", "0.3", "--seed", "7",
        "--to-adapter", "--energy", "1", "-o", tmp_path / "m",
    )
    reference = _reference(method, [_fold(a), _fold(b)], lam, 0.3, seed=7)
    folded = _fold(str(tmp_path / "m"))
    assert doc["method"] == method and set(folded) == set(reference)
    for name, delta in reference.items():
        assert torch.allclose(folded[name], delta, atol=1e-5), name
        assert not torch.allclose(delta, lam[0] * _fold(a).get(name, 0) + lam[1] * _fold(b).get(name, 0), atol=1e-3)  # not linear
    assert doc["kept_energy"] == pytest.approx(1.0, abs=1e-6)


def test_ties_at_lower_rank_keeps_the_fp64_svd_share(loras, tiny_llama, tmp_path):
    a, b, _ = loras
    doc = _json("merge", tiny_llama, a, b, "--method", "ties", "--density", "0.5", "--to-adapter", "--rank", "3", "-o", tmp_path / "m")
    reference = _reference("ties", [_fold(a), _fold(b)], [1.0, 1.0], 0.5)
    for t in doc["adapter_tensors"]:
        s2 = torch.linalg.svdvals(reference[t["name"]]) ** 2
        assert t["rank"] == 3 and t["kept_energy"] == pytest.approx(float(s2[:3].sum() / s2.sum()), abs=1e-6), t["name"]
    assert doc["adapter_tensors"][0]["kept_energy"] < 0.99  # trimming makes ΔW full rank: rank 3 loses some
    folded = _fold(str(tmp_path / "m"))
    for name, delta in reference.items():
        assert torch.allclose(folded[name], _truncated(delta, 3), atol=1e-5), name


@pytest.mark.parametrize(
    "method, extra", [("ties", []), ("dare", []), ("breadcrumbs", ["--gamma", "0.05"]), ("della", ["--epsilon", "0.1"])],
)
def test_full_rank_adapter_is_the_checkpoint_merge_of_the_same_method(method, extra, loras, tiny_llama, tmp_path):
    """The registry's one kernel: θ − θ₀ of `merge --method M` equals the adapter's ΔW (same options)."""
    a, b, _ = loras
    args = ["--weights", "1.0,0.6", "--method", method, "--density", "0.4", *extra]
    _run("merge", tiny_llama, a, b, *args, "--to-adapter", "--energy", "1", "-o", tmp_path / "m")
    _run("merge", tiny_llama, a, b, *args, "-o", tmp_path / "ckpt")
    base, merged = load_file(f"{tiny_llama}/model.safetensors"), load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    for name, delta in _fold(str(tmp_path / "m")).items():
        assert torch.allclose(delta.float(), merged[name] - base[name], atol=1e-5), name


def test_adapter_records_the_method(loras, tiny_llama, tmp_path):
    import json

    from safetensors import safe_open

    a, b, _ = loras
    _run("merge", tiny_llama, a, b, "--method", "dare", "--density", "0.5", "--seed", "3", "--to-adapter", "--rank", "2", "-o", tmp_path / "m")
    with safe_open(str(tmp_path / "m" / "adapter_model.safetensors"), "pt") as f:
        recorded = json.loads(f.metadata()["peftcli.merge_method"])
    assert recorded == {"method": "dare", "density": 0.5, "seed": 3}


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--method", "slerp", "--t", "0.5"], 2, "slerp needs the base tensor θ₀"),
        (["--method", "model-stock"], 2, "model-stock needs the base tensor θ₀"),
        (["--method", "ties"], 2, "ties needs a density"),
        (["--method", "ties", "--density", "0.5", "--weights", "1,-1"], 2, "ties needs weights ≥ 0"),
    ],
)
def test_to_adapter_refuses_methods_that_need_the_base(args, code, message, loras, tiny_llama, tmp_path):
    a, b, _ = loras
    result = CliRunner().invoke(cli, ["merge", tiny_llama, a, b, *args, "--to-adapter", "-o", str(tmp_path / "x")])
    assert_error(result, code, message, tmp_path / "x")


# -- 3: the text report --------------------------------------------------------------------------


def test_text_output_gives_rank_and_kept_energy_per_module(loras, tiny_llama, tmp_path):
    a, b, _ = loras
    args = ["merge", tiny_llama, a, b, "--method", "ties", "--density", "0.5", "--to-adapter", "--energy", "0.9"]
    text = _run(*args, "-o", tmp_path / "t").stdout
    doc = _json(*args, "-o", tmp_path / "j")
    first = text.splitlines()[0]
    assert first.startswith(f"wrote {tmp_path / 't'}: rank {doc['rank']} LoRA on {doc['changed_tensors']} weights (ties, 2 inputs)")
    assert f"keeping {100 * doc['kept_energy']:.2f}% of ‖ΔW‖²" in first
    lines = text.splitlines()[1:]
    assert len(lines) == len(doc["adapter_tensors"]) + len(doc["dropped"])
    for t, line in zip(doc["adapter_tensors"], lines):
        assert line == f"  {t['name']}: rank {t['rank']}, keeps {100 * t['kept_energy']:.2f}%"
    assert len({re.search(r"rank (\d+)", line).group(1) for line in lines}) > 1  # --energy picks a rank per weight


# -- 2: PEFT's add_weighted_adapter on the same adapters --------------------------------------


def _peft(tiny_llama, adapters: dict):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, torch_dtype=torch.float32)
    names = list(adapters)
    peft_model = PeftModel.from_pretrained(model, adapters[names[0]], adapter_name=names[0])
    for n in names[1:]:
        peft_model.load_adapter(adapters[n], adapter_name=n)
    return peft_model


def _peft_deltas(peft_model, adapter: str) -> dict[str, torch.Tensor]:
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            out[name[len("base_model.model.") :] + ".weight"] = module.get_delta_weight(adapter).detach().double()
    return out


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.linalg.norm(x.double() - ref) / torch.linalg.norm(ref))


def _optimal(ref: torch.Tensor, r: int) -> float:
    s2 = torch.linalg.svdvals(ref) ** 2
    return float((s2[r:].sum() / s2.sum()).sqrt())


@pytest.fixture(scope="module")
def same_targets(tiny_llama, tmp_path_factory):
    """LoRAs of ranks 2, 4 and 4 on the same modules (PEFT's combinations need shared targets to compare)."""
    root = tmp_path_factory.mktemp("vs-peft")
    out = {}
    for d, r in (("r2", 2), ("r4", 4), ("s4", 4)):
        (root / d).mkdir()
        out[d] = _trained_lora(tiny_llama, root / d, rank=r, targets="q_proj,v_proj")[1]
    return out


def test_peft_refuses_different_ranks_except_cat_and_svd(same_targets, tiny_llama):
    model = _peft(tiny_llama, {"a": same_targets["r2"], "b": same_targets["r4"]})
    for combination in ("linear", "ties", "dare_linear"):
        with pytest.raises(ValueError, match="same r"):
            model.add_weighted_adapter(["a", "b"], [1.0, 0.5], f"m_{combination}", combination_type=combination, density=0.5)
    model.add_weighted_adapter(["a", "b"], [1.0, 0.5], "cat", combination_type="cat")  # concatenates: rank 2 + 4
    assert model.peft_config["cat"].r == 6
    reference = {n: _fold(same_targets["r2"])[n] + 0.5 * _fold(same_targets["r4"])[n] for n in _fold(same_targets["r2"])}
    for name, delta in _peft_deltas(model, "cat").items():
        assert torch.allclose(delta, reference[name], atol=1e-5), name


@pytest.mark.parametrize("rank", [1, 3])
def test_svd_combination_error_is_peftclis_and_optimal(rank, same_targets, tiny_llama, tmp_path):
    a, b = same_targets["r2"], same_targets["r4"]
    model = _peft(tiny_llama, {"a": a, "b": b})
    model.add_weighted_adapter(["a", "b"], [1.0, 0.5], "svd", combination_type="svd", svd_rank=rank)
    peft_deltas = _peft_deltas(model, "svd")
    _run("merge", tiny_llama, a, b, "--weights", "1,0.5", "--to-adapter", "--rank", rank, "-o", tmp_path / "m")
    ours = _fold(str(tmp_path / "m"))
    fa, fb = _fold(a), _fold(b)
    assert set(ours) == set(peft_deltas) == set(fa)
    for name in fa:
        reference = fa[name] + 0.5 * fb[name]
        mine, theirs, best = _rel(ours[name], reference), _rel(peft_deltas[name], reference), _optimal(reference, rank)
        assert mine <= theirs + 1e-6 and mine == pytest.approx(best, abs=1e-6), name
        assert best > 1e-3  # a truncation that loses something: the comparison means something


def test_full_rank_is_exact_while_peft_linear_weights_a_and_b_separately(same_targets, tiny_llama, tmp_path):
    a, b = same_targets["r4"], same_targets["s4"]
    model = _peft(tiny_llama, {"a": a, "b": b})
    model.add_weighted_adapter(["a", "b"], [1.0, 0.5], "lin", combination_type="linear")
    theirs = _peft_deltas(model, "lin")
    _run("merge", tiny_llama, a, b, "--weights", "1,0.5", "--to-adapter", "--energy", "1", "-o", tmp_path / "m")
    ours = _fold(str(tmp_path / "m"))
    ta, tb = load_file(f"{a}/adapter_model.safetensors"), load_file(f"{b}/adapter_model.safetensors")
    for name, delta_a in _fold(a).items():
        reference = delta_a + 0.5 * _fold(b)[name]
        assert _rel(ours[name], reference) < 1e-5, name
        assert _rel(theirs[name], reference) > 0.10, name  # not the weighted sum of the ΔWs
        # What PEFT computes: (Σ √λᵢ Bᵢ)(Σ √λᵢ Aᵢ) (scale α/r = 1 here), cross terms Bᵢ·Aⱼ included.
        key = "base_model.model." + name[: -len(".weight")]
        scale = [_scale(a), _scale(b)]
        bsum = sum((lam * s) ** 0.5 * t[f"{key}.lora_B.weight"].double() for t, lam, s in zip((ta, tb), (1.0, 0.5), scale))
        asum = sum((lam * s) ** 0.5 * t[f"{key}.lora_A.weight"].double() for t, lam, s in zip((ta, tb), (1.0, 0.5), scale))
        assert torch.allclose(theirs[name], bsum @ asum, atol=1e-5), name


def _scale(adapter: str) -> float:
    import json

    with open(f"{adapter}/adapter_config.json") as f:
        config = json.load(f)
    return config["lora_alpha"] / config["r"]
