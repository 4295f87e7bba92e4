"""The reference bundle, built by ``fogline model build-reference`` and shipped as data."""

from __future__ import annotations

from pathlib import Path

__all__ = ["BUNDLE_DIR"]

BUNDLE_DIR = Path(__file__).resolve().parent
