"""LoRA (and DoRA, rsLoRA): the method (``method``), its module-level layer (``layer``), PEFT's
initialisations that change the base weights (``base_init``) and its options on embedding
layers (``embeddings``)."""

from peftcli.methods.lora.method import LoRA, LoraConfig

__all__ = ["LoRA", "LoraConfig"]
