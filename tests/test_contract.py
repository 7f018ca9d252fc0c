"""The contract every method meets, on every fixture architecture.

inject (default options) → attach → exactly φ requires grad, counts equal the budget →
one optimizer step changes only φ → forward still runs → save and reload reproduce the
trained outputs. Methods whose φ starts as the identity must reproduce the base at step 0.
"""

from __future__ import annotations

import os

import pytest
import torch

from peftcli.errors import UsageError
from peftcli.attach import load_adapted, load_base_model
from peftcli.injection import inject
from peftcli.methods import METHODS
from tests import matrices
from tests.helpers import batch, output_tensor

IDENTITY_AT_INIT = matrices.identity_at_init()  # methods declaring identity_at_init
ARCHS = ("llama", "bert", "gpt2")
# Methods that cannot apply to an architecture, and what inject says instead (writing nothing).
NOT_APPLICABLE = {
    ("bitfit", "llama"): "Llama-family checkpoints have no biases",
    **{(name, "gpt2"): "Conv1D" for name in matrices.linear_only()},  # declared: adapts_conv1d False
}


@pytest.fixture(params=ARCHS)
def arch_model(request, tiny_llama, tiny_bert, tiny_gpt2):
    return request.param, {"llama": tiny_llama, "bert": tiny_bert, "gpt2": tiny_gpt2}[request.param]


def _options(name: str):
    return matrices.options(name)


# Methods that choose their φ by training (LT-SFT, diff-pruning, lottery tickets) have no φ to
# attach before `train` has run their phases: tests/test_sparse_training.py holds their contract.
ONE_PASS = sorted(matrices.one_pass())


@pytest.mark.parametrize("name", ONE_PASS)
def test_method_contract(name, arch_model, tmp_path):
    arch, base = arch_model
    method = METHODS[name]
    run = str(tmp_path / "run")
    if (name, arch) in NOT_APPLICABLE:
        with pytest.raises(UsageError, match=NOT_APPLICABLE[(name, arch)]):
            inject(base, name, method.config_cls(**_options(name)), run, seed=0)
        assert not os.path.exists(run)
        return
    budget = inject(base, name, method.config_cls(**_options(name)), run, seed=0)
    assert budget.trainable > 0

    adapted = load_adapted(base, run)
    trainable = {n: p for n, p in adapted.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in trainable.values()) == budget.trainable == adapted.num_trainable

    inputs = batch()
    with torch.no_grad():
        out0 = output_tensor(adapted(**inputs))
        ref = output_tensor(load_base_model(base)(**inputs))
    if name in IDENTITY_AT_INIT:
        assert torch.allclose(out0, ref, atol=1e-6)

    before = {n: t.detach().clone() for n, t in adapted.state_dict().items()}
    adapted.train()
    opt = torch.optim.Adam(trainable.values(), lr=1e-2)
    out = output_tensor(adapted(**inputs))
    out.float().pow(2).mean().backward()
    opt.step()
    adapted.eval()
    after = adapted.state_dict()
    trainable_keys = {n for n in before if n in trainable}
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed, "the optimizer step changed nothing"
    assert changed <= trainable_keys, f"non-φ tensors changed: {sorted(changed - trainable_keys)[:3]}"

    with torch.no_grad():
        trained = output_tensor(adapted(**inputs))
    assert torch.isfinite(trained).all()
    adapted.save(str(tmp_path / "trained"))
    reloaded = load_adapted(base, str(tmp_path / "trained"))
    with torch.no_grad():
        assert torch.allclose(output_tensor(reloaded(**inputs)), trained, atol=1e-5)
