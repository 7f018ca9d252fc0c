"""Peak RSS of folding LoHa, LoKr, VeRA and OFT into a 7B-shaped checkpoint, and against PEFT on SmolLM2.

Issue #13 ("Scale"): folding must stream for every method. For each method this script injects
a rank-64 adapter (OFT: block size 64; VeRA: rank 64) on the default targets (q_proj, v_proj),
replaces every φ tensor with seeded random values (std 0.01: inject's zero factors would make
ΔW = 0), and runs ``peftcli merge BASE ADAPTER`` in a fresh process with the checkpoint streamed
to stdout, which is /dev/null (no 13.5 GB output on disk). Peak RSS is /usr/bin/time's maximum
resident set size (the child's VmHWM; see ``merge_vs_mergekit.measure`` for why not wait4).

Two bases:
- ``--big``: the Llama-2-7B-shaped sparse checkpoint of ``sparse_checkpoint.py`` (13.5 GB BF16 of
  holes; built in --work if absent). Limit: 2 × the largest tensor + 300 MB.
- ``--small``: SmolLM2-135M fp32 (``smollm2_to_safetensors.py -o /tmp/smollm2``): peftcli's merge
  as above, and PEFT's ``PeftModel.from_pretrained(...).merge_and_unload()`` then
  ``save_pretrained`` in a fresh process (peak RSS also read after the merge, before the save);
  then, untimed, peftcli's merged weights against PEFT's (max abs difference).

Usage: ``OMP_NUM_THREADS=1 nice python benchmarks/merge_scale.py --big --small``; JSON to --json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from merge_vs_mergekit import measure  # noqa: E402  (peak RSS and CPU through /usr/bin/time)

MB = 10**6
PEFTCLI = [sys.executable, "-m", "peftcli"]
METHODS = {  # name: inject arguments (rank 64 everywhere; OFT's blocks of 64 divide 4096 and 576)
    "loha": ["loha", "--rank", "64"],
    "lokr": ["lokr", "--rank", "64"],
    "vera": ["vera", "--rank", "64"],
    "oft": ["oft", "--block-size", "64"],
}


def largest_tensor(base: str) -> int:
    """Bytes of the base's largest tensor, from the safetensors headers."""
    from peftcli.checkpoint import open_checkpoint

    with open_checkpoint(base) as ckpt:
        return max(t.nbytes for t in ckpt.tensors.values())


def randomize(adapter: str, seed: int) -> None:
    """Replace every φ tensor of ``adapter`` with seeded N(0, 0.01²) values (same names, shapes, dtypes)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = os.path.join(adapter, "adapter_model.safetensors")
    with safe_open(path, "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    gen = torch.Generator().manual_seed(seed)
    for k, t in tensors.items():
        tensors[k] = (torch.randn(t.shape, generator=gen, dtype=torch.float32) * 0.01).to(t.dtype)
    save_file(tensors, path + ".tmp", metadata=meta)
    os.replace(path + ".tmp", path)


def make_adapter(base: str, method: str, out: str, seed: int) -> str:
    subprocess.run([*PEFTCLI, "inject", *METHODS[method], base, "-o", out, "--force", "--quiet"], check=True)
    randomize(out, seed)
    return out


PEFT_MERGE = r"""
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
base, adapter, out, report = sys.argv[1:5]
model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
loaded = hwm()
merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
after_merge = hwm()
merged.save_pretrained(out, safe_serialization=True)
open(report, "w").write(f"{loaded} {after_merge} {hwm()}")
"""


def max_abs_diff(base: str, adapter: str, peft_dir: str, out: str) -> float:
    """Max |peftcli's merged weight − PEFT's| over the tensors both write (an untimed peftcli run to ``out``)."""
    from safetensors.torch import load_file

    subprocess.run([*PEFTCLI, "merge", base, adapter, "-o", out, "--force", "--quiet"], check=True)
    ours, theirs = load_file(out), load_file(os.path.join(peft_dir, "model.safetensors"))
    os.remove(out)
    common = sorted(set(ours) & set(theirs))
    if len(common) < len(ours) - 1:  # PEFT drops the tied lm_head only
        sys.exit(f"outputs differ in names: {sorted(set(ours) ^ set(theirs))[:5]}")
    return max(float((ours[n].double() - theirs[n].double()).abs().max()) for n in common)


def run_big(work: str, methods: list[str], out: dict) -> None:
    from sparse_checkpoint import build_sparse_checkpoint

    base = os.path.join(work, "llama7b")
    if not os.path.exists(os.path.join(base, "model.safetensors.index.json")):
        build_sparse_checkpoint(base)
    largest = largest_tensor(base)
    limit = 2 * largest + 300 * MB
    out["big"] = {"largest": largest, "limit": limit, "rows": {}}
    for method in methods:
        adapter = make_adapter(base, method, os.path.join(work, f"big-{method}"), seed=1)
        load = os.getloadavg()[0]
        wall, rss, cpu = measure([*PEFTCLI, "merge", base, adapter, "--quiet"])
        row = {"rss": rss, "wall_s": wall, "cpu_s": cpu, "load": load, "load_end": os.getloadavg()[0], "within": rss <= limit}
        out["big"]["rows"][method] = row
        print(f"big {method}: peak {rss / MB:.0f} MB (limit {limit / MB:.0f} MB, {'within' if row['within'] else 'OVER'}), "
              f"{wall:.1f} s wall, {cpu:.1f} s CPU, load {load:.2f} -> {row['load_end']:.2f}", flush=True)
        shutil.rmtree(adapter)


def run_small(work: str, base: str, methods: list[str], out: dict) -> None:
    largest = largest_tensor(base)
    limit = 2 * largest + 300 * MB
    out["small"] = {"largest": largest, "limit": limit, "rows": {}}
    script = os.path.join(work, "peft_merge.py")
    with open(script, "w") as f:
        f.write(PEFT_MERGE)
    for method in methods:
        adapter = make_adapter(base, method, os.path.join(work, f"small-{method}"), seed=2)
        load = os.getloadavg()[0]
        wall, rss, cpu = measure([*PEFTCLI, "merge", base, adapter, "--quiet"])
        report, merged = os.path.join(work, "peft-report"), os.path.join(work, "peft-merged")
        shutil.rmtree(merged, ignore_errors=True)
        p_load = os.getloadavg()[0]
        p_wall, p_rss, p_cpu = measure([sys.executable, script, base, adapter, merged, report])
        with open(report) as f:
            loaded, after_merge, at_end = (int(x) for x in f.read().split())
        agree = max_abs_diff(base, adapter, merged, os.path.join(work, "peftcli-merged.safetensors"))
        shutil.rmtree(merged)
        row = {"peftcli": {"rss": rss, "wall_s": wall, "cpu_s": cpu, "load": load, "within": rss <= limit},
               "peft": {"rss": p_rss, "wall_s": p_wall, "cpu_s": p_cpu, "load": p_load, "hwm_loaded": loaded,
                        "hwm_merged": after_merge, "hwm_saved": at_end}, "max_abs_diff_vs_peft": agree}
        out["small"]["rows"][method] = row
        print(f"small {method}: peftcli {rss / MB:.0f} MB {wall:.1f} s (load {load:.2f}); PEFT {p_rss / MB:.0f} MB "
              f"(after load {loaded / MB:.0f}, after merge {after_merge / MB:.0f}) {p_wall:.1f} s (load {p_load:.2f}); "
              f"max |peftcli − PEFT| {agree:.3g}", flush=True)
        shutil.rmtree(adapter)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/mscale")
    ap.add_argument("--smollm2", default="/tmp/smollm2", help="SmolLM2-135M fp32 directory (without a GGUF quantization_config, which save_pretrained refuses)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--big", action="store_true")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    methods = args.methods.split(",")
    out: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "methods": methods}
    if args.small:
        run_small(args.work, args.smollm2, methods, out)
    if args.big:
        run_big(args.work, methods, out)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
