"""Shared test helpers: model inputs, output comparison, derived artifacts (fine-tunes, edited
adapters), and the one-line error contract (``assert_error``)."""

from __future__ import annotations

import json
import os

import torch

from peftcli.checkpoint import atomic


def batch(seed: int = 0, size: int = 2, length: int = 7, vocab: int = 256) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (size, length), generator=g)
    mask = torch.ones_like(ids)
    if size > 1:
        mask[1, :2] = 0  # some left padding, so masks matter
    return {"input_ids": ids, "attention_mask": mask}


def output_tensor(out) -> torch.Tensor:
    for name in ("logits", "last_hidden_state"):
        if hasattr(out, name) and getattr(out, name) is not None:
            return getattr(out, name)
    return out[0]


def randomize_(params, seed: int = 1, scale: float = 0.1) -> None:
    """Give φ non-trivial values (B = 0 at init would make every comparison vacuous)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * scale)


def noisy_copy(base: str, out: str, seed: int, scale: float = 0.01) -> str:
    """A "fine-tune" of checkpoint ``base``: every tensor plus seeded Gaussian noise × ``scale``."""
    from peftcli.checkpoint.reader import open_checkpoint
    from peftcli.checkpoint.writer import save_state_dict

    g = torch.Generator().manual_seed(seed)
    with open_checkpoint(base) as ckpt:
        sd = {n: ckpt.get(n) + scale * torch.randn(ckpt.tensors[n].shape, generator=g) for n in ckpt}
    save_state_dict(sd, out, source_dir=base)
    return out


def scaled_copy(base: str, out: str, changes: dict[str, float], seed: int) -> str:
    """A "fine-tune" of ``base`` changing only the named tensors: W × (1 + scale × (u − ½)), u uniform."""
    from peftcli.checkpoint.reader import open_checkpoint
    from peftcli.checkpoint.writer import save_state_dict

    with open_checkpoint(base) as ckpt:
        sd = {n: ckpt.get(n).clone() for n in ckpt}
    g = torch.Generator().manual_seed(seed)
    for name, scale in changes.items():
        sd[name] = (sd[name] * (1 + scale * (torch.rand(sd[name].shape, generator=g) - 0.5))).to(sd[name].dtype)
    save_state_dict(sd, out, source_dir=base if os.path.isdir(base) else None)
    return out


def edited_adapter(src: str, out, tensors=None, config=None) -> str:
    """A copy of adapter ``src`` with ``tensors(dict)`` / ``config(dict)`` applied (they edit in place)."""
    from peftcli.artifacts.adapter_dir import read_adapter, write_adapter

    adapter = read_adapter(src)
    t = {k: v.clone() for k, v in adapter.tensors.items()}
    c = json.loads(json.dumps(adapter.config))
    if tensors:
        tensors(t)
    if config:
        config(c)
    write_adapter(str(out), c, t)
    return str(out)


def whole_tensor_path(monkeypatch) -> None:
    """Merge inputs opened without ranged streams: every touched tensor goes through the
    engine's whole-tensor ``produce`` (to compare it with the ranged path)."""
    from peftcli.merging import engine

    real = engine.open_source

    def opened(*args, **kwargs):
        source = real(*args, **kwargs)
        source.streams = {}
        return source

    monkeypatch.setattr(engine, "open_source", opened)


def lm_rows(n: int) -> list[dict]:
    """``n`` causal-LM rows of a tiny vocabulary (w4 … w43) that a tiny model can fit."""
    return [{"text": " ".join(f"w{(3 * j + i) % 40 + 4}" for j in range(10))} for i in range(n)]


def cls_rows(n: int) -> list[dict]:
    """``n`` seeded classification rows a frozen random encoder can learn: the first word is the label."""
    import random

    rng = random.Random(0)
    return [
        {"text": f"{'w1' if i % 2 else 'w2'} " + " ".join(f"w{rng.randint(5, 60)}" for _ in range(5)), "label": "pos" if i % 2 else "neg"}
        for i in range(n)
    ]


def temporaries(directory) -> list[str]:
    """Temporaries an atomic write left in ``directory`` (none, when it failed cleanly)."""
    return [n for n in os.listdir(directory) if atomic.TEMP_MARK in n] if os.path.isdir(directory) else []


def assert_error(result, code: int, message: str, *absent, on_stdout: bool = False) -> str:
    """Exit ``code``, one ``error:`` line on stderr, ``message`` in it (or, for check, on stdout), no output left."""
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    assert result.exit_code == code, (result.exit_code, result.stdout[-2000:], result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "internal error" not in lines[0], lines[0]
    assert message in (result.stdout if on_stdout else lines[0]), (message, result.stdout[-2000:], lines[0])
    for path in absent:
        assert not os.path.lexists(path), f"{path} was left behind"
        assert temporaries(os.path.dirname(os.path.abspath(path))) == []
    return lines[0]
