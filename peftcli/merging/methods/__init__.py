"""The merge methods: one module per method, and the one registry that maps names to them.

Adding a method: a module here with a ``MergeMethod`` subclass (``base.py``), one line in
``REGISTRY``, one parity row in tests. An unknown name is an error naming the closest one.
"""

from __future__ import annotations

import difflib

from peftcli.errors import UsageError
from peftcli.merging.methods.base import MergeMethod
from peftcli.merging.methods.breadcrumbs import BREADCRUMBS, BREADCRUMBS_TIES
from peftcli.merging.methods.dare import DARE, DARE_TIES
from peftcli.merging.methods.karcher import KARCHER
from peftcli.merging.methods.della import DELLA, DELLA_LINEAR
from peftcli.merging.methods.linear import LINEAR
from peftcli.merging.methods.model_stock import MODEL_STOCK
from peftcli.merging.methods.multislerp import MULTISLERP
from peftcli.merging.methods.nuslerp import NUSLERP
from peftcli.merging.methods.slerp import SLERP
from peftcli.merging.methods.ties import TIES

REGISTRY: dict[str, MergeMethod] = {m.name: m for m in (LINEAR, TIES, DARE, DARE_TIES, SLERP, BREADCRUMBS, BREADCRUMBS_TIES, DELLA, DELLA_LINEAR, MODEL_STOCK, KARCHER, NUSLERP, MULTISLERP)}


def get_merge_method(name: str) -> MergeMethod:
    method = REGISTRY.get(name)
    if method is None:
        close = difflib.get_close_matches(str(name), REGISTRY, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise UsageError(f"unknown merge method {name!r}", f"{hint}choose one of {', '.join(REGISTRY)}")
    return method


def option_classes() -> list[type]:
    """Every method's options dataclass, once each, in registry order (the CLI's flags)."""
    seen: list[type] = []
    for m in REGISTRY.values():
        if m.options not in seen:
            seen.append(m.options)
    return seen


def option_names() -> list[str]:
    return sorted({n for m in REGISTRY.values() for n in m.option_names()})
