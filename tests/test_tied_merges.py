"""No merge writes a config that ties lm_head to the embedding over two different stored heads.

transformers ties ``lm_head.weight`` to the input embedding on load when config.json says
``tie_word_embeddings: true`` and drops the stored head: such an output would silently load as
another model. The base here ties its heads and stores both (equal); fine-tunes trained untied
store a head that differs from their embedding. Every writer (torch-free linear path, torch
engine, passthrough) refuses with nothing at -o; fine-tunes that kept their heads equal merge,
and the output loads in transformers with tied, merged heads.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from click.testing import CliRunner

from peftcli.checkpoint.reader import open_checkpoint
from peftcli.checkpoint.writer import save_state_dict
from peftcli.cli import cli
from peftcli.errors import BadInputError
from peftcli.merging import fast_linear
from peftcli.merging.engine import merge

HEAD, EMBED = "lm_head.weight", "model.embed_tokens.weight"


def _base(tiny_llama_tied: str, tmp_path) -> str:
    """tiny_llama_tied with its (tied) head stored too, equal to the embedding."""
    out = str(tmp_path / "base")
    with open_checkpoint(tiny_llama_tied) as ckpt:
        sd = {n: ckpt.get(n).clone() for n in ckpt}
    assert HEAD not in sd and EMBED in sd
    sd[HEAD] = sd[EMBED].clone()
    save_state_dict(sd, out, source_dir=tiny_llama_tied)
    assert json.load(open(os.path.join(out, "config.json")))["tie_word_embeddings"] is True
    return out


def _finetune(base: str, out: str, seed: int, *, untied: bool) -> str:
    """Every tensor plus seeded noise; the head its own noise (``untied``) or the embedding's."""
    g = torch.Generator().manual_seed(seed)
    with open_checkpoint(base) as ckpt:
        sd = {n: ckpt.get(n) + 0.01 * torch.randn(ckpt.tensors[n].shape, generator=g) for n in ckpt}
    if not untied:
        sd[HEAD] = sd[EMBED].clone()
    save_state_dict(sd, out, source_dir=base)
    if untied:  # as it was trained: its own config says so
        path = os.path.join(out, "config.json")
        config = json.load(open(path))
        json.dump({**config, "tie_word_embeddings": False}, open(path, "w"))
    return out


@pytest.fixture
def tied(tiny_llama_tied, tmp_path):
    base = _base(tiny_llama_tied, tmp_path)
    untied = [_finetune(base, str(tmp_path / f"u{i}"), i, untied=True) for i in (1, 2)]
    equal = [_finetune(base, str(tmp_path / f"e{i}"), i, untied=False) for i in (1, 2)]
    return base, untied, equal


def _spy_fast_path(monkeypatch) -> list:
    """Record each FastMerge.run, so a test knows the CLI took the torch-free path."""
    calls: list = []
    run = fast_linear.FastMerge.run

    def spy(self, *a, **k):
        calls.append(self.out)
        return run(self, *a, **k)

    monkeypatch.setattr(fast_linear.FastMerge, "run", spy)
    return calls


@pytest.mark.parametrize("shards", [[], ["--max-shard-size", "20KB"]])  # the two heads in one shard, or apart
def test_fast_path_refuses_a_tied_config_over_different_heads(tied, tmp_path, monkeypatch, shards):
    base, untied, _ = tied
    out = str(tmp_path / "out")
    calls = _spy_fast_path(monkeypatch)
    r = CliRunner().invoke(cli, ["merge", base, *untied, "-o", out, *shards])
    assert calls == [out]  # the torch-free path wrote (and refused) it
    assert r.exit_code == 1, r.output
    assert "ties lm_head.weight to model.embed_tokens.weight" in r.output and "tie_word_embeddings false" in r.output
    assert not os.path.exists(out)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".out") or p.startswith("out")]


@pytest.mark.parametrize("method,extra", [("linear", {}), ("ties", {"density": 0.5}), ("dare", {"density": 0.5, "seed": 1})])
def test_torch_engine_refuses_a_tied_config_over_different_heads(tied, tmp_path, method, extra):
    base, untied, _ = tied
    out = str(tmp_path / "out")
    with pytest.raises(BadInputError, match="ties lm_head.weight to model.embed_tokens.weight"):
        merge(base, untied, out, method=method, **extra)
    assert not os.path.exists(out)


def test_torch_engine_refuses_one_finetune_changing_only_the_head(tied, tmp_path):
    """A base tied and storing both heads; a full fine-tune that trained only lm_head."""
    base, _, _ = tied
    ft = str(tmp_path / "head_only")
    with open_checkpoint(base) as ckpt:
        sd = {n: ckpt.get(n).clone() for n in ckpt}
    sd[HEAD] = sd[HEAD] + 0.01 * torch.randn(sd[HEAD].shape, generator=torch.Generator().manual_seed(3))
    save_state_dict(sd, ft, source_dir=base)
    out = str(tmp_path / "out")
    with pytest.raises(BadInputError, match="lm_head"):
        merge(base, [ft], out, method="linear", dtype="F32")
    assert not os.path.exists(out)


def test_passthrough_refuses_head_and_embedding_from_models_that_differ(tied, tmp_path):
    """The embedding comes from the first slice's model, the head from the last's: two models
    each with equal heads, but not each other's, under the first one's tied config."""
    from peftcli.merging.passthrough import Slice, stack

    base, _, equal = tied
    layers = json.load(open(os.path.join(base, "config.json")))["num_hidden_layers"]
    out = str(tmp_path / "out")
    with pytest.raises(BadInputError, match="ties lm_head.weight"):
        stack([Slice(base, 0, layers), Slice(equal[0], 0, layers)], out)
    assert not os.path.exists(out)


def _assert_loads_tied(out: str, expected_embedding: torch.Tensor) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert emb.data_ptr() == head.data_ptr()
    assert torch.equal(emb.detach(), expected_embedding)
    with open_checkpoint(out) as ckpt:
        assert torch.equal(ckpt.get(HEAD), ckpt.get(EMBED))


def test_consistent_tied_merges_still_succeed_and_load_tied(tied, tmp_path, monkeypatch):
    base, _, equal = tied
    calls = _spy_fast_path(monkeypatch)
    fast, slow = str(tmp_path / "fast"), str(tmp_path / "slow")
    r = CliRunner().invoke(cli, ["merge", base, *equal, "--weights", "0.6,0.4", "-o", fast])
    assert r.exit_code == 0, r.output
    assert calls == [fast]
    merge(base, equal, slow, method="ties", density=0.5, weights=[0.6, 0.4])
    with open_checkpoint(base) as b, open_checkpoint(equal[0]) as a, open_checkpoint(equal[1]) as c:
        e0, e1, e2 = (x.get(EMBED).double() for x in (b, a, c))
    expected = (e0 + 0.6 * (e1 - e0) + 0.4 * (e2 - e0)).float()
    with open_checkpoint(fast) as ckpt:
        assert torch.allclose(ckpt.get(EMBED), expected, atol=1e-6, rtol=0)  # the fp64 formula
        _assert_loads_tied(fast, ckpt.get(EMBED))
    with open_checkpoint(slow) as ckpt:
        _assert_loads_tied(slow, ckpt.get(EMBED))


def test_an_untied_base_config_merges_different_heads(tied, tmp_path):
    """The same fine-tunes into the base with tie_word_embeddings false: nothing to refuse."""
    base, untied, _ = tied
    untied_base = str(tmp_path / "untied_base")
    shutil.copytree(base, untied_base)
    path = os.path.join(untied_base, "config.json")
    json.dump({**json.load(open(path)), "tie_word_embeddings": False}, open(path, "w"))
    r = CliRunner().invoke(cli, ["merge", untied_base, *untied, "-o", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
