"""``peftcli inject`` and ``inspect --budget`` as a user sees them: the report grouped by target
group, the totals line, and unknown or missing methods."""

from __future__ import annotations

import json
import re
from collections import defaultdict

import pytest
import torch
from click.testing import CliRunner

from peftcli.checkpoint.writer import save_state_dict
from peftcli.cli import cli
from peftcli.cli.render import budget_groups
from peftcli.methods import METHODS

LAYERS, H, KV, INTER, VOCAB = 32, 16, 8, 32, 64


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def llama32(tmp_path_factory) -> str:
    """A Llama-shaped checkpoint with 32 layers (tiny matrices): 7 linear modules per layer."""
    d = tmp_path_factory.mktemp("llama32")
    sd = {"model.embed_tokens.weight": torch.zeros(VOCAB, H)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for proj, rows in (("q_proj", H), ("k_proj", KV), ("v_proj", KV), ("o_proj", H)):
            sd[p + f"self_attn.{proj}.weight"] = torch.zeros(rows, H)
        sd[p + "mlp.gate_proj.weight"] = torch.zeros(INTER, H)
        sd[p + "mlp.up_proj.weight"] = torch.zeros(INTER, H)
        sd[p + "mlp.down_proj.weight"] = torch.zeros(H, INTER)
        sd[p + "input_layernorm.weight"] = torch.ones(H)
        sd[p + "post_attention_layernorm.weight"] = torch.ones(H)
    sd["model.norm.weight"] = torch.ones(H)
    sd["lm_head.weight"] = torch.zeros(VOCAB, H)
    save_state_dict(sd, str(d / "model.safetensors"))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H, "intermediate_size": INTER,
        "num_hidden_layers": LAYERS, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": VOCAB,
        "tie_word_embeddings": False,
    }
    (d / "config.json").write_text(json.dumps(config))
    return str(d)


def _table(stdout: str) -> list[list[str]]:
    """The budget table's body rows, as cells."""
    return [[c.strip() for c in line.split("│")] for line in stdout.splitlines() if "│" in line]


def _reference_groups(targets: list[dict]) -> dict[str, tuple[int, list[int], set[int]]]:
    """Per module name with its layer index replaced by "{i}": (count, shape, {params})."""
    groups: dict[str, list] = defaultdict(lambda: [0, None, set()])
    for t in targets:
        g = groups[re.sub(r"\.\d+\.", ".{i}.", t["module"])]
        g[0] += 1
        g[1] = t["shape"]
        g[2].add(t["params"])
    return {k: tuple(v) for k, v in groups.items()}


def test_all_linear_on_32_layers_prints_one_row_per_target_group(llama32, tmp_path):
    out = tmp_path / "lora"
    result = run("inject", "lora", "--rank", 8, "--targets", "all-linear", llama32, "-o", out)
    assert result.exit_code == 0, result.stderr
    rows = _table(result.stdout)
    assert len(rows) == 7 and len(result.stdout.splitlines()) < 15  # not 7 × 32 module rows

    doc = json.loads(run("inspect", llama32, "--budget", "lora", "--rank", 8, "--targets", "all-linear", "--json").stdout)
    targets = doc["budget"]["targets"]
    assert len(targets) == 7 * LAYERS  # --json keeps one row per module
    ref = _reference_groups(targets)
    assert len(ref) == 7
    for module, count, shape, each, total in rows:
        n, ref_shape, params = ref[module.replace("{0..31}", "{i}")]
        d, k = ref_shape
        assert count == f"×{n}" == "×32"
        assert shape == f"{d} × {k}"
        assert params == {8 * (d + k)}  # LoRA's r(d + k), whatever the budget says
        assert each == f"{8 * (d + k):,}" and total == f"{32 * 8 * (d + k):,}"
    assert ["model.layers.{0..31}.self_attn.q_proj", "×32", f"{H} × {H}", "256", "8,192"] in rows
    total = sum(8 * (t["shape"][0] + t["shape"][1]) for t in targets)
    assert f"trainable {total:,} of " in result.stdout

    # inspect --budget prints the same table from the same code
    inspected = run("inspect", llama32, "--budget", "lora", "--rank", 8, "--targets", "all-linear")
    assert _table(inspected.stdout)[-7:] == rows


def test_layers_that_are_not_consecutive_are_separate_groups(llama32, tmp_path):
    result = run("inspect", llama32, "--budget", "ia3", "--layers", "0,2-3,31")
    assert result.exit_code == 0, result.stderr
    groups = [r[:2] for r in _table(result.stdout) if "self_attn.k_proj" in r[0]]
    assert groups == [
        ["model.layers.0.self_attn.k_proj", ""],
        ["model.layers.{2..3}.self_attn.k_proj", "×2"],
        ["model.layers.31.self_attn.k_proj", ""],
    ]


def test_budget_groups_merge_only_equal_neighbours():
    def row(i, shape, params):
        return {"module": f"m.layers.{i}.attn.q", "shape": shape, "params": params}

    targets = [row(0, [4, 4], 8), row(1, [4, 4], 8), row(2, [4, 8], 12), row(3, [4, 4], 8), row(4, [4, 4], 9)]
    targets.append({"module": "m.head", "shape": [2, 4], "params": 6})
    assert budget_groups(targets) == [
        {"module": "m.layers.{0..1}.attn.q", "count": 2, "shape": [4, 4], "each": 8, "params": 16},
        {"module": "m.layers.2.attn.q", "count": 1, "shape": [4, 8], "each": 12, "params": 12},
        {"module": "m.layers.3.attn.q", "count": 1, "shape": [4, 4], "each": 8, "params": 8},
        {"module": "m.layers.4.attn.q", "count": 1, "shape": [4, 4], "each": 9, "params": 9},  # other count: not merged
        {"module": "m.head", "count": 1, "shape": [2, 4], "each": 6, "params": 6},
    ]
    assert sum(g["params"] for g in budget_groups(targets)) == sum(t["params"] for t in targets)


def test_phi_larger_than_the_base_is_a_multiple_not_a_negative_reduction(tiny_bert, tmp_path):
    out = tmp_path / "prefix"
    result = run("inject", "prefix", "--virtual-tokens", 20, "--projection", 512, tiny_bert, "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    budget = json.loads(result.stdout)["budget"]
    assert budget["trainable_params"] > budget["base_params"]
    text = run("inject", "prefix", "--virtual-tokens", 20, "--projection", 512, tiny_bert, "-o", out, "--force").stdout
    line = next(l for l in text.splitlines() if l.startswith("trainable "))
    ratio = budget["trainable_params"] / budget["base_params"]
    assert f"{ratio:.2f}× the base's parameters" in line and ratio > 1.5
    assert f"{budget['pct_of_total']:.4f}% of base + added, PEFT's convention" in line
    assert "fewer" not in line and not re.search(r"-\d", line)  # no negative "fewer"

    small = run("inspect", tiny_bert, "--budget", "prefix", "--virtual-tokens", 4, "--json")
    b = json.loads(small.stdout)["budget"]
    line = next(l for l in run("inspect", tiny_bert, "--budget", "prefix", "--virtual-tokens", 4).stdout.splitlines() if l.startswith("trainable "))
    assert f"{b['reduction_pct']:.4f}% fewer than full fine-tuning" in line and "×" not in line


@pytest.mark.parametrize(
    "name, suggestion",
    [("nosuch", None), ("lroa", "lora"), ("LoRA", "lora"), ("prefx", "prefix"), ("dora", "lora --dora"),
     ("houlsby", "adapter --style houlsby"), ("ltsft", "lt-sft")],
)
def test_an_unknown_method_is_one_usage_line_listing_the_methods(tiny_llama, tmp_path, name, suggestion):
    out = tmp_path / "out"
    result = run("inject", name, tiny_llama, "-o", out)
    assert result.exit_code == 2
    assert result.stdout == "" and not out.exists()
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: unknown method {name!r}")
    assert "choose one of: " + ", ".join(METHODS) in line
    if suggestion:
        assert f"(did you mean {suggestion!r}?)" in line
    else:
        assert "did you mean" not in line
    if " " in (suggestion or ""):  # what an alias suggests is a command that works
        method, *flags = suggestion.split()
        assert run("inject", method, *flags, tiny_llama, "-o", out).exit_code == 0


def test_inject_without_a_method_shows_usage_with_every_method():
    result = run("inject")
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.startswith("Usage: ") and " inject [OPTIONS] COMMAND" in result.stderr.splitlines()[0]
    for name in METHODS:
        assert f"\n  {name} " in result.stderr, name
    help_ = run("inject", "--help")
    assert help_.exit_code == 0 and all(f"  {name} " in help_.stdout for name in METHODS)


def test_completion_of_an_unknown_method_stays_quiet():
    """Shell completion parses resiliently: an unknown method there is no error."""
    env = {"_PEFTCLI_COMPLETE": "bash_complete", "COMP_WORDS": "peftcli inject nosuch --", "COMP_CWORD": "3"}
    result = CliRunner().invoke(cli, [], env=env, prog_name="peftcli")
    assert result.exit_code == 0 and "error" not in result.output and "--help" in result.output
    env["COMP_WORDS"], env["COMP_CWORD"] = "peftcli inject l", "2"
    result = CliRunner().invoke(cli, [], env=env, prog_name="peftcli")
    assert result.output.split() == ["plain,layers", "plain,loha", "plain,lokr", "plain,lora", "plain,lottery", "plain,lt-sft"]
