"""``python -m unbroken``: the command line (layer: edges)."""

from .cli import main

main()
