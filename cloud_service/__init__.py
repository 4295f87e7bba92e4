"""The cloud worker and API."""
