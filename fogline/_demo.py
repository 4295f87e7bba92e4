"""``fogline demo``."""

from __future__ import annotations


def demo() -> None:
    """Run the whole system on one box."""
