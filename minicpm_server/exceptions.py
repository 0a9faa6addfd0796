"""Exceptions and helpers shared by every layer, importable without torch."""

from __future__ import annotations


class StartupError(Exception):
    """A problem that stops the server from starting; its message is one line for the user."""


def one_line(exc: BaseException, limit: int = 300) -> str:
    """`Type: first line of the message`, for logs and answers that must stay one line."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first}"[:limit] if first else type(exc).__name__


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of the message alone (the type name when there is no message)."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


class PortInUseError(StartupError):
    """The address to listen on is taken; api.py exits 1 (other start-up errors exit 2)."""
