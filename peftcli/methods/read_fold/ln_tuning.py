"""LN tuning (Zhao et al., 2024; PEFT's LN_TUNING), read and folded only: trained copies of the
targeted modules (LayerNorm/RMSNorm), ``base_model.model.<module>.ln_tuning_layers.<param>``
shaped as the base's ``<module>.<param>``. PEFT's merge_and_unload swaps the copy in for the
base module, so folding is replacement: the merged tensor is the saved one (a
``Replacement``), whatever the module's type.

Refused, naming the key: a key of a module the config does not target, of no base tensor, of
another shape; a targeted module whose tensors are not all saved (PEFT saves the whole copy);
targets nested in targets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from peftcli.errors import BadInputError
from peftcli.methods.base import PEFT_PREFIX, LazyTensor, Replacement, base_module, mismatch_error, peft_key
from peftcli.methods.read_fold.base import PeftTargets, ReadFoldBase, peft_targets
from peftcli.methods.vera import refuse_unknown

if TYPE_CHECKING:
    import torch

INFIX = ".ln_tuning_layers."
_KEYS = ("exclude_modules",)  # beyond vera.ACCEPTED: all PEFT 0.21's LNTuningConfig writes


@dataclass(frozen=True)
class LnTuningConfig:
    """What an LN_TUNING adapter config says: the modules it targets (PEFT's rule)."""

    targets: PeftTargets


class LnTuning(ReadFoldBase):
    name = "ln-tuning"
    config_cls = LnTuningConfig
    summary = "Trained copies of the LayerNorm/RMSNorm weights (PEFT's LN_TUNING); folding replaces the base's."
    peft_type = "LN_TUNING"

    def config_from_adapter(self, d: dict) -> LnTuningConfig:
        refuse_unknown(d, "LN_TUNING", _KEYS)
        return LnTuningConfig(peft_targets(d, "LN_TUNING"))

    @staticmethod
    def _targeted(ckpt, cfg: LnTuningConfig) -> dict[str, list[str]]:
        """The base's targeted modules (checkpoint names) and the tensors each holds."""
        modules: dict[str, list[str]] = {}
        for name in ckpt.tensors:
            parts = name.split(".")
            for i in range(1, len(parts)):
                modules.setdefault(".".join(parts[:i]), []).append(name)
        targeted = {m: names for m, names in modules.items() if cfg.targets(m)}
        nested = sorted(m for m in targeted if any(m.startswith(o + ".") for o in targeted))
        if nested:
            raise BadInputError(f"LN_TUNING adapter config targets {nested[0]} inside another targeted module",
                                "PEFT does not nest LN tuning copies: target the norm modules only")
        return targeted

    def init(self, ckpt, cfg: LnTuningConfig, generator: "torch.Generator") -> dict:
        """The tensors PEFT saves for this config on ``ckpt``, at PEFT's init (copies of the base's)."""
        import torch

        out = {}
        for module, names in self._targeted(ckpt, cfg).items():
            for n in names:
                make = lambda n=n: ckpt.get(n).to(torch.float32)  # noqa: E731
                out[peft_key(module, "ln_tuning_layers" + n[len(module):])] = LazyTensor(ckpt.tensors[n].shape, torch.float32, make)
        return out

    def deltas(self, cfg: LnTuningConfig, tensors: dict, ckpt) -> dict:
        """Each saved copy replaces its base tensor (PEFT's merge swaps the module)."""
        targeted = self._targeted(ckpt, cfg)
        problems, out = [], {}
        for key, t in sorted(tensors.items()):
            path, infix, rest = key[len(PEFT_PREFIX):].partition(INFIX)
            if not key.startswith(PEFT_PREFIX) or not infix or INFIX in rest:
                problems.append(f"unexpected key {key}")
                continue
            module = base_module(path, targeted.keys() | _modules(ckpt))
            name = f"{module}.{rest}" if module else None
            if not cfg.targets(path):
                problems.append(f"{key}: a copy of {path}, which the adapter config does not target")
            elif name not in ckpt.tensors:
                problems.append(f"{key}: the base has no tensor {path}.{rest}")
            elif tuple(t.shape) != tuple(ckpt.tensors[name].shape):
                problems.append(f"{key} is {list(t.shape)}, but the base's {name} is {list(ckpt.tensors[name].shape)}")
            else:
                out[name] = Replacement(_saved(t))
        missing = sorted(n for names in targeted.values() for n in names if n not in out)
        if not problems and missing:
            problems.append(f"no saved copy of {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
                            + ", which the adapter config targets")
        if problems:
            raise mismatch_error(problems)
        return out


def _saved(t: "torch.Tensor"):
    """The new values of a replaced tensor: the saved copy, whatever the stored one was."""
    return lambda stored: t


def _modules(ckpt) -> set[str]:
    return {n.rsplit(".", 1)[0] for n in ckpt.tensors if "." in n}
