"""``python -m particlize``: the command line (the same as the ``particlize`` command)."""

from .cli import main

main()
