"""merge BNB_NF4_DIR RUN -o OUT_DIR: a LoRA folded into a bitsandbytes NF4 checkpoint, written back NF4.

The always-run tests build the NF4 directory in bitsandbytes' storage layout (packed codes
[n/2, 1], absmax, quant_map, nested_*, the quant_state JSON as uint8) from the tiny Llama with
peftcli's ``quantize.nf4`` (checked bit for bit against bitsandbytes in tests/test_quantize),
and hold the report to an fp64 computation: W dequantised here from the stored bytes, ΔW =
(α/r)·B·A from the adapter's own files, the written tensors dequantised here again. The
bitsandbytes tests (skipped where it is not installed) use a real transformers + bitsandbytes
``save_pretrained`` and load the output back with transformers.
"""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from peftcli.cli import cli
from peftcli.injection import inject
from peftcli.methods.lora import LoraConfig
from peftcli.quantize import nf4
from tests.helpers import assert_error, randomize_

STATE = ".quant_state.bitsandbytes__nf4"
QCONFIG = {"_load_in_4bit": True, "_load_in_8bit": False, "bnb_4bit_compute_dtype": "float32", "bnb_4bit_quant_storage": "uint8",
           "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True, "llm_int8_enable_fp32_cpu_offload": False,
           "llm_int8_has_fp16_weight": False, "llm_int8_skip_modules": None, "llm_int8_threshold": 6.0, "load_in_4bit": True,
           "load_in_8bit": False, "quant_method": "bitsandbytes"}
TARGETS = "q_proj,v_proj,down_proj"


def _nf4_dir(source: str, out: str, double: bool) -> str:
    """``source`` as transformers saves it quantized with bitsandbytes NF4 (every *_proj weight)."""
    shutil.copytree(source, out)
    tensors = {}
    for name, t in load_file(os.path.join(source, "model.safetensors")).items():
        if not name.endswith("proj.weight"):
            tensors[name] = t
            continue
        q = nf4.quantize(t)
        state = {"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": list(t.shape)}
        tensors[name] = q.packed.reshape(-1, 1)
        tensors[name + ".quant_map"] = torch.tensor(nf4.NF4_CODE)
        if double:
            tensors[name + ".absmax"] = q.qabsmax
            tensors[name + ".nested_absmax"] = q.absmax2
            tensors[name + ".nested_quant_map"] = nf4.dynamic_map()
            state |= {"nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": q.offset.item()}
        else:  # the exact fp32 absmax of each 64-block
            tensors[name + ".absmax"] = t.reshape(-1, 64).abs().amax(1)
        tensors[name + STATE] = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    _edit_config(out, {**QCONFIG, "bnb_4bit_use_double_quant": double})
    return out


def _edit_config(directory: str, qconfig) -> None:
    path = os.path.join(directory, "config.json")
    config = json.load(open(path))
    config["quantization_config"] = qconfig
    json.dump(config, open(path, "w"))


def _dequant(tensors: dict, name: str) -> torch.Tensor:
    """The stored NF4 weight ``name`` in fp64, restated from the format (not peftcli's code)."""
    state = json.loads(bytes(tensors[name + STATE].tolist()))
    packed = tensors[name].reshape(-1).long()
    codes = torch.stack([packed >> 4, packed & 15], 1).reshape(-1)
    levels = torch.tensor(nf4.NF4_CODE, dtype=torch.float64)[codes]
    absmax = tensors[name + ".absmax"]
    if "nested_offset" in state:
        dyn = tensors[name + ".nested_quant_map"].double()[absmax.long()]
        second = tensors[name + ".nested_absmax"].double().repeat_interleave(256)[: dyn.numel()]
        absmax = dyn * second + state["nested_offset"]
    # the product in fp32, as bitsandbytes computes it
    values = (levels.float().reshape(-1, 64) * absmax.float().unsqueeze(1)).reshape(-1)
    return values.double().reshape(state["shape"])


def _lora(tiny_llama: str, out: str, scale: float) -> str:
    from peftcli.attach import load_adapted

    inject(tiny_llama, "lora", LoraConfig(targets=TARGETS), out + "-init")
    adapted = load_adapted(tiny_llama, out + "-init")
    randomize_([p for p in adapted.parameters() if p.requires_grad], seed=7, scale=0.2)
    with torch.no_grad():
        for n, p in adapted.named_parameters():
            if "lora_B" in n:
                p.mul_(scale)
    adapted.save(out)
    return out


def _deltas(run: str) -> dict[str, torch.Tensor]:
    """ΔW per weight name, fp64, from the adapter's files: (α/r)·B·A."""
    cfg = json.load(open(os.path.join(run, "adapter_config.json")))
    tensors = load_file(os.path.join(run, "adapter_model.safetensors"))
    out = {}
    for key, a in tensors.items():
        if ".lora_A." in key:
            b = tensors[key.replace(".lora_A.", ".lora_B.")].double()
            out[key.split("base_model.model.", 1)[1].replace(".lora_A.weight", ".weight")] = cfg["lora_alpha"] / cfg["r"] * (b @ a.double())
    assert len(out) == 6
    return out


@pytest.fixture(scope="module", params=[True, False], ids=["double-quant", "single"])
def nf4_base(request, tiny_llama, tmp_path_factory) -> str:
    return _nf4_dir(tiny_llama, str(tmp_path_factory.mktemp("bnb") / "nf4"), request.param)


@pytest.fixture(scope="module")
def lora(tiny_llama, tmp_path_factory) -> str:
    return _lora(tiny_llama, str(tmp_path_factory.mktemp("bnb-lora") / "lora"), 1.0)


def test_merge_into_nf4_matches_fp64_and_requantizes_in_place(nf4_base, lora, tmp_path):
    out = str(tmp_path / "merged")
    result = CliRunner().invoke(cli, ["merge", nf4_base, lora, "-o", out, "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    report = json.loads(result.stdout)["nf4"]
    base, written = load_file(os.path.join(nf4_base, "model.safetensors")), load_file(os.path.join(out, "model.safetensors"))
    deltas = _deltas(lora)
    assert report["requantized"] == len(deltas) and {s["name"] for s in report["tensors"]} == set(deltas)
    assert report["tensor_types"]["NF4"] == 14 and report["below_noise"] == []
    for s in report["tensors"]:
        name, delta = s["name"], deltas[s["name"]]
        w = _dequant(base, name)
        back = _dequant(written, name)
        assert s["type"] == "NF4"
        assert math.isclose(s["delta_norm"], float(delta.norm()), rel_tol=1e-5)
        error = float((back - (w + delta)).norm())
        assert math.isclose(s["quant_error"], error, rel_tol=1e-4, abs_tol=1e-6)
        assert math.isclose(s["ratio"], s["quant_error"] / s["delta_norm"], rel_tol=1e-9)
        kept = float(((back - w) * delta).sum()) / float(delta.norm()) ** 2
        assert math.isclose(s["kept"], kept, rel_tol=1e-3, abs_tol=1e-4)
        # the written bytes are NF4 of W + ΔW (folded here in fp32): a rare code may differ where
        # the two fp32 folds round a value onto the other side of a level boundary
        expected = nf4.quantize((w + delta).float())
        assert (expected.packed != written[name].reshape(-1)).float().mean() < 1e-3
        assert torch.allclose(back, torch.from_numpy(nf4.dequantize(expected).double().numpy()), atol=0.05)
        assert written[name].shape == base[name].shape and written[name].dtype == torch.uint8
    for name, t in base.items():  # every other tensor (norms, embeddings, untargeted NF4 weights, maps) as stored
        owner = next((d for d in deltas if name == d or name.startswith(d + ".")), None)
        if owner is None or name.endswith("quant_map"):
            assert written[name].dtype == t.dtype and torch.equal(written[name], t), name
    for f in ("config.json", "tokenizer.json", "generation_config.json"):
        assert open(os.path.join(out, f), "rb").read() == open(os.path.join(nf4_base, f), "rb").read()
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        assert "peftcli.merge" in f.metadata() and f.metadata()["format"] == "pt"


def test_an_update_below_the_nf4_noise_is_warned(nf4_base, tiny_llama, tmp_path):
    small = _lora(tiny_llama, str(tmp_path / "small"), 1e-5)
    out = str(tmp_path / "merged")
    result = CliRunner().invoke(cli, ["merge", nf4_base, small, "-o", out])
    assert result.exit_code == 0, result.output + result.stderr
    assert "requantised to nf4" in result.stdout
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 6 and all("below the NF4 quantisation noise" in w for w in warnings)


def _break(base: str, how: str) -> None:
    path = os.path.join(base, "model.safetensors")
    tensors = load_file(path)
    name = "model.layers.0.self_attn.q_proj.weight"
    if how == "fp4":
        tensors[name + ".quant_state.bitsandbytes__fp4"] = tensors.pop(name + STATE)
    elif how == "missing quant_state":
        del tensors[name + STATE]
    elif how == "map":
        tensors[name + ".nested_quant_map"] = tensors[name + ".nested_quant_map"] * 2
    elif how == "not json":
        tensors[name + STATE] = torch.tensor(list(b"{nf4"), dtype=torch.uint8)
    elif how == "shape":
        state = json.loads(bytes(tensors[name + STATE].tolist()))
        state["shape"] = [64, 32]
        tensors[name + STATE] = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize("how, message", [
    ("fp4", "a 'fp4' quant_state"),
    ("missing quant_state", "missing quant_state"),
    ("shape", "implies U8 [1024, 1]"),
    ("map", "nested_quant_map is not bitsandbytes' dynamic map"),
    ("not json", "is not a quant_state JSON object"),
    ("config fp4", "bnb_4bit_quant_type 'fp4'"),
    ("config 8-bit", "8-bit (load_in_8bit)"),
    ("config unknown", "'bnb_4bit_magic' = true"),
    ("config blocksize", "'bnb_4bit_quant_storage' = \"float16\""),
])
def test_bad_nf4_bases_are_refused_by_name(how, message, tiny_llama, lora, tmp_path):
    base = _nf4_dir(tiny_llama, str(tmp_path / "nf4"), True)
    edits = {"config fp4": {"bnb_4bit_quant_type": "fp4"}, "config 8-bit": {"load_in_8bit": True, "load_in_4bit": False},
             "config unknown": {"bnb_4bit_magic": True}, "config blocksize": {"bnb_4bit_quant_storage": "float16"}}
    if how in edits:
        _edit_config(base, {**QCONFIG, **edits[how]})
    else:
        _break(base, how)
    out = str(tmp_path / "merged")
    line = assert_error(CliRunner().invoke(cli, ["merge", base, lora, "-o", out]), 1, message, out)
    assert "pre-quantized checkpoint (quant_method 'bitsandbytes')" in line


def test_a_sharded_nf4_base_keeps_its_shards(tiny_llama, lora, tmp_path):
    base = _nf4_dir(tiny_llama, str(tmp_path / "nf4"), True)
    tensors = load_file(os.path.join(base, "model.safetensors"))
    os.remove(os.path.join(base, "model.safetensors"))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2], "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, part in shards.items():
        save_file({n: tensors[n] for n in part}, os.path.join(base, file), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {n: f for f, part in shards.items() for n in part}}
    json.dump(index, open(os.path.join(base, "model.safetensors.index.json"), "w"))
    out = str(tmp_path / "merged")
    result = CliRunner().invoke(cli, ["merge", base, lora, "-o", out, "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    assert json.loads(result.stdout)["nf4"]["requantized"] == 6
    for file, part in shards.items():
        written = load_file(os.path.join(out, file))
        assert sorted(written) == sorted(part)
    assert open(os.path.join(out, "model.safetensors.index.json")).read() == open(os.path.join(base, "model.safetensors.index.json")).read()


def test_an_update_to_an_unquantized_tensor_is_refused(nf4_base, tiny_llama, tmp_path):
    run = str(tmp_path / "head")
    inject(tiny_llama, "lora", LoraConfig(targets="lm_head"), run + "-init")
    from peftcli.attach import load_adapted

    adapted = load_adapted(tiny_llama, run + "-init")
    randomize_([p for p in adapted.parameters() if p.requires_grad], seed=3)
    adapted.save(run)
    out = str(tmp_path / "merged")
    assert_error(CliRunner().invoke(cli, ["merge", nf4_base, run, "-o", out]), 1, "the merge changes lm_head.weight", out)


@pytest.mark.parametrize("extra, message", [(["--outtype", "q4_1"], "--outtype is for a .gguf base"),
                                            (["--dtype", "BF16"], "--dtype does not apply")])
def test_gguf_and_dtype_flags_are_refused_for_an_nf4_base(extra, message, nf4_base, lora, tmp_path):
    out = str(tmp_path / "merged")
    assert_error(CliRunner().invoke(cli, ["merge", nf4_base, lora, "-o", out, *extra]), 2, message, out)


def test_other_commands_still_refuse_and_point_to_merge(nf4_base):
    line = assert_error(CliRunner().invoke(cli, ["inspect", nf4_base]), 1, "pre-quantized checkpoint (quant_method 'bitsandbytes')")
    assert "peftcli merge NF4_DIR RUN -o OUT_DIR" in line


# -- against bitsandbytes itself ------------------------------------------------------------------


@pytest.fixture(scope="module", params=[True, False], ids=["bnb-double-quant", "bnb-single"])
def bnb_base(request, tiny_llama, tmp_path_factory) -> str:
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=request.param,
                                bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, quantization_config=config, device_map="cpu")
    out = str(tmp_path_factory.mktemp("bnb-real") / "nf4")
    model.save_pretrained(out)
    return out


@pytest.mark.timeout(240)
def test_transformers_loads_the_merge_and_bitsandbytes_agrees(bnb_base, lora, tiny_llama, tmp_path):
    import bitsandbytes.functional as bf
    from transformers import AutoModelForCausalLM

    out = str(tmp_path / "merged")
    result = CliRunner().invoke(cli, ["merge", bnb_base, lora, "-o", out, "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    written, base = load_file(os.path.join(out, "model.safetensors")), load_file(os.path.join(bnb_base, "model.safetensors"))
    plain = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    params = dict(plain.named_parameters())
    with torch.no_grad():
        for name in (n for n in written if n.endswith(STATE)):
            params[name[: -len(STATE)]].copy_(_dequant(written, name[: -len(STATE)]).float())
    loaded = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    ids = torch.tensor([[1, 5, 9, 200, 3, 77, 4]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, plain(ids).logits, atol=1e-5, rtol=0)
    for name, delta in _deltas(lora).items():  # bitsandbytes' own quantiser of W + ΔW: the same 4-bit codes
        target = (_dequant(base, name) + delta).float()
        double = ".nested_absmax" in "".join(n for n in written if n.startswith(name))
        packed, state = bf.quantize_4bit(target, blocksize=64, compress_statistics=double, quant_type="nf4")
        assert torch.equal(packed.reshape(-1), written[name].reshape(-1)), name
        if double:  # its absmax indices may be one dynamic-map level off where a value lies between two (nf4._nearest)
            assert (state.absmax.int() - written[name + ".absmax"].int()).abs().max() <= 1
        else:  # W + ΔW folded here and by the merge may differ by a rounding: so may a block's maximum
            assert torch.allclose(state.absmax, written[name + ".absmax"], rtol=1e-6, atol=0)
