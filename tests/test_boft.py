"""BOFT: PEFT's adapters (random trained φ, butterfly factors 1 to 3) fold in peftcli as PEFT's
merge_and_unload and run with PEFT's outputs; ours load in PEFT with our outputs; what peftcli
cannot read exactly is refused in one line, writing nothing; training moves φ and the loss.

PEFT builds butterfly factors above 1 only with its CUDA extension (without it, it trains factor
1 whatever the config says): the tests stand in a pure-torch block-diagonal for the extension
(``FakeBlockDiag``), which is what the extension computes; for factor 1 they make PEFT skip the
build (no compiler run, nothing written under ~/.cache).
"""

from __future__ import annotations

import json
import os
import types
from contextlib import contextmanager
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file

from peftcli.attach import load_adapted, load_base_model
from peftcli.injection import inject
from peftcli.methods import METHODS
from tests.helpers import batch, output_tensor
from tests.test_vera_oft import _edited, _refused, _run

peft = pytest.importorskip("peft")
boft_layer = pytest.importorskip("peft.tuners.boft.layer")

Q0 = "base_model.model.model.layers.0.self_attn.q_proj."


def _block_diag(x: torch.Tensor) -> list:
    """What PEFT's fbd_cuda extension's forward returns: [N, D, H, H] -> [N, D·H, D·H] (its kernel
    writes output[z, d·H + x, d·H + y] = input[z, d, x, y], zeros elsewhere)."""
    return [torch.stack([torch.block_diag(*factor) for factor in x])]


FakeBlockDiag = types.SimpleNamespace(forward=_block_diag)


@contextmanager
def _peft_boft(factor: int):
    """PEFT's BOFT with its CUDA extension stood in for (factor > 1) or absent (factor 1)."""
    with mock.patch.object(boft_layer, "get_fbd_cuda", (lambda: FakeBlockDiag) if factor > 1 else (lambda: None)):
        yield


PEFT_CASES = {  # case -> BOFTConfig arguments
    "llama-qv-size4": dict(boft_block_size=4, target_modules=["q_proj", "v_proj"]),
    "llama-all-num8-factor2-layer1": dict(boft_block_size=0, boft_block_num=8, boft_n_butterfly_factor=2,
                                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                                          layers_to_transform=[1]),
    "llama-size2-factor3": dict(boft_block_size=2, boft_n_butterfly_factor=3, target_modules=["k_proj", "o_proj", "down_proj"]),
    "llama-q-exclude-saved-head": dict(target_modules=["q_proj"], exclude_modules=["model.layers.0.self_attn.q_proj"],
                                       modules_to_save=["lm_head"]),
}


@pytest.fixture(scope="module")
def peft_adapters(tiny_llama, tmp_path_factory):
    """case -> (adapter dir, PEFT's merge_and_unload state dict, PEFT's adapted logits)."""
    root, out = tmp_path_factory.mktemp("peft-boft"), {}
    for case, kwargs in PEFT_CASES.items():
        with _peft_boft(kwargs.get("boft_n_butterfly_factor", 1)):
            model = peft.get_peft_model(load_base_model(tiny_llama), peft.BOFTConfig(**kwargs))
            g = torch.Generator().manual_seed(len(out))
            with torch.no_grad():  # PEFT's init is the identity: trained-looking φ instead
                for name, p in model.named_parameters():
                    if p.requires_grad:
                        p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if "boft_s" in name else 0.0))
            model.eval()
            model.save_pretrained(str(root / case))
            with torch.no_grad():
                logits = output_tensor(model(**batch()))
            merged = {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}
        out[case] = (str(root / case), merged, logits)
    return out


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_peft_boft_adapter_folds_as_merge_and_unload_and_runs_as_peft(case, peft_adapters, tiny_llama, tmp_path):
    adapter, reference, theirs = peft_adapters[case]
    base_sd = load_file(os.path.join(tiny_llama, "model.safetensors"))
    assert any(not torch.equal(base_sd[n], reference[n]) for n in base_sd), "PEFT's merge changed nothing"
    code, out = _run(["check", tiny_llama, adapter])
    assert code == 0 and "ok" in out, out
    code, out = _run(["merge", tiny_llama, adapter, "-o", str(tmp_path / "merged"), "--quiet"])
    assert code == 0, out
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert set(merged) == set(base_sd)
    for name, t in merged.items():
        assert torch.allclose(t.float(), reference[name].float(), atol=1e-5, rtol=0), name
    ours = load_adapted(tiny_llama, adapter).eval()
    with torch.no_grad():
        assert torch.allclose(output_tensor(ours(**batch())), theirs, atol=1e-5)


@pytest.mark.parametrize("opts", [{}, {"blocks": 4, "butterfly_factor": 2, "targets": "all-linear"}], ids=["default", "blocks4-factor2-all"])
def test_our_boft_adapter_with_random_phi_loads_in_peft_with_our_logits(opts, tiny_llama, tmp_path):
    run = str(tmp_path / "run")
    budget = inject(tiny_llama, "boft", METHODS["boft"].config_cls(**opts), run, seed=2)
    adapted = load_adapted(tiny_llama, run).eval()
    phi = {n: p for n, p in adapted.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in phi.values()) == budget.trainable
    inputs = batch()
    with torch.no_grad():
        base_out = output_tensor(load_base_model(tiny_llama)(**inputs))
        assert torch.allclose(output_tensor(adapted(**inputs)), base_out, atol=1e-6)  # W' = W at init
        g = torch.Generator().manual_seed(5)
        for p in phi.values():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
        ours = output_tensor(adapted(**inputs))
    assert not torch.allclose(ours, base_out, atol=1e-3)
    adapted.save(str(tmp_path / "random"))

    with _peft_boft(opts.get("butterfly_factor", 1)):
        theirs = peft.PeftModel.from_pretrained(load_base_model(tiny_llama), str(tmp_path / "random"), is_trainable=True).eval()
        with torch.no_grad():
            assert torch.allclose(ours, output_tensor(theirs(**inputs)), atol=1e-5)
    theirs_phi = {k.replace(".default", ""): tuple(v.shape) for k, v in theirs.named_parameters() if v.requires_grad}
    saved = load_file(os.path.join(tmp_path, "random", "adapter_model.safetensors"))
    assert {k: tuple(v.shape) for k, v in saved.items()} == theirs_phi  # PEFT's layout, shape for shape


@pytest.mark.parametrize("edit, words", [
    (dict(config={"bias": "boft_only"}), ("bias", "boft_only")),
    (dict(config={"boft_mystery": 1}), ("boft_mystery", "BOFT")),  # a key PEFT 0.21 does not write
    (dict(config={"boft_block_num": 16}), ("boft_block_size", "boft_block_num")),  # both given
    (dict(config={"boft_block_size": 0}), ("boft_block_size", "boft_block_num")),  # neither
    (dict(config={"boft_block_size": 5}), ("block size 5", "does not fit")),  # divides no input
    (dict(config={"boft_n_butterfly_factor": 2}), ("butterfly factor", "CUDA extension")),  # boft_R holds 1
    (dict(tensors={Q0 + "boft_R": torch.zeros(1, 8, 8, 8)}), ("q_proj", "boft_R")),
    (dict(tensors={Q0 + "boft_s": torch.ones(64)}), ("q_proj", "boft_s")),
    (dict(drop=(Q0 + "boft_s",)), ("q_proj", "boft_s")),
    (dict(tensors={Q0 + "boft_s": torch.full((64, 1), float("nan"))}), ("q_proj", "not finite")),
], ids=["bias", "unknown-key", "size-and-num", "neither", "size-not-dividing", "factor-mismatch", "R-shape", "s-shape", "s-missing",
        "nan"])
def test_a_boft_adapter_peftcli_cannot_fold_exactly_is_refused_in_one_line(edit, words, peft_adapters, tiny_llama, tmp_path):
    adapter = _edited(peft_adapters["llama-qv-size4"][0], str(tmp_path / "edited"), **edit)
    _refused(tiny_llama, adapter, tmp_path, *words)


@pytest.mark.parametrize("args, words", [
    (["--block-size", "5"], ("block size 5", "q_proj")),
    (["--block-size", "4", "--blocks", "4"], ("not both",)),
    (["--blocks", "64", "--butterfly-factor", "2"], ("butterfly factor 2",)),  # b = 1: odd
    (["--butterfly-factor", "0"], ("butterfly",)),
    (["--dropout", "1.5"], ("dropout",)),
])
def test_bad_boft_options_are_refused_before_anything_is_written(args, words, tiny_llama, tmp_path):
    out = str(tmp_path / "run")
    code, text = _run(["inject", "boft", *args, tiny_llama, "-o", out])
    line = text.strip()
    assert code == 2 and line.startswith("error: ") and "\n" not in line and all(w in line for w in words), text
    assert not os.path.exists(out)


def test_gpt2_conv1d_is_refused_as_peft_does(tiny_gpt2, tmp_path):
    code, text = _run(["inject", "boft", "--targets", "all-linear", tiny_gpt2, "-o", str(tmp_path / "run")])
    assert code == 2 and "Conv1D" in text and not os.path.exists(tmp_path / "run"), text


def test_training_steps_move_phi_and_lower_the_loss(tiny_llama, tmp_path):
    run = str(tmp_path / "run")
    inject(tiny_llama, "boft", METHODS["boft"].config_cls(blocks=8, butterfly_factor=2, targets="all-linear", dropout=0.25), run)
    adapted = load_adapted(tiny_llama, run)
    phi = {n: p for n, p in adapted.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in phi.items()}
    inputs = batch(seed=3)
    opt = torch.optim.Adam(phi.values(), lr=1e-2)

    def loss() -> torch.Tensor:
        return adapted(**inputs, labels=inputs["input_ids"]).loss

    adapted.eval()
    with torch.no_grad():
        start = float(loss())
    adapted.train()  # with boft_dropout: some blocks are the identity in these steps
    for _ in range(5):
        opt.zero_grad()
        loss().backward()
        opt.step()
    adapted.eval()
    with torch.no_grad():
        end = float(loss())
    assert all(not torch.equal(before[n], p) for n, p in phi.items() if n.endswith("boft_R")), "a boft_R did not move"
    assert any(not torch.equal(before[n], p) for n, p in phi.items() if n.endswith("boft_s"))
    assert end < start
    config = json.load(open(os.path.join(run, "adapter_config.json")))
    assert (config["boft_block_num"], config["boft_n_butterfly_factor"], config["boft_dropout"]) == (8, 2, 0.25)
