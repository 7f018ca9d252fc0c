"""Task arithmetic on SmolLM2-135M: merge's torch-free path vs its torch path vs mergekit vs a file copy.

One run measures, side by side and alternating so that all see the same machine load:
- fast: `peftcli merge BASE ftA ftB --weights W -o OUT` (merging.fast_linear: never imports torch);
- torch: the same merge through the library call `peftcli.merging.engine.merge` (the torch path,
  which the CLI takes for everything fast_linear declines), in a fresh interpreter;
- mergekit: `mergekit-yaml` with task_arithmetic and the same weights (--mergekit; '' skips it);
- copy: `cp` of the base's model.safetensors (a process too), the bandwidth reference: a merge's
  throughput is the bytes it writes / its wall time, against the bytes cp copies / its wall time;
- durable copy: `cp` then `sync FILE`, the copy's bytes on disk as a merge guarantees its own
  (peftcli fsyncs its output before the rename; cp and mergekit do not): both references are shown.
Python runs with compiled bytecode, as an installed package does: PYTHONDONTWRITEBYTECODE is
dropped from the environment and the bytecode goes to a PYTHONPYCACHEPREFIX in --work (the
source tree stays clean), peftcli compiled there first with compileall and the rest written by
the warm-up run (--no-bytecode: the environment as it is).
Each is a subprocess; wall time is perf_counter around it, CPU time (user + system) and peak RSS
come from /usr/bin/time (merge_vs_mergekit.measure). After one untimed warm-up each (page cache),
medians of --runs. The fast and torch outputs are compared byte for byte (sha256 of every file),
mergekit's and the fp64 formula θ₀ + Σ λᵢ(θᵢ − θ₀) by max |Δ|. The 1-minute load average is
recorded with every run: on a loaded machine compare the ratios, not the absolute times.

The base is --base (smollm2_to_safetensors.py's directory), linked into --work with its
config.json's quantization_config (left by older versions of that script; peftcli refuses a
pre-quantized config) dropped; the fine-tunes are merge_vs_mergekit's (seeded noise, fp32).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from merge_vs_mergekit import make_finetunes, measure, read_dir  # noqa: E402

PY = sys.executable
TORCH_PATH = (
    "import sys, json\nfrom peftcli.merging.engine import merge\n"
    "merge(sys.argv[1], sys.argv[2:-2], sys.argv[-2], weights=json.loads(sys.argv[-1]), force=True)\n"
)


def clean_base(src: str, work: str) -> str:
    """``src`` linked into ``work/base``, its config.json without a quantization_config."""
    out = os.path.join(work, "base")
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(src):
        dst = os.path.join(out, name)
        if name == "config.json":
            with open(os.path.join(src, name)) as f:
                config = json.load(f)
            config.pop("quantization_config", None)
            with open(dst, "w") as f:
                json.dump(config, f, indent=2)
        elif not os.path.exists(dst):
            try:
                os.link(os.path.join(src, name), dst)
            except OSError:
                shutil.copy(os.path.join(src, name), dst)
    return out


def mergekit_yaml(path: str, base: str, fts, weights: list[float]) -> None:
    config = {
        "merge_method": "task_arithmetic", "base_model": base, "dtype": "float32",
        "models": [{"model": ft, "parameters": {"weight": w}} for ft, w in zip(fts, weights)],
    }
    with open(path, "w") as f:
        json.dump(config, f, indent=1)  # JSON is YAML


def file_hashes(path: str) -> dict[str, str]:
    out = {}
    for name in sorted(os.listdir(path)):
        with open(os.path.join(path, name), "rb") as f:
            out[name] = hashlib.file_digest(f, "sha256").hexdigest()
    return out


def compare(base: str, fts, weights, fast: str, torch_out: str, mk: str | None) -> dict:
    res = {"same_bytes_as_torch_path": file_hashes(fast) == file_hashes(torch_out)}
    pc, b = read_dir(fast), read_dir(base)
    tops = [read_dir(d) for d in fts]
    ref = {k: b[k].double() + sum(w * (t[k].double() - b[k].double()) for w, t in zip(weights, tops)) for k in b}
    res["max_abs_vs_fp64"] = max((pc[k].double() - ref[k]).abs().max().item() for k in pc)
    if mk:
        other = read_dir(mk)
        res["max_abs_vs_mergekit"] = max((pc[k].double() - other[k].double()).abs().max().item() for k in pc if k in other)
    return res


def bench(args, base: str, fts, weights: list[float]) -> dict:
    w = ",".join(map(str, weights))
    outs = {t: os.path.join(args.work, f"{t}-{w}") for t in ("fast", "torch", "mergekit")}
    copy_dst = os.path.join(args.work, "copy.safetensors")
    cmds = {
        "fast": [PY, "-m", "peftcli", "merge", base, *fts, "--weights", w, "-o", outs["fast"], "--force"],
        "torch": [PY, "-c", TORCH_PATH, base, *fts, outs["torch"], json.dumps(weights)],
        "copy": ["cp", os.path.join(base, "model.safetensors"), copy_dst],
        "copy+sync": ["sh", "-c", 'cp "$1" "$2" && sync "$2"', "sh", os.path.join(base, "model.safetensors"), copy_dst],
    }
    if args.mergekit:
        cfg = os.path.join(args.work, f"mk-{w}.yml")
        mergekit_yaml(cfg, base, fts, weights)
        cmds["mergekit"] = [args.mergekit, cfg, outs["mergekit"], "--lazy-unpickle", "--no-copy-tokenizer"]
    runs: dict[str, list] = {t: [] for t in cmds}
    for i in range(args.runs + 1):  # run 0 warms the page cache
        for tool, cmd in cmds.items():
            for path in (outs.get(tool), copy_dst):
                if path and os.path.isdir(path):
                    shutil.rmtree(path)
                elif path and os.path.exists(path):
                    os.remove(path)
            wall, rss, cpu = measure(cmd)
            if i:
                runs[tool].append((wall, rss, cpu, os.getloadavg()[0]))
    written = {t: sum(os.path.getsize(os.path.join(d, n)) for n in os.listdir(d) if n.endswith(".safetensors")) for t, d in outs.items() if os.path.isdir(d)}
    written["copy"] = written["copy+sync"] = os.path.getsize(os.path.join(base, "model.safetensors"))
    entry = {"weights": weights, "cmds": {t: " ".join(c[2:] if c[0] == PY else c) for t, c in cmds.items()}}
    for tool, rs in runs.items():
        wall = statistics.median(r[0] for r in rs)
        entry[tool] = {
            "wall_s": wall, "cpu_s": statistics.median(r[2] for r in rs), "rss": statistics.median(r[1] for r in rs),
            "bandwidth": written[tool] / wall, "walls": [round(r[0], 2) for r in rs], "loads": [round(r[3], 1) for r in rs],
        }
    entry["compare"] = compare(base, fts, weights, outs["fast"], outs["torch"], outs["mergekit"] if args.mergekit else None)
    return entry


def report(results: dict, args) -> str:
    lines = [f"SmolLM2-135M fp32 ({args.load_before} → {args.load_after} load average, 1/5/15 min; {os.cpu_count()} CPUs; Python bytecode "
             f"{'not cached' if args.no_bytecode else 'cached'}), medians of {args.runs}:", "",
             "| weights | tool | wall | CPU | peak RSS | MB/s written | vs cp | vs cp + sync | mergekit wall ÷ this | RSS ÷ mergekit's | same bytes as torch path |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for w, e in results.items():
        mk = e.get("mergekit")
        for tool in ("fast", "torch", "mergekit", "copy", "copy+sync"):
            if tool not in e:
                continue
            r = e[tool]
            ref = not tool.startswith("copy")
            speed = f"{mk['wall_s'] / r['wall_s']:.1f}×" if mk and ref else ""
            rss = f"{r['rss'] / mk['rss']:.2f}" if mk and ref else ""
            same = {"fast": str(e["compare"]["same_bytes_as_torch_path"]).lower(), "torch": "—"}.get(tool, "")
            lines.append(f"| {w} | {tool} | {r['wall_s']:.2f} s | {r['cpu_s']:.2f} s | {r['rss'] / 2**20:.0f} MiB | "
                         f"{r['bandwidth'] / 1e6:.0f} | {r['bandwidth'] / e['copy']['bandwidth']:.0%} | "
                         f"{r['bandwidth'] / e['copy+sync']['bandwidth']:.0%} | {speed} | {rss} | {same} |")
    return "\n".join(lines)


def compile_bytecode(work: str) -> None:
    """Run every Python below with bytecode cached in ``work/pycache`` (as an installed package
    has it), peftcli's compiled now, everything else's by the warm-up run."""
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = os.path.join(work, "pycache")
    import subprocess

    where = subprocess.run([PY, "-c", "import os, peftcli; print(os.path.dirname(peftcli.__file__))"],
                           check=True, capture_output=True, text=True).stdout.strip()
    subprocess.run([PY, "-m", "compileall", "-q", where], check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="/tmp/smollm2", help="SmolLM2 dir from smollm2_to_safetensors.py")
    ap.add_argument("--work", default="/tmp/peftcli-fastbench")
    ap.add_argument("--mergekit", default="/tmp/mkvenv/bin/mergekit-yaml", help="mergekit-yaml ('' to skip)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--weights", nargs="+", default=["1,1", "1,0.8"], help="one merge per weight list")
    ap.add_argument("--json", help="also write the raw results here")
    ap.add_argument("--no-bytecode", action="store_true", help="leave PYTHONDONTWRITEBYTECODE as it is (source-only start-up)")
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    if not args.no_bytecode:
        compile_bytecode(args.work)
    if args.mergekit and not os.path.exists(args.mergekit):
        print(f"{args.mergekit} not found: no mergekit rows", file=sys.stderr)
        args.mergekit = ""
    base = clean_base(args.base, args.work)
    fts = make_finetunes(base, args.work, 2)
    for ft in fts:  # their config.json is the base's
        shutil.copy(os.path.join(base, "config.json"), ft)
    args.load_before = " ".join(f"{x:.1f}" for x in os.getloadavg())
    t0 = time.perf_counter()
    results = {w: bench(args, base, fts, [float(x) for x in w.split(",")]) for w in args.weights}
    args.load_after = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(report(results, args))
    print(f"({time.perf_counter() - t0:.0f} s in all)", file=sys.stderr)
    for w, e in results.items():
        print(f"{w}: {json.dumps(e['compare'])}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
