"""Tiny seeded models built from ``transformers`` configs, saved as real model directories.

For the quick start and the recipes' built-in models (no hub access needed) and for the
test suite, which shares them. On the command line (``peftcli.cli.prepare``)::

    python -m peftcli.cli.prepare tiny /tmp/tiny-llama              # Llama-style, GQA
    python -m peftcli.cli.prepare tiny /tmp/tiny-gpt2 --arch gpt2   # Conv1D, transposed weights

The same seed gives byte-identical files.
"""

from __future__ import annotations

from typing import Any

ARCHS = ("llama", "llama-tied", "bert", "gpt2")
VOCAB = ["<pad>", "<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(252)]  # 256 tokens: "w0 w1 ..."


def word_tokenizer() -> Any:
    """A word-level tokenizer over ``VOCAB``, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def build(arch: str, out: str, seed: int = 0) -> str:
    """Build the tiny ``arch`` model with ``seed`` and save it (and a tokenizer) to ``out``."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    small = dict(vocab_size=len(VOCAB), pad_token_id=0, bos_token_id=2, eos_token_id=3)
    if arch in ("llama", "llama-tied"):
        # GQA: 4 query heads share 2 key/value heads; q/k/v/o and gate/up/down projections.
        cfg = tf.LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=arch == "llama-tied", **small,
        )
        model = tf.LlamaForCausalLM(cfg)
    elif arch == "bert":
        cfg = tf.BertConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, **small,
        )
        model = tf.BertModel(cfg)
    elif arch == "gpt2":
        # Conv1D layers store weights [in, out]; lm_head is tied to wte.
        cfg = tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, **small)
        model = tf.GPT2LMHeadModel(cfg)
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    model.eval().save_pretrained(out)
    word_tokenizer().save_pretrained(out)
    return out
