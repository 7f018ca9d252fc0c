"""`peftcli inject` for every method on a 13.5 GB checkpoint: time, bytes read, bytes written.

    nice python benchmarks/inject_large.py [--runs 3] [--only REGEX] [--json results.json]

The checkpoint is the sparse Llama-2-7B-shaped one of sparse_checkpoint.py (real headers, data
regions are holes), plus the word-level tokenizer of ``peftcli.tiny`` (for prompt's text init)
and, for BitFit (Llama has no biases), a copy with q/k/v/o biases as ``attention_bias`` gives.

Per command, each in a fresh process (start-up and imports included):

- time: the median wall time of ``--runs`` runs of ``python -m peftcli inject ... -o OUT``;
- read from the checkpoint: the bytes the process (and any child) got from files in the
  checkpoint's directory, summed over every read/pread64/readv/preadv/preadv2 call as
  ``strace -ff -y`` reports them (one separate, untimed run; the reader uses preadv, and
  nothing in peftcli maps a safetensors file, so no read escapes this count);
- process rchar: ``/proc/self/io`` rchar at exit — every byte read through a read call,
  the Python and torch imports included (these are the same for every method; the
  ``import torch`` row gives the floor);
- written: the size of the adapter directory written (``wchar`` at exit is in the JSON).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from sparse_checkpoint import build_sparse_checkpoint, llama_specs

from peftcli.checkpoint.writer import TensorSpec

# Runs peftcli's CLI and writes /proc/self/io (rchar, wchar) to $BENCH_IO when the process exits.
WRAPPER = r"""
import atexit, json, os, sys
def _io():
    with open('/proc/self/io') as f:
        io = dict(line.split(': ') for line in f.read().splitlines())
    with open(os.environ['BENCH_IO'], 'w') as f:
        json.dump({k: int(v) for k, v in io.items()}, f)
atexit.register(_io)
sys.argv = ['peftcli', *sys.argv[1:]]
from peftcli.cli import main
main()
"""

_READ = re.compile(r"^(?:read|pread64|readv|preadv|preadv2)\(\d+<([^>]*)>.*\)\s+=\s+(\d+)$")
TEXT = "w1 w2 w3 w4 w5 w6 w7"  # words of the tiny word-level tokenizer


def cases(base: str, biased: str) -> list[tuple[str, list[str]]]:
    r16 = ["--rank", "16"]
    return [
        ("lora --rank 16 (q, v)", ["lora", *r16, base]),
        ("lora --rank 16 --targets all-linear", ["lora", *r16, "--targets", "all-linear", base]),
        ("lora --rank 16 --dora", ["lora", *r16, "--dora", base]),
        ("ia3", ["ia3", base]),
        ("adapter --style houlsby", ["adapter", "--style", "houlsby", base]),
        ("adapter --style pfeiffer", ["adapter", "--style", "pfeiffer", base]),
        ("adapter --style parallel", ["adapter", "--style", "parallel", base]),
        ("prefix --virtual-tokens 20", ["prefix", "--virtual-tokens", "20", base]),
        ("prefix --virtual-tokens 20 --projection 512", ["prefix", "--virtual-tokens", "20", "--projection", "512", base]),
        ("prefix --virtual-tokens 20 --layers 20-29", ["prefix", "--virtual-tokens", "20", "--layers", "20-29", base]),
        ("prompt --virtual-tokens 20 --init vocab", ["prompt", "--virtual-tokens", "20", "--init", "vocab", base]),
        ("prompt --virtual-tokens 20 --init text", ["prompt", "--virtual-tokens", "20", "--init", "text", "--init-text", TEXT, base]),
        ("prompt --virtual-tokens 20 --init random", ["prompt", "--virtual-tokens", "20", "--init", "random", base]),
        ("bitfit (Llama: no biases)", ["bitfit", base]),
        ("bitfit (with q/k/v/o biases)", ["bitfit", biased]),
        ("layers --layers 28-29 --modules mlp", ["layers", "--layers", "28-29", "--modules", "mlp", base]),
        ("lt-sft --density 0.01", ["lt-sft", "--density", "0.01", base]),
        ("diff-pruning --density 0.005", ["diff-pruning", "--density", "0.005", base]),
        ("lottery --rounds 5", ["lottery", "--rounds", "5", base]),
    ]


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def inject(args: list[str], out: str, io_path: str, strace_prefix: str | None = None) -> subprocess.CompletedProcess:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-c", WRAPPER, "inject", *args, "-o", out]
    if strace_prefix:
        cmd = ["strace", "-ff", "-y", "-qq", "-s", "0", "-e", "trace=read,pread64,readv,preadv,preadv2", "-e", "signal=none",
               "-o", strace_prefix, *cmd]
    env = {**os.environ, "BENCH_IO": io_path}
    return subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def bytes_read_under(prefix: str, directory: str) -> int:
    """Bytes the traced processes read from files under ``directory`` (strace -ff logs ``prefix``.PID)."""
    directory = os.path.realpath(directory) + os.sep
    total = 0
    for log in glob.glob(prefix + ".*"):
        with open(log, errors="replace") as f:
            for line in f:
                m = _READ.match(line.strip())
                if m and m.group(1).startswith(directory):
                    total += int(m.group(2))
        os.remove(log)
    return total


def measure(label: str, args: list[str], base_dir: str, runs: int, work: str) -> dict:
    out, io_path = os.path.join(work, "run"), os.path.join(work, "io.json")
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        proc = inject(args, out, io_path)
        times.append(time.perf_counter() - t)
        if proc.returncode != 0:
            return {"command": label, "exit": proc.returncode, "error": proc.stderr.strip().splitlines()[-1]}
    with open(io_path) as f:
        io = json.load(f)
    row = {
        "command": label,
        "exit": 0,
        "seconds": statistics.median(times),
        "runs": runs,
        "written_bytes": dir_bytes(out),
        "rchar": io["rchar"],
        "wchar": io["wchar"],
    }
    if shutil.which("strace"):
        prefix = os.path.join(work, "strace")
        proc = inject(args, out, io_path, strace_prefix=prefix)
        row["checkpoint_read_bytes"] = bytes_read_under(prefix, base_dir) if proc.returncode == 0 else None
    shutil.rmtree(out, ignore_errors=True)
    return row


def with_biases() -> list[TensorSpec]:
    """Llama-2-7B's tensors plus q/k/v/o biases (what ``attention_bias: true`` adds)."""
    specs = []
    for s in llama_specs():
        specs.append(s)
        if re.search(r"self_attn\.[qkvo]_proj\.weight$", s.name):
            specs.append(TensorSpec(s.name[: -len("weight")] + "bias", "BF16", (s.shape[0],)))
    return specs


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--only", metavar="REGEX", help="only the commands matching REGEX")
    ap.add_argument("--json", metavar="PATH", help="also write the rows as JSON to PATH")
    opts = ap.parse_args()
    from peftcli.tiny import word_tokenizer

    with tempfile.TemporaryDirectory() as d:
        base, biased = os.path.join(d, "base"), os.path.join(d, "base-bias")
        for path in (base, biased):
            os.mkdir(path)
        size = build_sparse_checkpoint(base)
        word_tokenizer().save_pretrained(base)
        build_sparse_checkpoint(biased, with_biases())
        with open(os.path.join(biased, "config.json")) as f:
            config = json.load(f)
        config["attention_bias"] = True
        with open(os.path.join(biased, "config.json"), "w") as f:
            json.dump(config, f)
        print(f"checkpoint: {size:,} bytes (apparent), Llama-2-7B shapes, BF16, 3 shards; load {os.getloadavg()[0]:.2f}")
        print("| command | time | read from checkpoint | process rchar | written |")
        print("|---|---|---|---|---|")
        rows = []
        for label, args in cases(base, biased):
            if opts.only and not re.search(opts.only, label):
                continue
            row = measure(label, args, biased if biased in args else base, opts.runs, d)
            rows.append(row)
            if row["exit"]:
                print(f"| {label} | exit {row['exit']}: {row['error']} | | | |", flush=True)
            else:
                print(
                    f"| {label} | {row['seconds']:.2f} s | {fmt_bytes(row.get('checkpoint_read_bytes'))} "
                    f"| {fmt_bytes(row['rchar'])} | {fmt_bytes(row['written_bytes'])} |",
                    flush=True,
                )
        io_path = os.path.join(d, "io.json")
        start = time.perf_counter()
        code = "import atexit, json, os; import torch\n" + WRAPPER.split("atexit.register(_io)")[0] + "_io()"
        subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "BENCH_IO": io_path})
        seconds = time.perf_counter() - start
        with open(io_path) as f:
            rchar = json.load(f)["rchar"]
        print(f"| python -c 'import torch' (part of every inject) | {seconds:.2f} s | | {fmt_bytes(rchar)} | |")
        rows.append({"command": "python -c 'import torch'", "seconds": seconds, "rchar": rchar})
        print(f"load at the end {os.getloadavg()[0]:.2f}")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump({"checkpoint_bytes": size, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
