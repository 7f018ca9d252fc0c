"""The only code that touches checkpoint files: reading, validating and writing safetensors.

Tensor level only: nothing here imports ``transformers`` or builds a model, and torch is
imported only when tensor bytes are actually read or written.
"""

from peftcli.checkpoint.reader import Checkpoint, TensorInfo, open_checkpoint

__all__ = ["Checkpoint", "TensorInfo", "open_checkpoint"]
