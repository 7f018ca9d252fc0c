"""PEFT's LoRA initialisations that change the base weights: which peftcli reproduces, which it refuses.

PEFT runs an adapter's ``init_lora_weights`` again every time it loads the adapter:
``PeftModel.from_pretrained`` builds the LoRA layers from the saved config (running the
initialisation on the base it is given) and only then loads the trained A and B. PiSSA and
OLoRA compute an initial B₀·A₀ from the base weight W and replace W by the residual
W − s·B₀·A₀, so the adapter's model is (W − s·B₀A₀) + s·B·A, not W + s·B·A.

Reproduced, by the same operations in the same dtype as PEFT 0.21 (``LoraLayer.pissa_init``,
``olora_init``), so the residual matches PEFT's to float rounding:

- ``"pissa"``: full SVD of W (fp32, [out, in]: GPT-2's Conv1D transposed first);
  B₀A₀ = s·V_r·√(S_r/s)·√(S_r/s)·Uh_r;
- ``"olora"``: QR of W; B₀A₀ = Q[:, :r]·R[:r]. Up to PEFT 0.21 on W as stored (Conv1D not
  transposed, so it only fits square Conv1D layers); from PEFT 0.22 on in the Linear layout
  (Conv1D transposed first, as for PiSSA): the kind ``"olora-linear"``, chosen by the
  adapter config's ``peft_version``. The two give different residuals on a Conv1D layer, so
  an adapter whose version cannot be read is refused there rather than guessed.

The residual is rounded to the weight's dtype, as PEFT stores it in the base layer.

``factors`` gives inject's ``--init pissa|olora`` the initial A₀, B₀ by the same functions,
so what peftcli writes and what it (and PEFT) subtract on load come from one computation.

Refused, because the files do not determine the base PEFT trained against: ``pissa_niter_N``
(randomised SVD), ``corda`` (needs calibration statistics), ``loftq`` (quantised base),
``lora_ga`` (PEFT changed the base by a gradient-derived A·B while training but does not redo
it on load). Plain LoRA at load time (the base is left alone): true, false, ``gaussian``,
``eva``, ``orthogonal``, ``mica``, ``nora`` (A, B are overwritten by the file; MiCA only
freezes B; NoRA, PEFT 0.22, only normalises A's columns).
Anything else PEFT rejects, so peftcli does too. The dispatch mirrors PEFT's
``LoraLayer.update_layer`` (its case rules included).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from peftcli.errors import BadInputError
from peftcli.methods import rank_patterns

if TYPE_CHECKING:
    import torch

REPRODUCED = ("pissa", "olora", "olora-linear")
PLAIN = (True, False, None, "gaussian", "eva", "orthogonal", "mica", "nora")
OLORA_LINEAR_FROM = (0, 22)  # the PEFT release whose OLoRA factors Conv1D in the Linear layout

_CONVERT = (
    "convert it to plain LoRA with PEFT: save_pretrained(out, path_initial_model_for_weight_conversion=<the "
    "initial adapter, saved with init_lora_weights=True>)"
)
_REASONS = {
    "pissa_niter": "PEFT subtracts a randomised SVD's A·B from the base weights each time it loads the adapter",
    "corda": "PEFT subtracts an A·B computed from calibration data (not in the files) from the base weights on load",
    "loftq": "PEFT replaces the base weights by a quantised copy on load",
    "lora_ga": "PEFT subtracted a gradient-derived A·B from the base weights in training and does not on load",
}


def base_init(value, peft_version: object = None) -> str | None:
    """``"pissa"`` / ``"olora"`` / ``"olora-linear"`` when PEFT subtracts an initial A·B from the
    base on load and peftcli reproduces it, None for plain LoRA; a ``BadInputError`` naming the
    value otherwise. ``peft_version``: the adapter config's, which says how OLoRA treated Conv1D."""
    kind = _peft_dispatch(value)
    if kind == "plain":
        return None
    if kind == "olora":
        version = rank_patterns.release(peft_version)
        if version is False:
            return "olora-unknown"
        return "olora-linear" if version is not None and version >= OLORA_LINEAR_FROM else "olora"
    if kind in REPRODUCED:
        return kind
    if kind == "unknown":
        raise BadInputError(
            f"adapter config has init_lora_weights={value!r}, which PEFT does not accept",
            "set it to the value the adapter was trained with, e.g. true",
        )
    raise BadInputError(f"adapter config has init_lora_weights={value!r}, which peftcli cannot reproduce: {_REASONS[kind]}", _CONVERT)


def _peft_dispatch(value) -> str:
    """The branch of PEFT's ``LoraLayer.update_layer`` that ``value`` takes, in its order."""
    if value is None or isinstance(value, bool):
        return "plain"  # True: Kaiming A, B = 0; False/None: nn.Linear's init; the file overwrites both
    if not isinstance(value, str):
        return "unknown"  # PEFT's reset_lora_parameters calls .lower() on it and fails
    if value.startswith("pissa"):
        if value == "pissa":
            return "pissa"
        return "pissa_niter" if len(value.split("_niter_")) == 2 else "unknown"
    if value.startswith("corda"):
        return "corda"
    if value.lower() == "olora":
        return "olora"
    if value.lower() == "mica" or value in ("eva", "orthogonal", "nora"):
        return "plain"
    if value in ("loftq", "lora_ga"):
        return value
    return "plain" if value.lower() == "gaussian" else "unknown"


def module_problem(kind: str | None, path: str, rank: int, d_out: int, d_in: int, transposed: bool) -> str | None:
    """Why PEFT could not load this ``kind`` of adapter on a d_out×d_in layer (or why peftcli
    cannot tell which base PEFT made), or None."""
    if kind is None:
        return None
    if kind == "olora-unknown":
        if not transposed:
            return None  # a Linear layer: every PEFT release factors it the same way
        return (
            f"{path}: OLoRA on a Conv1D layer changed in PEFT 0.22, and the adapter config's peft_version "
            "cannot be read to tell which base PEFT made"
        )
    if rank > min(d_out, d_in):
        return f"{path}: {kind} needs r ≤ min(out, in) = {min(d_out, d_in)}, the config has r={rank} (PEFT cannot load it)"
    if kind == "olora" and transposed and d_out != d_in:
        # PEFT's OLoRA factors Conv1D's stored [in, out] weight: A, B get the shapes of the
        # transposed layer, and loading the adapter fails.
        return f"{path}: PEFT's OLoRA does not fit this non-square Conv1D layer (it cannot load the adapter)"
    return None


def residual(kind: str, stored: "torch.Tensor", rank: int, scaling: float, transposed: bool) -> "torch.Tensor":
    """The base weight PEFT's layer holds after initialising ``kind``: fp32 [out, in], rounded
    to ``stored``'s dtype as PEFT keeps it (``stored`` as in the checkpoint: [in, out] for Conv1D)."""
    import torch

    w = stored.to(torch.float32)
    if kind == "pissa":
        w = w.T if transposed else w
        res = (w - _pissa_init(w, rank, scaling)).to(stored.dtype).float()
        return res
    if kind in ("olora", "olora-unknown"):  # -unknown reaches here for Linear layers only
        res = (w - _olora_init(w, rank, scaling)).to(stored.dtype).float()
        return res.T if transposed else res
    if kind == "olora-linear":
        w = w.T if transposed else w
        return (w - _olora_init(w, rank, scaling)).to(stored.dtype).float()
    raise AssertionError(f"no residual for {kind!r}")


def factors(kind: str, stored: "torch.Tensor", rank: int, scaling: float, transposed: bool) -> tuple["torch.Tensor", "torch.Tensor"]:
    """The initial A₀ [r, in] and B₀ [out, r] (fp32) PEFT's ``kind`` initialisation gives the
    layer whose weight is ``stored`` (as in the checkpoint: [in, out] for Conv1D), for inject.
    OLoRA on Conv1D is not offered: PEFT 0.21 and 0.22 factor it differently."""
    import torch

    w = stored.to(torch.float32)
    if kind == "pissa":
        return _pissa_factors(w.T if transposed else w, rank, scaling)
    if kind == "olora" and not transposed:
        return _olora_factors(w, rank)
    raise AssertionError(f"no inject factors for {kind!r} (transposed={transposed})")


def _pissa_factors(w: "torch.Tensor", r: int, scaling: float) -> tuple["torch.Tensor", "torch.Tensor"]:
    """A₀, B₀ exactly as PEFT's ``pissa_init`` computes them (same operations, same order) on
    ``w`` [out, in] in fp32: A₀ = √(S_r/s)·Uh_r, B₀ = V_r·√(S_r/s)."""
    import torch

    V, S, Uh = torch.linalg.svd(w, full_matrices=False)
    Vr = V[:, :r]
    Sr = S[:r] / scaling
    Uhr = Uh[:r]
    lora_A = torch.diag(torch.sqrt(Sr)) @ Uhr
    lora_B = Vr @ torch.diag(torch.sqrt(Sr))
    return lora_A, lora_B


def _olora_factors(w: "torch.Tensor", r: int) -> tuple["torch.Tensor", "torch.Tensor"]:
    """A₀ = R[:r], B₀ = Q[:, :r] of W = Q·R, as PEFT's ``olora_init`` (on ``w`` as stored)."""
    import torch

    Q, R = torch.linalg.qr(w)
    return R[:r].contiguous(), Q[:, :r].contiguous()


def _pissa_init(w: "torch.Tensor", r: int, scaling: float) -> "torch.Tensor":
    """s·B₀·A₀ exactly as PEFT's ``pissa_init`` computes it (same operations, same order)."""
    lora_A, lora_B = _pissa_factors(w, r, scaling)
    return scaling * lora_B @ lora_A


def _olora_init(w: "torch.Tensor", r: int, scaling: float) -> "torch.Tensor":
    """s·B₀·A₀ exactly as PEFT's ``olora_init`` computes it, on ``w`` as stored."""
    lora_A, lora_B = _olora_factors(w, r)
    return scaling * lora_B @ lora_A
