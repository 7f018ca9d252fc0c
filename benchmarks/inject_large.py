"""`peftcli inject` on a 13.5 GB checkpoint: seconds, reading only headers (or the targets for DoRA).

    python benchmarks/inject_large.py [--runs 3]

Times a fresh `peftcli inject lora --rank 16` process (start-up included) on the sparse
Llama-7B-shaped checkpoint of sparse_checkpoint.py, with default targets (q, v), all-linear,
and DoRA (which must read each target weight for its row norms). That LoRA reads no tensor
at all and DoRA only its targets is checked by tests/test_lora.py.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from sparse_checkpoint import build_sparse_checkpoint


def run(args: list[str], runs: int, out: str) -> float:
    times = []
    for _ in range(runs):
        shutil.rmtree(out, ignore_errors=True)
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "peftcli", *args, "-o", out], check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    runs = ap.parse_args().runs
    with tempfile.TemporaryDirectory() as d:
        base = os.path.join(d, "base")
        os.mkdir(base)
        size = build_sparse_checkpoint(base)
        out = os.path.join(d, "run")
        print(f"checkpoint: {size:,} bytes (apparent), Llama-7B shapes, BF16, 3 shards")
        for label, args in (
            ("inject lora --rank 16 (q, v)", ["inject", "lora", "--rank", "16", base]),
            ("inject lora --rank 16 --targets all-linear", ["inject", "lora", "--rank", "16", "--targets", "all-linear", base]),
            ("inject lora --rank 16 --dora (reads q, v weights)", ["inject", "lora", "--rank", "16", "--dora", base]),
        ):
            seconds = run(args, runs, out)
            adapter = os.path.getsize(os.path.join(out, "adapter_model.safetensors"))
            print(f"| {label} | {seconds:.2f} s | adapter {adapter / 1e6:.1f} MB |")
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch"], check=True)
        print(f"| python -c 'import torch' (part of every inject) | {time.perf_counter() - start:.2f} s | |")


if __name__ == "__main__":
    main()
