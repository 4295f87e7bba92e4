"""``python -m fogline``: the same as the ``fogline`` command."""

from fogline.cli import main

main()
