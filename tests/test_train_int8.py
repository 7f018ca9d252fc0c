"""``train --quantize int8``: frozen linear weights held as int8 rows with one fp32 scale each.

References: the row-absmax formula computed in fp64 here (and bitsandbytes' own quantiser
where it is installed), PEFT loading the trained adapter on the independently dequantised
base, and the bytes each layer holds against ``check --train``'s count.
"""

from __future__ import annotations

import json

import pytest
import torch

from peftcli.attach import load_base_model
from peftcli.injection import inject
from peftcli.methods.lora import LoraConfig
from peftcli.quantize import int8, on_load
from peftcli.training import precision
from peftcli.training.config import TrainConfig
from peftcli.training.loop import train
from peftcli.training.memory import TrainMemoryOptions, predict
from tests.helpers import batch, lm_rows


@pytest.fixture(scope="module")
def lm_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("int8") / "lm.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lm_rows(16)))
    return str(path)


def test_rows_are_rounded_to_127_levels_of_their_absmax():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 80, generator=g) * torch.logspace(-3, 1, 24).unsqueeze(1)
    w[5] = 0.0  # a zero row stays zero, with no division by zero
    cb, scb = int8.quantize(w)
    wd = w.double()
    absmax = wd.abs().amax(dim=1)
    expected = torch.round(wd * (127.0 / torch.where(absmax > 0, absmax, torch.ones_like(absmax))).unsqueeze(1))
    assert cb.dtype == torch.int8 and torch.equal(cb.long(), expected.long())
    assert torch.equal(scb, w.abs().amax(dim=1))
    back = int8.dequantize(cb, scb).double()
    assert bool(((back - wd).abs() <= absmax.unsqueeze(1) / 254 + 1e-6).all())  # half a level at most
    assert torch.equal(back[5], torch.zeros(80, dtype=torch.float64))


def test_the_same_rows_as_bitsandbytes():
    functional = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    cb, scb, _ = functional.int8_vectorwise_quant(w.half())
    ours_cb, ours_scb = int8.quantize(w.half())
    assert torch.equal(cb.cpu(), ours_cb) and torch.allclose(scb.cpu().float(), ours_scb)


def test_int8_trained_lora_loads_in_peft_on_the_dequantised_base(tiny_llama, lm_data, tmp_path):
    from peft import PeftModel

    run = str(tmp_path / "run")
    inject(tiny_llama, "lora", LoraConfig(rank=4), run)
    _, adapted = train(run, TrainConfig(data=lm_data, steps=3, batch_size=4, lr=1e-2, quantize="int8"), return_model=True)
    layers = [m for m in adapted.model.modules() if isinstance(m, int8.Int8Linear)]
    assert len(layers) == 2 * 7 and adapted.model.lm_head.__class__ is torch.nn.Linear
    inputs = batch(seed=3, vocab=40)
    adapted.eval()
    with torch.no_grad():
        ours = adapted(**inputs).logits

    base = load_base_model(tiny_llama, "AutoModelForCausalLM")  # the dequantised base, built independently
    with torch.no_grad():
        for name, layer in base.named_modules():
            if isinstance(layer, torch.nn.Linear) and name != "lm_head":
                w = layer.weight.double()
                absmax = w.abs().amax(dim=1, keepdim=True)
                layer.weight.copy_(torch.round(w * 127 / absmax) * absmax / 127)
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(base, run).eval()(**inputs).logits
    assert float((ours - theirs).abs().max()) <= 1e-4


def test_deferred_int8_base_equals_loading_whole(tiny_llama, tmp_path):
    from peftcli.artifacts.adapter_dir import read_adapter
    from peftcli.attach import attach_adapter

    run = str(tmp_path / "run")
    inject(tiny_llama, "lora", LoraConfig(rank=4), run)
    adapter = read_adapter(run)
    whole = attach_adapter(load_base_model(tiny_llama, "AutoModelForCausalLM"), adapter)
    precision.quantize_frozen_linears(whole.model, tiny_llama, scheme="int8")
    model, _, deferred = on_load.load_deferred(tiny_llama, torch.float32)
    adapted = attach_adapter(model, adapter)
    precision.quantize_frozen_linears(adapted.model, tiny_llama, deferred, scheme="int8")
    ours, theirs = adapted.model.state_dict(), whole.model.state_dict()
    assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs)

    predicted = predict(tiny_llama, run, TrainMemoryOptions(batch_size=2, max_length=16, quantize="int8"))
    held = sum(t.numel() * t.element_size() for m in adapted.model.modules() for t in m.buffers(recurse=False) if isinstance(m, int8.Int8Linear))
    kept = sum(p.numel() * p.element_size() for n, p in adapted.model.named_parameters() if "lora_" not in n)
    assert predicted.details["weights_as"].startswith("int8 linears")
    assert 0 <= predicted.weights - (held + kept) <= 1024  # the held bytes, buffers aside
