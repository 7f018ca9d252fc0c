"""Inspect time on a ≥ 8 GB sharded checkpoint, against its size.

Builds a Llama-2-7B-shaped checkpoint (32 layers, hidden 4096, BF16, 13.5 GB in 3 shards of
at most 5 GB) whose tensor data are sparse holes made with truncate: the headers are real,
the disk use is kilobytes. Then times ``peftcli inspect --json`` end to end (a fresh process,
start-up included), the in-process API, and the reference ``safetensors`` listing of the same
shards, and counts the bytes the API read (/proc/self/io rchar).

    python benchmarks/inspect_large.py [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from peftcli.checkpoint.writer import TensorSpec, build_header, plan_shards, shard_name


def llama7b_specs() -> list[TensorSpec]:
    h, inter, vocab, layers = 4096, 11008, 32000, 32
    specs = [TensorSpec("model.embed_tokens.weight", "BF16", (vocab, h))]
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            specs.append(TensorSpec(p + f"self_attn.{proj}.weight", "BF16", (h, h)))
        specs += [
            TensorSpec(p + "mlp.gate_proj.weight", "BF16", (inter, h)),
            TensorSpec(p + "mlp.up_proj.weight", "BF16", (inter, h)),
            TensorSpec(p + "mlp.down_proj.weight", "BF16", (h, inter)),
            TensorSpec(p + "input_layernorm.weight", "BF16", (h,)),
            TensorSpec(p + "post_attention_layernorm.weight", "BF16", (h,)),
        ]
    specs += [TensorSpec("model.norm.weight", "BF16", (h,)), TensorSpec("lm_head.weight", "BF16", (vocab, h))]
    return specs


def build_sparse_checkpoint(out: str) -> int:
    specs = llama7b_specs()
    shards = plan_shards(specs, 5 * 10**9)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = shard_name(i, len(shards))
        header = build_header(shard, {"format": "pt"})
        with open(os.path.join(out, name), "wb") as f:
            f.write(header)
            f.truncate(len(header) + sum(s.nbytes for s in shard))
        weight_map.update({s.name: name for s in shard})
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": sum(s.nbytes for s in specs)}, "weight_map": weight_map}, f)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    }
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f)
    return sum(os.path.getsize(os.path.join(out, n)) for n in os.listdir(out))


def rchar() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar"))


def median_time(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    from safetensors import safe_open

    from peftcli.checkpoint.reader import open_checkpoint
    from peftcli.summary import summarize

    with tempfile.TemporaryDirectory() as d:
        size = build_sparse_checkpoint(d)
        shards = sorted(n for n in os.listdir(d) if n.endswith(".safetensors"))

        def cli():
            subprocess.run([sys.executable, "-m", "peftcli", "inspect", d, "--json"], check=True, stdout=subprocess.DEVNULL)

        def api():
            with open_checkpoint(d) as ckpt:
                summarize(ckpt)

        def reference():
            for s in shards:
                with safe_open(os.path.join(d, s), framework="pt") as f:
                    for k in f.keys():
                        f.get_slice(k).get_shape()

        before = rchar()
        api()
        read = rchar() - before
        rows = {
            "checkpoint bytes (apparent size)": f"{size:,}",
            "shards / tensors": f"{len(shards)} / {len(llama7b_specs())}",
            "bytes read by open+summarize": f"{read:,}",
            "peftcli inspect --json (fresh process)": f"{median_time(cli, args.runs) * 1000:.0f} ms",
            "API open_checkpoint + summarize": f"{median_time(api, args.runs) * 1000:.1f} ms",
            "safetensors safe_open listing (reference)": f"{median_time(reference, args.runs) * 1000:.1f} ms",
        }
    for k, v in rows.items():
        print(f"| {k} | {v} |")


if __name__ == "__main__":
    main()
