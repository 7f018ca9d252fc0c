"""What peftcli knows of each architecture family, keyed by config.json's ``model_type``: which
modules are the query/value projections, the attention and the FFN of its blocks, which are
transformers' ``Conv1D``, what IA³ adapts by default, and its biases by role.

Declarations (and the lookup of a block's family); the methods say what they do with them.
A model_type missing from a table is recognised by its module names where a method allows it.
"""

from __future__ import annotations

from dataclasses import dataclass

# The LoRA paper adapts the query and value projections; these are their names per family.
DEFAULT_QV_TARGETS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "opt"), ("q_proj", "v_proj")),
    "phi3": ("qkv_proj",),
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "electra"), ("query", "value")),
    "distilbert": ("q_lin", "v_lin"),
    "gpt2": ("c_attn",),
    **dict.fromkeys(("gpt_neox", "falcon", "bloom"), ("query_key_value",)),
    "t5": ("q", "v"),
}
# A model_type not above: the first of these whose names are all among its linear modules.
FALLBACK_QV = (("q_proj", "v_proj"), ("query", "value"), ("q_lin", "v_lin"), ("c_attn",), ("query_key_value",))

# Families whose projections are transformers' Conv1D (every model_type whose modeling file calls
# `Conv1D(`: gpt2, openai, imagegpt, decision_transformer, clvp); their other layers are nn.Linear.
CONV1D_MODEL_TYPES = {"gpt2", "openai-gpt", "imagegpt", "decision_transformer", "clvp", "clvp_decoder"}
CONV1D_KINDS = {"c_attn", "c_proj", "c_fc", "q_attn"}  # their Conv1D modules; heads such as `score` are nn.Linear

# config.json's name for the hidden size h, per family.
HIDDEN_SIZE_KEYS = ("hidden_size", "n_embd", "d_model", "dim")
# Older GPT-2 checkpoints also store each layer's causal-mask buffers; they are not parameters.
GPT2_MASK_BUFFERS = r"\.attn\.(masked_)?bias"


# -- blocks: attention and FFN ------------------------------------------------------------
@dataclass(frozen=True)
class Family:
    """Layer-relative module paths of one architecture family's block."""

    attn_out: str  # attention output projection
    ffn_out: str  # FFN output projection
    ffn: str | None  # the FFN as one module (parallel style); None where the FFN is inline in the block
    ffn_takes_residual: bool = False  # the FFN module is called (h, x) and adds x + LayerNorm itself (BERT)
    ffn_parts: tuple[str, ...] = ()  # the FFN's modules where it is not the one module ``ffn`` (BERT, OPT)

    @property
    def attention_modules(self) -> tuple[str, ...]:
        """The block's attention submodule(s): ``self_attn``, ``attention``, ``attn``..."""
        return (self.attn_out.split(".")[0],)

    @property
    def ffn_modules(self) -> tuple[str, ...]:
        """The block's FFN submodule(s): ``mlp``; BERT's ``intermediate`` and ``output``; OPT's ``fc1``, ``fc2``."""
        return self.ffn_parts or ((self.ffn,) if self.ffn else (self.ffn_out.split(".")[0],))


LLAMA_LIKE = Family("self_attn.o_proj", "mlp.down_proj", "mlp")
BERT_LIKE = Family(
    "attention.output.dense", "output.dense", "output", ffn_takes_residual=True, ffn_parts=("intermediate", "output")
)
GPT2 = Family("attn.c_proj", "mlp.c_proj", "mlp")
BLOCK_FAMILIES = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3"), LLAMA_LIKE),
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "electra"), BERT_LIKE),
    "gpt2": GPT2,
}
# Another model_type's block is recognised by its module names (as in transformers' classes).
BLOCKS_BY_NAME = (
    LLAMA_LIKE,
    BERT_LIKE,
    GPT2,
    Family("attention.dense", "mlp.dense_4h_to_h", "mlp"),  # gpt_neox
    Family("self_attention.dense", "mlp.dense_4h_to_h", "mlp"),  # falcon, bloom
    Family("attention.out_lin", "ffn.lin2", "ffn"),  # distilbert
    Family("self_attn.out_proj", "fc2", None, ffn_parts=("fc1", "fc2")),  # opt, bart: fc1/fc2 sit in the block itself
)


def find_family(model_type: str | None, rels) -> Family | None:
    """The family whose attention and FFN output projections are among ``rels``, module paths
    from their block (``targets.block_paths``)."""
    preset = BLOCK_FAMILIES.get(model_type or "")
    for family in ((preset,) if preset else ()) + BLOCKS_BY_NAME:
        if {family.attn_out, family.ffn_out} <= rels:
            return family
    return None


# -- IA³ --------------------------------------------------------------------------------
# PEFT 0.21's TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING (copied: PEFT is optional).
IA3_TARGETS: dict[str, tuple[str, ...]] = {
    "t5": ("k", "v", "wo"),
    "mt5": ("k", "v", "wi_1"),
    "gpt2": ("c_attn", "mlp.c_proj"),
    "bloom": ("query_key_value", "mlp.dense_4h_to_h"),
    "roberta": ("key", "value", "output.dense"),
    "opt": ("q_proj", "k_proj", "fc2"),
    "gptj": ("q_proj", "v_proj", "fc_out"),
    "gpt_neox": ("query_key_value", "dense_4h_to_h"),
    "gpt_neo": ("q_proj", "v_proj", "c_proj"),
    "bart": ("q_proj", "v_proj", "fc2"),
    "gpt_bigcode": ("c_attn", "mlp.c_proj"),
    "llama": ("k_proj", "v_proj", "down_proj"),
    "llama4": ("q_proj", "v_proj", "down_proj"),
    "mistral": ("k_proj", "v_proj", "down_proj"),
    "mixtral": ("k_proj", "v_proj", "w2"),
    "bert": ("key", "value", "output.dense"),
    "deberta-v2": ("key_proj", "value_proj", "output.dense"),
    "deberta": ("in_proj", "output.dense"),
    "RefinedWebModel": ("query_key_value", "dense_4h_to_h"),
    "RefinedWeb": ("query_key_value", "dense_4h_to_h"),
    "falcon": ("query_key_value", "dense_4h_to_h"),
    "phi": ("q_proj", "v_proj", "fc2"),
    "gemma": ("q_proj", "v_proj", "down_proj"),
    "gemma2": ("q_proj", "v_proj", "down_proj"),
    "gemma3_text": ("q_proj", "v_proj", "down_proj"),
    "qwen2": ("q_proj", "v_proj", "down_proj"),
    "qwen3": ("q_proj", "v_proj", "down_proj"),
}

# PEFT 0.21's TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.
IA3_FEEDFORWARD: dict[str, tuple[str, ...]] = {
    "t5": ("wo",),
    "mt5": (),
    "gpt2": ("mlp.c_proj",),
    "bloom": ("mlp.dense_4h_to_h",),
    "roberta": ("output.dense",),
    "opt": ("fc2",),
    "gptj": ("fc_out",),
    "gpt_neox": ("dense_4h_to_h",),
    "gpt_neo": ("c_proj",),
    "bart": ("fc2",),
    "gpt_bigcode": ("mlp.c_proj",),
    "llama": ("down_proj",),
    "llama4": ("down_proj",),
    "mistral": ("down_proj",),
    "mixtral": ("w2",),
    "bert": ("output.dense",),
    "deberta-v2": ("output.dense",),
    "deberta": ("output.dense",),
    "RefinedWeb": ("dense_4h_to_h",),
    "RefinedWebModel": ("dense_4h_to_h",),
    "falcon": ("dense_4h_to_h",),
    "phi": ("fc2",),
    "gemma": ("down_proj",),
    "gemma2": ("down_proj",),
    "gemma3_text": ("down_proj",),
    "qwen2": ("down_proj",),
    "qwen3": ("down_proj",),
}


# -- BitFit -----------------------------------------------------------------------------
# BitFit's bias roles: role → regex searched in the bias's module path, per naming family.
LLAMA_BIASES = {
    "query": r"\.q_proj$",
    "key": r"\.k_proj$",
    "value": r"\.v_proj$",
    "attn-out": r"\.o_proj$",
    "mlp-in": r"\.(gate_proj|up_proj)$",
    "mlp-out": r"\.down_proj$",
    "norm": r"norm$",
}
BERT_BIASES = {
    "query": r"\.attention\.self\.query$",
    "key": r"\.attention\.self\.key$",
    "value": r"\.attention\.self\.value$",
    "attn-out": r"\.attention\.output\.dense$",
    "mlp-in": r"\.intermediate\.dense$",
    "mlp-out": r"\.layer\.\d+\.output\.dense$",  # not attention.output.dense
    "norm": r"LayerNorm$",
}
GPT2_BIASES = {
    "query": r"\.attn\.c_attn$",  # q, k and v share one fused projection (and bias)
    "key": r"\.attn\.c_attn$",
    "value": r"\.attn\.c_attn$",
    "attn-out": r"\.attn\.c_proj$",
    "mlp-in": r"\.mlp\.c_fc$",
    "mlp-out": r"\.mlp\.c_proj$",
    "norm": r"(^|\.)ln_(\d+|f)$",
}
BIAS_ROLES: dict[str, dict[str, str]] = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"), LLAMA_BIASES),
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "electra"), BERT_BIASES),
    "gpt2": GPT2_BIASES,
}
