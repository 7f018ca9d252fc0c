"""Merge benchmark: peftcli vs mergekit side by side on SmolLM2-135M, plus peak RSS on a large checkpoint.

Cases (--cases, default all): task arithmetic, TIES, DARE and DARE-TIES (mergekit's
task_arithmetic, ties, dare_linear, dare_ties; weights 1, density --density).

Both tools merge the same inputs: the fp32 SmolLM2-135M directory made by
`smollm2_to_safetensors.py` and two "fine-tunes" of it (every tensor plus small seeded Gaussian
noise, saved as full checkpoints of the same dtype). Each merge runs as a subprocess; wall time
is perf_counter around it and peak RSS is /usr/bin/time's maximum resident set size (both
tools merge in one process). Runs alternate between the tools so they see the same machine load; after one
untimed warm-up each (page cache; --warmup 0 skips it), medians of --runs. mergekit lives in its own venv, outside
the project's dependencies (--mergekit names its `mergekit-yaml`); without it, peftcli runs alone.

The copy bandwidth of the same run (shutil.copyfile of the base file) is the reference for
peftcli's merge throughput (output bytes / wall time). CPU time (user + system) is reported
beside wall time: on a shared machine it is the steadier measure of the work each tool does.
The large check merges a sparse-hole
checkpoint of --big-gb GB (headers real, data zeros) with a full checkpoint input and compares
peftcli's peak RSS with 2 × largest tensor + 300 MB. All work data go under --work.

DARE's random drop cannot agree bit for bit (each tool has its own RNG and seeding), so for the
DARE cases the outputs are compared statistically instead: the fraction of entries that differ
from the base (1 − (1 − d)² expected with two inputs, both tools) and the mean |merged − base|
over all entries of each tool, as the ratio peftcli / mergekit (≈ 1 when both implement the same
method: a missing 1/d rescale or a normalisation by the weights would move it by 2×; mergekit
rescales by ‖φ‖₁ / ‖m ⊙ φ‖₁ per tensor, peftcli by 1/d, equal in expectation).

The methods added later run from one mergekit YAML per case, the same file given to both tools
(`mergekit-yaml cfg out` and `peftcli merge --config cfg -o out`): slerp (slices form, t lists
filtered by self_attn / mlp), nuslerp, multislerp (3 inputs: a third fine-tune, seed 3),
breadcrumbs, breadcrumbs_ties, della, della_linear, model_stock, karcher and passthrough (a
stack of layer ranges of two models). Deterministic ones are compared tensor by tensor (max |Δ|
and the worst tensor); della and della_linear drop at random and are compared statistically, as
DARE. `peftcli check` has no estimate for a configuration, so those rows show none.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sparse_checkpoint import llama7b_specs  # noqa: E402


MB = 10**6
PEFTCLI = [sys.executable, "-m", "peftcli"]


def measure(cmd: list[str]) -> tuple[float, int, float]:
    """Wall seconds, peak RSS bytes and CPU seconds (user + system) of one subprocess run of cmd.

    Output is discarded; the run must succeed. Peak RSS comes from /usr/bin/time, not from
    os.wait4 on our own child: Linux carries the high-water RSS of the forking process across
    exec, so a child of this (large) process would report at least our own RSS. CPU time is
    the work done whatever else runs on the machine; wall time also depends on what does.
    """
    rss_file = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"peftcli-bench-rss-{os.getpid()}")
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M %U %S", "-o", rss_file, *cmd], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr.decode(errors='replace')[-3000:]}")
    with open(rss_file) as f:
        rss_kb, user, system = f.read().split()[-3:]
    os.remove(rss_file)
    return wall, int(rss_kb) * 1024, float(user) + float(system)


def check_estimate(base: str, inputs, method: str) -> dict:
    """What `peftcli check` predicts for the merge: peak memory and time (merge.estimate)."""
    proc = subprocess.run([*PEFTCLI, "check", base, *inputs, "--method", method, "--json"], capture_output=True, text=True)
    return json.loads(proc.stdout)["merge"]


def make_finetunes(base: str, work: str, n: int = 2) -> tuple[str, ...]:
    """n (2 or 3) full checkpoints of base + seeded noise (σ = 1e-3 × the tensor's std), same dtype and config."""
    tensors = load_file(os.path.join(base, "model.safetensors"))
    dirs = []
    for seed, name in ((1, "ftA"), (2, "ftB"), (3, "ftC"))[:n]:
        out = os.path.join(work, name)
        dirs.append(out)
        if os.path.exists(os.path.join(out, "model.safetensors")):
            continue
        os.makedirs(out, exist_ok=True)
        gen = torch.Generator().manual_seed(seed)
        noisy = {}
        for key, t in tensors.items():
            scale = 1e-3 * (t.float().std().item() or 1.0)
            noise = torch.randn(t.shape, generator=gen, dtype=torch.float32) * scale
            noisy[key] = (t.float() + noise).to(t.dtype).contiguous()
        save_file(noisy, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
        shutil.copy(os.path.join(base, "config.json"), out)
    return tuple(dirs)


# name: (label, mergekit method, peftcli method, whether the outputs can agree bit for bit)
CASES = {
    "linear": ("task arithmetic", "task_arithmetic", "linear", True),
    "ties": ("TIES d={d}", "ties", "ties", True),
    "dare": ("DARE d={d}", "dare_linear", "dare", False),
    "dare-ties": ("DARE-TIES d={d}", "dare_ties", "dare-ties", False),
}


def _models(fts, weights, **extra):
    return [{"model": ft, "parameters": {"weight": w, **extra}} for ft, w in zip(fts, weights)]


def _slerp(base, fts, layers):
    return {
        "slices": [{"sources": [{"model": fts[0], "layer_range": [0, layers]},
                                {"model": fts[1], "layer_range": [0, layers]}]}],
        "merge_method": "slerp", "base_model": fts[0],
        "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                             {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]},
    }


# name: (label, mergekit configuration (base, fine-tunes, layers) -> dict without dtype, fine-tunes used,
# whether the outputs can agree bit for bit). The same YAML goes to both tools.
CONFIG_CASES = {
    "slerp": ("slerp, t lists by self_attn / mlp", _slerp, 2, True),
    "nuslerp": ("nuslerp w=1,0.5", lambda b, f, n: {
        "merge_method": "nuslerp", "base_model": b, "models": _models(f, [1.0, 0.5])}, 2, True),
    "multislerp": ("multislerp, 3 inputs w=1,0.8,0.6", lambda b, f, n: {
        "merge_method": "multislerp", "base_model": b, "models": _models(f, [1.0, 0.8, 0.6])}, 3, True),
    "breadcrumbs": ("breadcrumbs d=0.5 γ=0.01", lambda b, f, n: {
        "merge_method": "breadcrumbs", "base_model": b,
        "models": _models(f, [1.0, 1.0], density=0.5, gamma=0.01)}, 2, True),
    "breadcrumbs-ties": ("breadcrumbs_ties d=0.5 γ=0.01", lambda b, f, n: {
        "merge_method": "breadcrumbs_ties", "base_model": b,
        "models": _models(f, [1.0, 1.0], density=0.5, gamma=0.01)}, 2, True),
    "della": ("della d=0.5 ε=0.1", lambda b, f, n: {
        "merge_method": "della", "base_model": b,
        "models": _models(f, [1.0, 1.0], density=0.5, epsilon=0.1)}, 2, False),
    "della-linear": ("della_linear d=0.5 ε=0.1", lambda b, f, n: {
        "merge_method": "della_linear", "base_model": b,
        "models": _models(f, [1.0, 1.0], density=0.5, epsilon=0.1)}, 2, False),
    "model-stock": ("model_stock", lambda b, f, n: {
        "merge_method": "model_stock", "base_model": b, "models": [{"model": x} for x in f]}, 2, True),
    "karcher": ("karcher", lambda b, f, n: {
        "merge_method": "karcher", "models": [{"model": x} for x in f]}, 2, True),
    "passthrough": ("passthrough, layers 0–19 of base + 10–29 of ftA", lambda b, f, n: {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": b, "layer_range": [0, 20]}]},
                   {"sources": [{"model": f[0], "layer_range": [10, n]}]}]}, 1, True),
}
ALL_CASES = [*CASES, *CONFIG_CASES]


def parse_cases(text: str) -> list[str]:
    names = [c.strip() for c in text.split(",") if c.strip()]
    bad = [c for c in names if c not in ALL_CASES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown case(s) {', '.join(bad) or text!r}: choose from {', '.join(ALL_CASES)}")
    return list(dict.fromkeys(names))


def mergekit_config(path: str, method: str, base: str, fts: tuple[str, str], density: float) -> None:
    params = {"weight": 1.0} if method == "task_arithmetic" else {"weight": 1.0, "density": density}
    config = {
        "merge_method": method,
        "base_model": base,
        "models": [{"model": ft, "parameters": params} for ft in fts],
        "dtype": "float32",
    }
    with open(path, "w") as f:
        json.dump(config, f, indent=1)  # JSON is YAML


def read_dir(path: str) -> dict[str, torch.Tensor]:
    out = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), "pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def output_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path) if n.endswith(".safetensors"))


def reference(base: dict, fts: list[dict], key: str) -> torch.Tensor:
    """Task arithmetic computed directly in fp64: θ₀ + Σ (θ_i − θ₀)."""
    b = base[key].double()
    return (b + sum(ft[key].double() - b for ft in fts)).float()


def compare(base_dir: str, ft_dirs, pc_dir: str, mk_dir: str | None, linear: bool) -> dict:
    """Max |Δ| between the tools (all common tensors), against an fp64 reference for linear, and key sets."""
    pc = read_dir(pc_dir)
    res = {"tensors": len(pc)}
    if linear:
        base = read_dir(base_dir)
        fts = [read_dir(d) for d in ft_dirs]
        res["peftcli_vs_ref"] = max((pc[k] - reference(base, fts, k)).abs().max().item() for k in pc)
    if mk_dir:
        mk = read_dir(mk_dir)
        common = sorted(set(pc) & set(mk))
        res["only_peftcli"] = sorted(set(pc) - set(mk))
        res["only_mergekit"] = sorted(set(mk) - set(pc))
        diffs = {k: (pc[k].float() - mk[k].float()).abs().max().item() for k in common}
        res["max_abs_diff"] = max(diffs.values())
        worst = max(diffs, key=diffs.get)
        res["worst_tensor"] = worst
        res["worst_rel"] = diffs[worst] / (pc[worst].float().abs().max().item() or 1.0)
        res["identical_tensors"] = sum(1 for v in diffs.values() if v == 0.0)
        res["common"] = len(common)
    return res


def dare_stats(base_dir: str, pc_dir: str, mk_dir: str | None) -> dict:
    """Statistics of merged − base over all entries of each tool (DARE's outputs cannot match bit for bit).

    changed: the fraction of entries that differ from the base; mean_abs: the mean |merged − base|
    (fp64 accumulation); per_tensor_ratio: the smallest and largest per-tensor ratio of mean_abs
    peftcli / mergekit among tensors of at least 10,000 entries (small ones are noisy).
    """
    base = read_dir(base_dir)
    outs = {"peftcli": read_dir(pc_dir)}
    if mk_dir:
        outs["mergekit"] = read_dir(mk_dir)
    keys = sorted(set(base).intersection(*outs.values()))
    res = {"common": len(keys)}
    per_tensor = {tool: {} for tool in outs}
    for tool, out in outs.items():
        changed = entries = 0
        total = 0.0
        for k in keys:
            d = out[k].double() - base[k].double()
            changed += int(torch.count_nonzero(d))
            entries += d.numel()
            s = d.abs().sum().item()
            total += s
            if d.numel() >= 10_000:
                per_tensor[tool][k] = s / d.numel()
        res[tool] = {"changed": changed / entries, "mean_abs": total / entries}
    if mk_dir:
        res["mean_abs_ratio"] = res["peftcli"]["mean_abs"] / res["mergekit"]["mean_abs"]
        ratios = [per_tensor["peftcli"][k] / per_tensor["mergekit"][k] for k in per_tensor["peftcli"]
                  if per_tensor["mergekit"][k] > 0]
        res["per_tensor_ratio"] = [min(ratios), max(ratios)] if ratios else None
    return res


def copy_bandwidth(src: str, work: str, runs: int) -> float:
    dst = os.path.join(work, "copy.safetensors")
    times = []
    for _ in range(runs + 1):  # first run warms the page cache
        t0 = time.perf_counter()
        shutil.copyfile(src, dst)
        times.append(time.perf_counter() - t0)
        os.remove(dst)
    return os.path.getsize(src) / statistics.median(times[1:])


def smollm2_bench(args) -> dict:
    base = args.base
    fts = make_finetunes(base, args.work, 3 if "multislerp" in args.cases else 2)
    with open(os.path.join(base, "config.json")) as f:
        layers = json.load(f)["num_hidden_layers"]
    results = {}
    for case in args.cases:
        if case in CONFIG_CASES:  # one mergekit YAML, given to both tools
            label, build, n_fts, exact = CONFIG_CASES[case]
            mk_method = pc_method = case
            cfg = os.path.join(args.work, f"{case}.yml")
            with open(cfg, "w") as f:
                json.dump({**build(base, list(fts[:n_fts]), layers), "dtype": "float32"}, f, indent=1)  # JSON is YAML
            pc_out = os.path.join(args.work, f"pc-{case}")
            mk_out = os.path.join(args.work, f"mk-{case}")
            pc_cmd = [*PEFTCLI, "merge", "--config", cfg, "-o", pc_out, "--force"]
            mk_cmd = [args.mergekit, cfg, mk_out, "--lazy-unpickle", "--no-copy-tokenizer"] if args.mergekit else None
            case_fts = fts[:n_fts]
        else:
            label, mk_method, pc_method, exact = CASES[case]
            label = label.format(d=args.density)
            pc_flags = ["--weights", "1,1"]
            if pc_method != "linear":
                pc_flags += ["--method", pc_method, "--density", str(args.density)]
            pc_out = os.path.join(args.work, f"pc-{mk_method}")
            mk_out = os.path.join(args.work, f"mk-{mk_method}")
            pc_cmd = [*PEFTCLI, "merge", base, *fts[:2], *pc_flags, "-o", pc_out, "--force"]
            mk_cmd = None
            if args.mergekit:
                cfg = os.path.join(args.work, f"{mk_method}.yml")
                mergekit_config(cfg, mk_method, base, fts[:2], args.density)
                mk_cmd = [args.mergekit, cfg, mk_out, "--lazy-unpickle", "--no-copy-tokenizer"]
            case_fts = fts[:2]
        runs = {"peftcli": [], "mergekit": []}
        for i in range(1 - args.warmup, args.runs + 1):
            for tool, cmd, out in (("peftcli", pc_cmd, pc_out), ("mergekit", mk_cmd, mk_out)):
                if cmd is None:
                    continue
                shutil.rmtree(out, ignore_errors=True)
                wall, rss, cpu = measure(cmd)
                if i > 0:  # run 0 is the warm-up
                    runs[tool].append((wall, rss, cpu, os.getloadavg()[0]))
        entry = {"peftcli_cmd": " ".join(pc_cmd[2:]), "mergekit_cmd": " ".join(mk_cmd) if mk_cmd else None}
        for tool, rs in runs.items():
            if rs:
                entry[tool] = {
                    "wall_s": statistics.median(r[0] for r in rs),
                    "rss": statistics.median(r[1] for r in rs),
                    "cpu_s": statistics.median(r[2] for r in rs),
                    "walls": [round(r[0], 2) for r in rs],
                    "loads": [round(r[3], 1) for r in rs],
                }
        entry["estimate"] = None if case in CONFIG_CASES else check_estimate(base, case_fts, pc_method)
        entry["out_bytes"] = output_bytes(pc_out)
        if exact:
            entry["compare"] = compare(base, case_fts, pc_out, mk_out if mk_cmd else None, pc_method == "linear")
        else:
            entry["compare"] = {"random": True}
            entry["stats"] = dare_stats(base, pc_out, mk_out if mk_cmd else None)
        results[label] = entry
    return results


def big_specs(target_bytes: int):
    """Llama-7B-shaped BF16 tensors (embeddings, lm_head, norm, the first n layers) of at least target_bytes."""
    specs = llama7b_specs()
    layer_tensors = [s for s in specs if s.name.startswith("model.layers.")]
    others = [s for s in specs if not s.name.startswith("model.layers.")]
    per_layer = sum(s.nbytes for s in layer_tensors) // 32
    n = max(1, -(-(target_bytes - sum(s.nbytes for s in others)) // per_layer))
    keep = [s for s in layer_tensors if int(s.name.split(".")[2]) < n]
    return others[:1] + keep + others[1:], n


def write_sparse(out: str, specs, n_layers: int) -> None:
    from sparse_checkpoint import build_sparse_checkpoint

    os.makedirs(out, exist_ok=True)
    build_sparse_checkpoint(out, specs, n_layers)


def big_bench(args) -> dict:
    specs, n = big_specs(int(args.big_gb * 10**9))
    total = sum(s.nbytes for s in specs)
    free = shutil.disk_usage(args.work).free
    if free < total + 2 * 10**9:
        sys.exit(f"need {total / 1e9:.1f} GB free under {args.work} for the merged output, have {free / 1e9:.1f}")
    big = os.path.join(args.work, "big")
    base, ft, out = (os.path.join(big, d) for d in ("base", "ft", "out"))
    shutil.rmtree(big, ignore_errors=True)
    write_sparse(base, specs, n)
    write_sparse(ft, specs, n)
    cmd = [*PEFTCLI, "merge", base, ft, "-o", out, "--force"]
    estimate = check_estimate(base, [ft], "linear")
    wall, rss, cpu = measure(cmd)
    written = output_bytes(out)
    shutil.rmtree(big)
    largest = max(s.nbytes for s in specs)
    return {
        "cmd": "peftcli merge big/base big/ft -o big/out", "bytes": total, "written": written, "tensors": len(specs),
        "layers": n, "largest": largest, "bound": 2 * largest + 300 * MB, "rss": rss, "wall_s": wall, "cpu_s": cpu,
        "estimate": estimate,
    }


def fmt_mb(b: float) -> str:
    return f"{b / MB:,.0f} MB"


def report(small: dict, bw: float, big: dict | None, args) -> str:
    lines = [
        f"Date: {time.strftime('%Y-%m-%d %H:%M')} UTC; {os.cpu_count()} cores, load average before the run: "
        f"{args.load}; python {platform.python_version()}, torch {torch.__version__}, mergekit {args.mk_version}.",
        "",
        "| merge | tool | wall (median) | CPU user+sys (median) | peak RSS (median) | runs (s) | load average at each run |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, e in small.items():
        for tool in ("peftcli", "mergekit"):
            if tool in e:
                t = e[tool]
                lines.append(f"| {label} | {tool} | {t['wall_s']:.2f} s | {t['cpu_s']:.2f} s | {fmt_mb(t['rss'])} | "
                             f"{t['walls']} | {t['loads']} |")
    lines += ["", "| merge | time peftcli / mergekit | CPU peftcli / mergekit | RSS peftcli / mergekit | "
              "max abs diff (tensors) | peftcli vs fp64 reference | throughput (out / wall) | fraction of copy bandwidth |",
              "|---|---|---|---|---|---|---|---|"]
    for label, e in small.items():
        pc, mk, c = e["peftcli"], e.get("mergekit"), e["compare"]
        tr = f"{pc['wall_s'] / mk['wall_s']:.2f}×" if mk else "n/a"
        cr = f"{pc['cpu_s'] / mk['cpu_s']:.2f}×" if mk else "n/a"
        rr = f"{pc['rss'] / mk['rss']:.2f}×" if mk else "n/a"
        if c.get("random"):
            diff = "random drop: see below"
        else:
            diff = (f"{c['max_abs_diff']:.2e} ({c['identical_tensors']}/{c['common']} identical"
                    + (f"; worst {c['worst_tensor']}, rel {c['worst_rel']:.1e}" if c['max_abs_diff'] else "")
                    + (f"; only in one tool: {len(c['only_peftcli'])} + {len(c['only_mergekit'])}"
                       if c['only_peftcli'] or c['only_mergekit'] else "") + ")") if mk else "n/a"
        ref = f"{c['peftcli_vs_ref']:.2e}" if "peftcli_vs_ref" in c else "—"
        thr = e["out_bytes"] / pc["wall_s"]
        lines.append(f"| {label} | {tr} | {cr} | {rr} | {diff} | {ref} | {thr / MB:,.0f} MB/s | {thr / bw:.3f} |")
    dare = {label: e["stats"] for label, e in small.items() if "stats" in e}
    if dare:
        lines += ["", "DARE and DELLA drop at random (different RNGs), so these outputs cannot match bit for bit; "
                  "instead, over all entries, the fraction that differs from the base and the mean |merged − base|:",
                  "", "| merge | entries changed: peftcli | entries changed: mergekit | mean abs change: peftcli | "
                  "mean abs change: mergekit | ratio peftcli / mergekit | per-tensor ratio (min – max) |",
                  "|---|---|---|---|---|---|---|"]
        for label, st in dare.items():
            pc, mk = st["peftcli"], st.get("mergekit")
            mk_changed = f"{mk['changed']:.4f}" if mk else "n/a"
            mk_mean = f"{mk['mean_abs']:.3e}" if mk else "n/a"
            ratio = f"{st['mean_abs_ratio']:.4f}" if mk else "n/a"
            per = st.get("per_tensor_ratio")
            per = f"{per[0]:.3f} – {per[1]:.3f}" if per else "n/a"
            lines.append(f"| {label} | {pc['changed']:.4f} | {mk_changed} | {pc['mean_abs']:.3e} | {mk_mean} | "
                         f"{ratio} | {per} |")
    lines += ["", f"Copy bandwidth (shutil.copyfile of the 538 MB base, median): {bw / MB:,.0f} MB/s."]
    lines += ["", "| merge | `peftcli check` estimate: peak memory | measured peak RSS | estimate: time | measured wall |",
              "|---|---|---|---|---|"]
    rows = [(label, e["estimate"], e["peftcli"]["rss"], e["peftcli"]["wall_s"]) for label, e in small.items()
            if e["estimate"]]
    if big:
        rows.append((f"{big['bytes'] / 1e9:.2f} GB BF16, one input", big["estimate"], big["rss"], big["wall_s"]))
    for label, est, rss, wall in rows:
        lines.append(f"| {label} | {fmt_mb(est['peak_bytes'])} | {fmt_mb(rss)} | {est['seconds']:.1f} s | {wall:.1f} s |")
    if big:
        lines += ["", "| checkpoint | tensors | largest tensor | bound 2 × largest + 300 MB | peak RSS | "
                  "RSS / bound | wall | CPU | written |", "|---|---|---|---|---|---|---|---|---|",
                  f"| {big['bytes'] / 1e9:.2f} GB BF16 ({big['layers']} Llama-7B layers) | {big['tensors']} | "
                  f"{fmt_mb(big['largest'])} | {fmt_mb(big['bound'])} | {fmt_mb(big['rss'])} | "
                  f"{big['rss'] / big['bound']:.2f} | {big['wall_s']:.1f} s | {big['cpu_s']:.1f} s | {big['written'] / 1e9:.2f} GB |"]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="/tmp/smollm2", help="SmolLM2 dir from smollm2_to_safetensors.py")
    ap.add_argument("--work", default="/tmp/peftcli-mergebench")
    ap.add_argument("--mergekit", default="/tmp/mk-venv/bin/mergekit-yaml", help="mergekit-yaml ('' to skip)")
    ap.add_argument("--runs", type=int, default=3, help="runs per tool (0: only the large check)")
    ap.add_argument("--warmup", type=int, choices=(0, 1), default=1, help="one untimed run of each first")
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument("--cases", type=parse_cases, default=list(ALL_CASES),
                    help=f"comma-separated merges to run (default all: {','.join(ALL_CASES)})")
    ap.add_argument("--big-gb", type=float, default=4.0, help="size of the large checkpoint (0 to skip)")
    ap.add_argument("--json", help="also write the raw results here")
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    if args.mergekit and not os.path.exists(args.mergekit):
        print(f"{args.mergekit} not found: benchmarking peftcli alone", file=sys.stderr)
        args.mergekit = ""
    args.mk_version = "not installed"
    if args.mergekit:
        pip = os.path.join(os.path.dirname(args.mergekit), "pip")
        show = subprocess.run([pip, "show", "mergekit"], capture_output=True, text=True).stdout
        args.mk_version = next((ln.split()[-1] for ln in show.splitlines() if ln.startswith("Version")), "?")
    args.load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    small = smollm2_bench(args) if args.runs else {}
    bw = copy_bandwidth(os.path.join(args.base, "model.safetensors"), args.work, max(args.runs, 1))
    if small:
        print(report(small, bw, None, args), "\n", flush=True)  # the side-by-side part, before the long check
    big = big_bench(args) if args.big_gb > 0 else None
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"smollm2": small, "copy_bandwidth": bw, "big": big}, f, indent=1)
    if big:
        print(report(small, bw, big, args))
    for label, e in small.items():  # the full comparison details
        print(f"{label}: {json.dumps(e.get('stats', e['compare']))}", file=sys.stderr)


if __name__ == "__main__":
    main()
