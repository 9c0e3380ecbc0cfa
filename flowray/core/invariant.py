"""Invariant checks that survive ``python -O``.

A broken invariant is a bug, not an operating error: the caller must not catch
``InvariantError`` to carry on. Plain ``assert`` is stripped by ``-O``, so every check
that guards stored data goes through :func:`require`.
"""

from __future__ import annotations


class InvariantError(RuntimeError):
    """Raised when data or state breaks a rule the code relies on."""


def require(condition: bool, message: str) -> None:
    """Raise :class:`InvariantError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise InvariantError(message)
