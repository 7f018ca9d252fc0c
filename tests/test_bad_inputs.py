"""The bad-input matrix: every command that reads an input, fed every kind of broken input.

Each case runs the real CLI and asserts the error contract: exit code 1 (bad input), 2 (usage)
or 3 (resource), exactly one ``error: ...`` line on stderr naming the problem, no traceback,
and nothing at the output path (nor a temporary beside it). The reader-level cases of
``test_validation.py`` (one file, ``inspect`` only) are extended here to every role a file
plays — base, fine-tuned checkpoint, adapter weights, ``.diff`` — and to every command that
reads it. Faults: SIGKILL during ``merge`` and ``diff`` and a full disk (ENOSPC) during every
writing command.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import stat
import struct
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from peftcli.artifacts.adapter_dir import read_adapter, write_adapter
from peftcli.artifacts.sparse_diff import read_diff
from peftcli.checkpoint import atomic
from peftcli.checkpoint.reader import open_checkpoint
from peftcli.checkpoint.writer import save_state_dict
from peftcli.cli import cli
from peftcli.diffing import DiffOptions, diff
from peftcli.errors import BadInputError
from peftcli.injection import inject
from peftcli.methods.ia3 import IA3Config
from peftcli.methods.lora import LoraConfig
from tests.helpers import assert_error, edited_adapter, temporaries
from tests.safetensors_craft import make_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
P = "base_model.model."
Q = "model.layers.0.self_attn.q_proj"


# -- running the CLI and checking the contract ---------------------------------------------------


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


# -- the artifacts every case starts from --------------------------------------------------------


def _perturbed(base: str, out: str, seed: int = 1, scale: float = 0.01, change=None) -> str:
    """A 'fine-tuned' copy of ``base``: every float tensor plus seeded noise (then ``change(sd)``)."""
    with open_checkpoint(base) as ckpt:
        sd = {n: ckpt.get(n).clone() for n in ckpt}
    g = torch.Generator().manual_seed(seed)
    for name, t in sd.items():
        if t.is_floating_point():
            sd[name] = t + scale * torch.randn(t.shape, generator=g)
    if change:
        change(sd)
    save_state_dict(sd, out, source_dir=base)
    return out


@pytest.fixture(scope="module")
def art(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    paths = {"root": root, "base": tiny_llama}
    inject(tiny_llama, "lora", LoraConfig(rank=4), str(root / "lora"))
    inject(tiny_llama, "ia3", IA3Config(), str(root / "ia3"))
    # A LoRA with non-zero B, so that merging it changes the weights.
    adapter = read_adapter(str(root / "lora"))
    g = torch.Generator().manual_seed(3)
    tensors = {k: (t + 0.1 * torch.randn(t.shape, generator=g)) for k, t in adapter.tensors.items()}
    write_adapter(str(root / "lora-trained"), adapter.config, tensors)
    paths["ft"] = _perturbed(tiny_llama, str(root / "ft"))
    diff(tiny_llama, paths["ft"], str(root / "task.diff"), DiffOptions(density=0.05))
    for name in ("lora", "ia3", "lora-trained", "task.diff"):
        paths[name] = str(root / name)
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"text": f"w{i} w{i + 1} w{i + 2}"}) + "\n" for i in range(8)))
    paths["data"] = str(data)
    return paths


def copy_dir(src: str, dst) -> str:
    shutil.copytree(src, str(dst))
    return str(dst)


# -- corrupting a safetensors file ---------------------------------------------------------------


def split(content: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", content[:8])
    return json.loads(content[8 : 8 + n]), content[8 + n :]


def join(header: dict | bytes, data: bytes) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _entries_by_offset(header: dict) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def _shift_last(delta: int):
    def change(content: bytes) -> bytes:
        header, data = split(content)
        last = header[_entries_by_offset(header)[-1]]
        last["data_offsets"] = [o + delta for o in last["data_offsets"]]
        return join(header, data)

    return change


def _unknown_dtype(content: bytes) -> bytes:
    header, data = split(content)
    header[_entries_by_offset(header)[0]]["dtype"] = "F17"
    return join(header, data)


def _duplicate_key(content: bytes) -> bytes:
    header, data = split(content)
    first = _entries_by_offset(header)[0]
    raw = json.dumps(header)
    raw = raw[:-1] + ", " + json.dumps(first) + ": " + json.dumps(header[first]) + "}"
    return join(raw.encode(), data)


def _not_json(content: bytes) -> bytes:
    (n,) = struct.unpack("<Q", content[:8])
    return content[:8] + b"{" + b"\x01" * (n - 1) + content[8 + n :]


def _random_bytes(content: bytes) -> bytes:
    return bytes(random.Random(7).randrange(256) for _ in range(4096))


CORRUPTIONS = {
    "zero-length": (lambda c: b"", "shorter than the 8-byte header length"),
    "truncated-length": (lambda c: c[:5], "shorter than the 8-byte header length"),
    "truncated-header": (lambda c: c[: 8 + struct.unpack("<Q", c[:8])[0] // 2], "runs past the end"),
    "truncated-data": (lambda c: c[:-7], "(out of bounds)"),
    "random-bytes": (_random_bytes, "is over the 100 MB limit"),
    "length-overflow": (lambda c: b"\xff" * 8 + c[8:], "is over the 100 MB limit"),
    "not-json": (_not_json, "header is not valid JSON"),
    "overlapping-offsets": (_shift_last(-4), "overlaps the tensor before it"),
    "out-of-bounds-offsets": (_shift_last(4), "(out of bounds)"),
    "unknown-dtype": (_unknown_dtype, "unknown dtype 'F17'"),
    "duplicate-key": (_duplicate_key, "twice"),
    "trailing-bytes": (lambda c: c + b"junk", "4 trailing bytes after the last tensor"),
}


def corrupt_file(path: str, corruption: str) -> None:
    with open(path, "rb") as f:
        content = f.read()
    with open(path, "wb") as f:
        f.write(CORRUPTIONS[corruption][0](content))


# Where a safetensors file is read, and the commands that read it there. Each command is
# (args, outputs that must not exist, whether the error detail is on stdout as with check).
def _base_role(art, tmp, bad):
    out = tmp / "out"
    return bad, [
        (["inspect", bad], [], False),
        (["inspect", bad, "--budget", "lora"], [], False),
        (["inject", "lora", bad, "-o", out], [out], False),
        (["merge", bad, art["lora"], "-o", out], [out], False),
        (["diff", bad, art["ft"], "-o", f"{out}.diff", "--density", "0.1"], [f"{out}.diff"], False),
        (["check", bad, art["lora"]], [], False),
        (["convert", art["lora"], "--to", "diff", "--dense", "--base", bad, "-o", f"{out}.diff"], [f"{out}.diff"], False),
        (["convert", art["task.diff"], "--to", "lora", "--base", bad, "-o", out], [out], False),
    ]


def _finetuned_role(art, tmp, bad):
    out = tmp / "out"
    return bad, [
        (["diff", art["base"], bad, "-o", f"{out}.diff", "--dense"], [f"{out}.diff"], False),
        (["merge", art["base"], bad, "-o", out], [out], False),
    ]


def _adapter_role(art, tmp, bad):
    out = tmp / "out"
    return bad, [
        (["inspect", bad], [], False),
        (["merge", art["base"], bad, "-o", out], [out], False),
        (["check", art["base"], bad], [], True),
        (["convert", bad, "--to", "diff", "--dense", "--base", art["base"], "-o", f"{out}.diff"], [f"{out}.diff"], False),
        (["train", bad, "--model", art["base"], "--data", art["data"], "--steps", "1", "--quiet"], [], False),
    ]


def _diff_role(art, tmp, bad):
    out = tmp / "out"
    return bad, [
        (["inspect", bad], [], False),
        (["merge", art["base"], bad, "-o", out], [out], False),
        (["check", art["base"], bad], [], True),
        (["combine", bad, art["task.diff"], "--op", "add", "-o", f"{out}.diff"], [f"{out}.diff"], False),
        (["combine", art["task.diff"], bad, "--op", "add", "-o", f"{out}.diff"], [f"{out}.diff"], False),
        (["convert", bad, "--to", "lora", "--base", art["base"], "-o", out], [out], False),
    ]


def _make_role(role: str, art, tmp):
    """A copy of the role's valid input, its safetensors file path, and the role's commands."""
    if role == "base":
        d = copy_dir(art["base"], tmp / "base")
        return os.path.join(d, "model.safetensors"), _base_role(art, tmp, d)
    if role == "finetuned":
        d = copy_dir(art["ft"], tmp / "ft")
        return os.path.join(d, "model.safetensors"), _finetuned_role(art, tmp, d)
    if role == "adapter":
        d = copy_dir(art["lora"], tmp / "adapter")
        return os.path.join(d, "adapter_model.safetensors"), _adapter_role(art, tmp, d)
    path = str(tmp / "bad.diff")
    shutil.copyfile(art["task.diff"], path)
    return path, _diff_role(art, tmp, path)


ROLES = ("base", "finetuned", "adapter", "diff")


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
@pytest.mark.parametrize("role", ROLES)
def test_corrupt_safetensors_in_every_role_and_command(art, tmp_path, role, corruption):
    weights, (bad, commands) = _make_role(role, art, tmp_path)
    corrupt_file(weights, corruption)
    message = CORRUPTIONS[corruption][1]
    before = sorted(os.listdir(bad)) if os.path.isdir(bad) else None
    for args, outputs, on_stdout in commands:
        assert_error(invoke(*args), 1, message, *outputs, on_stdout=on_stdout)
        if before is not None:  # nothing is ever written into an input (train's run directory included)
            assert sorted(os.listdir(bad)) == before, args


def test_every_prefix_of_a_valid_diff_is_a_clean_error(tmp_path):
    # A diff small enough to try every length 0 .. len − 1, through the reader and the CLI.
    base = {"w": torch.arange(6, dtype=torch.float32).view(2, 3), "b": torch.ones(3)}
    ft = {"w": base["w"] + torch.tensor([[0.0, 0.5, 0.0], [0.0, 0.0, -2.0]]), "b": torch.ones(3) * 2}
    save_state_dict(base, str(tmp_path / "base.safetensors"))
    save_state_dict(ft, str(tmp_path / "ft.safetensors"))
    good = str(tmp_path / "good.diff")
    diff(str(tmp_path / "base.safetensors"), str(tmp_path / "ft.safetensors"), good, DiffOptions(top_k=2))
    content = open(good, "rb").read()
    assert len(content) < 2000
    path = str(tmp_path / "prefix.diff")
    for n in range(len(content)):
        with open(path, "wb") as f:
            f.write(content[:n])
        with pytest.raises(BadInputError):
            with read_diff(path) as d:
                d.validate()
    # Through the CLI: the lengths around the 8-byte prefix, then every length from the header's end on.
    header_end = 8 + struct.unpack("<Q", content[:8])[0]
    for n in sorted(set(range(0, 16)) | set(range(header_end - 8, len(content)))):
        with open(path, "wb") as f:
            f.write(content[:n])
        assert_error(invoke("inspect", path), 1, path)
    assert invoke("inspect", good).exit_code == 0


def test_every_prefix_of_adapter_weights_is_a_clean_error(art, tmp_path):
    adapter = copy_dir(art["ia3"], tmp_path / "ia3")  # IA³: a small file (about 2 kB)
    weights = os.path.join(adapter, "adapter_model.safetensors")
    content = open(weights, "rb").read()
    for n in range(len(content)):
        with open(weights, "wb") as f:
            f.write(content[:n])
        with pytest.raises(BadInputError):
            read_adapter(adapter)
    for n in range(0, len(content), 199):
        with open(weights, "wb") as f:
            f.write(content[:n])
        assert_error(invoke("check", art["base"], adapter), 1, "adapter_model.safetensors", on_stdout=True)


def test_a_500000_entry_header_is_summarised_in_bounded_time(tmp_path):
    n = 500_000
    entries = {f"layers.{i}.w": {"dtype": "U8", "shape": [1], "data_offsets": [i, i + 1]} for i in range(n)}
    path = str(tmp_path / "many.safetensors")
    with open(path, "wb") as f:
        f.write(make_file(entries, bytes(n)))
    del entries
    start = time.perf_counter()
    result = invoke("inspect", path, "--json")
    elapsed = time.perf_counter() - start
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["num_tensors"] == n and doc["num_params"] == n
    assert [(m["name"], m["count"]) for m in doc["modules"]] == [("layers.{0..499999}", n)]
    # Linear work takes seconds (tens on a heavily loaded machine); a quadratic step would take hours.
    assert elapsed < 120, elapsed
    with open_checkpoint(path) as ckpt:  # valid, so the reader accepts it too (checks are O(n log n))
        assert len(ckpt) == n and ckpt.get("layers.499999.w").tolist() == [0]


# -- the shard index ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def outside_index(art, tmp_path_factory):
    """A sharded copy of the base whose index names a shard outside its directory."""
    root = tmp_path_factory.mktemp("outside")
    d = copy_dir(art["base"], root / "sharded")
    os.rename(os.path.join(d, "model.safetensors"), str(root / "model-00001-of-00001.safetensors"))
    with open_checkpoint(str(root / "model-00001-of-00001.safetensors")) as ckpt:
        names = list(ckpt)
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": {n: "../model-00001-of-00001.safetensors" for n in names}}, f)
    return d


def test_an_index_pointing_outside_its_directory_is_refused_by_every_command(art, outside_index, tmp_path):
    out = tmp_path / "out"
    for args, outputs in [
        (["inspect", outside_index], []),
        (["inject", "lora", outside_index, "-o", out], [out]),
        (["merge", outside_index, art["lora"], "-o", out], [out]),
        (["merge", art["base"], outside_index, "-o", out], [out]),
        (["diff", outside_index, art["ft"], "-o", f"{out}.diff", "--dense"], [f"{out}.diff"]),
        (["diff", art["base"], outside_index, "-o", f"{out}.diff", "--dense"], [f"{out}.diff"]),
        (["check", outside_index, art["lora"]], []),
        (["convert", art["task.diff"], "--to", "lora", "--base", outside_index, "-o", out], [out]),
    ]:
        assert_error(invoke(*args), 1, "points outside", *outputs)


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_train_on_a_corrupt_base(art, tmp_path, corruption):
    base = copy_dir(art["base"], tmp_path / "base")
    corrupt_file(os.path.join(base, "model.safetensors"), corruption)
    run = copy_dir(art["lora"], tmp_path / "run")
    result = invoke("train", run, "--model", base, "--data", art["data"], "--steps", "1", "--quiet")
    assert_error(result, 1, CORRUPTIONS[corruption][1], os.path.join(run, "train_args.json"), os.path.join(run, "metrics.jsonl"))


# -- adapter directories whose config or tensors do not fit ---------------------------------------




def _set(d, key, value):
    d[key] = value


def _rename_keys(t):
    for k in list(t):
        t[k.replace("q_proj", "nope_proj")] = t.pop(k)


def _lower_rank(t):
    for k in list(t):
        t[k] = t[k][:2].clone() if k.endswith("lora_A.weight") else t[k][:, :2].clone()


def _poison(value):
    def change(t):
        key = next(k for k in sorted(t) if k.endswith("lora_B.weight"))
        t[key][0, 0] = value

    return change


ADAPTER_CASES = {
    # name: (tensors edit, config edit, message of merge/convert, message check prints)
    "unknown-method": (None, lambda c: _set(c, "peft_type", "FROBNICATE"), "unsupported adapter method peft_type='FROBNICATE'", "unsupported adapter method"),
    "unknown-peftcli-method": (
        None,
        lambda c: c.update(peft_type="PEFTCLI", peftcli={"method": "nope"}),
        "unknown peftcli method 'nope'",
        "unknown peftcli method",
    ),
    "no-peft-type": (None, lambda c: c.pop("peft_type"), "has no peft_type", "has no peft_type"),
    "no-rank": (None, lambda c: c.pop("r"), "has no rank 'r'", "has no rank 'r'"),
    "rank-as-text": (None, lambda c: _set(c, "r", "eight"), "'r' must be", "'r' must be"),
    "alpha-as-list": (None, lambda c: _set(c, "lora_alpha", [16]), "'lora_alpha' must be", "'lora_alpha' must be"),
    "targets-as-number": (None, lambda c: _set(c, "target_modules", 7), "'target_modules' must be", "'target_modules' must be"),
    "heads-as-number": (None, lambda c: _set(c, "modules_to_save", 7), "'modules_to_save' must be", "'modules_to_save' must be"),
    "keys-match-nothing": (_rename_keys, None, "no such linear module in the base", "is missing"),
    "rank-mismatch": (_lower_rank, None, "rank 2 in the tensors but r=4 in the config", "rank 2 in the tensors but r=4"),
    "nan": (_poison(float("nan")), None, "NaN", "1 NaN among"),
    "inf": (_poison(float("inf")), None, "NaN", "1 Inf among"),
}


@pytest.fixture(scope="module", params=list(ADAPTER_CASES))
def bad_adapter(request, art, tmp_path_factory):
    tensors, config, merge_message, check_message = ADAPTER_CASES[request.param]
    path = edited_adapter(art["lora-trained"], tmp_path_factory.mktemp("adapter") / "bad", tensors, config)
    return request.param, path, merge_message, check_message


def test_bad_adapter_is_refused_by_merge_check_convert_and_train(art, bad_adapter, tmp_path):
    case, path, merge_message, check_message = bad_adapter
    out = tmp_path / "out"
    before = sorted(os.listdir(path))
    assert_error(invoke("merge", art["base"], path, "-o", out), 1, merge_message, out)
    assert_error(invoke("check", art["base"], path), 1, check_message, on_stdout=True)
    assert_error(invoke("convert", path, "--to", "diff", "--dense", "--base", art["base"], "-o", f"{out}.diff"), 1, merge_message, f"{out}.diff")
    if case not in ("nan", "inf"):  # training from a non-finite φ is not refused up front (see below)
        result = invoke("train", path, "--model", art["base"], "--data", art["data"], "--steps", "1", "--quiet")
        assert_error(result, 1, merge_message if case != "keys-match-nothing" else "nope_proj")
    assert sorted(os.listdir(path)) == before


@pytest.mark.parametrize(
    "section, message",
    [
        ({"method": ["layers"]}, "needs a 'peftcli' section naming its method"),
        (None, "needs a 'peftcli' section naming its method"),
        ({"method": "layers", "layers": 1}, "'peftcli.layers' must be a string or null, not 1"),
        ({"method": "layers", "layers": "1", "modules": ["mlp"]}, "'peftcli.modules' must be a string or null"),
    ],
)
def test_a_malformed_peftcli_section_is_one_error(art, tmp_path, section, message):
    from peftcli.methods.layers import LayersConfig

    layers = str(tmp_path / "layers")
    inject(art["base"], "layers", LayersConfig(layers="1"), layers)
    config = json.load(open(os.path.join(layers, "adapter_config.json")))
    assert config["peft_type"] == "PEFTCLI" and config["peftcli"]["method"] == "layers"
    assert invoke("merge", art["base"], layers, "-o", tmp_path / "good").exit_code == 0  # the unedited one merges
    config["peftcli"] = section
    with open(os.path.join(layers, "adapter_config.json"), "w") as f:
        json.dump(config, f)
    out = tmp_path / "out"
    assert_error(invoke("inspect", layers), 1, message)
    assert_error(invoke("merge", art["base"], layers, "-o", out), 1, message, out)
    assert_error(invoke("check", art["base"], layers), 1, message, on_stdout=True)


@pytest.mark.parametrize("case", ["rank-as-text", "targets-as-number", "heads-as-number"])
def test_inspect_names_a_malformed_adapter_config(art, tmp_path, case):
    tensors, config, message, _ = ADAPTER_CASES[case]
    path = edited_adapter(art["lora"], tmp_path / "bad", tensors, config)
    assert_error(invoke("inspect", path), 1, message)
    assert_error(invoke("inspect", path, "--json"), 1, message)


def test_training_a_non_finite_adapter_is_refused(art, tmp_path):
    path = edited_adapter(art["lora-trained"], tmp_path / "nan", _poison(float("nan")))
    result = invoke("train", path, "--model", art["base"], "--data", art["data"], "--steps", "1", "--quiet")
    assert_error(result, 1, "NaN", os.path.join(path, "train_args.json"))


# -- config.json fields of the wrong type --------------------------------------------------------------

MODEL_CONFIG_CASES = {
    "model_type": (["llama"], "'model_type' must be a string"),
    "num_attention_heads": ("four", "'num_attention_heads' must be a positive integer"),
    "num_key_value_heads": (0, "'num_key_value_heads' must be a positive integer"),
    "num_hidden_layers": (2**63, "'num_hidden_layers' must be an integer from 0 to"),
    "hidden_size": (64.0, "'hidden_size' must be a positive integer"),
    "architectures": ("LlamaForCausalLM", "'architectures' must be a list of class names"),
    "max_position_embeddings": (float("inf"), "'max_position_embeddings' must be a non-negative integer"),
    "tie_word_embeddings": ("no", "'tie_word_embeddings' must be true or false"),
    "text_config": ([], "'text_config' must be a JSON object or null"),
}


@pytest.mark.parametrize("field", list(MODEL_CONFIG_CASES))
def test_a_config_json_field_of_the_wrong_type_is_one_error(art, tmp_path, field):
    value, message = MODEL_CONFIG_CASES[field]
    base = copy_dir(art["base"], tmp_path / "base")
    config = json.load(open(os.path.join(base, "config.json")))
    config[field] = value
    with open(os.path.join(base, "config.json"), "w") as f:
        json.dump(config, f)
    out = tmp_path / "out"
    assert_error(invoke("inspect", base), 1, message)
    for method in ("lora", "ia3", "prefix", "prompt", "adapter"):
        assert_error(invoke("inspect", base, "--budget", method), 1, message)
        assert_error(invoke("inject", method, base, "-o", out), 1, message, out)
    assert_error(invoke("merge", base, art["lora-trained"], "-o", out), 1, message, out)
    assert_error(invoke("check", base, art["lora"]), 1, message, on_stdout=True)


DEEP_JSON = "[" * 100_000 + "]" * 100_000
HUGE_INTEGER = "9" * 5000  # Python refuses to parse integers of over 4300 digits


@pytest.mark.parametrize("kind", ["deep", "huge-integer"])
@pytest.mark.parametrize("where", ["config.json", "adapter_config.json", "shard index", "diff metadata"])
def test_json_that_python_cannot_parse_is_a_clean_error(art, tmp_path, where, kind):
    bad = DEEP_JSON if kind == "deep" else '{"vocab_size": ' + HUGE_INTEGER + "}"
    message = "nested too deeply" if kind == "deep" else "4300 digits"
    out = tmp_path / "out"
    if where == "config.json":
        base = copy_dir(art["base"], tmp_path / "base")
        (tmp_path / "base" / "config.json").write_text(bad)
        commands = [(["inspect", base], []), (["inject", "lora", base, "-o", out], [out]), (["merge", base, art["lora-trained"], "-o", out], [out])]
    elif where == "adapter_config.json":
        adapter = copy_dir(art["lora-trained"], tmp_path / "adapter")
        (tmp_path / "adapter" / "adapter_config.json").write_text(bad)
        commands = [(["inspect", adapter], []), (["merge", art["base"], adapter, "-o", out], [out])]
    elif where == "shard index":
        base = copy_dir(art["base"], tmp_path / "base")
        (tmp_path / "base" / "model.safetensors.index.json").write_text(bad)
        commands = [(["inspect", base], []), (["merge", base, art["lora-trained"], "-o", out], [out])]
    else:
        bad_diff = edited_diff(art["task.diff"], tmp_path / "bad.diff", lambda t, m: _set(m, "provenance", bad))
        commands = [(["inspect", bad_diff], []), (["merge", art["base"], bad_diff, "-o", out], [out])]
    for args, outputs in commands:
        assert_error(invoke(*args), 1, message, *outputs)


def test_a_tensor_with_an_empty_name_is_refused(art, tmp_path):
    base = copy_dir(art["base"], tmp_path / "base")
    weights = os.path.join(base, "model.safetensors")
    header, data = split(open(weights, "rb").read())
    header[""] = header.pop("lm_head.weight")
    with open(weights, "wb") as f:
        f.write(join(header, data))
    out = tmp_path / "out"
    for args, outputs in [
        (["inspect", base], []),
        (["merge", base, art["lora-trained"], "-o", out], [out]),
        (["inject", "lora", base, "-o", out], [out]),
        (["check", base, art["lora"]], []),
    ]:
        assert_error(invoke(*args), 1, "a tensor has an empty name", *outputs)
    pickled = str(tmp_path / "empty-name.bin")
    torch.save({"": torch.zeros(2), "w": torch.ones(2)}, pickled)
    assert_error(invoke("inspect", pickled, "--allow-pickle"), 1, "a tensor has an empty name")


# -- .diff files whose contents do not fit --------------------------------------------------------


def edited_diff(src: str, out, change) -> str:
    with safe_open(src, framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    change(tensors, meta)
    save_state_dict(tensors, str(out), metadata=meta)
    return str(out)


def _sparse_name(tensors) -> str:
    return next(k for k in sorted(tensors) if k.endswith(".idx") and tensors[k].numel() > 2)


def _unsorted(t, m):
    k = _sparse_name(t)
    t[k] = t[k].flip(0).contiguous()


def _out_of_range(t, m):
    t[_sparse_name(t)][-1] = 10**8


def _length_mismatch(t, m):
    k = _sparse_name(t)[: -len(".idx")] + ".val"
    t[k] = t[k][:-1].clone()


def _nan_values(t, m):
    t[_sparse_name(t)[: -len(".idx")] + ".val"][0] = float("nan")


def _inf_values(t, m):
    t[_sparse_name(t)[: -len(".idx")] + ".val"][0] = float("-inf")


def _provenance_inputs(t, m):
    prov = json.loads(m["provenance"])
    prov["inputs"] = 1.5
    m["provenance"] = json.dumps(prov)


DIFF_CASES = {
    # name: (edit, message, whether inspect (which reads every tensor) sees it)
    "unsorted-indices": (_unsorted, "unsorted index", True),
    "out-of-range-indices": (_out_of_range, "index 100000000 is out of range", True),
    "idx-val-length-mismatch": (_length_mismatch, "indices but", True),
    "nan-values": (_nan_values, "NaN", False),
    "inf-values": (_inf_values, "Inf", False),
    "malformed-provenance": (_provenance_inputs, "provenance", True),
}


@pytest.mark.parametrize("case", list(DIFF_CASES))
def test_bad_diff_is_refused_by_every_reader(art, tmp_path, case):
    change, message, inspect_sees = DIFF_CASES[case]
    path = edited_diff(art["task.diff"], tmp_path / "bad.diff", change)
    out = tmp_path / "out"
    if inspect_sees:
        assert_error(invoke("inspect", path), 1, message)
    assert_error(invoke("merge", art["base"], path, "-o", out), 1, message if inspect_sees else "NaN or Inf", out)
    assert_error(invoke("check", art["base"], path), 1, message, on_stdout=True)
    for args in (
        ["combine", path, art["task.diff"], "--op", "add", "-o", f"{out}.diff"],
        ["combine", path, "--op", "scale", "--by", "2", "-o", f"{out}.diff"],
    ):
        assert_error(invoke(*args), 1, message, f"{out}.diff")


@pytest.mark.parametrize("case", list(DIFF_CASES))
def test_bad_diff_is_refused_by_convert(art, tmp_path, case):
    change, message, _ = DIFF_CASES[case]
    path = edited_diff(art["task.diff"], tmp_path / "bad.diff", change)
    out = tmp_path / "out"
    assert_error(invoke("convert", path, "--to", "lora", "--base", art["base"], "-o", out), 1, message, out)


@pytest.fixture(scope="module")
def other_bases(art, tmp_path_factory):
    """The base with other values (same tensor table), and the base with a resized vocabulary."""
    root = tmp_path_factory.mktemp("other")
    same_shapes = _perturbed(art["base"], str(root / "other-values"), seed=9, scale=0.1)

    def resize(sd):
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            sd[name] = torch.cat([sd[name], torch.zeros(4, sd[name].shape[1])])

    resized = str(root / "resized")
    _perturbed(art["base"], resized, scale=0.0, change=resize)
    config = json.load(open(os.path.join(resized, "config.json")))
    config["vocab_size"] += 4
    with open(os.path.join(resized, "config.json"), "w") as f:
        json.dump(config, f)
    ft_resized = _perturbed(resized, str(root / "ft-resized"))
    return {"other-values": same_shapes, "resized": resized, "ft-resized": ft_resized}


def test_a_diff_for_another_base_is_refused(art, other_bases, tmp_path):
    out = tmp_path / "out"
    other = other_bases["other-values"]
    # Same names and shapes, other bytes: the content hash tells them apart. (convert --to lora
    # needs the base's shapes only, so it rightly accepts this base.)
    assert_error(invoke("merge", other, art["task.diff"], "-o", out), 1, "bytes differ", out)
    assert_error(invoke("check", other, art["task.diff"], "--content"), 1, "other bytes", on_stdout=True)
    resized = other_bases["resized"]
    for args in (
        ["merge", resized, art["task.diff"], "-o", out],
        ["convert", art["task.diff"], "--to", "lora", "--base", resized, "-o", out],
    ):
        assert_error(invoke(*args), 1, "'model.embed_tokens.weight' is F32[256, 64] in the fingerprint but F32[260, 64]", out)
    assert_error(invoke("check", resized, art["task.diff"]), 1, "resized vocabulary", on_stdout=True)


def test_a_resized_vocabulary_is_a_shape_mismatch_everywhere(art, other_bases, tmp_path):
    out = tmp_path / "out"
    ft_resized, resized = other_bases["ft-resized"], other_bases["resized"]
    message = "the vocabularies differ: " + ft_resized + " has 260 tokens, the base 256"
    assert_error(invoke("merge", art["base"], ft_resized, "-o", out), 1, message, out)
    assert_error(invoke("diff", art["base"], ft_resized, "-o", f"{out}.diff", "--dense"), 1, "model.embed_tokens.weight", f"{out}.diff")
    assert_error(invoke("diff", resized, art["ft"], "-o", f"{out}.diff", "--dense"), 1, "model.embed_tokens.weight", f"{out}.diff")
    # A head saved with the adapter (modules_to_save) for the old vocabulary.
    head = edited_adapter(
        art["lora-trained"],
        tmp_path / "with-head",
        tensors=lambda t: _set(t, P + "lm_head.weight", torch.zeros(256, 64)),
        config=lambda c: _set(c, "modules_to_save", ["lm_head"]),
    )
    assert_error(invoke("check", resized, head), 1, "a resized vocabulary", on_stdout=True)


# -- NaN and Inf in merge inputs -------------------------------------------------------------------


def test_non_finite_values_anywhere_in_a_merge_are_refused(art, tmp_path):
    out = tmp_path / "out"

    def poison(value):
        return lambda sd: sd[Q + ".weight"].view(-1).__setitem__(5, value)

    nan_ft = _perturbed(art["base"], str(tmp_path / "nan-ft"), change=poison(float("nan")))
    assert_error(invoke("merge", art["base"], nan_ft, "-o", out), 1, f"NaN or Inf in '{Q}.weight'", out)
    inf_base = _perturbed(art["base"], str(tmp_path / "inf-base"), scale=0.0, change=poison(float("inf")))
    assert_error(invoke("merge", inf_base, art["lora-trained"], "-o", out), 1, f"NaN or Inf in '{Q}.weight'", out)
    for weight in ("nan", "inf", "-inf"):
        assert_error(invoke("merge", art["base"], art["task.diff"], "--weights", weight, "-o", out), 2, "not a finite number", out)


def test_a_weight_beyond_float32_is_a_clean_error(art, tmp_path):
    out = tmp_path / "out"
    result = invoke("merge", art["base"], art["task.diff"], "--weights", "1e40", "-o", out)
    assert result.exit_code in (1, 2)
    assert_error(result, result.exit_code, "1e+40" if result.exit_code == 2 else "NaN or Inf", out)


# -- training data -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.jsonl", "", "no examples"),
        ("blank.jsonl", "\n\n  \n", "no examples"),
        ("header-only.tsv", "text\tlabel\n", "no examples"),
        ("broken.jsonl", '{"text": "w1 w2"}\n{"text": \n', ":2: not valid JSON"),
        ("list.jsonl", '{"text": "w1"}\n[1, 2]\n', ":2: each line must be a JSON object"),
        ("list-text.jsonl", '{"text": ["w1"]}\n', ":1: field 'text' must be a string or number"),
        ("ragged.csv", "text,label\nw1 w2,a\nw3\n", ":3: 1 fields, expected 2"),
        ("missing.jsonl", '{"text": "w1"}\n{"txt": "w2"}\n', ":2: missing field 'text' or 'sentence'"),
        ("binary.jsonl", "\udcff\udcfe", "not UTF-8 text"),
        ("absent.jsonl", None, "absent.jsonl"),
    ],
)
def test_malformed_training_data_writes_nothing_into_the_run(art, tmp_path, name, content, message):
    data = tmp_path / name
    if content is not None:
        data.write_bytes(content.encode("utf-8", "surrogateescape"))
    run = copy_dir(art["lora"], tmp_path / "run")
    before = {n: open(os.path.join(run, n), "rb").read() for n in os.listdir(run)}
    result = invoke("train", run, "--model", art["base"], "--data", data, "--steps", "1", "--quiet")
    assert_error(result, 1, message)
    assert {n: open(os.path.join(run, n), "rb").read() for n in os.listdir(run)} == before
    evaluation = invoke("train", run, "--model", art["base"], "--data", art["data"], "--eval", data, "--steps", "1", "--quiet")
    assert_error(evaluation, 1, message)
    assert {n: open(os.path.join(run, n), "rb").read() for n in os.listdir(run)} == before


def test_a_dataset_of_empty_texts_is_refused(art, tmp_path):
    data = tmp_path / "empty-texts.jsonl"
    data.write_text('{"text": ""}\n' * 4)
    run = copy_dir(art["lora"], tmp_path / "run")
    result = invoke("train", run, "--model", art["base"], "--data", data, "--steps", "1", "--quiet")
    assert_error(result, 1, "empty-texts.jsonl", os.path.join(run, "train_args.json"), os.path.join(run, "metrics.jsonl"))


# -- outputs ---------------------------------------------------------------------------------------


def _writers(art) -> dict[str, tuple[list, str]]:
    """Every writing command: its arguments before -o, and what its output is named like."""
    return {
        "inject": (["inject", "lora", art["base"]], ""),
        "merge": (["merge", art["base"], art["lora-trained"]], ""),
        "diff": (["diff", art["base"], art["ft"], "--dense"], ".diff"),
        "combine": (["combine", art["task.diff"], "--op", "scale", "--by", "2"], ".diff"),
        "convert-to-diff": (["convert", art["lora-trained"], "--to", "diff", "--dense", "--base", art["base"]], ".diff"),
        "convert-to-lora": (["convert", art["task.diff"], "--to", "lora", "--rank", "2", "--base", art["base"]], ""),
    }


WRITERS = ("inject", "merge", "diff", "combine", "convert-to-diff", "convert-to-lora")


def _snapshot(path: str) -> dict[str, bytes]:
    if os.path.isfile(path):
        return {"": open(path, "rb").read()}
    return {n: open(os.path.join(path, n), "rb").read() for n in sorted(os.listdir(path)) if os.path.isfile(os.path.join(path, n))}


@pytest.mark.parametrize(
    "command, spelling",
    [
        ("inject", "base"),
        ("inject", "base/"),
        ("merge", "lora-trained"),
        ("merge", "base/./"),
        ("merge", "link-to-base"),
        ("convert-to-diff", "link-to-lora-trained.diff"),
        ("convert-to-diff", "link-to-base.diff"),
        ("convert-to-lora", "task.diff"),
        ("convert-to-lora", "base"),
        ("combine", "link-to-task.diff"),
    ],
)
def test_an_output_that_is_an_input_is_refused_however_it_is_spelled(art, tmp_path, command, spelling):
    args, _ = _writers(art)[command]
    name = spelling.split("/")[0]
    linked = name[len("link-to-") :].removesuffix(".diff") if name.startswith("link-to-") else None
    target = art[linked if linked in art else f"{linked}.diff"] if linked else art[name]
    if linked:
        os.symlink(target, tmp_path / name)
        out = str(tmp_path / name)
    else:
        out = target + spelling[len(name) :]
    before = _snapshot(target)
    assert_error(invoke(*args, "-o", out, "--force"), 2, "would overwrite the input")
    assert _snapshot(target) == before


@pytest.mark.parametrize("command", WRITERS)
def test_an_existing_output_needs_force(art, tmp_path, command):
    args, suffix = _writers(art)[command]
    out = str(tmp_path / f"existing{suffix}")
    with open(out, "w") as f:
        f.write("keep me")
    assert_error(invoke(*args, "-o", out), 2, "already exists")
    assert open(out).read() == "keep me" and temporaries(tmp_path) == []
    inside_a_file = os.path.join(out, f"out{suffix}")
    assert_error(invoke(*args, "-o", inside_a_file, "--force"), 2, "which is a file")


@pytest.mark.parametrize("command", WRITERS)
def test_a_read_only_output_directory_is_a_resource_error(art, tmp_path, command):
    args, suffix = _writers(art)[command]
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, stat.S_IRUSR | stat.S_IXUSR)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("this user (root?) can write into a read-only directory")
        out = locked / f"out{suffix}"
        assert_error(invoke(*args, "-o", out), 3, "cannot write", out)
        assert os.listdir(locked) == []
    finally:
        os.chmod(locked, stat.S_IRWXU)


# -- pickles ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pickles(art, tmp_path_factory):
    root = tmp_path_factory.mktemp("pickles")
    with open_checkpoint(art["base"]) as ckpt:
        sd = {n: ckpt.get(n) for n in ckpt}
    base = root / "base"
    base.mkdir()
    torch.save(sd, str(base / "pytorch_model.bin"))
    shutil.copyfile(os.path.join(art["base"], "config.json"), str(base / "config.json"))
    adapter = copy_dir(art["lora-trained"], root / "adapter")
    weights = os.path.join(adapter, "adapter_model.safetensors")
    torch.save(dict(read_adapter(adapter).tensors), os.path.join(adapter, "adapter_model.bin"))
    os.unlink(weights)
    fake_diff = str(root / "pickled.diff")
    torch.save({"w": torch.zeros(2)}, fake_diff)
    ft = str(root / "ft.bin")
    torch.save(sd, ft)
    return {"base": str(base), "adapter": adapter, "diff": fake_diff, "ft": ft}


def test_pickles_are_refused_without_allow_pickle_by_every_command(art, pickles, tmp_path):
    out = tmp_path / "out"
    flag = "--allow-pickle"
    for args, message, outputs in [
        (["inject", "lora", pickles["base"], "-o", out], flag, [out]),
        (["merge", pickles["base"], art["lora-trained"], "-o", out], flag, [out]),
        (["merge", art["base"], pickles["ft"], "-o", out], flag, [out]),
        (["diff", pickles["base"], art["ft"], "-o", f"{out}.diff", "--dense"], flag, [f"{out}.diff"]),
        (["check", pickles["base"], art["lora"]], flag, []),
        (["convert", art["lora-trained"], "--to", "diff", "--dense", "--base", pickles["base"], "-o", f"{out}.diff"], flag, [f"{out}.diff"]),
        (["merge", art["base"], pickles["adapter"], "-o", out], "adapter weights are a pickle", [out]),
        (["convert", pickles["adapter"], "--to", "diff", "--dense", "--base", art["base"], "-o", f"{out}.diff"], "adapter weights are a pickle", [f"{out}.diff"]),
        (["train", pickles["adapter"], "--model", art["base"], "--data", art["data"], "--steps", "1"], "adapter weights are a pickle", []),
        (["inspect", pickles["diff"]], "pickle checkpoint, not safetensors", []),
        (["merge", art["base"], pickles["diff"], "-o", out], "pickle checkpoint, not safetensors", [out]),
        (["combine", pickles["diff"], "--op", "scale", "--by", "2", "-o", f"{out}.diff"], "pickle checkpoint, not safetensors", [f"{out}.diff"]),
    ]:
        assert_error(invoke(*args), 1, message, *outputs)
    result = invoke("check", art["base"], pickles["adapter"], pickles["diff"])
    assert_error(result, 1, "2 of 2 artifacts do not fit")
    assert "adapter weights are a pickle" in result.stdout and "pickle checkpoint, not safetensors" in result.stdout
    # With the flag, the same pickled base merges to the same weights as its safetensors twin.
    assert invoke("merge", pickles["base"], art["lora-trained"], "-o", out, "--allow-pickle").exit_code == 0
    assert invoke("merge", art["base"], art["lora-trained"], "-o", tmp_path / "ref").exit_code == 0
    with open_checkpoint(str(out)) as a, open_checkpoint(str(tmp_path / "ref")) as b:
        assert sorted(a) == sorted(b) and all(torch.equal(a.get(n), b.get(n)) for n in a)
    # convert takes the flag too, and its .diff is that of the safetensors twin.
    pickled_diff, ref_diff = tmp_path / "p.diff", tmp_path / "r.diff"
    assert invoke("convert", art["lora-trained"], "--to", "diff", "--dense", "--base", pickles["base"], "-o", pickled_diff, "--allow-pickle").exit_code == 0
    assert invoke("convert", art["lora-trained"], "--to", "diff", "--dense", "--base", art["base"], "-o", ref_diff).exit_code == 0
    from safetensors.torch import load_file

    a, b = load_file(str(pickled_diff)), load_file(str(ref_diff))
    assert sorted(a) == sorted(b) and all(torch.equal(a[n], b[n]) for n in a)


# -- faults: SIGKILL and a full disk -------------------------------------------------------------------

# Runs the CLI with every tensor write followed by a pause, so that a kill lands mid-write
# on a tiny model; the bytes written are the CLI's own.
SLOW_CLI = """
import sys, time
from peftcli.checkpoint import writer

def slowed(write):
    def slow(self, *args):
        result = write(self, *args)
        self._out.flush()
        time.sleep(0.05)
        return result
    return slow

for name in ("write", "write_partial"):
    if hasattr(writer.SafetensorsStreamWriter, name):
        setattr(writer.SafetensorsStreamWriter, name, slowed(getattr(writer.SafetensorsStreamWriter, name)))
from peftcli.cli import main
sys.argv = ["peftcli", *sys.argv[1:]]
main()
"""


def _kill_mid_write(args: list, parent: str) -> None:
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CLI, *map(str, args)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    try:
        while not temporaries(parent):
            assert proc.poll() is None, f"finished before writing began: {proc.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, "no temporary appeared"
            time.sleep(0.005)
        time.sleep(0.2)  # a few tensors in
        assert proc.poll() is None, "finished before it could be killed"
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize("command", ["merge", "diff"])
def test_sigkill_mid_write_leaves_no_output_and_the_rerun_gives_the_same_bytes(art, tmp_path, command):
    args, suffix = {
        "merge": (["merge", art["base"], art["lora-trained"], art["task.diff"]], ""),
        "diff": (["diff", art["base"], art["ft"], "--density", "0.1"], ".diff"),
    }[command]
    out = str(tmp_path / f"out{suffix}")
    full = [*args, "-o", out]
    assert invoke(*full).exit_code == 0
    reference = _snapshot(out)
    shutil.rmtree(out) if os.path.isdir(out) else os.unlink(out)

    _kill_mid_write(full, str(tmp_path))
    assert not os.path.lexists(out)
    left = temporaries(tmp_path)
    assert len(left) == 1 and left[0].startswith(f".out{suffix}")  # recognisable, for the next run to remove

    rerun = invoke(*full)
    assert rerun.exit_code == 0, rerun.stderr
    assert temporaries(tmp_path) == []
    assert _snapshot(out) == reference


class _FullDisk:
    """A file whose writes fail with ENOSPC once ``budget`` bytes (shared by every file) are written."""

    def __init__(self, f, budget: list[int]):
        self._f, self._budget = f, budget

    def write(self, data) -> int:
        n = memoryview(data).nbytes
        if n > self._budget[0]:
            raise OSError(errno.ENOSPC, "No space left on device")
        self._budget[0] -= n
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


@pytest.fixture
def full_disk(monkeypatch):
    """Call with a byte budget: every file peftcli opens for output then fails past it."""
    import peftcli.artifacts.adapter_dir as adapter_dir
    import peftcli.checkpoint.writer as writer

    real = atomic.open_new_file

    def install(budget: int) -> None:
        left = [budget]
        opener = lambda path: _FullDisk(real(path), left)  # noqa: E731
        for module in (atomic, writer, adapter_dir):
            monkeypatch.setattr(module, "open_new_file", opener)

    return install


@pytest.mark.parametrize("budget", [0, 3000])
@pytest.mark.parametrize("command", WRITERS)
def test_a_full_disk_is_exit_3_and_leaves_no_temporary(art, tmp_path, full_disk, command, budget):
    args, suffix = _writers(art)[command]
    out = tmp_path / f"out{suffix}"
    full_disk(budget)
    assert_error(invoke(*args, "-o", out), 3, "no space left on device", out)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("budget", [0, 3000])
def test_a_full_disk_during_training_is_exit_3_and_leaves_no_temporary(art, tmp_path, full_disk, budget):
    run = copy_dir(art["lora"], tmp_path / "run")
    before = _snapshot(run)
    full_disk(budget)
    result = invoke("train", run, "--model", art["base"], "--data", art["data"], "--steps", "2", "--save-every", "1", "--quiet")
    assert_error(result, 3, "no space left on device")
    assert temporaries(run) == [] and temporaries(os.path.join(run, "checkpoints")) == []
    assert {k: v for k, v in _snapshot(run).items() if k in before} == before  # φ untouched
