"""peftcli convert --to lora from anything foldable: --energy (per-weight rank by kept ‖ΔW‖²),
foldable adapters (LoHa, LoKr, DoRA, IA³, layers) and fine-tuned checkpoints (W_ft − W_base),
checked against fp64 SVD references, PEFT's own fold and convert_to_lora, and PEFT loading."""

from __future__ import annotations

import json
import os

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from peftcli.attach import load_adapted
from peftcli.cli import cli
from peftcli.injection import inject
from peftcli.lowrank import rank_for_energy
from peftcli.methods.lora import LoraConfig
from tests.helpers import assert_error, batch, output_tensor, randomize_

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.stderr
    return result


def _json(*args) -> dict:
    return json.loads(_run(*args, "--json").stdout)


def _fold(peft_dir: str) -> dict[str, torch.Tensor]:
    """B·A·(α/r) per base weight name of a LoRA adapter, read from its files (PEFT's layout)."""
    config = json.load(open(os.path.join(peft_dir, "adapter_config.json")))
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
    config = json.load(open(tmp_path / "e" / "adapter_config.json"))
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
