"""vLLM's rules for a LoRA adapter, as data: what each checks, and the exact repair or the way out.

What vLLM's loader does with a PEFT adapter directory (read from its sources; the facts each
rule relies on are noted where it is declared):

- ``PEFTHelper.from_dict`` keeps only the ``adapter_config.json`` keys it declares and drops
  the rest without a word. Every version reads ``r``, ``lora_alpha``, ``use_rslora`` and
  ``use_dora``; only the newest read ``rank_pattern``/``alpha_pattern`` (older ones apply
  the global α/r to every module: silently wrong for a patterned adapter).
- The scaling: ``lora_alpha / r``, or ``lora_alpha / √r`` with ``use_rslora`` in the
  versions with ``PEFTHelper``; the loaders before it (v0.6 and earlier) computed α/r
  whatever ``use_rslora`` said. So the one scaling every version agrees on is α/r with
  ``use_rslora`` false: the export folds rsLoRA and the patterns into one α and, where a
  module's scale differs from it, into that module's ``lora_B``.
- ``validate_legal``: DoRA refused; ``modules_to_save`` refused (newest versions: except
  entries ``classifier``/``score``, the head of a classification model); ``lora_bias``,
  ``bias != "none"`` and PiSSA/OLoRA/CorDA/LoftQ inits refused; the largest rank must not
  exceed the server's ``max_lora_rank``, one of {1, 8, 16, 32, 64, 128, 256, 320, 512}
  (``vllm/config/lora.py``, ``MaxLoRARanks``; 1 is accepted since it was added, older
  servers start at 8, which is no problem for an adapter of rank 1).
- ``parse_fine_tuned_lora_name``: a tensor must be ``….lora_A.weight``, ``….lora_B.weight``
  or an embedding's ``lora_embedding_A/B``; anything else is "unsupported LoRA weight"
  (DoRA's ``lora_magnitude_vector``, trainable tokens, and, before the newest versions, a
  saved ``embed_tokens``/``lm_head`` ``base_layer.weight``). Extra-vocabulary adapters
  (``new_embeddings.safetensors``, ``lora_extra_vocab_size``) were removed in v0.12, and
  embedding LoRA must match the base's vocabulary exactly: every delta of an embedding
  is refused here, merge folds it exactly.

vLLM only requires the adapter's rank to be at most the server's ``max_lora_rank``; the
export pads it to the smallest allowed value at or above it, so ``--max-lora-rank R`` with R
the adapter's rank serves it (zero rows of A and columns of B add nothing to B·A).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from peftcli.errors import BadInputError

MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm/config/lora.py MaxLoRARanks
HEAD_NAMES = ("classifier", "score")  # the modules_to_save entries the newest PEFTHelper accepts
PREFIX = "base_model.model."  # PEFT's key prefix (methods.base.PEFT_PREFIX)
LORA_A, LORA_B = "lora_A.weight", "lora_B.weight"
# Tensors of a LoRA adapter vLLM cannot load, by the rule that names them.
MAGNITUDE = "lora_magnitude_vector"
LORA_BIAS = "lora_B.bias"
VOCABULARY = ("lora_embedding_A", "lora_embedding_B", "token_adapter.trainable_tokens_delta", "base_layer.weight")
KNOWN = (LORA_A, LORA_B, MAGNITUDE, LORA_BIAS, *VOCABULARY)
VOCABULARY_MODULES = ("embed_tokens", "lm_head", "wte", "word_embeddings", "embed_out")  # saved whole: the vocabulary rule


def merge_way(run: str) -> str:
    return f"merge it into the base and serve the result: peftcli merge BASE {run} -o DIR"


# One string, so that each command to copy is one span (an f-string would split it around RUN).
_CONVERT_WAY = (
    "or make a plain LoRA of rank R: `peftcli convert {run} --to diff --dense -o d.diff`, then "
    "`peftcli convert d.diff --to lora --rank R` (it reports the share of the update it keeps)"
)


def convert_way(run: str) -> str:
    return _CONVERT_WAY.format(run=run)


@dataclass
class LoraView:
    """A LoRA adapter as vLLM's rules look at it: per module its A, B and other tensors, its
    rank and its PEFT scale; the saved heads; the tensors that belong to no module."""

    run: str
    config: dict
    modules: dict[str, dict] = field(default_factory=dict)  # path -> {suffix: tensor}
    ranks: dict[str, int] = field(default_factory=dict)  # path -> rank (A's rows)
    scales: dict[str, float] = field(default_factory=dict)  # path -> PEFT's scaling of B·A
    heads: dict[str, list[str]] = field(default_factory=dict)  # modules_to_save entry -> its tensor keys
    stray: list[str] = field(default_factory=list)  # keys that are neither
    base_init: str | None = None  # "pissa"/"olora": PEFT changes the base on load (LoRA's reading of init_lora_weights)
    lora_bias: bool = False

    @property
    def rank(self) -> int:
        return max(self.ranks.values(), default=int(self.config.get("r", 1)))

    @property
    def default_scale(self) -> float:
        """The scale of a module no pattern names: the one α/r the export keeps."""
        return scale(self.config, int(self.config["r"]), float(self.config.get("lora_alpha", 8)))


def scale(config: dict, rank: int, alpha: float) -> float:
    """PEFT's scaling of B·A for a module of ``rank`` and ``alpha`` (rsLoRA: α/√r)."""
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


@dataclass
class Finding:
    """One rule the adapter breaks: what is wrong, and what export does (repair) or why not (way_out)."""

    rule: str
    message: str
    repair: str | None = None
    way_out: str | None = None

    def to_json(self) -> dict:
        return {"rule": self.rule, "message": self.message, "repair": self.repair, "way_out": self.way_out}


@dataclass
class Plan:
    """What the repairs decide, applied by ``repaired``: the rank, α, per-module factor on B, head names."""

    rank: int
    alpha: float
    factors: dict[str, float] = field(default_factory=dict)  # path -> s_m / s (only where ≠ 1)
    heads: dict[str, str] = field(default_factory=dict)  # modules_to_save entry -> name written


@dataclass(frozen=True)
class Rule:
    """A vLLM rule: ``check`` returns the findings (each a repair or a refusal) of an adapter."""

    name: str
    states: str  # the rule in words (for the docs table)
    check: Callable[[LoraView, int | None], list[Finding]]
    repairs: str | None  # what the export does, or None: refused with the finding's way out


# -- reading the adapter ------------------------------------------------------------------------


def view_of(adapter) -> LoraView:
    """The LoRA adapter ``adapter`` (a read ``Adapter``) as the rules see it. Its config goes
    through LoRA's own reading first (corrupt fields, biases, inits peftcli cannot reproduce
    are refused there, as every command refuses them); the patterns are read here."""
    from peftcli.methods import METHODS

    config = adapter.config
    cfg = METHODS["lora"].config_from_adapter({k: v for k, v in config.items() if k not in ("rank_pattern", "alpha_pattern")})
    if cfg.target_parameters:  # keyed by the parameter's owner module, not a layer an engine's LoRA replaces
        raise BadInputError(f"{adapter.path} puts LoRA on parameters (target_parameters), which peftcli does not export",
                            "merge it into the base instead: peftcli merge BASE RUN -o OUT")
    view = LoraView(adapter.path, config, base_init=cfg.base_init, lora_bias=cfg.lora_bias)
    ranks = _pattern(config, "rank_pattern", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "a positive integer")
    alphas = _pattern(config, "alpha_pattern", _positive, "a positive number")
    for name in config.get("modules_to_save") or []:
        view.heads[name] = sorted(k for k in adapter.tensors if k.startswith(f"{PREFIX}{name}."))
    saved = {k for keys in view.heads.values() for k in keys}
    for key in sorted(adapter.tensors):
        suffix = next((s for s in KNOWN if key.endswith("." + s)), None)
        if key in saved:
            continue
        if suffix is None or not key.startswith(PREFIX):
            view.stray.append(key)
            continue
        view.modules.setdefault(key[len(PREFIX) : -len(suffix) - 1], {})[suffix] = adapter.tensors[key]
    for path, parts in view.modules.items():
        if LORA_A in parts or LORA_B in parts:
            rank = _module_rank(adapter.path, path, parts, _matched(ranks, path, "rank_pattern") or int(config["r"]))
            alpha = _matched(alphas, path, "alpha_pattern")
            view.ranks[path] = rank
            view.scales[path] = scale(config, rank, float(config.get("lora_alpha", 8) if alpha is None else alpha))
    return view


def _positive(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _pattern(config: dict, key: str, ok: Callable[[object], bool], expected: str) -> dict:
    """PEFT's ``rank_pattern``/``alpha_pattern``: each key a regex (refused as bad input, naming
    the file, when it is none), each value ``expected``."""
    from peftcli.patterns import compile_pattern, from_file

    pattern = config.get(key) or {}
    for name, value in pattern.items():
        compile_pattern(from_file(name, f"adapter_config.json {key}"), key)
        if not ok(value):
            raise BadInputError(
                f"adapter config: {key}[{name!r}] must be {expected}, not {value!r}",
                "the adapter config is corrupt or was edited by hand",
            )
    return pattern


def _matched(pattern: dict, path: str, source: str):
    """The value of the first key of PEFT's ``rank_pattern``/``alpha_pattern`` that matches
    module ``path`` as PEFT's ``get_pattern_key`` matches it (``re.match(rf"(.*\\.)?({key})$")``,
    first key in file order wins), or None."""
    from peftcli.patterns import from_file, fullmatch

    for key, value in pattern.items():
        if fullmatch(from_file(rf"(?:.*\.)?(?:{key})", f"adapter_config.json {source}"), path, source):
            return value
    return None


def _module_rank(run: str, path: str, parts: dict, want: int) -> int:
    a, b = parts.get(LORA_A), parts.get(LORA_B)
    if a is None or b is None:
        raise BadInputError(f"{run}: {path}: lora_A and lora_B must both be present", "the adapter is incomplete or corrupt")
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
        raise BadInputError(
            f"{run}: {path}: lora_A {list(a.shape)} and lora_B {list(b.shape)} are not [r, in] and [out, r]",
            "the adapter is corrupt",
        )
    if a.shape[0] != want:
        raise BadInputError(
            f"{run}: {path}: rank {a.shape[0]} in the tensors but {want} in the config (r or rank_pattern)",
            "the adapter config is corrupt or was edited by hand",
        )
    return int(a.shape[0])


# -- the rules ----------------------------------------------------------------------------------


def _dora(view: LoraView, max_rank: int | None) -> list[Finding]:
    # vLLM: PEFTHelper._validate_features "vLLM does not yet support DoRA" (every version).
    if not view.config.get("use_dora") and not any(MAGNITUDE in p for p in view.modules.values()):
        return []
    return [Finding("dora", f"{view.run} is a DoRA adapter (use_dora), which vLLM refuses",
                    way_out=f"{merge_way(view.run)}, {convert_way(view.run)}")]


def _init(view: LoraView, max_rank: int | None) -> list[Finding]:
    # PEFT subtracts PiSSA's/OLoRA's initial B·A from the base on load; vLLM does not (newest
    # versions refuse these inits; older ones serve them wrong).
    init = view.base_init
    if not init:
        return []
    return [Finding("init", f"init_lora_weights={view.config.get('init_lora_weights')!r}: PEFT changes the base "
                    f"weights when it loads a {init} adapter, vLLM does not", way_out=merge_way(view.run))]


def _bias(view: LoraView, max_rank: int | None) -> list[Finding]:
    # vLLM: "vLLM does not support LoRA bias (lora_bias)"; "Adapter bias is not supported".
    if not view.lora_bias and not any(LORA_BIAS in p for p in view.modules.values()):
        return []
    return [Finding("lora-bias", f"{view.run} has lora_bias (a bias on lora_B), which vLLM refuses", way_out=merge_way(view.run))]


# PEFT options that change what the adapter computes and that vLLM does not implement (its
# newest PEFTHelper refuses each; older versions drop the key and serve the adapter wrong).
UNSERVED = {"alora_invocation_tokens": "Activated LoRA", "layer_replication": "layer replication",
            "use_bdlora": "block-diagonal LoRA", "use_qalora": "QALoRA"}


def _unserved(view: LoraView, max_rank: int | None) -> list[Finding]:
    used = [k for k in UNSERVED if view.config.get(k)]
    if not used:
        return []
    return [Finding("peft-features", f"{used[0]} ({UNSERVED[used[0]]}) is set, which vLLM does not implement",
                    way_out=f"serve {view.run} with PEFT, or retrain it without {used[0]}")]


def _vocabulary(view: LoraView, max_rank: int | None) -> list[Finding]:
    # vLLM has no extra vocabulary (removed in v0.12), reads no trainable tokens, and loads an
    # embedding LoRA only for the base's exact vocabulary: embedding deltas are merged instead.
    kinds = {"lora_embedding_A": "LoRA on an embedding (lora_embedding_A/B)", "lora_embedding_B": "LoRA on an embedding (lora_embedding_A/B)",
             "token_adapter.trainable_tokens_delta": "trainable tokens (new or changed vocabulary rows)",
             "base_layer.weight": "a saved embedding or lm_head matrix (PEFT saves it when the vocabulary was resized)"}
    found = [(path, kinds[s]) for path, parts in view.modules.items() for s in VOCABULARY if s in parts]
    found += [(name, "a whole embedding or output head in modules_to_save") for name in view.heads
              if name.rsplit(".", 1)[-1] in VOCABULARY_MODULES]
    if not found:
        return []
    path, what = found[0]
    return [Finding("vocabulary", f"{path}: {what}; vLLM serves no embedding deltas or extra vocabulary"
                    + (f" (+{len(found) - 1} more)" if len(found) > 1 else ""), way_out=merge_way(view.run))]


def _heads(view: LoraView, max_rank: int | None) -> list[Finding]:
    # vLLM (newest PEFTHelper): modules_to_save only as ["classifier", "score"], the head of a
    # classification model; older versions refuse any modules_to_save.
    out = []
    for name in view.heads:
        last = name.rsplit(".", 1)[-1]
        if last in VOCABULARY_MODULES or name in HEAD_NAMES:
            continue
        if last not in HEAD_NAMES:
            out.append(Finding("saved-modules", f"modules_to_save holds {name}: vLLM loads no saved module but a "
                               f"classification head named {' or '.join(HEAD_NAMES)}", way_out=merge_way(view.run)))
            continue
        # PEFT matches a modules_to_save name as a dotted suffix of module paths: the bare name
        # selects the same module when no other module of the adapter ends with it.
        clash = sorted(o for o in {*view.modules, *view.heads} if o != name and (o == last or o.endswith("." + last)))
        if clash:
            out.append(Finding("saved-modules", f"modules_to_save names the head {name}, and vLLM's name {last!r} "
                               f"would also name {clash[0]}", way_out=merge_way(view.run)))
        else:
            out.append(Finding("saved-modules", f"modules_to_save names the head by its path {name}; vLLM accepts only "
                               f"the names {' and '.join(HEAD_NAMES)}", repair=f"listed as {last!r}, which PEFT matches to the same module"))
    return out


def _names(view: LoraView, max_rank: int | None) -> list[Finding]:
    # vLLM: parse_fine_tuned_lora_name raises "unsupported LoRA weight" for any other name.
    if not view.stray:
        return []
    return [Finding("tensor-names", f"tensor {view.stray[0]!r} is no LoRA tensor vLLM reads"
                    + (f" (+{len(view.stray) - 1} more)" if len(view.stray) > 1 else ""),
                    way_out=f"it belongs to no module of the adapter config: {merge_way(view.run)}")]


def target_rank(view: LoraView, max_rank: int | None) -> int | None:
    """The rank the export writes: the smallest allowed max_lora_rank at or above the adapter's
    largest, within ``max_rank``; None when none is."""
    cap = max_rank or MAX_LORA_RANKS[-1]
    return next((r for r in MAX_LORA_RANKS if view.rank <= r <= cap), None)


def _rank(view: LoraView, max_rank: int | None) -> list[Finding]:
    # vLLM: validate_legal refuses a rank above max_lora_rank (one of MAX_LORA_RANKS).
    if not view.ranks:
        return []  # no LoRA module: the other rules say what the adapter holds
    target = target_rank(view, max_rank)
    ranks = sorted(set(view.ranks.values()))
    if target is None:
        cap = max_rank or MAX_LORA_RANKS[-1]
        flag = "`max_lora_rank`" if max_rank else "vLLM's largest max_lora_rank"
        return [Finding("rank", f"rank {view.rank} is above {flag} {cap}, and cutting a rank is not exact",
                        way_out=f"serve it with a larger `max_lora_rank`, {convert_way(view.run)}".replace(", or make", "; or make"))]
    if ranks == [target] and int(view.config["r"]) == target:
        return []
    what = f"ranks {', '.join(map(str, ranks))} (rank_pattern)" if len(ranks) > 1 else f"rank {view.rank}"
    return [Finding("rank", f"{what}: not one rank from vLLM's max_lora_rank values {', '.join(map(str, MAX_LORA_RANKS))}",
                    repair=f"padded to rank {target} with zero rows of lora_A and columns of lora_B; "
                    "lora_alpha set so that α/r keeps each module's scale")]


def _scaling(view: LoraView, max_rank: int | None) -> list[Finding]:
    # vLLM before PEFTHelper ignores use_rslora, and all but the newest ignore rank_pattern and
    # alpha_pattern: one α/r with use_rslora false is the scaling every version applies alike.
    used = [k for k in ("use_rslora", "rank_pattern", "alpha_pattern") if view.config.get(k)]
    if not used:
        return []
    folded = sum(1 for s in view.scales.values() if s != view.default_scale)
    return [Finding("scaling", f"{', '.join(used)}: not applied alike by every vLLM version",
                    repair="folded into one lora_alpha with use_rslora false and no patterns"
                    + (f", and each module's own scale into its lora_B ({folded} modules)" if folded else ""))]


RULES: tuple[Rule, ...] = (
    Rule("dora", "no DoRA (use_dora, lora_magnitude_vector)", _dora, None),
    Rule("init", "no init that changes the base on load (PiSSA, OLoRA)", _init, None),
    Rule("peft-features", "none of alora_invocation_tokens, layer_replication, use_bdlora, use_qalora", _unserved, None),
    Rule("lora-bias", "no bias on lora_B (lora_bias)", _bias, None),
    Rule("vocabulary", "no embedding deltas: LoRA on embeddings, trainable tokens, saved embedding or lm_head matrices", _vocabulary, None),
    Rule("saved-modules", "modules_to_save holds at most a classification head named classifier or score", _heads,
         "a head listed by its path is written under its name classifier or score"),
    Rule("tensor-names", "every tensor is a lora_A.weight or lora_B.weight of a module (or of the head)", _names, None),
    Rule("rank", "one rank, one of 1, 8, 16, 32, 64, 128, 256, 320, 512, at most `max_lora_rank`", _rank,
         "padded with zeros to the next allowed rank, lora_alpha rescaled: exact"),
    Rule("scaling", "one α/r: use_rslora false, no rank_pattern or alpha_pattern", _scaling,
         "rsLoRA and the patterns folded into lora_alpha and, per module, into lora_B: exact"),
)


def lint(view: LoraView, max_rank: int | None) -> list[Finding]:
    """Every rule's findings, in rule order."""
    return [f for rule in RULES for f in rule.check(view, max_rank)]


# -- the repairs --------------------------------------------------------------------------------


def plan(view: LoraView, max_rank: int | None) -> Plan:
    """The exact repair of an adapter none of whose findings is refused: rank R, one α with
    α/R = the scale of the modules no pattern names, and s_m/that on each other module's B."""
    rank = target_rank(view, max_rank)
    if rank is None:  # the rank rule refused it: plan is called only when nothing is refused
        raise AssertionError("plan() of an adapter whose rank the rank rule refuses")
    s = view.default_scale
    alpha = s * rank
    factors = {p: m / s for p, m in view.scales.items() if m != s}
    heads = {name: name.rsplit(".", 1)[-1] for name in view.heads}
    return Plan(rank, int(alpha) if float(alpha).is_integer() else alpha, factors, heads)


def repaired(view: LoraView, adapter, p: Plan) -> tuple[dict, dict]:
    """The adapter config and tensors the plan makes: every module padded to rank ``p.rank``
    (zero rows of A, zero columns of B), B times the module's factor (computed in fp64, kept
    in fp32 when the adapter's is 16-bit, so folding rounds no more than fp32 does), heads as
    they are."""
    import torch

    config = dict(view.config)
    config.update(r=p.rank, lora_alpha=p.alpha, use_rslora=False, rank_pattern={}, alpha_pattern={})
    if view.heads:
        config["modules_to_save"] = [p.heads[name] for name in view.heads]
    tensors = {k: adapter.tensors[k] for keys in view.heads.values() for k in keys}
    for path, parts in view.modules.items():
        a, b = parts[LORA_A], parts[LORA_B]
        factor = p.factors.get(path)
        if factor is not None:
            dtype = torch.float32 if b.dtype in (torch.float16, torch.bfloat16) else b.dtype
            b = (b.double() * factor).to(dtype)
            if not bool(torch.isfinite(b).all()):
                raise BadInputError(
                    f"{view.run}: {path}: lora_B times its scale ratio {factor:g} is not finite",
                    "the adapter's rank_pattern/alpha_pattern are absurd for these weights",
                )
        pad = p.rank - a.shape[0]
        if pad:
            a = torch.cat([a, a.new_zeros(pad, a.shape[1])])
            b = torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1)
        tensors[f"{PREFIX}{path}.{LORA_A}"] = a.contiguous()
        tensors[f"{PREFIX}{path}.{LORA_B}"] = b.contiguous()
    return config, tensors
