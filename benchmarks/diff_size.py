"""Size of a ``.diff`` against density, and its memory: ``python benchmarks/diff_size.py [--layers 12] [--hidden 512]``.

A synthetic BF16 checkpoint (per layer four hidden×hidden and two hidden×4·hidden matrices plus two
norms) and a fine-tuned copy (φ Gaussian everywhere). For each density and value dtype the file
size is checked against the bound 1.05 × d × N × (value bytes + index bytes) + whole 1-D tensors +
header, N the entries of the matrices. Then, for growing numbers of layers, the peak growth of the
process's anonymous memory (RssAnon, sampled every millisecond) during one ``diff``, in a fresh
process each: it must stay near the largest tensor's working set, not grow with the model.
Prints markdown tables.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from peftcli.checkpoint.safetensors_format import read_header  # noqa: E402
from peftcli.checkpoint.writer import save_state_dict  # noqa: E402
from peftcli.diffing import DiffOptions, diff  # noqa: E402

DENSITIES = (0.001, 0.01, 0.1)
MEMORY_LAYERS = (6, 24, 96)
MODES = {
    "global": DiffOptions(density=0.01),
    "per-tensor": DiffOptions(density=0.01, per_tensor=True),
    "dense": DiffOptions(dense=True),
}
VALUE_BYTES = {"base": 2, "fp32": 4}  # the checkpoint is BF16
INDEX_BYTES = 4  # I32: every tensor has fewer than 2**31 elements


def build(root: str, layers: int, hidden: int) -> tuple[str, str]:
    g = torch.Generator().manual_seed(0)
    base, ft = {}, {}
    for i in range(layers):
        shapes = {f"l{i}.{p}": (hidden, hidden) for p in ("q", "k", "v", "o")}
        shapes |= {
            f"l{i}.up": (4 * hidden, hidden),
            f"l{i}.down": (hidden, 4 * hidden),
            f"l{i}.norm1": (hidden,),
            f"l{i}.norm2": (hidden,),
        }
        for name, shape in shapes.items():
            w = torch.randn(shape, generator=g) * 0.02
            base[name] = w.bfloat16()
            ft[name] = (w + torch.randn(shape, generator=g) * 0.002).bfloat16()
    paths = os.path.join(root, "base.safetensors"), os.path.join(root, "ft.safetensors")
    save_state_dict(base, paths[0])
    save_state_dict(ft, paths[1])
    return paths


def rss_anon() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon"))


def probe(base: str, ft: str, mode: str) -> None:
    """In a fresh process: print the peak RssAnon growth during one diff of ``base`` and ``ft``."""
    with tempfile.TemporaryDirectory() as root:
        small = build(root, 1, 64)
        for options in MODES.values():  # torch's one-time allocations happen here, not below
            diff(*small, os.path.join(root, f"warm-{options.selection}.diff"), options)
        before = rss_anon()
        peak, done = [before], threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], rss_anon())
                time.sleep(0.001)

        sampler = threading.Thread(target=sample)
        sampler.start()
        diff(base, ft, os.path.join(root, "x.diff"), MODES[mode])
        done.set()
        sampler.join()
        print(peak[0] - before)


def size_table(layers: int, hidden: int) -> None:
    with tempfile.TemporaryDirectory() as root:
        base, ft = build(root, layers, hidden)
        print(f"checkpoint: {os.path.getsize(base):,} bytes BF16, {layers} layers, hidden {hidden}\n")
        diff(base, ft, os.path.join(root, "warm-up.diff"), DiffOptions(density=0.01))  # page cache and torch warm
        print("| density | values | K | N | file bytes | bound | file / bound | whole 1-D bytes | header bytes | time |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for values in VALUE_BYTES:
            for d in DENSITIES:
                out = os.path.join(root, f"d{d}-{values}.diff")
                start = time.perf_counter()
                report = diff(base, ft, out, DiffOptions(density=d, values=values))
                seconds = time.perf_counter() - start
                header = read_header(out).data_start
                whole = sum(t.nbytes for t in report.tensors if t.whole)
                bound = 1.05 * d * report.n * (VALUE_BYTES[values] + INDEX_BYTES) + whole + header
                size = os.path.getsize(out)
                assert size <= bound, (d, values, size, bound)
                print(
                    f"| {d:g} | {values} | {report.k:,} | {report.n:,} | {size:,} | {bound:,.0f} | {size / bound:.3f} | "
                    f"{whole:,} | {header:,} | {seconds:.2f} s |"
                )


def memory_table(hidden: int) -> None:
    largest = 4 * hidden * hidden * 4  # the largest matrix's φ in fp32
    print(f"\npeak RssAnon growth during one diff, bytes (largest tensor's fp32 φ: {largest:,} bytes)\n")
    print("| layers | checkpoint bytes | " + " | ".join(MODES) + " |")
    print("|---|---|" + "---|" * len(MODES))
    for layers in MEMORY_LAYERS:
        with tempfile.TemporaryDirectory() as root:
            base, ft = build(root, layers, hidden)
            cells = []
            for mode in MODES:
                cmd = [sys.executable, __file__, "--probe", base, ft, mode]
                cells.append(f"{int(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout):,}")
            print(f"| {layers} | {os.path.getsize(base):,} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--probe", nargs=3, metavar=("BASE", "FT", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        probe(*args.probe)
        return
    size_table(args.layers, args.hidden)
    memory_table(args.hidden)


if __name__ == "__main__":
    main()
