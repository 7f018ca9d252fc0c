"""Byte goldens of the element-wise merge methods: the merged tensors' bytes, pinned.

The merge methods moved onto one registry with byte-identical outputs; these digests keep them
so. The inputs are built from numpy's seeded generator (no torch RNG, no model init), and only
methods whose every output element is computed from the same element of the inputs (plus
peftcli's own hash-seeded masks) are pinned: no reduction whose order a CPU's vector width could
change. The digest covers the tensors (names, dtypes, shapes, bytes), not the file, whose
metadata records the peftcli version and the inputs' hashes.

The digests of linear, TIES, DARE and DARE-TIES are also what the code before the merge-method
registry (d41abdb's parent, ``peftcli.merge.engine.merge``) writes for these inputs.

A change here means a merge now writes different numbers: if that is intended, say why in the
commit and update the digest.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from peftcli.merging.engine import merge
from peftcli.merging.fast_linear import fused_add_cpu

NAMES = {
    "model.embed_tokens.weight": (16, 8),
    "model.layers.0.self_attn.q_proj.weight": (8, 8),
    "model.layers.0.mlp.up_proj.weight": (12, 8),
    "model.norm.weight": (8,),
}

# method, keywords of engine.merge, digest of the merged tensors
CASES = [
    ("linear", {"weights": [1.0, 0.8]}, "9c2a5a50a6d938b8"),
    ("ties", {"weights": [1.0, 0.8], "method": "ties", "density": 0.5}, "b28059f0a2caaa34"),
    ("dare", {"weights": [1.0, 0.8], "method": "dare", "density": 0.5, "seed": 3}, "4386638687e7a923"),
    ("dare-ties", {"weights": [1.0, 0.8], "method": "dare-ties", "density": 0.5, "seed": 3}, "59c59d9d93ef2f8e"),
    ("breadcrumbs", {"weights": [1.0, 0.8], "method": "breadcrumbs", "density": 0.5}, "52ad3dd50c9aa22f"),
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("goldens")
    rng = np.random.default_rng(20261208)
    base = {n: rng.standard_normal(s).astype(np.float32) for n, s in NAMES.items()}
    paths = [str(d / "base.safetensors")]
    save_file(base, paths[0])
    for i in range(2):
        ft = {n: (t + 0.05 * rng.standard_normal(t.shape)).astype(np.float32) for n, t in base.items()}
        paths.append(str(d / f"ft{i}.safetensors"))
        save_file(ft, paths[-1])
    return paths


def tensors_digest(path: str) -> str:
    h = hashlib.sha256()
    with safe_open(path, framework="numpy") as f:
        for name in sorted(f.keys()):
            t = f.get_tensor(name)
            h.update(f"{name}\0{t.dtype}\0{t.shape}\0".encode())
            h.update(np.ascontiguousarray(t).tobytes())
    return h.hexdigest()[:16]


# torch's add_(x, alpha=λ) rounds once on CPUs with fused multiply-add and twice without: the
# pinned bytes are the fused ones (x86-64 with AVX2 and FMA, aarch64).
@pytest.mark.skipif(not fused_add_cpu(), reason="the goldens are those of a CPU whose torch fuses add_(alpha=)")
@pytest.mark.parametrize("label, keywords, digest", CASES, ids=[c[0] for c in CASES])
def test_merged_bytes_are_the_pinned_ones(inputs, tmp_path, label, keywords, digest):
    out = str(tmp_path / f"{label}.safetensors")
    merge(inputs[0], inputs[1:], out, **keywords)
    assert tensors_digest(out) == digest
