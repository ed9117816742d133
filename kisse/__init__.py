"""Kisse: a zero-knowledge gateway for end-to-end-encrypted messaging."""

__version__ = "0.1.0"
