"""One-line descriptions of exceptions, for error messages and logs that must stay on one line."""
from __future__ import annotations


def first_line(exc: BaseException, limit: int = 300) -> str:
    """``TypeName: first line of the message`` (cut to `limit` characters), or ``TypeName`` for an empty message."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:limit]}" if lines else type(exc).__name__


__all__ = ["first_line"]
