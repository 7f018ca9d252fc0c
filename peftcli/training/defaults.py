"""The training settings a run gets for what the user left out: its method's declared defaults.

Each method declares a ``TrainDefaults`` (``peftcli.methods.base``), full fine-tuning the one
below; a fresh run's configuration is completed from it once its task is known (a decoder's
``lm``/``sft`` may want a gentler rate than a classifier), and the completed configuration is
what ``train_args.json`` records, so a resumed run goes on with the numbers it started with.
Values were chosen by measurement: benchmarks/quality.py, benchmarks/README.md.
"""

from __future__ import annotations

import dataclasses

from peftcli.methods.base import TrainDefaults
from peftcli.training.config import TrainConfig

# Every parameter trains: pretrained weights move little, so the rate is far below a φ's.
FULL_FINE_TUNING = TrainDefaults(lr=1e-4, generative_lr=2e-5, head_lr=None)


def defaults_for(cfg: TrainConfig, adapter_config: dict | None) -> TrainDefaults:
    """The declared defaults of the run: full fine-tuning's, or its adapter's method's."""
    if cfg.full or adapter_config is None:
        return FULL_FINE_TUNING
    from peftcli.methods import method_for_adapter_config

    return method_for_adapter_config(adapter_config, "the run").train_defaults


def with_defaults(cfg: TrainConfig, defaults: TrainDefaults, task: str) -> TrainConfig:
    """``cfg`` with every training setting it leaves out taken from ``defaults`` for ``task``."""
    given_warmup = cfg.warmup_steps is not None or cfg.warmup_ratio is not None
    return dataclasses.replace(
        cfg,
        lr=cfg.lr if cfg.lr is not None else defaults.lr_for(task),
        head_lr=cfg.head_lr if cfg.head_lr is not None else defaults.head_lr,  # None: the head trains at lr
        schedule=cfg.schedule or defaults.schedule,
        warmup_ratio=cfg.warmup_ratio if given_warmup else defaults.warmup_ratio,
    )


def warmup_steps(cfg: TrainConfig, total: int) -> int:
    """The steps the learning rate warms up over: ``warmup_steps``, else ``warmup_ratio`` of ``total``."""
    if cfg.warmup_steps is not None:
        return cfg.warmup_steps
    return round((cfg.warmup_ratio or 0.0) * total)
