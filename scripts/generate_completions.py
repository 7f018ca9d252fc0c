"""Regenerate completions/ from the click group: python scripts/generate_completions.py"""

from __future__ import annotations

import os

from peftcli.cli.completion_cmd import SHELLS, completion_source

FILES = {"bash": "peftcli.bash", "zsh": "_peftcli", "fish": "peftcli.fish"}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    for shell in SHELLS:
        path = os.path.join(ROOT, "completions", FILES[shell])
        with open(path, "w", encoding="utf-8") as f:
            f.write(completion_source(shell))
        print(path)


if __name__ == "__main__":
    main()
