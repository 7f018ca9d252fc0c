"""peftcli: model surgery on checkpoints — inspect, adapt, diff, merge.

The Python API mirrors the CLI (which is a thin layer over it)::

    from peftcli import open_checkpoint, summarize
    with open_checkpoint("model/") as ckpt:
        print(summarize(ckpt)["num_params"])

Importing ``peftcli`` does not import torch; tensor reads and writes do, lazily.
"""

__version__ = "0.1.0"

from peftcli.checkpoint.reader import Checkpoint, TensorInfo, open_checkpoint  # noqa: E402
from peftcli.errors import PeftcliError  # noqa: E402
from peftcli.summary import summarize  # noqa: E402

__all__ = ["Checkpoint", "PeftcliError", "TensorInfo", "__version__", "open_checkpoint", "summarize"]
