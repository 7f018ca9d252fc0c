"""``--packing``: first-fit-decreasing rows, each example isolated in its row (logits equal to
the example run alone), the loss the unpacked per-token mean, the efficiency reported, resume
bit-exact, and the one-line refusals (classify, prompt tuning, a model that leaks)."""

from __future__ import annotations

import json
import os
import random
import shutil

import pytest
import torch
from click.testing import CliRunner

from peftcli.attach import load_adapted, load_base_model
from peftcli.cli import cli
from peftcli.errors import UsageError
from peftcli.injection import inject
from peftcli.methods.lora import LoraConfig
from peftcli.training.batching import IGNORE, collate, encode, load_tokenizer
from peftcli.training.config import TrainConfig
from peftcli.training.data import load_dataset
from peftcli.training.loop import train
from peftcli.training.packing import check_isolation, collate_packed, disable_cache, first_fit_decreasing, pack
from tests.helpers import cls_rows


def _write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def _lm_rows(n: int, seed: int = 0) -> list[dict]:
    """Texts of 2 to 14 words: lengths that leave room to pack."""
    rng = random.Random(seed)
    return [{"text": " ".join(f"w{rng.randint(4, 40)}" for _ in range(rng.randint(2, 14)))} for _ in range(n)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("packing")
    rng = random.Random(1)
    sft = [
        {"prompt": " ".join(f"w{rng.randint(4, 40)}" for _ in range(rng.randint(1, 6))), "completion": " ".join(f"w{rng.randint(4, 40)}" for _ in range(rng.randint(1, 5)))}
        for _ in range(24)
    ]
    return {"lm": _write_jsonl(d / "lm.jsonl", _lm_rows(32)), "sft": _write_jsonl(d / "sft.jsonl", sft), "cls": _write_jsonl(d / "cls.jsonl", cls_rows(16))}


def _lora(base: str, tmp_path, name: str = "run") -> str:
    run = str(tmp_path / name)
    inject(base, "lora", LoraConfig(rank=4, targets="all-linear"), run)
    return run


def _randomized(run: str) -> str:
    """The adapter with a non-zero B, so that it changes the logits the tests compare."""
    from safetensors.torch import load_file, save_file

    path = os.path.join(run, "adapter_model.safetensors")
    g = torch.Generator().manual_seed(3)
    save_file({k: torch.randn(v.shape, generator=g) * 0.2 for k, v in load_file(path).items()}, path)
    return run


def _naive_ffd(lengths, capacity):
    bins, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        j = next((j for j, r in enumerate(room) if r >= lengths[i]), None)
        if j is None:
            bins.append([]), room.append(capacity)
            j = len(bins) - 1
        bins[j].append(i)
        room[j] -= lengths[i]
    return bins


@pytest.mark.parametrize("seed", range(5))
def test_first_fit_decreasing_is_the_textbook_one(seed):
    rng = random.Random(seed)
    capacity = rng.choice([8, 32, 128])
    lengths = [rng.randint(1, capacity) for _ in range(rng.randint(1, 300))]
    bins = first_fit_decreasing(lengths, capacity)
    assert bins == _naive_ffd(lengths, capacity)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= capacity for b in bins)
    assert first_fit_decreasing([], 8) == []


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_packed_row_computes_what_each_example_computes_alone(arch, tiny_llama, tiny_gpt2, data, tmp_path):
    base = {"llama": tiny_llama, "gpt2": tiny_gpt2}[arch]
    model = load_adapted(base, _randomized(_lora(base, tmp_path)), model_class="AutoModelForCausalLM").eval()
    disable_cache(model)
    items = encode(load_dataset(data["lm"]), load_tokenizer(base), 48)
    rows, _ = pack(items, 48)
    assert max(len(r["lengths"]) for r in rows) >= 3  # the test packs several examples per row
    batch = collate_packed(rows[:3], filler=0)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        by_text = {tuple(it["input_ids"]): model(input_ids=torch.tensor([it["input_ids"]])).logits[0] for it in items}
    for r, row in enumerate(rows[:3]):
        start = 0
        for n in row["lengths"]:
            ids = tuple(row["input_ids"][start : start + n])
            assert torch.allclose(packed[r, start : start + n], by_text[ids], atol=1e-5), (r, start)
            start += n


def _per_token_mean_fp64(model, items) -> float:
    """The unpacked per-token mean, computed independently: each example alone, fp64 cross-entropy
    over its predicted tokens (label t+1 from position t), summed and divided by their count."""
    total, count = 0.0, 0
    with torch.no_grad():
        for it in items:
            logits = model(input_ids=torch.tensor([it["input_ids"]])).logits[0].double()
            labels = torch.tensor(it["labels"][1:])
            keep = labels != IGNORE
            if keep.any():
                total += float(torch.nn.functional.cross_entropy(logits[:-1][keep], labels[keep], reduction="sum"))
                count += int(keep.sum())
    return total / count


@pytest.mark.parametrize("task", ["lm", "sft"])
def test_the_packed_loss_is_the_unpacked_per_token_mean(task, tiny_llama, data, tmp_path):
    model = load_adapted(tiny_llama, _randomized(_lora(tiny_llama, tmp_path)), model_class="AutoModelForCausalLM").eval()
    disable_cache(model)
    items = encode(load_dataset(data[task]), load_tokenizer(tiny_llama), 40)
    rows, _ = pack(items, 40)
    assert len(rows) < len(items)
    with torch.no_grad():
        packed = float(model(**collate_packed(rows, filler=0)).loss)
        padded = float(model(**collate(items, pad_id=0)).loss)
    reference = _per_token_mean_fp64(model, items)
    assert packed == pytest.approx(reference, abs=1e-5)
    assert packed == pytest.approx(padded, abs=1e-5)


def test_training_one_step_packed_equals_unpacked_and_reports_efficiency(tiny_llama, data, tmp_path):
    """One micro-batch of every example: the first step's loss is the same number packed or not."""
    items = encode(load_dataset(data["lm"]), load_tokenizer(tiny_llama), 48)
    rows, _ = pack(items, 48)
    logs: list[str] = []
    common = dict(data=data["lm"], steps=1, lr=1e-3, max_length=48, log_every=1)
    padded = train(_lora(tiny_llama, tmp_path, "padded"), TrainConfig(batch_size=len(items), **common))
    packed = train(_lora(tiny_llama, tmp_path, "packed"), TrainConfig(batch_size=len(rows), packing=True, **common), log=logs.append)
    assert packed["final_loss"] == pytest.approx(padded["final_loss"], abs=1e-5)
    used = sum(len(it["input_ids"]) for it in items)
    assert packed["packing_efficiency"] == pytest.approx(used / (len(rows) * 48))
    assert "packing_efficiency" not in padded
    assert any(f"{len(items)} examples in {len(rows)} rows" in line for line in logs)
    args = json.load(open(os.path.join(packed["run"], "train_args.json")))
    assert args["packing"] is True


def test_resume_with_packing_is_bit_exact(tiny_llama, data, tmp_path):
    run = _lora(tiny_llama, tmp_path)
    cfg = TrainConfig(data=data["sft"], steps=6, batch_size=2, lr=1e-3, max_length=24, packing=True, save_every=3, keep_checkpoints=5)
    train(run, cfg)
    again = str(tmp_path / "again")
    shutil.copytree(run, again)
    shutil.rmtree(os.path.join(again, "checkpoints", "step-0000006"))
    train(again, resume=True)
    name = "adapter_model.safetensors"
    assert open(os.path.join(again, name), "rb").read() == open(os.path.join(run, name), "rb").read()


def test_the_isolation_check_catches_a_model_that_attends_across_examples(tiny_llama, data):
    """With its KV cache on, transformers does not read the position-id restarts: the check
    must refuse that model, not train it on leaking rows."""
    model = load_base_model(tiny_llama, "AutoModelForCausalLM").eval()
    rows, _ = pack(encode(load_dataset(data["lm"]), load_tokenizer(tiny_llama), 48), 48)
    with pytest.raises(UsageError, match="attends across the examples"):
        check_isolation(model, rows, torch.device("cpu"), filler=0)
    disable_cache(model)
    check_isolation(model, rows, torch.device("cpu"), filler=0)  # now isolated: no error


def _cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_packing_refusals_are_one_line_and_write_nothing(tiny_llama, data, tmp_path):
    run = _lora(tiny_llama, tmp_path)
    for extra, words in ((["--data", data["cls"]], "classify"), (["--data", data["lm"], "--task", "classify"], "classify")):
        r = _cli("train", run, *extra, "--packing", "--steps", "1")
        assert r.exit_code == 2, r.output
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: --packing") and words in r.stderr and "(" in r.stderr
        assert not os.path.exists(os.path.join(run, "train_args.json"))
    prompt = str(tmp_path / "prompt")
    assert _cli("inject", "prompt", tiny_llama, "-o", prompt, "--virtual-tokens", "4").exit_code == 0
    r = _cli("train", prompt, "--data", data["lm"], "--packing", "--steps", "1")
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "prompt" in r.stderr and "virtual tokens" in r.stderr
    assert not os.path.exists(os.path.join(prompt, "train_args.json"))


def test_train_help_lists_the_new_options():
    out = _cli("train", "--help").output
    assert "--packing" in out and "--chat-template" in out
