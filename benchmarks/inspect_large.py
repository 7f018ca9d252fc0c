"""Inspect time on ≥ 8 GB sharded checkpoints, against their size.

Builds Llama-2-shaped checkpoints (7B: 13.5 GB in 3 shards; 13B: 26 GB in 6; 70B: 138 GB in
28, BF16, shards of at most 5 GB) whose tensor data are sparse holes made with truncate: the
headers are real, the disk use is kilobytes. For each, times ``peftcli inspect --json`` end to
end (a fresh process, start-up included), the in-process API, and the reference
``safetensors`` listing of the same shards, and counts the bytes the API read
(/proc/self/io rchar). One column per size, so time can be read against size.

    python benchmarks/inspect_large.py [--runs 5] [--shapes llama-2-7b,llama-2-13b,llama-2-70b]

``--gguf FILE --safetensors DIR`` measures the same columns (but the reference listing) on a
real GGUF file beside a safetensors directory of the same model instead, e.g. SmolLM2's Q4_1
GGUF and its fp32 conversion (``smollm2_to_safetensors.py``): reading a GGUF's header should
cost what reading a safetensors header does.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

from sparse_checkpoint import SHAPES, build_sparse_checkpoint, llama_specs


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


def inspect_columns(path: str, size: int, runs: int) -> dict[str, str]:
    """Bytes read by open+summarize, and the times of ``peftcli inspect --json`` and of the API, on ``path``."""
    from peftcli.checkpoint.reader import open_checkpoint
    from peftcli.summary import summarize

    def cli():
        subprocess.run([sys.executable, "-m", "peftcli", "inspect", path, "--json"], check=True, stdout=subprocess.DEVNULL)

    def api():
        with open_checkpoint(path) as ckpt:
            summarize(ckpt)

    api()  # warm: imports and the page cache, as for the timed runs
    before = rchar()
    api()
    read = rchar() - before
    return {
        "bytes read by open+summarize": f"{read:,}",
        "bytes read / size": f"{read / size:.1e}",
        "peftcli inspect --json (fresh process)": f"{median_time(cli, runs) * 1000:.0f} ms",
        "API open_checkpoint + summarize": f"{median_time(api, runs) * 1000:.1f} ms",
    }


def measure(shape: str, runs: int) -> dict[str, str]:
    from safetensors import safe_open

    with tempfile.TemporaryDirectory() as d:
        size = build_sparse_checkpoint(d, num_layers=SHAPES[shape][3], shape=shape)
        shards = sorted(n for n in os.listdir(d) if n.endswith(".safetensors"))

        def reference():
            for s in shards:
                with safe_open(os.path.join(d, s), framework="pt") as f:
                    for k in f.keys():
                        f.get_slice(k).get_shape()

        return {
            "checkpoint bytes (apparent size)": f"{size:,}",
            "shards / tensors": f"{len(shards)} / {len(llama_specs(shape))}",
            **inspect_columns(d, size, runs),
            "safetensors safe_open listing (reference)": f"{median_time(reference, runs) * 1000:.1f} ms",
        }


def measure_file(path: str, runs: int) -> dict[str, str]:
    """The inspect columns of one existing checkpoint (a .gguf file or a safetensors directory)."""
    files = [path] if os.path.isfile(path) else [os.path.join(path, n) for n in os.listdir(path) if n.endswith(".safetensors")]
    size = sum(os.path.getsize(f) for f in files)
    return {"file bytes": f"{size:,}", **inspect_columns(path, size, runs)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of: {', '.join(SHAPES)}")
    ap.add_argument("--gguf", help="a .gguf file: measure it beside --safetensors instead of the sparse shapes")
    ap.add_argument("--safetensors", help="with --gguf: a safetensors directory of the same model")
    args = ap.parse_args()
    if args.gguf:
        shapes = [os.path.basename(args.gguf), os.path.basename(args.safetensors.rstrip("/")) + " (safetensors)"]
        columns = [measure_file(args.gguf, args.runs), measure_file(args.safetensors, args.runs)]
    else:
        shapes = args.shapes.split(",")
        columns = [measure(shape, args.runs) for shape in shapes]
    print("| measure | " + " | ".join(shapes) + " |")
    print("|---|" + "---|" * len(shapes))
    for key in columns[0]:
        print(f"| {key} | " + " | ".join(c[key] for c in columns) + " |")


if __name__ == "__main__":
    main()
