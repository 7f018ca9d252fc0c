"""``peftcli export RUN --to vllm|gguf -o OUT``: an adapter (or, for gguf, a whole model) a serving engine loads (``--check``: lint only).

Parses, calls ``peftcli.serving.export``, renders. A refusal is the one-line error (exit 1,
nothing written); ``--check`` prints every finding and exits 1 when any rule fails.
"""

from __future__ import annotations

import click

from peftcli.cli.flags import command_flags
from peftcli.cli.output import emit_json, json_option, printable
from peftcli.serving import ExportOptions
from peftcli.cli.options import click_options
from peftcli.options import from_options


@click.command()
@click.argument("run", type=click.Path())
@click_options(ExportOptions)
@json_option
def export(run, as_json, **options):
    """Check the adapter RUN against a serving engine's rules and write one it loads.

    Repairs that are exact are made and reported (the written adapter gives the same
    outputs): the rank padded with zeros to a max_lora_rank vLLM accepts, rsLoRA and
    rank_pattern/alpha_pattern folded into one lora_alpha (and, per module, into lora_B),
    a classification head listed by its path written as classifier/score. What cannot be
    exact is refused in one line with the way out: DoRA, lora_bias, PiSSA/OLoRA inits,
    embedding deltas and extra vocabulary, other saved modules (merge instead), a rank
    above --max-lora-rank (convert --to lora, which reports what it keeps). Only LoRA
    adapters export. --check lints only and writes nothing.

    --to gguf writes one llama.cpp LoRA file (adapter.type lora, one
    adapter.lora.alpha, the base's tensor names, attn_q/attn_k rows of lora_B
    permuted as llama.cpp's converter permutes the base) for a Llama-family base,
    whose config.json comes from --base DIR (default: the adapter's
    base_model_name_or_path; nothing is downloaded). --outtype f32 (default), f16,
    bf16 or q8_0 (rows that are not whole Q8_0 blocks are written f16).

    With a whole model directory as RUN (a merged model: config.json, no
    adapter_config.json), --to gguf writes a complete llama.cpp model file
    (LlamaForCausalLM; MistralForCausalLM without a sliding window) with its tokenizer, as llama.cpp's
    convert_hf_to_gguf.py does; --outtype as above, or q5_1, q5_0, q4_1, q4_0
    (gguf-py's quantisers, every matrix at that type; norms and 1-D tensors stay
    f32, rows that are not whole 32-value blocks f16).

    \b
    Examples:
      peftcli export runs/lora/ --to vllm -o served/lora/
      peftcli export runs/lora/ --to vllm --check
      peftcli export runs/lora/ --to vllm --max-lora-rank 32 -o served/lora/ --json
      peftcli export runs/lora/ --to gguf --base models/llama/ -o lora.gguf --outtype f16
      peftcli export merged/ --to gguf --outtype q8_0 -o model.gguf
    """
    from peftcli.errors import BadInputError, render_fields
    from peftcli.serving import export as run_export

    opts = from_options(ExportOptions, options)
    report = run_export(run, opts)
    if as_json:
        emit_json(report.to_json())
    else:
        flags = command_flags(click.get_current_context().command)  # a finding names fields, as errors do
        for line in _lines(report):
            click.echo(printable(render_fields(line, flags)))
    if not report.ok:  # only --check gets here with findings: exporting raises on a refusal
        n = len(report.findings)
        raise BadInputError(
            f"{run} breaks {n} of {opts.to}'s rule{'s' if n > 1 else ''} as it is"
            f" ({len(report.repairs)} repaired by export, {len(report.refusals)} refused)",
            f"peftcli export {run} --to {opts.to} -o DIR writes the repaired adapter"
            if not report.refusals else "each refused line says the way out",
        )


def _lines(report) -> list[str]:
    lines = []
    for f in report.findings:
        if f.repair:
            lines.append(f"{'FAIL' if report.check else 'repaired'} {f.rule}: {f.message} (export: {f.repair})")
        else:
            lines.append(f"FAIL {f.rule}: {f.message} (refused: {f.way_out})")
    if report.check and not report.findings:
        lines.append(f"{report.run}: ok, passes every {report.to} rule")
    if report.gguf is not None and report.gguf.get("model"):
        g = report.gguf
        if report.check:
            return [f"{report.run}: ok, a llama.cpp {g['architecture']} model ({g['tokenizer']} tokenizer) can be written"]
        types = ", ".join(f"{n} {t}" for t, n in g["tensor_types"].items())
        return [f"wrote {report.output}: llama.cpp {g['architecture']} model, {g['tokenizer']} tokenizer, tensors: {types}"]
    if not report.check and report.gguf is not None:
        g = report.gguf
        types = ", ".join(f"{n} {t}" for t, n in g["tensor_types"].items())
        lines.append(f"wrote {report.output}: llama.cpp LoRA adapter for {g['architecture']} ({g['base']}), "
                     f"rank {report.written_rank}, adapter.lora.alpha {report.written_alpha:g}, tensors: {types}")
    elif not report.check:
        lines.append(
            f"wrote {report.output}: {report.to} adapter, rank {report.written_rank}, lora_alpha {report.written_alpha:g}"
            + (f" (was rank {report.rank}, lora_alpha {report.lora_alpha:g})" if report.repairs else "")
        )
    return lines
