"""Moved to :mod:`fogline.messaging`; kept so existing imports keep working."""

from fogline.messaging import ConfigValueError, Section, broker_settings, load_toml

__all__ = ["ConfigValueError", "Section", "broker_settings", "load_toml"]
