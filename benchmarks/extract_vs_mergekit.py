"""LoRA extraction from a fine-tune: ``peftcli convert --to lora`` vs mergekit's ``mergekit-extract-lora``.

Issue #14 §5. The "fine-tune" is SmolLM2-135M with every linear weight of its layers (q, k, v, o,
gate, up, down) changed by a seeded ΔW = a rank-16 part with decaying singular values (‖·‖ =
0.1 ‖W‖) plus dense Gaussian noise (‖·‖ = 0.02 ‖W‖); embeddings and norms are unchanged, so a LoRA
on the linear weights can carry the whole change up to its rank. Both tools extract at each rank
of --ranks; each run is a fresh process (wall, CPU, peak RSS from /usr/bin/time, as in
merge_vs_mergekit.py), then, in this process:
- kept energy: Σ‖ΔW_r‖² / Σ‖ΔW‖² over the targets, ΔW_r = (α/r)·B·A read from the adapter, and the
  residual Σ‖ΔW − ΔW_r‖² / Σ‖ΔW‖² (both equal 1 − each other only for the optimal, orthogonal fit);
  the optimum is Σ of the top-r σᵢ² from an fp64 SVD;
- logits: base + adapter through PEFT (PeftModel.from_pretrained, unmerged) against the fine-tune on
  a few prompts, max |Δlogit| (and the base's own distance from the fine-tune, for scale).
Like for like: mergekit by default also stores the embeddings (tied lm_head) and every RMSNorm at
full rank in modules_to_save; here it runs with ``-e embed_tokens -e lm_head --skip-undecomposable``
so both adapters hold the linear weights' LoRA only (one default run is timed too, for its size).

Usage: ``OMP_NUM_THREADS=1 nice python benchmarks/extract_vs_mergekit.py --base /tmp/smollm2``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from merge_scale import measure  # noqa: E402

MB = 10**6
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, a small robot",
           "Water boils at a temperature of"]


def make_finetune(base: str, out: str, seed: int) -> dict:
    """Write the base with each layer's linear weights + seeded low-rank-plus-noise ΔW; return the ΔW (fp64)."""
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(os.path.join(base, "model.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    deltas = {}
    for name in sorted(tensors):
        if not (name.endswith(".weight") and name.split(".")[-2] in LINEAR):
            continue
        w = tensors[name].double()
        out_f, in_f = w.shape
        u = torch.linalg.qr(torch.randn(out_f, 16, generator=gen, dtype=torch.float64))[0]
        v = torch.linalg.qr(torch.randn(in_f, 16, generator=gen, dtype=torch.float64))[0]
        s = 1.0 / torch.arange(1, 17, dtype=torch.float64)  # σ_i ∝ 1/i
        low = (u * s) @ v.T
        noise = torch.randn(out_f, in_f, generator=gen, dtype=torch.float64)
        d = 0.1 * w.norm() * low / low.norm() + 0.02 * w.norm() * noise / noise.norm()
        ft = (w + d).to(tensors[name].dtype)
        deltas[name] = ft.double() - w  # the change actually stored
        tensors[name] = ft
    if os.path.exists(out):
        shutil.rmtree(out)
    shutil.copytree(base, out, ignore=shutil.ignore_patterns("model.safetensors"))
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    return deltas


def lora_deltas(adapter: str) -> dict:
    """ΔW_r = (α/r)·B·A per target weight name (fp64), read from a PEFT LoRA adapter directory."""
    from safetensors.torch import load_file

    with open(os.path.join(adapter, "adapter_config.json")) as f:
        cfg = json.load(f)
    t = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    out = {}
    for key in t:
        if ".lora_A." not in key:
            if ".lora_B." not in key:
                raise SystemExit(f"{adapter}: unexpected tensor {key} (not a LoRA factor)")
            continue
        module = key.split(".lora_A.")[0].removeprefix("base_model.model.")
        a, b = t[key].double(), t[key.replace(".lora_A.", ".lora_B.")].double()
        short = [k for k in cfg.get("rank_pattern", {}) if module.endswith(k)]
        r = cfg["rank_pattern"][short[0]] if short else cfg["r"]
        alpha = cfg.get("alpha_pattern", {}).get(short[0], cfg["lora_alpha"]) if short else cfg["lora_alpha"]
        scale = alpha / r
        if cfg.get("use_rslora"):
            scale = alpha / r**0.5
        out[module + ".weight"] = scale * (b @ a)
    return out


def energies(deltas: dict, got: dict) -> tuple[float, float]:
    total = sum(float(d.pow(2).sum()) for d in deltas.values())
    missing = sorted(set(deltas) - set(got))
    if missing or set(got) - set(deltas):
        raise SystemExit(f"targets differ: missing {missing[:3]}, extra {sorted(set(got) - set(deltas))[:3]}")
    kept = sum(float(got[n].pow(2).sum()) for n in deltas)
    resid = sum(float((deltas[n] - got[n]).pow(2).sum()) for n in deltas)
    return kept / total, resid / total


def optimal(deltas: dict, rank: int) -> float:
    import torch

    total = sum(float(d.pow(2).sum()) for d in deltas.values())
    return sum(float(torch.linalg.svdvals(d)[:rank].pow(2).sum()) for d in deltas.values()) / total


def logits(model_dir: str, tok, adapter: str | None = None) -> list:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    with torch.no_grad():
        return [model(**tok(p, return_tensors="pt")).logits[0].double() for p in PROMPTS]


def max_diff(a: list, b: list) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="/tmp/smollm2")
    ap.add_argument("--work", default="/tmp/xbench")
    ap.add_argument("--mergekit", default="/tmp/mkvenv/bin/mergekit-extract-lora")
    ap.add_argument("--ranks", default="8,32")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from transformers import AutoTokenizer

    os.makedirs(args.work, exist_ok=True)
    ft = os.path.join(args.work, "finetune")
    deltas = make_finetune(args.base, ft, seed=14)
    tok = AutoTokenizer.from_pretrained(args.base)
    ref = logits(ft, tok)
    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "base_vs_ft": max_diff(logits(args.base, tok), ref),
           "targets": len(deltas), "rows": {}}
    print(f"base vs fine-tune: max |Δlogit| {res['base_vs_ft']:.4f} over {len(PROMPTS)} prompts; {len(deltas)} targets", flush=True)
    for rank in (int(r) for r in args.ranks.split(",")):
        opt = optimal(deltas, rank)
        cmds = {
            "peftcli": [sys.executable, "-m", "peftcli", "convert", ft, "--base", args.base, "--to", "lora",
                        "--rank", str(rank), "-o", os.path.join(args.work, f"peftcli-r{rank}"), "--force", "--quiet"],
            "mergekit": [args.mergekit, "--model", ft, "--base-model", args.base, "--out-path",
                         os.path.join(args.work, f"mergekit-r{rank}"), "--max-rank", str(rank), "-e", "embed_tokens",
                         "-e", "lm_head", "--skip-undecomposable", "--no-copy-tokenizer", "--quiet"],
        }
        for tool, cmd in cmds.items():
            out = cmd[cmd.index("-o" if tool == "peftcli" else "--out-path") + 1]
            shutil.rmtree(out, ignore_errors=True)
            load = os.getloadavg()[0]
            wall, rss, cpu = measure(cmd)
            kept, resid = energies(deltas, lora_deltas(out))
            diff = max_diff(logits(args.base, tok, out), ref)
            size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
            row = {"wall_s": wall, "cpu_s": cpu, "rss": rss, "load": load, "kept": kept, "residual": resid,
                   "optimal": opt, "max_logit_diff": diff, "bytes": size}
            res["rows"][f"{tool} r{rank}"] = row
            print(f"r={rank} {tool}: kept {kept:.6f} (optimal {opt:.6f}), residual {resid:.6f}, max |Δlogit| {diff:.4f}, "
                  f"{wall:.1f} s wall, {cpu:.1f} s CPU, {rss / MB:.0f} MB, {size / MB:.1f} MB written, load {load:.2f}", flush=True)
    # mergekit with its defaults (embeddings and norms in modules_to_save at full rank), for the size
    out = os.path.join(args.work, "mergekit-default")
    shutil.rmtree(out, ignore_errors=True)
    load = os.getloadavg()[0]
    wall, rss, cpu = measure([args.mergekit, "--model", ft, "--base-model", args.base, "--out-path", out, "--max-rank",
                              str(rank), "--no-copy-tokenizer", "--quiet"])
    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    res["mergekit_default"] = {"rank": rank, "wall_s": wall, "cpu_s": cpu, "rss": rss, "load": load, "bytes": size}
    print(f"mergekit defaults r={rank}: {wall:.1f} s, {rss / MB:.0f} MB, {size / MB:.1f} MB written, load {load:.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
