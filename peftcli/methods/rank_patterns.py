"""PEFT's ``rank_pattern`` and ``alpha_pattern``: the rank and alpha PEFT gives each adapted
module, read the way the PEFT release that wrote the adapter reads them.

Each key is a regular expression over module paths, each value a rank (alpha); a module
none matches keeps ``r`` (``lora_alpha``/``alpha``). How a key matches changed twice:

- PEFT 0.15 on (``get_pattern_key``): ``re.match(rf"(.*\\.)?({key})$", module)``, the first
  key of each dict in file order;
- PEFT 0.14: ``re.match(rf".*\\.{key}$", module)``, first key of each dict (no match from the
  path's start: a key naming the whole path only matches through the literal look-up below);
- before 0.14 (LoRA): one key for both dicts, the first of rank_pattern's keys then
  alpha_pattern's that matches as in 0.14, so a module matched by a rank key keeps the default
  alpha unless that same key is in alpha_pattern.

In all of them a module that no key matches is looked up literally (``dict.get(module)``).
``peft_version`` (PEFT writes it from 0.18 on) picks the reading; an adapter without one is
read only where every reading gives a module the same rank and alpha, else refused naming the
module. Keys are matched by ``peftcli.patterns`` (bounded time, ``re``'s syntax and meaning).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from peftcli.errors import BadInputError, UsageError
from peftcli.patterns import FileValue, from_file, search

CURRENT, SEPARATE, COMBINED = "0.15", "0.14", "0.13"  # the readings, by the first PEFT release of each
READINGS = (CURRENT, SEPARATE, COMBINED)


def release(version: object) -> "tuple[int, int] | None | Literal[False]":
    """(major, minor) of a ``peft_version`` such as ``"0.22.0"`` or ``"0.22.0.dev0@<sha>"``;
    None when the config has none (PEFT before it recorded one); False when it cannot be read."""
    if version is None:
        return None
    m = re.match(r"(\d{1,4})\.(\d{1,4})(?:[.+@]|$)", version) if isinstance(version, str) else None
    return (int(m.group(1)), int(m.group(2))) if m else False


def reading(peft_version: object) -> str | None:
    """The reading of the PEFT release that wrote the adapter, or None when it is not known."""
    version = release(peft_version)
    if version is None or version is False:
        return None
    return CURRENT if version >= (0, 15) else SEPARATE if version >= (0, 14) else COMBINED


def _matches(key: str, module: str, how: str) -> bool:
    # PEFT's own text around the key (unbalanced parentheses in a key mean what they mean to
    # PEFT), anchored at the start as re.match is.
    wrapped = rf"\A(?:(.*\.)?({key})$)" if how == CURRENT else rf"\A(?:.*\.{key}$)"
    if isinstance(key, FileValue):
        wrapped = from_file(wrapped, key.origin)
    return search(wrapped, module, "rank_pattern/alpha_pattern key")


def _first(keys, module: str, how: str) -> str:
    return next((k for k in keys if _matches(k, module, how)), module)


def values(ranks: tuple, alphas: tuple, module: str, r: Any, alpha: Any, how: str) -> tuple:
    """(rank, alpha) of ``module`` under one reading; ``ranks``/``alphas``: ((key, value), ...)."""
    rank_of, alpha_of = dict(ranks), dict(alphas)
    if how == COMBINED:
        key = _first([k for k, _ in ranks] + [k for k, _ in alphas], module, how)
        return rank_of.get(key, r), alpha_of.get(key, alpha)
    return rank_of.get(_first(rank_of, module, how), r), alpha_of.get(_first(alpha_of, module, how), alpha)


def module_values(ranks: tuple, alphas: tuple, module: str, r: Any, alpha: Any, how: str | None) -> tuple:
    """(rank, alpha) PEFT gives ``module``; with ``how`` None (the release is not known) only
    when every reading agrees, else a ``BadInputError`` naming the module."""
    if not ranks and not alphas:
        return r, alpha
    if how is not None:
        return values(ranks, alphas, module, r, alpha, how)
    read = {h: values(ranks, alphas, module, r, alpha, h) for h in READINGS}
    if len(set(read.values())) == 1:
        return read[CURRENT]
    (r_new, a_new), (r_old, a_old) = read[CURRENT], next(v for v in read.values() if v != read[CURRENT])
    raise BadInputError(
        f"adapter config: PEFT releases read rank_pattern/alpha_pattern differently for {module} "
        f"(r={r_new}, alpha={a_new:g} from PEFT 0.15 on; r={r_old}, alpha={a_old:g} before), "
        "and the config has no peft_version to say which PEFT wrote it",
        'add the "peft_version" of the PEFT that trained the adapter to adapter_config.json',
    )


def parse(value: "str | dict", what: str, is_rank: bool) -> tuple:
    """``--rank-pattern``/``--alpha-pattern`` text ``REGEX=VALUE,...`` (or, from Python, a dict
    as PEFT's) as ((regex, value), ...), each regex one PEFT can compile."""
    from peftcli.options import ascii_float, ascii_int
    from peftcli.patterns import compile_pattern

    example = f"`{what}` " + ("'layers\\.0\\..*=4,v_proj=16'" if is_rank else "'layers\\.0\\..*=8,v_proj=32'")
    if isinstance(value, dict):
        entries = [(k, v, f"{k}={v}") for k, v in value.items()]
    else:
        entries = []
        for item in value.split(","):
            key, eq, text = item.strip().rpartition("=")
            if not eq or not key:
                raise UsageError(f"`{what}` entry {item.strip()!r} is not REGEX=VALUE", f"e.g. {example}")
            entries.append((key, ascii_int(text) if is_rank else ascii_float(text), item.strip()))
    pairs: dict[str, Any] = {}
    for key, number, shown in entries:
        kind = "a positive whole rank" if is_rank else "a positive finite alpha"
        if not isinstance(key, str) or not key:
            raise UsageError(f"`{what}` key {key!r} is not a regex", f"e.g. {example}")
        numeric = isinstance(number, int if is_rank else (int, float)) and not isinstance(number, bool)
        if not numeric or not 0 < number < float("inf"):  # also NaN
            raise UsageError(f"`{what}` entry {shown!r}: {shown.rpartition('=')[2]!r} is not {kind}", f"e.g. {example}")
        if key in pairs:
            raise UsageError(f"`{what}` gives {key!r} twice", "give each regex once")
        compile_pattern(rf"(.*\.)?({key})$", f"`{what}` {key!r}")  # PEFT compiles it so: refuse what it cannot
        pairs[key] = number
    return tuple(pairs.items())


def from_config(d: dict, key: str, what: str, hint: str) -> tuple:
    """An adapter config's ``rank_pattern``/``alpha_pattern`` as ((key, value), ...), each key
    marked as read from the file and each value checked (a positive int rank, a positive alpha)."""
    from peftcli.checkpoint.model_config import is_json_number

    value = d.get(key) or {}
    rank = key == "rank_pattern"

    def ok(v) -> bool:
        if rank:
            return isinstance(v, int) and not isinstance(v, bool) and v >= 1
        return is_json_number(v) and v > 0

    if not isinstance(value, dict) or not all(isinstance(k, str) and ok(v) for k, v in value.items()):
        raise BadInputError(f"{what} adapter config: '{key}' must map module patterns to {'ranks' if rank else 'alphas'}", hint)
    return tuple((from_file(k, f"adapter_config.json {key}"), v) for k, v in value.items())
