"""Training on a low-precision base: ``--base-dtype``, ``--quantize nf4`` (QLoRA), ``--gradient-checkpointing``.

References are independent of the code under test where they can be: NF4's published
codebook and block sizes (and bitsandbytes' own quantiser where it is installed), PEFT
loading the trained adapter, and the same gradients computed without checkpointing.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from peftcli.attach import load_adapted, load_base_model
from peftcli.cli import cli
from peftcli.injection import inject
from peftcli.methods.lora import LoraConfig
from peftcli.methods.prompting.prefix import PrefixTuningConfig
from peftcli.methods.prompting.prompt import PromptTuningConfig
from peftcli.quantize import nf4
from peftcli.training import precision
from peftcli.training import state as ckpt_state
from peftcli.training.config import TrainConfig
from peftcli.training.loop import train
from tests.helpers import batch, lm_rows, randomize_

# QLoRA paper, appendix E / bitsandbytes' NF4 table: 8 levels ≥ 0 and 7 < 0 from normal
# quantiles, ±1 exact and 0 exact; blocks of 64 weights, absmaxes in blocks of 256.
NF4_PUBLISHED = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]


@pytest.fixture(scope="module")
def lm_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("lowprec") / "lm.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lm_rows(32)))
    return str(path)


def _lora_run(base, tmp_path, name="run"):
    run = str(tmp_path / name)
    inject(base, "lora", LoraConfig(rank=4), run)
    return run


def _cfg(data, **kw):
    return TrainConfig(data=data, steps=kw.pop("steps", 3), batch_size=4, lr=kw.pop("lr", 1e-2), **kw)


# --- --base-dtype ------------------------------------------------------------------------------


def test_bf16_base_keeps_phi_and_optimizer_fp32_and_the_adapter_format(tiny_llama, lm_data, tmp_path):
    ref = _lora_run(tiny_llama, tmp_path, "fp32")
    train(ref, _cfg(lm_data))
    run = _lora_run(tiny_llama, tmp_path, "bf16")
    _, adapted = train(run, _cfg(lm_data, base_dtype="bf16"), return_model=True)

    phi = {id(p) for p in adapted.phi_parameters().values()}
    base = [p for p in adapted.model.parameters() if id(p) not in phi]
    assert base and all(p.dtype == torch.bfloat16 and not p.requires_grad for p in base)
    assert all(p.dtype == torch.float32 for p in adapted.phi_parameters().values())
    saved = ckpt_state.load_state(ckpt_state.latest_checkpoint(run))["optimizer"]["state"]
    moments = [t for s in saved.values() for k, t in s.items() if k in ("exp_avg", "exp_avg_sq")]
    assert moments and all(t.dtype == torch.float32 for t in moments)

    ours, theirs = load_file(os.path.join(run, "adapter_model.safetensors")), load_file(os.path.join(ref, "adapter_model.safetensors"))
    assert sorted(ours) == sorted(theirs)
    assert all(ours[k].dtype == torch.float32 and ours[k].shape == theirs[k].shape for k in ours)
    assert json.load(open(os.path.join(run, "adapter_config.json"))) == json.load(open(os.path.join(ref, "adapter_config.json")))
    assert not torch.equal(ours["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"], torch.zeros_like(theirs["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]))
    assert json.load(open(os.path.join(run, "train_args.json")))["base_dtype"] == "bf16"


def test_bf16_classification_head_trains_in_fp32(tiny_bert, tmp_path):
    rows = [{"text": f"w{4 + i % 9} w{20 + i % 5}", "label": "a" if i % 2 else "b"} for i in range(16)]
    data = tmp_path / "cls.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = _lora_run(tiny_bert, tmp_path)
    _, adapted = train(run, _cfg(str(data), base_dtype="bf16", steps=2), return_model=True)
    heads = [k for k in adapted.phi_parameters() if "classifier" in k]
    assert heads and all(adapted.phi_parameters()[k].dtype == torch.float32 for k in heads)
    assert all(t.dtype == torch.float32 for t in load_file(os.path.join(run, "adapter_model.safetensors")).values())


def test_default_base_dtype_is_fp32_on_cpu_and_the_checkpoints_on_cuda(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text(json.dumps({"dtype": "bfloat16"}))
    cuda = torch.device("cuda")
    assert precision.base_dtype(None, str(tmp_path), torch.device("cpu")) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert precision.base_dtype(None, str(tmp_path), cuda) == torch.bfloat16
    assert precision.base_dtype("fp16", str(tmp_path), cuda) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert precision.base_dtype(None, str(tmp_path), cuda) == torch.float32  # an older GPU: as before
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "float16"}))
    assert precision.base_dtype(None, str(tmp_path), cuda) == torch.float16


# --- NF4 ---------------------------------------------------------------------------------------


def test_nf4_codebook_block_sizes_and_round_trip_bound():
    assert list(nf4.NF4_CODE) == NF4_PUBLISHED and (nf4.BLOCK, nf4.BLOCK2) == (64, 256)
    dyn = nf4.dynamic_map()
    assert dyn.numel() == 256 and bool((dyn[1:] > dyn[:-1]).all()) and dyn[-1] == 1.0 and 0.0 in dyn.tolist()

    g = torch.Generator().manual_seed(0)
    w = torch.randn(70, 45, generator=g) * torch.rand(70, 1, generator=g) * 3  # 3150: a short last block
    q = nf4.quantize(w)
    assert q.packed.dtype == torch.uint8 and q.packed.numel() == (w.numel() + 1) // 2
    assert q.qabsmax.numel() == -(-w.numel() // 64) and q.absmax2.numel() == -(-q.qabsmax.numel() // 256)
    # fp64 reference: nearest level times the true absmax, then the absmax's own error.
    flat = w.reshape(-1).double()
    true_max = torch.nn.functional.pad(flat.abs(), (0, -flat.numel() % 64)).view(-1, 64).max(1).values
    got_max = nf4.block_absmax(q).double()
    levels = torch.tensor(NF4_PUBLISHED, dtype=torch.float64)
    scale = true_max.repeat_interleave(64)[: flat.numel()]
    nearest = levels[(flat / scale).unsqueeze(1).sub(levels).abs().argmin(1)] * scale
    absmax_step = max(float((dyn[1:] - dyn[:-1]).max()) / 2 * float(q.absmax2.max()), 1e-12)
    assert float((got_max - true_max).abs().max()) <= absmax_step
    back = nf4.dequantize(q).double().reshape(-1)
    err_absmax = (got_max - true_max).abs().repeat_interleave(64)[: flat.numel()]
    assert bool(((back - nearest).abs() <= err_absmax + 1e-6).all())
    assert float((back - flat).abs().max()) <= float((levels[1:] - levels[:-1]).max()) / 2 * float(true_max.max()) + absmax_step
    # values on the grid of their block come back up to the absmax's error alone
    exact = torch.tensor(NF4_PUBLISHED * 4) * 0.5
    assert torch.allclose(nf4.dequantize(nf4.quantize(exact)), exact, atol=1e-6)


def test_nf4_matches_bitsandbytes_bit_for_bit():
    bnb = pytest.importorskip("bitsandbytes.functional")
    for shape, dtype in (((64, 96), torch.bfloat16), ((33, 70), torch.float32), ((5, 3), torch.float16), ((300, 640), torch.float32)):
        w = (torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 2).to(dtype)
        theirs, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
        ours = nf4.quantize(w)
        assert torch.equal(theirs.view(-1), ours.packed)  # the 4-bit indices, packed alike
        assert torch.equal(state.absmax, nf4._blockwise(w.reshape(-1).float(), 64, torch.tensor(nf4.NF4_CODE))[1])
        packed, nested = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        assert torch.equal(nested.offset, ours.offset) and torch.equal(nested.state2.absmax, ours.absmax2)
        # bitsandbytes' C kernel finds the dynamic level by a binary search that may pick a
        # neighbour of the nearest: ours is the same index or a nearer level.
        dyn = nf4.dynamic_map()
        scale = ours.absmax2.repeat_interleave(256)[: state.absmax.numel()]
        mine, its = dyn[ours.qabsmax.long()], dyn[nested.absmax.long()]
        live = scale > 0  # a block of equal absmaxes has scale 0: every index gives the same value
        target = (state.absmax - ours.offset)[live] / scale[live]
        assert bool(((mine[live] - target).abs() <= (its[live] - target).abs()).all())
        nested.absmax = ours.qabsmax  # our indices through bitsandbytes' dequantisation: the same values
        assert torch.equal(nf4.dequantize(ours, dtype), bnb.dequantize_4bit(packed, nested))
        # the op the CUDA path calls, called here on the CPU with the same arguments
        fused = nf4._bnb_kernel()(ours.packed.unsqueeze(1), nf4.block_absmax(ours), 64, "nf4", ours.shape, dtype)
        assert torch.equal(fused, nf4.dequantize(ours, dtype))
        assert float((nested.absmax.int() != ours.qabsmax.int()).float().mean()) < 0.05


def _quantized_linears(model):
    return [m for m in model.modules() if isinstance(m, nf4.NF4Linear)]


def test_nf4_trained_lora_loads_in_peft_on_the_dequantised_base(tiny_llama, lm_data, tmp_path):
    from peft import PeftModel

    run = _lora_run(tiny_llama, tmp_path)
    _, adapted = train(run, _cfg(lm_data, quantize="nf4"), return_model=True)
    layers = _quantized_linears(adapted.model)
    assert len(layers) == 2 * 7  # q k v o gate up down in each of 2 layers; lm_head kept
    assert adapted.model.lm_head.__class__ is torch.nn.Linear
    assert all(p.dtype == torch.float32 for p in adapted.phi_parameters().values())
    inputs = batch(seed=3, vocab=40)
    adapted.eval()
    with torch.no_grad():
        ours = adapted(**inputs).logits

    base = load_base_model(tiny_llama, "AutoModelForCausalLM")  # the dequantised base, built independently
    with torch.no_grad():
        for name, layer in base.named_modules():
            if isinstance(layer, torch.nn.Linear) and name != "lm_head":
                layer.weight.copy_(nf4.dequantize(nf4.quantize(layer.weight)))
    peft_model = PeftModel.from_pretrained(base, run).eval()
    with torch.no_grad():
        theirs = peft_model(**inputs).logits
    assert float((ours - theirs).abs().max()) <= 1e-4
    lora_b = load_file(os.path.join(run, "adapter_model.safetensors"))["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert float(lora_b.abs().max()) > 0  # trained: the comparison is not of a zero update

    bf16 = PeftModel.from_pretrained(load_base_model(tiny_llama, "AutoModelForCausalLM", dtype=torch.bfloat16), run)
    loaded = dict(bf16.named_parameters())["base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"]
    assert torch.allclose(loaded.float(), lora_b, atol=1e-2)  # a plain LoRA on a bf16 base


def test_nf4_resume_uses_the_recorded_options(tiny_llama, lm_data, tmp_path):
    run = _lora_run(tiny_llama, tmp_path)
    train(run, _cfg(lm_data, quantize="nf4", steps=2))
    assert json.load(open(os.path.join(run, "train_args.json")))["quantize"] == "nf4"
    summary, adapted = train(run, resume=True, steps=3, return_model=True)
    assert summary["steps"] == 3 and _quantized_linears(adapted.model)


def test_nf4_linear_backward_matches_dense():
    layer = torch.nn.Linear(80, 24)
    q = nf4.NF4Linear(layer, transposed=False)
    x = torch.randn(3, 80, requires_grad=True)
    q(x).square().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(x2, nf4.dequantize(nf4.quantize(layer.weight)), layer.bias).square().sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-5)


# --- gradient checkpointing ----------------------------------------------------------------------


def _grads(base, run, checkpointing, model_class=None):
    torch.manual_seed(7)  # a classification head is initialised at load: the same one each time
    adapted = load_adapted(base, run, model_class)
    randomize_(adapted.phi_parameters().values(), seed=5)
    adapted.train()
    calls = []
    # inside the checkpointed forward of the first block; a recomputation may stop early: count starts
    first = next(m for m in adapted.model.modules() if getattr(m, "layer_idx", None) == 0)
    first.register_forward_pre_hook(lambda *a: calls.append(1))
    if checkpointing:
        precision.enable_checkpointing(adapted, base)
    for p in adapted.phi_parameters().values():
        p.requires_grad_(True)
    inputs = batch(seed=2, vocab=40)
    labels = inputs["input_ids"] if model_class is None else torch.tensor([0, 1])
    torch.manual_seed(0)  # dropout is on: the same masks, with or without recomputation
    adapted(**inputs, labels=labels).loss.backward()
    return {k: p.grad.clone() for k, p in adapted.phi_parameters().items()}, len(calls)


@pytest.mark.parametrize("method", ["lora", "prompt", "prefix", "prefix-bert"])
def test_gradient_checkpointing_same_gradients(tiny_llama, tiny_bert, tmp_path, method):
    cfg = {"lora": LoraConfig(rank=4, dropout=0.1), "prompt": PromptTuningConfig(virtual_tokens=3),
           "prefix": PrefixTuningConfig(virtual_tokens=3, projection=16), "prefix-bert": PrefixTuningConfig(virtual_tokens=3)}[method]
    base, model_class = (tiny_bert, "BertForSequenceClassification") if method == "prefix-bert" else (tiny_llama, None)
    run = str(tmp_path / method)
    inject(base, method.split("-")[0], cfg, run)
    plain, plain_calls = _grads(base, run, False, model_class)
    checked, checked_calls = _grads(base, run, True, model_class)
    assert (plain_calls, checked_calls) == (1, 2)  # the block really ran again in the backward
    assert plain.keys() == checked.keys()
    for k in plain:
        assert float(plain[k].abs().max()) > 0, k
        assert torch.allclose(plain[k], checked[k], atol=1e-5, rtol=0), k


def test_gradient_checkpointing_run_records_it(tiny_llama, lm_data, tmp_path):
    run = _lora_run(tiny_llama, tmp_path)
    summary = train(run, _cfg(lm_data, gradient_checkpointing=True, steps=2))
    assert summary["steps"] == 2 and json.load(open(os.path.join(run, "train_args.json")))["gradient_checkpointing"] is True


# --- bad inputs: one line, a hint, nothing written -------------------------------------------------


def _snapshot(run):
    return {n: open(os.path.join(run, n), "rb").read() for n in sorted(os.listdir(run))}


def _refused(run, args, code, *words):
    before = _snapshot(run)
    result = CliRunner().invoke(cli, ["train", run, *args])
    assert result.exit_code == code, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and lines[0].endswith(")"), result.output
    assert all(w in lines[0] for w in words), lines[0]
    assert _snapshot(run) == before


def test_quantize_without_linear_layers_to_quantise():
    # Every transformer block has linear layers, and a model without blocks cannot take an
    # adapter: the refusal is checked on the function the loop calls before writing anything.
    from peftcli.errors import BadInputError

    lm = torch.nn.Sequential(torch.nn.Embedding(8, 4), torch.nn.LayerNorm(4))
    lm.get_output_embeddings = lambda: None
    with pytest.raises(BadInputError) as err:
        precision.quantize_frozen_linears(lm, "tiny/")
    assert "no frozen linear layer to quantise" in err.value.message and "drop `quantize`" in err.value.hint
    head = torch.nn.Linear(4, 8)
    lm.append(head)
    lm.get_output_embeddings = lambda: head  # the output projection alone stays as it is
    with pytest.raises(BadInputError):
        precision.quantize_frozen_linears(lm, "tiny/")


def test_low_precision_refused_for_a_method_training_base_tensors(tiny_gpt2, lm_data, tmp_path):
    from peftcli.methods.bitfit import BitFitConfig

    run = str(tmp_path / "bitfit")
    inject(tiny_gpt2, "bitfit", BitFitConfig(), run)
    _refused(run, ["--data", lm_data, "--base-dtype", "bf16", "--steps", "1"], 2, "bitfit", "--base-dtype bf16")
    _refused(run, ["--data", lm_data, "--quantize", "nf4", "--steps", "1"], 2, "bitfit", "--quantize nf4")


def test_base_dtype_the_device_cannot_run(tiny_llama, lm_data, tmp_path, monkeypatch):
    run = _lora_run(tiny_llama, tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla V100")
    _refused(run, ["--data", lm_data, "--device", "cuda", "--base-dtype", "bf16", "--steps", "1"], 2, "cannot compute in bf16", "fp16")


@pytest.mark.parametrize("args", [["--base-dtype", "fp8"], ["--quantize", "int3"]])
def test_unknown_precision_values(tiny_llama, lm_data, tmp_path, args):
    run = _lora_run(tiny_llama, tmp_path)
    _refused(run, ["--data", lm_data, *args], 2, args[0])


# --- fp16: dynamic loss scaling ------------------------------------------------------------------


def test_loss_scaling_recovers_fp16_gradients_that_underflow():
    # Why an fp16 base needs it: a gradient of 1e-8 through an fp16 activation is 0 unscaled.
    layer = torch.nn.Linear(8, 8).half()
    phi = torch.nn.Parameter(torch.full((8,), 1e-3))
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))

    def grad(scaler):
        phi.grad = None
        loss = (layer((x * phi).half()).float() * 1e-8).sum()
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if scaler is not None:
            scaler.unscale_(torch.optim.SGD([phi], lr=0.0))
        return phi.grad.clone()

    import copy

    exact = copy.deepcopy(layer).double()  # the reference: the same weights in fp64
    p64 = phi.detach().double().requires_grad_()
    (exact(x.double() * p64) * 1e-8).sum().backward()
    reference = p64.grad.float()
    assert torch.count_nonzero(grad(None)) == 0  # underflowed: φ would not move
    scaled = grad(precision.loss_scaler(torch.float16, torch.device("cpu")))
    assert torch.allclose(scaled, reference, rtol=2e-2)
    assert precision.loss_scaler(torch.bfloat16, torch.device("cpu")) is None and precision.loss_scaler(torch.float32, torch.device("cpu")) is None


def test_fp16_base_skips_overflowing_steps_and_resumes_with_its_scale(tiny_llama, lm_data, tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "INIT_SCALE", 2.0**34)  # far too high: the first steps overflow
    run = _lora_run(tiny_llama, tmp_path)
    summary = train(run, _cfg(lm_data, base_dtype="fp16", steps=30, save_every=15, keep_checkpoints=5))
    scale = summary["loss_scale"]
    assert 0 < scale["skipped_steps"] < 30 and scale["final"] < 2.0**34 and summary["steps"] == 30
    saved = load_file(os.path.join(run, "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in saved.values())
    assert any(not torch.equal(t, torch.zeros_like(t)) for k, t in saved.items() if "lora_B" in k)  # it trained
    assert [json.loads(line)["step"] for line in open(os.path.join(run, "metrics.jsonl"))][-1] == 30

    # Resumed from step 15, the run goes on from the saved scale: the same adapter, bit for bit.
    again = str(tmp_path / "again")
    import shutil

    shutil.copytree(run, again)
    shutil.rmtree(os.path.join(again, "checkpoints", "step-0000030"))
    os.unlink(os.path.join(again, "adapter_model.safetensors"))
    resumed = train(again, resume=True)
    assert resumed["loss_scale"] == scale
    assert open(os.path.join(again, "adapter_model.safetensors"), "rb").read() == open(os.path.join(run, "adapter_model.safetensors"), "rb").read()


def test_fp16_gradients_overflowing_at_any_scale_stop_the_run(tiny_llama, lm_data, tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "INIT_SCALE", 2.0**34)
    monkeypatch.setattr(precision, "MIN_SCALE", 2.0**32)  # two halvings and the scale is "too low"
    run = _lora_run(tiny_llama, tmp_path)
    from peftcli.errors import BadInputError

    with pytest.raises(BadInputError, match="overflow fp16 even at loss scale"):
        train(run, _cfg(lm_data, base_dtype="fp16", steps=10))
