"""The engine's version: the same as pyproject.toml's (the Comfy Registry reads it there)."""

__version__ = "0.2.0"
