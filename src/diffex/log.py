"""Console output shared by the CLI and the API: messages, warnings and progress bars."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")

console = Console(stderr=True, highlight=False)


def _quiet() -> bool:
    """Processes other than rank 0 of a multi-process training stay silent."""
    return os.environ.get("RANK", "0") != "0"


def info(message: str) -> None:
    """Print a progress message to stderr."""
    if not _quiet():
        console.print(message, markup=False)


def warn(message: str) -> None:
    """Print a one-line warning to stderr."""
    if not _quiet():
        console.print(f"warning: {message}", style="yellow", markup=False)


def progress_bar() -> Progress:
    """A rich progress bar that writes to stderr (disabled when stderr is not a terminal)."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
        disable=not sys.stderr.isatty() or _quiet(),
        transient=False,
    )


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a progress bar."""
    with progress_bar() as bar:
        task = bar.add_task(description, total=total, status="")
        for item in items:
            yield item
            bar.advance(task)
