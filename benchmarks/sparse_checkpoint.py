"""Llama-2-shaped sharded checkpoints (7B, 13B, 70B) whose tensor data are sparse holes (shared by the benchmarks).

The headers are real, so every header-only operation sees a 13.5-138 GB checkpoint while the disk
holds kilobytes. Reading a tensor returns zeros.
"""

from __future__ import annotations

import json
import os

from peftcli.checkpoint.writer import TensorSpec, build_header, plan_shards, shard_name


SHAPES = {  # name: (hidden, intermediate, vocab, layers, heads, kv_heads), as the Llama-2 configs say
    "llama-2-7b": (4096, 11008, 32000, 32, 32, 32),
    "llama-2-13b": (5120, 13824, 32000, 40, 40, 40),
    "llama-2-70b": (8192, 28672, 32000, 80, 64, 8),
}


def llama_specs(shape: str = "llama-2-7b") -> list[TensorSpec]:
    """The BF16 tensors of a Llama-2 checkpoint of ``shape`` (a key of ``SHAPES``)."""
    h, inter, vocab, layers, heads, kv = SHAPES[shape]
    kv_dim = h // heads * kv
    specs = [TensorSpec("model.embed_tokens.weight", "BF16", (vocab, h))]
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj, rows in (("q_proj", h), ("k_proj", kv_dim), ("v_proj", kv_dim), ("o_proj", h)):
            specs.append(TensorSpec(p + f"self_attn.{proj}.weight", "BF16", (rows, h)))
        specs += [
            TensorSpec(p + "mlp.gate_proj.weight", "BF16", (inter, h)),
            TensorSpec(p + "mlp.up_proj.weight", "BF16", (inter, h)),
            TensorSpec(p + "mlp.down_proj.weight", "BF16", (h, inter)),
            TensorSpec(p + "input_layernorm.weight", "BF16", (h,)),
            TensorSpec(p + "post_attention_layernorm.weight", "BF16", (h,)),
        ]
    specs += [TensorSpec("model.norm.weight", "BF16", (h,)), TensorSpec("lm_head.weight", "BF16", (vocab, h))]
    return specs


def llama7b_specs() -> list[TensorSpec]:
    return llama_specs("llama-2-7b")


def build_sparse_checkpoint(out: str, specs: list[TensorSpec] | None = None, num_layers: int = 32, shape: str = "llama-2-7b") -> int:
    """Write ``specs`` (default: all of ``shape``) as sparse shards + index + config into ``out`` (created if need be)."""
    specs = specs if specs is not None else llama_specs(shape)
    os.makedirs(out, exist_ok=True)
    h, inter, vocab, _, heads, kv = SHAPES[shape]
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
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h, "intermediate_size": inter,
        "num_hidden_layers": num_layers, "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    }
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f)
    return sum(os.path.getsize(os.path.join(out, n)) for n in os.listdir(out))
