"""Start-up time of ``peftcli --help`` against ``python -c pass`` (and what importing torch would cost).

    python benchmarks/startup.py [--runs 10]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time


def median_ms(cmd: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    runs = ap.parse_args().runs
    script = shutil.which("peftcli") or "peftcli"
    base = median_ms([sys.executable, "-c", "pass"], runs)
    rows = [
        ("python -c pass", base),
        ("peftcli --help", median_ms([script, "--help"], runs)),
        ("python -m peftcli --help", median_ms([sys.executable, "-m", "peftcli", "--help"], runs)),
        ("python -c 'import torch' (avoided by lazy imports)", median_ms([sys.executable, "-c", "import torch"], runs)),
    ]
    for name, ms in rows:
        print(f"| {name} | {ms:.0f} ms | {ms / base:.1f}× |")


if __name__ == "__main__":
    main()
