"""LT-SFT, diff-pruning and lottery tickets: the methods whose φ is chosen by training.

Checked against independent references: the kept set against a top-K written here with
torch.topk, the sparse gradient against the dense one, merged weights against θ₀ + φ, the
phase-2 optimizer state against K, ticket masks against their density.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from peftcli.artifacts.sparse_diff import read_diff
from peftcli.cli import cli
from peftcli.injection import inject
from peftcli.merging.engine import merge
from peftcli.methods import METHODS
from peftcli.training import phased
from peftcli.training import state as ckpt_state
from peftcli.training.config import TrainConfig
from peftcli.training.loop import train
from tests.helpers import cls_rows, lm_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K = 500


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("sparse-data")
    lm, cls = lm_rows(48), cls_rows(64)
    out = {}
    for name, rows in (("lm", lm), ("cls", cls[:48]), ("cls_dev", cls[48:])):
        with open(d / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        out[name] = str(d / f"{name}.jsonl")
    return out


@pytest.fixture
def phase1_weights(monkeypatch):
    """{run name: its phase-1 checkpoint}, read just before the selection deletes it."""
    seen = {}
    original = phased._select

    def spy(run_, cfg, *args):
        seen[os.path.basename(run_)] = load_file(os.path.join(run_, phased.PHASE1, "model.safetensors"))
        return original(run_, cfg, *args)

    monkeypatch.setattr(phased, "_select", spy)
    return seen


def _inject(base, tmp_path, method, name="run", **opts):
    run = str(tmp_path / name)
    inject(base, method, METHODS[method].config_cls(**opts), run)
    return run


def _cfg(data, **kw):
    return TrainConfig(**({"data": data, "steps": 6, "phase1_steps": 6, "batch_size": 4, "lr": 1e-2, "phase1_lr": 1e-3, "log_every": 1} | kw))


def _sparse(run):
    t = load_file(os.path.join(run, "adapter_model.safetensors"))
    return {k[: -len(".idx")]: (t[k], t[k[: -len(".idx")] + ".val"]) for k in t if k.endswith(".idx")}


def test_lt_sft_trains_exactly_k_entries_and_writes_them_as_a_diff(tiny_llama, data, tmp_path):
    run = _inject(tiny_llama, tmp_path, "lt-sft", top_k=K)
    summary = train(run, _cfg(data["lm"], save_every=3))
    assert summary["k"] == K and summary["phase1"]["steps"] == 6 and summary["steps"] == 6
    assert not os.path.exists(os.path.join(run, phased.PHASE1))  # the full copy is gone
    entries = _sparse(run)
    assert sum(i.numel() for i, _ in entries.values()) == K
    assert all((v != 0).all() for _, v in entries.values())  # every kept entry trained

    # The phase-2 loss goes down, and its optimizer state is O(K): exp_avg and exp_avg_sq of K values.
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert rows[-1]["loss"] < rows[0]["loss"]
    opt = ckpt_state.load_state(ckpt_state.latest_checkpoint(run))["optimizer"]["state"]
    assert sum(s["exp_avg"].numel() for s in opt.values()) == K
    assert sum(s["exp_avg_sq"].numel() for s in opt.values()) == K

    # Merging changes the base exactly at those K entries, by exactly the stored values.
    merged = str(tmp_path / "merged")
    merge(tiny_llama, [run], merged)
    base, out = load_file(os.path.join(tiny_llama, "model.safetensors")), load_file(os.path.join(merged, "model.safetensors"))
    changed = sum(int((base[n] != out[n]).sum()) for n in base)
    assert changed == K
    for name, (idx, val) in entries.items():
        assert torch.allclose(out[name].reshape(-1)[idx] - base[name].reshape(-1)[idx], val, atol=1e-6)

    checked = CliRunner().invoke(cli, ["check", tiny_llama, run, os.path.join(run, phased.DIFF_FILE), "--json"])
    assert checked.exit_code == 0, checked.output
    # A corrupt index is caught by check as merge would catch it.
    broken = str(tmp_path / "broken")
    import shutil

    shutil.copytree(run, broken)
    tensors = load_file(os.path.join(broken, "adapter_model.safetensors"))
    name = next(k for k in tensors if k.endswith(".idx"))
    tensors[name] = tensors[name].flip(0)  # unsorted
    from safetensors.torch import save_file

    save_file(tensors, os.path.join(broken, "adapter_model.safetensors"))
    bad = CliRunner().invoke(cli, ["check", tiny_llama, broken])
    assert bad.exit_code == 1 and "unsorted" in bad.output

    diff = read_diff(os.path.join(run, phased.DIFF_FILE))
    assert diff.method == "lt-sft"
    stored = {name: diff.get(name) for name in diff.names}
    assert sum(int(idx.numel()) for idx, _ in stored.values()) == K
    for name, (idx, val) in entries.items():
        assert torch.equal(stored[name][0].long(), idx) and torch.equal(stored[name][1], val)


def test_selection_is_the_exact_top_k_of_the_phase1_change(tiny_llama, data, tmp_path, phase1_weights):
    """Keep phase 1's checkpoint (stop before the selection deletes it) and check the kept set."""
    run = _inject(tiny_llama, tmp_path, "lt-sft", top_k=K)
    train(run, _cfg(data["lm"]))
    seen = {"theta1": phase1_weights["run"]}
    theta0 = load_file(os.path.join(tiny_llama, "model.safetensors"))
    names = sorted(theta0)
    flat = torch.cat([(seen["theta1"][n].float() - theta0[n].float()).reshape(-1).abs() for n in names])
    top = set(torch.topk(flat, K).indices.tolist())
    offsets, start = {}, 0
    for n in names:
        offsets[n] = start
        start += theta0[n].numel()
    kept = {offsets[n] + int(i) for n, (idx, _) in _sparse(run).items() for i in idx}
    assert kept == top


def test_sparse_gradient_equals_the_dense_gradient_at_the_kept_entries(tiny_llama, data, tmp_path):
    from peftcli.attach import load_adapted, load_base_model
    from tests.helpers import batch, output_tensor

    run = _inject(tiny_llama, tmp_path, "lt-sft", top_k=K)
    train(run, _cfg(data["lm"], steps=2, phase1_steps=2))
    adapted = load_adapted(tiny_llama, run)
    dense = load_base_model(tiny_llama)
    entries = _sparse(run)
    with torch.no_grad():
        params = dict(dense.named_parameters())
        for name, (idx, val) in entries.items():
            params[name].view(-1)[idx] += val
    inputs = batch()
    out = output_tensor(adapted(**inputs))
    out.float().pow(2).mean().backward()
    ref = output_tensor(dense(**inputs))
    assert torch.allclose(out, ref, atol=1e-5)  # θ₀ + φ is what the adapted model computes
    ref.float().pow(2).mean().backward()
    phi = adapted.phi_parameters()
    for name, (idx, _) in entries.items():
        assert torch.allclose(phi[name + ".val"].grad, params[name].grad.reshape(-1)[idx], atol=1e-6), name
    assert all(p.grad is None for n, p in adapted.model.named_parameters() if not n.endswith("_sparse_values"))


def test_a_crash_between_the_phases_resumes_to_the_same_bytes(tiny_llama, data, tmp_path, monkeypatch):
    ref = _inject(tiny_llama, tmp_path, "lt-sft", "ref", top_k=K)
    train(ref, _cfg(data["lm"]))
    run = _inject(tiny_llama, tmp_path, "lt-sft", "crashed", top_k=K)
    original = phased._select

    def crash(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(phased, "_select", crash)
    with pytest.raises(KeyboardInterrupt):
        train(run, _cfg(data["lm"]))
    monkeypatch.setattr(phased, "_select", original)
    again = CliRunner().invoke(cli, ["train", run, "--data", data["lm"], "--steps", "6"])
    assert again.exit_code == 2 and "already been trained" in again.stderr
    train(run, resume=True)
    assert open(os.path.join(ref, "adapter_model.safetensors"), "rb").read() == open(os.path.join(run, "adapter_model.safetensors"), "rb").read()
    # The .diff's provenance names its run directory; its tensors are the same bytes.
    a, b = load_file(os.path.join(ref, phased.DIFF_FILE)), load_file(os.path.join(run, phased.DIFF_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lt_sft_resumes_byte_identically_after_sigkill_in_phase_1(tiny_llama, data, tmp_path):
    ref = _inject(tiny_llama, tmp_path, "lt-sft", "ref", top_k=K)
    cmd = ["--data", data["lm"], "--steps", "4", "--phase1-steps", "40", "--batch-size", "4", "--lr", "1e-2",
           "--phase1-lr", "1e-3", "--save-every", "2", "--quiet"]
    made = CliRunner().invoke(cli, ["train", ref, *cmd])  # the reference in process: no torch import to pay
    assert made.exit_code == 0, made.stderr
    run = _inject(tiny_llama, tmp_path, "lt-sft", "killed", top_k=K)
    proc = subprocess.Popen([sys.executable, "-m", "peftcli", "train", run, *cmd], cwd=ROOT, stderr=subprocess.DEVNULL)
    marker = os.path.join(run, phased.PHASE1, "checkpoints", "step-0000004")
    import time

    deadline = time.time() + 120
    while not os.path.isdir(marker) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    assert not os.path.isfile(os.path.join(run, phased.PHASE1_DONE)), "phase 1 finished before the kill"
    resumed = CliRunner().invoke(cli, ["train", run, "--resume", "--quiet"])
    assert resumed.exit_code == 0, resumed.stderr
    assert open(os.path.join(ref, "adapter_model.safetensors"), "rb").read() == open(os.path.join(run, "adapter_model.safetensors"), "rb").read()


def test_movement_and_random_selection(tiny_llama, data, tmp_path, phase1_weights):
    seen = phase1_weights
    kept = {}
    for how in ("magnitude", "movement", "random"):
        run = _inject(tiny_llama, tmp_path, "lt-sft", how, top_k=K, select=how)
        train(run, _cfg(data["lm"], steps=1))
        kept[how] = {(n, int(i)) for n, (idx, _) in _sparse(run).items() for i in idx}
        assert len(kept[how]) == K
    assert kept["magnitude"] != kept["movement"] and kept["random"] != kept["magnitude"]
    theta0 = load_file(os.path.join(tiny_llama, "model.safetensors"))
    theta1 = seen["movement"]
    moved_out = sum(int((theta1[n].float().square() > theta0[n].float().square()).sum()) for n in theta0)
    assert moved_out > K
    for n, i in kept["movement"]:  # every kept entry moved away from zero
        assert theta1[n].reshape(-1)[i].float().square() > theta0[n].reshape(-1)[i].float().square()


def test_diff_pruning_keeps_phase1_values_and_its_l1_shrinks_phi(tiny_bert, data, tmp_path, phase1_weights):
    seen = phase1_weights
    theta0 = load_file(os.path.join(tiny_bert, "model.safetensors"))
    runs = {}
    for name, l1 in (("plain", 0.0), ("l1", 50.0)):
        runs[name] = _inject(tiny_bert, tmp_path, "diff-pruning", name, top_k=K, l1=l1, no_retrain=True)
        summary = train(runs[name], _cfg(data["cls"], eval_data=data["cls_dev"], phase1_lr=1e-2))
        assert summary["k"] == K
    # --no-retrain: the kept values are phase 1's θ1 − θ0 there, and the trained head is kept.
    theta1 = seen["plain"]
    prefix = next(p for p in ("bert.", "") if f"{p}{next(iter(theta0))}" in theta1)
    for name, (idx, val) in _sparse(runs["plain"]).items():
        ref = (theta1[prefix + name].float() - theta0[name].float()).reshape(-1)[idx]
        assert torch.allclose(val, ref, atol=1e-6)
    adapter = load_file(os.path.join(runs["plain"], "adapter_model.safetensors"))
    heads = [k for k in adapter if k.startswith("base_model.model.classifier.")]
    assert heads and torch.equal(adapter["base_model.model.classifier.weight"], theta1["classifier.weight"].float())

    def mean_abs_phi(t1):
        return sum(float((t1[prefix + n].float() - theta0[n].float()).abs().sum()) for n in theta0) / sum(v.numel() for v in theta0.values())

    assert mean_abs_phi(seen["l1"]) < 0.8 * mean_abs_phi(seen["plain"])


def test_untrained_sparse_runs_are_refused_in_one_line(tiny_llama, tmp_path):
    run = _inject(tiny_llama, tmp_path, "lt-sft", density=0.01)
    result = CliRunner().invoke(cli, ["merge", tiny_llama, run, "-o", str(tmp_path / "m")])
    assert result.exit_code == 1 and "has not been trained yet" in result.stderr and "Traceback" not in result.output
    assert not os.path.exists(tmp_path / "m")
    missing = CliRunner().invoke(cli, ["inject", "lt-sft", tiny_llama, "-o", str(tmp_path / "x")])
    assert missing.exit_code == 2 and "--density or --top-k" in missing.stderr and not os.path.exists(tmp_path / "x")


@pytest.mark.parametrize("select", ["magnitude", "random"])
def test_lottery_rounds_prune_rewind_and_write_a_ticket(tiny_llama, data, tmp_path, select):
    from transformers import AutoModelForSequenceClassification

    run = _inject(tiny_llama, tmp_path, "lottery", rounds=2, prune_rate=0.5, select=select)
    summary = train(run, _cfg(data["cls"], eval_data=data["cls_dev"], phase1_steps=3, phase1_lr=1e-3))
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert [r["round"] for r in rows] == [0, 1, 2] and all(r["eval_accuracy"] is not None for r in rows)
    assert [r["density"] for r in rows] == pytest.approx([1.0, 0.5, 0.25], abs=1e-3)
    mask = load_file(os.path.join(run, "mask.safetensors"))
    ticket = load_file(os.path.join(run, "ticket", "model.safetensors"))
    assert summary["density"] == pytest.approx(sum(int(m.sum()) for m in mask.values()) / sum(m.numel() for m in mask.values()))
    for name, m in mask.items():
        assert m.dtype == torch.bool and (ticket[name][~m] == 0).all() and (ticket[name][m] != 0).all()
    assert all(".layers." in n for n in mask)  # embeddings and the head stay dense
    model = AutoModelForSequenceClassification.from_pretrained(os.path.join(run, "ticket"), local_files_only=True)
    assert model.config.num_labels == 2
    plotted = CliRunner().invoke(cli, ["plot", run, "--json"])
    assert plotted.exit_code == 0, plotted.stderr
    doc = json.loads(plotted.stdout)
    assert doc["kind"] == "rounds" and open(doc["png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    if select == "magnitude":
        # Rewinding to step 0: survivors of the final ticket start from θ₀ in every round, so
        # the round-1 mask's survivors are the largest |θ| of round 0's trained weights, which
        # start at θ₀: check the pruned ones are below the kept ones per the global order.
        rewind = load_file(os.path.join(run, "rewind.safetensors"))
        base = load_file(os.path.join(tiny_llama, "model.safetensors"))
        assert all(torch.equal(rewind[n], base[n]) for n in mask)


def test_lottery_random_masks_differ_from_magnitude_masks(tiny_llama, data, tmp_path):
    masks = {}
    for select in ("magnitude", "random"):
        run = _inject(tiny_llama, tmp_path, "lottery", select, rounds=1, prune_rate=0.5, select=select)
        train(run, _cfg(data["lm"], phase1_steps=2))
        masks[select] = load_file(os.path.join(run, "mask.safetensors"))
    assert sum(int(m.sum()) for m in masks["magnitude"].values()) == sum(int(m.sum()) for m in masks["random"].values())
    assert any(not torch.equal(masks["magnitude"][n], masks["random"][n]) for n in masks["magnitude"])


def test_dense_tensors_train_whole_outside_the_top_k(tiny_llama, data, tmp_path):
    run = _inject(tiny_llama, tmp_path, "lt-sft", top_k=K, dense="norm")
    summary = train(run, _cfg(data["lm"], steps=3))
    entries = _sparse(run)
    base = load_file(os.path.join(tiny_llama, "model.safetensors"))
    norms = sorted(n for n in base if "norm" in n)
    assert norms and all(entries[n][0].numel() == base[n].numel() for n in norms)
    assert summary["k"] == K == sum(i.numel() for n, (i, _) in entries.items() if n not in norms)
    diff = read_diff(os.path.join(run, phased.DIFF_FILE))
    assert sorted(diff.dense_tensors) == norms
    for n in norms:
        idx, val = diff.get(n)
        assert idx is None and torch.equal(val.reshape(-1), entries[n][1])
    bad = CliRunner().invoke(cli, ["inject", "lt-sft", "--top-k", "5", "--dense", "(", tiny_llama, "-o", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "not a valid regular expression" in bad.stderr


@pytest.mark.parametrize("method, opts", [("lt-sft", {"top_k": K}), ("lottery", {"rounds": 1, "prune_rate": 0.5})])
def test_two_gloo_workers_equal_one_process_for_the_multi_pass_methods(tiny_llama, data, tmp_path, method, opts):
    # Every pass (phase 1, phase 2; each round) is data-parallel in one process group; Llama has
    # no dropout, so both runs compute the same thing up to the order of the gradient sums.
    one, two = _inject(tiny_llama, tmp_path, method, "one", **opts), _inject(tiny_llama, tmp_path, method, "two", **opts)
    common = ["--data", data["lm"], "--steps", "3", "--phase1-steps", "3", "--lr", "1e-2", "--phase1-lr", "1e-3", "--quiet"]
    single = CliRunner().invoke(cli, ["train", one, *common, "--batch-size", "8"])  # one process: this one
    assert single.exit_code == 0, single.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "peftcli", "train", two, *common, "--batch-size", "4", "--nproc", "2", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=280, env=os.environ | {"PEFTCLI_DIST_TIMEOUT": "120"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count('"schema"') == 1  # one report, from rank 0
    if method == "lt-sft":
        a, b = _sparse(one), _sparse(two)
        assert set(a) == set(b) and sum(i.numel() for i, _ in a.values()) == K
        for name, (idx, val) in a.items():
            assert torch.equal(idx, b[name][0]), name  # the same K entries chosen
            assert torch.allclose(val, b[name][1], atol=1e-5), name
        assert any(bool(v.abs().sum() > 0) for _, v in a.values())  # phase 2 trained them
        db = read_diff(os.path.join(two, phased.DIFF_FILE))  # rank 0 wrote the diff of the same K
        assert sum(int(db.get(n)[0].numel()) for n in db.names) == K
    else:
        for name in ("mask.safetensors", "ticket/model.safetensors"):
            a, b = load_file(os.path.join(one, name)), load_file(os.path.join(two, name))
            assert set(a) == set(b), name
            for k in a:
                if a[k].dtype == torch.bool:
                    assert torch.equal(a[k], b[k]), (name, k)
                else:
                    assert torch.allclose(a[k], b[k], atol=1e-5), (name, k)
        rows = [json.loads(line) for line in open(os.path.join(two, "metrics.jsonl"))]
        assert [r["round"] for r in rows] == [0, 1] and rows[1]["density"] < 1.0



class _Killed(Exception):
    """Stands for a kill -9 at a chosen point (the process's files stay as they are)."""


@pytest.mark.parametrize("point", ["after-training", "after-prune", "after-state", "after-ticket-state"])
def test_lottery_resumes_to_the_same_bytes_after_a_kill_between_rounds(tiny_llama, data, tmp_path, monkeypatch, point):
    from peftcli.training import lottery

    cfg = _cfg(data["lm"], steps=3, phase1_steps=3, save_every=3)  # each round ends with a checkpoint
    whole = _inject(tiny_llama, tmp_path, "lottery", "whole", rounds=2, prune_rate=0.5)
    train(whole, cfg)
    run = _inject(tiny_llama, tmp_path, "lottery", "run", rounds=2, prune_rate=0.5)
    target, when = {
        "after-training": ("_append_metrics", "before"),  # the round trained; nothing after it done
        "after-prune": ("_prune", "after"),  # the next mask written aside, the round not committed
        "after-state": ("_commit_mask", "before"),  # the state names the next mask, not yet in place
        "after-ticket-state": ("_commit_ticket", "before"),  # the last round committed, ticket not moved
    }[point]
    real, calls = getattr(lottery, target), []

    def dying(*args, **kwargs):
        calls.append(1)
        if when == "after":
            real(*args, **kwargs)
        if len(calls) == 1:
            raise _Killed(point)
        if when == "before":
            real(*args, **kwargs)

    monkeypatch.setattr(lottery, target, dying)
    with pytest.raises(_Killed):
        train(run, cfg)
    monkeypatch.setattr(lottery, target, real)
    train(run, None, resume=True)
    for name in ("mask.safetensors", "ticket/model.safetensors", "rewind.safetensors"):
        assert open(os.path.join(run, name), "rb").read() == open(os.path.join(whole, name), "rb").read(), name
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert not [n for n in os.listdir(run) if n.startswith("round-") or n == lottery.MASK_NEXT]


@pytest.mark.parametrize("point", ["phase1-summary", "phi-diff"])
def test_lt_sft_resumes_after_a_kill_between_a_finished_phase_and_what_follows(tiny_llama, data, tmp_path, monkeypatch, point):
    # Each phase's last checkpoint is its end (save_every = steps): resuming must take it as
    # the phase's result, not say "nothing to resume".
    from peftcli.training import common as train_common

    cfg = _cfg(data["lm"], steps=4, phase1_steps=4, save_every=4)
    whole = _inject(tiny_llama, tmp_path, "lt-sft", "whole", top_k=K)
    train(whole, cfg)
    run = _inject(tiny_llama, tmp_path, "lt-sft", "run", top_k=K)
    if point == "phi-diff":
        def dying(*args, **kwargs):
            raise _Killed(point)

        monkeypatch.setattr(phased, "_write_phi_diff", dying)
    else:
        real_write = train_common.write_json

        def dying(path, obj):
            if path.endswith(phased.PHASE1_DONE):
                raise _Killed(point)
            return real_write(path, obj)

        monkeypatch.setattr(train_common, "write_json", dying)
    with pytest.raises(_Killed):
        train(run, cfg)
    monkeypatch.undo()
    train(run, None, resume=True)
    name = "adapter_model.safetensors"
    assert load_file(os.path.join(run, name)).keys() == load_file(os.path.join(whole, name)).keys()
    for key, value in load_file(os.path.join(whole, name)).items():
        assert torch.equal(load_file(os.path.join(run, name))[key], value), key
    a, b = read_diff(os.path.join(whole, phased.DIFF_FILE)), read_diff(os.path.join(run, phased.DIFF_FILE))
    assert a.names == b.names
    for n in a.names:
        assert all(torch.equal(x, y) for x, y in zip(a.get(n), b.get(n))), n

