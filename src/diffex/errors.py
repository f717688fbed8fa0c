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


def brief(exc: BaseException, limit: int = 200) -> str:
    """An exception as one short line for an error message. Messages that carry a serialized
    traceback (TorchScript's) are reduced to their last line, the actual error."""
    text = str(exc)
    if "Traceback" in text:
        lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
        text = lines[-1] if lines else ""
    return (" ".join(text.split()) or type(exc).__name__)[:limit]
