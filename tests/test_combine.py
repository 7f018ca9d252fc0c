"""``peftcli combine`` and ``peftcli.combining.combine``: against a dense reference, storage, metadata, errors."""

from __future__ import annotations

import hashlib
import json
import math
import os

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from peftcli.artifacts.sparse_diff import DiffEntry, DiffMetadata, read_diff, write_diff
from peftcli.checkpoint.fingerprint import Fingerprint
from peftcli.checkpoint.reader import open_checkpoint
from peftcli.checkpoint.writer import save_state_dict
from peftcli.cli import PeftcliGroup
from peftcli.cli.combine_cmd import combine as combine_command
from peftcli.combining import combine
from peftcli.diffing import DiffOptions, diff
from peftcli.errors import BadInputError, UsageError
from tests.helpers import scaled_copy

TORCH = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
NBYTES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}


def run(*args):
    group = PeftcliGroup(name="peftcli")
    group.add_command(combine_command)
    return CliRunner().invoke(group, ["combine", *map(str, args)])


def _one_line_error(result, code):
    assert result.exit_code == code, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


# -- an independent reading of the format: safetensors + the metadata, densified by hand ---------


def dense(path: str) -> dict[str, tuple[str, torch.Tensor]]:
    """{covered tensor: (stored value dtype, flat φ)}: what applying the diff to zeros gives."""
    out = {}
    with safe_open(path, framework="pt") as f:
        shapes = json.loads(f.metadata()["shapes"])
        stored = set(f.keys())
        for name, (_, shape) in shapes.items():
            if name in stored:
                t = f.get_tensor(name).reshape(-1)
            else:
                val = f.get_tensor(name + ".val")
                t = torch.zeros(math.prod(shape), dtype=val.dtype)
                t[f.get_tensor(name + ".idx").long()] = val
            out[name] = (str(t.dtype), t)
    return out


def metadata(path: str) -> dict:
    with safe_open(path, framework="pt") as f:
        return f.metadata()


def reference(inputs: list[str], coeffs: list[float], value_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Σ cᵢ·φᵢ computed densely: fp32 (fp64 for F64 tensors) in input order, cast once."""
    ds = [dense(p) for p in inputs]
    shapes = [json.loads(metadata(p)["shapes"]) for p in inputs]
    out = {}
    for name in sorted({n for s in shapes for n in s}):
        base_dtype = next(s[name][0] for s in shapes if name in s)
        work = torch.float64 if base_dtype == "F64" else torch.float32
        acc = torch.zeros(math.prod(next(s[name][1] for s in shapes if name in s)), dtype=work)
        for d, c in zip(ds, coeffs):
            if name in d:
                acc = acc + d[name][1].to(work) * torch.tensor(c, dtype=work)
        out[name] = acc.to(value_dtype or TORCH[base_dtype])
    return out


def assert_matches(out: str, ref: dict[str, torch.Tensor]) -> None:
    got = dense(out)
    assert sorted(got) == sorted(ref)
    for name, r in ref.items():
        assert got[name][1].dtype == r.dtype, name
        assert torch.equal(got[name][1], r), name


# -- fixtures ------------------------------------------------------------------------------------




@pytest.fixture(scope="module")
def diffs(tiny_llama, tmp_path_factory):
    """Three diffs of tiny_llama with overlapping changed tensors; c is stored dense (--dense)."""
    root = tmp_path_factory.mktemp("combine")
    q, v, d = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight", "model.layers.0.mlp.down_proj.weight"
    ft_a = scaled_copy(tiny_llama, str(root / "ft-a"), {q: 0.4, v: 0.2, "model.norm.weight": 0.3}, 1)
    ft_b = scaled_copy(tiny_llama, str(root / "ft-b"), {q: 0.3, d: 0.5}, 2)
    ft_c = scaled_copy(tiny_llama, str(root / "ft-c"), {v: 0.5, "model.layers.0.input_layernorm.weight": 0.2}, 3)
    a, b, c = (str(root / f"{x}.diff") for x in "abc")
    diff(tiny_llama, ft_a, a, DiffOptions(density=0.02))
    diff(tiny_llama, ft_b, b, DiffOptions(top_k=900, per_tensor=True))
    diff(tiny_llama, ft_c, c, DiffOptions(dense=True))
    return {"a": a, "b": b, "c": c, "root": root, "base": tiny_llama}


# -- arithmetic against the dense reference ------------------------------------------------------


@pytest.mark.parametrize(
    "names, weights",
    [("ab", None), ("ab", [1.0, 0.5]), ("abc", [0.3, -1.7, 2.0]), ("ac", None), ("aa", [0.1, 0.2])],
)
def test_add_matches_the_dense_reference(diffs, tmp_path, names, weights):
    inputs = [diffs[n] for n in names]
    out = str(tmp_path / "sum.diff")
    report = combine(inputs, "add", out, weights=weights)
    ref = reference(inputs, weights or [1.0] * len(inputs))
    assert_matches(out, ref)
    # Kept: exactly the nonzero entries of selected tensors; whole tensors keep every entry.
    whole = set(json.loads(metadata(out)["dense_tensors"]))
    with read_diff(out) as d:
        for name in d.names:
            idx, val = d.get(name)
            if name in whole:
                assert idx is None
            elif idx is not None:
                assert torch.equal(idx.long(), ref[name].nonzero().view(-1)), name
    assert report.k == sum(int(ref[n].count_nonzero()) for n in ref if n not in whole)


def test_scale_by_two_and_subtract(diffs, tmp_path):
    a, b = diffs["a"], diffs["b"]
    combine([a], "scale", str(tmp_path / "2a.diff"), by=2.0)
    assert_matches(str(tmp_path / "2a.diff"), reference([a], [2.0]))
    combine([a, b], "subtract", str(tmp_path / "a-b.diff"))
    assert_matches(str(tmp_path / "a-b.diff"), reference([a, b], [1.0, -1.0]))


def test_a_plus_minus_a_is_empty(diffs, tmp_path):
    a = diffs["a"]
    neg = str(tmp_path / "neg.diff")
    combine([a], "scale", neg, by=-1)
    for args, op in (([a, neg], "add"), ([a, a], "subtract")):
        out = str(tmp_path / f"{op}.diff")
        report = combine(args, op, out)
        assert report.k == 0
        meta = metadata(out)
        assert float(meta["density"]) == 0.0
        assert sorted(json.loads(meta["shapes"])) == sorted(json.loads(metadata(a)["shapes"]))  # same coverage
        assert all(not t.any() for _, t in dense(out).values())  # whole tensors stay whole, all zero
        with safe_open(out, framework="pt") as f:  # selected tensors hold no entry at all
            assert all(f.get_slice(k).get_shape() == [0] for k in f.keys() if k.endswith(".idx"))


def test_storage_follows_the_smaller_form(diffs, tmp_path):
    """a (sparse) + c (every tensor dense): each output tensor is dense iff that takes no more bytes."""
    out = str(tmp_path / "ac.diff")
    combine([diffs["a"], diffs["c"]], "add", out)
    meta = metadata(out)
    shapes, whole = json.loads(meta["shapes"]), set(json.loads(meta["dense_tensors"]))
    whole_a, whole_c = (set(json.loads(metadata(diffs[x])["dense_tensors"])) for x in "ac")
    assert whole_a and not whole_c and whole == whole_a & whole_c  # whole only where every input has it whole
    ref = reference([diffs["a"], diffs["c"]], [1.0, 1.0])
    with safe_open(out, framework="pt") as f:
        keys = set(f.keys())
    for name, (dtype, shape) in shapes.items():
        numel, kept = math.prod(shape), int(ref[name].count_nonzero())
        index_bytes = 4 if numel < 2**31 else 8
        expect_dense = name in whole or numel * NBYTES[dtype] <= kept * (index_bytes + NBYTES[dtype])
        assert (name in keys) == expect_dense, name


def test_partial_coverage_counts_as_zero_and_density_is_exact(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(8, 16, generator=g), "u": torch.randn(4, 4, generator=g), "b": torch.randn(16, generator=g)}
    base_path = str(tmp_path / "base.safetensors")
    save_state_dict(base, base_path)

    def write(name, phi, whole=()):
        with open_checkpoint(base_path) as ckpt:
            fp = Fingerprint.of(ckpt, list(phi))
        entries = [
            DiffEntry(n, "F32", tuple(base[n].shape), base[n].numel() if i is None else i.numel(), lambda p=(i, v): p, whole=n in whole)
            for n, (i, v) in sorted(phi.items())
        ]
        write_diff(str(tmp_path / name), entries, DiffMetadata("magnitude", fp, {}))
        return str(tmp_path / name)

    x = write("x.diff", {"w": (torch.tensor([1, 5, 9]), torch.tensor([1.0, 2.0, 3.0])), "b": (None, torch.ones(16))}, whole={"b"})
    y = write("y.diff", {"w": (torch.tensor([5, 7]), torch.tensor([-2.0, 4.0])), "u": (torch.tensor([0]), torch.tensor([0.5]))})
    out = str(tmp_path / "xy.diff")
    combine([x, y], "add", out)
    ref = reference([x, y], [1.0, 1.0])
    assert_matches(out, ref)
    meta = metadata(out)
    # b is whole only in x, so it stays whole; w: {1, 5, 7, 9} less index 5 (2 − 2 = 0); u: {0}.
    assert json.loads(meta["dense_tensors"]) == ["b"]
    assert float(meta["density"]) == (3 + 1) / (128 + 16)
    assert json.loads(meta["base_fingerprint"])["content"] is None  # x and y cover different tensors


def test_value_dtypes_and_fp64(tmp_path):
    """F16/BF16/F64 tensors: fp32 values win over base-dtype values; F64 sums in fp64."""
    g = torch.Generator().manual_seed(0)
    base = {
        "h": torch.randn(6, 40, generator=g).half(),
        "bf": torch.randn(6, 40, generator=g).bfloat16(),
        "d": torch.randn(6, 40, generator=g).double(),
    }
    base_path = str(tmp_path / "base.safetensors")
    save_state_dict(base, base_path)
    ft = scaled_copy(base_path, str(tmp_path / "ft.safetensors"), {"h": 0.5, "bf": 0.5, "d": 0.5}, 1)
    ft2 = scaled_copy(base_path, str(tmp_path / "ft2.safetensors"), {"h": 0.3, "bf": 0.3, "d": 0.3}, 2)
    p = str(tmp_path / "p.diff")
    q = str(tmp_path / "q.diff")
    diff(base_path, ft, p, DiffOptions(density=0.3, values="fp32"))
    diff(base_path, ft2, q, DiffOptions(density=0.3))
    out = str(tmp_path / "pq.diff")
    assert combine([p, q], "add", out, weights=[0.7, 0.3]).values == "fp32"
    assert_matches(out, reference([p, q], [0.7, 0.3], torch.float32))  # d: summed in fp64, stored as F32
    base_out = str(tmp_path / "qq.diff")
    assert combine([q, q], "add", base_out, weights=[0.7, 0.3]).values == "base"
    assert_matches(base_out, reference([q, q], [0.7, 0.3]))


def test_overflowing_the_value_dtype_is_refused(tmp_path):
    base = {"h": torch.zeros(4, 4, dtype=torch.float16)}
    base_path = str(tmp_path / "base.safetensors")
    save_state_dict(base, base_path)
    save_state_dict({"h": torch.full((4, 4), 60000.0, dtype=torch.float16)}, str(tmp_path / "ft.safetensors"))
    p = str(tmp_path / "p.diff")
    diff(base_path, str(tmp_path / "ft.safetensors"), p, DiffOptions(dense=True))
    with pytest.raises(BadInputError, match="overflows F16 at 16 of 16"):
        combine([p], "scale", str(tmp_path / "x.diff"), by=2)
    combine([p], "scale", str(tmp_path / "x.diff"), by=2, values="fp32")
    assert torch.equal(dense(str(tmp_path / "x.diff"))["h"][1], torch.full((16,), 120000.0))


def test_nan_in_an_input_is_refused_naming_it(diffs, tmp_path):
    with safe_open(diffs["a"], framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    key = next(k for k in tensors if k.endswith(".val") and tensors[k].numel())
    tensors[key][0] = float("nan")
    bad = str(tmp_path / "bad.diff")
    save_state_dict(tensors, bad, metadata=meta)
    with pytest.raises(BadInputError, match="NaN or Inf") as err:
        combine([diffs["b"], bad], "add", str(tmp_path / "x.diff"))
    assert bad in err.value.message


# -- metadata and determinism --------------------------------------------------------------------


def test_metadata_and_provenance(diffs, tmp_path):
    a, b = diffs["a"], diffs["b"]
    out = str(tmp_path / "ab.diff")
    report = combine([a, b], "add", out, weights=[1.0, 0.5])
    meta = metadata(out)
    assert meta["method"] == "combined"
    ref = reference([a, b], [1.0, 0.5])
    whole = set(json.loads(meta["dense_tensors"]))
    shapes = json.loads(meta["shapes"])
    k = sum(int(ref[n].count_nonzero()) for n in ref if n not in whole)
    n = sum(math.prod(shapes[x][1]) for x in shapes if x not in whole)
    assert float(meta["density"]) == k / n == report.to_json()["density"]
    fp, fp_a = json.loads(meta["base_fingerprint"]), json.loads(metadata(a)["base_fingerprint"])
    assert fp == fp_a  # the same covered tensors in a and b, so the content hash is kept too
    prov = json.loads(meta["provenance"])
    assert prov["command"] == "combine"
    # relative to the diff's directory: the same combine made elsewhere has the same bytes
    assert prov["inputs"] == {"input1": os.path.relpath(a, tmp_path), "input2": os.path.relpath(b, tmp_path)}
    for role, path in (("input1", a), ("input2", b)):
        with open(path, "rb") as f:
            assert prov["input_hashes"][role] == {os.path.basename(path): hashlib.sha256(f.read()).hexdigest()}
    assert prov["options"] == {"op": "add", "by": None, "weights": [1.0, 0.5], "coefficients": [1.0, 0.5]}


def test_reruns_are_byte_identical(diffs, tmp_path):
    args = [diffs["a"], diffs["b"], diffs["c"]]
    outs = [str(tmp_path / f"{i}.diff") for i in range(2)]
    for out in outs:
        combine(args, "add", out, weights=[1, -0.25, 3])
    combine(args, "add", outs[0], weights=[1, -0.25, 3], force=True)
    with open(outs[0], "rb") as f0, open(outs[1], "rb") as f1:
        assert f0.read() == f1.read()


# -- errors --------------------------------------------------------------------------------------


def test_diffs_of_different_bases_are_refused(diffs, tiny_bert, tmp_path):
    ft = scaled_copy(tiny_bert, str(tmp_path / "bert-ft"), {"encoder.layer.0.attention.self.query.weight": 0.3}, 1)
    other = str(tmp_path / "bert.diff")
    diff(tiny_bert, ft, other, DiffOptions(density=0.1))
    line = _one_line_error(run(diffs["a"], other, "--op", "add", "-o", tmp_path / "x.diff"), 1)
    assert "were made from different bases" in line and diffs["a"] in line and other in line
    assert not os.path.exists(tmp_path / "x.diff")


def test_same_shapes_other_values_are_refused(diffs, tmp_path):
    """A base with the same tensors but other values: the content hashes differ."""
    base2 = scaled_copy(diffs["base"], str(tmp_path / "base2"), {"model.layers.0.self_attn.k_proj.weight": 0.1}, 9)
    ft = scaled_copy(base2, str(tmp_path / "ft"), {"model.layers.0.self_attn.q_proj.weight": 0.3}, 1)
    other = str(tmp_path / "other.diff")
    diff(base2, ft, other, DiffOptions(density=0.02))
    with pytest.raises(BadInputError, match="same tensors but different values"):
        combine([diffs["a"], other], "add", str(tmp_path / "x.diff"))


def test_outputs_that_replace_inputs_or_exist(diffs, tmp_path):
    a, b = diffs["a"], diffs["b"]
    assert "would overwrite the input" in _one_line_error(run(a, b, "--op", "add", "-o", a), 2)
    assert "would overwrite the input" in _one_line_error(run(a, b, "--op", "add", "-o", a, "--force"), 2)
    out = tmp_path / "x.diff"
    out.write_bytes(b"keep")
    assert "already exists" in _one_line_error(run(a, b, "--op", "add", "-o", out), 2)
    assert out.read_bytes() == b"keep"
    result = run(a, b, "--op", "add", "-o", out, "--force")
    assert result.exit_code == 0, result.stderr
    assert_matches(str(out), reference([a, b], [1.0, 1.0]))


@pytest.mark.parametrize(
    "args, message",
    [
        (["A", "--op", "add"], "--op add takes two or more inputs"),
        (["A", "B", "--op", "scale", "--by", "2"], "--op scale takes one input"),
        (["A", "--op", "scale"], "--op scale needs --by"),
        (["A", "B", "--op", "subtract", "--weights", "1,2"], "--weights only applies to --op add"),
        (["A", "B", "B", "--op", "subtract"], "--op subtract takes two inputs"),
        (["A", "B", "--op", "add", "--weights", "1"], "--weights gives 1 weights for 2 inputs"),
        (["A", "B", "--op", "add", "--weights", "1,x"], "--weights must be comma-separated numbers"),
        (["A", "B", "--op", "add", "--by", "2"], "--by only applies to --op scale"),
        (["A", "--op", "scale", "--by", "nan"], "--by must be finite"),
        (["A", "B", "--op", "add", "--weights", "1,inf"], "--weights must be finite"),
        (["A", "B", "--op", "multiply"], "'multiply' is not one of"),
    ],
)
def test_usage_errors(diffs, tmp_path, args, message):
    args = [diffs["a"] if x == "A" else diffs["b"] if x == "B" else x for x in args]
    assert message in _one_line_error(run(*args, "-o", tmp_path / "x.diff"), 2)


def test_output_must_be_a_diff(diffs, tmp_path):
    with pytest.raises(UsageError, match="must be a .diff file"):
        combine([diffs["a"], diffs["b"]], "add", str(tmp_path / "x.safetensors"))


def test_cli_json_report_describes_the_file(diffs, tmp_path):
    out = tmp_path / "x.diff"
    result = run(diffs["a"], "--op", "scale", "--by", "-1", "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["schema"] == "peftcli.combine/1" and doc["coefficients"] == [-1.0]
    assert doc["bytes"] == os.path.getsize(out)
    assert_matches(str(out), reference([diffs["a"]], [-1.0]))
    shapes = json.loads(metadata(str(out))["shapes"])
    assert [t["name"] for t in doc["tensors"]] == sorted(shapes)
    text = run(diffs["a"], diffs["b"], "--op", "add", "-o", tmp_path / "y.diff")
    assert text.exit_code == 0 and "wrote" in text.stdout
