"""Training benchmark: ``peftcli train --packing`` vs TRL's ``SFTTrainer(packing=True)``, tokens/s and peak RSS.

Both sides train the same LoRA (r=8, α=16, dropout 0, ``q_proj,v_proj``) on the same fp32 base
(SmolLM2-135M, the directory ``benchmarks/smollm2_to_safetensors.py`` writes, default
/tmp/smollm2) and the same chat SFT rows (SST-2 sentences as ``{"messages": [user "Review: ...
Is it positive or negative?", assistant "positive"|"negative"]}``), on CPU, one torch thread,
``--max-length`` 256, packing on, ``--batch-size`` 4 rows per step, no gradient accumulation,
``--steps`` optimizer steps of AdamW at ``--lr`` with linear decay and no warmup, gradient
clipping at 1.0, loss on the assistant tokens only. Each run is a fresh subprocess:

- **peftcli**: ``peftcli inject lora`` (untimed), then the CLI ``peftcli train RUN --packing
  --threads 1 --json``; its time is the summary's ``wall_seconds`` (the training loop, after
  the model load and data preparation). A second run without ``--packing`` gives packing's gain.
- **TRL**: ``SFTTrainer`` with ``SFTConfig(packing=True, assistant_only_loss=True, ...)`` and
  PEFT's ``LoraConfig``; its time is ``trainer.train()`` alone. SmolLM2's chat template has no
  ``{% generation %}`` markers, which ``assistant_only_loss`` needs, so the TRL side gets the
  same template with the markers around each assistant message's content and end-of-turn
  marker: it renders the same text (checked here), and marks the same tokens that peftcli's
  prefix-by-prefix search finds (``peftcli.training.chat``). Gradient checkpointing is off
  (TRL's config turns it on by default; peftcli does not use it).

Tokens/s counts the real (non-pad) tokens of the micro-batches each side trained on, divided
by the training time: for peftcli the example tokens of the rows its seeded order visits
(recomputed with its own encode/pack/epoch_order, as ``benchmarks/packing.py``); for TRL the
tokens of every batch its collator made (padding-free packing: one row per batch, no pads;
otherwise the attention mask's sum). Peak RSS is the process's ``VmHWM``: for TRL read from
/proc/self/status at the end of the worker; for the peftcli CLI the child's ``ru_maxrss``
from ``os.wait4`` (the same high-water mark, read by the parent). It includes the model load.

Run it in a venv that has TRL (never a peftcli dependency), with this checkout on PYTHONPATH:

    python3 -m venv /tmp/trlvenv && . /tmp/trlvenv/bin/activate
    pip install torch==2.13.0 && pip install trl peft transformers datasets accelerate safetensors click rich pyyaml numpy
    PYTHONPATH=$PWD python benchmarks/train_vs_trl.py            # 18 min on 2 cores at load 8
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SST2 = os.path.join(ROOT, "..", "shared", "data", "sst2", "train.tsv")
TARGETS = ["q_proj", "v_proj"]


# --------------------------------------------------------------------------- data


def write_chat_data(path: str, n: int, seed: int) -> None:
    """``n`` chat rows from SST-2 sentences (seeded sample), the label word as the answer."""
    with open(SST2, encoding="utf-8") as f:
        next(f)
        rows = [line.rstrip("\n").rsplit("\t", 1) for line in f]
    rng = random.Random(seed)
    rng.shuffle(rows)
    with open(path, "w", encoding="utf-8") as f:
        for text, label in rows[:n]:
            messages = [
                {"role": "user", "content": f"Review: {text.strip()}\nIs it positive or negative?"},
                {"role": "assistant", "content": "positive" if label.strip() == "1" else "negative"},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")


def generation_template(template: str) -> str:
    """SmolLM2's chat template with ``{% generation %}`` around each assistant turn's content and end marker.

    Refuses a template other than the one it was written for rather than guess where the markers go.
    """
    old = "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    if template.count(old) != 1:
        raise SystemExit("the chat template is not SmolLM2's: cannot add generation markers to it")
    new = (
        "{% if message['role'] == 'assistant' %}{{'<|im_start|>assistant\n'}}{% generation %}"
        "{{ message['content'] + '<|im_end|>' + '\n' }}{% endgeneration %}{% else %}" + old + "{% endif %}"
    )
    return template.replace(old, new)


def vm_hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


# --------------------------------------------------------------------------- peftcli side


def run_peftcli(spec: dict, packing: bool) -> dict:
    """``peftcli inject`` then ``peftcli train --json`` as subprocesses; the train child's summary and peak RSS."""
    run = os.path.join(spec["work"], "peftcli-packed" if packing else "peftcli-padded")
    shutil.rmtree(run, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    peftcli = [sys.executable, "-m", "peftcli"]
    inject = peftcli + ["inject", "lora", "--rank", "8", "--alpha", "16", "--dropout", "0", "--targets", ",".join(TARGETS), spec["model"], "-o", run]
    subprocess.run(inject, check=True, env=env, stdout=subprocess.DEVNULL)
    cmd = peftcli + [
        "train", run, "--model", spec["model"], "--data", spec["data"], "--steps", str(spec["steps"]),
        "--batch-size", str(spec["batch_size"]), "--grad-accum", "1", "--lr", str(spec["lr"]), "--schedule", "linear",
        "--warmup-steps", "0", "--max-grad-norm", "1.0", "--max-length", str(spec["max_length"]), "--threads", "1",
        "--device", "cpu", "--log-every", str(spec["steps"]), "--quiet", "--json",
    ] + (["--packing"] if packing else [])
    spec.setdefault("commands", []).append(" ".join(cmd[1:]))
    _popen_maxrss.last = None
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate()  # reaps the child through the patched _try_wait: os.wait4 keeps its rusage
    row = _peftcli_result(proc, out, err, spec, packing)
    row["peak_rss"] = _popen_maxrss.last
    return row


def _peftcli_result(proc, out, err, spec, packing) -> dict:
    if proc.returncode != 0:
        sys.exit(f"peftcli train failed:\n{err.decode(errors='replace')[-4000:]}")
    summary = json.loads(out)
    summary = summary.get("summary", summary)
    tokens = peftcli_tokens(spec, packing)
    seconds = summary["wall_seconds"]
    return {"side": "peftcli --packing" if packing else "peftcli (no packing)", "tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / seconds, "final_loss": summary.get("final_loss"),
            "packing_efficiency": summary.get("packing_efficiency")}


def peftcli_tokens(spec: dict, packing: bool) -> int:
    """The example tokens of the micro-batches ``peftcli train`` visits (its own encode, pack and order)."""
    from peftcli.training.batching import encode, epoch_order, load_tokenizer
    from peftcli.training.chat import resolve_template
    from peftcli.training.data import load_dataset
    from peftcli.training.packing import pack

    data = load_dataset(spec["data"])
    tokenizer = load_tokenizer(spec["model"])
    template = resolve_template(data.chat, None, tokenizer, spec["model"])
    items = encode(data, tokenizer, spec["max_length"], data.labels, template, "the tokenizer's")
    if packing:
        items, _ = pack(items, spec["max_length"])
    total, order, epoch, offset, batch = 0, epoch_order(len(items), 0, 0), 0, 0, spec["batch_size"]
    for _ in range(spec["steps"]):
        if offset + batch > len(order):
            epoch, offset = epoch + 1, 0
            order = epoch_order(len(items), 0, epoch)
        total += sum(len(items[i]["input_ids"]) for i in order[offset : offset + batch])
        offset += batch
    return total


# --------------------------------------------------------------------------- TRL side (worker process)


def trl_worker(spec: dict) -> None:
    import torch

    torch.set_num_threads(1)
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(spec["model"], local_files_only=True)
    original = tokenizer.chat_template
    tokenizer.chat_template = generation_template(original)
    probe = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    if tokenizer.apply_chat_template(probe, tokenize=False, chat_template=original) != tokenizer.apply_chat_template(probe, tokenize=False):
        raise SystemExit("the marked template renders differently from the original")
    # The converter's config.json keeps the GGUF's quantization_config although the weights are
    # plain fp32 safetensors; transformers' Trainer refuses a "GGUF-quantized" model, so drop it.
    config = AutoConfig.from_pretrained(spec["model"], local_files_only=True)
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    model = AutoModelForCausalLM.from_pretrained(spec["model"], config=config, dtype=torch.float32, local_files_only=True)
    if getattr(model, "hf_quantizer", None) is not None or any(p.dtype != torch.float32 for p in model.parameters()):
        raise SystemExit("the base did not load as plain fp32")
    dataset = load_dataset("json", data_files=spec["data"], split="train")
    args = SFTConfig(
        output_dir=os.path.join(spec["work"], "trl-out"), max_steps=spec["steps"], per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=1, learning_rate=spec["lr"], lr_scheduler_type="linear", warmup_steps=0, max_grad_norm=1.0,
        weight_decay=0.0, max_length=spec["max_length"], packing=True, assistant_only_loss=True, gradient_checkpointing=False,
        use_cpu=True, bf16=False, fp16=False, report_to="none", save_strategy="no", logging_steps=spec["steps"], seed=0,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora)
    # Per collated batch; only the first ``steps`` were trained on (accelerate's loader collates one ahead).
    counted = {"tokens": [], "shapes": []}
    collator = trainer.data_collator

    def counting(features):
        batch = collator(features)
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        counted["tokens"].append(int(mask.sum()) if mask is not None else int(ids.numel()))
        counted["shapes"].append(list(ids.shape))
        return batch

    trainer.data_collator = counting
    start = time.perf_counter()
    out = trainer.train()
    seconds = time.perf_counter() - start
    if trainer.state.global_step != spec["steps"] or len(counted["tokens"]) < spec["steps"]:
        raise SystemExit(f"TRL ran {trainer.state.global_step} steps over {len(counted['tokens'])} batches, not {spec['steps']}")
    tokens = sum(counted["tokens"][: spec["steps"]])
    import peft
    import transformers
    import trl

    result = {
        "side": "TRL SFTTrainer (packing)", "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
        "peak_rss": vm_hwm(), "final_loss": out.training_loss, "batches_collated": len(counted["tokens"]), "first_shapes": counted["shapes"][:3],
        "packing_strategy": getattr(args, "packing_strategy", None), "padding_free": getattr(trainer, "padding_free", getattr(args, "padding_free", None)),  # bfd turns it on
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "versions": {"trl": trl.__version__, "peft": peft.__version__, "transformers": transformers.__version__, "torch": torch.__version__},
    }
    with open(spec["result"], "w") as f:
        json.dump(result, f)


def run_trl(spec: dict) -> dict:
    out = os.path.join(spec["work"], "result-trl.json")
    if os.path.exists(out):
        os.remove(out)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps({**spec, "result": out, "commands": None})]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    if proc.returncode != 0 or not os.path.isfile(out):
        sys.exit(f"TRL worker failed:\n{proc.stderr.decode(errors='replace')[-4000:]}")
    with open(out) as f:
        return json.load(f)


# --------------------------------------------------------------------------- orchestration


def _popen_maxrss() -> None:
    """Make ``subprocess.Popen.communicate`` record the child's ru_maxrss (os.wait4) in the spec being run."""
    original = subprocess.Popen._try_wait

    def _try_wait(self, wait_flags):
        try:
            pid, status, usage = os.wait4(self.pid, wait_flags)
        except ChildProcessError:
            pid, status, usage = self.pid, 0, None
        if pid == self.pid and usage is not None:
            _popen_maxrss.last = usage.ru_maxrss * 1024  # KiB on Linux
        return pid, status

    subprocess.Popen._try_wait = _try_wait
    _popen_maxrss.original = original


def render(rows: list[dict]) -> str:
    mib = 2**20
    lines = ["| side | tokens | train s | tokens/s | peak RSS | final loss |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['side']} | {r['tokens']:,} | {r['seconds']:.1f} | {r['tokens_per_s']:.1f} | {r['peak_rss'] / mib:,.0f} MiB | {r['final_loss']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model", default="/tmp/smollm2", help="fp32 SmolLM2-135M directory (smollm2_to_safetensors.py)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--examples", type=int, default=1000, help="chat rows written (SST-2 sentences)")
    ap.add_argument("--work", default="/tmp/train_vs_trl")
    ap.add_argument("--no-padded", action="store_true", help="skip the peftcli run without --packing")
    ap.add_argument("--out", help="also write the results as JSON here")
    args = ap.parse_args()
    if args.worker:
        return trl_worker(json.loads(args.worker))
    if not os.path.isfile(os.path.join(args.model, "model.safetensors")):
        sys.exit(f"{args.model} not found: python benchmarks/smollm2_to_safetensors.py -o {args.model}")
    os.makedirs(args.work, exist_ok=True)
    data = os.path.join(args.work, "sst2_chat.jsonl")
    write_chat_data(data, args.examples, seed=0)
    spec = {"model": args.model, "data": data, "steps": args.steps, "batch_size": args.batch_size, "max_length": args.max_length,
            "lr": args.lr, "work": args.work}
    load_before = os.getloadavg()
    _popen_maxrss()
    rows = []
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    for side in ("peftcli", "trl") + (() if args.no_padded else ("peftcli-padded",)):
        print(f"running {side} ...", file=sys.stderr)
        if side == "trl":
            rows.append(run_trl(spec))
        else:
            rows.append(run_peftcli(spec, packing=side == "peftcli"))
        print(f"  {rows[-1]['tokens_per_s']:.1f} tokens/s, {rows[-1]['seconds']:.1f} s, peak RSS {rows[-1]['peak_rss'] / 2**20:,.0f} MiB", file=sys.stderr)
    packed, trl_row = rows[0], rows[1]
    report = {
        "date": started, "machine": {"nproc": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                                     "load_before": load_before, "load_after": os.getloadavg()},
        "settings": {k: spec[k] for k in ("steps", "batch_size", "max_length", "lr")}, "commands": spec.get("commands"),
        "versions": trl_row.get("versions"), "rows": rows,
        "tokens_per_s_ratio": packed["tokens_per_s"] / trl_row["tokens_per_s"], "peak_rss_ratio": packed["peak_rss"] / trl_row["peak_rss"],
    }
    if len(rows) > 2:
        report["packing_gain"] = packed["tokens_per_s"] / rows[2]["tokens_per_s"]
    print(render(rows))
    print(json.dumps(report, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
