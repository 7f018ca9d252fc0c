"""A Llama-2-7B-shaped sharded checkpoint whose tensor data are sparse holes (shared by the benchmarks).

The headers are real, so every header-only operation sees a 13.5 GB checkpoint while the disk
holds kilobytes. Reading a tensor returns zeros.
"""

from __future__ import annotations

import json
import os

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


def build_sparse_checkpoint(out: str, specs: list[TensorSpec] | None = None, num_layers: int = 32) -> int:
    """Write ``specs`` (default: all of Llama-2-7B) as sparse shards + index + config into ``out``."""
    specs = specs if specs is not None else llama7b_specs()
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
        "num_hidden_layers": num_layers, "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    }
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f)
    return sum(os.path.getsize(os.path.join(out, n)) for n in os.listdir(out))
