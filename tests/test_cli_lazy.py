"""Lazy subcommands (peftcli.cli.LazyCommands): ``peftcli merge`` imports merge's module alone,
not the method registry nor the other commands; ``--help`` still lists every subcommand and
merge's help still names the foldable methods of the registry."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
from click.testing import CliRunner

from peftcli.checkpoint.writer import CheckpointWriter, TensorSpec
from peftcli.cli import COMMANDS, cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _checkpoint(path: str, seed: int) -> str:
    """A small fp32 model directory (the fast merge path's input), seeded noise."""
    rng = np.random.default_rng(seed)
    tensors = {n: rng.standard_normal(s, dtype=np.float32) for n, s in (("model.embed_tokens.weight", (16, 8)), ("model.layers.0.mlp.up_proj.weight", (8, 8)))}
    specs = [TensorSpec(n, "F32", t.shape) for n, t in tensors.items()]
    with CheckpointWriter(path, specs, extra_files={"config.json": b'{"model_type": "llama", "vocab_size": 16}'}) as w:
        for n, t in tensors.items():
            w.write(n, t.tobytes())
    return path


def test_merge_imports_neither_the_methods_nor_other_commands(tmp_path):
    base, a, b = (_checkpoint(str(tmp_path / n), i) for i, n in enumerate(("base", "a", "b")))
    out = str(tmp_path / "m.safetensors")
    others = [f"peftcli.cli.{m}" for m, name in COMMANDS if name != "merge"]
    code = (
        "import sys\nfrom peftcli.cli import cli\n"
        f"try:\n    cli.main(['merge', {base!r}, {a!r}, {b!r}, '-o', {out!r}], prog_name='peftcli')\n"
        "except SystemExit as e:\n    assert not e.code, e.code\n"
        f"sys.stderr.write(repr(sorted(m for m in sys.modules if m in {['peftcli.methods', 'torch', *others]!r})))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert os.path.isfile(out)
    assert proc.stderr.strip().endswith("[]"), proc.stderr


def test_help_lists_every_subcommand_and_each_takes_quiet():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0, result.output
    listed = result.output.split("Commands:")[1]
    for _, name in COMMANDS:
        assert f"\n  {name} " in listed, name
        cmd = cli.commands[name]
        for leaf in cmd.commands.values() if hasattr(cmd, "commands") else [cmd]:  # inject's methods
            assert any(p.name == "quiet" for p in leaf.params), (name, leaf.name)  # add_quiet on first load
    assert cli.commands.get("no-such-command") is None
    assert sorted(cli.list_commands(None)) == sorted(name for _, name in COMMANDS)  # type: ignore[arg-type]


def test_merge_help_names_the_foldable_methods():
    from peftcli.methods import foldable

    result = CliRunner().invoke(cli, ["merge", "--help"])
    assert result.exit_code == 0, result.output
    assert "FOLDABLE" not in result.output
    text = " ".join(result.output.split())
    assert ", ".join(foldable()).replace(" ", "") in text.replace(" ", "")  # click wraps the list
