"""LoKr (Edalati et al., 2022; LyCORIS): ΔW = (α/r)·W1 ⊗ W2, a Kronecker product whose
factors are full matrices or rank-r products.

For a linear layer [out, in] PEFT factors out = a·b and in = c·d (``factorization``, near
the square root, or ``decompose_factor``) and saves, in its layout (peft_type LOKR):
``lokr_w1`` [a, c], or ``lokr_w1_a`` [a, r]·``lokr_w1_b`` [r, c] when ``decompose_both`` and
r < max(a, c)/2; ``lokr_w2`` [b, d], or ``lokr_w2_a`` [b, r]·``lokr_w2_b`` [r, d] when
r < max(b, d)/2. The scale is α/r in every case (PEFT 0.21 applies it to full factors
too, unlike LyCORIS's own scale of 1). As PEFT's init: W1 (or W1a) zero, the rest
Kaiming-uniform, so ΔW = 0 before training. ``lokr_t2`` (the CP form PEFT uses for
convolution kernels) is refused, naming the tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

from peftcli.errors import BadInputError, UsageError
from peftcli.methods.base import TrainDefaults
from peftcli.methods.lycoris.common import (
    CORRUPT, LycorisMethod, alpha_option, build, check_common, common_fields, layers_option, peak, product_bound, rank_option, read_only,
    refuse_unknown, targets_option,
)
from peftcli.options import option

_OWN = ("decompose_both", "decompose_factor", "rank_dropout_scale")


@dataclass
class LokrConfig:
    rank: int = rank_option(
        "rank r of a factor made low-rank (W2 when r < half its larger side); α/r scales ΔW whether or not any is (default 8)"
    )
    alpha: float | None = alpha_option()
    targets: str | None = targets_option()
    layers: str | None = layers_option()
    decompose_both: bool = option(False, help="also make the left Kronecker factor W1 a rank-r product (when r < half its larger side)")
    decompose_factor: int = option(
        -1, min=-1, help="split each dimension as factor × rest when the factor divides it; -1 (default): near its square root",
    )
    # Read from a PEFT adapter, never options.
    exclude: str | tuple[str, ...] | None = read_only(None)
    rank_pattern: tuple = read_only(())
    alpha_pattern: tuple = read_only(())
    rank_dropout: float = read_only(0.0)
    module_dropout: float = read_only(0.0)
    rank_dropout_scale: bool = read_only(False)

    def __post_init__(self) -> None:
        check_common(self)
        if self.decompose_factor == 0 or self.decompose_factor < -1:
            raise UsageError(f"`decompose_factor` must be -1 or positive, got {self.decompose_factor}", "e.g. `decompose_factor` 4")


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n), m ≤ n, m·n = dimension, as PEFT's lokr ``factorization``: ``factor`` itself when it
    divides the dimension; else the divisor pair closest to the square root with m ≤ factor."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor  # PEFT returns this pair as it is, even with m > n
    limit = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        nxt = m + 1
        while dimension % nxt:
            nxt += 1
        if nxt + dimension // nxt > m + n or nxt > limit:
            break
        m, n = nxt, dimension // nxt
    return (n, m) if m > n else (m, n)


class LoKr(LycorisMethod):
    name = "lokr"
    train_defaults = TrainDefaults(lr=3e-2, generative_lr=3e-3)  # benchmarks/README.md: "Training defaults"
    label = "LoKr"
    config_cls = LokrConfig
    summary = "Kronecker product of two small factors, ΔW = (α/r)·W1⊗W2, each full or rank r (LoKr)."
    peft_type = "LOKR"
    suffixes = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
    conv_parts = {"lokr_t2": "the CP decomposition PEFT uses for convolution kernels (use_effective_conv2d)"}
    own_keys = _OWN
    examples = (
        "peftcli inject lokr model/ -o runs/lokr/",
        "peftcli inject lokr --rank 2 --decompose-both --targets all-linear model/ -o runs/lokr-both/",
    )

    def parts(self, shape, rank, cfg):
        out, inp = shape
        (a, b), (c, d) = factorization(out, cfg.decompose_factor), factorization(inp, cfg.decompose_factor)
        w1 = {"lokr_w1_a": (a, rank), "lokr_w1_b": (rank, c)} if cfg.decompose_both and rank < max(a, c) / 2 else {"lokr_w1": (a, c)}
        w2 = {"lokr_w2_a": (b, rank), "lokr_w2_b": (rank, d)} if rank < max(b, d) / 2 else {"lokr_w2": (b, d)}
        return {**w1, **w2}

    def initial(self, suffix, shape):
        return "zeros" if suffix in ("lokr_w1", "lokr_w1_a") else "kaiming"

    def delta(self, p):
        import torch

        w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
        w2 = p["lokr_w2"] if "lokr_w2" in p else p["lokr_w2_a"] @ p["lokr_w2_b"]
        return torch.kron(w1, w2.contiguous())

    def bound(self, p):
        w1 = peak(p["lokr_w1"]) if "lokr_w1" in p else product_bound(p, "lokr_w1_a", "lokr_w1_b")
        w2 = peak(p["lokr_w2"]) if "lokr_w2" in p else product_bound(p, "lokr_w2_a", "lokr_w2_b")
        return w1 * w2  # each entry of W1⊗W2 is one product of an entry of each

    def own_config(self, cfg) -> dict:
        return {"decompose_both": cfg.decompose_both, "decompose_factor": cfg.decompose_factor, "rank_dropout_scale": False}

    def rescales_rank_dropout(self, cfg) -> bool:
        return cfg.rank_dropout_scale

    def config_from_adapter(self, d: dict) -> LokrConfig:
        refuse_unknown(d, self.label, self.own_keys)
        fields = common_fields(d, self.label)
        both, factor, rescale = d.get("decompose_both", False), d.get("decompose_factor", -1), d.get("rank_dropout_scale", False)
        if not isinstance(both, bool) or not isinstance(rescale, bool):
            raise BadInputError(f"{self.label} adapter config: decompose_both and rank_dropout_scale must be true or false", CORRUPT)
        if isinstance(factor, bool) or not isinstance(factor, int) or not (factor == -1 or factor > 0):
            raise BadInputError(f"{self.label} adapter config: 'decompose_factor' must be -1 or a positive integer, not {factor!r}", CORRUPT)
        return build(LokrConfig, {**fields, "decompose_both": both, "decompose_factor": factor, "rank_dropout_scale": rescale}, self.label)
