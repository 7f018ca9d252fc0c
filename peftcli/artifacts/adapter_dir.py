"""The adapter directory: ``adapter_config.json`` + ``adapter_model.safetensors``.

For methods PEFT has (LoRA, DoRA, rsLoRA, IA³, prompt and prefix tuning) the directory is
exactly PEFT's, so ``PeftModel.from_pretrained`` loads it and we load PEFT's. Methods PEFT
lacks (bottleneck adapters, BitFit, layer groups) use the same layout with
``"peft_type": "PEFTCLI"`` and a ``"peftcli"`` section holding the method and its options.
Provenance (peftcli version, method options, seed, base) goes in the safetensors
``__metadata__`` under ``peftcli.*`` keys, which PEFT ignores.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from peftcli.checkpoint.atomic import atomic_output, open_new_file
from peftcli.checkpoint.reader import ADAPTER_WEIGHTS, load_json, open_checkpoint
from peftcli.checkpoint.writer import CheckpointWriter, TensorSpec
from peftcli.errors import BadInputError

ADAPTER_CONFIG = "adapter_config.json"
PEFTCLI_PEFT_TYPE = "PEFTCLI"


@dataclass
class Adapter:
    path: str
    config: dict  # adapter_config.json
    tensors: dict  # name -> torch.Tensor (memory-mapped)
    metadata: dict[str, str]

    @property
    def method_name(self) -> str:
        from peftcli.methods import method_for_adapter_config

        return method_for_adapter_config(self.config, self.path).name


def read_adapter(path: str) -> Adapter:
    """Read and minimally validate an adapter directory (keys vs base are checked at attach)."""
    if not os.path.isdir(path):
        raise BadInputError(f"{path}: not an adapter directory", f"expected a directory with {ADAPTER_CONFIG}")
    config_path = os.path.join(path, ADAPTER_CONFIG)
    if not os.path.isfile(config_path):
        raise BadInputError(f"{path}: no {ADAPTER_CONFIG}", "is this an adapter directory written by peftcli inject or PEFT?")
    config = load_json(config_path, "adapter config")
    weights = os.path.join(path, ADAPTER_WEIGHTS)
    if not os.path.isfile(weights):
        if os.path.isfile(os.path.join(path, "adapter_model.bin")):
            raise BadInputError(f"{path}: adapter weights are a pickle (adapter_model.bin)", "re-save the adapter with safetensors")
        raise BadInputError(f"{path}: no {ADAPTER_WEIGHTS}")
    ckpt = open_checkpoint(weights)
    tensors = {name: ckpt.get(name) for name in ckpt}
    return Adapter(path=path, config=config, tensors=tensors, metadata=dict(ckpt.metadata))


def _write_files(directory: str, config: dict, tensors: dict, metadata: dict[str, str] | None, force: bool) -> None:
    from peftcli.checkpoint.dtypes import safetensors_dtype

    specs = [TensorSpec(n, safetensors_dtype(t.dtype), tuple(t.shape)) for n, t in tensors.items()]
    with CheckpointWriter(os.path.join(directory, ADAPTER_WEIGHTS), specs, metadata=metadata, force=force) as w:
        for name, tensor in tensors.items():
            w.write(name, tensor)
    with atomic_output(os.path.join(directory, ADAPTER_CONFIG), directory=False, force=force) as tmp:
        with open_new_file(tmp) as f:
            f.write((json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())


def write_adapter_files(directory: str, config: dict, tensors: dict, *, metadata: dict[str, str] | None = None) -> None:
    """Replace the two adapter files inside an existing directory, each atomically (training runs)."""
    _write_files(directory, config, tensors, metadata, force=True)


def write_adapter(
    out: str,
    config: dict,
    tensors: dict,
    *,
    metadata: dict[str, str] | None = None,
    inputs: list[str] = (),
    force: bool = False,
) -> None:
    """Write an adapter directory atomically (the whole directory appears at once)."""
    with atomic_output(out, directory=True, inputs=inputs, force=force) as tmp:
        _write_files(tmp, config, tensors, metadata, force=False)
