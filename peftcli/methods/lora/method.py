"""LoRA (Hu et al., 2021): h = W₀x + (α/r)·B·A·x with A: [r, in], B: [out, r].

Variants: rsLoRA scales by α/√r; DoRA (Liu et al., 2024) learns a magnitude m per output
feature and uses W' = m · (W₀ + sBA) / ‖W₀ + sBA‖ (row norms, treated as a constant in
backprop, as the paper suggests). On a d×k matrix LoRA adds r·(d + k) parameters (+ d for
DoRA, + d for lora_B's bias). A starts Kaiming-uniform (or Gaussian), B at zero, so ΔW = 0
before training (PEFT's orthogonal init: A and B non-zero with B·A = 0; PiSSA/OLoRA: A, B
from W's SVD/QR, and the base PEFT loads them on is W − s·B·A, see base_init; EVA: A from the
principal components of each layer's inputs over data, ranks redistributed, see eva_init). PEFT's
rank_pattern/alpha_pattern give modules their own r and α (``LoraConfig.for_module``).
Written in PEFT's layout: ``base_model.model.<module>.lora_A.weight`` [r, in],
``...lora_B.weight`` [out, r] (``...lora_B.bias`` [out]), ``...lora_magnitude_vector`` [out].
Embedding layers named in the targets, a tied ``lm_head`` and trainable tokens: ``embeddings``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from peftcli.errors import BadInputError, UsageError
from peftcli.methods.base import Attached, MethodBase, BudgetRow, LazyTensor, Replacement, SeededDraws, base_module, lazy_zeros, mismatch_error, peft_key, selection, targeted_module, PEFT_PREFIX, TrainDefaults
from peftcli.methods import rank_patterns
from peftcli.methods.lora import base_init as lora_init, config_keys, embeddings as lora_embeddings, trained_bias
from peftcli.methods.lora import parameters as lora_params
from peftcli.options import option
from peftcli.patterns import from_file
from peftcli.targets import excluded, is_regex, linear_modules, names_module, resolve_targets

if TYPE_CHECKING:
    import torch

INITS = ("kaiming", "gaussian", "orthogonal", "pissa", "olora", "eva")
BASE_INITS = ("pissa", "olora")  # PEFT subtracts s·B₀·A₀ from the base weights when it loads the adapter
FP32_MAX = 3.4028234663852886e38  # the largest finite float32


def _when_given(declared):
    """An option recorded in inject's ``peftcli.options`` metadata only when it is given (an
    adapter made without it stays byte for byte what it was before the option existed)."""
    return dataclasses.field(default=declared.default, metadata={**declared.metadata, "recorded": "given"})


@dataclass
class LoraConfig:
    rank: int = option(8, "-r", help="rank r of the update B·A (default 8)")
    alpha: float | None = option(
        None, help="scaling numerator α; default 2×rank (PEFT defaults to 8 whatever the rank)"
    )
    targets: str | None = option(
        None,
        metavar="NAMES|REGEX|all-linear",
        help="modules to adapt: comma-separated names (q_proj,v_proj), a regex over module paths, "
        "or all-linear; default: the query and value projections, as in the LoRA paper",
    )
    layers: str | None = option(None, metavar="RANGES", help="only these layers, e.g. 20-29 or 0,2,4-6")
    dora: bool = option(False, help="DoRA: also learn a magnitude per output feature")
    rslora: bool = option(False, help="rsLoRA: scale by α/√r instead of α/r")
    dropout: float = option(0.0, help="dropout on the LoRA branch's input during training (default 0)")
    init: str = option(
        "kaiming", metavar="kaiming|gaussian|orthogonal|pissa|olora|eva",
        help="initialisation of A (B zero); default kaiming, as PEFT; orthogonal: PEFT's, A and B both non-zero with B·A = 0 (even ranks); "
        "pissa (SVD of W) / olora (QR of W): PEFT's, A and B from the base weight, which PEFT replaces by W − (α/r)·B·A when it loads the adapter; "
        "eva: A from the principal components of each target's inputs over `init_data`, ranks redistributed (PEFT's EVA; base unchanged)",
    )
    init_data: str | None = _when_given(option(
        None, metavar="FILE", path=True,
        help="`init` eva: the examples the base is run over (the formats train reads: text, prompt+completion or messages rows)",
    ))
    eva_rho: float = _when_given(option(
        2.0, help="`init` eva: a target may get up to round(eva_rho·rank) ranks of the total rank·targets (PEFT's EvaConfig.rho, >= 1; "
        "default 2; 1 keeps every rank); α is scaled with each rank, as PEFT's adjust_scaling_factors",
    ))
    eva_examples: int | None = _when_given(option(
        None, min=1, help="`init` eva: use only the first N examples of `init_data` (default all)",
    ))
    eva_max_length: int = _when_given(option(
        128, min=1, help="`init` eva: truncate examples to this many tokens (default 128, as train)",
    ))
    rank_pattern: str | dict | None = _when_given(option(
        None, metavar="REGEX=R,...",
        help="per-module ranks, written as PEFT's rank_pattern: a module whose path matches REGEX (whole, or after a dot) "
        "gets rank R, the first matching REGEX wins; the others keep --rank (--alpha is not changed by it)",
    ))
    alpha_pattern: str | dict | None = _when_given(option(
        None, metavar="REGEX=ALPHA,...", help="per-module α, written as PEFT's alpha_pattern (matched as --rank-pattern)",
    ))
    # The patterns as ((regex, value), ...): parsed from the two options above, or read from an
    # adapter's rank_pattern/alpha_pattern; and how PEFT matches their keys (``rank_patterns``:
    # the reading of the PEFT release that wrote the adapter, None when it is not known).
    ranks: tuple = field(default=(), metadata={"recorded": False})
    alphas: tuple = field(default=(), metadata={"recorded": False})
    pattern_reading: str | None = field(default=rank_patterns.CURRENT, metadata={"recorded": False})
    # Read from an adapter, not an option: "pissa"/"olora" when PEFT subtracts an initial A·B
    # from the base weights on load (see base_init), None for plain LoRA. The fields below are
    # read from adapters, never options, and not recorded in what inject writes (its options
    # metadata stays as it was).
    base_init: str | None = field(default=None, metadata={"recorded": False})
    # PEFT's exclude_modules: module names (exact or a dotted suffix) or one regex over module
    # paths, removed from the targets as PEFT removes them.
    exclude: str | tuple[str, ...] | None = field(default=None, metadata={"recorded": False})
    # PEFT's lora_bias: lora_B has a bias (zero at first), folded into the base's bias.
    lora_bias: bool = _when_given(option(
        False, help="also train a bias on lora_B (PEFT's lora_bias), merged into the base's bias: targets with a bias only; not with --dora or another --init"
    ))
    trainable_tokens: str | None = _when_given(option(
        None, metavar="IDS|MODULE=IDS;...",
        help="also train these rows of the input embedding (PEFT's trainable_token_indices): token ids 3,5,7, "
        "or MODULE=IDS per embedding, ';' between; a tied output head reads the trained rows too",
    ))
    # Read from a PEFT adapter (inject: from `targets` names and `trainable_tokens`): embedding
    # layers with LoRA (lora_embedding_A/B), and token_indices ((module or "" for the input
    # embedding, ids), ...), rows trained whole. peft_embeddings: read from an adapter.
    peft_embeddings: bool = field(default=False, metadata={"recorded": False})
    token_indices: tuple | None = field(default=None, metadata={"recorded": False})
    # PEFT's bias "all"/"lora_only": the base's biases trained and saved beside LoRA (read and
    # folded only: trained_bias); inject trains none.
    bias: str = field(default="none", metadata={"recorded": False})
    # PEFT's target_parameters (its ParamWrapper): LoRA on 2-D/3-D parameters, see lora/parameters.py.
    target_parameters: str | None = _when_given(option(
        None, metavar="NAMES",
        help="LoRA on these parameters (PEFT's target_parameters): comma-separated parameter paths or suffixes, 2-D ones "
        "or Llama 4's fused 3-D experts (feed_forward.experts.gate_up_proj,feed_forward.experts.down_proj); "
        "without --targets no module is adapted besides them",
    ))
    # EVA's A per target module path (torch tensors [k, in]), made by ``LoRA.prepare_init`` from
    # the data; the targets, ranks and α's of that config are EVA's.
    eva: dict | None = field(default=None, metadata={"recorded": False}, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise UsageError(f"`rank` must be positive, got {self.rank}", "e.g. `rank` 8")
        if self.alpha is None:
            self.alpha = 2.0 * self.rank
        elif not math.isfinite(self.alpha) or self.alpha <= 0:
            raise UsageError(
                f"`alpha` must be a positive number, got {self.alpha}", "e.g. `alpha` 16, or leave it out for 2×rank"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise UsageError(f"`dropout` must be in [0, 1), got {self.dropout}", "e.g. `dropout` 0.05")
        if isinstance(self.init, str) and self.init.startswith("pissa_niter"):
            raise UsageError(
                f"`init` {self.init} is not offered: PEFT redoes its randomised SVD each time it loads the adapter, "
                "so the base weights it trains against are not fixed by the files",
                "use `init` pissa (the full SVD, which PEFT reproduces exactly)",
            )
        if self.init not in INITS:
            raise UsageError(f"`init` must be one of {', '.join(INITS)}, got {self.init!r}", "e.g. `init` kaiming")
        self._check_eva()
        if self.lora_bias and (self.dora or self.init != "kaiming"):
            # PEFT's LoraConfig refuses both: it cannot create such an adapter
            raise UsageError("`lora_bias` goes with plain LoRA only (PEFT refuses it with DoRA or an `init` other than kaiming)",
                             "drop `lora_bias`, or `dora` and `init`")
        for name, parsed, is_rank in (("rank_pattern", "ranks", True), ("alpha_pattern", "alphas", False)):
            text = getattr(self, name)
            if text is None:
                continue
            if not (isinstance(text, dict) and text) and not (isinstance(text, str) and text.strip()):
                raise UsageError(f"`{name}` must be text REGEX=VALUE,... (or a dict), got {text!r}", f"e.g. `{name}` 'q_proj=4'")
            setattr(self, parsed, rank_patterns.parse(text, name, is_rank))
        if self.trainable_tokens is not None:
            self.token_indices = lora_embeddings.parse_tokens(self.trainable_tokens)
        odd = next((r for r in (self.rank, *(v for _, v in self.ranks)) if r % 2), None)
        if self.init == "orthogonal" and odd is not None:
            raise UsageError(f"`init` orthogonal needs even ranks (PEFT splits an orthogonal r×r matrix in two), got {odd}",
                             f"use rank {odd + 1} or {odd - 1} there" if odd > 1 else "use rank 2")
        if self.target_parameters is not None:
            if not lora_params.names(self.target_parameters):
                raise UsageError("`target_parameters` names no parameter", "e.g. `target_parameters` feed_forward.experts.gate_up_proj")
            lora_params.refuse_options(self)

    def _check_eva(self) -> None:
        given = [n for n in ("init_data", "eva_examples") if getattr(self, n) is not None]
        given += [n for n, d in (("eva_rho", 2.0), ("eva_max_length", 128)) if getattr(self, n) != d]
        if self.init != "eva":
            if given:
                raise UsageError(f"`{given[0]}` applies to `init` eva only", "add `init` eva, or drop it")
            return
        if self.init_data is None:
            raise UsageError("`init` eva needs `init_data`: the examples whose layer inputs give A", "e.g. `init_data` train.jsonl")
        if not self.eva_rho >= 1.0:
            raise UsageError(f"`eva_rho` must be at least 1, got {self.eva_rho}", "e.g. `eva_rho` 2 (1: no redistribution)")
        clash = next((n for n, on in (("dora", self.dora), ("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)) if on), None)
        if clash:
            raise UsageError(f"`init` eva does not take `{clash}`: EVA chooses each target's rank (and α) itself", f"drop `{clash}`")

    def for_module(self, module: str) -> "LoraConfig":
        """The config of one module: its rank and alpha from the patterns (self when there are none)."""
        if not self.ranks and not self.alphas:
            return self
        r, a = rank_patterns.module_values(self.ranks, self.alphas, module, self.rank, self.alpha, self.pattern_reading)
        return dataclasses.replace(self, rank=r, alpha=float(a), rank_pattern=None, alpha_pattern=None, ranks=(), alphas=(),
                                   trainable_tokens=None)

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


class LoRA(MethodBase):
    name = "lora"
    train_defaults = TrainDefaults(lr=6e-3, generative_lr=1e-3)  # benchmarks/README.md: "Training defaults"
    folds = True
    config_cls = LoraConfig
    summary = "Low-rank update ΔW = (α/r)·B·A on linear layers (also DoRA, rsLoRA)."
    peft_type = "LORA"
    examples = (
        "peftcli inject lora --rank 8 model/ -o runs/lora/",
        "peftcli inject lora --rank 16 --alpha 32 --targets all-linear --rslora model/ -o runs/lora16/",
        "peftcli inject lora --dora --targets q_proj,k_proj,v_proj,o_proj model/ -o runs/dora/",
    )

    @staticmethod
    def inject_note(cfg: LoraConfig) -> str | None:
        """A line for inject to print when the adapter changes the base it is applied to."""
        if cfg.init not in BASE_INITS:
            return None
        return (
            f"note: init_lora_weights={cfg.init!r}: the adapter is relative to the residual base W − (α/r)·B₀·A₀, "
            "which PEFT (and peftcli) compute from the original base when they load it: load it on the original base"
        )

    def prepare_init(self, ckpt, cfg: LoraConfig) -> LoraConfig:
        """For inject: ``cfg`` with what EVA's data decides (the targets it keeps, their ranks and
        α's as rank/alpha patterns, and each A); ``cfg`` itself for the other inits."""
        if cfg.init != "eva" or cfg.eva is not None:
            return cfg
        from peftcli.methods.lora.eva_init import eva_components

        shapes = {t.name: t.shape for t in ckpt.tensors.values()}
        modules = self._targets(shapes, ckpt.config, cfg)
        found = eva_components(ckpt.path, modules, cfg.rank, cfg.eva_rho, cfg.init_data, cfg.eva_examples, cfg.eva_max_length)
        ranks = found.ranks()
        kept = [m.name for m in modules if ranks[m.name]]  # a target given rank 0 is dropped, as PEFT drops it
        changed = [(n, ranks[n]) for n in kept if ranks[n] != cfg.rank]
        return dataclasses.replace(
            cfg, targets=",".join(kept), layers=None, ranks=tuple(changed),
            alphas=tuple((n, cfg.alpha * k / cfg.rank) for n, k in changed),  # PEFT's adjust_scaling_factors: α/r kept
            eva={n: found.components[n] for n in kept},
        )

    @staticmethod
    def added_params(shape: tuple[int, int], cfg: LoraConfig) -> int:
        out_features, in_features = shape
        return cfg.rank * (out_features + in_features) + (out_features if cfg.dora else 0) + (out_features if cfg.lora_bias else 0)

    def _targets(self, shapes, model_config, cfg):
        """The linear modules the config selects (the embedding targets: ``_embedding_targets``;
        a tied ``lm_head`` named in the list is one, on the input embedding's tensor)."""
        shapes, tied = lora_embeddings.tied_head(shapes, model_config, cfg.targets)
        if cfg.target_parameters and not cfg.targets:
            return []  # PEFT's target_modules [] (or none) beside target_parameters: parameters only
        embedded = self._embedding_targets(shapes, model_config, cfg)
        _refuse_embedding_patterns(embedded, cfg)
        named = embedded or _skipped_embeddings(shapes, model_config, cfg)  # names that are no linear target
        spec = _linear_spec(shapes, model_config, cfg.targets, named)
        try:
            # "" left after taking out embedding names: only embeddings; a user's "" is the default
            modules = [] if spec == "" and named else resolve_targets(shapes, model_config, spec, cfg.layers)
        except UsageError:
            if not named:
                raise
            modules = []  # a regex selecting embeddings only
        if not modules and named:
            return []
        if cfg.exclude:  # PEFT drops excluded modules before it looks at target_modules
            modules = [m for m in modules if not excluded(m.name, cfg.exclude)]
            if not modules and embedded:
                return []  # the embedding targets are all that is left
            if not modules:
                raise UsageError(
                    "exclude_modules removes every module target_modules selects",
                    "the adapter config targets nothing: fix exclude_modules in adapter_config.json",
                )
        _check_given_patterns(modules, cfg)
        if tied and (cfg.dora or cfg.lora_bias or cfg.init in BASE_INITS):
            raise UsageError("LoRA on a tied lm_head goes without DoRA, lora_bias and a PiSSA/OLoRA init (peftcli folds plain LoRA there)",
                             "drop that option, or lm_head from the targets")
        conv1d = next((m for m in modules if m.transposed), None)
        if cfg.init == "olora" and conv1d is not None:  # inject's option (an adapter's OLoRA is read by its peft_version)
            raise UsageError(
                f"`init` olora on the Conv1D layer {conv1d.name}: PEFT 0.21 and 0.22 factor such layers differently, "
                "so the base PEFT would load the adapter on depends on its release",
                "use `init` pissa on this model, or target nn.Linear modules only",
            )
        if cfg.lora_bias and not cfg.peft_embeddings:  # inject's option (an adapter's lora_bias is refused where it is merged)
            bare = next((m for m in modules if m.name + ".bias" not in shapes), None)
            if bare is not None:
                raise UsageError(
                    f"`lora_bias` needs targets with a bias to merge lora_B's bias into, and {bare.name} has none",
                    "target modules with a bias (BERT, GPT-2 have them), or drop `lora_bias`",
                )
        # resolve_targets never returns none; the smallest module too small for its rank is named.
        # inject's options, and adapters whose init factors the base (PiSSA, OLoRA: an SVD/QR has
        # min(out, in) components). A plain adapter may carry a rank above a narrow module's (PEFT
        # takes it, and convert --to lora zero-pads such a module to the adapter's r).
        checked = not cfg.peft_embeddings or cfg.base_init is not None
        too_small = [m for m in modules if cfg.for_module(m.name).rank > min(m.shape)] if checked else []
        if too_small:
            smallest = min(too_small, key=lambda m: min(m.shape))
            limit, rank = min(smallest.shape), cfg.for_module(smallest.name).rank
            source = "`rank`" if rank == cfg.rank else "`rank_pattern` rank"
            raise UsageError(
                f"{source} {rank} is larger than min(out, in) = {limit} of {smallest.name}",
                f"use a rank of {limit} or less there: a larger rank adds parameters without adding expressiveness",
            )
        return modules

    def _param_targets(self, shapes, model_config, cfg, on_disk: bool = True) -> list:
        """The parameters target_parameters names (``lora_params.Target``s), none without it
        (``on_disk`` false: ``shapes`` are the loaded model's, its experts already fused)."""
        if not cfg.target_parameters:
            return []
        return lora_params.targets(shapes, model_config, cfg.target_parameters, self._targets(shapes, model_config, cfg), on_disk)

    @staticmethod
    def _embedding_targets(shapes, model_config, cfg) -> dict[str, tuple[int, int]]:
        """The embedding layers an adapter's target_modules selects (inject's: those its `targets` list by name)."""
        if not cfg.peft_embeddings and (not cfg.targets or is_regex(cfg.targets)):
            return {}
        if not cfg.peft_embeddings and cfg.layers:
            linear = {m.name for m in linear_modules(shapes, model_config)}
            named = next((m for m in lora_embeddings.embeddings(shapes, linear) if lora_embeddings.selects(cfg.targets, m)), None)
            if named is not None:  # PEFT skips it: layers_to_transform needs a layer index
                raise UsageError(f"`targets` names the embedding layer {named}, which is in no layer that `layers` selects",
                                 "drop `layers`, or the embedding from `targets`")
        embedded = lora_embeddings.targeted(shapes, {m.name for m in linear_modules(shapes, model_config)}, cfg)
        options = [o for o, on in (("use_dora", cfg.dora), ("lora_bias", cfg.lora_bias), ("init_lora_weights", cfg.base_init)) if on]
        if embedded and not cfg.peft_embeddings and (cfg.dora or cfg.lora_bias or cfg.init not in ("kaiming", "gaussian")):
            raise UsageError(  # PEFT's lora.Embedding: A zeros, B Gaussian, whatever init_lora_weights says
                f"`targets` names the embedding layer {next(iter(embedded))}, which takes plain LoRA only (not `dora`, `lora_bias` or `init` {cfg.init})",
                "drop the option, or the embedding from `targets`",
            )
        if embedded and options:
            raise BadInputError(
                f"target_modules names the embedding layer {next(iter(embedded))} with {', '.join(options)}: "
                "peftcli folds plain LoRA on embeddings only",
                "merge this adapter with PEFT's merge_and_unload, or train it without that option",
            )
        return embedded

    def _token_targets(self, shapes, model_config, cfg) -> dict:
        return lora_embeddings.token_targets(shapes, model_config, {m.name for m in linear_modules(shapes, model_config)}, cfg)

    def budget(self, shapes: dict[str, tuple[int, ...]], model_config: dict | None, cfg: LoraConfig) -> list[BudgetRow]:
        rows = [BudgetRow(m.name, m.shape, self.added_params(m.shape, cfg.for_module(m.name))) for m in self._targets(shapes, model_config, cfg)]
        embedded, tokens = self._embedding_targets(shapes, model_config, cfg), self._token_targets(shapes, model_config, cfg)
        both = next((e for e in embedded if e in tokens), None)
        if both is not None and not cfg.peft_embeddings:  # merge folds one or the other (an adapter's: refused there)
            raise UsageError(f"`targets` puts LoRA on {both}, whose rows `trainable_tokens` trains whole", "choose one of the two for this embedding")
        _, tied = lora_embeddings.tied_head(shapes, model_config, cfg.targets)
        if tied is not None and tied in tokens and not cfg.peft_embeddings:  # the same one tensor, through the head
            raise UsageError(f"`targets` puts LoRA on lm_head, tied to {tied}, whose rows `trainable_tokens` trains whole",
                             "choose LoRA on lm_head or trainable tokens on this tied embedding")
        rows += [BudgetRow(e, s, cfg.for_module(e).rank * sum(s)) for e, s in embedded.items()]
        rows += [BudgetRow(t, (len(ids), dim), len(ids) * dim) for t, (ids, dim) in tokens.items()]
        return rows + [BudgetRow(t.name, t.shape, lora_params.added_params(t, cfg.rank)) for t in self._param_targets(shapes, model_config, cfg)]

    # -- tensor level --------------------------------------------------------------------
    def init(self, ckpt, cfg: LoraConfig, generator: "torch.Generator") -> dict[str, LazyTensor]:
        import torch

        shapes = {t.name: t.shape for t in ckpt.tensors.values()}
        out: dict[str, LazyTensor] = {}  # each made when written (inject holds one at a time)
        draws = SeededDraws(generator)  # the A's, drawn in target order as an eager loop would
        for m in self._targets(shapes, ckpt.config, cfg):
            d_out, d_in = m.shape
            mcfg = cfg.for_module(m.name)
            if cfg.init in BASE_INITS:
                a, b = _factored_ab(ckpt, m, cfg.init, mcfg)
            elif cfg.init == "eva":
                if cfg.eva is None:
                    raise AssertionError("init eva without prepare_init: the data's components were not computed")
                a = LazyTensor((mcfg.rank, d_in), torch.float32, lambda t=cfg.eva[m.name]: t.clone())
                b = lazy_zeros(d_out, mcfg.rank)
            else:
                a, b = _draw_ab(draws, cfg.init, mcfg.rank, d_in, d_out)
            out[peft_key(m.name, "lora_A.weight")] = a
            out[peft_key(m.name, "lora_B.weight")] = b
            if cfg.lora_bias:
                out[peft_key(m.name, "lora_B.bias")] = lazy_zeros(d_out)
            if cfg.dora:
                dim = 0 if m.transposed else 1
                # PEFT's magnitude is ‖W + s·B·A‖; B·A is 0 but for orthogonal's rounding, computed then;
                # PiSSA/OLoRA: ‖W_res + s·B₀·A₀‖ on the residual PEFT's layer holds
                ab = (a, b, mcfg.scaling) if cfg.init in ("orthogonal", *BASE_INITS) else None
                res = (cfg.init, mcfg.rank) if cfg.init in BASE_INITS else None
                out[peft_key(m.name, "lora_magnitude_vector")] = LazyTensor(
                    (d_out,), torch.float32, lambda name=m.name, dim=dim, ab=ab, res=res: _row_norms(ckpt, name, dim, ab, res)
                )
        out.update(lora_params.init(self._param_targets(shapes, ckpt.config, cfg), cfg.rank, draws))
        # PEFT's bias "all"/"lora_only": the base's biases, saved beside LoRA (check compares them).
        out.update(trained_bias.init(cfg.bias, ckpt, {m.name for m in self._targets(shapes, ckpt.config, cfg)}))
        # An adapter's embedding LoRA and trainable tokens: PEFT's keys and shapes (check compares them).
        embedded = self._embedding_targets(shapes, ckpt.config, cfg)
        tokens = self._token_targets(shapes, ckpt.config, cfg)
        for key, shape in lora_embeddings.init_shapes(embedded, tokens, lambda module: cfg.for_module(module).rank).items():
            out[key] = lazy_zeros(*shape) if cfg.peft_embeddings else _embedding_init(ckpt, draws, key, shape, tokens)
        return out

    def adapter_config(self, ckpt, cfg: LoraConfig) -> dict:
        shapes = {t.name: t.shape for t in ckpt.tensors.values()}
        modules = self._targets(shapes, ckpt.config, cfg)
        alpha = _number(cfg.alpha)
        ranks, alphas = _written_patterns(modules, cfg) if cfg.ranks or cfg.alphas else ({}, {})
        return {
            "peft_type": "LORA",
            "task_type": None,
            "base_model_name_or_path": os.path.abspath(ckpt.path),
            "r": cfg.rank,
            "lora_alpha": alpha,
            # Exact module paths: PEFT suffix-matches them, so it selects exactly these modules.
            "target_modules": [m.name for m in modules] + list(self._embedding_targets(shapes, ckpt.config, cfg)),
            "lora_dropout": cfg.dropout,
            "fan_in_fan_out": any(m.transposed for m in modules),
            "bias": "none",
            "use_dora": cfg.dora,
            "use_rslora": cfg.rslora,
            "init_lora_weights": True if cfg.init == "kaiming" else cfg.init,
            "modules_to_save": None,
            "layers_to_transform": None,
            "rank_pattern": ranks,
            "alpha_pattern": alphas,
            "inference_mode": False,
            **({"lora_bias": True} if cfg.lora_bias else {}),  # absent: PEFT's default false (plain configs stay as they were)
            **({"target_parameters": [t.name for t in self._param_targets(shapes, ckpt.config, cfg)]} if cfg.target_parameters else {}),
            **({"eva_config": _eva_config(cfg)} if cfg.init == "eva" else {}),
            **({"trainable_token_indices": lora_embeddings.written_tokens(cfg.token_indices)} if cfg.token_indices else {}),
        }

    def config_from_adapter(self, d: dict) -> LoraConfig:
        config_keys.check_keys(d)  # an option that changes what LoRA computes is refused by name
        bias = trained_bias.read(d.get("bias", "none"), _CORRUPT)
        if "r" not in d:
            raise BadInputError("LoRA adapter config has no rank 'r'", "add \"r\": <rank> to adapter_config.json")
        targets = d.get("target_modules")
        params = d.get("target_parameters")
        if params is not None and not (isinstance(params, list) and all(isinstance(p, str) and p.strip() for p in params)):
            raise BadInputError("adapter config: 'target_parameters' must be a list of parameter names", _CORRUPT)
        if targets is not None and not params and not (targets.strip() if isinstance(targets, str) else targets):
            # PEFT's default targets are not what an empty list says: refuse rather than guess.
            raise BadInputError(
                "adapter config: 'target_modules' is empty, so the adapter targets no module",
                "list the adapted modules in target_modules (the keys' module paths), or remove the key for the defaults",
            )
        layers = d.get("layers_to_transform")
        try:
            cfg = LoraConfig(
                rank=int(d["r"]),
                alpha=float(d.get("lora_alpha", 8)),  # PEFT's default when absent
                targets=",".join(targets) if isinstance(targets, list) else from_file(targets, "adapter_config.json target_modules"),
                layers=",".join(map(str, layers)) if isinstance(layers, list) else (str(layers) if layers is not None else None),
                dora=bool(d.get("use_dora", False)),
                rslora=bool(d.get("use_rslora", False)),
                dropout=float(d.get("lora_dropout", 0.0)),
                init=d["init_lora_weights"] if d.get("init_lora_weights") in ("gaussian", "orthogonal") else "kaiming",
                base_init=lora_init.base_init(d.get("init_lora_weights", True), d.get("peft_version")),
                exclude=_exclude_spec(d.get("exclude_modules")),
                lora_bias=bool(d.get("lora_bias")),
                bias=bias,
                peft_embeddings=True,
                token_indices=lora_embeddings.token_indices(d.get("trainable_token_indices")),
                ranks=rank_patterns.from_config(d, "rank_pattern", "LoRA", _CORRUPT),
                alphas=rank_patterns.from_config(d, "alpha_pattern", "LoRA", _CORRUPT),
                pattern_reading=rank_patterns.reading(d.get("peft_version")),
                target_parameters=",".join(params) if params else None,
            )
        except UsageError as exc:
            raise BadInputError(f"adapter config: {exc.message}", _CORRUPT) from None
        # The largest scaling any module may get: the largest alpha over the smallest rank.
        largest = dataclasses.replace(
            cfg, rank=min([cfg.rank, *(v for _, v in cfg.ranks)]), alpha=max([float(cfg.alpha or 0), *(float(v) for _, v in cfg.alphas)])
        )
        if not largest.scaling <= FP32_MAX:  # also NaN; float32(α/r) would be inf, and inf·0 NaN
            raise BadInputError(
                f"adapter config: the LoRA scaling lora_alpha/r = {largest.scaling:g} does not fit a float32",
                "lora_alpha (or alpha_pattern) in adapter_config.json is corrupt: LoRA's scaling is usually 1-4",
            )
        return cfg

    def _targeted(self, shapes: dict, model_config: dict | None, cfg: LoraConfig) -> tuple[set[str] | None, BadInputError | None]:
        """The module paths the adapter config selects among ``shapes``' linear modules, or why
        it selects none (raised after the per-key problems, which say more about another base)."""
        return selection(lambda: {m.name for m in self._targets(shapes, model_config, cfg)}, "adapter config", "was target_modules")

    # -- folding into the weights ---------------------------------------------------------
    def deltas(self, cfg: LoraConfig, tensors: dict, ckpt) -> dict:
        """ΔW per base weight: s·B·A (DoRA: m·(W+sBA)/‖W+sBA‖ − W), transposed back for Conv1D."""
        from functools import partial

        shapes = {t.name: t.shape for t in ckpt.tensors.values()}
        # a tied lm_head's ΔW goes to the one tensor it shares with the input embedding
        tied_shapes, tied = lora_embeddings.tied_head(shapes, ckpt.config, cfg.targets)
        linear = {m.name: m for m in linear_modules(tied_shapes, ckpt.config)}
        targeted, unfit = self._targeted(shapes, ckpt.config, cfg)
        biases, tensors = trained_bias.split(tensors, cfg.bias, _SUFFIXES)
        by_module, problems = _group(tensors)
        out, configs = {}, {}
        lora_params.deltas(by_module, self._param_targets(shapes, ckpt.config, cfg), cfg, out, problems)  # takes theirs out of by_module
        for path, parts in list(by_module.items()):
            if any(s in parts for s in lora_embeddings.SUFFIXES):  # an embedding's LoRA or trainable tokens
                by_module.pop(path)
                self._embedding_delta(path, parts, cfg, ckpt, out, problems)
                continue
            name, problem = targeted_module(path, linear, targeted, "LoRA tensors")
            if problem:
                problems.append(problem)
                continue
            m, mcfg = linear[name], cfg.for_module(name)  # rank_pattern/alpha_pattern match the base's module names
            configs[path] = mcfg
            problem = _check_module(path, parts, mcfg, *m.shape)
            problem = problem or lora_init.module_problem(cfg.base_init, path, mcfg.rank, *m.shape, m.transposed)
            stored = (tied if name == lora_embeddings.HEAD and tied else name) + ".weight"
            problem = problem or _saved_base_problem(path, parts, lambda stored=stored: ckpt.get(stored))
            if problem:
                problems.append(problem)
                continue
            out[stored] = _joined(out.get(stored), partial(_fold, parts=parts, cfg=mcfg, transposed=m.transposed))
            if cfg.lora_bias:
                if name + ".bias" not in ckpt.tensors:
                    raise _no_base_bias(name)
                out[name + ".bias"] = partial(_fold_bias, bias=parts["lora_B.bias"], scaling=mcfg.scaling)
        if targeted is not None:
            trained_bias.fold(cfg.bias, biases, ckpt, targeted, out, problems)
        if problems:
            raise mismatch_error(problems)
        if unfit is not None:
            raise unfit
        _check_scaled(by_module, configs)
        return out

    def _embedding_delta(self, path: str, parts: dict, cfg: LoraConfig, ckpt, out: dict, problems: list) -> None:
        """ΔW of one embedding's LoRA or trainable tokens into ``out``, or its problem into ``problems``."""
        from functools import partial

        shapes = {t.name: t.shape for t in ckpt.tensors.values()}
        tokens = lora_embeddings.TOKENS in parts
        try:
            chosen = self._token_targets(shapes, ckpt.config, cfg) if tokens else self._embedding_targets(shapes, ckpt.config, cfg)
        except (BadInputError, UsageError) as exc:
            problems.append(f"{path}: {exc.message}")
            return
        name = base_module(path, chosen)
        if name is None:
            what = "trainable_token_indices" if tokens else "target_modules"
            problems.append(f"{path}: {lora_embeddings.NOT_ATTACHED[lora_embeddings.TOKENS if tokens else lora_embeddings.EMB_A]} for a module {what} does not select on this base")
            return
        if name + ".weight" in out and (tokens or isinstance(out[name + ".weight"], Replacement)):
            problems.append(f"{path}: both LoRA and trainable tokens change this embedding (peftcli folds one or the other)")
            return
        ecfg = cfg.for_module(name)
        if tokens:
            indices, dim = chosen[name]
            problem = lora_embeddings.tokens_problem(path, parts, indices, dim)
            fold = lora_embeddings.fold_tokens(indices=indices, values=parts.get(lora_embeddings.TOKENS))
        else:
            problem = lora_embeddings.embedding_problem(path, parts, ecfg, *chosen[name])
            problem = problem or _saved_base_problem(path, parts, lambda: ckpt.get(name + ".weight"))
            fold = partial(lora_embeddings.fold_embedding, a=parts.get(lora_embeddings.EMB_A), b=parts.get(lora_embeddings.EMB_B), scaling=ecfg.scaling)
        if problem:
            problems.append(problem)
            return
        if not tokens:  # ΔW finite in float32, as for a linear module
            _check_scaled({path: {"lora_A.weight": parts[lora_embeddings.EMB_A], "lora_B.weight": parts[lora_embeddings.EMB_B]}}, {path: ecfg})
        out[name + ".weight"] = fold if tokens else _joined(out.get(name + ".weight"), fold)

    # -- module level ---------------------------------------------------------------------
    def attach(self, model, cfg: LoraConfig, tensors: dict, model_config: dict) -> Attached:
        from peftcli import modules as mod
        from peftcli.methods.lora.layer import LoraLinear

        trained_bias.refuse_attach(cfg.bias)
        by_module, problems = _group(tensors)
        saved: set[str] = set()
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
        targeted, unfit = self._targeted(shapes, model_config, cfg)  # as PEFT selects them: on the model's names
        phi, configs = {}, {}
        phi.update(lora_params.attach(model, by_module, self._param_targets(shapes, model_config, cfg, on_disk=False), cfg))  # takes theirs
        for path, parts in by_module.items():
            if any(s in parts for s in lora_embeddings.SUFFIXES):  # an embedding's LoRA or trainable tokens
                problem = self._attach_embedding(model, path, parts, cfg, model_config, shapes, phi)
                if problem:
                    problems.append(problem)
                elif SAVED_BASE in parts:  # PEFT's copy of the base embedding, equal to the model's
                    saved.add(peft_key(path, SAVED_BASE))
                continue
            layer, dims, problem = mod.find_linear(model, path)
            if problem is None and targeted is not None and mod.resolve(model, path) not in targeted:
                problem = f"{path}: LoRA tensors for a module the adapter config does not target"
            if problem is None:
                mcfg = configs[path] = cfg.for_module(mod.resolve(model, path))  # as PEFT: the model's module name
                problem = _check_module(path, parts, mcfg, *dims)
                problem = problem or lora_init.module_problem(cfg.base_init, path, mcfg.rank, *dims, mod.is_conv1d(layer))
                problem = problem or _saved_base_problem(path, parts, lambda layer=layer: layer.weight)
            if problem:
                problems.append(problem)
                continue
            if cfg.base_init:  # the base PEFT trains and evaluates this adapter on
                _to_residual(layer, mcfg)
            new = LoraLinear(layer, mcfg.rank, mcfg.scaling, cfg.dropout, dora=cfg.dora, bias=cfg.lora_bias)
            new.load_phi(parts["lora_A.weight"], parts["lora_B.weight"], parts.get("lora_magnitude_vector"), parts.get("lora_B.bias"))
            mod.replace(model, path, new)
            phi[peft_key(path, "lora_A.weight")] = new.lora_A.weight
            phi[peft_key(path, "lora_B.weight")] = new.lora_B.weight
            if cfg.lora_bias:
                phi[peft_key(path, "lora_B.bias")] = new.lora_B.bias
            if SAVED_BASE in parts:  # PEFT's copy of the base weight, equal to the model's: nothing to train
                saved.add(peft_key(path, SAVED_BASE))
            if cfg.dora:
                phi[peft_key(path, "lora_magnitude_vector")] = new.lora_magnitude
        problem = lora_embeddings.tie_tokens_head(model)  # after LoRA on lm_head, which it refuses beside tied tokens
        if problem:
            problems.append(problem)
        if problems:
            raise mismatch_error(problems)
        if unfit is not None:
            raise unfit
        _check_scaled(by_module, configs)
        return Attached(phi=phi, derived=frozenset(saved))

    def _attach_embedding(self, model, path: str, parts: dict, cfg: LoraConfig, model_config: dict, shapes: dict, phi: dict) -> str | None:
        """One embedding's LoRA or trainable tokens on ``model`` (``lora_embeddings.attach``), or its problem."""
        from peftcli import modules as mod

        tokens = lora_embeddings.TOKENS in parts
        try:
            chosen = self._token_targets(shapes, model_config, cfg) if tokens else self._embedding_targets(shapes, model_config, cfg)
        except (BadInputError, UsageError) as exc:
            return f"{path}: {exc.message}"
        name = base_module(path, chosen)
        if name is None:
            what = "trainable_token_indices" if tokens else "target_modules"
            return f"{path}: {lora_embeddings.NOT_ATTACHED[lora_embeddings.TOKENS if tokens else lora_embeddings.EMB_A]} for a module {what} does not select on this base"
        if not tokens:  # ΔW finite in float32, as for a linear module
            ecfg = cfg.for_module(name)
            problem = lora_embeddings.embedding_problem(path, parts, ecfg, *chosen[name])
            problem = problem or _saved_base_problem(path, parts, lambda: model.get_submodule(mod.resolve(model, path)).weight)
            if problem:
                return problem
            _check_scaled({path: {"lora_A.weight": parts[lora_embeddings.EMB_A], "lora_B.weight": parts[lora_embeddings.EMB_B]}}, {path: ecfg})
        return lora_embeddings.attach(model, path, parts, cfg.for_module(name), name, chosen, phi)


_CORRUPT = "the adapter config is corrupt or was edited by hand"
SAVED_BASE = "base_layer.weight"  # PEFT saves the base weight of a targeted lm_head or embedding beside LoRA's
_SUFFIXES = ("lora_A.weight", "lora_B.weight", "lora_B.bias", "lora_magnitude_vector", SAVED_BASE, *lora_embeddings.SUFFIXES)
_LINEAR_PARTS = ("lora_A.weight", "lora_B.weight")


def _number(v: float) -> int | float:
    """α as PEFT writes it: 16, not 16.0."""
    return int(v) if float(v).is_integer() else v


def _eva_config(cfg: LoraConfig) -> dict:
    """PEFT's EvaConfig as it saves it: ρ as given, the rest PEFT's defaults, which peftcli
    follows (label mask on, no whitening, α scaled with the rank; τ, the incremental PCA's
    stopping threshold, plays no part in peftcli's exact PCA)."""
    return {"rho": cfg.eva_rho, "tau": 0.99, "use_label_mask": True, "label_mask_value": -100, "whiten": False, "adjust_scaling_factors": True}


def _refuse_embedding_patterns(embedded: dict, cfg: LoraConfig) -> None:
    """For inject: a --rank-pattern/--alpha-pattern regex that selects an embedding target is
    refused. inject writes patterns for the linear targets (as exact paths where PEFT releases
    read a regex differently), so an embedding's own rank could be lost in the config."""
    for name, pairs in (("rank_pattern", cfg.ranks), ("alpha_pattern", cfg.alphas)):
        if getattr(cfg, name) is None:
            continue  # an adapter's: read as PEFT reads it
        for key, _ in pairs:
            hit = next((e for e in embedded if rank_patterns.values(((key, 1),), (), e, 0, 0, rank_patterns.CURRENT)[0]), None)
            if hit is not None:
                raise UsageError(f"`{name}` regex {key!r} selects the embedding {hit}, whose LoRA takes `rank` and `alpha` only",
                                 "match linear targets only with the pattern, or set `rank` for the embedding")


def _check_given_patterns(modules: list, cfg: LoraConfig) -> None:
    """For inject: each --rank-pattern/--alpha-pattern regex must select a target."""
    for name, pairs in (("rank_pattern", cfg.ranks), ("alpha_pattern", cfg.alphas)):
        if getattr(cfg, name) is None:
            continue  # read from an adapter: PEFT ignores a key that matches nothing, so does peftcli
        for key, _ in pairs:
            if not any(rank_patterns.values(((key, 1),), (), m.name, 0, 0, rank_patterns.CURRENT)[0] for m in modules):
                raise UsageError(
                    f"`{name}` regex {key!r} matches none of the {len(modules)} target modules",
                    "match a target's path whole or after a dot, e.g. 'q_proj' or 'layers\\.0\\..*' (`peftcli inspect MODEL --budget lora` lists them)",
                )


def _written_patterns(modules: list, cfg: LoraConfig) -> tuple[dict, dict]:
    """rank_pattern and alpha_pattern as inject writes them: the given regexes when every PEFT
    release reads them alike on these targets (peftcli writes no peft_version to say which),
    else each module whose rank or alpha differs named by its whole path, which every release
    reads alike (PEFT before 0.14 takes one key for both dicts: a rank regex and another alpha
    regex that match one module give it the default alpha there)."""
    want = {m.name: (c.rank, float(c.alpha)) for m in modules for c in [cfg.for_module(m.name)]}
    exact = (tuple((n, r) for n, (r, _) in want.items() if r != cfg.rank),
             tuple((n, a) for n, (_, a) in want.items() if a != cfg.alpha))
    for ranks, alphas in ((cfg.ranks, cfg.alphas), exact):
        try:
            read = {n: rank_patterns.module_values(ranks, alphas, n, cfg.rank, cfg.alpha, None) for n in want}
        except BadInputError:
            continue
        if all((r, float(a)) == want[n] for n, (r, a) in read.items()):
            return {k: v for k, v in ranks}, {k: _number(v) for k, v in alphas}
    raise UsageError(  # a module path that, as a regex, also matches another module's path
        "`rank_pattern`/`alpha_pattern` cannot be written so that every PEFT release reads them alike on these modules",
        "give `rank_pattern` and `alpha_pattern` the same regex for a module they both change",
    )


def _exclude_spec(value) -> str | tuple[str, ...] | None:
    """adapter_config.json's exclude_modules as LoraConfig keeps it (a regex string or names)."""
    if not value:
        return None
    return value if isinstance(value, str) else tuple(value)


def _skipped_embeddings(shapes: dict, model_config: dict | None, cfg: LoraConfig) -> dict:
    """Embeddings an adapter's target_modules names but PEFT does not adapt, having no layer
    index for layers_to_transform: their names are no linear target either (PEFT skips them)."""
    if not (cfg.peft_embeddings and cfg.layers and cfg.targets) or cfg.targets.strip() == "all-linear":
        return {}
    linear = {m.name for m in linear_modules(shapes, model_config)}
    return {m: s for m, s in lora_embeddings.embeddings(shapes, linear).items() if lora_embeddings.selects(cfg.targets, m)}


def _linear_spec(shapes: dict, model_config: dict | None, spec: str | None, embedded: dict) -> str | None:
    """target_modules without the listed names that select only embedding layers ("" if none is left)."""
    if not embedded or not spec or is_regex(spec) or spec.strip() == "all-linear":
        return spec
    linear = [m.name for m in linear_modules(shapes, model_config)]
    names = [t.strip() for t in spec.split(",") if t.strip()]
    kept = [t for t in names if any(names_module(m, t) for m in linear) or not any(lora_embeddings.selects(t, e) for e in embedded)]
    return ",".join(kept)


def _joined(first, second):
    """Two folds of one tensor as one (LoRA on a tied embedding and on its lm_head): their ΔW summed,
    as PEFT's merge adds both into the shared weight."""
    if first is None:
        return second
    if isinstance(first, Replacement) or isinstance(second, Replacement):
        raise BadInputError("the adapter has trainable tokens on an embedding and LoRA on the lm_head tied to it",
                            "peftcli folds one or the other on a tied base: merge this adapter with PEFT's merge_and_unload")
    return lambda stored: first(stored) + second(stored)


def _embedding_init(ckpt, draws: SeededDraws, key: str, shape: tuple, tokens: dict) -> LazyTensor:
    """inject's embedding φ as PEFT initialises it: lora_embedding_A zeros, lora_embedding_B
    standard normal (reset_lora_parameters, whatever init_lora_weights says), trainable tokens
    their rows' current values (so that the adapted model starts as the base)."""
    import torch

    if key.endswith(lora_embeddings.EMB_A):
        return lazy_zeros(*shape)
    if key.endswith(lora_embeddings.EMB_B):
        return draws.draw(shape, lambda g: torch.empty(shape).normal_(0.0, 1.0, generator=g))
    module = key[len(PEFT_PREFIX) : -len(lora_embeddings.TOKENS) - 1]
    rows = torch.tensor(tokens[module][0], dtype=torch.long)
    return LazyTensor(shape, torch.float32, lambda: ckpt.get(module + ".weight")[rows].float())


def _no_base_bias(module: str) -> BadInputError:
    return BadInputError(
        f"adapter config has lora_bias=true, but the base's {module} has no bias for lora_B.bias to fold into",
        "use the adapter unmerged (peftcli evaluate), or train it with lora_bias=false",
    )


def _saved_base_problem(path: str, parts: dict, base_weight) -> str | None:
    """PEFT loads a saved ``base_layer.weight`` over the base's: only a copy equal to it is exact to ignore."""
    import torch

    saved = parts.get(SAVED_BASE)
    if saved is None:
        return None
    weight = base_weight()
    if tuple(saved.shape) != tuple(weight.shape) or not torch.equal(saved.to(weight.dtype), weight.detach()):
        return f"{path}.{SAVED_BASE}: the adapter saves base weights for this module that differ from this base's"
    return None


def _fold_bias(stored: "torch.Tensor", *, bias: "torch.Tensor", scaling: float) -> "torch.Tensor":
    """PEFT's lora_bias merge: b + s·lora_B.bias."""
    return bias.float() * scaling


def _row_norms(ckpt, module: str, dim: int, ab: tuple | None = None, res: tuple | None = None) -> "torch.Tensor":
    """DoRA's initial magnitude ‖W₀ + s·B·A‖ per output feature (``dim`` 1 for [out, in], 0 for
    Conv1D's [in, out]). With B = 0 (``ab`` None) accumulated in fp32 without an fp32 copy of W;
    else ``ab`` = (A, B, s) as LazyTensors and the scale, added to an fp32 copy as PEFT does.
    ``res`` = (init, rank) for PiSSA/OLoRA: W₀ is the residual PEFT's layer holds."""
    import torch

    w = ckpt.get(module + ".weight")
    if ab is None:
        return torch.linalg.vector_norm(w, dim=dim, dtype=torch.float32)
    a, b, scaling = ab
    if res is not None:
        w = lora_init.residual(res[0], w, res[1], scaling, dim == 0)  # fp32 [out, in]
    else:
        w = (w.T if dim == 0 else w).float()
    w = w + scaling * (b.make() @ a.make())
    return torch.linalg.vector_norm(w, dim=1)


def _factored_ab(ckpt, m, init: str, cfg: LoraConfig) -> tuple[LazyTensor, LazyTensor]:
    """A₀ [r, in] and B₀ [out, r] of one module from its base weight (PiSSA's SVD, OLoRA's QR),
    as PEFT computes them: one factorisation serves both, each kept only until it is written."""
    import torch

    made: dict = {}

    def part(key: str) -> "torch.Tensor":
        if key not in made:  # the first of the two (or one made again): factor W
            made.clear()
            made.update(zip("AB", lora_init.factors(init, ckpt.get(m.name + ".weight"), cfg.rank, cfg.scaling, m.transposed)))
        return made.pop(key)

    d_out, d_in = m.shape
    return LazyTensor((cfg.rank, d_in), torch.float32, lambda: part("A")), LazyTensor((d_out, cfg.rank), torch.float32, lambda: part("B"))


def _draw_ab(draws: SeededDraws, init: str, r: int, d_in: int, d_out: int) -> tuple[LazyTensor, LazyTensor]:
    """A [r, in] and B [out, r] of one module as PEFT initialises them, drawn from ``draws``."""
    import torch

    if init == "kaiming":
        # PEFT's default: kaiming_uniform_(a=√5) on [r, in], i.e. U(−1/√in, 1/√in).
        bound = 1.0 / math.sqrt(d_in)
        return draws.draw((r, d_in), lambda g: torch.empty(r, d_in).uniform_(-bound, bound, generator=g)), lazy_zeros(d_out, r)
    if init == "gaussian":
        return draws.draw((r, d_in), lambda g: torch.empty(r, d_in).normal_(0.0, 1.0 / r, generator=g)), lazy_zeros(d_out, r)

    def both(g: "torch.Generator") -> "torch.Tensor":
        # PEFT's LoraLayer.orthogonal_init, its draws in its order: Q of an r×r Gaussian; A from its
        # even-indexed rows, B from its odd ones, so B·A = 0 while neither is.
        q, _ = torch.linalg.qr(torch.randn(r, r, generator=g))
        a = torch.randn(d_in, r // 2, generator=g).mm(q[0::2, :]).T / 10.0
        b = torch.randn(r // 2, d_out, generator=g).T.mm(q[1::2, :]) / 10.0
        return torch.cat([a.reshape(-1), b.reshape(-1)])

    packed, n = draws.draw((r * d_in + d_out * r,), both), r * d_in  # one draw: A and B share Q
    return (LazyTensor((r, d_in), torch.float32, lambda: packed.make()[:n].view(r, d_in).clone()),
            LazyTensor((d_out, r), torch.float32, lambda: packed.make()[n:].view(d_out, r).clone()))


def _group(tensors: dict) -> tuple[dict[str, dict], list[str]]:
    """Adapter tensors by module path, and the keys that are no LoRA tensor at all."""
    by_module: dict[str, dict] = {}
    problems: list[str] = []
    for key, t in tensors.items():
        suffix = next((s for s in _SUFFIXES if key.endswith("." + s)), None)
        if not key.startswith(PEFT_PREFIX) or suffix is None:
            problems.append(f"unexpected key {key}")
            continue
        by_module.setdefault(key[len(PEFT_PREFIX) : -len(suffix) - 1], {})[suffix] = t
    return by_module, problems


def _check_module(path: str, parts: dict, cfg: LoraConfig, d_out: int, d_in: int) -> str | None:
    """What is wrong with one module's LoRA tensors for a d_out×d_in layer, or None."""
    a, b, m = parts.get("lora_A.weight"), parts.get("lora_B.weight"), parts.get("lora_magnitude_vector")
    if a is None or b is None:
        return f"{path}: lora_A and lora_B must both be present"
    for suffix, t, want in (("lora_A.weight", a, [cfg.rank, d_in]), ("lora_B.weight", b, [d_out, cfg.rank])):
        if t.dim() != 2:
            return f"{path}.{suffix}: shape {list(t.shape)}, expected 2-D {want} ([r, in] for A, [out, r] for B)"
    if m is not None and m.dim() != 1:
        return f"{path}.lora_magnitude_vector: shape {list(m.shape)}, expected 1-D [{d_out}]"
    if a.shape[0] != cfg.rank or b.shape[1] != cfg.rank:
        return f"{path}: rank {a.shape[0]} in the tensors but r={cfg.rank} in the config (r or rank_pattern)"
    if tuple(a.shape) != (cfg.rank, d_in) or tuple(b.shape) != (d_out, cfg.rank):
        return f"{path}: lora_A {list(a.shape)} / lora_B {list(b.shape)} do not fit a {d_out}×{d_in} layer"
    if cfg.dora != (m is not None) or (m is not None and tuple(m.shape) != (d_out,)):
        return f"{path}: DoRA magnitude vector missing, unexpected or of the wrong shape"
    bias = parts.get("lora_B.bias")
    if cfg.lora_bias != (bias is not None) or (bias is not None and tuple(bias.shape) != (d_out,)):
        return f"{path}: lora_B.bias missing, unexpected (lora_bias={str(cfg.lora_bias).lower()}) or of the wrong shape"
    return None


def _check_scaled(by_module: dict[str, dict], configs: dict[str, LoraConfig]) -> None:
    """Refuse a module whose ΔW = s·B·A is not finite in fp32 (``configs``: each module's rank
    and scaling). |ΔW_ij| <= s·r·max|B|·max|A| decides it in an adapter-sized pass; only a
    module whose bound passes float32's range is multiplied out (attach and merge check the
    same modules, so check reports what merge refuses)."""
    import torch

    for path, parts in by_module.items():
        if not all(p in parts for p in _LINEAR_PARTS):
            continue  # an embedding's LoRA or trainable tokens: checked where it is folded
        a, b, cfg = parts["lora_A.weight"], parts["lora_B.weight"], configs[path]
        bound = cfg.scaling * cfg.rank * float(b.abs().max()) * float(a.abs().max())
        if bound <= FP32_MAX / 2 or bool(torch.isfinite(cfg.scaling * (b.float() @ a.float())).all()):
            continue  # the bound is False for NaN: multiplied out, NaN is not finite
        raise BadInputError(
            f"{path}: the scaled update ΔW = (lora_alpha/r)·B·A = {cfg.scaling:g}·B·A is not finite in float32",
            "lora_alpha in adapter_config.json is absurd for these weights, or they hold NaN/Inf (peftcli check names them)",
        )


def _fold(stored: "torch.Tensor", *, parts: dict, cfg: LoraConfig, transposed: bool) -> "torch.Tensor":
    from peftcli.methods.lora.layer import lora_delta

    w0 = stored.T if transposed else stored
    # PiSSA/OLoRA: PEFT's layer holds the residual W_res, so ΔW = (W_res − W) + ΔW over W_res.
    w_res = lora_init.residual(cfg.base_init, stored, cfg.rank, cfg.scaling, transposed) if cfg.base_init else w0
    delta = lora_delta(w_res, parts["lora_A.weight"], parts["lora_B.weight"], cfg.scaling, parts.get("lora_magnitude_vector"))
    if cfg.base_init:
        delta = delta + (w_res - w0.float())
    return delta.T if transposed else delta


def _to_residual(layer, cfg: LoraConfig) -> None:
    """Replace ``layer``'s weight by the residual PEFT's initialisation leaves there."""
    import torch

    from peftcli import modules as mod

    transposed = mod.is_conv1d(layer)
    res = lora_init.residual(cfg.base_init, layer.weight.detach(), cfg.rank, cfg.scaling, transposed)
    with torch.no_grad():
        layer.weight.copy_(res.T if transposed else res)
