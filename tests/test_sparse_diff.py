"""The .diff format: round trips, the reference safetensors library, corrupt files, fingerprints, describe."""

from __future__ import annotations

import hashlib
import json
import math
import os

import click
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file

from peftcli.artifacts import sparse_diff
from peftcli.artifacts.sparse_diff import DiffEntry, DiffMetadata, check_base, describe, index_dtype, read_diff, write_diff
from peftcli.checkpoint.fingerprint import Fingerprint, content_hash, file_sha256, structure_hash, tensor_table
from peftcli.checkpoint.reader import open_checkpoint
from peftcli.checkpoint.writer import save_state_dict
from peftcli.cli import PeftcliGroup
from peftcli.errors import BadInputError

DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _base(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "layer.weight": torch.randn(6, 10, generator=g).to(dtype),  # sparse: 7 of 60 kept
        "layer.bias": torch.randn(10, generator=g).to(dtype),  # whole
        "mostly.weight": torch.randn(4, 5, generator=g).to(dtype),  # 15 of 20 kept: dense is smaller
        "ids": torch.arange(3),  # not covered
    }


def _phi(base, seed=1):
    """Sorted indices and values per covered tensor: what a diff of ``base`` holds."""
    g = torch.Generator().manual_seed(seed)
    w, m = base["layer.weight"], base["mostly.weight"]
    return {
        "layer.weight": (torch.randperm(w.numel(), generator=g)[:7].sort().values, torch.randn(7, generator=g)),
        "layer.bias": (None, torch.randn(10, generator=g)),
        "mostly.weight": (torch.randperm(m.numel(), generator=g)[:15].sort().values, torch.randn(15, generator=g)),
    }


def _write(tmp_path, base, phi, values="base", name="t.diff"):
    base_path = str(tmp_path / "base.safetensors")
    if not os.path.exists(base_path):
        save_state_dict(base, base_path)
    with open_checkpoint(base_path) as ckpt:
        fp = Fingerprint.of(ckpt, list(phi))
    entries = []
    for tname in sorted(phi):
        idx, val = phi[tname]
        t = base[tname]
        kept = t.numel() if idx is None else idx.numel()
        entries.append(DiffEntry(tname, _dtype_name(t), tuple(t.shape), kept, lambda p=phi[tname]: p, whole=idx is None))
    out = str(tmp_path / name)
    stored = write_diff(out, entries, DiffMetadata("magnitude", fp, {"test": True}), values=values)
    return out, base_path, stored


def _dtype_name(t):
    return {v: k for k, v in DTYPES.items()}[t.dtype]


# -- round trips ---------------------------------------------------------------------------------


@pytest.mark.parametrize("values", ["base", "fp32"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_round_trip_every_float_dtype(tmp_path, dtype, values):
    base = _base(DTYPES[dtype])
    phi = _phi(base)
    out, base_path, _ = _write(tmp_path, base, phi, values)
    vdtype = torch.float32 if values == "fp32" else DTYPES[dtype]
    # The reference library reads the container; names, dtypes and values are as specified.
    ref = load_file(out)
    assert set(ref) == {"layer.weight.idx", "layer.weight.val", "layer.bias", "mostly.weight"}
    assert ref["layer.weight.idx"].dtype == torch.int32 and ref["layer.weight.val"].dtype == vdtype
    assert torch.equal(ref["layer.weight.idx"].long(), phi["layer.weight"][0])
    assert torch.equal(ref["layer.weight.val"], phi["layer.weight"][1].to(vdtype))
    assert ref["layer.bias"].dtype == vdtype and torch.equal(ref["layer.bias"], phi["layer.bias"][1].to(vdtype))
    dense = torch.zeros(20, dtype=vdtype)
    dense[phi["mostly.weight"][0]] = phi["mostly.weight"][1].to(vdtype)
    assert torch.equal(ref["mostly.weight"], dense.view(4, 5))
    with safe_open(out, framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "peftcli.sparse-diff" and meta["version"] == "1" and meta["method"] == "magnitude"
    assert json.loads(meta["shapes"]) == {n: [dtype, list(base[n].shape)] for n in phi}
    assert json.loads(meta["dense_tensors"]) == ["layer.bias"]
    assert float(meta["density"]) == (7 + 15) / (60 + 20)  # the whole bias is left out

    with read_diff(out) as d:
        assert d.names == sorted(phi) and d.method == "magnitude" and d.dense_tensors == ["layer.bias"]
        assert not d.is_dense("layer.weight") and d.is_dense("mostly.weight") and d.is_dense("layer.bias")
        idx, val = d.get("layer.weight")
        assert torch.equal(idx.long(), phi["layer.weight"][0]) and torch.equal(val, phi["layer.weight"][1].to(vdtype))
        for name in phi:  # apply, against a reference in fp32 by index_add
            b = base[name]
            i, v = phi[name]
            ref_sum = b.float().reshape(-1).clone()
            if i is None:
                ref_sum += v.to(vdtype).float()
            else:
                ref_sum.index_add_(0, i, v.to(vdtype).float())
            assert torch.equal(d.apply_to(name, b), ref_sum.view(b.shape).to(b.dtype)), name


def test_index_dtype_switches_to_int64_at_2_pow_31():
    assert index_dtype(1) == "I32" and index_dtype(2**31 - 1) == "I32"
    assert index_dtype(2**31) == "I64" and index_dtype(2**40) == "I64"
    # Dense-or-sparse sizing counts 8 bytes per index there: a 2**31-element F32 tensor with a third
    # of its entries is sparse with I32 indices (8 bytes per entry) but dense with I64 (12 bytes).
    n = 2**31
    assert sparse_diff.stored_dense(n, n // 3 + 1, False, "F32")
    assert not sparse_diff.stored_dense(n - 1, n // 3 + 1, False, "F32")


def test_int64_indices_round_trip(tmp_path, monkeypatch):
    monkeypatch.setattr(sparse_diff, "index_dtype", lambda numel: "I64")  # as for a tensor of ≥ 2**31 elements
    base = _base()
    phi = _phi(base)
    out, _, _ = _write(tmp_path, base, phi)
    monkeypatch.undo()
    assert load_file(out)["layer.weight.idx"].dtype == torch.int64
    with read_diff(out) as d:
        idx, _ = d.get("layer.weight")
        assert idx.dtype == torch.int64 and torch.equal(idx, phi["layer.weight"][0])


def test_dense_when_smaller_follows_the_byte_counts(tmp_path):
    # F32 values, I32 indices: sparse costs 8 bytes per kept entry, dense 4 per element.
    assert sparse_diff.stored_dense(20, 10, False, "F32") and not sparse_diff.stored_dense(20, 9, False, "F32")
    # BF16 values: 6 bytes per kept entry against 2 per element.
    assert sparse_diff.stored_dense(30, 10, False, "BF16") and not sparse_diff.stored_dense(30, 9, False, "BF16")
    assert sparse_diff.stored_dense(10, 10, True, "F32")  # whole tensors are always dense


def test_written_bytes_are_deterministic(tmp_path):
    base = _base()
    a, _, _ = _write(tmp_path, base, _phi(base), name="a.diff")
    b, _, _ = _write(tmp_path, base, _phi(base), name="b.diff")
    assert open(a, "rb").read() == open(b, "rb").read()


def test_names_that_would_be_ambiguous_are_refused(tmp_path):
    base = {"w": torch.zeros(4, 4), "w.idx": torch.zeros(4, 4)}
    phi = {n: (torch.tensor([1, 2]), torch.ones(2)) for n in base}
    with pytest.raises(BadInputError, match="'w' and 'w.idx' cannot both be in a diff"):
        _write(tmp_path, base, phi)
    assert not os.path.exists(tmp_path / "t.diff")


# -- fingerprints --------------------------------------------------------------------------------


def test_fingerprint_hashes_match_their_definitions(tmp_path):
    base = _base(torch.bfloat16)
    single = str(tmp_path / "one.safetensors")
    save_state_dict(base, single)
    sharded = str(tmp_path / "sharded")
    save_state_dict(dict(reversed(list(base.items()))), sharded, max_shard_size="100B")
    rows = sorted([n, {torch.bfloat16: "BF16", torch.int64: "I64"}[t.dtype], list(t.shape)] for n, t in base.items())
    want_hash = hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()
    loaded = load_file(single)  # bytes from the reference library
    names = ["mostly.weight", "layer.weight"]
    want_content = hashlib.sha256(b"".join(loaded[n].view(torch.uint8).numpy().tobytes() for n in sorted(names))).hexdigest()
    for path in (single, sharded):  # the layout does not matter
        with open_checkpoint(path) as ckpt:
            fp = Fingerprint.of(ckpt, names)
            assert fp.hash == want_hash == structure_hash(tensor_table(ckpt))
            assert fp.content == want_content == content_hash(ckpt, reversed(names))
    assert file_sha256(single) == hashlib.sha256(open(single, "rb").read()).hexdigest()


def test_check_base_accepts_the_base_and_lists_differences(tmp_path):
    base = _base()
    out, base_path, _ = _write(tmp_path, base, _phi(base))
    other = dict(base)
    other["layer.weight"] = torch.zeros(6, 11)
    other["extra"] = torch.zeros(2)
    del other["ids"]
    other_path = str(tmp_path / "other.safetensors")
    save_state_dict(other, other_path)
    changed = {**base, "mostly.weight": base["mostly.weight"] + 1}
    changed_path = str(tmp_path / "changed.safetensors")
    save_state_dict(changed, changed_path)
    with read_diff(out) as d:
        with open_checkpoint(base_path) as b:
            check_base(d, b, content=True)
        with open_checkpoint(other_path) as b, pytest.raises(BadInputError) as err:
            check_base(d, b)
        msg = err.value.one_line()
        assert "3 differences" in msg and "'extra' only in" in msg and "'ids' only in the fingerprint" in msg
        assert "F32[6, 10] in the fingerprint but F32[6, 11]" in msg
        with open_checkpoint(changed_path) as b:
            check_base(d, b)  # same names and shapes
            with pytest.raises(BadInputError, match="bytes differ"):
                check_base(d, b, content=True)


# -- corrupt files -------------------------------------------------------------------------------


def _tamper(tmp_path, change):
    """A valid diff, then ``change(tensors, metadata)`` applied and written back as safetensors."""
    base = _base()
    out, base_path, _ = _write(tmp_path, base, _phi(base))
    tensors = load_file(out)
    with safe_open(out, framework="pt") as f:
        meta = f.metadata()
    change(tensors, meta)
    bad = str(tmp_path / "bad.diff")
    save_state_dict(tensors, bad, metadata=meta)
    return bad, base_path


def _set(d, key, value):
    d[key] = value


def _edit_fingerprint(tensors, meta):
    fp = json.loads(meta["base_fingerprint"])
    fp["tensors"]["layer.weight"] = ["F32", [60]]  # without recomputing its hash
    meta["base_fingerprint"] = json.dumps(fp)


def _fingerprint_disagreeing_with_shapes(tensors, meta):
    fp = json.loads(meta["base_fingerprint"])
    fp["tensors"]["layer.weight"] = ["F32", [60]]
    fp["hash"] = structure_hash(fp["tensors"])
    meta["base_fingerprint"] = json.dumps(fp)


CORRUPTIONS = {
    "index out of range": (lambda t, m: t["layer.weight.idx"].__setitem__(-1, 60), "out of range"),
    "negative index": (lambda t, m: t["layer.weight.idx"].__setitem__(0, -1), "out of range"),
    "unsorted indices": (lambda t, m: _set(t, "layer.weight.idx", t["layer.weight.idx"].flip(0).contiguous()), "unsorted"),
    "duplicate index": (lambda t, m: t["layer.weight.idx"].__setitem__(1, int(t["layer.weight.idx"][0])), "duplicate"),
    "idx/val length mismatch": (
        lambda t, m: _set(t, "layer.weight.val", t["layer.weight.val"][:-1].clone()),
        "7 indices but 6 values",
    ),
    "missing val": (lambda t, m: t.pop("layer.weight.val"), "has no matching 'layer.weight.val'"),
    "missing idx": (lambda t, m: t.pop("layer.weight.idx"), "has no matching 'layer.weight.idx'"),
    "missing tensor": (
        lambda t, m: [t.pop("layer.weight.idx"), t.pop("layer.weight.val")],
        "recorded in the metadata but missing",
    ),
    "extra tensor": (lambda t, m: _set(t, "stray", torch.zeros(2)), "'stray' is not accounted for"),
    "dense shape": (lambda t, m: _set(t, "mostly.weight", torch.zeros(5, 4)), "shape [5, 4], recorded [4, 5]"),
    "float indices": (lambda t, m: _set(t, "layer.weight.idx", t["layer.weight.idx"].float()), "must be 1-D I32 or I64"),
    "both forms": (lambda t, m: _set(t, "layer.weight", torch.zeros(6, 10)), "both dense and as"),
    "no format": (lambda t, m: m.pop("format"), "not a peftcli sparse diff"),
    "no version": (lambda t, m: m.pop("version"), "without a 'version'"),
    "future version": (lambda t, m: _set(m, "version", "2"), "version '2' is not supported"),
    "no shapes": (lambda t, m: m.pop("shapes"), "without 'shapes'"),
    "no fingerprint": (lambda t, m: m.pop("base_fingerprint"), "without 'base_fingerprint'"),
    "no method": (lambda t, m: m.pop("method"), "without 'method'"),
    "bad density": (lambda t, m: _set(m, "density", "1.5"), "density '1.5'"),
    "shapes not JSON": (lambda t, m: _set(m, "shapes", "{"), "'shapes' is not valid JSON"),
    "edited fingerprint": (_edit_fingerprint, "hash does not match its tensor list"),
    "fingerprint vs shapes": (
        _fingerprint_disagreeing_with_shapes,
        "is F32[6, 10] in 'shapes' but F32[60] in base_fingerprint",
    ),
}


def _verify_group():
    """A group with a command that reads a diff fully, as inspect and apply will: the CLI's error contract."""

    @click.command()
    @click.argument("path")
    @click.option("--base")
    def verify(path, base):
        with read_diff(path) as d:
            d.validate()
            if base:
                with open_checkpoint(base) as b:
                    check_base(d, b, content=True)

    group = PeftcliGroup(name="peftcli")
    group.add_command(verify)
    return group


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupt_diff_is_one_line_error(tmp_path, case):
    change, expected = CORRUPTIONS[case]
    bad, _ = _tamper(tmp_path, change)
    with pytest.raises(BadInputError) as err:
        with read_diff(bad) as d:
            d.validate()
    assert expected in err.value.message and bad in err.value.message
    result = CliRunner().invoke(_verify_group(), ["verify", bad])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr


def test_wrong_base_is_one_line_error(tmp_path):
    base = _base()
    out, _, _ = _write(tmp_path, base, _phi(base))
    other = str(tmp_path / "other.safetensors")
    save_state_dict(_base(seed=5), other)  # same names and shapes, other values
    result = CliRunner().invoke(_verify_group(), ["verify", out, "--base", other])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "bytes differ" in lines[0]
    smaller = str(tmp_path / "smaller.safetensors")
    save_state_dict({k: v for k, v in base.items() if k != "layer.bias"}, smaller)
    result = CliRunner().invoke(_verify_group(), ["verify", out, "--base", smaller])
    assert result.exit_code == 1 and "'layer.bias' only in the fingerprint" in result.stderr


def test_a_checkpoint_is_not_a_diff(tmp_path):
    path = str(tmp_path / "plain.safetensors")
    save_state_dict(_base(), path)
    with pytest.raises(BadInputError, match="not a peftcli sparse diff .*format='pt'"):
        read_diff(path)


# -- describe ------------------------------------------------------------------------------------


def test_describe_reports_densities_fingerprint_and_largest_norms(tmp_path):
    g = torch.Generator().manual_seed(3)
    base = {f"t{i:02d}.weight": torch.randn(8, 8, generator=g) for i in range(12)}
    phi = {
        n: (torch.arange(0, 64, 4 + i % 3), torch.full((len(range(0, 64, 4 + i % 3)),), float(i + 1)))
        for i, n in enumerate(base)
    }
    out, _, _ = _write(tmp_path, base, phi)
    with open_checkpoint(out) as ckpt:
        desc = describe(ckpt)
    assert desc["method"] == "magnitude" and desc["version"] == "1" and desc["num_tensors"] == 12
    kept = sum(len(i) for i, _ in phi.values())
    assert desc["density"] == pytest.approx(kept / (12 * 64)) and desc["covered_params"] == 12 * 64
    for row in desc["tensors"]:
        i, v = phi[row["name"]]
        assert row["stored"] == "sparse" and row["entries"] == row["nonzero"] == len(i)
        assert row["density"] == len(i) / 64 and row["norm"] == pytest.approx(math.sqrt(sum(x * x for x in v.tolist())))
    norms = {n: math.sqrt(sum(x * x for x in v.tolist())) for n, (_, v) in phi.items()}
    assert [r["name"] for r in desc["largest"]] == sorted(norms, key=lambda n: -norms[n])[:10]
    with open_checkpoint(str(tmp_path / "base.safetensors")) as b:
        assert desc["base_fingerprint"] == {
            "num_tensors": 12,
            "hash": structure_hash(tensor_table(b)),
            "content": content_hash(b, base),
        }
    assert desc["provenance"] == {"test": True}
