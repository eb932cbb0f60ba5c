"""The package version, in one place (written into every saved model)."""

__version__ = "0.1.0"
