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

from sparse_checkpoint import build_sparse_checkpoint, llama7b_specs


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
