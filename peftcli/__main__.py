"""``python -m peftcli`` is the same as the ``peftcli`` console script."""

from peftcli.cli import main

main()
