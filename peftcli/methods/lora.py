"""LoRA (Hu et al., 2021): h = W₀x + (α/r)·B·A·x with A: [r, in], B: [out, r].

Variants: rsLoRA scales by α/√r; DoRA (Liu et al., 2024) learns a magnitude m per output
feature and uses W' = m · (W₀ + sBA) / ‖W₀ + sBA‖ (row norms, treated as a constant in
backprop, as the paper suggests). On a d×k matrix LoRA adds r·(d + k) parameters (+ d for
DoRA). A starts Kaiming-uniform (or Gaussian), B at zero, so ΔW = 0 before training.
Written in PEFT's layout: ``base_model.model.<module>.lora_A.weight`` [r, in],
``...lora_B.weight`` [out, r], ``...lora_magnitude_vector`` [out].
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from peftcli.errors import BadInputError, UsageError
from peftcli.methods.base import Attached, BudgetRow, LazyTensor, SeededDraws, lazy_zeros, peft_key, PEFT_PREFIX
from peftcli.options import option
from peftcli.patterns import from_file
from peftcli.targets import resolve_targets

if TYPE_CHECKING:
    import torch

INITS = ("kaiming", "gaussian")


@dataclass
class LoraConfig:
    rank: int = option(8, "-r", help="rank r of the update B·A (default 8)")
    alpha: float | None = option(
        None, help="scaling numerator α; default 2×rank (PEFT defaults to 8 whatever the rank)"
    )
    targets: str | None = option(
        None,
        metavar="NAMES|REGEX|all-linear",
        help="modules to adapt: comma-separated names (q_proj,v_proj), a regex over module paths, "
        "or all-linear; default: the query and value projections, as in the LoRA paper",
    )
    layers: str | None = option(None, metavar="RANGES", help="only these layers, e.g. 20-29 or 0,2,4-6")
    dora: bool = option(False, help="DoRA: also learn a magnitude per output feature")
    rslora: bool = option(False, help="rsLoRA: scale by α/√r instead of α/r")
    dropout: float = option(0.0, help="dropout on the LoRA branch's input during training (default 0)")
    init: str = option("kaiming", metavar="kaiming|gaussian", help="initialisation of A (B is always zero); default kaiming, as PEFT")

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise UsageError(f"--rank must be positive, got {self.rank}", "e.g. --rank 8")
        if self.alpha is None:
            self.alpha = 2.0 * self.rank
        elif not math.isfinite(self.alpha) or self.alpha <= 0:
            raise UsageError(
                f"--alpha must be a positive number, got {self.alpha}", "e.g. --alpha 16, or leave it out for 2×rank"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise UsageError(f"--dropout must be in [0, 1), got {self.dropout}", "e.g. --dropout 0.05")
        if self.init not in INITS:
            raise UsageError(f"--init must be one of {', '.join(INITS)}, got {self.init!r}", "e.g. --init kaiming")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


class LoRA:
    name = "lora"
    config_cls = LoraConfig
    summary = "Low-rank update ΔW = (α/r)·B·A on linear layers (also DoRA, rsLoRA)."
    peft_type = "LORA"
    examples = (
        "peftcli inject lora --rank 8 model/ -o runs/lora/",
        "peftcli inject lora --rank 16 --alpha 32 --targets all-linear --rslora model/ -o runs/lora16/",
        "peftcli inject lora --dora --targets q_proj,k_proj,v_proj,o_proj model/ -o runs/dora/",
    )

    @staticmethod
    def added_params(shape: tuple[int, int], cfg: LoraConfig) -> int:
        out_features, in_features = shape
        return cfg.rank * (out_features + in_features) + (out_features if cfg.dora else 0)

    def _targets(self, shapes, model_config, cfg):
        modules = resolve_targets(shapes, model_config, cfg.targets, cfg.layers)
        smallest = min(modules, key=lambda m: min(m.shape))  # resolve_targets never returns none
        limit = min(smallest.shape)
        if cfg.rank > limit:
            raise UsageError(
                f"--rank {cfg.rank} is larger than min(out, in) = {limit} of {smallest.name}",
                f"use --rank {limit} or less: a larger rank adds parameters without adding expressiveness",
            )
        return modules

    def budget(self, shapes: dict[str, tuple[int, ...]], model_config: dict | None, cfg: LoraConfig) -> list[BudgetRow]:
        return [BudgetRow(m.name, m.shape, self.added_params(m.shape, cfg)) for m in self._targets(shapes, model_config, cfg)]

    # -- tensor level --------------------------------------------------------------------
    def init(self, ckpt, cfg: LoraConfig, generator: "torch.Generator") -> dict[str, LazyTensor]:
        import torch

        shapes = {t.name: t.shape for t in ckpt.tensors.values()}
        out: dict[str, LazyTensor] = {}  # each made when written (inject holds one at a time)
        draws = SeededDraws(generator)  # the A's, drawn in target order as an eager loop would
        r = cfg.rank
        for m in self._targets(shapes, ckpt.config, cfg):
            d_out, d_in = m.shape
            if cfg.init == "kaiming":
                # PEFT's default: kaiming_uniform_(a=√5) on [r, in], i.e. U(−1/√in, 1/√in).
                bound = 1.0 / math.sqrt(d_in)
                a = draws.draw((r, d_in), lambda g, d_in=d_in, b=bound: torch.empty(r, d_in).uniform_(-b, b, generator=g))
            else:
                a = draws.draw((r, d_in), lambda g, d_in=d_in: torch.empty(r, d_in).normal_(0.0, 1.0 / r, generator=g))
            out[peft_key(m.name, "lora_A.weight")] = a
            out[peft_key(m.name, "lora_B.weight")] = lazy_zeros(d_out, r)
            if cfg.dora:
                out[peft_key(m.name, "lora_magnitude_vector")] = LazyTensor(
                    (d_out,), torch.float32, lambda name=m.name, dim=0 if m.transposed else 1: _row_norms(ckpt, name, dim)
                )
        return out

    def adapter_config(self, ckpt, cfg: LoraConfig) -> dict:
        shapes = {t.name: t.shape for t in ckpt.tensors.values()}
        modules = self._targets(shapes, ckpt.config, cfg)
        alpha = int(cfg.alpha) if float(cfg.alpha).is_integer() else cfg.alpha
        return {
            "peft_type": "LORA",
            "task_type": None,
            "base_model_name_or_path": os.path.abspath(ckpt.path),
            "r": cfg.rank,
            "lora_alpha": alpha,
            # Exact module paths: PEFT suffix-matches them, so it selects exactly these modules.
            "target_modules": [m.name for m in modules],
            "lora_dropout": cfg.dropout,
            "fan_in_fan_out": any(m.transposed for m in modules),
            "bias": "none",
            "use_dora": cfg.dora,
            "use_rslora": cfg.rslora,
            "init_lora_weights": True if cfg.init == "kaiming" else "gaussian",
            "modules_to_save": None,
            "layers_to_transform": None,
            "rank_pattern": {},
            "alpha_pattern": {},
            "inference_mode": False,
        }

    def config_from_adapter(self, d: dict) -> LoraConfig:
        for key in ("rank_pattern", "alpha_pattern"):
            if d.get(key):
                raise BadInputError(
                    f"adapter config uses {key}, which peftcli does not support yet",
                    "save one adapter per rank and alpha, with empty rank_pattern and alpha_pattern",
                )
        if d.get("bias", "none") != "none":
            raise BadInputError(
                f"adapter config trains biases (bias={d['bias']!r}), which peftcli's LoRA does not support",
                "train the adapter with bias='none'",
            )
        if "r" not in d:
            raise BadInputError("LoRA adapter config has no rank 'r'", "add \"r\": <rank> to adapter_config.json")
        targets = d.get("target_modules")
        layers = d.get("layers_to_transform")
        return LoraConfig(
            rank=int(d["r"]),
            alpha=float(d.get("lora_alpha", 8)),  # PEFT's default when absent
            targets=",".join(targets) if isinstance(targets, list) else from_file(targets, "adapter_config.json target_modules"),
            layers=",".join(map(str, layers)) if isinstance(layers, list) else (str(layers) if layers is not None else None),
            dora=bool(d.get("use_dora", False)),
            rslora=bool(d.get("use_rslora", False)),
            dropout=float(d.get("lora_dropout", 0.0)),
            init="gaussian" if d.get("init_lora_weights") == "gaussian" else "kaiming",
        )

    # -- folding into the weights ---------------------------------------------------------
    def deltas(self, cfg: LoraConfig, tensors: dict, ckpt) -> dict:
        """ΔW per base weight: s·B·A (DoRA: m·(W+sBA)/‖W+sBA‖ − W), transposed back for Conv1D."""
        from functools import partial

        from peftcli.methods.base import base_module, mismatch_error
        from peftcli.targets import linear_modules

        shapes = {t.name: t.shape for t in ckpt.tensors.values()}
        linear = {m.name: m for m in linear_modules(shapes, ckpt.config)}
        by_module, problems = _group(tensors)
        out = {}
        for path, parts in by_module.items():
            name = base_module(path, linear)
            if name is None:
                problems.append(f"{path}: no such linear module in the base")
                continue
            m = linear[name]
            problem = _check_module(path, parts, cfg, *m.shape)
            if problem:
                problems.append(problem)
                continue
            out[name + ".weight"] = partial(_fold, parts=parts, scaling=cfg.scaling, transposed=m.transposed)
        if problems:
            raise mismatch_error(problems)
        return out

    # -- module level ---------------------------------------------------------------------
    def attach(self, model, cfg: LoraConfig, tensors: dict, model_config: dict) -> Attached:
        from peftcli import modules as mod
        from peftcli.methods.base import mismatch_error
        from peftcli.methods.lora_layer import LoraLinear

        by_module, problems = _group(tensors)
        phi = {}
        for path, parts in by_module.items():
            layer, dims, problem = mod.find_linear(model, path)
            if problem is None:
                problem = _check_module(path, parts, cfg, *dims)
            if problem:
                problems.append(problem)
                continue
            new = LoraLinear(layer, cfg.rank, cfg.scaling, cfg.dropout, dora=cfg.dora)
            new.load_phi(parts["lora_A.weight"], parts["lora_B.weight"], parts.get("lora_magnitude_vector"))
            mod.replace(model, path, new)
            phi[peft_key(path, "lora_A.weight")] = new.lora_A.weight
            phi[peft_key(path, "lora_B.weight")] = new.lora_B.weight
            if cfg.dora:
                phi[peft_key(path, "lora_magnitude_vector")] = new.lora_magnitude
        if problems:
            raise mismatch_error(problems)
        return Attached(phi=phi)


_SUFFIXES = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")


def _row_norms(ckpt, module: str, dim: int) -> "torch.Tensor":
    """DoRA's initial magnitude ‖W₀ + s·B·A‖ per output feature with B = 0: accumulated in fp32
    without an fp32 copy of W (``dim`` 1 for [out, in], 0 for Conv1D's [in, out])."""
    import torch

    return torch.linalg.vector_norm(ckpt.get(module + ".weight"), dim=dim, dtype=torch.float32)


def _group(tensors: dict) -> tuple[dict[str, dict], list[str]]:
    """Adapter tensors by module path, and the keys that are no LoRA tensor at all."""
    by_module: dict[str, dict] = {}
    problems: list[str] = []
    for key, t in tensors.items():
        suffix = next((s for s in _SUFFIXES if key.endswith("." + s)), None)
        if not key.startswith(PEFT_PREFIX) or suffix is None:
            problems.append(f"unexpected key {key}")
            continue
        by_module.setdefault(key[len(PEFT_PREFIX) : -len(suffix) - 1], {})[suffix] = t
    return by_module, problems


def _check_module(path: str, parts: dict, cfg: LoraConfig, d_out: int, d_in: int) -> str | None:
    """What is wrong with one module's LoRA tensors for a d_out×d_in layer, or None."""
    a, b, m = parts.get("lora_A.weight"), parts.get("lora_B.weight"), parts.get("lora_magnitude_vector")
    if a is None or b is None:
        return f"{path}: lora_A and lora_B must both be present"
    if a.shape[0] != cfg.rank or b.shape[1] != cfg.rank:
        return f"{path}: rank {a.shape[0]} in the tensors but r={cfg.rank} in the config"
    if tuple(a.shape) != (cfg.rank, d_in) or tuple(b.shape) != (d_out, cfg.rank):
        return f"{path}: lora_A {list(a.shape)} / lora_B {list(b.shape)} do not fit a {d_out}×{d_in} layer"
    if cfg.dora != (m is not None) or (m is not None and tuple(m.shape) != (d_out,)):
        return f"{path}: DoRA magnitude vector missing, unexpected or of the wrong shape"
    return None


def _fold(stored: "torch.Tensor", *, parts: dict, scaling: float, transposed: bool) -> "torch.Tensor":
    from peftcli.methods.lora_layer import lora_delta

    w0 = stored.T if transposed else stored
    delta = lora_delta(w0, parts["lora_A.weight"], parts["lora_B.weight"], scaling, parts.get("lora_magnitude_vector"))
    return delta.T if transposed else delta
