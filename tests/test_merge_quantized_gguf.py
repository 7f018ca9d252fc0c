"""merge BASE.gguf RUN -o OUT.gguf --outtype TYPE: the merge requantised into a GGUF.

The report's numbers are held to an independent computation: the base dequantised by gguf's
own reader and dequantiser, ΔW = (α/r)·B·A from the adapter's saved tensors in fp64, permuted to
llama.cpp's row order with the test's own restatement of ``LlamaModel.permute``, W + ΔW
quantised with ``gguf.quants.quantize``. The written file is read back with gguf's
``GGUFReader`` (names, shapes, types, the base's metadata, the copied tensors' bytes) and with
peftcli's reader.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from click.testing import CliRunner

gguf = pytest.importorskip("gguf")
np = pytest.importorskip("numpy")

from peftcli.checkpoint.reader import open_checkpoint  # noqa: E402
from peftcli.cli import cli  # noqa: E402
from peftcli.injection import inject  # noqa: E402
from peftcli.methods.lora import LoraConfig  # noqa: E402
from peftcli.training import batching  # noqa: E402
from tests.helpers import randomize_  # noqa: E402
from tests.test_gguf import Q8, gguf_name, permute, write_gguf  # noqa: E402  (the tiny-llama GGUF writer)

Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def base(tiny_llama, tmp_path_factory):
    return write_gguf(tiny_llama, str(tmp_path_factory.mktemp("mqg") / "base-q8.gguf"), Q8)


def _lora(tiny_llama, out: str, scale: float, targets: str = "q_proj,k_proj,v_proj,down_proj") -> str:
    from peftcli.attach import load_adapted

    inject(tiny_llama, "lora", LoraConfig(targets=targets), out + "-init")
    adapted = load_adapted(tiny_llama, out + "-init")
    randomize_([p for n, p in adapted.named_parameters() if p.requires_grad], seed=5, scale=0.2)
    with torch.no_grad():  # the update's size: ΔW = B·A scales with B
        for n, p in adapted.named_parameters():
            if "lora_B" in n:
                p.mul_(scale)
    adapted.save(out)
    return out


@pytest.fixture(scope="module")
def lora(tiny_llama, tmp_path_factory):
    return _lora(tiny_llama, str(tmp_path_factory.mktemp("mqg-lora") / "lora"), 1.0)


def _deltas(run: str) -> dict[str, np.ndarray]:
    """ΔW per Hugging Face weight name, fp64, from the adapter's own files: (α/r)·B·A."""
    from safetensors.numpy import load_file

    cfg = json.load(open(os.path.join(run, "adapter_config.json")))
    tensors = load_file(os.path.join(run, "adapter_model.safetensors"))
    out = {}
    for key, a in tensors.items():
        if ".lora_A." not in key:
            continue
        b = tensors[key.replace(".lora_A.", ".lora_B.")].astype(np.float64)
        name = key.split("base_model.model.", 1)[1].replace(".lora_A.weight", ".weight")
        out[name] = cfg["lora_alpha"] / cfg["r"] * (b @ a.astype(np.float64))
    assert out
    return out


def _gguf_layout(name: str, value: np.ndarray, config: dict) -> np.ndarray:
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    if ".q_proj." in name:
        return permute(value, heads, heads)
    if ".k_proj." in name:
        return permute(value, heads, kv)
    return value


def _invoke(*args):
    return CliRunner().invoke(cli, ["merge", *args])


def _expected(base: str, run: str, tiny_llama: str, outtype: str) -> dict[str, tuple[float, float, np.ndarray]]:
    """Per changed GGUF tensor: ‖ΔW‖, ‖Q(W+ΔW) − (W+ΔW)‖, W+ΔW (fp32, llama.cpp's layout) and the share of ΔW kept."""
    config = json.load(open(os.path.join(tiny_llama, "config.json")))
    stored = {t.name: t for t in gguf.GGUFReader(base).tensors}
    expected = {}
    for hf, delta in _deltas(run).items():
        t = stored[gguf_name(hf)]
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64)
        d = _gguf_layout(hf, delta, config)
        merged = (w + d).astype(np.float32)
        qtype = Q[outtype.upper()]
        back = gguf.quants.dequantize(gguf.quants.quantize(merged, qtype), qtype).astype(np.float64)
        kept = float(((back - w) * d).sum() / (d * d).sum())  # the share of ΔW the written values keep
        expected[gguf_name(hf)] = (float(np.linalg.norm(d)), float(np.linalg.norm(back - merged)), merged, kept)
    return expected


@pytest.mark.parametrize("outtype", ["q8_0", "q4_1", "q4_0", "f16"])
def test_the_report_and_the_file_are_the_independent_fp64_computation(base, lora, tiny_llama, tmp_path, outtype):
    out = str(tmp_path / f"merged-{outtype}.gguf")
    result = _invoke(base, lora, "-o", out, "--outtype", outtype, "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["schema"] == "peftcli.merge/1" and doc["output"] == out and doc["gguf"]["outtype"] == outtype
    expected = _expected(base, lora, tiny_llama, outtype)
    stats = {s["name"]: s for s in doc["gguf"]["tensors"]}
    assert set(stats) == set(expected)
    for name, (norm, error, _, kept) in expected.items():
        s = stats[name]
        assert s["type"] == outtype.upper()
        assert s["delta_norm"] == pytest.approx(norm, rel=1e-5), name
        # F16's rounding error is ~1e-3 of the weights: the merge's own fp32 ΔW (not this fp64 one)
        # moves it by a few 1e-6 relative; the block quantisers' errors are 100x larger than that
        tol = 1e-4 if outtype == "f16" else 1e-5
        assert s["quant_error"] == pytest.approx(error, rel=tol), name
        assert s["ratio"] == pytest.approx(error / norm, rel=2e-5) and s["below_noise"] is (s["ratio"] >= 1)
        assert s["kept"] == pytest.approx(kept, rel=1e-5, abs=1e-6), name
    _read_back(base, out, outtype, expected)


def _read_back(base: str, out: str, outtype: str, expected: dict) -> None:
    """gguf's reader: the base's tensors in its order, changed ones as outtype holding W+ΔW to
    within the requantisation error, the others byte for byte; the base's metadata. Then peftcli's."""
    src, got = gguf.GGUFReader(base), gguf.GGUFReader(out)
    assert [t.name for t in got.tensors] == [t.name for t in src.tensors]
    for s, g in zip(src.tensors, got.tensors):
        assert list(g.shape) == list(s.shape), s.name
        if s.name in expected:
            assert g.tensor_type == Q[outtype.upper()], s.name
            _, error, merged, _ = expected[s.name]
            back = gguf.quants.dequantize(g.data, g.tensor_type).astype(np.float64)
            assert float(np.linalg.norm(back - merged)) == pytest.approx(error, rel=1e-4 if outtype == "f16" else 1e-5, abs=1e-6), s.name
        else:
            assert g.tensor_type == s.tensor_type and bytes(g.data.tobytes()) == bytes(s.data.tobytes()), s.name
    for key, f in src.fields.items():
        if not key.startswith("GGUF.") and key != "general.file_type":
            assert got.fields[key].contents() == f.contents(), key
    assert "peftcli.merge" in got.fields
    with open_checkpoint(out) as merged, open_checkpoint(base) as ref:
        assert {n: t.shape for n, t in merged.tensors.items()} == {n: t.shape for n, t in ref.tensors.items()}
        assert merged.config == ref.config
        for name in merged.tensors:
            assert torch.isfinite(merged.get(name)).all()


def test_an_update_below_the_quantisation_noise_is_warned_about(base, tiny_llama, tmp_path):
    tiny = _lora(tiny_llama, str(tmp_path / "tiny"), 1e-4, targets="q_proj")
    result = _invoke(base, tiny, "-o", str(tmp_path / "m.gguf"), "--outtype", "q4_1")
    assert result.exit_code == 0, result.stderr
    warned = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warned) == 2 and all("attn_q.weight" in w and "below the Q4_1 quantisation noise" in w for w in warned)
    doc = json.loads(_invoke(base, tiny, "-o", str(tmp_path / "j.gguf"), "--outtype", "q4_1", "--json").stdout)
    assert sorted(doc["gguf"]["below_noise"]) == ["blk.0.attn_q.weight", "blk.1.attn_q.weight"]
    assert all(s["ratio"] > 1 and s["below_noise"] for s in doc["gguf"]["tensors"])


@pytest.fixture
def tiny_tokenizer(monkeypatch, tiny_llama):
    """The tiny llama's word tokenizer for its GGUF (whose token list transformers cannot build one from)."""
    real = batching.load_tokenizer
    monkeypatch.setattr(batching, "load_tokenizer", lambda path: real(tiny_llama if path.endswith(".gguf") else path))


def test_probe_drift_is_zero_at_f32_and_not_at_q4_1(base, lora, tmp_path, tiny_tokenizer):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"text": "the cat sat on the mat"}) + "\n" + json.dumps({"text": "a dog ran"}) + "\n")
    docs = {}
    for outtype in ("f32", "q4_1"):
        result = _invoke(base, lora, "-o", str(tmp_path / f"{outtype}.gguf"), "--outtype", outtype, "--probe", str(prompts), "--json")
        assert result.exit_code == 0, result.stderr
        docs[outtype] = json.loads(result.stdout)["gguf"]["probe"]
    f32 = docs["f32"]
    assert f32["prompts"] == 2 and f32["positions"] > 2
    assert f32["max_abs_logit_diff"] == 0.0 and f32["mean_kl"] == 0.0 and f32["top1_agreement"] == 1.0
    assert docs["q4_1"]["max_abs_logit_diff"] > 0 and docs["q4_1"]["mean_kl"] > 0
    text = _invoke(base, lora, "-o", str(tmp_path / "t.gguf"), "--outtype", "f32", "--probe", str(prompts))
    assert text.exit_code == 0 and "probe: 2 prompts" in text.stdout and "top-1 agreement 100.00%" in text.stdout


@pytest.mark.parametrize("extra, message", [
    (["-o", "{tmp}/m.gguf", "--outtype", "q3_k"], "unknown --outtype 'q3_k' (choose one of: f32, f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0)"),
    (["-o", "{tmp}/m.safetensors", "--outtype", "q8_0"], "--outtype writes a GGUF file, and -o {tmp}/m.safetensors is not a .gguf path"),
    (["-o", "{tmp}/m", "--probe", "{tmp}/p.txt"], "--probe writes a GGUF file"),
    (["-o", "{tmp}/m.gguf"], "a GGUF output needs its tensor type (add --outtype, one of: f32,"),
    (["-o", "{tmp}/m.gguf", "--outtype", "q8_0", "--dtype", "F16"], "--dtype does not apply to a GGUF output"),
    (["-o", "{tmp}/m.gguf", "--outtype", "q8_0", "--probe", "{tmp}/none.txt"], "--probe {tmp}/none.txt: no such file"),
    (["-o", "{tmp}/m.gguf", "--outtype", "q8_0", "--probe", "{tmp}/bad.jsonl"], "bad.jsonl:2: not a JSON object with a text string"),
])
def test_bad_requests_are_one_line_and_write_nothing(base, lora, tmp_path, extra, message):
    work = tmp_path / "work"
    work.mkdir()
    (work / "p.txt").write_text("hello\n")
    (work / "bad.jsonl").write_text('{"text": "ok"}\n["no"]\n')
    before = sorted(os.listdir(work))
    result = _invoke(base, lora, *[a.replace("{tmp}", str(work)) for a in extra])
    assert result.exit_code in (1, 2), result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message.replace("{tmp}", str(work)) in lines[0], result.stderr
    assert sorted(os.listdir(work)) == before and result.stdout == ""


def test_a_model_directory_base_is_refused_for_a_gguf_output(tiny_llama, lora, tmp_path):
    result = _invoke(tiny_llama, lora, "-o", str(tmp_path / "m.gguf"), "--outtype", "q8_0")
    assert result.exit_code == 2 and "takes a .gguf base file" in result.stderr
    assert os.listdir(tmp_path) == []


def test_a_tied_base_stays_tied_and_its_f32_probe_has_no_drift(tiny_llama_tied, tmp_path, monkeypatch):
    """No output.weight in the file written (llama.cpp ties it to token_embd), and the probe's
    two models (the fp32 merge, the GGUF) share the embedding as the head alike."""
    real = batching.load_tokenizer
    monkeypatch.setattr(batching, "load_tokenizer", lambda path: real(tiny_llama_tied if path.endswith(".gguf") else path))
    base = write_gguf(tiny_llama_tied, str(tmp_path / "tied.gguf"), Q8)
    run = _lora(tiny_llama_tied, str(tmp_path / "lora"), 1.0, targets="all-linear")
    (tmp_path / "p.txt").write_text("the cat sat\n")
    out = str(tmp_path / "m.gguf")
    result = _invoke(base, run, "-o", out, "--outtype", "f32", "--probe", str(tmp_path / "p.txt"), "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)["gguf"]
    names = [t.name for t in gguf.GGUFReader(out).tensors]
    assert "output.weight" not in names and names == [t.name for t in gguf.GGUFReader(base).tensors]
    assert doc["requantized"] == len(_deltas(run)) and doc["tensor_types"] == {"F32": doc["requantized"] + 5, "Q8_0": 1}  # token_embd, untouched
    assert doc["probe"]["max_abs_logit_diff"] == 0.0 and doc["probe"]["top1_agreement"] == 1.0


def test_a_recipe_merge_step_writes_the_same_gguf_as_the_command(base, lora, tmp_path):
    """outtype and probe are declared once (GgufOutputOptions): a recipe's merge step takes them
    and writes the file the command writes."""
    out = str(tmp_path / "cli.gguf")
    assert _invoke(base, lora, "-o", out, "--outtype", "q8_0").exit_code == 0
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"steps:\n  merge: {{base: {base}, inputs: [{lora}], output: merged.gguf, outtype: q8_0}}\n")
    result = CliRunner().invoke(cli, ["run", str(recipe), "-o", str(tmp_path / "wd"), "--quiet"])
    assert result.exit_code == 0, result.output
    cli_reader, recipe_reader = gguf.GGUFReader(out), gguf.GGUFReader(str(tmp_path / "wd" / "merged.gguf"))
    for a, b in zip(cli_reader.tensors, recipe_reader.tensors, strict=True):
        assert a.name == b.name and a.tensor_type == b.tensor_type and bytes(a.data) == bytes(b.data), a.name
