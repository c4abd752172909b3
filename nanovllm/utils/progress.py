"""Progress display for long steps (weight generation, loading, compiling): rich, to stderr."""

from __future__ import annotations

import contextlib
import os
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def _enabled() -> bool:
    return os.environ.get("NANOVLLM_PROGRESS", "1") != "0"


@contextlib.contextmanager
def progress_bar(description: str, total: int | None = None):
    """Yields advance(n=1). Disabled by NANOVLLM_PROGRESS=0; plain when stderr is not a terminal."""
    if not _enabled():
        yield lambda n=1: None
        return
    console = Console(file=sys.stderr)
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=not console.is_terminal) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)
