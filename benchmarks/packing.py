"""Tokens per second of ``peftcli train`` with and without ``--packing``, on the same data.

    nice -n 10 python benchmarks/packing.py                    # SmolLM2-135M at /tmp/smollm2 when present
    python benchmarks/packing.py --base DIR --steps 20 --max-length 256

The base is the fp32 SmolLM2-135M directory of ``smollm2_to_safetensors.py`` when it exists
(else the tiny seeded Llama of ``peftcli.tiny``, whose numbers only show that the script runs).
The data are seeded texts of 8 to 200 words of the base tokenizer's own vocabulary (a skewed
mix of lengths, as real corpora have), written to a temporary directory. Both runs train LoRA
r=8 for ``--steps`` optimizer steps with one torch thread; the rate counts example tokens
only (padding and packed-row tails excluded), so it is the useful throughput. A packed step
holds more examples (``--batch-size`` rows of up to ``--max-length`` tokens), so the rows
compare equal work per token, not per step. Prints one JSON object and the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def write_data(tokenizer, path: str, n: int, seed: int) -> None:
    rng = random.Random(seed)
    words = [w for w in (tokenizer.decode([i]).strip() for i in range(min(tokenizer.vocab_size, 5000))) if w.isalnum()]
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            length = min(200, int(rng.paretovariate(1.2) * 8))  # many short texts, a few long ones
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(length))}) + "\n")


def measure(base: str, data: str, work: str, packing: bool, args) -> dict:
    from peftcli.injection import inject
    from peftcli.methods.lora import LoraConfig
    from peftcli.training.config import TrainConfig
    from peftcli.training.loop import train

    run = os.path.join(work, "packed" if packing else "padded")
    inject(base, "lora", LoraConfig(rank=8), run)
    cfg = TrainConfig(data=data, steps=args.steps, batch_size=args.batch_size, max_length=args.max_length, packing=packing, threads=1, log_every=args.steps)
    start = time.perf_counter()
    summary = train(run, cfg)
    wall = time.perf_counter() - start
    with open(os.path.join(run, "train_args.json"), encoding="utf-8") as f:
        assert json.load(f)["packing"] is packing
    return {"packing": packing, "train_seconds": round(summary["wall_seconds"], 2), "wall_seconds": round(wall, 2),
            "final_loss": summary["final_loss"], "packing_efficiency": summary.get("packing_efficiency")}


def example_tokens(base: str, data: str, max_length: int, batch_size: int, steps: int, packing: bool) -> int:
    """The example tokens the run's ``steps`` micro-batches hold (epoch 0's seeded order)."""
    from peftcli.training.batching import encode, epoch_order, load_tokenizer
    from peftcli.training.data import load_dataset
    from peftcli.training.packing import pack

    items = encode(load_dataset(data), load_tokenizer(base), max_length)
    if packing:
        items, _ = pack(items, max_length)
    total, order, epoch, offset = 0, epoch_order(len(items), 0, 0), 0, 0
    for _ in range(steps):
        if offset + batch_size > len(order):
            epoch, offset = epoch + 1, 0
            order = epoch_order(len(items), 0, epoch)
        total += sum(len(items[i]["input_ids"]) for i in order[offset : offset + batch_size])
        offset += batch_size
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="/tmp/smollm2")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--examples", type=int, default=400)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as work:
        base = args.base
        if not os.path.isfile(os.path.join(base, "config.json")):
            from peftcli import tiny

            base = tiny.build("llama", os.path.join(work, "tiny-llama"))
        from peftcli.training.batching import load_tokenizer

        data = os.path.join(work, "train.jsonl")
        write_data(load_tokenizer(base), data, args.examples, seed=0)
        rows = []
        for packing in (False, True):
            row = measure(base, data, work, packing, args)
            row["example_tokens"] = example_tokens(base, data, args.max_length, args.batch_size, args.steps, packing)
            row["tokens_per_second"] = round(row["example_tokens"] / row["train_seconds"], 1)
            rows.append(row)
    print(json.dumps({"base": args.base if base == args.base else "tiny llama (no SmolLM2 found)", "steps": args.steps,
                      "batch_size": args.batch_size, "max_length": args.max_length, "runs": rows,
                      "load_average": os.getloadavg()}, indent=2))


if __name__ == "__main__":
    main()
