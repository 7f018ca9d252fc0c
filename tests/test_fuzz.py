"""Property-based fuzzing: mutated checkpoints, adapter directories and ``.diff`` files never crash peftcli.

Valid artifacts of a tiny Llama are mutated (bit flips, truncation, inserted and deleted bytes,
edits to the header JSON and to the JSON inside a diff's metadata, overwritten tensor elements,
edits to ``adapter_config.json``) and then read through the Python API and the CLI (inspect,
check, merge into a temporary directory). Every outcome must be success or a
``PeftcliError`` — on the CLI exit 0, or exit 1/2/3 with one ``error:`` line, no traceback, and
nothing left at the output path — never another exception.

Profiles (``HYPOTHESIS_PROFILE``): ``ci`` (the default: 150 cases, the same on every run, about
20 s) and ``long`` (13,000 new cases each run, about 10 minutes on 2 cores, for a soak:
``HYPOTHESIS_PROFILE=long nice -n 10 python -m pytest -q tests/test_fuzz.py``).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from peftcli.artifacts.adapter_dir import read_adapter
from peftcli.artifacts.sparse_diff import read_diff
from peftcli.checkpoint import atomic
from peftcli.checkpoint.fingerprint import structure_hash
from peftcli.checkpoint.reader import open_checkpoint
from peftcli.checkpoint.safetensors_format import DTYPES
from peftcli.cli import cli
from peftcli.errors import PeftcliError
from peftcli.summary import summarize

# Cases per test and profile: the long profile gives the cheaper properties more cases; its
# 13,000 cases take about 10 minutes on 2 busy cores.
CASES = {
    "checkpoint": {"ci": 30, "long": 2500},
    "model-config": {"ci": 30, "long": 1500},
    "adapter-weights": {"ci": 30, "long": 3000},
    "adapter-config": {"ci": 30, "long": 3000},
    "diff": {"ci": 30, "long": 3000},
}
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
if PROFILE not in ("ci", "long"):
    PROFILE = "ci"
settings.register_profile(
    "peftcli-fuzz",
    deadline=None,  # a loaded CI machine is slow, not wrong
    derandomize=PROFILE == "ci",  # CI sees the same cases on every run; the soak explores
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    print_blob=True,
)
# The soak runs for many minutes per property: pytest-timeout's per-test limit would cut it short.
pytestmark = pytest.mark.timeout(300 if PROFILE == "ci" else 7200)


def fuzz(kind: str):
    return settings(settings.get_profile("peftcli-fuzz"), max_examples=CASES[kind][PROFILE])


# -- the outcome contract ------------------------------------------------------------------------


def run_cli(*args, outputs=()) -> int:
    """Run the CLI; assert success or a clean one-line error that left nothing at ``outputs``."""
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if isinstance(result.exception, Exception) and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"{args[0]}: escaped {type(result.exception).__name__}: {result.exception}")
    text = result.stdout + result.stderr
    assert "Traceback" not in text and "internal error" not in text, (args[0], result.stderr[-3000:])
    assert result.exit_code in (0, 1, 2, 3), (args[0], result.exit_code, result.stderr[-2000:])
    if result.exit_code:
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (args[0], result.stderr[-2000:])
        for out in outputs:
            assert not os.path.lexists(out), f"{args[0]} failed but left {out}"
            parent = os.path.dirname(os.path.abspath(out))
            assert not [n for n in os.listdir(parent) if atomic.TEMP_MARK in n], f"{args[0]} left a temporary"
    return result.exit_code


def api(call) -> bool:
    """Run ``call``; True on success, False on a PeftcliError; anything else propagates (the failure)."""
    try:
        call()
    except PeftcliError:
        return False
    return True


# -- mutations -----------------------------------------------------------------------------------

JSON_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 2, 7, 2**31 - 1, 2**31, 2**63, 2**64, 10**400, -(10**400)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=10),
    st.sampled_from(["", "F32", "BF16", "I64", "F17", "LORA", "IA3", "PEFTCLI", "lora", "all-linear", "q_proj", "none", "1"]),
)
JSON_VALUES = st.recursive(
    JSON_LEAVES, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=5
)


def edit_json(data, obj):
    """One random edit somewhere in the JSON tree ``obj``: replace, delete, add or duplicate."""
    if isinstance(obj, (dict, list)) and obj and data.draw(st.integers(0, 3)) > 0:
        keys = list(obj) if isinstance(obj, dict) else list(range(len(obj)))
        key = keys[data.draw(st.integers(0, len(keys) - 1))]
        action = data.draw(st.sampled_from(["descend", "replace", "delete", "duplicate", "rename"]))
        if action == "descend":
            obj[key] = edit_json(data, obj[key])
        elif action == "replace":
            obj[key] = data.draw(JSON_VALUES)
        elif action == "delete":
            del obj[key]
        elif isinstance(obj, list):
            obj.insert(key, obj[key])
        else:
            obj[data.draw(st.text(max_size=8))] = obj.pop(key) if action == "rename" else obj[key]
        return obj
    if isinstance(obj, dict) and data.draw(st.booleans()):
        obj[data.draw(st.text(max_size=8))] = data.draw(JSON_VALUES)
        return obj
    return data.draw(JSON_VALUES)


def header_of(content: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", content[:8])
    return json.loads(content[8 : 8 + n]), content[8 + n :]


def with_header(header: dict, rest: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + rest


def mutate_bytes(data, content: bytes) -> bytes:
    """Bit flips, truncation, insertion, deletion or overwriting, mostly in the 8-byte prefix and header."""
    (n,) = struct.unpack("<Q", content[:8])
    limit = 8 + n if data.draw(st.integers(0, 3)) else len(content)
    b = bytearray(content)
    for _ in range(data.draw(st.integers(1, 3))):
        kind = data.draw(st.sampled_from(["flip", "truncate", "insert", "delete", "overwrite"]))
        pos = data.draw(st.integers(0, max(0, min(limit, len(b)) - 1)))
        if kind == "flip" and b:
            b[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "truncate":
            del b[pos:]
        elif kind == "insert":
            b[pos:pos] = data.draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del b[pos : pos + data.draw(st.integers(1, 16))]
        else:
            chunk = data.draw(st.binary(min_size=1, max_size=8))
            b[pos : pos + len(chunk)] = chunk
    return bytes(b)


def mutate_header(data, content: bytes) -> bytes:
    header, rest = header_of(content)
    return with_header(edit_json(data, header), rest)


def mutate_tensor_bytes(data, content: bytes) -> bytes:
    """Overwrite one element of one tensor: NaN/Inf or arbitrary bits (an index out of range, unsorted)."""
    header, rest = header_of(content)
    names = sorted(k for k in header if k != "__metadata__" and header[k]["data_offsets"][1] > header[k]["data_offsets"][0])
    assume(names)
    entry = header[data.draw(st.sampled_from(names))]
    size = max(1, DTYPES[entry["dtype"]][0] // 8)
    begin, end = entry["data_offsets"]
    pos = begin + size * data.draw(st.integers(0, (end - begin) // size - 1))
    special = {
        4: [struct.pack("<f", float("nan")), struct.pack("<f", float("-inf")), struct.pack("<i", -1), struct.pack("<i", 2**31 - 1)],
        2: [b"\x00\x7e", b"\x80\x7f", b"\xff\xff"],
        8: [struct.pack("<d", float("nan")), struct.pack("<q", -1)],
    }.get(size, [b"\xff" * size])
    value = data.draw(st.sampled_from(special) | st.binary(min_size=size, max_size=size))
    b = bytearray(rest)
    b[pos : pos + size] = value
    return with_header(header, bytes(b))


def mutate_metadata(data, content: bytes, rehash: bool) -> bytes:
    """Edit the JSON inside one ``__metadata__`` string (a diff's shapes, fingerprint, provenance...)."""
    header, rest = header_of(content)
    meta = header.get("__metadata__") or {}
    assume(meta)
    key = data.draw(st.sampled_from(sorted(meta)))
    try:
        inner = json.loads(meta[key])
    except ValueError:
        inner = meta[key]
    inner = edit_json(data, inner)
    if rehash and key == "base_fingerprint" and isinstance(inner, dict) and isinstance(inner.get("tensors"), dict):
        try:  # an edit that keeps the fingerprint self-consistent reaches the checks behind the hash
            inner["hash"] = structure_hash(inner["tensors"])
        except (TypeError, KeyError, IndexError, AttributeError):
            pass
    meta[key] = inner if isinstance(inner, str) and data.draw(st.booleans()) else json.dumps(inner)
    header["__metadata__"] = meta
    return with_header(header, rest)


def mutate_safetensors(data, content: bytes, metadata: bool = False) -> bytes:
    kinds = ["bytes", "header", "tensor"] + (["metadata", "metadata-rehashed"] if metadata else [])
    kind = data.draw(st.sampled_from(kinds))
    if kind == "bytes":
        return mutate_bytes(data, content)
    if kind == "header":
        return mutate_header(data, content)
    if kind == "tensor":
        return mutate_tensor_bytes(data, content)
    return mutate_metadata(data, content, rehash=kind == "metadata-rehashed")


# -- the valid artifacts ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def valid(tiny_llama, tmp_path_factory):
    import torch

    from peftcli.artifacts.adapter_dir import write_adapter
    from peftcli.checkpoint.writer import save_state_dict
    from peftcli.diffing import DiffOptions, diff
    from peftcli.injection import inject
    from peftcli.methods import METHODS

    root = tmp_path_factory.mktemp("fuzz")
    adapters = {}
    for name, method, options in [
        ("lora", "lora", {"rank": 2}),
        ("dora", "lora", {"rank": 2, "dora": True}),
        ("ia3", "ia3", {}),
        ("adapter", "adapter", {"bottleneck": 4}),
        ("layers", "layers", {"layers": "1", "modules": "mlp"}),
        ("prompt", "prompt", {"virtual_tokens": 2}),
    ]:
        inject(tiny_llama, method, METHODS[method].config_cls(**options), str(root / name))
        adapter = read_adapter(str(root / name))
        g = torch.Generator().manual_seed(len(adapters))
        tensors = {k: t + 0.05 * torch.randn(t.shape, generator=g) for k, t in adapter.tensors.items()}
        write_adapter(str(root / f"{name}-trained"), adapter.config, tensors)
        adapters[name] = str(root / f"{name}-trained")
    with open_checkpoint(tiny_llama) as ckpt:
        sd = {n: ckpt.get(n).clone() for n in ckpt}
    g = torch.Generator().manual_seed(5)
    for n in sd:
        sd[n] = sd[n] + 0.01 * torch.randn(sd[n].shape, generator=g)
    save_state_dict(sd, str(root / "ft"), source_dir=tiny_llama)
    diffs = {}
    for name, opts in [("top", DiffOptions(density=0.01)), ("per-tensor", DiffOptions(density=0.02, per_tensor=True))]:
        diff(tiny_llama, str(root / "ft"), str(root / f"{name}.diff"), opts)
        diffs[name] = str(root / f"{name}.diff")
    return {"base": tiny_llama, "adapters": adapters, "diffs": diffs}


def _workdir():
    return tempfile.TemporaryDirectory(prefix="peftcli-fuzz-")


# -- the properties --------------------------------------------------------------------------------


@fuzz("checkpoint")
@given(data=st.data())
def test_mutated_checkpoint_is_read_cleanly(valid, data):
    with _workdir() as tmp:
        base = os.path.join(tmp, "base")
        shutil.copytree(valid["base"], base)
        weights = os.path.join(base, "model.safetensors")
        content = open(weights, "rb").read()
        with open(weights, "wb") as f:
            f.write(mutate_safetensors(data, content))

        def read_all():
            with open_checkpoint(base) as ckpt:
                summarize(ckpt)
                for name in ckpt:
                    ckpt.get(name)

        api(read_all)
        run_cli("inspect", base, "--json")
        out = os.path.join(tmp, "merged")
        run_cli("merge", base, valid["adapters"]["lora"], "-o", out, outputs=[out])
        run_cli("check", base, valid["adapters"]["ia3"], valid["diffs"]["top"])


@fuzz("model-config")
@given(data=st.data())
def test_mutated_model_config_is_read_cleanly(valid, data):
    with _workdir() as tmp:
        base = os.path.join(tmp, "base")
        shutil.copytree(valid["base"], base)
        config_path = os.path.join(base, "config.json")
        config = json.load(open(config_path))
        for _ in range(data.draw(st.integers(1, 3))):
            config = edit_json(data, config)
        with open(config_path, "w") as f:
            json.dump(config, f)
        method = data.draw(st.sampled_from(["lora", "ia3", "adapter", "prefix", "prompt", "layers"]))
        budget = ["--budget", method] + (["--layers", "1"] if method == "layers" else [])
        run_cli("inspect", base, *budget)
        out = os.path.join(tmp, "out")
        run_cli("inject", method, base, "-o", out, *(["--layers", "1"] if method == "layers" else []), outputs=[out])
        adapter = valid["adapters"][data.draw(st.sampled_from(sorted(valid["adapters"])))]
        run_cli("check", base, adapter)
        run_cli("merge", base, adapter, "-o", os.path.join(tmp, "merged"), outputs=[os.path.join(tmp, "merged")])


@fuzz("adapter-weights")
@given(data=st.data())
def test_mutated_adapter_weights_are_read_cleanly(valid, data):
    with _workdir() as tmp:
        name = data.draw(st.sampled_from(sorted(valid["adapters"])))
        adapter = os.path.join(tmp, name)
        shutil.copytree(valid["adapters"][name], adapter)
        weights = os.path.join(adapter, "adapter_model.safetensors")
        content = open(weights, "rb").read()
        with open(weights, "wb") as f:
            f.write(mutate_safetensors(data, content, metadata=True))
        _use_adapter(valid, tmp, adapter)


@fuzz("adapter-config")
@given(data=st.data())
def test_mutated_adapter_config_is_read_cleanly(valid, data):
    with _workdir() as tmp:
        name = data.draw(st.sampled_from(sorted(valid["adapters"])))
        adapter = os.path.join(tmp, name)
        shutil.copytree(valid["adapters"][name], adapter)
        config_path = os.path.join(adapter, "adapter_config.json")
        if data.draw(st.integers(0, 9)) == 0:
            with open(config_path, "wb") as f:  # not JSON at all, or a prefix of it
                f.write(data.draw(st.binary(max_size=64)) or open(valid["adapters"][name] + "/adapter_config.json", "rb").read()[:10])
        else:
            config = json.load(open(config_path))
            for _ in range(data.draw(st.integers(1, 3))):
                config = edit_json(data, config)
            with open(config_path, "w") as f:
                json.dump(config, f)
        _use_adapter(valid, tmp, adapter)


def _use_adapter(valid, tmp: str, adapter: str) -> None:
    api(lambda: read_adapter(adapter))
    run_cli("inspect", adapter)
    run_cli("check", valid["base"], adapter)
    out = os.path.join(tmp, "merged")
    run_cli("merge", valid["base"], adapter, "-o", out, outputs=[out])


@fuzz("diff")
@given(data=st.data())
def test_mutated_diff_is_read_cleanly(valid, data):
    with _workdir() as tmp:
        name = data.draw(st.sampled_from(sorted(valid["diffs"])))
        path = os.path.join(tmp, f"{name}.diff")
        content = open(valid["diffs"][name], "rb").read()
        with open(path, "wb") as f:
            f.write(mutate_safetensors(data, content, metadata=True))

        def read_all():
            with read_diff(path) as d:
                d.validate()

        api(read_all)
        run_cli("inspect", path)
        run_cli("check", valid["base"], path, "--content")
        out = os.path.join(tmp, "merged")
        run_cli("merge", valid["base"], path, "-o", out, outputs=[out])
