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
        raise BadInputError(f"{run}: no {METRICS_FILE}", "train the run first: `peftcli train RUN --data FILE`")
    train, evals = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise BadInputError(f"{path}:{lineno}: not valid JSON", "peftcli train writes this log; delete the damaged line or retrain the run") from None
            if "round" in row:  # a lottery-ticket run: one line per round
                continue
            (evals if "eval_loss" in row else train).append(row)
    if not train:
        raise BadInputError(f"{path}: no training steps logged", "train the run for at least `log_every` steps first")
    return train, evals


def read_rounds(run: str) -> list[dict]:
    """The per-round lines of a lottery-ticket run's metrics.jsonl (empty for other runs)."""
    path = os.path.join(run, METRICS_FILE)
    if not os.path.isfile(path):
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line) if line.strip() else None
            except json.JSONDecodeError:
                return []  # read_metrics names the bad line
            if isinstance(row, dict) and "round" in row:
                rows.append(row)
    return rows


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UsageError("plotting needs matplotlib", 'install the extra: pip install "peftcli[plot]"') from None
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def plot_run(run: str, out: str, force: bool = False) -> str:
    """Write the loss (and validation loss / accuracy) curves of ``run`` to the PNG ``out``.

    A lottery-ticket run gets its rounds instead: validation accuracy and loss against the
    density of the ticket.
    """
    plt = _pyplot()
    rounds = read_rounds(run)
    if rounds:
        return _plot_rounds(plt, run, rounds, out, force)
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
    return _save(plt, fig, run, out, force)


def _save(plt, fig, run: str, out: str, force: bool) -> str:
    """Write ``fig`` to the PNG ``out`` atomically (never over the run's metrics)."""
    from peftcli.checkpoint.atomic import atomic_output

    fig.tight_layout()
    with atomic_output(out, directory=False, inputs=[os.path.join(run, METRICS_FILE)], force=force) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return out


def _plot_rounds(plt, run: str, rounds: list[dict], out: str, force: bool) -> str:
    density = [100.0 * r["density"] for r in rounds]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    if all(r.get("eval_accuracy") is not None for r in rounds):
        ax.plot(density, [r["eval_accuracy"] for r in rounds], marker="o", label="validation accuracy")
        ax.set_ylabel("validation accuracy")
    else:
        key = "eval_loss" if all(r.get("eval_loss") is not None for r in rounds) else "final_loss"
        ax.plot(density, [r[key] for r in rounds], marker="o", label=key.replace("_", " "))
        ax.set_ylabel(key.replace("_", " "))
    ax.set_xscale("log")
    ax.invert_xaxis()  # pruning goes left to right
    ax.set_xlabel("weights remaining (%)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    ax.set_title(os.path.basename(os.path.normpath(run)))
    return _save(plt, fig, run, out, force)
