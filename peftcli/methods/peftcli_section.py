"""The ``adapter_config.json`` of a method PEFT lacks (BitFit, layers, LT-SFT, diff-pruning,
lottery; prefix tuning with ``--layers``): PEFT's layout with ``"peft_type": "PEFTCLI"`` and a
``"peftcli"`` section holding the method and its options,
``{"peft_type": "PEFTCLI", "peftcli": {"method": ..., options}, "base_model_name_or_path": ...}``.
"""

from __future__ import annotations

import dataclasses
import os

from peftcli.errors import BadInputError, UsageError
from peftcli.options import option_fields

PEFTCLI_PEFT_TYPE = "PEFTCLI"


def adapter_config(ckpt, method: str, cfg) -> dict:
    options = {f.name: getattr(cfg, f.name) for f in option_fields(type(cfg))}
    return {
        "peft_type": PEFTCLI_PEFT_TYPE,
        "peftcli": {"method": method, **options},
        "base_model_name_or_path": os.path.abspath(ckpt.path),
    }


def config_from_adapter(d: dict, method: str, cls: type):
    section = dict(d.get("peftcli") or {})
    if section.pop("method", None) != method:
        raise BadInputError(
            f"adapter config is not a peftcli {method} adapter",
            f"its peftcli.method must be {method!r}; the adapter config is corrupt or was edited by hand",
        )
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(section) - known)
    if unknown:
        raise BadInputError(f"{method} adapter config has unknown option {unknown[0]!r}", "was it written by a newer peftcli?")
    try:
        return cls(**section)
    except UsageError as exc:
        raise BadInputError(f"{method} adapter config: {exc.message}", exc.hint) from None


class SectionConfig:
    """Mixed into a method (before ``MethodBase``) whose adapter config is this section of its
    options alone: BitFit, layers, lottery, LT-SFT, diff-pruning."""

    name: str
    config_cls: type

    def adapter_config(self, ckpt, cfg) -> dict:
        return adapter_config(ckpt, self.name, cfg)

    def config_from_adapter(self, d: dict):
        return config_from_adapter(d, self.name, self.config_cls)
