"""The GPU check of `peftcli train`'s LLM-scale paths: tokens/s and peak GPU memory of LoRA
training on a SmolLM2-135M-shaped model (and a 1B-shaped one when the card has the memory),
for each path — the checkpoint's dtype, bf16, NF4 (QLoRA), activation checkpointing, packing —
beside PEFT's own LoRA on the same model, data, rank, batch and length in a plain bf16 loop
(the anchor; TRL is not on the device image, so its SFTTrainer row needs carried wheels).

Each row runs in a fresh process, so its peak (torch.cuda.max_memory_allocated) is its own.
Every example fills --max-length, so tokens/s = steps × batch × length / the training's wall.
Run by benchmarks/gpu_check.sh; `--device cpu --steps 2 --small` checks the script itself on a
CPU (the numbers are then meaningless).

    python benchmarks/gpu_check.py --out DIR [--steps 30] [--batch-size 8] [--max-length 512]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_memory import build_random_smollm2_shape  # noqa: E402  (the same SmolLM2-shaped base)

ROWS = {
    "peftcli default": {},
    "peftcli bf16": {"base_dtype": "bf16"},
    "peftcli bf16 + checkpointing": {"base_dtype": "bf16", "gradient_checkpointing": True},
    "peftcli bf16 + packing": {"base_dtype": "bf16", "packing": True},
    "peftcli nf4": {"quantize": "nf4"},
    "peftcli nf4 + checkpointing": {"quantize": "nf4", "gradient_checkpointing": True},
    "peftcli int8": {"quantize": "int8"},
    "PEFT bf16 (anchor)": None,
}
SHAPES = {  # name → LlamaConfig fields beyond the SmolLM2 shape; built with random weights
    "1B": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
               vocab_size=32000, tie_word_embeddings=False),
}


def build_shape(out: str, fields: dict) -> str:
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    import torch
    import transformers as tf

    from peftcli import tiny

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(pad_token_id=0, bos_token_id=2, eos_token_id=3, **fields)
    tf.LlamaForCausalLM(cfg).save_pretrained(out)
    tiny.word_tokenizer().save_pretrained(out)
    return out


def peftcli_row(args, options: dict) -> dict:
    import peftcli

    run = os.path.join(args.work, f"run-{os.getpid()}")
    peftcli.inject(args.base, "lora", peftcli.LoraConfig(rank=16), run)
    cfg = peftcli.TrainConfig(data=args.data, steps=args.steps, batch_size=args.batch_size, max_length=args.max_length,
                              log_every=args.steps, device=args.device, lr=1e-4, **options)
    start = time.perf_counter()
    summary = peftcli.train(run, cfg)
    wall = time.perf_counter() - start
    return {"wall": wall, "peak": summary["peak_memory_bytes"], "loss": summary["final_loss"],
            "packing_efficiency": summary.get("packing_efficiency")}


def peft_row(args) -> dict:
    """PEFT's LoRA (same rank and targets) on a bf16 base in a plain AdamW loop under autocast."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=dtype).to(device)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(4, 44, (args.batch_size, args.max_length), generator=torch.Generator().manual_seed(0)).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return {"wall": wall, "peak": peak, "loss": float(loss), "packing_efficiency": None}


def run_rows(args, base: str, label: str) -> list[dict]:
    data = os.path.join(args.work, "lm.jsonl")
    with open(data, "w") as f:  # every row longer than --max-length: each example fills it
        for i in range(args.batch_size * args.steps):
            f.write(json.dumps({"text": " ".join(f"w{(7 * j + i) % 40 + 4}" for j in range(args.max_length + 8))}) + "\n")
    results = []
    for name in ROWS:
        cmd = [sys.executable, __file__, "--worker", name, "--base", base, "--data", data, "--work", args.work, "--device", args.device,
               "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--max-length", str(args.max_length)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            results.append({"model": label, "row": name, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]})
        else:
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            tokens = args.steps * args.batch_size * args.max_length
            results.append({"model": label, "row": name, "tokens_per_s": tokens / r["wall"], **r})
        print(json.dumps(results[-1]), flush=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu_check"))
    ap.add_argument("--work", default="/tmp/gpu_check_work")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--small", action="store_true", help="SmolLM2 shape only (skip the 1B shape)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--base", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        options = ROWS[args.worker]
        print(json.dumps(peft_row(args) if options is None else peftcli_row(args, options)))
        return
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.work, exist_ok=True)
    results = run_rows(args, build_random_smollm2_shape(os.path.join(args.work, "smollm2-shape")), "SmolLM2-135M shape")
    if not args.small:
        for label, fields in SHAPES.items():
            results += run_rows(args, build_shape(os.path.join(args.work, label), fields), f"{label} shape")
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump({"args": vars(args), "results": results}, f, indent=1)
    lines = ["| model | path | tokens/s | peak GPU memory | final loss |", "|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['row']} | failed: {r['error']} | | |")
        else:
            lines.append(f"| {r['model']} | {r['row']} | {r['tokens_per_s']:,.0f} | {r['peak'] / 2**30:.2f} GiB | {r['loss']:.3f} |")
    with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
