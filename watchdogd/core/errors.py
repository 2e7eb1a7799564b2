"""The exception base: every error watchdogd reports to an operator derives from it."""

from __future__ import annotations


class WatchdogdError(Exception):
    """An error with a message of one clear line for an operator (no traceback needed)."""
