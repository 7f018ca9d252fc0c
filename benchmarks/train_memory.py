"""Peak memory of a few LoRA training steps with and without --base-dtype bf16, --quantize nf4
and --gradient-checkpointing (``peftcli train``'s low-precision options, issue #12).

Each configuration runs in a fresh Python process (``--worker``), so its peak RSS is its own.
Reported per configuration: the process's peak RSS (VmHWM: loading included), the peak
``peftcli check --train`` predicts for it (computed in the worker before training), its RSS
at the end of training (what the model, φ, optimizer and allocator hold), and the wall time.
``--live`` runs the workers with ``MALLOC_MMAP_THRESHOLD_=131072``, so that RSS follows live
memory, which is what the prediction is of (glibc otherwise keeps freed activation blocks).

The base is SmolLM2-135M when its fp32 directory exists (``smollm2_to_safetensors.py``,
default /tmp/smollm2); else a random Llama of SmolLM2-135M's shape (30 layers, hidden 576,
GQA 9/3 heads, vocabulary 49152, tied embeddings) is built once in --work: memory depends
on the shapes, not on the values.

    python benchmarks/train_memory.py [--base DIR] [--steps 2] [--batch-size 4] [--max-length 128]
    python benchmarks/train_memory.py --llama-7b --steps 1 --batch-size 1 --max-length 64 \
        --only "nf4 + checkpointing" --only "bf16 + checkpointing"

``--llama-7b`` trains on a Llama-2-7B-shaped checkpoint instead (``sparse_checkpoint.py``: real
headers, 13.5 GB of sparse holes that read as zeros, so the disk holds kilobytes): memory
depends on the shapes, not on the values.

Run it alone on the machine: it takes a few minutes of CPU per configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CONFIGS = {
    "fp32": {},
    "bf16 + checkpointing": {"base_dtype": "bf16", "gradient_checkpointing": True},
    "fp32 + checkpointing": {"gradient_checkpointing": True},
    "bf16": {"base_dtype": "bf16"},
    "nf4": {"quantize": "nf4"},
    "nf4 + checkpointing": {"quantize": "nf4", "gradient_checkpointing": True},
}


def build_random_smollm2_shape(out: str) -> str:
    """A LlamaForCausalLM with SmolLM2-135M's config and random weights, with a word tokenizer."""
    if os.path.isfile(os.path.join(out, "model.safetensors")):
        return out
    import torch
    import transformers as tf

    from peftcli import tiny

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        vocab_size=49152, tie_word_embeddings=True, pad_token_id=0, bos_token_id=2, eos_token_id=3,
    )
    tf.LlamaForCausalLM(cfg).save_pretrained(out)
    tiny.word_tokenizer().save_pretrained(out)
    return out


def build_llama7b_shape(out: str) -> str:
    """A Llama-2-7B-shaped bf16 checkpoint of sparse holes (``sparse_checkpoint.py``) with a word tokenizer."""
    if not os.path.isfile(os.path.join(out, "model.safetensors.index.json")):
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from sparse_checkpoint import build_sparse_checkpoint

        from peftcli import tiny

        build_sparse_checkpoint(out)
        tiny.word_tokenizer().save_pretrained(out)
    return out


def worker(args) -> None:

    from peftcli.injection import inject
    from peftcli.methods.lora import LoraConfig
    from peftcli.training.config import TrainConfig
    from peftcli.training.loop import train

    from peftcli.training.memory import TrainMemoryOptions, predict

    run = os.path.join(args.work, "run-" + str(os.getpid()))
    inject(args.base, "lora", LoraConfig(rank=8), run)
    options = json.loads(args.options)
    # The prediction first, in this process (the meta device holds no memory): peftcli check --train.
    predicted = predict(args.base, run, TrainMemoryOptions(batch_size=args.batch_size, max_length=args.max_length, **options)).peak
    start = time.perf_counter()
    summary = train(run, TrainConfig(
        data=args.data, steps=args.steps, batch_size=args.batch_size, max_length=args.max_length, log_every=1, threads=args.threads, **options,
    ))
    with open("/proc/self/status") as f:
        rss_end = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    from peftcli.training.one_pass import peak_rss

    peak = peak_rss()
    print(json.dumps({"peak_rss": peak, "rss_end": rss_end, "wall": time.perf_counter() - start, "loss": summary["final_loss"], "predicted": predicted}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="/tmp/smollm2", help="SmolLM2-135M fp32 directory (else a random model of its shape)")
    ap.add_argument("--work", default="/tmp/train_memory")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--llama-7b", action="store_true", help="a Llama-2-7B-shaped sparse checkpoint as the base")
    ap.add_argument("--only", action="append", choices=list(CONFIGS), help="run only these configurations")
    ap.add_argument("--live", action="store_true",
                    help="MALLOC_MMAP_THRESHOLD_=131072 in the workers: RSS follows live memory (what check --train predicts)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--options", default="{}", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    os.makedirs(args.work, exist_ok=True)
    real = os.path.isfile(os.path.join(args.base, "model.safetensors")) and os.path.isfile(os.path.join(args.base, "tokenizer.json"))
    if args.llama_7b:
        base, real = build_llama7b_shape(os.path.join(args.work, "llama-2-7b-shape")), False
    else:
        base = args.base if real else build_random_smollm2_shape(os.path.join(args.work, "smollm2-shape"))
    data = os.path.join(args.work, "lm.jsonl")
    with open(data, "w") as f:  # long enough rows that every example fills --max-length
        for i in range(args.batch_size * args.steps):
            f.write(json.dumps({"text": " ".join(f"w{(7 * j + i) % 40 + 4}" for j in range(args.max_length + 8))}) + "\n")
    shape = "Llama-2-7B shape, sparse (zero) weights" if args.llama_7b else "random weights, SmolLM2-135M shape"
    print(f"base: {base} ({'SmolLM2-135M' if real else shape}); "
          f"{args.steps} steps of batch {args.batch_size} x {args.max_length} tokens, LoRA r=8, {args.threads} thread(s)")
    print(f"load: {os.getloadavg()}")
    print(f"malloc: {'MALLOC_MMAP_THRESHOLD_=131072 (RSS follows live memory)' if args.live else 'glibc default'}")
    print(f"{'configuration':24} {'peak RSS':>10} {'predicted':>10} {'pred/peak':>9} {'RSS at end':>11} {'wall':>8}")
    env = os.environ | ({"MALLOC_MMAP_THRESHOLD_": "131072"} if args.live else {})
    for name in args.only or list(CONFIGS):
        cmd = [sys.executable, __file__, "--worker", "--base", base, "--work", args.work, "--data", data, "--steps", str(args.steps),
               "--batch-size", str(args.batch_size), "--max-length", str(args.max_length), "--threads", str(args.threads),
               "--options", json.dumps(CONFIGS[name])]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode != 0:
            print(f"{name:24} failed: {(out.stderr.strip().splitlines() or ['?'])[-1]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{name:24} {r['peak_rss'] / 2**20:9.0f}M {r['predicted'] / 2**20:9.0f}M {r['predicted'] / r['peak_rss']:9.2f} "
              f"{r['rss_end'] / 2**20:10.0f}M {r['wall']:7.1f}s")
    print(f"load: {os.getloadavg()}")


if __name__ == "__main__":
    main()
