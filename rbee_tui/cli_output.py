"""How the CLI shows flow events: phases and bars on stderr (Rich), tokens on stdout.

Scripts read stdout (tokens, or one JSON object with --json); people read stderr.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from rbee_agent.protocol import RbeeError
from rbee_tui.events import (
    Attempt,
    Event,
    Finished,
    HostKeyUnknown,
    OutputLine,
    PhaseDone,
    PhaseStarted,
    Token,
)
from rbee_tui.events import Progress as ProgressEvent

err_console = Console(stderr=True, highlight=False, soft_wrap=True)
# Tables on a pipe are not cut to 80 columns: scripts that do not use --json still get it all.
out_console = Console(highlight=False, soft_wrap=True,
                      width=None if sys.stdout.isatty() else 250)


class EventPrinter:
    """Prints a flow's events as they come. `quiet_tokens` for --json (tokens not echoed)."""

    def __init__(self, quiet_tokens: bool = False) -> None:
        self.quiet_tokens = quiet_tokens
        self.finished: Finished | None = None
        self._bar: Progress | None = None
        self._task: TaskID | None = None
        self._bar_phase: str | None = None
        self._wrote_tokens = False

    def __call__(self, event: Event) -> None:
        if isinstance(event, Token):
            self._end_bar()
            if not self.quiet_tokens:
                sys.stdout.write(event.text)
                sys.stdout.flush()
                self._wrote_tokens = True
        elif isinstance(event, PhaseStarted):
            self._end_bar()
            err_console.print(f"[bold yellow]→[/] {escape(event.message)}")
        elif isinstance(event, PhaseDone):
            self._end_bar()
            if event.message:
                err_console.print(f"  [green]✓[/] {escape(event.message)}")
        elif isinstance(event, Attempt):
            self._attempt(event)
        elif isinstance(event, ProgressEvent):
            self._progress(event)
        elif isinstance(event, OutputLine):
            self._end_bar()
            err_console.print(f"  [dim]{escape(event.line)}[/]")
        elif isinstance(event, HostKeyUnknown):
            err_console.print(f"  [yellow]![/] unknown host key for {event.host}:{event.port}: "
                              f"{escape(event.key_type)} {escape(event.fingerprint)}")
        elif isinstance(event, Finished):
            self._end_bar()
            self.finished = event
            if self._wrote_tokens:
                sys.stdout.write("\n")
                sys.stdout.flush()
            err_console.print(f"[bold green]✓[/] {escape(event.message)}")

    def _attempt(self, event: Attempt) -> None:
        self._end_bar()
        if event.error is None:
            err_console.print(f"  attempt {event.number}/{event.total} …")
            return
        retry = f"; retrying in {event.retry_in_s:g} s" if event.retry_in_s else ""
        err_console.print(f"  [red]✗[/] attempt {event.number}/{event.total}: "
                          f"{escape(event.error.message)}{retry}")

    def _progress(self, event: ProgressEvent) -> None:
        if self._bar is None or self._bar_phase != event.phase:
            self._end_bar()
            self._bar = Progress(TextColumn(f"  {event.phase}"), BarColumn(),
                                 TextColumn("{task.completed:.0f}/{task.total:.0f} " + event.unit),
                                 TimeElapsedColumn(), console=err_console, transient=False)
            self._bar.start()
            self._task = self._bar.add_task(event.phase, total=event.total)
            self._bar_phase = event.phase
        assert self._task is not None
        self._bar.update(self._task, completed=event.done, total=event.total)

    def _end_bar(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
            self._bar_phase = None

    def close(self) -> None:
        self._end_bar()


def print_error(err: RbeeError) -> None:
    err_console.print(f"[bold red]error:[/] {escape(err.message)}")
    if err.hint:
        err_console.print(f"[yellow]hint:[/] {escape(err.hint)}")


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, default=str) + "\n")


def print_table(columns: Sequence[str], rows: Iterable[Sequence[Any]], empty: str) -> None:
    rows = list(rows)
    if not rows:
        err_console.print(empty)
        return
    table = Table(*columns, box=None, header_style="bold", pad_edge=False)
    for row in rows:
        table.add_row(*("-" if v is None else str(v) for v in row))
    out_console.print(table)


def ago(timestamp: float | None) -> str:
    if not timestamp:
        return "never"
    seconds = max(0, time.time() - timestamp)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"
