"""BOFT (Liu et al., 2024, butterfly orthogonal fine-tuning; PEFT's BOFT): each adapted linear
layer's input is rotated by R, a product of m permuted block-diagonal orthogonal matrices, and its
output rows are scaled: W' = (W·Rᵀ)·diag(s) row-wise, as PEFT's merge ((R·Wᵀ)ᵀ ⊙ s).

R = M_{m−1}⋯M_1·M_0, M_i = P_i·B_i·P_iᵀ: B_i has ``blocks`` orthogonal blocks of size b
(``boft_block_size``, or ``boft_block_num`` blocks; one of the two is given), each the exact
Cayley transform (I − Q)(I + Q)⁻¹ of Q = ½(A − Aᵀ), A the block's entries in
``base_model.model.<module>.boft_R`` [m, blocks, b, b]; P_i is PEFT's butterfly permutation
(``block_butterfly_perm``; the identity when m = 1, where BOFT is OFT with the exact Cayley
transform). m is ``boft_n_butterfly_factor``; ``boft_s`` [out, 1] scales each output row. φ
starts as A = 0 and s = 1, so W' = W. A layer adds m·in·b + out parameters (A stores whole
b × b blocks, as PEFT's).

PEFT trains m > 1 only where its CUDA extension builds: without it, PEFT silently trains m = 1
while the config says m, so such an adapter's boft_R is [1, …] and is refused (shape) rather
than read with a factor it was not trained with. Refused by name, never approximated: ``bias``
other than "none", a block size or count that does not divide a layer's input (or that PEFT's
butterfly checks refuse), a target PEFT's BOFT does not adapt (GPT-2's Conv1D; embeddings).
``boft_dropout`` (training only) is read and applied while training, as PEFT's.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from peftcli.checkpoint.model_config import is_json_number
from peftcli.errors import BadInputError, UsageError
from peftcli.methods.base import (
    PEFT_PREFIX,
    Attached,
    BudgetRow,
    MethodBase,
    Replacement,
    TrainDefaults,
    checkpoint_finder,
    lazy_ones,
    lazy_zeros,
    mismatch_error,
    model_finder,
    peft_key,
    linear_only_targets,
    selection,
)
from peftcli.methods.oft import cayley
from peftcli.methods.vera import CORRUPT, build, is_int, layers_option, read_only, refuse_unknown, target_fields, targets_option
from peftcli.options import option
from peftcli.targets import LinearModule, linear_modules

if TYPE_CHECKING:
    import torch

R_KEY, S_KEY = "boft_R", "boft_s"
_BOFT_KEYS = ("boft_block_size", "boft_block_num", "boft_n_butterfly_factor", "exclude_modules", "boft_dropout",
              "fan_in_fan_out", "bias")


@dataclass
class BoftConfig:
    block_size: int | None = option(
        None, min=1, help="size b of each orthogonal block (PEFT's boft_block_size; default 4); must divide every target's input size",
    )
    blocks: int | None = option(None, min=1, help="number of blocks per layer instead of --block-size (PEFT's boft_block_num): b = in / blocks")
    butterfly_factor: int = option(
        1, min=1, help="butterfly factors m (PEFT's boft_n_butterfly_factor, default 1: OFT's block-diagonal R); "
                       "m > 1 needs even b and blocks, and 2^(m−1)·b dividing the input",
    )
    targets: str | None = targets_option("the query and value projections (PEFT's default); nn.Linear only (not GPT-2's Conv1D), as PEFT")
    layers: str | None = layers_option()
    dropout: float = option(
        0.0, help="multiplicative dropout while training: the share of one random factor's blocks set to the identity (PEFT's boft_dropout)",
    )
    # Read from a PEFT adapter, never an option.
    exclude: str | tuple[str, ...] | None = read_only(None)

    def __post_init__(self) -> None:
        if self.block_size is not None and self.blocks is not None:
            raise UsageError("give `block_size` or `blocks`, not both", "blocks × block_size is each layer's input size")
        for name in ("block_size", "blocks", "butterfly_factor"):
            value = getattr(self, name)
            if value is not None and (not is_int(value) or value < 1):
                raise UsageError(f"`{name}` must be a positive integer, got {value}", f"e.g. `{name}` 4")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise UsageError(f"`dropout` must be in [0, 1), got {self.dropout}", "e.g. `dropout` 0.1")
        if self.block_size is None and self.blocks is None:
            self.block_size = 4  # PEFT's default

    def geometry(self, m: LinearModule) -> tuple[int, int, int]:
        """(factors m, blocks, block size b) on module ``m``, or a UsageError where PEFT's
        ``update_layer`` refuses the combination (PEFT never picks another)."""
        inp, k = m.shape[1], self.butterfly_factor - 1
        given = f"block size {self.block_size}" if self.block_size is not None else f"{self.blocks} blocks"
        if self.blocks is not None:
            count = self.blocks
            fits = inp % count == 0 and (k == 0 or (k <= int(math.log2(count)) and count % 2**k == 0))
            size = inp // count if fits else 0
        else:
            size = self.block_size or 4  # set by __post_init__
            fits = inp % size == 0 and (k == 0 or inp % (size * 2**k) == 0)
            count = inp // size if fits else 0
        if fits and k and (count % 2 or size % 2):
            fits = False
        if not fits:
            raise UsageError(
                f"BOFT {given} with butterfly factor {self.butterfly_factor} does not fit {m.name}'s input size {inp}",
                "choose `block_size` (or `blocks`) dividing every target's input size; with a butterfly factor m > 1, "
                "b and the block count even and 2^(m−1)·b dividing the input (PEFT's rules)",
            )
        return self.butterfly_factor, count, size


class Boft(MethodBase):
    name = "boft"
    config_cls = BoftConfig
    summary = "Butterfly product of permuted block-diagonal rotations of each layer's input and a row scale, W' = (W·Rᵀ)⊙s (BOFT)."
    peft_type = "BOFT"
    folds = True
    adapts_conv1d = False  # PEFT's layer takes nn.Linear only: a Conv1D target is refused
    train_defaults = TrainDefaults(lr=3e-2, generative_lr=3e-3)  # benchmarks/README.md: "Training defaults" (lm/sft: ÷10, not swept)
    examples = (
        "peftcli inject boft model/ -o runs/boft/",
        "peftcli inject boft --block-size 8 --butterfly-factor 2 --targets all-linear model/ -o runs/boft-all/",
    )

    def _targets(self, shapes, model_config, cfg: BoftConfig) -> list[LinearModule]:
        modules = linear_only_targets(shapes, model_config, cfg, "BOFT")
        for m in modules:
            cfg.geometry(m)
        return modules

    def budget(self, shapes, model_config, cfg: BoftConfig) -> list[BudgetRow]:
        rows = []
        for m in self._targets(shapes, model_config, cfg):
            factors, count, size = cfg.geometry(m)
            rows.append(BudgetRow(m.name, m.shape, factors * count * size * size + m.shape[0]))
        return rows

    def init(self, ckpt, cfg: BoftConfig, generator: "torch.Generator") -> dict:
        shapes = {t.name: t.shape for t in ckpt.tensors.values()}
        out = {}
        for m in self._targets(shapes, ckpt.config, cfg):  # A = 0 and s = 1: W' = W, PEFT's init_weights=True
            factors, count, size = cfg.geometry(m)
            out[peft_key(m.name, R_KEY)] = lazy_zeros(factors, count, size, size)
            out[peft_key(m.name, S_KEY)] = lazy_ones(m.shape[0], 1)
        return out

    def adapter_config(self, ckpt, cfg: BoftConfig) -> dict:
        shapes = {t.name: t.shape for t in ckpt.tensors.values()}
        modules = self._targets(shapes, ckpt.config, cfg)
        return {
            "peft_type": self.peft_type,
            "task_type": None,
            "base_model_name_or_path": os.path.abspath(ckpt.path),
            "boft_block_size": cfg.block_size or 0,
            "boft_block_num": cfg.blocks or 0,
            "boft_n_butterfly_factor": cfg.butterfly_factor,
            # Exact module paths: PEFT suffix-matches them, so it selects exactly these modules.
            "target_modules": [m.name for m in modules],
            "exclude_modules": None,
            "boft_dropout": cfg.dropout,
            "fan_in_fan_out": False,
            "bias": "none",
            "modules_to_save": None,
            "init_weights": True,
            "layers_to_transform": None,
            "layers_pattern": None,
            "inference_mode": False,
        }

    def config_from_adapter(self, d: dict) -> BoftConfig:
        what = "BOFT"
        refuse_unknown(d, what, _BOFT_KEYS)
        if d.get("bias", "none") != "none":
            raise BadInputError(f"BOFT adapter config has bias {d.get('bias')!r}, which peftcli does not support",
                                "peftcli folds BOFT adapters saved with bias \"none\"; merge this one with PEFT's merge_and_unload")
        size, count, factor = d.get("boft_block_size", 4), d.get("boft_block_num", 0), d.get("boft_n_butterfly_factor", 1)
        if not (is_int(size) and is_int(count) and size >= 0 and count >= 0) or (size == 0) == (count == 0):
            raise BadInputError(
                f"BOFT adapter config: exactly one of 'boft_block_size' ({size!r}) and 'boft_block_num' ({count!r}) must be a positive integer",
                CORRUPT,
            )
        if not is_int(factor) or factor < 1:
            raise BadInputError(f"BOFT adapter config: 'boft_n_butterfly_factor' must be a positive integer, not {factor!r}", CORRUPT)
        dropout = d.get("boft_dropout", 0.0)
        if not is_json_number(dropout) or not 0 <= dropout < 1 or not isinstance(d.get("fan_in_fan_out", False), bool):
            raise BadInputError("BOFT adapter config: 'boft_dropout' must be a number in [0, 1) and 'fan_in_fan_out' true or false", CORRUPT)
        exclude = d.get("exclude_modules")
        if not (exclude is None or isinstance(exclude, str) or (isinstance(exclude, list) and all(isinstance(t, str) for t in exclude))):
            raise BadInputError("BOFT adapter config: 'exclude_modules' must be a string or a list of strings", CORRUPT)
        # fan_in_fan_out is not read: PEFT sets it false on nn.Linear, and refuses Conv1D as here.
        return build(BoftConfig, {
            **target_fields(d, what), "block_size": size or None, "blocks": count or None, "butterfly_factor": factor,
            "dropout": float(dropout), "exclude": (exclude if isinstance(exclude, str) else tuple(exclude)) if exclude else None,
        }, what)

    # -- reading an adapter's tensors ---------------------------------------------------------------
    def _selected(self, shapes, model_config, cfg):
        return selection(lambda: {m.name: m for m in self._targets(shapes, model_config, cfg)}, "BOFT adapter config", "was target_modules")

    def _matched(self, tensors: dict, selected, unfit, find, cfg: BoftConfig) -> list:
        """(path, found, boft_R, boft_s, geometry) per adapted module, after refusing every problem."""
        problems: list[str] = []
        by_module: dict[str, dict] = {}
        for key, t in tensors.items():
            suffix = key.rsplit(".", 1)[-1]
            if not key.startswith(PEFT_PREFIX) or suffix not in (R_KEY, S_KEY):
                problems.append(f"unexpected key {key}")
                continue
            by_module.setdefault(key[len(PEFT_PREFIX) : -len(suffix) - 1], {})[suffix] = t
        out = []
        for path, parts in by_module.items():
            found, problem = find(path)
            if problem is None and selected is not None:
                problem = _parts_problem(path, parts, selected[found[0]], cfg)
            if problem:
                problems.append(problem)
            elif selected is not None:
                out.append((path, found, parts[R_KEY], parts[S_KEY], cfg.geometry(selected[found[0]])))
        if problems:
            raise mismatch_error(problems)
        if unfit is not None:
            raise unfit
        return out

    def deltas(self, cfg: BoftConfig, tensors: dict, ckpt) -> dict:
        """The merged weight itself, (R·Wᵀ)ᵀ ⊙ s as PEFT's merge computes it (a ``Replacement``)."""
        shapes = {t.name: t.shape for t in ckpt.tensors.values()}
        linear = {m.name: m for m in linear_modules(shapes, ckpt.config)}
        selected, unfit = self._selected(shapes, ckpt.config, cfg)
        find = checkpoint_finder(linear, selected, "BOFT tensors")
        return {found[0] + ".weight": Replacement(partial(_merged, rotation=r, scale=s, geometry=g, name=found[0]))
                for path, found, r, s, g in self._matched(tensors, selected, unfit, find, cfg)}

    def attach(self, model, cfg: BoftConfig, tensors: dict, model_config: dict) -> Attached:
        from peftcli import modules as mod
        from peftcli.methods.boft_layer import BoftLinear

        shapes = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
        selected, unfit = self._selected(shapes, model_config, cfg)  # as PEFT selects them: on the model's names
        find = model_finder(model, selected, "BOFT tensors")
        phi = {}
        for path, (_real, layer), r, s, geometry in self._matched(tensors, selected, unfit, find, cfg):
            _factors, count, size = geometry
            new = BoftLinear(layer, geometry, butterfly_perms(count * size, geometry), blocks, cfg.dropout)
            new.load_phi(r, s)
            mod.replace(model, path, new)
            phi[peft_key(path, R_KEY)] = new.boft_R
            phi[peft_key(path, S_KEY)] = new.boft_s
        return Attached(phi=phi)


def _parts_problem(path: str, parts: dict, m: LinearModule, cfg: BoftConfig) -> str | None:
    """Why a module's boft_R and boft_s cannot be folded exactly, or None."""
    factors, count, size = cfg.geometry(m)
    got = {s: list(t.shape) for s, t in parts.items()}
    want = {R_KEY: [factors, count, size, size], S_KEY: [m.shape[0], 1]}
    if got != want:
        why = f"{path}: BOFT tensors {got} do not match {want}, what the adapter config gives a layer of shape {list(m.shape)}"
        stored = got.get(R_KEY, [])
        if len(stored) == 4 and stored[0] != factors:
            why += (f" (boft_R holds {stored[0]} butterfly factor(s), the config says {factors}: "
                    "PEFT without its CUDA extension trains 1 whatever the config says)")
        return why
    if not bool(blocks(parts[R_KEY].float()).isfinite().all()) or not bool(parts[S_KEY].float().isfinite().all()):
        return f"{path}: the rotation built from boft_R, or boft_s, is not finite in float32 (NaN/Inf or absurd values)"
    return None


def blocks(rotation: "torch.Tensor") -> "torch.Tensor":
    """PEFT's ``cayley_batch`` on every block: [m, blocks, b, b] -> the orthogonal blocks, same shape."""
    factors, count, size, _ = rotation.shape
    flat = rotation.reshape(factors * count, size, size)
    return cayley(0.5 * (flat - flat.transpose(1, 2))).to(rotation.dtype).reshape(factors, count, size, size)


def butterfly_perm(n: int, b: int, r: int, n_butterfly_factor: int) -> "torch.Tensor":
    """PEFT's ``block_butterfly_perm``: the indices p of P (P[i, p[i]] = 1) that interleave the
    halves of each group of n / b features, r features at a time."""
    import torch

    if n_butterfly_factor == 0:
        return torch.arange(n)
    block_size = n // b
    indices = torch.arange(n)
    step = block_size / r
    sequence = torch.cat((torch.arange(0, step, 2), torch.arange(1, step, 2)))
    order = torch.empty(block_size, dtype=torch.long)
    initial = torch.arange(block_size)
    for i, pos in enumerate(sequence):
        order[int(i * r) : int(i * r + r)] = initial[int(pos * r) : int(pos * r + r)]
    for start in range(0, n, block_size):
        indices[start : start + block_size] = indices[start : start + block_size][order]
    return indices


def butterfly_perms(inp: int, geometry: tuple[int, int, int]) -> list["torch.Tensor"]:
    """P_i's indices for each factor i, as PEFT's ``update_layer`` builds boft_P."""
    factors, count, size = geometry
    return [butterfly_perm(inp, int(count / 2**i), int(size / 2), factors - 1) for i in range(factors)]


def rotation_matrix(rotation: "torch.Tensor", geometry: tuple[int, int, int]) -> "torch.Tensor":
    """R [in, in] in float32 (PEFT's ``get_delta_weight``): M_{m−1}⋯M_0, M_i = P_i·B_i·P_iᵀ."""
    import torch

    factors, count, size = geometry
    orthogonal = blocks(rotation.float())
    result = None
    for i, p in enumerate(butterfly_perms(count * size, geometry)):
        permuted = torch.block_diag(*orthogonal[i])[p][:, p]  # (P·B·Pᵀ)[a, c] = B[p[a], p[c]]
        result = permuted if result is None else permuted @ result
    return result


def _merged(stored: "torch.Tensor", *, rotation, scale, geometry, name: str) -> "torch.Tensor":
    """The merged weight (R·Wᵀ)ᵀ ⊙ s in float32, as PEFT's merge; refused if it is not finite."""
    import torch

    merged = torch.mm(rotation_matrix(rotation, geometry), stored.float().t()).t() * scale.float()
    if not bool(torch.isfinite(merged).all()):
        raise BadInputError(f"BOFT: merging {name} gives weights that are not finite in float32",
                            "the adapter's rotation or scale is absurd for these weights; check the adapter with peftcli check")
    return merged
