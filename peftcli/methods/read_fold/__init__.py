"""Read-and-fold only methods: PEFT adapter types peftcli reads and folds into the weights
(``check``, ``merge``, ``convert --to diff``, ``inspect``) but never injects, attaches or
trains. They are a small registry of their own (``READ_FOLD`` in ``peftcli.methods``), beside
``METHODS``, so that ``inject``, ``train``, recipes and ``inspect --budget`` never offer them;
each declares ``read_only = True`` and inherits ``ReadFoldBase``'s one-line refusals.

``base``: that class and PEFT's target matching; ``ln_tuning``: PEFT's LN_TUNING;
``fourierft``: PEFT's FOURIERFT; ``shira``: PEFT's SHIRA;
``c3a``: PEFT's C3A;
``randlora``: PEFT's RANDLORA; ``miss``: PEFT's MISS.
"""

from __future__ import annotations

from peftcli.methods.read_fold.base import ReadFoldBase
from peftcli.methods.read_fold.c3a import C3a
from peftcli.methods.read_fold.fourierft import FourierFt
from peftcli.methods.read_fold.ln_tuning import LnTuning
from peftcli.methods.read_fold.miss import Miss
from peftcli.methods.read_fold.randlora import RandLora
from peftcli.methods.read_fold.shira import Shira

__all__ = ["C3a", "FourierFt", "LnTuning", "Miss", "RandLora", "ReadFoldBase", "Shira"]
