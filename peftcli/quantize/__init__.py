"""Frozen base weights held in fewer bits for training (QLoRA's NF4); see ``nf4``."""
