"""Error types of fiberbench.

Every error a user can cause by what they pass in is one of these two, raised
before any model is loaded where possible, with a message that names the
offending value and what would be accepted instead.
"""
from __future__ import annotations

import difflib
from typing import Iterable


class FiberbenchError(Exception):
    """Base class of all fiberbench errors."""


class InputError(FiberbenchError, ValueError):
    """An image, tensor or file handed to fiberbench cannot be used as given."""


class ConfigError(FiberbenchError, ValueError):
    """A spec string, hyper-parameter or configuration value is not valid."""


def close_matches(name: str, choices: Iterable[str], n: int = 5) -> list[str]:
    """Up to ``n`` entries of ``choices`` that look like ``name`` (for 'did you mean')."""
    choices = list(choices)
    hits = difflib.get_close_matches(name, choices, n=n, cutoff=0.4)
    if not hits:
        low = name.lower()
        hits = [c for c in choices if low in c.lower() or c.lower() in low][:n]
    return hits
