"""``model-stock``: θ = θ₀ + t·(Σ φᵢ)/k per tensor, t from the task vectors' angle (mergekit's
``model_stock``, its default ``filter_wise: false``; Model Stock, arXiv 2403.19522).

Per tensor, with φ₁ … φₖ (k ≥ 2, every input counted: one that does not touch the tensor has
φ = 0) flattened: cos = the mean over the k(k − 1)/2 pairs i < j of
clamp(φᵢ·φⱼ / max(‖φᵢ‖·‖φⱼ‖, 1e-6), −1, 1), and t = k·cos / (1 + (k − 1)·cos). mergekit writes
t·mean(θᵢ) + (1 − t)·θ₀, the same value; peftcli adds (t/k)·φᵢ to θ₀, which loses no precision
to θ₀'s magnitude. A denominator of 0 (cos = −1/(k − 1), e.g. two opposite task vectors) leaves t
undefined: refused, naming the tensor (mergekit writes Inf or NaN).

Two passes over ranges, like SLERP's (``_stock_kernel.py``): pass 1 accumulates the Gram sums φᵢ·φⱼ in fp64; pass 2
writes θ₀ + Σ (t/k)·φᵢ, cast once. The whole-tensor path runs the same steps over the same
ranges, so both write the same bytes. Where mergekit 0.1.5 differs: it computes the norms, dots
and t in the model's dtype (bf16 models in bf16) and the result as t·mean(θᵢ) + (1 − t)·θ₀;
peftcli's sums are fp64, so fp32 results agree to rounding, bf16 ones to bf16's precision.
Memory: a few ranges; nothing is held whole.
"""

from __future__ import annotations

from peftcli.errors import UsageError
from peftcli.merging.methods.base import MergeMethod, NoOptions


class ModelStock(MergeMethod):
    name = "model-stock"
    summary = "θ₀ + t·mean φᵢ, t = k·cos/(1 + (k − 1)·cos) from the φᵢ's mean pairwise cosine, per tensor"
    options = NoOptions
    needs_base = True
    takes_weights = False
    inputs = (2, None)
    rate = "merge"  # two passes over each tensor: the Gram sums, then the result

    def combine(self, phis, weights, cfg, *, seed, key, dtype, base=None):
        from peftcli.merging.methods._stock_kernel import stock_whole

        if base is None:
            raise UsageError("model-stock needs the base tensor", "pass base= (θ₀) to combine")
        return stock_whole(base.to(dtype), list(phis), len(phis), dtype, key)

    def whole(self, stored, deltas, lam, cfg, *, seed, key, work):
        from peftcli.merging.methods._stock_kernel import stock_whole

        phis = [d(stored).to(work) for d in deltas if d is not None]
        return stock_whole(stored.to(work), phis, len(deltas), work, key)

    def task(self, name, info, out_dtype, streams, cfg, *, seed, key, n_inputs):
        from peftcli.merging.methods._stock_kernel import StockTask

        return StockTask(name, info, out_dtype, [opener for _, _, opener in streams], n_inputs, key)

    def whole_factor(self, k):
        return k + 4  # θ₀, the k φ, the result, a range's fp64 copies


MODEL_STOCK = ModelStock()
