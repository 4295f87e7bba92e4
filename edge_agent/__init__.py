"""The edge agent."""
