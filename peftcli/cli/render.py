"""Human-readable rendering of reports (rich tables); the data comes from the Python API."""

from __future__ import annotations

from peftcli.cli.output import printable


def human_count(n: int) -> str:
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def human_bytes(n: int) -> str:
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def render_inspect(report: dict, console) -> None:
    from rich.table import Table

    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    n_files = len(report["files"])
    grid.add_row("path", printable(report["path"]))
    grid.add_row("format", f"{report['format']} ({report['storage']}, {n_files} file{'s' if n_files != 1 else ''})")
    cfg = report.get("config")
    if cfg:
        arch = ", ".join(cfg["architectures"] or []) or "?"
        grid.add_row("architecture", f"{arch} (model_type {cfg['model_type']})")
        parts = [
            f"{cfg['num_layers']} layers",
            f"hidden {cfg['hidden_size']}",
            f"{cfg['num_attention_heads']} heads ({cfg['num_key_value_heads']} KV)",
            f"intermediate {cfg['intermediate_size'] if cfg['intermediate_size'] is not None else '?'}",
            f"vocab {cfg['vocab_size']}",
            f"tied embeddings {'yes' if cfg['tie_word_embeddings'] else 'no'}",
        ]
        grid.add_row("config", ", ".join(parts))
    grid.add_row("tensors", f"{report['num_tensors']:,}")
    if "diff" in report:  # values stored, not values plus their indices
        entries = report["diff"]["entries"]
        grid.add_row("entries", f"{entries:,} ({human_count(entries)}) values stored, {report['num_params']:,} elements with their indices")
    else:
        grid.add_row("parameters", f"{report['num_params']:,} ({human_count(report['num_params'])})")
    grid.add_row("on disk", f"{report['bytes']:,} bytes ({human_bytes(report['bytes'])})")
    for dtype, d in report["dtypes"].items():
        grid.add_row("dtype " + dtype, f"{d['params']:,} params in {d['tensors']:,} tensor{'s' if d['tensors'] != 1 else ''} ({human_bytes(d['bytes'])})")
    if "filter" in report:
        f = report["filter"]
        grid.add_row("filter", f"/{f['pattern']}/ matches {f['num_tensors']} tensors, {f['num_params']:,} params")
    if "adapter_config" in report:
        ac = report["adapter_config"]
        grid.add_row("adapter", printable(_adapter_line(ac)))
    console.print(grid)

    if report["modules"]:
        table = Table(title="modules", title_justify="left", show_edge=False, pad_edge=False)
        table.add_column("module")
        table.add_column("count", justify="right")
        table.add_column("params", justify="right")
        table.add_column("each", justify="right")
        for row in report["modules"]:
            label = "  " * row["depth"] + printable(row["label"])
            each = row["params"] // row["count"] if row["count"] else 0
            table.add_row(label, f"×{row['count']}" if row["count"] > 1 else "", f"{row['params']:,}", f"{each:,}" if row["count"] > 1 else "")
        console.print()
        console.print(table)

    if "tensors" in report:
        table = Table(title="tensors", title_justify="left", show_edge=False, pad_edge=False)
        for col, justify in (("name", "left"), ("shape", "left"), ("dtype", "left"), ("params", "right"), ("shard", "left")):
            table.add_column(col, justify=justify)
        for t in report["tensors"]:
            table.add_row(printable(t["name"]), "[" + ", ".join(map(str, t["shape"])) + "]", t["dtype"], f"{t['params']:,}", printable(t["shard"]))
        console.print()
        console.print(table)

    if "diff" in report:
        render_description(report["diff"], console)

    if "budget" in report:
        render_budget(report["budget"], console)


def _adapter_line(ac: dict) -> str:
    kind = ac.get("peft_type", "?")
    if kind == "PEFTCLI" and isinstance(ac.get("peftcli"), dict):
        kind = str(ac["peftcli"].get("method", "?"))
    if "num_virtual_tokens" in ac:
        return f"{kind}, {ac['num_virtual_tokens']} virtual tokens"
    targets = ac.get("target_modules")
    if isinstance(targets, list):
        targets = f"{len(targets)} modules" if len(targets) > 6 else ", ".join(map(str, targets))
    line = f"{kind} on {targets}" if targets else kind
    if ac.get("modules_to_save"):
        line += f", also trains {', '.join(map(str, ac['modules_to_save']))}"
    return line


def budget_groups(targets: list[dict]) -> list[dict]:
    """``targets`` (a budget's per-module rows) with modules that differ only by layer index
    collapsed to one row: ``{module: "model.layers.{0..31}.self_attn.q_proj", count, shape,
    each, params}``, in the order of their first member.

    The grouping is inspect's module tree's (``peftcli.summary``): runs of consecutive layers
    whose targets have equal shapes and parameter counts merge.
    """
    from peftcli.summary import _build_tree, _groups

    # The tree's leaves carry (shape, params) where the module tree carries (shape, dtype):
    # equal signatures then mean equal shapes and equal counts, so "each" is well defined.
    root = _build_tree([(t["module"], tuple(t["shape"]), t["params"]) for t in targets])
    order: dict[tuple[int, str], int] = {}
    for i, t in enumerate(targets):
        *path, leaf = t["module"].split(".")
        node = root
        for part in path:
            node = node.children[part]
        order.setdefault((id(node), leaf), i)
    rows: list[tuple[int, dict]] = []

    def walk(node, prefix: str, mult: int) -> None:
        for leaf, (shape, params) in node.params.items():
            module = f"{prefix}.{leaf}" if prefix else leaf
            rows.append((order[(id(node), leaf)], {"module": module, "count": mult, "shape": list(shape), "each": params, "params": params * mult}))
        for label, members in _groups(node):
            walk(members[0], f"{prefix}.{label}" if prefix else label, mult * len(members))

    walk(root, "", 1)
    return [row for _, row in sorted(rows, key=lambda r: r[0])]


def share_line(budget: dict) -> str:
    """The totals line: trainable parameters as a count and as shares of the base."""
    trainable, base = budget["trainable_params"], budget["base_params"]
    head = f"trainable {trainable:,} of {base:,} base parameters"
    peft = f"{budget['pct_of_total']:.4f}% of base + added, PEFT's convention"
    if not budget.get("in_place") and base and trainable > base:
        # φ larger than the base (prefix tuning's MLP on a small model): no negative "fewer".
        return f"{head}: {trainable / base:.2f}× the base's parameters ({peft}), more than full fine-tuning"
    share = f"{budget['pct_of_base']:.4f}% of the base"
    fewer = f"{budget['reduction_pct']:.4f}% fewer than full fine-tuning"
    if not budget.get("in_place"):
        share += f" ({peft})"
        fewer += f" ({budget['reduction_pct_of_total']:.4f}% in PEFT's convention)"
    return f"{head}: {share}, {fewer}"


def render_budget(budget: dict, console) -> None:
    """Per target group (repeated layers once, with a count), then the totals."""
    from rich.table import Table

    table = Table(title=f"budget: {budget['method']}", title_justify="left", show_edge=False, pad_edge=False)
    table.add_column("target")
    table.add_column("count", justify="right")
    table.add_column("shape")
    table.add_column("each", justify="right")
    table.add_column("trains in place" if budget.get("in_place") else "added params", justify="right")
    for g in budget_groups(budget["targets"]):
        many = g["count"] > 1
        table.add_row(
            printable(g["module"]), f"×{g['count']}" if many else "", " × ".join(map(str, g["shape"])),
            f"{g['each']:,}" if many else "", f"{g['params']:,}",
        )
    console.print()
    console.print(table)
    console.print(share_line(budget))
    if "train_defaults" in budget:
        from peftcli.methods.base import TrainDefaults

        console.print(f"train defaults: {TrainDefaults(**budget['train_defaults']).describe()} (peftcli train's flags override them)")
    if "filter" in budget:
        f = budget["filter"]
        if f.get("applies", True):
            console.print(f"filter /{printable(f['pattern'])}/ matches {f['num_targets']:,} targets, {f['trainable_params']:,} of the trainable parameters")
        else:
            console.print(f"filter /{printable(f['pattern'])}/ does not narrow {budget['method']}'s budget: its entries are chosen across every tensor")


def add_stored_rows(grid, doc: dict) -> None:
    """The kept / tensors / stored-whole rows every report of a written .diff shows."""
    grid.add_row("kept", f"{doc['k']:,} of {doc['n']:,} entries (density {doc['density']:.6g})")
    sparse = sum(t["stored"] == "sparse" for t in doc["tensors"])
    grid.add_row("tensors", f"{len(doc['tensors'])} covered: {sparse} sparse, {len(doc['tensors']) - sparse} dense")
    if doc["dense_tensors"]:
        grid.add_row("stored whole", f"{len(doc['dense_tensors'])} tensors, not counted in the density")


def render_report(doc: dict, console) -> None:
    from rich.table import Table

    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("method", f"{doc['method']} ({doc['selection']}), values {doc['values']}")
    add_stored_rows(grid, doc)
    if doc["skipped"]:
        grid.add_row("not covered", f"{len(doc['skipped'])} non-floating-point tensors (equal in both)")
    if doc.get("task_head"):
        grid.add_row("task head", describe_head(doc["task_head"]))
    grid.add_row("wrote", f"{doc['output']} ({doc['bytes']:,} bytes, {human_bytes(doc['bytes'])})")
    console.print(grid)


def describe_head(head: dict) -> str:
    """One line for a diff's task head: class, labels, tensors (stored whole, outside the density)."""
    from rich.markup import escape

    labels = ", ".join(head["labels"][:6]) + (", …" if len(head["labels"]) > 6 else "")
    return escape(
        f"{head['architecture']}, {len(head['labels'])} labels ({labels}); "
        f"{', '.join(sorted(head['tensors']))} stored whole, outside the density"
    )


def render_description(desc: dict, console) -> None:
    """The ``inspect`` section for a sparse diff (``desc`` from ``sparse_diff.describe``)."""
    from rich.table import Table

    fp = desc["base_fingerprint"]
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("diff", f"method {desc['method']}, version {desc['version']}, density {desc['density']:.6g}")
    grid.add_row(
        "covers",
        f"{desc['num_tensors']} tensors, {desc['covered_params']:,} params ({len(desc['dense_tensors'])} stored whole)",
    )
    grid.add_row("base", f"{fp['num_tensors']} tensors, fingerprint {fp['hash'][:16]}…")
    if desc.get("task_head"):
        grid.add_row("task head", describe_head(desc["task_head"]))
    console.print()
    console.print(grid)
    table = Table(title="largest ‖φ‖", title_justify="left", show_edge=False, pad_edge=False)
    for col, justify in (
        ("tensor", "left"),
        ("stored", "left"),
        ("nonzero", "right"),
        ("density", "right"),
        ("‖φ‖", "right"),
    ):
        table.add_column(col, justify=justify)
    rows = {r["name"]: r for r in desc["tensors"]}
    for top in desc["largest"]:
        r = rows[top["name"]]
        table.add_row(r["name"], r["stored"], f"{r['nonzero']:,}", f"{r['density']:.4%}", f"{r['norm']:.4g}")
    console.print()
    console.print(table)
