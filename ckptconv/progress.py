"""Progress bars on stderr (rich), for long conversions and batches.

Writers don't know about them: ``OutFile`` reports bytes to whatever bar is
active (a context variable), so every adapter gets progress for free. A bar
is drawn only when the caller enables it (the CLI: stderr is a terminal and
no ``--no-progress``) and the work is large; rich is imported only then.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

MIN_BYTES = 256 << 20  # smaller jobs finish before a bar is worth drawing

_active: contextvars.ContextVar["_Bar | None"] = contextvars.ContextVar("ckptconv_progress",
                                                                       default=None)


class _Bar:
    """One rich task that writers advance by bytes."""

    def __init__(self, progress, task):
        self.progress, self.task = progress, task

    def advance(self, n: int) -> None:
        self.progress.update(self.task, advance=n)


def advance(n: int) -> None:
    bar = _active.get()
    if bar is not None:
        bar.advance(n)


def _rich_progress(*, files: bool = False):
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress,
                               TaskProgressColumn, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    if files:  # files done of N, and the bytes they held
        middle = (MofNCompleteColumn(), TextColumn("{task.fields[moved]}"))
    else:
        middle = (DownloadColumn(), TransferSpeedColumn())
    return Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), *middle,
                    TimeRemainingColumn(), console=Console(stderr=True), transient=False)


@contextlib.contextmanager
def progress(total: int, enabled: bool, label: str = "converting") -> Iterator[_Bar | None]:
    """A bytes bar for one conversion of ``total`` bytes (None when not drawn)."""
    if not enabled or total < MIN_BYTES or _active.get() is not None:
        yield None
        return
    with _rich_progress() as p:
        bar = _Bar(p, p.add_task(label, total=total))
        token = _active.set(bar)
        try:
            yield bar
        finally:
            _active.reset(token)


class BatchBar:
    """Files done of N, and their bytes, for many sources."""

    def __init__(self, progress, n_files: int):
        self.progress = progress
        self.moved = 0
        self.files = progress.add_task("files", total=n_files, moved="")

    def finished(self, result) -> None:
        from .tensor import human_bytes

        self.moved += result.bytes or 0
        self.progress.update(self.files, advance=1, moved=human_bytes(self.moved),
                             description=f"{result.status}: {_short(result.src)}")


def _short(name: str, width: int = 40) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1):]


@contextlib.contextmanager
def batch_progress(n_files: int, enabled: bool) -> Iterator[BatchBar | None]:
    """A files bar for a batch of ``n_files`` sources (None when not drawn)."""
    if not enabled or n_files < 2:
        yield None
        return
    with _rich_progress(files=True) as p:
        yield BatchBar(p, n_files)
