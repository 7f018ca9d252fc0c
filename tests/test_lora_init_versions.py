"""PEFT releases that read the same adapter config differently: peftcli follows the adapter's
``peft_version`` where PEFT changed what it does, and refuses where the version cannot be read.

PEFT 0.22 factors OLoRA on GPT-2's Conv1D in the Linear layout (0.21 factored the stored
[in, out] weight), accepts ``init_lora_weights="nora"`` (A's columns normalised: the base is
left alone) and lists ``pre_classifier`` among a classifier's ``modules_to_save``. The
references here are formulas in fp64, independent of PEFT, so they hold whichever PEFT is
installed; tests/test_lora_init.py holds peftcli against the installed PEFT itself.
"""

from __future__ import annotations

import pytest
import torch

from peftcli.artifacts.adapter_dir import _task_heads
from peftcli.methods.lora import base_init as lora_init


@pytest.mark.parametrize("version, kind", [
    ("0.22.0", "olora-linear"), ("0.23.1.dev0", "olora-linear"), ("1.0.0", "olora-linear"),
    ("0.21.2", "olora"), ("0.13.0", "olora"), (None, "olora"),  # PEFT before it recorded its version
    ("garbage", "olora-unknown"), (22, "olora-unknown"),
])
def test_olora_follows_the_adapters_peft_version(version, kind):
    assert lora_init.base_init("olora", version) == kind


def _qr_residual(w: torch.Tensor, r: int, s: float) -> torch.Tensor:
    q, rr = torch.linalg.qr(w.double())
    return w.double() - s * q[:, :r] @ rr[:r]


def test_olora_residuals_of_both_releases_on_a_conv1d_layer():
    torch.manual_seed(0)
    stored = torch.randn(8, 8)  # Conv1D stores [in, out]; square, so PEFT 0.21 could load it
    r, s = 2, 2.0
    # PEFT 0.22: factor the Linear layout W = stored.T; the residual is in that layout.
    new = lora_init.residual("olora-linear", stored, r, s, transposed=True)
    torch.testing.assert_close(new.double(), _qr_residual(stored.T, r, s), rtol=0, atol=1e-5)
    # PEFT 0.21: factor the stored weight, then read the residual in the Linear layout.
    old = lora_init.residual("olora", stored, r, s, transposed=True)
    torch.testing.assert_close(old.double(), _qr_residual(stored, r, s).T, rtol=0, atol=1e-5)
    assert (new - old).abs().max() > 1e-2  # the releases differ: guessing would be wrong
    # On a Linear layer ([out, in] stored) the two agree.
    lin = torch.randn(6, 8)
    torch.testing.assert_close(
        lora_init.residual("olora-linear", lin, r, s, transposed=False), lora_init.residual("olora", lin, r, s, transposed=False),
    )


def test_an_unreadable_version_is_refused_on_conv1d_only():
    problem = lora_init.module_problem("olora-unknown", "h.0.attn.c_proj", 2, 8, 8, transposed=True)
    assert problem is not None and "peft_version" in problem and "PEFT 0.22" in problem
    assert lora_init.module_problem("olora-unknown", "q_proj", 2, 8, 8, transposed=False) is None
    # PEFT 0.22 loads OLoRA on a non-square Conv1D layer; 0.21 could not.
    assert lora_init.module_problem("olora-linear", "h.0.mlp.c_fc", 2, 32, 8, transposed=True) is None
    assert "does not fit" in lora_init.module_problem("olora", "h.0.mlp.c_fc", 2, 32, 8, transposed=True)


def test_nora_leaves_the_base_alone():
    assert lora_init.base_init("nora") is None


def test_pefts_added_classifier_names_without_tensors_are_dropped():
    config = {"task_type": "SEQ_CLS", "modules_to_save": ["classifier", "score", "pre_classifier"]}
    tensors = {"base_model.model.classifier.weight": torch.zeros(2, 4)}
    assert _task_heads(config, tensors)["modules_to_save"] == ["classifier"]
    distilbert = {**tensors, "base_model.model.pre_classifier.weight": torch.zeros(4, 4)}
    assert _task_heads(config, distilbert)["modules_to_save"] == ["classifier", "pre_classifier"]
    # A name PEFT does not add is never dropped: its missing tensor is refused downstream.
    other = {"task_type": "SEQ_CLS", "modules_to_save": ["classifier", "pooler"]}
    assert _task_heads(other, tensors)["modules_to_save"] == ["classifier", "pooler"]
