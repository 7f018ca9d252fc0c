"""Shipped completion scripts must equal fresh generation, and completion must work."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from peftcli.cli import cli
from scripts.generate_completions import FILES, ROOT


@pytest.mark.parametrize("shell", sorted(FILES))
def test_shipped_completion_matches_fresh_generation(shell):
    fresh = CliRunner().invoke(cli, ["completion", shell])
    assert fresh.exit_code == 0
    with open(os.path.join(ROOT, "completions", FILES[shell]), encoding="utf-8") as f:
        shipped = f.read()
    assert shipped == fresh.stdout, "completions/ drifted: run python scripts/generate_completions.py"


def test_bash_completion_offers_subcommands_and_options():
    env = {**os.environ, "_PEFTCLI_COMPLETE": "bash_complete", "COMP_WORDS": "peftcli ins", "COMP_CWORD": "1"}
    proc = subprocess.run([sys.executable, "-m", "peftcli"], env=env, capture_output=True, text=True, cwd=ROOT)
    assert "plain,inspect" in proc.stdout
    env.update(COMP_WORDS="peftcli inspect model --bud", COMP_CWORD="3")
    proc = subprocess.run([sys.executable, "-m", "peftcli"], env=env, capture_output=True, text=True, cwd=ROOT)
    assert "plain,--budget" in proc.stdout
