"""The Python front door: every command is a function of ``peftcli`` taking paths and one
options class, and the verbs compose as the CLI's do, with the numbers held against
independent references (transformers loading the merged files, the adapter's own forward)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import peftcli
from tests.helpers import lm_rows

ROOT = __import__("os").path.dirname(__import__("os").path.dirname(__file__))


def test_import_peftcli_loads_no_torch_and_every_exported_name_resolves():
    code = (
        "import json, sys, peftcli\n"
        "heavy = [m for m in ('torch', 'transformers', 'numpy', 'safetensors') if m in sys.modules]\n"
        "missing = [n for n in peftcli.__all__ if getattr(peftcli, n, None) is None]\n"
        "print(json.dumps([heavy, missing, 'torch' in sys.modules, callable(peftcli.merge)]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    heavy, missing, torch_after, merge_callable = json.loads(proc.stdout)
    assert heavy == []  # importing peftcli is instant: no torch until a verb is used
    assert missing == [] and merge_callable
    assert torch_after  # resolving the names really loaded the verbs' modules


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'mergee'"):
        peftcli.mergee  # noqa: B018


def test_a_bad_option_is_a_usage_error_with_a_hint_when_its_class_is_built():
    with pytest.raises(peftcli.UsageError) as info:
        peftcli.MergeOptions(weights=[float("inf")])
    assert info.value.hint and "weights" in info.value.message
    with pytest.raises(peftcli.UsageError):
        peftcli.LoraConfig(rank=0)


@pytest.fixture(scope="module")
def trained(tiny_llama, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api")
    data = tmp / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in lm_rows(16)))
    run = str(tmp / "lora")
    budget = peftcli.inject(tiny_llama, "lora", peftcli.LoraConfig(rank=4), run)
    peftcli.train(run, peftcli.TrainConfig(data=str(data), steps=3, batch_size=4, lr=1e-2, threads=1))
    return tmp, run, str(data), budget


def test_the_verbs_compose_and_agree_with_transformers(tiny_llama, trained):
    from transformers import AutoModelForCausalLM

    tmp, run, data, budget = trained
    with peftcli.open_checkpoint(run) as adapter:  # the budget is what inject wrote
        assert budget.trainable == sum(t.numel for t in adapter.tensors.values())

    ids = torch.tensor([[5, 9, 13, 17, 21, 25]])
    adapted = peftcli.load_adapted(tiny_llama, run)
    with torch.no_grad():
        want = adapted(input_ids=ids).logits

    merged = str(tmp / "merged")
    report = peftcli.merge(tiny_llama, [run], merged, peftcli.MergeOptions())
    assert report.changed > 0
    model = AutoModelForCausalLM.from_pretrained(merged).eval()
    with torch.no_grad():
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)

    # diff of the merge against the base = the adapter's exact ΔW as convert writes it
    from_diff = str(tmp / "merged.diff")
    peftcli.diff(tiny_llama, merged, from_diff, peftcli.DiffOptions(dense=True))
    converted = str(tmp / "lora.diff")
    peftcli.convert(run, converted, peftcli.ConvertOptions(target="diff", diff={"dense": True}))
    doubled = str(tmp / "doubled.diff")
    peftcli.combine([converted], peftcli.CombineOptions(op="scale", by=2.0), doubled)
    check = peftcli.check(tiny_llama, [run, from_diff, converted, doubled], peftcli.CheckOptions())
    assert check.ok, check.to_json()

    twice = str(tmp / "twice")
    peftcli.merge(tiny_llama, [converted, converted], twice, peftcli.MergeOptions())
    again = str(tmp / "again")
    peftcli.merge(tiny_llama, [doubled], again, peftcli.MergeOptions())
    with peftcli.open_checkpoint(twice) as a, peftcli.open_checkpoint(again) as b, peftcli.open_checkpoint(merged) as m:
        name = "model.layers.0.self_attn.q_proj.weight"
        torch.testing.assert_close(a.get(name), b.get(name), rtol=0, atol=1e-6)
        with peftcli.open_checkpoint(tiny_llama) as base:
            delta = m.get(name).double() - base.get(name).double()
            torch.testing.assert_close(a.get(name).double() - base.get(name).double(), 2 * delta, rtol=0, atol=1e-6)


def test_inspect_export_and_evaluate_from_python(trained):
    tmp, run, data, _ = trained
    doc = peftcli.inspect(run, peftcli.InspectOptions())
    assert doc["format"] and doc["num_params"] > 0
    lint = peftcli.export(run, peftcli.ExportOptions(check=True, max_lora_rank=8))
    assert lint.check and [f.rule for f in lint.findings] == ["rank"]  # r=4 pads to 8
    served = peftcli.export(run, peftcli.ExportOptions(output=str(tmp / "served")))
    assert served.written_rank == 8 and served.ok
    result = peftcli.evaluate(run, peftcli.EvalOptions(data=data, threads=1))
    assert result["schema"] == "peftcli.evaluate/1" and 0 < result["eval_loss"] < float("inf")
