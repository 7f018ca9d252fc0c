"""What a merge method is: a name, its parameters, whether it needs θ₀, and its kernels.

A method is one instance of a ``MergeMethod`` subclass in a module of its own, listed once in
``peftcli.merging.methods.REGISTRY``. Everything else derives from it: the CLI's ``--method``
choices and flags (the ``options`` dataclass's ``peftcli.options.option`` fields, so recipes'
keys too), the arithmetic (``combine``), the streaming engine's per-tensor task (``task``) and
whole-tensor fallback (``whole``), and ``check``'s estimate (``peak_bytes``, ``rate``,
``whole_factor``). Nothing here imports torch at module level: ``peftcli merge --help`` stays light.
"""

from __future__ import annotations

from dataclasses import dataclass

from peftcli.errors import UsageError
from peftcli.options import from_options, option, option_fields


@dataclass
class NoOptions:
    """The parameters of a method that takes none."""


@dataclass
class Density:
    """The parameter of the sparsifying methods (ties, dare, breadcrumbs, della and their -ties/-linear)."""

    density: float | None = option(None, help="Fraction of each task vector kept (ties, dare, dare-ties, breadcrumbs, della and their variants).")


class MergeMethod:
    """One merge method. Subclasses set the class attributes and override the kernels they have."""

    name: str = ""
    summary: str = ""  # one line, for documentation
    options: type = NoOptions  # a dataclass of option() fields: its flags and recipe keys
    needs_base: bool = False  # the kernel takes θ₀ itself, not only the task vectors φᵢ
    # θ₀ + Σ λᵢφᵢ exactly as written: one input of weight 1 that replaces values (a saved module,
    # new token rows) may then be written as its values (merge.engine); a trim or a drop may not.
    weighted_sum: bool = False
    takes_weights: bool = True  # --weights applies
    inputs: tuple[int, int | None] = (1, None)  # how many inputs, (least, most or None)
    rate: str | None = None  # estimate.RATES key of its per-element cost beyond a linear merge

    def option_names(self) -> set[str]:
        return {f.name for f in option_fields(self.options)}

    def configure(self, values: dict):
        """The options instance from ``values`` (name -> value or None); any option this method
        does not take but that is given is an error naming it."""
        from peftcli.merging.methods import REGISTRY

        mine = self.option_names()
        for key, value in values.items():
            if value is not None and key not in mine:
                others = [m.name for m in REGISTRY.values() if key in m.option_names()]
                raise UsageError(f"{self.name} takes no {key.replace('_', '-')}", f"drop the {key.replace('_', '-')} or choose one of {', '.join(others)}")
        return from_options(self.options, values)

    def count_problem(self, n: int) -> UsageError | None:
        """Why this method cannot merge ``n`` inputs (``check`` says it too), or None."""
        least, most = self.inputs
        if n < least or most is not None and n > most:
            exact = f"exactly {least}" if least == most else f"at least {least}"
            return UsageError(f"{self.name} merges {exact} models, got {n}", f"give {exact} inputs, or use `method` linear")
        return None

    def validate(self, cfg, weights: list[float], n: int) -> None:
        """Method-specific checks of the options and weights (``n`` inputs), before anything is read."""
        problem = self.count_problem(n)
        if problem is not None:
            raise problem

    def plan(self, cfg, names) -> None:
        """Bind the options to the base's tensor ``names`` (its layers) before anything is written."""

    # --- kernels -------------------------------------------------------------------------

    def combine(self, phis, weights, cfg, *, seed: int, key: str, dtype, base=None):
        """The merged task vector of one tensor (``needs_base``: the merged tensor θ) in ``dtype``."""
        raise NotImplementedError

    def whole(self, stored, deltas: list, lam: list[float], cfg, *, seed: int, key: str, work):
        """θ of one tensor, whole, in the work dtype: ``deltas[i]`` is input i's φ function or None."""
        import torch

        from peftcli.checkpoint.dtypes import plus_base

        # Every input takes part (zero where it does not touch this tensor): the same result for
        # every method, and DARE's mask for input i depends on i alone.
        phis = [d(stored).to(work) if d is not None else torch.zeros(stored.shape, dtype=work) for d in deltas]
        result = self.combine(phis, lam, cfg, seed=seed, key=key, dtype=work)
        del phis
        plus_base(result, stored)  # accumulated in the work dtype, one cast at the end
        return result

    def task(self, name: str, info, out_dtype: str, streams: list, cfg, *, seed: int, key: str, n_inputs: int):
        """The ranged task (``merge.ranged.Task``) of one tensor; ``streams``: (i, λᵢ, opener) of the touching inputs."""
        raise NotImplementedError

    # --- estimate (peftcli check) ---------------------------------------------------------

    def peak_bytes(self, n: int, touching: int, w: int) -> int:
        """Bytes a ranged merge of one N-element tensor holds at once beyond the inputs' stored values."""
        return 0

    def whole_factor(self, k: int) -> int:
        """Work-dtype copies of one tensor that the whole-tensor path holds at once (k inputs)."""
        return 3 * k + 4
