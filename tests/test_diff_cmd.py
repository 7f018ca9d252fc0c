"""``peftcli diff`` and ``peftcli.diffing.diff``: exact selection against brute-force references, apply, errors."""

from __future__ import annotations

import json
import os
from fractions import Fraction

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from peftcli.artifacts.sparse_diff import read_diff
from peftcli.checkpoint.reader import open_checkpoint
from peftcli.checkpoint.writer import save_state_dict
from peftcli.cli import PeftcliGroup
from peftcli.cli.diff_cmd import diff as diff_command
from peftcli.diffing import DiffOptions, apportion, diff


def _group():
    group = PeftcliGroup(name="peftcli")
    group.add_command(diff_command)
    return group


def run(*args):
    return CliRunner().invoke(_group(), ["diff", *map(str, args)])


def _one_line_error(result, code):
    assert result.exit_code == code, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def _load(path):
    return load_file(path if path.endswith((".safetensors", ".diff")) else os.path.join(path, "model.safetensors"))


@pytest.fixture(scope="module")
def llama_pair(tiny_llama, tmp_path_factory):
    """tiny_llama and a fine-tuned copy: a few tensors scaled entry-wise by (1 + u), |u| ≤ 0.3.

    Scaling keeps θ_ft within a factor 2 of θ₀, so φ = θ_ft − θ₀ is exact in fp32 (Sterbenz) and
    θ₀ + φ must give θ_ft back bit for bit. Untouched tensors have φ = 0: many ties at zero.
    """
    sd = _load(tiny_llama)
    g = torch.Generator().manual_seed(0)
    for name in (
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
        "model.norm.weight",
        "lm_head.weight",
    ):
        sd[name] = sd[name] * (1 + 0.6 * (torch.rand(sd[name].shape, generator=g) - 0.5))
    rows = sd["model.embed_tokens.weight"]
    rows[3:10] = rows[3:10] * 1.25
    ft = str(tmp_path_factory.mktemp("ft") / "llama-ft")
    save_state_dict(sd, ft, source_dir=tiny_llama)
    return tiny_llama, ft


def _reference_global(base, ft, names, k):
    """Brute force: the first k of all |φ| (fp32) ordered by magnitude down, then tensor, then index."""
    b, f = _load(base), _load(ft)
    mags = [np.abs(f[n].float().numpy().reshape(-1) - b[n].float().numpy().reshape(-1)) for n in names]
    flat = np.concatenate(mags)
    order = np.lexsort((np.arange(flat.size), -flat))[:k]
    offsets = np.cumsum([0] + [m.size for m in mags])
    return {n: np.sort(order[(order >= offsets[i]) & (order < offsets[i + 1])] - offsets[i]) for i, n in enumerate(names)}


def _reference_per_tensor(base, ft, names, k):
    b, f = _load(base), _load(ft)
    sizes = [b[n].numel() for n in names]
    n_total = sum(sizes)
    quotas = [Fraction(k * s, n_total) for s in sizes]
    shares = [int(q) for q in quotas]  # floor, then the largest fractional parts, earlier first
    for i in sorted(range(len(names)), key=lambda i: (-(quotas[i] - shares[i]), i))[: k - sum(shares)]:
        shares[i] += 1
    out = {}
    for n, share in zip(names, shares):
        mag = np.abs(f[n].float().numpy().reshape(-1) - b[n].float().numpy().reshape(-1))
        out[n] = np.sort(np.lexsort((np.arange(mag.size), -mag))[:share])
    return out


def _assert_selection(out, doc, reference):
    """The diff at ``out`` (with its --json report ``doc``) keeps exactly ``reference``'s entries."""
    rows = {t["name"]: t for t in doc["tensors"]}
    with read_diff(out) as d:
        for name, want in reference.items():
            assert rows[name]["kept"] == len(want), name
            idx, val = d.get(name)
            if idx is not None:
                assert np.array_equal(idx.long().numpy(), want), name
            else:  # stored dense because that is smaller: φ is zero outside the kept entries
                assert set(np.nonzero(val.reshape(-1).numpy())[0]) <= set(want.tolist()), name


def _json_run(*args):
    result = run(*args, "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def _matrices(path):
    return sorted(n for n, t in _load(path).items() if t.dim() >= 2 and t.is_floating_point())


# -- exact selection -----------------------------------------------------------------------------


def test_global_density_is_exact_and_matches_brute_force(llama_pair, tmp_path):
    base, ft = llama_pair
    out = str(tmp_path / "task.diff")
    result = run(base, ft, "-o", out, "--density", "0.01", "--json")
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""  # no progress bar off a terminal
    doc = json.loads(result.stdout)
    names = _matrices(base)
    n = sum(_load(base)[m].numel() for m in names)
    k = round(0.01 * n)
    assert (doc["k"], doc["n"], doc["density"]) == (k, n, k / n)
    assert doc["bytes"] == os.path.getsize(out) and sum(t["kept"] for t in doc["tensors"] if not t["whole"]) == k
    assert set(doc["dense_tensors"]) == {t for t, v in _load(base).items() if v.dim() == 1}
    _assert_selection(out, doc, _reference_global(base, ft, names, k))
    with read_diff(out) as d:
        assert float(d.ckpt.metadata["density"]) == k / n and d.method == "magnitude"


def test_top_k_reaching_into_the_zeros_breaks_ties_by_tensor_then_index(llama_pair, tmp_path):
    base, ft = llama_pair
    names = _matrices(base)
    b, f = _load(base), _load(ft)
    nonzero = sum(int((f[n] != b[n]).sum()) for n in names)
    k = nonzero + 1000  # and 1000 of the φ = 0 entries, which all tie
    out = str(tmp_path / "k.diff")
    doc = _json_run(base, ft, "-o", out, "--top-k", k)
    assert doc["k"] == k
    reference = _reference_global(base, ft, names, k)
    # The zeros taken are the first ones of the first tensor that has any: the embedding's rows 0-2.
    assert reference["model.embed_tokens.weight"][:192].tolist() == list(range(192))
    _assert_selection(out, doc, reference)


def _tie_pair(tmp_path, dtype):
    """φ ∈ {0, ±1/4, ±1/2, ±1}, exact in every float dtype: the cut falls inside groups of equal |φ|."""
    g = torch.Generator().manual_seed(7)
    shapes = {"a.weight": (50, 40), "b.weight": (30, 30), "c.weight": (20, 25), "c.bias": (25,)}
    base = {n: (torch.randint(-8, 8, s, generator=g) / 8).to(dtype) for n, s in shapes.items()}
    steps = torch.tensor([0.0, 0.25, -0.25, 0.5, -0.5, 1.0, -1.0])
    ft = {n: (t.float() + steps[torch.randint(0, 7, t.shape, generator=g)]).to(dtype) for n, t in base.items()}
    save_state_dict(base, str(tmp_path / "base.safetensors"))
    save_state_dict(ft, str(tmp_path / "ft.safetensors"))
    return str(tmp_path / "base.safetensors"), str(tmp_path / "ft.safetensors"), ["a.weight", "b.weight", "c.weight"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_tensor", [False, True])
def test_many_ties_global_and_per_tensor_against_brute_force(tmp_path, dtype, per_tensor):
    base, ft, names = _tie_pair(tmp_path, dtype)
    b, f = _load(base), _load(ft)
    mags = torch.cat([(f[n].float() - b[n].float()).abs().reshape(-1) for n in names])
    k = int((mags == 1).sum()) // 2 + 1  # the cut falls inside the group with |φ| = 1
    flags = ["--per-tensor"] if per_tensor else []
    out1, out2 = str(tmp_path / "one.diff"), str(tmp_path / "two.diff")
    doc = _json_run(base, ft, "-o", out1, "--top-k", k, *flags)
    _json_run(base, ft, "-o", out2, "--top-k", k, *flags)
    assert open(out1, "rb").read() == open(out2, "rb").read()  # byte-for-byte reproducible
    assert doc["dense_tensors"] == ["c.bias"] and all(t["stored"] == "sparse" for t in doc["tensors"] if not t["whole"])
    _assert_selection(out1, doc, (_reference_per_tensor if per_tensor else _reference_global)(base, ft, names, k))


@pytest.mark.parametrize("which", ["one", "all"])
def test_keeping_one_or_every_entry(tmp_path, which):
    base, ft, names = _tie_pair(tmp_path, torch.float32)
    n = sum(_load(base)[m].numel() for m in names)
    k = 1 if which == "one" else n
    out = str(tmp_path / "x.diff")
    doc = _json_run(base, ft, "-o", out, "--top-k", k)
    assert doc["k"] == k and doc["n"] == n
    _assert_selection(out, doc, _reference_global(base, ft, names, k))


def test_only_1d_tensors_need_sparse_small_or_dense(tmp_path):
    save_state_dict({"b": torch.zeros(4)}, str(tmp_path / "b.safetensors"))
    save_state_dict({"b": torch.ones(4)}, str(tmp_path / "f.safetensors"))
    line = _one_line_error(
        run(tmp_path / "b.safetensors", tmp_path / "f.safetensors", "-o", tmp_path / "x.diff", "--top-k", 1), 2
    )
    assert "no tensor with two or more dimensions" in line
    doc = _json_run(
        tmp_path / "b.safetensors", tmp_path / "f.safetensors", "-o", tmp_path / "x.diff", "--top-k", 1, "--sparse-small"
    )
    assert doc["k"] == 1 and doc["tensors"][0]["kept"] == 1


def test_per_tensor_density_apportions_k_exactly(llama_pair, tmp_path):
    base, ft = llama_pair
    out = str(tmp_path / "pt.diff")
    doc = _json_run(base, ft, "-o", out, "--density", "0.05", "--per-tensor")
    names = _matrices(base)
    n = sum(_load(base)[m].numel() for m in names)
    assert doc["k"] == round(0.05 * n) and doc["selection"] == "per-tensor"
    _assert_selection(out, doc, _reference_per_tensor(base, ft, names, doc["k"]))


def test_apportion_is_exact_and_proportional():
    assert apportion(10, [1, 1, 1]) == [4, 3, 3]  # equal remainders: the earlier tensor first
    assert apportion(7, [100, 300, 600]) == [1, 2, 4]
    assert sum(apportion(12345, [17, 4096, 999, 1])) == 12345


def test_sparse_small_selects_from_1d_tensors(llama_pair, tmp_path):
    base, ft = llama_pair
    out = str(tmp_path / "small.diff")
    doc = _json_run(base, ft, "-o", out, "--density", "0.02", "--sparse-small")
    covered = sorted(n for n, t in _load(base).items() if t.is_floating_point())
    assert doc["dense_tensors"] == [] and doc["n"] == sum(_load(base)[n].numel() for n in covered)
    reference = _reference_global(base, ft, covered, doc["k"])
    assert any(len(reference[n]) for n in covered if _load(base)[n].dim() == 1)  # a norm made the cut
    _assert_selection(out, doc, reference)


# -- applying ------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags", [["--density", "0.01"], ["--top-k", "2000", "--per-tensor"], ["--dense"]])
def test_applying_gives_finetuned_at_kept_entries_and_base_elsewhere(llama_pair, tmp_path, flags):
    base, ft = llama_pair
    out = str(tmp_path / "apply.diff")
    assert run(base, ft, "-o", out, *flags).exit_code == 0
    b, f = _load(base), _load(ft)
    with read_diff(out) as d:
        assert d.method == ("full" if "--dense" in flags else "magnitude")
        for name in d.names:
            applied = d.apply_to(name, b[name])
            idx, _ = d.get(name)
            if idx is None:  # dense: everything is the fine-tuned value
                assert torch.equal(applied, f[name]), name
                continue
            mask = torch.zeros(b[name].numel(), dtype=torch.bool)
            mask[idx.long()] = True
            flat_a, flat_b, flat_f = applied.reshape(-1), b[name].reshape(-1), f[name].reshape(-1)
            assert torch.equal(flat_a[mask], flat_f[mask]) and torch.equal(flat_a[~mask], flat_b[~mask]), name


@pytest.mark.parametrize("values", ["fp32", "base"])
def test_bf16_checkpoint_values_fp32_are_exact_and_base_dtype_is_close(tmp_path, values):
    g = torch.Generator().manual_seed(2)
    base = {"w": torch.randn(40, 30, generator=g).bfloat16(), "v": torch.randn(30, 20, generator=g).bfloat16()}
    ft = {n: (t.float() + 0.05 * torch.randn(t.shape, generator=g)).bfloat16() for n, t in base.items()}
    save_state_dict(base, str(tmp_path / "b.safetensors"))
    save_state_dict(ft, str(tmp_path / "f.safetensors"))
    out = str(tmp_path / "bf.diff")
    assert (
        run(tmp_path / "b.safetensors", tmp_path / "f.safetensors", "-o", out, "--dense", "--values", values).exit_code == 0
    )
    assert {t.dtype for t in load_file(out).values()} == {torch.float32 if values == "fp32" else torch.bfloat16}
    with read_diff(out) as d:
        for name in base:
            applied = d.apply_to(name, base[name])
            assert applied.dtype == torch.bfloat16
            if values == "fp32":  # bf16 differences are exact in fp32
                assert torch.equal(applied, ft[name])
            else:  # φ rounded to bf16 (8 significant bits), then the sum rounded to bf16 again
                phi = ft[name].float() - base[name].float()
                bound = 2.0**-7 * (phi.abs() + ft[name].float().abs())
                assert bool(((applied.float() - ft[name].float()).abs() <= bound).all())


def test_fp32_dense_is_within_rounding_when_the_difference_is_inexact(tmp_path):
    # Sign changes and large relative changes make θ_ft − θ₀ inexact in fp32: θ₀ + φ is then off by
    # at most the rounding of φ and of the sum, 2**-24 of each.
    g = torch.Generator().manual_seed(4)
    base = {"w": torch.randn(64, 64, generator=g) * 0.02}
    ft = {"w": torch.randn(64, 64, generator=g) * 0.02}  # unrelated values: the worst case
    save_state_dict(base, str(tmp_path / "b.safetensors"))
    save_state_dict(ft, str(tmp_path / "f.safetensors"))
    out = str(tmp_path / "full.diff")
    assert run(tmp_path / "b.safetensors", tmp_path / "f.safetensors", "-o", out, "--dense").exit_code == 0
    with read_diff(out) as d:
        applied = d.apply_to("w", base["w"])
    phi = ft["w"].double() - base["w"].double()
    error = (applied.double() - ft["w"].double()).abs()
    assert bool((error <= 2.0**-24 * (phi.abs() + ft["w"].double().abs()) * 1.001).all())
    assert not torch.equal(applied, ft["w"])  # so exactness needs an exact difference (see llama_pair)


# -- errors --------------------------------------------------------------------------------------


def _variant(tmp_path, base, change, name="variant"):
    sd = _load(base)
    change(sd)
    out = str(tmp_path / name)
    save_state_dict(sd, out)
    return out


def test_mismatched_checkpoints_list_the_differences(llama_pair, tmp_path):
    base, _ = llama_pair

    def change(sd):
        sd.pop("model.norm.weight")
        sd["extra.weight"] = torch.zeros(2, 2)
        sd["lm_head.weight"] = sd["lm_head.weight"][:-1].clone()
        sd["model.layers.0.mlp.up_proj.weight"] = sd["model.layers.0.mlp.up_proj.weight"].half()

    other = _variant(tmp_path, base, change)
    line = _one_line_error(run(base, other, "-o", tmp_path / "x.diff", "--density", "0.1"), 1)
    assert "do not have the same tensors: 4 differences" in line and "'extra.weight' only in" in line
    assert "'lm_head.weight' is F32[256, 64]" in line and "F32[255, 64]" in line and "and 1 more" in line
    assert not os.path.exists(tmp_path / "x.diff")


def test_non_float_tensor_that_changed_is_an_error(tmp_path):
    base = {"w": torch.ones(4, 4), "ids": torch.arange(4)}
    save_state_dict(base, str(tmp_path / "b.safetensors"))
    save_state_dict({"w": torch.ones(4, 4) * 1.5, "ids": torch.arange(4)}, str(tmp_path / "same.safetensors"))
    save_state_dict({"w": torch.ones(4, 4), "ids": torch.arange(4) + 1}, str(tmp_path / "ids.safetensors"))
    doc = json.loads(
        run(
            tmp_path / "b.safetensors", tmp_path / "same.safetensors", "-o", tmp_path / "ok.diff", "--dense", "--json"
        ).stdout
    )
    assert doc["skipped"] == ["ids"] and [t["name"] for t in doc["tensors"]] == ["w"]
    line = _one_line_error(
        run(tmp_path / "b.safetensors", tmp_path / "ids.safetensors", "-o", tmp_path / "x.diff", "--dense"), 1
    )
    assert "'ids' (I64) differs from the base" in line


def test_nan_in_finetuned_is_an_error(tmp_path):
    save_state_dict({"w": torch.ones(4, 4)}, str(tmp_path / "b.safetensors"))
    bad = torch.ones(4, 4)
    bad[1, 2] = float("nan")
    save_state_dict({"w": bad}, str(tmp_path / "f.safetensors"))
    for flags in (["--density", "0.5"], ["--dense"]):
        line = _one_line_error(
            run(tmp_path / "b.safetensors", tmp_path / "f.safetensors", "-o", tmp_path / "x.diff", *flags), 1
        )
        assert "'w'" in line and "not finite at 1 of 16 entries" in line
        assert not os.path.exists(tmp_path / "x.diff")


@pytest.mark.parametrize(
    "flags, expected",
    [
        ([], "exactly one of --density, --top-k or --dense"),
        (["--density", "0.1", "--dense"], "(got --density and --dense)"),
        (["--density", "0.1", "--top-k", "5"], "(got --density and --top-k)"),
        (["--density", "0"], "--density must be in (0, 1]"),
        (["--density", "1.5"], "--density must be in (0, 1]"),
        (["--density", "1e-9"], "keeps no entry"),
        (["--top-k", "0"], "--top-k must be at least 1"),
        (["--top-k", "99999999"], "is more than the"),
        (["--dense", "--per-tensor"], "only apply with --density or --top-k"),
        (["--dense", "--values", "fp16"], "--values must be one of base, fp32"),
    ],
)
def test_usage_errors_exit_2(llama_pair, tmp_path, flags, expected):
    base, ft = llama_pair
    line = _one_line_error(run(base, ft, "-o", tmp_path / "x.diff", *flags), 2)
    assert expected in line


def test_output_rules(llama_pair, tmp_path):
    base, ft = llama_pair
    existing = tmp_path / "exists.diff"
    existing.write_bytes(b"keep me")
    assert "already exists" in _one_line_error(run(base, ft, "-o", existing, "--dense"), 2)
    assert existing.read_bytes() == b"keep me"
    assert run(base, ft, "-o", existing, "--dense", "--force").exit_code == 0
    assert ".diff file" in _one_line_error(run(base, ft, "-o", tmp_path / "x.safetensors", "--dense"), 2)
    # A finetuned checkpoint that is itself a .diff-named file cannot be the output.
    ft_file = str(tmp_path / "ft.diff")
    save_state_dict(_load(ft), ft_file)
    assert "would overwrite the input" in _one_line_error(run(base, ft_file, "-o", ft_file, "--dense", "--force"), 2)


def test_pickle_inputs_need_the_flag(llama_pair, tmp_path):
    base, ft = llama_pair
    pickled = tmp_path / "ft-bin"
    pickled.mkdir()
    torch.save(_load(ft), str(pickled / "pytorch_model.bin"))
    assert "can run code" in _one_line_error(run(base, pickled, "-o", tmp_path / "p.diff", "--density", "0.01"), 1)
    result = run(base, pickled, "-o", tmp_path / "p.diff", "--density", "0.01", "--allow-pickle")
    assert result.exit_code == 0, result.stderr
    assert run(base, ft, "-o", tmp_path / "s.diff", "--density", "0.01").exit_code == 0
    assert all(
        torch.equal(a, b)
        for a, b in zip(load_file(str(tmp_path / "p.diff")).values(), load_file(str(tmp_path / "s.diff")).values())
    )


# -- the API and the report ----------------------------------------------------------------------


def test_api_reports_progress_per_phase_and_provenance(llama_pair, tmp_path):
    base, ft = llama_pair
    calls = []
    report = diff(base, ft, str(tmp_path / "api.diff"), DiffOptions(top_k=500), progress=lambda *a: calls.append(a))
    phases = list(dict.fromkeys(p for p, _, _ in calls))
    assert phases[-3:] == ["pass 1/3: histogram of |φ|", "pass 2/3: exact threshold", "pass 3/3: writing"]
    for phase in phases:
        done = [d for p, d, _ in calls if p == phase]
        assert done == sorted(done) and done[-1] == next(t for p, _, t in calls if p == phase)
    assert report.k == 500
    with read_diff(str(tmp_path / "api.diff")) as d:
        prov = d.provenance
        with open_checkpoint(base) as b:
            assert d.fingerprint.tensors == {n: [i.dtype, list(i.shape)] for n, i in sorted(b.tensors.items())}
    import hashlib

    assert prov["inputs"] == {"base": os.path.relpath(base, tmp_path), "finetuned": os.path.relpath(ft, tmp_path)}
    want = hashlib.sha256(open(os.path.join(ft, "model.safetensors"), "rb").read()).hexdigest()
    assert prov["input_hashes"]["finetuned"] == {"model.safetensors": want}
    assert prov["options"]["top_k"] == 500 and prov["tool"] == "peftcli"


def test_text_report(llama_pair, tmp_path):
    base, ft = llama_pair
    result = run(base, ft, "-o", tmp_path / "t.diff", "--density", "0.01")
    assert result.exit_code == 0 and result.stderr == ""
    assert "magnitude (global)" in result.stdout and "wrote" in result.stdout and "t.diff" in result.stdout


def test_help_has_the_examples():
    result = run("--help")
    assert result.exit_code == 0 and "peftcli diff base/ finetuned/ -o task.diff --density 0.01" in result.stdout
