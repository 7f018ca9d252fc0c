"""``peftcli merge base.gguf RUN -o merged.gguf --outtype TYPE``: a merge written back as a (quantised) GGUF.

The merge itself is the ordinary one (``engine.merge``) into a temporary F32 safetensors file:
peftcli's GGUF reader dequantises each base tensor to fp32 (``gguf_format``), and φ is folded
exactly in fp32 there. This module then writes the GGUF: the base file's own metadata (every
key/value of its header, its tokenizer included, copied as stored; ``general.file_type`` set
to the type most of the written matrices have; the merge's provenance as ``peftcli.merge``),
its tensors in its order under its names, each tensor the merge changed requantised to
``--outtype`` with ``gguf.quants.quantize`` (llama's q/k rows permuted back to llama.cpp's
layout), each tensor it left alone copied byte for byte in its stored type (requantising it
would only add error). As llama.cpp's converter does, 1-D tensors and norms are written F32,
and a row that is not whole 32-value blocks is written F16 for a quantised outtype.

For every changed tensor it reports ‖ΔW‖ (the fp32 merge minus the dequantised base, in fp64),
the requantisation error ‖Q(W+ΔW) − (W+ΔW)‖ (dequantised with ``gguf.quants``, in fp64) and
their ratio; a ratio ≥ 1 means the update is below the quantisation noise: largely lost. It
also gives the share of the update the written tensor keeps, ⟨Q(W+ΔW) − W, ΔW⟩ / ‖ΔW‖².

``--probe FILE`` loads the fp32 merge and the written GGUF through peftcli's own GGUF model
builder (``gguf_model``) and compares their next-token logits on each prompt: the largest
absolute logit difference, the mean KL(fp32 ‖ quantised) over positions and the share of
positions whose top-1 token agrees.

``peftcli merge BNB_NF4_DIR RUN -o OUT_DIR`` (``merge_to_nf4``): a bitsandbytes NF4 directory
(``checkpoint.bnb_nf4``) is dequantised to a temporary fp32 checkpoint, the ordinary merge
folds φ there, and each changed NF4 weight is requantised to its own layout (blocksize,
double quantisation) with ``quantize.nf4``; every other tensor and file is copied as stored.
The report is the one above (``tensor_stat``), each tensor's type ``NF4``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

from peftcli.errors import BadInputError, UsageError
from peftcli.options import option

# --outtype: what gguf-py 0.17's numpy quantisers write (TQ1_0/TQ2_0 are ternary formats for
# BitNet-style models, not a requantisation of ordinary weights: not offered), best first.
OUTTYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
BLOCK = 32  # every quantised outtype's block: a row must be whole blocks
NOISE = 1.0  # ratio at and above which a tensor's update is reported as lost in the noise


@dataclass
class TensorStat:
    name: str  # the GGUF tensor name
    type: str  # the GGML type written
    delta_norm: float
    quant_error: float
    ratio: float
    kept: float  # ⟨Q(W+ΔW) − W, ΔW⟩ / ‖ΔW‖²: 1 the update is all there, 0 it is gone

    def to_json(self) -> dict:
        return {"name": self.name, "type": self.type, "delta_norm": self.delta_norm, "quant_error": self.quant_error,
                "ratio": self.ratio, "below_noise": self.ratio >= NOISE, "kept": self.kept}


@dataclass
class QuantizedReport:
    outtype: str
    tensor_types: dict[str, int] = field(default_factory=dict)
    requantized: int = 0
    copied: int = 0
    stats: list[TensorStat] = field(default_factory=list)
    probe: dict | None = None

    @property
    def below_noise(self) -> list[str]:
        return [s.name for s in self.stats if s.ratio >= NOISE]

    def to_json(self) -> dict:
        return {"outtype": self.outtype, "tensor_types": self.tensor_types, "requantized": self.requantized, "copied": self.copied,
                "tensors": [s.to_json() for s in self.stats], "below_noise": self.below_noise, "probe": self.probe}


@dataclass
class GgufOutputOptions:
    """merge's GGUF output, declared once for ``peftcli merge`` and a recipe's merge step."""

    outtype: str | None = option(
        None, metavar="|".join(OUTTYPES),
        help="With a .gguf base and -o OUT.gguf: the type the changed tensors are requantised to; the others keep their stored bytes.",
    )
    probe: str | None = option(
        None, path=True, help="With `outtype`: prompts (one per line, or JSONL text) to report the GGUF's logit drift from the fp32 merge on.",
    )


def check_request(base: str | None, out: str | None, outtype: str | None, probe: str | None, opts: Any) -> bool:
    """Whether the merge writes a GGUF; refuses a bad combination before anything is read."""
    wants = out is not None and out.lower().endswith(".gguf")
    if not wants and outtype is None and probe is None:
        return False
    if outtype is not None and outtype not in OUTTYPES:
        raise UsageError(f"unknown `outtype` {outtype!r}", f"choose one of: {', '.join(OUTTYPES)}")
    if not wants:
        flag = "`outtype`" if outtype is not None else "`probe`"
        raise UsageError(f"{flag} writes a GGUF file, and -o {out or '(stdout)'} is not a .gguf path", "pass -o MERGED.gguf")
    if outtype is None:
        raise UsageError(f"-o {out}: a GGUF output needs its tensor type", f"add `outtype`, one of: {', '.join(OUTTYPES)}")
    from peftcli.checkpoint.gguf_model import is_gguf

    if not is_gguf(base):
        raise UsageError(f"-o {out}: merging into a GGUF takes a .gguf base file, and {base} is not one",
                         "merge into a directory, then `peftcli export DIR --to gguf`")
    for flag, given in (("`to_adapter`", opts.to_adapter), ("`tokenizer_source`", opts.tokenizer_source),
                        ("`dtype`", opts.dtype), ("`max_shard_size`", opts.max_shard_size)):
        if given:
            raise UsageError(f"{flag} does not apply to a GGUF output (its tensor types are `outtype`'s, its vocabulary the base's)",
                             f"drop {flag}")
    if probe is not None and not os.path.isfile(probe):
        raise BadInputError(f"`probe` {probe}: no such file", "pass a file of prompts, one per line (or JSONL with a text field)")
    return True


def qtype_for(name: str, shape: tuple[int, ...], outtype: str) -> Any:
    """The GGML type a changed tensor is written as: F32 for 1-D tensors and norms (as llama.cpp's
    converter), else the outtype's, F16 for a quantised outtype when a row is not whole blocks."""
    from gguf import GGMLQuantizationType as Q

    if len(shape) <= 1 or name.endswith("_norm.weight"):
        return Q.F32
    qtype = Q[outtype.upper()]
    return Q.F16 if qtype not in (Q.F32, Q.F16, Q.BF16) and shape[-1] % BLOCK else qtype


def merge_to_gguf(base: str, inputs: list[str], out: str, opts: Any, outtype: str, probe: str | None, **merge_kwargs):
    """Merge into a temporary fp32 checkpoint, then write ``out`` as described in the module
    docstring. Returns ``(MergeReport, QuantizedReport)``; nothing is written on failure."""
    from dataclasses import replace

    from peftcli.checkpoint.atomic import atomic_output, check_output_path
    from peftcli.merging.engine import merge

    check_output_path(out, [base, *inputs], opts.force)
    prompts = tokenizer = None
    if probe is not None:  # refused before the merge: a bad prompt file or tokenizer leaves nothing written
        from peftcli.training.batching import load_tokenizer

        prompts, tokenizer = read_prompts(probe), load_tokenizer(base)
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".peftcli-merge-", dir=parent) as scratch:
        fp32 = os.path.join(scratch, "merged.safetensors")
        report = merge(base, inputs, fp32, replace(opts, dtype="F32", force=False), **merge_kwargs)
        with atomic_output(out, directory=False, inputs=[base, *inputs], force=opts.force) as tmp:
            quant = write_gguf(base, fp32, tmp, outtype, report.metadata.get("peftcli.merge", ""))
            if prompts is not None:  # on the file before it is moved into place: a failure leaves nothing
                quant.probe = probe_drift(base, fp32, tmp, prompts, tokenizer)
    report.output, report.bytes = out, os.path.getsize(out)
    report.metadata = {**report.metadata, "format": "gguf"}
    return report, quant


def _changed(base_ckpt, merged) -> dict[str, bool]:
    """Which base tensors the merge changed: its fp32 values differ from the dequantised base's."""
    import torch

    if set(merged.tensors) != set(base_ckpt.tensors):
        extra = sorted(set(merged.tensors) ^ set(base_ckpt.tensors))
        raise BadInputError(f"the merge has tensors the base GGUF has not, or lacks some ({extra[0]!r})",
                            "merge inputs made for this base, without task heads or a new vocabulary")
    return {n: not torch.equal(merged.get(n), base_ckpt.get(n).float()) for n in base_ckpt.tensors}


def write_gguf(base: str, fp32: str, target: str, outtype: str, provenance: str) -> QuantizedReport:
    """The GGUF at ``target``: the base's header and tensor order, changed tensors requantised."""
    import gguf
    import numpy as np

    from peftcli.checkpoint.gguf_format import GGUFCheckpoint
    from peftcli.checkpoint.reader import open_checkpoint

    reader = gguf.GGUFReader(base)
    report = QuantizedReport(outtype)
    with open_checkpoint(base) as ckpt, open_checkpoint(fp32) as merged:
        if not isinstance(ckpt, GGUFCheckpoint):  # check_request saw a .gguf name; the reader decides
            raise BadInputError(f"{base}: not read as a GGUF file", "pass a llama.cpp .gguf base")
        changed = _changed(ckpt, merged)
        by_gguf = {entry.name: (hf, entry, heads) for hf, (entry, heads) in ckpt._entries.items()}
        plan = []  # (gguf name, hf name, entry, heads, type written, changed)
        for t in reader.tensors:
            hf, entry, heads = by_gguf[t.name]
            qtype = qtype_for(t.name, entry.shape, outtype) if changed[hf] else gguf.GGMLQuantizationType[entry.type_name]
            plan.append((t.name, hf, entry, heads, qtype, changed[hf]))
        w = gguf.GGUFWriter(target, str(reader.fields["general.architecture"].contents()))
        _copy_fields(w, reader, plan, provenance)
        for name, _, entry, _, qtype, _ in plan:
            block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
            w.add_tensor_info(name, entry.shape, np.dtype(np.float32), math.prod(entry.shape) // block * nbytes, raw_dtype=qtype)
            report.tensor_types[qtype.name] = report.tensor_types.get(qtype.name, 0) + 1
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        with open(base, "rb") as f:
            for name, hf, entry, heads, qtype, is_changed in plan:
                if not is_changed:  # its stored bytes, untouched
                    f.seek(entry.begin)
                    w.write_tensor_data(np.frombuffer(f.read(entry.nbytes), dtype=np.uint8))
                    report.copied += 1
                    continue
                data, stat = _requantize(name, merged.get(hf), ckpt.get(hf), heads, qtype)
                w.write_tensor_data(data)
                report.stats.append(stat)
                report.requantized += 1
        w.close()
    with open(target, "rb") as f:
        os.fsync(f.fileno())
    report.tensor_types = dict(sorted(report.tensor_types.items()))
    return report


def _copy_fields(w: Any, reader: Any, plan: list, provenance: str) -> None:
    """Every key/value of the base's header, as stored (the writer adds general.architecture
    itself; GGUF.* are the reader's own entries); general.file_type from what is written."""
    import gguf

    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        if key == "general.alignment":
            w.data_alignment = int(f.contents())
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        if sub == gguf.GGUFValueType.ARRAY:
            raise BadInputError(f"GGUF metadata {key!r} is an array of arrays, which peftcli does not copy", "use a GGUF written by llama.cpp")
        w.add_key_value(key, f.contents(), vtype, sub_type=sub)
    w.add_file_type(_file_type(reader, plan))
    w.add_string("peftcli.merge", provenance)


def _file_type(reader: Any, plan: list) -> int:
    """``general.file_type``: the LlamaFileType of the type holding most matrix elements written;
    the base's own value where no LlamaFileType names that type (e.g. a K-quant kept as stored)."""
    from gguf import LlamaFileType

    elements: dict[str, int] = {}
    for _, _, entry, _, qtype, _ in plan:
        if len(entry.shape) >= 2:
            elements[qtype.name] = elements.get(qtype.name, 0) + math.prod(entry.shape)
    top = max(elements, key=lambda k: elements[k]) if elements else "F32"
    names = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16"}
    kind = getattr(LlamaFileType, names.get(top, f"MOSTLY_{top}"), None)
    if kind is not None:
        return int(kind)
    old = reader.fields.get("general.file_type")
    return int(old.contents()) if old is not None else int(LlamaFileType.GUESSED)


def _requantize(name: str, merged, base, heads: int | None, qtype) -> tuple[Any, TensorStat]:
    """``merged`` in llama.cpp's layout, quantised to ``qtype``; its ‖ΔW‖ and requantisation error."""
    import numpy as np
    from gguf.quants import dequantize, quantize

    from peftcli.serving.gguf import permute

    value, w = merged.numpy(), base.float().numpy().astype(np.float64)
    if heads is not None:  # LlamaModel.permute: the rows back in llama.cpp's order (norms do not change)
        value, w = permute(value, heads), permute(w, heads)
    value = np.ascontiguousarray(value, dtype=np.float32)
    data = np.ascontiguousarray(quantize(value, qtype))
    back: Any = dequantize(data, qtype)
    return data, tensor_stat(name, qtype.name, value, w, back)


def tensor_stat(name: str, kind: str, merged: Any, base: Any, back: Any) -> TensorStat:
    """A requantised tensor's numbers, in fp64: ``merged`` is W+ΔW as folded (fp32), ``base`` the
    dequantised W, ``back`` the written Q(W+ΔW) dequantised (numpy arrays of one size)."""
    import numpy as np

    value, w, back = (np.asarray(a, dtype=np.float64).ravel() for a in (merged, base, back))
    update = value - w
    delta = float(np.linalg.norm(update))
    error = float(np.linalg.norm(back - value))
    ratio = error / delta if delta > 0 else math.inf
    kept = float(np.dot(back - w, update)) / delta**2 if delta > 0 else 0.0
    return TensorStat(name, kind, delta, error, ratio, kept)


# -- a bitsandbytes NF4 base ----------------------------------------------------------------------


def check_nf4_request(out: str | None, outtype: str | None, probe: str | None, opts: Any) -> None:
    """A merge into a bitsandbytes NF4 directory writes the same layout: refuse what does not apply."""
    if outtype is not None or probe is not None:
        raise UsageError(f"{'`outtype`' if outtype else '`probe`'} is for a .gguf base; a bitsandbytes NF4 base is written back as NF4",
                         "drop it")
    if out is None or out.lower().endswith((".gguf", ".safetensors")):
        raise UsageError(f"-o {out or '(stdout)'}: a merge into a bitsandbytes NF4 base writes a model directory", "pass -o MERGED_DIR")
    for flag, given in (("`to_adapter`", opts.to_adapter), ("`tokenizer_source`", opts.tokenizer_source),
                        ("`dtype`", opts.dtype), ("`max_shard_size`", opts.max_shard_size)):
        if given:
            raise UsageError(f"{flag} does not apply to a bitsandbytes NF4 output (its layout, shards and vocabulary are the base's)",
                             f"drop {flag}")


def merge_to_nf4(base: str, inputs: list[str], out: str, opts: Any, **merge_kwargs):
    """Merge into the bitsandbytes NF4 directory ``base``: each NF4 weight dequantised to fp32 (a
    temporary plain checkpoint), the ordinary merge folded there in fp32, each changed weight
    requantised to its own NF4 layout, every other tensor and file copied as stored. Returns
    ``(MergeReport, QuantizedReport)``; nothing is written on failure."""
    from dataclasses import replace

    from peftcli.checkpoint import bnb_nf4
    from peftcli.checkpoint.atomic import atomic_output, check_output_path
    from peftcli.checkpoint.reader import load_json
    from peftcli.merging.engine import merge
    from peftcli.merging.report import output_size

    check_output_path(out, [base, *inputs], opts.force)
    config = load_json(os.path.join(base, "config.json"), "config")
    qc = config["quantization_config"]
    bnb_nf4.check_config(qc, base)
    files = bnb_nf4.weight_files(base)
    entries = bnb_nf4.read_entries(base, files, qc.get("bnb_4bit_use_double_quant"))
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".peftcli-merge-", dir=parent) as scratch:
        plain = os.path.join(scratch, "base")
        _write_plain(base, config, files, entries, plain)
        fp32 = os.path.join(scratch, "merged.safetensors")
        report = merge(plain, inputs, fp32, replace(opts, dtype="F32", force=False), **merge_kwargs)
        provenance = report.metadata.get("peftcli.merge", "")
        with atomic_output(out, directory=True, inputs=[base, *inputs], force=opts.force) as tmp:
            quant = _write_nf4(base, files, entries, plain, fp32, tmp, provenance)
    report.output, report.bytes = out, output_size(out)
    report.metadata = {**report.metadata, "format": "bitsandbytes-nf4"}
    return report, quant


def _write_plain(base: str, config: dict, files: dict[str, str], entries: dict, target: str) -> None:
    """``base`` as a plain checkpoint: its NF4 weights dequantised to fp32, its quant tensors dropped."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    os.makedirs(target)
    companions = {n for e in entries for n in files if n.startswith(e + ".")}
    tensors = {}
    for shard in sorted(set(files.values())):
        with safe_open(os.path.join(base, shard), "pt") as f:
            for name in f.keys():
                if name not in companions and name not in entries:
                    tensors[name] = f.get_tensor(name)
    for name, e in entries.items():
        tensors[name] = _nf4_value(base, files, e)
    save_file(tensors, os.path.join(target, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(target, "config.json"), "w", encoding="utf-8") as f:
        json.dump({k: v for k, v in config.items() if k != "quantization_config"}, f)


def _nf4_value(base: str, files: dict[str, str], e: Any):
    from peftcli.checkpoint import bnb_nf4

    return bnb_nf4.dequantize(e, lambda n: _stored(base, files, n))


def _write_nf4(base: str, files: dict[str, str], entries: dict, plain: str, fp32: str, target: str, provenance: str) -> QuantizedReport:
    """The output directory: the base's files, each changed NF4 weight requantised in place."""
    import shutil

    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from peftcli.checkpoint import bnb_nf4

    report = QuantizedReport("nf4")
    replaced: dict[str, Any] = {}
    with safe_open(os.path.join(plain, "model.safetensors"), "pt") as w0, safe_open(fp32, "pt") as merged:
        for name in w0.keys():
            value, old = merged.get_tensor(name), w0.get_tensor(name).float()
            if torch.equal(value, old):
                continue
            if name not in entries:
                raise BadInputError(f"the merge changes {name}, which {base} stores unquantized",
                                    "merge adapters that target only the quantized Linear layers, or merge into the full-precision model")
            tensors, written = bnb_nf4.requantize(entries[name], value)
            back = bnb_nf4.dequantize(written, tensors.__getitem__)
            replaced.update(tensors)
            report.stats.append(tensor_stat(name, "NF4", value.numpy(), old.numpy(), back.numpy()))
        kinds = ["NF4" if n in entries else str(w0.get_slice(n).get_dtype()) for n in w0.keys()]
    for shard in sorted(set(files.values())):
        with safe_open(os.path.join(base, shard), "pt") as f:
            out = {n: replaced[n] if n in replaced else f.get_tensor(n) for n in f.keys()}
            metadata = {**(f.metadata() or {}), "peftcli.merge": provenance}
        save_file(out, os.path.join(target, shard), metadata=metadata)
    for entry in sorted(os.listdir(base)):  # config, tokenizer, index, ...: as stored
        src = os.path.join(base, entry)
        if entry not in set(files.values()) and os.path.isfile(src) and not os.path.islink(src):
            shutil.copy2(src, os.path.join(target, entry))
    report.requantized, report.copied = len(report.stats), len(kinds) - len(report.stats)
    report.tensor_types = {k: kinds.count(k) for k in sorted(set(kinds))}
    return report


def _stored(base: str, files: dict[str, str], name: str):
    from safetensors import safe_open

    with safe_open(os.path.join(base, files[name]), "pt") as f:
        return f.get_tensor(name)


# -- --probe -------------------------------------------------------------------------------------

MAX_PROBE_TOKENS = 512  # each prompt's first tokens: drift shows long before that


def read_prompts(path: str) -> list[str]:
    """The prompts of ``path``: a ``.jsonl`` file's ``text`` fields, else one prompt per non-empty line."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [(i, line.rstrip("\n")) for i, line in enumerate(f, 1) if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInputError(f"`probe` {path}: cannot read it as UTF-8 text ({exc})", "pass a text file of prompts") from None
    if not path.lower().endswith(".jsonl"):
        prompts = [line for _, line in lines]
    else:
        prompts = []
        for i, line in lines:
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise BadInputError(f"`probe` {path}:{i}: not a JSON object with a text string", 'write one {"text": "..."} per line')
            prompts.append(row["text"])
    if not prompts:
        raise BadInputError(f"`probe` {path}: no prompts in it", "write one prompt per line")
    return prompts


def _reference_model(base: str, fp32: str):
    """The fp32 merge as a model: the base GGUF's model, every tensor replaced by the merge's."""
    import torch

    from peftcli.checkpoint.gguf_model import load_gguf_model
    from peftcli.checkpoint.reader import open_checkpoint

    model, _ = load_gguf_model(base, dtype=torch.float32)
    params = dict(model.named_parameters())
    with open_checkpoint(fp32) as merged, torch.no_grad():
        for name in merged.tensors:
            params[name].copy_(merged.get(name))
    return model


def probe_drift(base: str, fp32: str, out: str, prompts: list[str], tokenizer: Any) -> dict:
    """Next-token logits of the GGUF written at ``out`` against the fp32 merge's, on each prompt."""
    import torch

    from peftcli.checkpoint.gguf_model import load_gguf_model

    ref = _reference_model(base, fp32)
    quant, _ = load_gguf_model(out, dtype=torch.float32)
    max_abs, kl_sum, agree, positions = 0.0, 0.0, 0, 0
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt").input_ids[:, :MAX_PROBE_TOKENS]
            if ids.numel() == 0:
                continue
            a, b = ref(ids).logits[0].double(), quant(ids).logits[0].double()
            max_abs = max(max_abs, float((a - b).abs().max()))
            logp, logq = a.log_softmax(-1), b.log_softmax(-1)
            kl_sum += float((logp.exp() * (logp - logq)).sum())
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            positions += a.shape[0]
    if positions == 0:
        raise BadInputError("`probe`: every prompt tokenises to nothing", "write prompts with text in them")
    return {"prompts": len(prompts), "positions": positions, "max_abs_logit_diff": max_abs,
            "mean_kl": kl_sum / positions, "top1_agreement": agree / positions}
