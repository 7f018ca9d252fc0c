"""LoHa (Hyeon-Woo et al., FedPara, 2022): ΔW = (α/r)·(W1a·W1b) ⊙ (W2a·W2b), a Hadamard
product of two rank-r matrices (rank up to r², at the parameters of rank 2r).

Written in PEFT's layout (peft_type LOHA): ``base_model.model.<module>.hada_w1_a`` [out, r],
``hada_w1_b`` [r, in], ``hada_w2_a`` [out, r], ``hada_w2_b`` [r, in]. As PEFT's init: W1a,
W1b, W2a Kaiming-uniform, W2b zero, so ΔW = 0 before training. A linear module adds
2r·(out + in) parameters. PEFT's CP form for convolutions (``hada_t1``, ``hada_t2``, with
use_effective_conv2d) is refused, naming the tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

from peftcli.methods.lycoris.common import (
    LycorisMethod, alpha_option, build, check_common, common_fields, layers_option, product_bound, rank_option, read_only, refuse_unknown,
    targets_option,
)

_CP = "the CP decomposition PEFT uses for convolution kernels (use_effective_conv2d)"


@dataclass
class LohaConfig:
    rank: int = rank_option()
    alpha: float | None = alpha_option()
    targets: str | None = targets_option()
    layers: str | None = layers_option()
    # Read from a PEFT adapter, never options.
    exclude: str | tuple[str, ...] | None = read_only(None)
    rank_pattern: tuple = read_only(())  # ((pattern, rank), ...): PEFT's rank_pattern
    alpha_pattern: tuple = read_only(())
    rank_dropout: float = read_only(0.0)
    module_dropout: float = read_only(0.0)

    def __post_init__(self) -> None:
        check_common(self)


class LoHa(LycorisMethod):
    name = "loha"
    label = "LoHa"
    config_cls = LohaConfig
    summary = "Hadamard product of two low-rank updates, ΔW = (α/r)·(W1a·W1b)⊙(W2a·W2b) (LoHa)."
    peft_type = "LOHA"
    suffixes = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    conv_parts = {"hada_t1": _CP, "hada_t2": _CP}
    examples = (
        "peftcli inject loha --rank 8 model/ -o runs/loha/",
        "peftcli inject loha --rank 4 --alpha 8 --targets all-linear model/ -o runs/loha-all/",
    )

    def parts(self, shape, rank, cfg):
        out, inp = shape
        return {"hada_w1_a": (out, rank), "hada_w1_b": (rank, inp), "hada_w2_a": (out, rank), "hada_w2_b": (rank, inp)}

    def initial(self, suffix, shape):
        return "zeros" if suffix == "hada_w2_b" else "kaiming"

    def delta(self, p):
        return (p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"])

    def fold_delta(self, p):
        # The same product, the second factor multiplied into the first's own memory (no grad here).
        return (p["hada_w1_a"] @ p["hada_w1_b"]).mul_(p["hada_w2_a"] @ p["hada_w2_b"])

    def bound(self, p):
        return product_bound(p, "hada_w1_a", "hada_w1_b") * product_bound(p, "hada_w2_a", "hada_w2_b")

    def config_from_adapter(self, d: dict) -> LohaConfig:
        refuse_unknown(d, self.label, self.own_keys)
        return build(LohaConfig, common_fields(d, self.label), self.label)
