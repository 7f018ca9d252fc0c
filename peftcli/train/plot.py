"""``peftcli plot``: a PNG of a run's training loss and validation curves (matplotlib, an optional extra)."""

from __future__ import annotations

import json
import os

from peftcli.errors import BadInputError, UsageError

METRICS_FILE = "metrics.jsonl"


def read_metrics(run: str) -> tuple[list[dict], list[dict]]:
    """(training log lines, evaluation lines) of ``run``'s metrics.jsonl."""
    path = os.path.join(run, METRICS_FILE)
    if not os.path.isfile(path):
        raise BadInputError(f"{run}: no {METRICS_FILE}", "train the run first: peftcli train RUN --data FILE")
    train, evals = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise BadInputError(f"{path}:{lineno}: not valid JSON") from None
            (evals if "eval_loss" in row else train).append(row)
    if not train:
        raise BadInputError(f"{path}: no training steps logged")
    return train, evals


def plot_run(run: str, out: str, force: bool = False) -> str:
    """Write the loss (and validation loss / accuracy) curves of ``run`` to the PNG ``out``."""
    try:
        import matplotlib
    except ImportError:
        raise UsageError("plotting needs matplotlib", 'install the extra: pip install "peftcli[plot]"') from None
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    from peftcli.checkpoint.atomic import atomic_output

    train, evals = read_metrics(run)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="training loss")
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], marker="o", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if evals and "eval_accuracy" in evals[0]:
        acc = ax.twinx()
        acc.plot([r["step"] for r in evals], [r["eval_accuracy"] for r in evals], color="tab:green", marker="s", label="validation accuracy")
        acc.set_ylabel("accuracy")
        acc.set_ylim(0, 1)
        acc.legend(loc="upper right")
    ax.legend(loc="upper left" if evals and "eval_accuracy" in evals[0] else "best")
    ax.set_title(os.path.basename(os.path.normpath(run)))
    fig.tight_layout()
    with atomic_output(out, directory=False, inputs=[os.path.join(run, METRICS_FILE)], force=force) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return out
