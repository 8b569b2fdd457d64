"""Placeholder; the tracking module is being written (issue 4)."""

from __future__ import annotations

__all__ = ["Tracking"]


class Tracking:
    """Impression/click tracking (placeholder)."""
