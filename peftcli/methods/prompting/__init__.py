"""Prompt learning (PEFT's name for both): prompt tuning (``prompt``) and prefix tuning
(``prefix``), with what they share: the model's dimensions, task type and input embedding at
tensor level (``dims``), and at module level the soft-prompt module and the forward's
arguments shifted by the virtual tokens (``virtual_tokens``); prefix tuning's key/value
cache is ``prefix_cache``."""
