"""``python -m particlize.cli``: the command line."""

from . import main

main()
