"""Export: an adapter made loadable by a serving engine — lint, exact repair, write.

Each target is a small rule set (``peftcli.serving.vllm``, ``peftcli.serving.gguf`` for
llama.cpp). A rule's finding is either
repaired exactly (the written adapter computes the same ΔW = s·B·A for every module, so PEFT
and the engine give the same outputs as the adapter read) or refused with the way out
(``merge``, or ``convert --to lora`` with the energy it keeps). ``check`` lints only:
nothing is written. The adapter is read by the one shared reader (``read_adapter``) and
written atomically (``write_adapter``; the GGUF file through ``atomic_output``), never into
its input.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from peftcli.errors import BadInputError, UsageError
from peftcli.options import option

TARGETS = ("vllm", "gguf")


@dataclass
class ExportOptions:
    to: str = option("vllm", metavar="vllm|gguf", help="the serving engine to export for: vllm, or gguf (a llama.cpp LoRA file, or model file for a model directory)")
    output: str | None = option(
        None, "-o", metavar="PATH", path=True, help="the adapter directory (vllm) or .gguf file (gguf) to write (not with --check)"
    )
    check: bool = option(False, help="only lint: report what export would repair or refuse, write nothing; exit 1 if a rule fails")
    max_lora_rank: int | None = option(
        None, metavar="R", help="the server's --max-lora-rank (1, 8, 16, ..., 512): a larger adapter rank is refused"
    )
    outtype: str | None = option(
        None, metavar="f32|f16|bf16|q8_0|q5_1|q5_0|q4_1|q4_0",
        help="--to gguf: the tensors' type (default f32; an adapter: f32, f16, bf16 or q8_0, as llama.cpp's converter)",
    )
    base: str | None = option(
        None, metavar="DIR", path=True,
        help="--to gguf: the base model's directory, for its config.json (default: the adapter's base_model_name_or_path)",
    )
    force: bool = option(False, help="replace the output if it exists")

    def __post_init__(self) -> None:
        from peftcli.serving.vllm import MAX_LORA_RANKS

        if self.to not in TARGETS:
            raise UsageError(f"`to` {self.to!r} is not an export target", f"choose one of: {', '.join(TARGETS)}")
        self._check_gguf_options()
        if self.max_lora_rank is not None and self.max_lora_rank not in MAX_LORA_RANKS:
            raise UsageError(
                f"`max_lora_rank` {self.max_lora_rank} is not a max_lora_rank vLLM accepts",
                f"choose one of {', '.join(map(str, MAX_LORA_RANKS))}",
            )
        if self.check and self.output:
            raise UsageError("`check` writes nothing, so `output` has no use with it", "drop `output`, or drop `check` to export")
        if not self.check and not self.output:
            raise UsageError("export needs `output` DIR, the adapter directory to write", "or pass `check` to lint only")

    def _check_gguf_options(self) -> None:
        from peftcli.serving.gguf_model_export import OUTTYPES

        if self.to != "gguf":
            used = next((f for f, v in (("`outtype`", self.outtype), ("`base`", self.base)) if v is not None), None)
            if used:
                raise UsageError(f"{used} is an option of `to` gguf, not of `to` {self.to}", f"drop {used}, or pass `to` gguf")
            return
        if self.max_lora_rank is not None:
            raise UsageError("`max_lora_rank` is vLLM's, and llama.cpp has no such limit", "drop `max_lora_rank`")
        if self.outtype is None:
            self.outtype = "f32"
        if self.outtype not in OUTTYPES:
            raise UsageError(f"`outtype` {self.outtype!r} is not a GGUF type peftcli writes", f"choose one of: {', '.join(OUTTYPES)}")


@dataclass
class ExportReport:
    run: str
    to: str
    output: str | None  # None with --check
    check: bool
    rank: int | None = None  # the adapter's largest rank
    written_rank: int | None = None
    lora_alpha: float | None = None
    written_alpha: float | None = None
    findings: list = field(default_factory=list)  # vllm.Finding: repaired and refused
    gguf: dict | None = None  # --to gguf: architecture, base, outtype, tensor_types (absent from vllm's JSON); a model: model, tokenizer

    @property
    def repairs(self) -> list:
        return [f for f in self.findings if f.repair]

    @property
    def refusals(self) -> list:
        return [f for f in self.findings if not f.repair]

    @property
    def ok(self) -> bool:
        """The adapter passes every rule as it is (--check), or was written (export)."""
        return not self.findings if self.check else not self.refusals

    def to_json(self) -> dict:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "findings" and (k != "gguf" or v is not None)}
        return {
            "schema": "peftcli.export/1", **d, "ok": self.ok,
            "repairs": [f.to_json() for f in self.repairs], "refusals": [f.to_json() for f in self.refusals],
        }


def export(run: str, options: ExportOptions) -> ExportReport:
    """Lint the adapter directory ``run`` against the target's rules and, unless
    ``options.check``, write the repaired adapter to ``options.output``. A refused finding
    raises (nothing written); with ``check`` every finding is in the report."""
    from peftcli.artifacts.adapter_dir import read_adapter, write_adapter
    from peftcli.checkpoint.atomic import check_output_path
    from peftcli.serving import vllm

    out = options.output
    if out is not None:  # given unless --check (ExportOptions says so)
        check_output_path(out, [run], options.force)  # before reading: a bad -o costs nothing
    if options.to == "gguf" and _is_model_dir(run):
        return _export_gguf_model(run, options)
    adapter = read_adapter(run)
    report = ExportReport(run, options.to, options.output, options.check)
    method = adapter.method_name
    if method != "lora":
        report.findings.append(_not_lora(run, method, options.to))
        return _refuse_or_report(report)
    view = vllm.view_of(adapter)
    if options.to == "gguf":
        return _export_gguf(run, options, view, report)
    report.rank, report.lora_alpha = view.rank, view.config.get("lora_alpha", 8)
    report.findings = vllm.lint(view, options.max_lora_rank)
    if out is None or report.refusals:
        return _refuse_or_report(report)
    plan = vllm.plan(view, options.max_lora_rank)
    config, tensors = vllm.repaired(view, adapter, plan)
    report.written_rank, report.written_alpha = plan.rank, plan.alpha
    metadata = {**adapter.metadata, "peftcli.exported_for": options.to, "peftcli.exported_from": os.path.abspath(run)}
    write_adapter(out, config, tensors, metadata=metadata, inputs=[run], force=options.force)
    return report


def _export_gguf(run: str, options: ExportOptions, view, report: ExportReport) -> ExportReport:
    """Lint against llama.cpp's rules and, unless --check, write the GGUF adapter file."""
    from peftcli.checkpoint.atomic import atomic_output
    from peftcli.serving import gguf

    if options.outtype not in gguf.OUTTYPES:  # the 4- and 5-bit types are for whole models
        raise UsageError(f"`outtype` {options.outtype!r} is not a type llama.cpp's adapter converter writes",
                         f"choose one of: {', '.join(gguf.OUTTYPES)} for an adapter")
    base, arch = gguf.base_arch(run, view.config, options.base)
    report.rank, report.lora_alpha = view.rank, view.config.get("lora_alpha", 8)
    report.gguf = {"architecture": arch.name, "base": base, "outtype": options.outtype, "tensor_types": None}
    report.findings = gguf.lint(view, arch)
    if options.output is None or report.refusals:
        return _refuse_or_report(report)
    alpha, arrays = gguf.tensors(view, arch)
    report.written_rank, report.written_alpha = view.rank, alpha
    name = os.path.basename(os.path.normpath(os.path.abspath(run)))
    with atomic_output(options.output, directory=False, inputs=[run, base], force=options.force) as tmp:
        report.gguf["tensor_types"] = gguf.write(tmp, arch, alpha, arrays, str(options.outtype), name)
    return report


def _is_model_dir(path: str) -> bool:
    from peftcli.serving.gguf_model_export import is_model_dir

    return is_model_dir(path)


def _export_gguf_model(source: str, options: ExportOptions) -> ExportReport:
    """A whole model directory (a merged model) written as one llama.cpp model file;
    ``--check`` checks everything the export maps and writes nothing."""
    from peftcli.checkpoint.atomic import atomic_output
    from peftcli.serving import gguf_model_export as model_export

    if options.base is not None:
        raise UsageError(f"{source} is a whole model: `base` is for exporting an adapter", "drop `base`")
    plan = model_export.plan(source)
    report = ExportReport(source, options.to, options.output, options.check)
    report.gguf = {"architecture": plan.arch, "base": None, "outtype": options.outtype, "tensor_types": None,
                   "model": True, "tokenizer": plan.vocab["model"]}
    if options.output is None:
        return report
    name = os.path.basename(os.path.normpath(os.path.abspath(source)))
    with atomic_output(options.output, directory=False, inputs=[source], force=options.force) as tmp:
        report.gguf["tensor_types"] = model_export.write(tmp, plan, str(options.outtype), name)
    return report


def _not_lora(run: str, method: str, to: str = "vllm"):
    from peftcli.serving.vllm import Finding, merge_way
    from peftcli.methods import METHODS

    if METHODS[method].folds:
        way = merge_way(run)
    else:
        way = (f"{method} does not fold into the weights, so it cannot be served as a plain model either: use it unmerged "
               "(peftcli evaluate loads it; PEFT too for prefix and prompt tuning)")
    engine = {"vllm": "vLLM serves", "gguf": "llama.cpp loads"}[to]
    return Finding("lora-only", f"{run}: its method is {method}, and {engine} LoRA adapters only", way_out=way)


def _refuse_or_report(report: ExportReport) -> ExportReport:
    """The report, or (exporting) the first refusal as the one-line error: nothing is written."""
    if report.check or not report.refusals:
        return report
    first = report.refusals[0]
    more = len(report.refusals) - 1
    raise BadInputError(
        f"cannot export {report.run} for {report.to}: {first.message}" + (f" (and {more} more: `check` lists them)" if more else ""),
        first.way_out,
    )
