"""Which keys of a PEFT LoRA ``adapter_config.json`` peftcli reads, which it may ignore, and
which change the adapter's function in ways peftcli does not implement (refused by name).

PEFT's ``LoraConfig`` grows an option or two per release, many of them variants whose forward
is not W + s·B·A (activated LoRA, layer replication, QA-LoRA's pooled input, KaSA's learned
diagonal, ...). Folding such an adapter as a plain LoRA writes a model that is silently not the
adapter's, so every key is classified here, from PEFT 0.21/0.22's ``LoraConfig``:

- ``READ``: the options peftcli implements (``LoRA.config_from_adapter`` reads them);
- ``IGNORED``: keys with no effect on the weights a fold or forward reads: metadata, runtime
  settings, and the settings of initialisations that run only when ``init_lora_weights`` names
  them (``base_init`` decides those by that value);
- ``OFF``: options peftcli does not implement, accepted only at PEFT's "off" value;
- any other key (a newer PEFT's option) is accepted only when it is off (null, false, or
  empty), the value every PEFT option is off at, and refused otherwise.
"""

from __future__ import annotations

from peftcli.errors import BadInputError

READ = (
    "r", "lora_alpha", "target_modules", "exclude_modules", "lora_dropout", "fan_in_fan_out", "bias", "use_rslora",
    "modules_to_save", "init_lora_weights", "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern",
    "trainable_token_indices", "use_dora", "lora_bias", "peft_version", "target_parameters",
)
IGNORED = (
    "task_type", "peft_type", "auto_mapping", "base_model_name_or_path", "revision", "inference_mode",
    "runtime_config",  # ephemeral GPU offload of DoRA's norm: where, not what, is computed
    "megatron_core",  # a module name, used only with megatron_config
    "qalora_group_size",  # used only with use_qalora
    "velora_config",  # VeLoRA changes the backward pass only (compressed activations)
    # Initialisations' settings: they act only when init_lora_weights names them.
    "loftq_config", "eva_config", "corda_config", "lora_ga_config",
)
OFF = {
    "megatron_config": "Megatron-parallel LoRA layers",
    "alora_invocation_tokens": "activated LoRA, applied only after its invocation tokens, which does not fold",
    "use_qalora": "QA-LoRA, whose A reads pooled groups of the input",
    "monteclora_config": "MonteCLoRA's sampled adapters",
    "layer_replication": "layer replication, which gives the adapted model more layers than the base",
    "use_bdlora": "block-diagonal LoRA factors",
    "arrow_config": "Arrow routing between adapters",
    "kasa_config": "KaSA, a learned singular-value diagonal between A and B",
    "astra_config": "ASTRA adapter layers",
    "ensure_weight_tying": "adapters tied across tied embeddings",
}
# PEFT's own layer-name patterns: with one of these, PEFT's layer index is the number after
# it, which in these architectures is the first number in the path, the index peftcli reads.
COMMON_LAYERS_PATTERNS = ("layers", "h", "block", "blocks", "layer")

_USE_PEFT = "use this adapter with PEFT, or retrain it without the option"


def is_off(value: object) -> bool:
    """PEFT's value for an option that is not used: null, false, or an empty list/object/string."""
    return value is None or value is False or (isinstance(value, (list, dict, str)) and not value)


def check_keys(d: dict) -> None:
    """Refuse an adapter config that uses a LoRA option peftcli does not implement, naming it."""
    for key, value in d.items():
        if key in READ or key in IGNORED or is_off(value):
            continue
        what = OFF.get(key)
        if what is not None:
            raise BadInputError(f"LoRA adapter config sets {key}, for {what}: peftcli does not implement it", _USE_PEFT)
        raise BadInputError(
            f"LoRA adapter config sets {key} = {_shown(value)}, an option peftcli does not know",
            "a newer PEFT's option may change what the adapter computes: " + _USE_PEFT,
        )
    pattern = d.get("layers_pattern")
    if not is_off(pattern) and d.get("layers_to_transform") is not None:
        names = [pattern] if isinstance(pattern, str) else pattern
        if not (isinstance(names, list) and all(n in COMMON_LAYERS_PATTERNS for n in names)):
            raise BadInputError(
                f"LoRA adapter config has layers_pattern {_shown(pattern)}, which peftcli does not read",
                "peftcli reads the layer index as the first number in a module path; save the adapter with "
                "layers_pattern null or one of " + ", ".join(COMMON_LAYERS_PATTERNS),
            )


def _shown(value: object) -> str:
    import json

    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."
