"""Rotary: self-hosted, editor-integrated code completion."""

__version__ = "0.1.0"
