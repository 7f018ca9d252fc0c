"""``peftcli check`` and ``peftcli.preflight.check``: what passes, what fails and why, against attaching for real."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from peftcli.attach import attach_adapter, load_base_model
from peftcli.checkpoint.fingerprint import structure_hash
from peftcli.checkpoint.reader import open_checkpoint
from peftcli.checkpoint.writer import save_state_dict
from peftcli.preflight import check
from peftcli.cli import PeftcliGroup
from peftcli.cli.check_cmd import check as check_command
from peftcli.diffing import DiffOptions, diff
from peftcli.errors import BadInputError
from peftcli.injection import inject
from peftcli.errors import UsageError
from peftcli.methods.adapter import BottleneckAdapterConfig
from peftcli.methods.bitfit import BitFitConfig
from peftcli.methods.ia3 import IA3Config
from peftcli.methods.layers import LayersConfig
from peftcli.methods.lora import LoraConfig
from peftcli.methods.prompting.prefix import PrefixTuningConfig
from peftcli.methods.prompting.prefix_cache import MLP_KEYS
from peftcli.methods.prompting.prompt import PromptTuningConfig
from tests.helpers import edited_adapter, scaled_copy

P = "base_model.model."
Q_KEY = P + "model.layers.0.self_attn.q_proj.lora_A.weight"


def run(*args):
    group = PeftcliGroup(name="peftcli")
    group.add_command(check_command)
    return CliRunner().invoke(group, ["check", *map(str, args)])


def _fails(result, expected_error):
    """Exit 1, the FAIL lines on stdout, and one error line on stderr."""
    assert result.exit_code == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected_error in lines[0], result.stderr
    return result.stdout


def _line(stdout: str, path) -> str:
    return next(line for line in stdout.splitlines() if line.startswith(f"{path}: "))


def _problems(doc: dict, path) -> list[str]:
    return [p["message"] for p in next(a for a in doc["artifacts"] if a["path"] == str(path))["problems"]]




def _edit_diff(src: str, out, change) -> str:
    with safe_open(src, framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    change(tensors, meta)
    save_state_dict(tensors, str(out), metadata=meta)
    return str(out)




@pytest.fixture(scope="module")
def art(tiny_llama, tiny_bert, tmp_path_factory):
    root = tmp_path_factory.mktemp("check")
    paths = {"root": root}
    inject(tiny_llama, "lora", LoraConfig(), str(root / "lora"))
    inject(tiny_llama, "ia3", IA3Config(), str(root / "ia3"))
    inject(tiny_llama, "prefix", PrefixTuningConfig(virtual_tokens=4, projection=16), str(root / "prefix"))
    inject(tiny_bert, "lora", LoraConfig(), str(root / "bert-lora"))
    ft = scaled_copy(tiny_llama, str(root / "ft"), {"model.layers.0.self_attn.q_proj.weight": 0.6}, seed=1)
    diff(tiny_llama, ft, str(root / "task.diff"), DiffOptions(density=0.05))
    for name in ("lora", "ia3", "prefix", "bert-lora", "task.diff"):
        paths[name] = str(root / name)
    return paths


def attaches(base: str, adapter: str, model_class: str | None = None) -> bool:
    """The reference verdict: does the module-level loader accept the adapter on this base?"""
    try:
        attach_adapter(load_base_model(base, model_class), adapter)
    except BadInputError:
        return False
    return True


# -- what passes ---------------------------------------------------------------------------------


def test_good_lora_ia3_and_diff_pass(tiny_llama, art):
    result = run(tiny_llama, art["lora"], art["ia3"], art["task.diff"])
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert result.stderr == ""
    assert _line(result.stdout, tiny_llama).startswith(f"{tiny_llama}: ok (base:")
    assert _line(result.stdout, art["lora"]) == f"{art['lora']}: ok (adapter: lora, 8 tensors)"
    assert _line(result.stdout, art["ia3"]).startswith(f"{art['ia3']}: ok (adapter: ia3")
    assert _line(result.stdout, art["task.diff"]).startswith(f"{art['task.diff']}: ok (diff: magnitude")
    *_, summary, plan = result.stdout.strip().splitlines()
    assert summary == f"the 3 artifacts fit {tiny_llama}"
    assert plan.startswith("merge (linear): changes ") and "peak memory ≈" in plan  # what merge would do
    doc = json.loads(run(tiny_llama, art["lora"], art["task.diff"], "--content", "--scan-base", "--json").stdout)
    assert doc["ok"] and doc["failed"] == 0 and doc["total"] == 2
    assert doc["base"]["embedding"] == "model.embed_tokens.weight" and doc["base"]["embedding_rows"] == 256


# -- adapters that do not fit --------------------------------------------------------------------


FRESH = {
    "lora": lambda: LoraConfig(rank=4, targets="all-linear", dora=True),
    "ia3": IA3Config,
    "adapter": BottleneckAdapterConfig,
    "prefix": PrefixTuningConfig,
    "prompt": PromptTuningConfig,
    "bitfit": BitFitConfig,
    "layers": lambda: LayersConfig(layers="1"),
}


@pytest.mark.parametrize("method", list(FRESH))
def test_every_method_fresh_from_inject_passes(any_model, tmp_path, method):
    out = str(tmp_path / method)
    try:
        inject(any_model, method, FRESH[method](), out)
    except UsageError:  # the method does not apply to this model (no biases in Llama, ...)
        pytest.skip(f"{method} does not apply")
    assert attaches(any_model, out)  # the reference
    result = run(any_model, out)
    assert result.exit_code == 0, result.stdout
    assert _line(result.stdout, out).startswith(f"{out}: ok (adapter: {method}, ")


def test_an_adapter_for_another_base_fails(tiny_llama, tiny_bert, art):
    out = _fails(run(tiny_bert, art["lora"]), f"error: 1 of 1 artifact does not fit {tiny_bert}")
    assert "FAIL: its lora config does not fit this base" in _line(out, art["lora"])
    assert "was it made for another base model?" in _line(out, art["lora"])
    out = _fails(run(tiny_llama, art["bert-lora"], art["lora"]), "1 of 2 artifacts does not fit")
    assert "FAIL" in _line(out, art["bert-lora"]) and _line(out, art["lora"]).endswith("ok (adapter: lora, 8 tensors)")


def test_a_rank_that_differs_from_the_config_is_named(tiny_llama, art, tmp_path):
    def rank4(t):
        for k in list(t):
            t[k] = t[k][:4].clone() if k.endswith("lora_A.weight") else t[k][:, :4].clone()

    bad = edited_adapter(art["lora"], tmp_path / "r4", tensors=rank4)
    result = run(tiny_llama, bad, "--json")
    _fails(result, "1 of 1 artifact does not fit")
    problems = _problems(json.loads(result.stdout), bad)
    assert len(problems) == 8  # lora_A and lora_B of four modules
    assert problems[0] == (
        "model.layers.0.self_attn.q_proj.lora_A.weight: rank 4 in the tensors but r=8 in adapter_config.json "
        "(shape [4, 64], expected [8, 64])"
    )
    assert all("rank 4 in the tensors but r=8" in p for p in problems)


def test_missing_and_unexpected_keys_are_listed_with_their_modules(tiny_llama, art, tmp_path):
    def edit(t):
        del t[P + "model.layers.1.self_attn.v_proj.lora_B.weight"]
        t[P + "model.layers.0.self_attn.k_proj.lora_A.weight"] = torch.zeros(8, 64)

    bad = edited_adapter(art["lora"], tmp_path / "keys", tensors=edit)
    result = run(tiny_llama, bad, "--json")
    _fails(result, "does not fit")
    assert _problems(json.loads(result.stdout), bad) == [
        "model.layers.1.self_attn.v_proj.lora_B.weight is missing: the adapter config creates it on this base",
        "model.layers.0.self_attn.k_proj.lora_A.weight is unexpected: the adapter config creates no such tensor on this base",
    ]
    text = run(tiny_llama, bad).stdout
    assert _line(text, bad).startswith(f"{bad}: FAIL: model.layers.1.self_attn.v_proj.lora_B.weight is missing") and "(+1 more)" in text


def test_nan_and_inf_in_an_adapter_fail(tiny_llama, art, tmp_path):
    def poison(t):
        t[Q_KEY][0, 0] = float("nan")
        t[Q_KEY][1, :3] = float("nan")
        t[P + "model.layers.1.self_attn.v_proj.lora_B.weight"][0, 0] = float("-inf")

    bad = edited_adapter(art["lora"], tmp_path / "nan", tensors=poison)
    result = run(tiny_llama, bad, "--json")
    _fails(result, "does not fit")
    assert _problems(json.loads(result.stdout), bad) == [
        "model.layers.0.self_attn.q_proj.lora_A.weight: 4 NaN among its 512 values",
        "model.layers.1.self_attn.v_proj.lora_B.weight: 1 Inf among its 256 values",
    ]


def _bert_with_wrapper_paths(t):
    for k in list(t):
        t[k.replace(P, P + "bert.")] = t.pop(k)


def _drop_mlp(t):
    for k in MLP_KEYS:
        del t[k]


CASES = {  # name: (adapter, base, tensors edit, config edit, model class to attach to, fits)
    "good lora": ("lora", "llama", None, None, None, True),
    "good ia3": ("ia3", "llama", None, None, None, True),
    "rank differs from r": ("lora", "llama", None, lambda c: c.update(r=4), None, False),
    "unexpected tensor": (
        "lora", "llama", lambda t: t.update({P + "model.layers.0.mlp.up_proj.lora_A.weight": torch.zeros(8, 64)}), None, None, False,
    ),
    "another base": ("lora", "bert", None, None, None, False),
    "classifier wrapper paths": ("bert-lora", "bert", _bert_with_wrapper_paths, None, "BertForSequenceClassification", True),
    "prefix with its MLP": ("prefix", "llama", None, None, None, True),
    "prefix as PEFT saves it": ("prefix", "llama", _drop_mlp, None, None, True),
    "prefix with half an MLP": ("prefix", "llama", lambda t: t.pop(MLP_KEYS[0]), None, None, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_verdicts_agree_with_attaching_for_real(tiny_llama, tiny_bert, art, tmp_path, case):
    name, base_name, tensors, config, model_class, fits = CASES[case]
    base = {"llama": tiny_llama, "bert": tiny_bert}[base_name]
    adapter = edited_adapter(art[name], tmp_path / "a", tensors=tensors, config=config)
    assert attaches(base, adapter, model_class) == fits  # the reference
    report = check(base, [adapter])
    assert report.artifacts[0].ok == fits, report.artifacts[0].problems


def test_heads_are_allowed_extras_and_a_resized_vocabulary_is_named(tiny_llama, tiny_bert, art, tmp_path):
    def classifier(t):
        t[P + "classifier.weight"], t[P + "classifier.bias"] = torch.zeros(2, 64), torch.zeros(2)

    with_head = edited_adapter(art["bert-lora"], tmp_path / "cls", tensors=classifier, config=lambda c: c.update(modules_to_save=["classifier"]))
    result = run(tiny_bert, with_head)
    assert result.exit_code == 0, result.stdout
    assert _line(result.stdout, with_head).endswith("ok (adapter: lora, 10 tensors, head classifier)")

    def resized(t):
        t[P + "lm_head.weight"] = torch.zeros(260, 64)

    head = edited_adapter(art["lora"], tmp_path / "resized", tensors=resized, config=lambda c: c.update(modules_to_save=["lm_head"]))
    line = _line(_fails(run(tiny_llama, head), "does not fit"), head)
    assert "FAIL: head lm_head.weight: shape [260, 64], the base's lm_head.weight is [256, 64]" in line
    assert "a vocabulary of 260 tokens against the base's 256: a resized vocabulary is the usual cause" in line
    assert not attaches(tiny_llama, head)  # the reference agrees: the head does not fit

    missing_head = edited_adapter(art["lora"], tmp_path / "nohead", config=lambda c: c.update(modules_to_save=["lm_head"]))
    assert "modules_to_save names lm_head, but the adapter holds no tensor of it" in _line(
        _fails(run(tiny_llama, missing_head), "does not fit"), missing_head
    )


def test_unreadable_artifacts_are_results_not_crashes(tiny_llama, art, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    bad_config = edited_adapter(art["lora"], tmp_path / "badcfg", config=lambda c: c.update(peft_type="NOPE"))
    missing = tmp_path / "missing.diff"
    result = run(tiny_llama, empty, missing, tiny_llama + "/model.safetensors", bad_config, art["lora"])
    out = _fails(result, "4 of 5 artifacts do not fit")
    assert "FAIL: no adapter_config.json" in _line(out, empty)
    assert "FAIL: no such file or directory" in _line(out, missing)
    assert "FAIL: not a peftcli sparse diff" in _line(out, tiny_llama + "/model.safetensors")
    assert "FAIL: adapter_config.json: unsupported adapter method peft_type='NOPE'" in _line(out, bad_config)
    assert out.strip().splitlines()[-1] == f"1 of 5 artifacts fit {tiny_llama}"


# -- diffs ---------------------------------------------------------------------------------------


def test_a_diff_with_an_edited_fingerprint_fails(tiny_llama, art, tmp_path):
    def stale_hash(tensors, meta):
        fp = json.loads(meta["base_fingerprint"])
        fp["tensors"]["model.norm.weight"] = ["F32", [65]]
        meta["base_fingerprint"] = json.dumps(fp)

    def ghost(tensors, meta):  # consistently edited: the hash matches its list, which names a tensor the base lacks
        fp = json.loads(meta["base_fingerprint"])
        fp["tensors"]["ghost.weight"] = ["F32", [2, 2]]
        fp["hash"] = structure_hash(fp["tensors"])
        meta["base_fingerprint"] = json.dumps(fp)

    a = _edit_diff(art["task.diff"], tmp_path / "a.diff", stale_hash)
    b = _edit_diff(art["task.diff"], tmp_path / "b.diff", ghost)
    out = _fails(run(tiny_llama, a, b), "2 of 2 artifacts do not fit")
    assert "FAIL: base_fingerprint: the hash does not match its tensor list" in _line(out, a)
    assert _line(out, b) == (
        f"{b}: FAIL: made from another base: 1 difference: 'ghost.weight' only in the fingerprint "
        "(use the base checkpoint the diff was computed from)"
    )


def test_a_diff_of_another_base_lists_every_difference(tiny_bert, art):
    result = run(tiny_bert, art["task.diff"], "--json")
    _fails(result, "does not fit")
    entry = json.loads(result.stdout)["artifacts"][0]
    with open_checkpoint(tiny_bert) as b, safe_open(art["task.diff"], framework="pt") as f:
        ours = set(json.loads(f.metadata()["base_fingerprint"])["tensors"])
        expected = len(ours ^ set(b.tensors))  # no name is shared, so every tensor of either differs
    assert len(entry["differences"]) == expected and len(entry["problems"]) == 1


def test_content_is_checked_only_when_asked(tiny_llama, art, tmp_path):
    other = scaled_copy(tiny_llama, str(tmp_path / "other"), {"model.layers.0.self_attn.k_proj.weight": 0.6}, seed=5)
    assert run(other, art["task.diff"]).exit_code == 0  # same names, dtypes and shapes
    line = _line(_fails(run(other, art["task.diff"], "--content"), "does not fit"), art["task.diff"])
    assert "FAIL: the base's covered tensors hold other bytes than those the diff was made from" in line
    assert run(tiny_llama, art["task.diff"], "--content").exit_code == 0


@pytest.mark.parametrize("name", ["model.layers.0.self_attn.q_proj.weight", "lm_head.weight"])
def test_nan_in_a_diff_fails(tiny_llama, art, tmp_path, name):
    stored = {}

    def poison(tensors, meta):
        key = name if name in tensors else name + ".val"  # q_proj is stored dense, lm_head sparse
        tensors[key].view(-1)[0] = float("inf")
        stored["n"] = tensors[key].numel()

    bad = _edit_diff(art["task.diff"], tmp_path / "nan.diff", poison)
    result = run(tiny_llama, bad, "--json")
    _fails(result, "does not fit")
    assert _problems(json.loads(result.stdout), bad) == [f"{name}: 1 Inf among its {stored['n']} values"]


# -- the base ------------------------------------------------------------------------------------


def _base_copy(src: str, dst, config=None, tensors=None) -> str:
    shutil.copytree(src, dst)
    if config:
        with open(os.path.join(dst, "config.json")) as f:
            c = json.load(f)
        config(c)
        with open(os.path.join(dst, "config.json"), "w") as f:
            json.dump(c, f)
    if tensors:
        with open_checkpoint(str(dst)) as ckpt:
            sd = {n: ckpt.get(n).clone() for n in ckpt}
        tensors(sd)
        os.remove(os.path.join(dst, "model.safetensors"))
        save_state_dict(sd, os.path.join(dst, "model.safetensors"))
    return str(dst)


def test_a_base_whose_vocab_size_disagrees_with_its_embedding_fails(tiny_llama, art, tmp_path):
    base = _base_copy(tiny_llama, tmp_path / "vocab", config=lambda c: c.update(vocab_size=300))
    result = run(base, art["lora"])
    out = _fails(result, f"error: the base {base} fails its checks")
    line = _line(out, base)
    assert line.startswith(
        f"{base}: FAIL: config.json says vocab_size=300, but the input embedding model.embed_tokens.weight has 256 rows"
    )
    assert "a resized vocabulary is the usual cause of shape mismatches" in line and "(+1 more)" in line  # lm_head too
    assert _line(out, art["lora"]).endswith(": ok (adapter: lora, 8 tensors)")
    with pytest.raises(Exception):  # noqa: B017 - the reference: transformers cannot load it either
        load_base_model(base)


def test_nan_in_the_base_is_found_with_scan_base(tiny_llama, tmp_path):
    base = _base_copy(tiny_llama, tmp_path / "nanbase", tensors=lambda sd: sd["model.norm.weight"].__setitem__(3, float("nan")))
    assert run(base).exit_code == 0
    line = _line(_fails(run(base, "--scan-base"), "fails its checks"), base)
    assert line.startswith(f"{base}: FAIL: model.norm.weight: 1 NaN among its 64 values")


# -- what a shape mismatch is blamed on ------------------------------------------------------------


def _wider_kv(tiny_llama, dst) -> str:
    """The tiny Llama with 4 KV heads instead of 2: keys and values 64 wide, so a prefix's
    per-token width (2 layers × k and v × 64) is 256, the vocabulary's size by coincidence."""

    def widen(sd):
        for name in list(sd):
            if name.endswith(("k_proj.weight", "v_proj.weight")):
                sd[name] = torch.randn(64, 64)

    return _base_copy(tiny_llama, dst, config=lambda c: c.update(num_key_value_heads=4), tensors=widen)


def test_a_prefix_for_another_kv_width_is_not_blamed_on_the_vocabulary(tiny_llama, art, tmp_path):
    base = _wider_kv(tiny_llama, tmp_path / "kv4")
    with open_checkpoint(base) as ckpt:  # the coincidence the old rule fell for
        assert ckpt.tensors["model.embed_tokens.weight"].shape[0] == 256
    assert not attaches(base, art["prefix"])  # the reference: it does not fit
    result = run(base, art["prefix"], "--json")
    _fails(result, "1 of 1 artifact does not fit")
    problems = next(a for a in json.loads(result.stdout)["artifacts"])["problems"]
    (problem,) = [p for p in problems if p["message"].startswith("prefix_encoder.transform.2.weight: ")]
    assert problem["message"] == (
        "prefix_encoder.transform.2.weight: shape [128, 16], expected [256, 16] from the adapter config on this base"
    )
    assert problem["hint"] == "was it made for another base model?"
    assert not any("vocabulary" in (p["hint"] or "") + p["message"] for p in problems), problems


def test_an_adapter_on_the_output_head_of_a_resized_vocabulary_is_named(tiny_llama, tmp_path):
    out = str(tmp_path / "head-lora")
    inject(tiny_llama, "lora", LoraConfig(targets="lm_head"), out)  # lora_B of lm_head is [vocab, r]

    def grow(sd):  # the base's vocabulary resized to 260 tokens, config and all
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            sd[name] = torch.cat([sd[name], torch.zeros(4, sd[name].shape[1])])

    base = _base_copy(tiny_llama, tmp_path / "v260", config=lambda c: c.update(vocab_size=260), tensors=grow)
    assert not attaches(base, out)  # the reference
    result = run(base, out, "--json")
    _fails(result, "1 of 1 artifact does not fit")
    doc = json.loads(result.stdout)
    assert doc["base"]["ok"], doc["base"]  # the base itself is consistent
    (problem,) = doc["artifacts"][0]["problems"]
    assert problem["message"] == "lm_head.lora_B.weight: shape [256, 8], expected [260, 8] on this base"
    assert problem["hint"].startswith("a vocabulary of 256 tokens against the base's 260: a resized vocabulary")


def test_a_lottery_run_is_checked_and_merge_s_refusal_said_not_a_crash(tiny_llama, tmp_path):
    from peftcli.methods.lottery import LotteryConfig

    run = str(tmp_path / "lottery")
    inject(tiny_llama, "lottery", LotteryConfig(), run)
    from peftcli.cli import cli

    result = CliRunner().invoke(cli, ["check", tiny_llama, run, "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["merge"] is None and "lottery run is not an adapter" in doc["merge_refusal"]
    merged = CliRunner().invoke(cli, ["merge", tiny_llama, run, "-o", str(tmp_path / "m")])
    assert merged.exit_code == 2 and "lottery run is not an adapter" in merged.stderr  # what check said merge would do

