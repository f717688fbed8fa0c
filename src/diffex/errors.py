"""User-facing errors: one clear line, exit code 2, never a traceback."""

from __future__ import annotations


class DiffexError(Exception):
    """An error caused by the user's input or environment.

    The CLI prints ``error: <message>`` on one line and exits with code 2.
    The message must name the offending file, folder, key or value.
    """

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))
