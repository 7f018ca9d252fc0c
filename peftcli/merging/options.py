"""The options of ``peftcli merge`` (and of a recipe's merge step), declared and checked once.

``MergeOptions`` holds everything but the base, the inputs and the output: the weights λᵢ,
the method and its parameters (``params``, declared by each method in ``peftcli.merging.methods``),
the seed, the output dtype and shard size, and the head mode. Building one checks it: the
weights written in ASCII, finite, and with Σ|λᵢ| finite in the fp32 the merge computes in; a
known method whose parameters are its own; a known dtype and head mode. No torch is imported
here, so ``peftcli merge --help`` stays light.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from peftcli.errors import UsageError
from peftcli.merging.methods import REGISTRY, get_merge_method, option_names
from peftcli.options import ascii_float, check_declared, from_options, option

MERGE_DTYPES = ("F32", "BF16", "F16", "F64")  # --dtype's choices, in --help's order
HEAD_MODES = ("each", "average")  # as peftcli.merging.heads.HEAD_MODES
FLOAT32_MAX = 3.4028234663852886e38  # merging computes in fp32: a larger weight, or sum of weights, is inf


@dataclass
class MergeOptions:
    weights: list[float] | str | None = option(
        None, help="Comma-separated λᵢ, one per input (default 1 each): θ₀ + Σ λᵢ φᵢ."
    )
    method: str = option("linear", help="How the task vectors combine.", choices=tuple(REGISTRY), show_default=True)
    seed: int = option(0, help="Seed of DARE's random drop.", min=0, max=2**63 - 1, show_default=True)
    dtype: str | None = option(None, help="Output dtype of floating tensors (default: the base's).", choices=MERGE_DTYPES)
    max_shard_size: str | None = option(None, help="Re-shard the output at this size (default: the base's shard layout).")
    force: bool = option(False, help="Replace OUTPUT if it exists.")
    allow_pickle: bool = option(False, help="Allow PyTorch .bin/.pt checkpoints (torch.load(weights_only=True)).")
    heads: str = option(
        "each", choices=HEAD_MODES, show_default=True,
        help="Inputs with classification heads: each (one model per input) or average (one model, heads of one task averaged).",
    )
    params: dict[str, Any] = field(default_factory=dict)  # the method's parameters by name (None: not given)
    # --to-adapter (peftcli.conversion.merge_to_adapter): after params, so from_keywords' positions hold
    to_adapter: bool = option(False, help="Write one LoRA adapter (-o DIR): the method's combination of the ΔWᵢ per linear weight (linear: Σ λᵢ ΔWᵢ), re-factored by truncated SVD.")
    rank: int | None = option(None, min=1, help="With --to-adapter: the LoRA's rank (default 16).")
    energy: float | None = option(None, metavar="E", help="With --to-adapter, instead of --rank: per weight the smallest rank keeping E of ‖ΔW‖².")
    # merging.vocab: full checkpoints whose vocabularies differ, merged token by token
    tokenizer_source: str | None = option(
        None, metavar="base|union|MODEL",
        help="Merge models whose vocabularies differ by token: the output takes the base's tokenizer, the union of all, or MODEL's.",
    )

    def __post_init__(self) -> None:
        if isinstance(self.weights, str):
            self.weights = parse_weights(self.weights)
        elif self.weights is not None:
            self.weights = [float(w) for w in self.weights]
            _check_weights(self.weights, ",".join(map(repr, self.weights)))
        if self.dtype is not None and self.dtype not in MERGE_DTYPES:
            raise UsageError(f"unknown `dtype` {self.dtype!r}", "choose F32, BF16, F16 or F64")
        if self.heads not in HEAD_MODES:
            raise UsageError(f"unknown heads mode {self.heads!r}", "choose each or average")
        if self.tokenizer_source is not None and not (isinstance(self.tokenizer_source, str) and self.tokenizer_source):
            raise UsageError(f"`tokenizer_source` {self.tokenizer_source!r} is not a name", "give base, union, or a merged model's path")
        _check_to_adapter(self)
        m = get_merge_method(self.method)
        self.params = dict(self.params)
        m.configure(self.params)  # a parameter of another method, or a value its declaration refuses
        check_declared(self)

    @property
    def density(self) -> float | None:
        return self.params.get("density")


def _check_to_adapter(opts: MergeOptions) -> None:
    """``to_adapter`` combines the task vectors (the ΔWs, θ₀ = 0) into an adapter: a method of the
    task vectors alone (linear, ties, dare...); the checkpoint's options do not apply."""
    if opts.to_adapter and opts.tokenizer_source is not None:
        raise UsageError("`tokenizer_source` does not apply with `to_adapter`: an adapter keeps the base's vocabulary", "drop `tokenizer_source`")
    if not opts.to_adapter:
        given = next((k for k in ("rank", "energy") if getattr(opts, k) is not None), None)
        if given:
            raise UsageError(f"`{given}` only applies with `to_adapter`", "add `to_adapter`, or drop it")
        return
    method = REGISTRY.get(opts.method)
    if method is not None and method.needs_base:  # θ₀ = 0 would silently change what the method means
        alone = ", ".join(n for n, m in REGISTRY.items() if not m.needs_base)
        raise UsageError(f"`to_adapter` combines the ΔWs alone, and {opts.method} needs the base tensor θ₀", f"use `method` {alone}")
    other = next((k for k, v in (("dtype", opts.dtype), ("max_shard_size", opts.max_shard_size)) if v is not None), None)
    if other or opts.heads != "each":
        raise UsageError(f"`{other or 'heads'}` does not apply with `to_adapter`: it writes an adapter", f"drop `{other or 'heads'}`")
    if opts.rank is not None and opts.energy is not None:
        raise UsageError("`rank` and `energy` are two ways to choose the rank: give one", "e.g. `rank` 16, or `energy` 0.9")
    if opts.energy is not None and not (isinstance(opts.energy, (int, float)) and 0 < opts.energy <= 1):
        raise UsageError(f"`energy` must be in (0, 1], got {opts.energy!r}", "e.g. `energy` 0.9 keeps 90% of ‖ΔW‖² per weight")


def parse_weights(text: str) -> list[float]:
    """``--weights 1.0,0.8``: λᵢ in ASCII, finite, and small enough that Σ|λᵢ| is finite in fp32."""
    weights = []
    for part in text.split(","):
        number = ascii_float(part)
        if number is None:
            raise UsageError(f"`weights`: {part!r} is not a valid float (digits 0-9 only)", "give `weights` numbers such as 1.0,0.8")
        weights.append(number)
    _check_weights(weights, text)
    return weights


def _check_weights(weights: list[float], text: str) -> None:
    for w in weights:
        if not math.isfinite(w):
            raise UsageError(f"`weights`: {w!r} is not a finite number", "give `weights` numbers such as 1.0,0.8")
    total = sum(abs(w) for w in weights)
    if total > FLOAT32_MAX:
        raise UsageError(
            f"`weights` {text!r} sums to |λ| = {total:g}, beyond float32's 3.4e+38, where the merge computes",
            "give smaller weights",
        )


def merge_options(values: dict[str, Any]) -> MergeOptions:
    """``MergeOptions`` from the command line's values or a recipe step's keys: the declared
    options by name, and every merge method's parameters (None where not given) as ``params``."""
    return from_options(MergeOptions, values, params={k: values.get(k) for k in option_names()})


def from_keywords(
    *, weights=None, method: str = "linear", density: float | None = None, seed: int = 0, dtype: str | None = None,
    max_shard_size=None, force: bool = False, allow_pickle: bool = False, heads: str = "each", options: dict | None = None,
) -> MergeOptions:
    """``MergeOptions`` from ``engine.merge``'s keyword form (``options``: the method's parameters)."""
    params = dict(options or {})
    if density is not None:
        params["density"] = density
    return MergeOptions(weights, method, seed, dtype, max_shard_size, force, allow_pickle, heads, params)
