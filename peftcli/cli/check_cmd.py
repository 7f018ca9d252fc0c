"""``peftcli check BASE ARTIFACT...``: pre-flight validation of adapters and diffs against a base.

A thin layer over ``peftcli.preflight.check``. Results (one line per input and a summary, or one
JSON document) go to stdout; when anything fails, the one-line error on stderr and exit 1.
"""

from __future__ import annotations

import click

from peftcli.preflight import CheckOptions, count_artifacts
from peftcli.cli.flags import command_flags
from peftcli.cli.options import click_options
from peftcli.cli.output import emit_json, json_option, printable
from peftcli.options import from_options


@click.command()
@click.argument("base", type=click.Path())
@click.argument("artifacts", nargs=-1, type=click.Path())
@click_options(CheckOptions)
@json_option
def check(base, artifacts, as_json, **values):
    """Check that adapter directories, .diff files and fine-tunes fit BASE, before using them.

    For an adapter: its method and config, its tensors' keys and shapes against what that
    config creates on BASE (missing, unexpected, wrong shape or rank), modules_to_save heads,
    NaN/Inf. For a .diff: the format, its base fingerprint (tensor names, dtypes, shapes;
    with --content also the bytes), NaN/Inf. For a fine-tuned checkpoint directory: the
    base's tensor names, dtypes and shapes. For BASE: it opens, and config.json's
    vocab_size matches the embedding (a resized vocabulary is the usual cause of shape
    mismatches). Prints one line per input, ok or FAIL with the first problem (--json lists
    every problem); exits 1 when any fails. When all fit, says what peftcli merge of them
    would do: tensors changed, bytes written, peak memory and time (estimated from headers).
    --train predicts the peak memory of training each adapter RUN with peftcli train's
    options (weights, φ, gradients, optimizer state, activations), reading no weights.

    \b
    Examples:
      peftcli check base/ runs/lora/ task.diff
      peftcli check base/ ftA/ ftB/ --method ties
      peftcli check base/ task.diff --content --json
      peftcli check base/ --scan-base
      peftcli check llm/ runs/qlora/ --train --batch-size 4 --max-length 2048 --quantize nf4 --gradient-checkpointing
    """
    from peftcli.preflight import check as run_check
    from peftcli.training.memory import describe as describe_memory
    from peftcli.errors import BadInputError, render_fields

    report = run_check(base, list(artifacts), from_options(CheckOptions, values))
    if as_json:
        emit_json(report.to_json())
    else:
        flags = command_flags(click.get_current_context().command)  # a problem names fields, as errors do
        for result in [report.base, *report.artifacts]:
            click.echo(printable(render_fields(_line(result), flags)))
        click.echo(printable(_summary(report)))
        if report.merge or report.merge_refusal:
            click.echo(printable(render_fields(_merge_line(report), flags)))
        for run, memory in (report.train_memory or {}).items():
            click.echo(printable(f"{run}: {describe_memory(memory)}"))
    if not report.ok:
        where = "the JSON document lists every problem" if as_json else "the lines above say why; --json lists every problem"
        raise BadInputError(report.failure(), where)


def _size(n: float) -> str:
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def _merge_line(report) -> str:
    if report.merge_refusal:
        return f"merge would refuse: {report.merge_refusal}"
    m = report.merge
    return (
        f"merge ({m.method}): changes {m.changed} of {_tensors(m.tensors)}, reads {_size(m.read_bytes)}, "
        f"hashes {_size(m.hash_bytes)}, writes {_size(m.write_bytes)}; peak memory ≈ {_size(m.peak_bytes)}"
        f"{f' (most for {m.peak_tensor})' if m.peak_tensor else ''}, time ≈ {m.seconds:.1f} s at assumed rates"
    )


def _line(result) -> str:
    if result.ok:
        return f"{result.path}: ok ({_what(result)})"
    first = result.problems[0]
    text = f"{result.path}: FAIL: {first.message}"
    if first.hint:
        text += f" ({first.hint})"
    more = len(result.problems) - 1
    return text + (f" (+{more} more)" if more else "")


def _tensors(n: int) -> str:
    return f"{n} tensor" if n == 1 else f"{n} tensors"


def _what(result) -> str:
    d = result.details
    if result.kind == "base":
        vocab = f", vocabulary {d['embedding_rows']}" if d.get("embedding_rows") else ""
        return f"base: {_tensors(d['tensors'])}, {d['params']:,} params{vocab}"
    if result.kind == "diff":
        return f"diff: {result.method}, {_tensors(d['tensors'])}, density {d['density']:.6g}"
    if result.kind == "checkpoint":
        return f"fine-tuned checkpoint: {_tensors(d['tensors'])}"
    heads = f", head {', '.join(map(str, d['heads']))}" if d.get("heads") else ""
    return f"adapter: {result.method}, {_tensors(d['tensors'])}{heads}"


def _summary(report) -> str:
    n, fit = len(report.artifacts), len(report.artifacts) - len(report.failed)
    base = report.base.path
    if not report.base.ok:
        return f"the base {base} fails its checks" + (f"; {fit} of {count_artifacts(n)} fit it" if n else "")
    if not n:
        return f"{base} is ok (no artifacts given)"
    if fit == n:
        return f"the {count_artifacts(n)} fit{'s' if n == 1 else ''} {base}"
    return f"{fit} of {count_artifacts(n)} fit {base}"
