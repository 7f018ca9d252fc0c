"""``peftcli merge BASE INPUT...``: fold adapters, diffs or fine-tunes into a standalone checkpoint."""

from __future__ import annotations

import sys

import click

from peftcli.cli.options import click_options
from peftcli.cli.output import emit_json, json_option, stderr_console, styled
from peftcli.merging.methods import option_classes
from peftcli.merging.quantized import GgufOutputOptions
from peftcli.merging.options import MergeOptions


class _MergeCommand(click.Command):
    """``merge``, whose help names the foldable methods of the registry, imported only when
    the help is shown: a merge itself needs none of the methods' modules."""

    @property
    def help(self) -> str | None:
        text = self.__dict__.get("_help")
        if text and "FOLDABLE" in text:
            from peftcli.methods import foldable

            text = self._help = text.replace("FOLDABLE", ", ".join(foldable()))
        return text

    @help.setter
    def help(self, value: str | None) -> None:
        self._help = value


@click.command(cls=_MergeCommand)
@click.argument("base", required=False, type=click.Path())
@click.argument("inputs", nargs=-1, type=click.Path())
@click.option("-o", "--output", "out", type=click.Path(), help="Checkpoint to write (a .safetensors file or a directory); default: stdout, for a single file.")
@click.option("--config", "config", type=click.Path(), help="A mergekit YAML merge configuration: the base, inputs, method and its parameters (instead of BASE INPUT...).")
@click_options(MergeOptions, only=("weights", "method"))
@click_options(*option_classes())  # every method's parameters, declared once in its module
@click_options(MergeOptions, skip=("weights", "method"))
@click_options(GgufOutputOptions)
@json_option
def merge(base, inputs, out, config, as_json, outtype, probe, **values):
    """Write BASE + the task vectors of INPUTS as a standalone checkpoint.

    INPUTS are .diff files, adapter directories whose method folds into the weights
    (FOLDABLE: folded exactly), or fine-tuned checkpoints of BASE
    (φ = θ_ft − θ₀ on the fly). Streams tensor by tensor; plain transformers loads the
    result. Without -o a single-file result streams to stdout (for pipes).

    \b
    Examples:
      peftcli merge base/ runs/lora/ -o merged/
      peftcli merge base/ sst2.diff agnews.diff --weights 1.0,0.8 -o multi/
      peftcli merge base/ a.diff b.diff --method ties --density 0.2 -o ties/
      peftcli merge base.safetensors taskA.diff taskB.diff > merged.safetensors
      peftcli merge --config mergekit.yml -o merged/
      peftcli merge model.Q4_1.gguf runs/lora/ -o merged.gguf --outtype q4_1 --probe prompts.txt
      peftcli merge llama-bnb-nf4/ runs/lora/ -o merged-nf4/
    """
    from peftcli.merging.options import merge_options

    if config is not None:
        base, inputs, values = _from_config(config, base, values)
        if "stack" in values:  # passthrough: layers of several models, copied (merging.passthrough)
            return _stack(values, out, as_json)
    elif not inputs:
        raise click.UsageError(f"Missing argument '{'INPUTS...' if base else 'BASE'}'.")
    opts = merge_options(values)  # checked before anything is read
    from peftcli.merging.quantized import check_request

    if config is not None and (outtype or probe):
        raise click.UsageError("--outtype and --probe take BASE INPUT... on the command line, not --config")
    from peftcli.checkpoint.bnb_nf4 import is_bnb

    to_nf4 = config is None and is_bnb(base)  # a bitsandbytes base: written back in its own NF4 layout
    if to_nf4:
        from peftcli.merging.quantized import check_nf4_request

        check_nf4_request(out, outtype, probe, opts)
    to_gguf = not to_nf4 and check_request(base, out, outtype, probe, opts)
    from peftcli.merging.provenance import Hasher

    hasher = Hasher.for_inputs(inputs)  # hashes on its own thread while torch is imported
    from peftcli.merging import fast_linear

    fast = None if to_nf4 else fast_linear.plan(base, list(inputs), out, opts)  # task arithmetic of safetensors checkpoints: no torch
    stream = None
    if out is None:
        from peftcli.merging.engine import stdout_stream

        stream = stdout_stream()
        if as_json:
            raise click.UsageError("--json needs -o: stdout carries the checkpoint")
    progress = None
    if styled(sys.stderr):
        from rich.progress import Progress

        bar = Progress(console=stderr_console(), transient=True)
        bar.start()
        task = bar.add_task("merge", total=None)
        progress = lambda n, total: bar.update(task, completed=n, total=total)  # noqa: E731
    quant = None
    try:
        if to_gguf:
            from peftcli.merging.quantized import merge_to_gguf

            report, quant = merge_to_gguf(base, list(inputs), out, opts, outtype, probe, progress=progress, hasher=hasher)
        elif to_nf4:
            from peftcli.merging.quantized import merge_to_nf4

            report, quant = merge_to_nf4(base, list(inputs), out, opts, progress=progress, hasher=hasher)
        else:
            report = _fast(fast, hasher, progress) if fast else _torch_merge(base, inputs, out, opts, stream, progress, hasher)
    finally:
        if progress is not None:
            bar.stop()
    if quant is not None:
        return _report_quantized(report, quant, len(inputs), as_json)
    if as_json:
        emit_json(report.to_json())
    elif opts.to_adapter:
        _print_adapter(report, len(inputs))
    elif stream is None:
        click.echo(f"wrote {report.output}: {report.changed} of {report.tensors} tensors changed ({report.method}, {len(inputs)} input{'s' if len(inputs) > 1 else ''})")
        for t in report.tasks if len(report.tasks) > 1 else []:  # one head model per task
            click.echo(f"  task {t['name']}: {t['architecture']}, {len(t['labels'])} labels -> {t['path']}")
    else:
        click.echo(f"merged {report.changed} of {report.tensors} tensors to stdout", err=True)


def _report_quantized(report, quant, n_inputs: int, as_json: bool) -> None:
    """A GGUF or bitsandbytes NF4 output's report: per changed tensor ‖ΔW‖ against the
    requantisation error, the warnings for updates below the quantisation noise, and --probe's drift."""
    from peftcli.cli.output import printable

    if as_json:
        return emit_json({**report.to_json(), "nf4" if quant.outtype == "nf4" else "gguf": quant.to_json()})
    types = ", ".join(f"{k} {v}" for k, v in quant.tensor_types.items())
    click.echo(f"wrote {printable(report.output)}: {quant.requantized} of {quant.requantized + quant.copied} tensors changed and requantised to "
               f"{quant.outtype}, the others copied as stored ({types}; {report.method}, {n_inputs} input{'s' if n_inputs > 1 else ''})")
    width = max([32, *(len(printable(s.name)) for s in quant.stats)])  # Hugging Face names are longer than GGUF's
    click.echo(f"  {'tensor':<{width}} {'type':<5} {'‖ΔW‖':>11} {'‖Q(W+ΔW)−(W+ΔW)‖':>18} {'ratio':>8} {'kept':>7}")
    for s in quant.stats:
        click.echo(f"  {printable(s.name):<{width}} {s.type:<5} {s.delta_norm:>11.4g} {s.quant_error:>18.4g} {s.ratio:>8.3g} {s.kept:>7.3f}")
    for s in quant.stats:
        if s.ratio >= 1:
            click.echo(f"warning: {printable(s.name)}: the update (‖ΔW‖ {s.delta_norm:.3g}) is below the {s.type} quantisation noise "
                       f"({s.quant_error:.3g}, ratio {s.ratio:.3g}): the written tensor keeps {100 * s.kept:.1f}% of it", err=True)
    p = quant.probe
    if p is not None:
        click.echo(f"probe: {p['prompts']} prompts, {p['positions']} positions: max |Δlogit| {p['max_abs_logit_diff']:.4g}, "
                   f"mean KL {p['mean_kl']:.4g}, top-1 agreement {100 * p['top1_agreement']:.2f}% (vs the fp32 merge)")


def _fast(fast, hasher, progress):
    try:
        return fast.run(hasher.sha256, progress)
    finally:
        hasher.stop()
        fast.close()


def _torch_merge(base, inputs, out, opts, stream, progress, hasher):
    from peftcli.merging.engine import merge as run_merge

    return run_merge(base, list(inputs), out, opts, stream=stream, progress=progress, hasher=hasher)


def _print_adapter(report, n_inputs: int) -> None:
    """``--to-adapter``'s report, as ``convert --to lora`` prints it: rank and kept ‖ΔW‖² per weight."""
    from peftcli.cli.output import printable

    dropped = report.dropped
    click.echo(
        f"wrote {printable(report.output)}: rank {report.rank} LoRA on {report.changed} weights ({report.method}, {n_inputs} input"
        f"{'s' if n_inputs > 1 else ''}), keeping {100 * report.kept_energy:.2f}% of ‖ΔW‖²"
        + (f"; dropped {len(dropped)} tensors a LoRA cannot carry ({100 * sum(d['energy_share'] for d in dropped):.2f}% of ‖ΔW‖²)" if dropped else "")
    )
    for t in report.adapter_tensors:
        click.echo(f"  {printable(t['name'])}: rank {t['rank']}, keeps {100 * t['kept_energy']:.2f}%")
    for d in dropped:
        click.echo(f"  {printable(d['name'])}: dropped, {100 * d['energy_share']:.2f}% of ‖ΔW‖²")


def _from_config(config: str, base, values: dict):
    """BASE, INPUTS and the options from a mergekit configuration; the flags given on the
    command line (not their defaults) are what the configuration may not also set."""
    from peftcli.merging import mergekit_config

    ctx = click.get_current_context()
    given = [k for k in values if ctx.get_parameter_source(k) is click.core.ParameterSource.COMMANDLINE]
    return mergekit_config.with_config(config, base, (), values, given, stack=True)


def _stack(values: dict, out, as_json: bool) -> None:
    from peftcli.merging.passthrough import stack

    report = stack(values["stack"], out, dtype=values["dtype"], max_shard_size=values["max_shard_size"], force=bool(values["force"]))
    if as_json:
        emit_json(report.to_json())
    else:
        click.echo(f"wrote {report.output}: {report.tensors} tensors stacked from {len(report.inputs)} model{'s' if len(report.inputs) > 1 else ''} (passthrough)")
