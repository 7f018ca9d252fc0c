"""What every read-and-fold only method shares: the refusals of what only an injectable
method does (``budget``, ``adapter_config``, ``attach``: one line naming the type), and PEFT's
rule for which modules an adapter config targets (``peft_targets``).

``init`` stays each method's own: ``check`` compares an adapter's keys and shapes with the φ
``init`` lays out for the config on the base, so a read-only method lays out the tensors
PEFT would save (its values are PEFT's initial ones where PEFT's init is a copy of the base).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, NoReturn

from peftcli.errors import BadInputError, UsageError
from peftcli.methods.base import MethodBase, TrainDefaults

CORRUPT = "the adapter config is corrupt or was edited by hand"


class ReadFoldBase(MethodBase):
    """A PEFT type peftcli reads and folds only (``read_only``): no inject, attach or train."""

    name: str
    peft_type: str
    read_only = True
    folds = True
    train_defaults = TrainDefaults(lr=1e-3)  # never used: peftcli does not train it

    def _refuse(self, what: str) -> NoReturn:
        raise UsageError(
            f"{self.name} ({self.peft_type}) adapters are read-and-fold only in peftcli: it cannot {what} them",
            "peftcli merge, convert and check take the adapter; to train or run it unmerged, load it with PEFT",
        )

    def budget(self, shapes, model_config, cfg) -> NoReturn:
        self._refuse("inject")

    def adapter_config(self, ckpt, cfg) -> NoReturn:
        self._refuse("inject")

    def attach(self, model, cfg, tensors, model_config) -> NoReturn:
        self._refuse("attach or train")

    def _selected(self, ckpt, cfg):
        """(the modules ``cfg`` targets on ``ckpt``, or the error that they do not fit: ``selection``)."""
        from peftcli.methods.base import selection
        from peftcli.targets import resolve_targets

        shapes = {t.name: t.shape for t in ckpt.tensors.values()}
        return selection(lambda: {m.name: m for m in resolve_targets(shapes, ckpt.config, cfg.targets, cfg.layers)},
                         f"{self.peft_type} adapter config", "was target_modules")


def refuse_options(d: dict, what: str, label: str, unused: dict[str, Any]) -> None:
    """Refuse each option of adapter config ``d`` set to anything but its value when unused
    (``unused``: key → that value; null counts as unused too): peftcli's fold would ignore it."""
    for key, empty in unused.items():
        if d.get(key, empty) not in (empty, None):
            raise BadInputError(f"{what} adapter config has {key} {d[key]!r}, which peftcli does not read",
                                f"peftcli folds {label} adapters without {key}; merge this one with PEFT's merge_and_unload")


def require_targets(d: dict, what: str) -> None:
    if d.get("target_modules") is None:
        raise BadInputError(f"{what} adapter config has no target_modules", CORRUPT)


def positive_int(d: dict, what: str, key: str, default: int) -> int:
    """``d[key]`` (``default`` when absent), refused unless a positive integer."""
    from peftcli.methods.vera import is_int

    value = d.get(key, default)
    if not is_int(value) or value < 1:
        raise BadInputError(f"{what} adapter config: {key!r} must be a positive integer, not {value!r}", CORRUPT)
    return value


@dataclass(frozen=True)
class PeftTargets:
    """PEFT's ``target_modules``, ``exclude_modules`` and ``modules_to_save`` as its
    ``check_target_module_exists`` reads them (no layers_to_transform: the types here have none)."""

    targets: Any  # a regex (full match) or a list of names (exact or dotted suffix)
    exclude: Any = None
    save: tuple[str, ...] = ()

    def __call__(self, module: str) -> bool:
        if self.exclude and _matches(self.exclude, module):
            return False
        if any(re.match(rf"(^|.*\.){m}($|\..*)", module) for m in self.save):
            return False
        return _matches(self.targets, module)


def _matches(spec, module: str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, module) is not None
    return module in spec or any(module.endswith("." + t) for t in spec)


def peft_targets(d: dict, what: str) -> PeftTargets:
    """The target rule of PEFT adapter config ``d``; a config without resolved targets is refused."""
    targets, exclude, save = d.get("target_modules"), d.get("exclude_modules"), d.get("modules_to_save") or []
    for key, value, required in (("target_modules", targets, True), ("exclude_modules", exclude, False)):
        if value is None and not required:
            continue
        if not (isinstance(value, str) or (isinstance(value, list) and all(isinstance(t, str) for t in value))):
            raise BadInputError(f"{what} adapter config: {key!r} must be a regex or a list of module names, not {value!r}", CORRUPT)
        if isinstance(value, str):
            try:
                re.compile(value)
            except re.error as exc:
                raise BadInputError(f"{what} adapter config: {key!r} is not a valid regex ({exc})", CORRUPT) from None
    if not targets:
        raise BadInputError(f"{what} adapter config: 'target_modules' is empty, so the adapter targets no module", CORRUPT)
    if not (isinstance(save, list) and all(isinstance(m, str) for m in save)):
        raise BadInputError(f"{what} adapter config: 'modules_to_save' must be a list of module names", CORRUPT)
    return PeftTargets(targets if isinstance(targets, str) else tuple(targets),
                       exclude if isinstance(exclude, str) or exclude is None else tuple(exclude), tuple(save))


def checked_folds(out: dict, problems: list[str], selected, unfit, what: str) -> dict:
    """The folds of ``deltas`` (``out``: base weight → delta), once every targeted module has
    one: the problems found (or the first targeted module with no ``what``, and how many more)
    raised together, then the config's own unfitness (``unfit``), else ``out``."""
    from peftcli.methods.base import mismatch_error

    missing = sorted(n for n in (selected or {}) if n + ".weight" not in out)
    if missing and not problems:
        problems.append(f"no {what} for {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
                        + ", which the adapter config targets")
    if problems:
        raise mismatch_error(problems)
    if unfit is not None:
        raise unfit
    return out
