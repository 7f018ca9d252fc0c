"""``peftcli export RUN --to vllm``: vLLM's rules, exact repairs and one-line refusals.

References are independent of peftcli: PEFT itself (``PeftModel.from_pretrained`` of the
adapter written gives the logits of the adapter read), and a fp64 ΔW = (lora_alpha/r)·B·A
computed from nothing but ``r`` and ``lora_alpha`` — the scaling every vLLM version
applies — against PEFT's own ``merge_and_unload`` of the original adapter.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from peftcli.cli import cli
from tests.helpers import batch, output_tensor

peft = pytest.importorskip("peft")

VLLM_RANKS = {1, 8, 16, 32, 64, 128, 256, 320, 512}  # vllm/config/lora.py MaxLoRARanks
LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj"]


def _invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _llama(path):
    import transformers as tf

    return tf.AutoModelForCausalLM.from_pretrained(path).eval()


def _peft_adapter(base: str, out, **lora) -> str:
    """A LoRA adapter written by PEFT on ``base`` with B ≠ 0 (init_lora_weights=False)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    cfg = LoraConfig(target_modules=lora.pop("target_modules", LLAMA_TARGETS), init_lora_weights=False, **lora)
    get_peft_model(_llama(base), cfg).save_pretrained(str(out))
    return str(out)


def _peft_logits(base: str, adapter: str) -> torch.Tensor:
    from peft import PeftModel

    with torch.no_grad():
        return output_tensor(PeftModel.from_pretrained(_llama(base), adapter).eval()(**batch()))


def _config(path) -> dict:
    return json.load(open(os.path.join(path, "adapter_config.json")))


def _tensors(path) -> dict:
    return load_file(os.path.join(path, "adapter_model.safetensors"))


def assert_obeys_vllm_rules(path) -> None:
    """What vLLM's PEFTHelper and parse_fine_tuned_lora_name accept, stated independently."""
    config, tensors = _config(path), _tensors(path)
    assert config["r"] in VLLM_RANKS
    assert not config.get("use_dora") and not config.get("use_rslora") and not config.get("lora_bias")
    assert not config.get("rank_pattern") and not config.get("alpha_pattern")
    heads = config.get("modules_to_save") or []
    assert set(heads) <= {"classifier", "score"}
    for key, t in tensors.items():
        if any(f".{h}." in key for h in heads):  # the head's own tensors, under its module path
            continue
        assert key.endswith((".lora_A.weight", ".lora_B.weight")), key
        assert t.shape[0 if key.endswith("lora_A.weight") else 1] == config["r"], key


def _vllm_delta(path) -> dict[str, torch.Tensor]:
    """ΔW per module as every vLLM version computes it: lora_alpha / r · B · A (fp64)."""
    config, tensors = _config(path), _tensors(path)
    s = config["lora_alpha"] / config["r"]
    out = {}
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key[len("base_model.model.") : -len(".lora_A.weight")]
            b = tensors[key.replace("lora_A", "lora_B")]
            out[module] = s * b.double() @ a.double()
    return out


def _peft_delta(base: str, adapter: str) -> dict[str, torch.Tensor]:
    """ΔW per module from PEFT's merge_and_unload of ``adapter``."""
    from peft import PeftModel

    before = _llama(base).state_dict()
    merged = PeftModel.from_pretrained(_llama(base), adapter).merge_and_unload().state_dict()
    return {n[: -len(".weight")]: (merged[n].double() - w.double()) for n, w in before.items() if not torch.equal(merged[n], w)}


@pytest.fixture(scope="module")
def rank12(tiny_llama, tmp_path_factory) -> str:
    return _peft_adapter(tiny_llama, tmp_path_factory.mktemp("export") / "r12", r=12, lora_alpha=16)


def test_rank_12_is_padded_to_16_exactly(tiny_llama, rank12, tmp_path):
    out = tmp_path / "served"
    result = _invoke("export", rank12, "--to", "vllm", "-o", out)
    assert result.exit_code == 0, result.output
    assert "repaired rank" in result.stdout and "rank 16" in result.stdout
    assert_obeys_vllm_rules(out)
    config, before, after = _config(out), _tensors(rank12), _tensors(out)
    assert config["r"] == 16 and config["lora_alpha"] == pytest.approx(16 * 16 / 12, rel=1e-15)
    for key, t in before.items():  # the values are untouched: only zeros are added
        if key.endswith("lora_A.weight"):
            assert torch.equal(after[key][:12], t) and not after[key][12:].any()
        else:
            assert torch.equal(after[key][:, :12], t) and not after[key][:, 12:].any()
    ours, original = _peft_logits(tiny_llama, str(out)), _peft_logits(tiny_llama, rank12)
    assert torch.allclose(ours, original, atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(original, output_tensor(_llama(tiny_llama)(**batch())), atol=1e-3)  # not vacuous


FOLDS = {
    "rslora": dict(r=8, lora_alpha=16, use_rslora=True),  # α/√r = 5.66, not α/r = 2
    "rank_pattern": dict(r=8, lora_alpha=16, rank_pattern={"v_proj": 4}),
    "alpha_pattern": dict(r=8, lora_alpha=16, alpha_pattern={"down_proj": 3}),
    "all": dict(r=12, lora_alpha=16, use_rslora=True, rank_pattern={"v_proj": 4, "layers.1.self_attn.q_proj": 16},
                alpha_pattern={"down_proj": 3}),
}


@pytest.mark.parametrize("case", sorted(FOLDS))
def test_scaling_is_folded_into_one_alpha_exactly(tiny_llama, case, tmp_path):
    run = _peft_adapter(tiny_llama, tmp_path / "run", **FOLDS[case])
    out = tmp_path / "served"
    result = _invoke("export", run, "--to", "vllm", "-o", out, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["schema"] == "peftcli.export/1" and report["ok"] and not report["refusals"]
    assert "scaling" in {r["rule"] for r in report["repairs"]}
    assert_obeys_vllm_rules(out)
    # PEFT reads the written adapter as it reads the original ...
    assert torch.allclose(_peft_logits(tiny_llama, str(out)), _peft_logits(tiny_llama, run), atol=1e-5)
    # ... and α/r with no rsLoRA and no pattern (what every vLLM version reads) gives PEFT's ΔW.
    expected, served = _peft_delta(tiny_llama, run), _vllm_delta(out)
    assert set(served) == set(expected)
    for module, delta in expected.items():
        assert torch.allclose(served[module], delta, atol=1e-6), module


def test_an_adapter_that_obeys_every_rule_passes_check_and_exports_unchanged(tiny_llama, tmp_path):
    run = _peft_adapter(tiny_llama, tmp_path / "run", r=16, lora_alpha=32)
    result = _invoke("export", run, "--to", "vllm", "--check")
    assert result.exit_code == 0, result.output
    assert "ok" in result.stdout
    out = tmp_path / "served"
    assert _invoke("export", run, "--to", "vllm", "-o", out).exit_code == 0
    before, after = _tensors(run), _tensors(out)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert _config(out)["r"] == 16 and _config(out)["lora_alpha"] == 32


def test_check_lints_writes_nothing_and_exits_1(rank12, tmp_path):
    before = sorted(os.listdir(os.path.dirname(rank12)))
    result = _invoke("export", rank12, "--to", "vllm", "--check", "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["output"] is None and not report["ok"]
    assert [r["rule"] for r in report["repairs"]] == ["rank"]
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert sorted(os.listdir(os.path.dirname(rank12))) == before
    assert _invoke("export", rank12, "--to", "vllm", "--check", "-o", tmp_path / "x").exit_code == 2
    assert not (tmp_path / "x").exists()


def _refused(run, out, *extra):
    """Export ``run``: exit 1, one line on stderr, nothing written next to ``out``."""
    result = _invoke("export", run, "--to", "vllm", "-o", out, *extra)
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot export"), result.stderr
    assert os.listdir(os.path.dirname(out)) == [], "nothing written, not even a temporary"
    return lines[0]


def test_dora_is_refused_with_the_way_out(tiny_llama, tmp_path):
    run = _peft_adapter(tiny_llama, tmp_path / "run", r=8, lora_alpha=16, use_dora=True)
    (tmp_path / "out").mkdir()
    line = _refused(run, tmp_path / "out" / "served")
    assert "DoRA" in line and "peftcli merge" in line and "convert" in line
    check = _invoke("export", run, "--to", "vllm", "--check")
    assert check.exit_code == 1 and "FAIL dora" in check.stdout and "refused" in check.stdout


@pytest.mark.parametrize("vocabulary", ["trainable_tokens", "embedding_lora", "saved_embedding"])
def test_extra_vocabulary_and_embedding_deltas_are_refused(tiny_llama, vocabulary, tmp_path):
    lora = {
        "trainable_tokens": dict(trainable_token_indices={"embed_tokens": [5, 6]}),
        "embedding_lora": dict(target_modules=["q_proj", "embed_tokens"]),
        "saved_embedding": dict(modules_to_save=["embed_tokens"]),
    }[vocabulary]
    run = _peft_adapter(tiny_llama, tmp_path / "run", r=8, lora_alpha=16, **lora)
    (tmp_path / "out").mkdir()
    line = _refused(run, tmp_path / "out" / "served")
    assert "vLLM serves no embedding deltas or extra vocabulary" in line and "peftcli merge" in line


def test_a_rank_above_max_lora_rank_is_refused_and_a_bad_one_is_a_usage_error(rank12, tmp_path):
    (tmp_path / "out").mkdir()
    line = _refused(rank12, tmp_path / "out" / "served", "--max-lora-rank", "8")
    assert "rank 12 is above --max-lora-rank 8" in line and "--to lora --rank" in line
    result = _invoke("export", rank12, "--to", "vllm", "-o", tmp_path / "x", "--max-lora-rank", "12")
    assert result.exit_code == 2 and "--max-lora-rank 12" in result.stderr and not (tmp_path / "x").exists()
    result = _invoke("export", rank12, "--to", "vllm", "-o", tmp_path / "y", "--max-lora-rank", "32")
    assert result.exit_code == 0 and _config(tmp_path / "y")["r"] == 16  # the next allowed rank, within the cap


def test_other_methods_are_refused_naming_the_method(tiny_llama, tmp_path):
    from peft import IA3Config, get_peft_model

    from peftcli.injection import inject
    from peftcli.methods.prompting.prefix import PrefixTuningConfig

    ia3 = str(tmp_path / "ia3")
    get_peft_model(_llama(tiny_llama), IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                  feedforward_modules=["down_proj"])).save_pretrained(ia3)
    prefix = str(tmp_path / "prefix")
    inject(tiny_llama, "prefix", PrefixTuningConfig(virtual_tokens=4), prefix)
    (tmp_path / "out").mkdir()
    line = _refused(ia3, tmp_path / "out" / "a")
    assert "its method is ia3, and vLLM serves LoRA adapters only" in line and "peftcli merge BASE" in line
    line = _refused(prefix, tmp_path / "out" / "b")
    assert "its method is prefix" in line and "does not fold" in line


class _Headed(torch.nn.Module):
    """A classifier whose head sits at ``head.score``: vLLM accepts the entry ``score`` only."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.proj = torch.nn.Linear(16, 16)
        self.head = torch.nn.Module()
        self.head.score = torch.nn.Linear(16, 3)

    def forward(self, x):
        return self.head.score(torch.relu(self.proj(x)))


def test_a_head_listed_by_its_path_is_renamed_and_peft_loads_it_the_same(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(_Headed(), LoraConfig(r=12, lora_alpha=8, target_modules=["proj"], modules_to_save=["head.score"],
                                                 init_lora_weights=False))
    with torch.no_grad():
        model.base_model.model.head.score.modules_to_save["default"].weight.add_(1.0)  # a trained head
    run, out = str(tmp_path / "run"), tmp_path / "served"
    model.save_pretrained(run)
    assert _config(run)["modules_to_save"] == ["head.score"]
    result = _invoke("export", run, "--to", "vllm", "-o", out)
    assert result.exit_code == 0, result.output
    assert "repaired saved-modules" in result.stdout
    assert_obeys_vllm_rules(out)
    assert _config(out)["modules_to_save"] == ["score"]
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        original = PeftModel.from_pretrained(_Headed(), run).eval()(x)
        served = PeftModel.from_pretrained(_Headed(), str(out)).eval()(x)
        assert not torch.allclose(original, _Headed()(x), atol=1e-3)
    assert torch.allclose(served, original, atol=1e-5)


def test_another_saved_module_is_refused(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_Headed(), LoraConfig(r=8, target_modules=["head.score"], modules_to_save=["proj"]))
    run = str(tmp_path / "run")
    model.save_pretrained(run)
    (tmp_path / "out").mkdir()
    line = _refused(run, tmp_path / "out" / "served")
    assert "modules_to_save holds proj" in line and "classifier or score" in line


def test_an_output_inside_the_input_is_refused(rank12):
    result = _invoke("export", rank12, "--to", "vllm", "-o", os.path.join(rank12, "served"))
    assert result.exit_code == 2 and not os.path.exists(os.path.join(rank12, "served"))


@pytest.mark.parametrize("edit, says", [
    ({"rank_pattern": {"(": 4}}, "invalid adapter_config.json rank_pattern regex '('"),
    ({"alpha_pattern": {"q_proj": "x"}}, "alpha_pattern['q_proj'] must be a positive number"),
    ({"rank_pattern": {"q_proj": 0}}, "rank_pattern['q_proj'] must be a positive integer"),
    ({"rank_pattern": {"q_proj": 4}}, "rank 12 in the tensors but 4 in the config"),
    ({"alpha_pattern": {"q_proj": 1e300}}, "lora_B times its scale ratio"),
])
def test_a_corrupt_pattern_is_one_line_of_bad_input(rank12, edit, says, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    config = {**_config(rank12), **edit}
    (run / "adapter_config.json").write_text(json.dumps(config))
    (run / "adapter_model.safetensors").write_bytes(open(os.path.join(rank12, "adapter_model.safetensors"), "rb").read())
    (tmp_path / "out").mkdir()
    result = _invoke("export", run, "--to", "vllm", "-o", tmp_path / "out" / "served")
    assert result.exit_code == 1 and says in result.stderr and len(result.stderr.splitlines()) == 1, result.stderr
    assert os.listdir(tmp_path / "out") == []


def test_the_library_call_and_force(rank12, tmp_path):
    from peftcli.errors import UsageError
    from peftcli.serving import ExportOptions, export

    report = export(rank12, ExportOptions(check=True))
    assert not report.ok and [f.rule for f in report.repairs] == ["rank"] and report.written_rank is None
    out = tmp_path / "served"
    out.mkdir()
    with pytest.raises(UsageError):
        export(rank12, ExportOptions(output=str(out)))  # an existing output is replaced only with force
    assert os.listdir(out) == []
    report = export(rank12, ExportOptions(output=str(out), force=True))
    assert report.ok and report.written_rank == 16 and _config(out)["r"] == 16
    with pytest.raises(UsageError):
        ExportOptions(to="llama.cpp", output=str(out))
