"""Full fine-tuning: every parameter trains, and the run is saved as a standalone checkpoint.

``FullModel`` gives the training loop the same face as ``AdaptedModel`` (φ = all parameters)
and writes the model through the streaming writer in the base checkpoint's dtypes, with
config and tokenizer files, so ``transformers`` loads the result and ``peftcli diff`` can
subtract the base from it tensor by tensor.
"""

from __future__ import annotations

import json
import os

from torch import nn

from peftcli.checkpoint.atomic import atomic_output, open_new_file
from peftcli.checkpoint.dtypes import safetensors_dtype, torch_dtype
from peftcli.checkpoint.reader import open_checkpoint
from peftcli.checkpoint.writer import CheckpointWriter, TensorSpec, copy_model_files


class FullModel(nn.Module):
    """Every parameter of the model trains; saved as a checkpoint (the loop's model interface)."""

    grad_carriers = False  # as AdaptedModel declares it: DDP reduces these gradients itself

    def __init__(self, model: nn.Module, base_dir: str):
        super().__init__()
        self.model = model
        self.base_dir = base_dir
        with open_checkpoint(base_dir) as ckpt:
            self._base_dtypes = {t.name: t.dtype for t in ckpt.tensors.values()}
        for p in model.parameters():
            p.requires_grad_(True)

    def forward(self, **kwargs):
        return self.model(**kwargs)

    def _unique_parameters(self) -> dict[str, nn.Parameter]:
        """Named parameters, tied ones once (the first name, as the base checkpoint stores them)."""
        seen, out = set(), {}
        for name, p in self.model.named_parameters(remove_duplicate=False):
            if p.data_ptr() in seen:
                continue
            seen.add(p.data_ptr())
            out[name] = p
        return out

    def phi_parameters(self) -> dict[str, nn.Parameter]:
        return self._unique_parameters()

    def head_parameter_names(self) -> set[str]:
        """None apart: a fine-tuned model trains its head at the model's rate (``head_lr`` is refused)."""
        return set()

    @property
    def num_trainable(self) -> int:
        return sum(p.numel() for p in self._unique_parameters().values())

    def save_into(self, directory: str, metadata: dict[str, str] | None = None) -> None:
        """Write the model as a checkpoint into ``directory`` (replacing what a previous save wrote)."""
        state, seen = {}, set()
        for name, tensor in self.model.state_dict().items():
            if tensor.data_ptr() in seen:  # tied weights are stored once, as in the base
                continue
            seen.add(tensor.data_ptr())
            state[name] = tensor
        # Same dtype as the base for the tensors it has (a new head: as trained), so diffs line up.
        dtypes = {k: self._base_dtypes.get(k, safetensors_dtype(v.dtype)) for k, v in state.items()}
        specs = [TensorSpec(k, dtypes[k], tuple(v.shape)) for k, v in state.items()]
        with CheckpointWriter(os.path.join(directory, "model.safetensors"), specs, metadata=metadata, force=True) as w:
            for k, v in state.items():
                w.write(k, v.detach().to("cpu", torch_dtype(dtypes[k])).contiguous())
        copy_model_files(self.base_dir, directory)  # tokenizer and generation files
        config = json.loads(self.model.config.to_json_string())  # with the head's labels
        config["architectures"] = [type(self.model).__name__]  # the class whose tensors these are (the base's may be BertModel)
        with atomic_output(os.path.join(directory, "config.json"), directory=False, force=True) as tmp:
            with open_new_file(tmp) as f:
                f.write((json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
                f.flush()
                os.fsync(f.fileno())
