"""OFT (Qiu et al., 2023; PEFT's current OFT, 0.18 and later): each adapted linear layer's input
is rotated by a block-diagonal orthogonal matrix R, y = W·(R-rotated x), so the merged weight is
W·Rᵀ (PEFT's merge: (R·Wᵀ)ᵀ).

R has r = in / b blocks of size b (``oft_block_size``; PEFT's ``r`` is the number of blocks,
one of the two is given). Each block is the Cayley transform of a skew-symmetric matrix Q whose
b(b−1)/2 upper-triangle entries are φ: ``base_model.model.<module>.oft_R.weight`` [r, b(b−1)/2].
PEFT's default (``use_cayley_neumann``) is the truncated Neumann series of PEFT 0.18 on,
R = I + 2Q + 2Q² + … + 2Q^(n−2) + Q^(n−1) (n = ``num_cayley_neumann_terms``, 5); else the exact
(I − Q)(I + Q)⁻¹. φ starts at zero, so R = I. A layer adds b(b−1)/2·in/b parameters.

Refused by name, never approximated: ``coft`` (PEFT projects φ inside the forward),
``block_share``, ``bias`` other than "none", a block size that does not divide a layer's input
(PEFT silently picks another), a Cayley-Neumann adapter from before PEFT 0.18 (another series),
a target PEFT's OFT does not adapt (GPT-2's Conv1D; embeddings). ``module_dropout`` is read and
has no effect: PEFT 0.21's linear layer never applies it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from peftcli.checkpoint.model_config import is_json_number
from peftcli.errors import BadInputError, UsageError
from peftcli.methods.base import (
    Attached,
    BudgetRow,
    MethodBase,
    Replacement,
    TrainDefaults,
    checkpoint_finder,
    lazy_zeros,
    matched_keys,
    model_finder,
    peft_key,
    linear_only_targets,
    selection,
)
from peftcli.methods.vera import CORRUPT, build, is_int, layers_option, read_only, refuse_unknown, target_fields, targets_option
from peftcli.options import option
from peftcli.targets import LinearModule, linear_modules

if TYPE_CHECKING:
    import torch

SUFFIX = "oft_R.weight"
_OFT_KEYS = ("r", "oft_block_size", "module_dropout", "fan_in_fan_out", "bias", "exclude_modules", "coft", "eps", "block_share",
             "use_cayley_neumann", "num_cayley_neumann_terms")
PEFT_FORMAT = "0.18.0"  # the PEFT release whose Cayley-Neumann series φ follows: PEFT reads peft_version to tell
FP32_MAX = 3.4028234663852886e38


@dataclass
class OftConfig:
    block_size: int | None = option(
        None, min=1, help="size b of each orthogonal block (PEFT's oft_block_size; default 32); must divide every target's input size",
    )
    blocks: int | None = option(None, min=1, help="number of blocks per layer instead of --block-size (PEFT's r): b = in / blocks")
    targets: str | None = targets_option("the query and value projections (PEFT's default); nn.Linear only (not GPT-2's Conv1D), as PEFT")
    layers: str | None = layers_option()
    exact_cayley: bool = option(
        False, help="the exact Cayley transform (I − Q)(I + Q)⁻¹ instead of PEFT's default truncated Neumann series",
    )
    neumann_terms: int = option(5, min=1, help="terms of the Cayley-Neumann series (PEFT's num_cayley_neumann_terms, default 5)")
    # Read from a PEFT adapter, never options.
    exclude: str | tuple[str, ...] | None = read_only(None)
    module_dropout: float = read_only(0.0)

    def __post_init__(self) -> None:
        if self.block_size is not None and self.blocks is not None:
            raise UsageError("give `block_size` or `blocks`, not both", "blocks × block_size is each layer's input size")
        for name in ("block_size", "blocks", "neumann_terms"):
            value = getattr(self, name)
            if value is not None and (not is_int(value) or value < 1):
                raise UsageError(f"`{name}` must be a positive integer, got {value}", f"e.g. `{name}` 8")
        if self.block_size is None and self.blocks is None:
            self.block_size = 32  # PEFT's default

    def block(self, m: LinearModule) -> int:
        """The block size of module ``m``, or a UsageError when it does not split m's input evenly."""
        inp = m.shape[1]
        size = self.block_size if self.block_size is not None else (inp // self.blocks if self.blocks and inp % self.blocks == 0 else 0)
        if not size or inp % size:
            given = f"block size {self.block_size}" if self.block_size is not None else f"{self.blocks} blocks"
            raise UsageError(
                f"OFT {given} does not divide {m.name}'s input size {inp}",
                "choose `block_size` (or `blocks`) dividing every target's input size (PEFT would silently pick another)",
            )
        return size


def _n(b: int) -> int:
    return b * (b - 1) // 2


class Oft(MethodBase):
    name = "oft"
    config_cls = OftConfig
    summary = "Block-diagonal orthogonal rotation of each layer's input, W' = W·Rᵀ, R from a Cayley transform (OFT)."
    peft_type = "OFT"
    folds = True
    adapts_conv1d = False  # PEFT's layer takes nn.Linear only: a Conv1D target is refused
    train_defaults = TrainDefaults(lr=3e-3, generative_lr=3e-4)  # benchmarks/README.md: "Training defaults" (lm/sft: ÷10, not swept)
    examples = (
        "peftcli inject oft model/ -o runs/oft/",
        "peftcli inject oft --block-size 16 --targets all-linear model/ -o runs/oft-all/",
    )

    def _targets(self, shapes, model_config, cfg: OftConfig) -> list[LinearModule]:
        modules = linear_only_targets(shapes, model_config, cfg, "OFT")
        for m in modules:
            cfg.block(m)
        return modules

    def budget(self, shapes, model_config, cfg: OftConfig) -> list[BudgetRow]:
        rows = []
        for m in self._targets(shapes, model_config, cfg):
            b = cfg.block(m)
            rows.append(BudgetRow(m.name, m.shape, m.shape[1] // b * _n(b)))
        return rows

    def init(self, ckpt, cfg: OftConfig, generator: "torch.Generator") -> dict:
        shapes = {t.name: t.shape for t in ckpt.tensors.values()}
        return {peft_key(m.name, SUFFIX): lazy_zeros(m.shape[1] // cfg.block(m), _n(cfg.block(m)))
                for m in self._targets(shapes, ckpt.config, cfg)}  # zero: R = I, PEFT's init_weights=True

    def adapter_config(self, ckpt, cfg: OftConfig) -> dict:
        shapes = {t.name: t.shape for t in ckpt.tensors.values()}
        modules = self._targets(shapes, ckpt.config, cfg)
        return {
            "peft_type": self.peft_type,
            "peft_version": PEFT_FORMAT,
            "task_type": None,
            "base_model_name_or_path": os.path.abspath(ckpt.path),
            "r": cfg.blocks or 0,
            "oft_block_size": cfg.block_size or 0,
            # Exact module paths: PEFT suffix-matches them, so it selects exactly these modules.
            "target_modules": [m.name for m in modules],
            "exclude_modules": None,
            "module_dropout": 0.0,
            "fan_in_fan_out": False,
            "bias": "none",
            "coft": False,
            "eps": 6e-05,
            "block_share": False,
            "use_cayley_neumann": not cfg.exact_cayley,
            "num_cayley_neumann_terms": cfg.neumann_terms,
            "init_weights": True,
            "layers_to_transform": None,
            "layers_pattern": None,
            "modules_to_save": None,
            "inference_mode": False,
        }

    def config_from_adapter(self, d: dict) -> OftConfig:
        what = "OFT"
        refuse_unknown(d, what, _OFT_KEYS)
        for key in ("coft", "block_share"):
            if d.get(key, False) is not False:
                raise BadInputError(f"OFT adapter config has {key} {json_value(d[key])}, which peftcli does not support",
                                    f"peftcli folds OFT adapters saved with {key} false; merge this one with PEFT's merge_and_unload")
        if d.get("bias", "none") != "none":
            raise BadInputError(f"OFT adapter config has bias {d.get('bias')!r}, which peftcli does not support",
                                "peftcli folds OFT adapters saved with bias \"none\"; merge this one with PEFT's merge_and_unload")
        if "oft_block_size" not in d:  # as PEFT's check_kwargs: OFT before PEFT 0.14 had another layout
            raise BadInputError("OFT adapter config has no oft_block_size: it was saved by PEFT before 0.14, whose OFT differs",
                                "retrain the adapter with PEFT 0.14 or later")
        r, size, terms = d.get("r", 0), d.get("oft_block_size", 0), d.get("num_cayley_neumann_terms", 5)
        neumann = d.get("use_cayley_neumann", True)
        if not (is_int(r) and is_int(size) and r >= 0 and size >= 0) or (r == 0) == (size == 0):
            raise BadInputError(f"OFT adapter config: exactly one of 'r' ({r!r}) and 'oft_block_size' ({size!r}) must be a positive integer", CORRUPT)
        if not isinstance(neumann, bool) or not is_int(terms) or terms < 1:
            raise BadInputError("OFT adapter config: 'use_cayley_neumann' must be true or false, 'num_cayley_neumann_terms' a positive integer", CORRUPT)
        if neumann and _release(d.get("peft_version")) < (0, 18):
            raise BadInputError(
                f"OFT adapter config has use_cayley_neumann with peft_version {d.get('peft_version')!r}: PEFT changed that series in 0.18",
                "peftcli computes PEFT 0.18's series; retrain the adapter with PEFT 0.18 or later",
            )
        dropout = d.get("module_dropout", 0.0)
        if not is_json_number(dropout) or not 0 <= dropout < 1 or not is_json_number(d.get("eps", 6e-5)):
            raise BadInputError("OFT adapter config: 'module_dropout' must be a number in [0, 1) and 'eps' a number", CORRUPT)
        exclude = d.get("exclude_modules")
        if not (exclude is None or isinstance(exclude, str) or (isinstance(exclude, list) and all(isinstance(t, str) for t in exclude))):
            raise BadInputError("OFT adapter config: 'exclude_modules' must be a string or a list of strings", CORRUPT)
        return build(OftConfig, {
            **target_fields(d, what), "block_size": size or None, "blocks": r or None, "exact_cayley": not neumann,
            "neumann_terms": terms, "exclude": (exclude if isinstance(exclude, str) else tuple(exclude)) if exclude else None,
            "module_dropout": float(dropout),
        }, what)

    # -- reading an adapter's tensors ---------------------------------------------------------------
    def _selected(self, shapes, model_config, cfg):
        return selection(lambda: {m.name: m for m in self._targets(shapes, model_config, cfg)}, "OFT adapter config", "was target_modules")

    def _matched(self, tensors: dict, selected, unfit, find, cfg: OftConfig) -> list:
        """(path, found, φ, block size) per adapted module, after refusing every problem."""

        def check(path, found, t):
            m = selected[found[0]]
            b = cfg.block(m)
            want = [m.shape[1] // b, _n(b)]
            if list(t.shape) != want:
                return f"{path}: oft_R.weight {list(t.shape)} does not match {want}, what block size {b} gives an input of {m.shape[1]}", None
            if not bool(rotation(t, b, cfg).isfinite().all()):
                return f"{path}: the rotation R built from oft_R.weight is not finite in float32 (NaN/Inf or absurd values)", None
            return None, (path, found, t, b)

        def unexpected(key):
            return " (an embedding's OFT, which peftcli does not fold)" if "oft_embedding_R" in key else ""

        return matched_keys(tensors, SUFFIX, find, check, selected, unfit, unexpected)

    def deltas(self, cfg: OftConfig, tensors: dict, ckpt) -> dict:
        """The merged weight itself, (R·Wᵀ)ᵀ as PEFT's merge computes it (a ``Replacement``)."""
        from functools import partial

        shapes = {t.name: t.shape for t in ckpt.tensors.values()}
        linear = {m.name: m for m in linear_modules(shapes, ckpt.config)}
        selected, unfit = self._selected(shapes, ckpt.config, cfg)

        find = checkpoint_finder(linear, selected, "an oft_R.weight")

        return {found[0] + ".weight": Replacement(partial(_rotated, phi=phi, block=b, cfg=cfg, name=found[0]))
                for path, found, phi, b in self._matched(tensors, selected, unfit, find, cfg)}

    def attach(self, model, cfg: OftConfig, tensors: dict, model_config: dict) -> Attached:
        from functools import partial

        from peftcli import modules as mod
        from peftcli.methods.oft_layer import OftLinear

        shapes = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
        selected, unfit = self._selected(shapes, model_config, cfg)  # as PEFT selects them: on the model's names

        find = model_finder(model, selected, "an oft_R.weight")

        phi = {}
        for path, (_real, layer), t, b in self._matched(tensors, selected, unfit, find, cfg):
            new = OftLinear(layer, b, partial(rotation_blocks, block=b, cfg=cfg))
            new.load_phi(t)
            mod.replace(model, path, new)
            phi[peft_key(path, SUFFIX)] = new.weight
        return Attached(phi=phi)


def json_value(v: Any) -> str:
    import json

    return json.dumps(v)


def _release(version: object) -> tuple[int, int]:
    """(major, minor) of a peft_version such as "0.21.2" or "0.22.0.dev0@<sha>"; (0, 0) if absent or unreadable."""
    match = re.match(r"(\d+)\.(\d+)", version) if isinstance(version, str) else None
    return (int(match[1]), int(match[2])) if match else (0, 0)


def skew(q: "torch.Tensor", block: int) -> "torch.Tensor":
    """PEFT's ``_pytorch_skew_symmetric``: [r, b(b−1)/2] upper triangles -> [r, b, b] skew-symmetric Q."""
    import torch

    rows, cols = torch.triu_indices(block, block, 1, device=q.device)
    matrix = torch.zeros(q.shape[0], block, block, device=q.device, dtype=q.dtype)
    matrix[:, rows, cols] = q
    return matrix - matrix.transpose(-2, -1)


def cayley(q_skew: "torch.Tensor") -> "torch.Tensor":
    """The exact Cayley transform (I − Q)(I + Q)⁻¹ of each skew-symmetric block [r, b, b], as PEFT
    solves it (the identity in float32; BOFT's ``cayley_batch`` too)."""
    import torch

    b, block = q_skew.shape[0], q_skew.shape[-1]
    eye = torch.eye(block, device=q_skew.device).unsqueeze(0).expand(b, block, block)
    return torch.linalg.solve(eye + q_skew, eye - q_skew, left=False)


def rotation_blocks(q: "torch.Tensor", block: int, cfg: OftConfig) -> "torch.Tensor":
    """PEFT's ``_cayley_batch``: the r orthogonal blocks [r, b, b], in PEFT's order of operations."""
    import torch

    b, previous = q.shape[0], q.dtype
    q_skew = skew(q, block)
    if cfg.exact_cayley:
        return cayley(q_skew).to(previous)
    terms = cfg.neumann_terms
    r = torch.eye(block, device=q.device, dtype=q.dtype).repeat(b, 1, 1)
    if terms > 1:
        r = r + 2.0 * q_skew
        if terms > 2:
            power = torch.bmm(q_skew, q_skew)
            r = r + 2.0 * power
            for _ in range(3, terms - 1):
                power = torch.bmm(power, q_skew)
                r = r + 2.0 * power
            power = torch.bmm(power, q_skew)
            r = r + power
    return r.to(previous)


def rotation(q: "torch.Tensor", block: int, cfg: OftConfig) -> "torch.Tensor":
    """The block-diagonal R [in, in] (PEFT's ``get_weight``), in float32."""
    import torch

    return torch.block_diag(*rotation_blocks(q.float(), block, cfg))


def _rotated(stored: "torch.Tensor", *, phi, block: int, cfg: OftConfig, name: str) -> "torch.Tensor":
    """The merged weight (R·Wᵀ)ᵀ in float32, as PEFT's merge; refused if it is not finite."""
    import torch

    merged = torch.mm(rotation(phi, block, cfg), stored.float().t()).t()
    if not bool(torch.isfinite(merged).all()):
        raise BadInputError(f"OFT: merging {name} gives weights that are not finite in float32",
                            "the adapter's rotation is absurd for these weights; check the adapter with peftcli check")
    return merged
