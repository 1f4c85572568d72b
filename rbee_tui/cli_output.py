"""How the CLI shows flow events: phases and bars on stderr (Rich), tokens on stdout.

Scripts read stdout (tokens, or one JSON object with --json); people read stderr. Rich is
loaded on the first thing said on stderr, and tables are plain text, so a listing does not
pay for it (B151).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Sequence
from functools import cache
from typing import TYPE_CHECKING, Any

from rbee_agent.protocol import RbeeError
from rbee_tui.events import (
    Attempt,
    Event,
    Finished,
    HostKeyUnknown,
    Note,
    OutputLine,
    PhaseDone,
    PhaseStarted,
    Queued,
    Token,
)
from rbee_tui.events import Progress as ProgressEvent

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, TaskID


@cache
def err_console() -> Console:
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def say(markup: str) -> None:
    """One line of Rich markup on stderr."""
    err_console().print(markup)


def escape(text: str) -> str:
    from rich.markup import escape as rich_escape

    return rich_escape(text)


class EventPrinter:
    """The CLI's one renderer of flow events (principle 1): tokens on stdout, everything
    else on stderr. `quiet_tokens` for --json (tokens not echoed). The TUI's event log
    widget is its counterpart."""

    def __init__(self, quiet_tokens: bool = False) -> None:
        self.quiet_tokens = quiet_tokens
        self.finished: Finished | None = None
        self._bar: Progress | None = None
        self._task: TaskID | None = None
        self._bar_phase: str | None = None
        self._line_open = False  # tokens were written and no newline ended them yet
        self._queued: int | None = None

    def __call__(self, event: Event) -> None:
        match event:
            case Token(text=text):
                self._token(text)
            case ProgressEvent():
                self._break_line()
                self._progress(event)
            case OutputLine(phase=phase, line=line) if self._bar_phase == phase:
                assert self._bar is not None
                self._bar.console.print(f"  [dim]{escape(line)}[/]")  # above the bar
            case Finished():
                self._end_line()
                self._end_bar()
                self._say(event)
            case _:
                self._break_line()
                self._end_bar()
                self._say(event)

    def _say(self, event: Event) -> None:
        match event:
            case PhaseStarted(message=message):
                say(f"[bold yellow]→[/] {escape(message)}")
            case PhaseDone(message=message) if message:
                say(f"  [green]✓[/] {escape(message)}")
            case Attempt(error=None, number=number, total=total):
                say(f"  attempt {number}/{total} …")
            case Attempt(error=RbeeError() as error, number=number, total=total,
                         retry_in_s=retry):
                again = f"; retrying in {retry:g} s" if retry is not None else ""
                say(f"  [red]✗[/] attempt {number}/{total}: {escape(error.message)}{again}")
            case Note(message=message):
                say(f"  [cyan]·[/] {escape(message)}")
            case Queued(ahead=ahead) if ahead != self._queued:
                self._queued = ahead
                say(f"  [cyan]·[/] queued, {ahead} ahead")
            case OutputLine(line=line):
                say(f"  [dim]{escape(line)}[/]")
            case HostKeyUnknown(host=host, port=port, key_type=key_type,
                                fingerprint=fingerprint):
                say(f"  [yellow]![/] unknown host key for {host}:{port}: "
                    f"{escape(key_type)} {escape(fingerprint)}")
            case Finished(message=message):
                self.finished = event
                say(f"[bold green]✓[/] {escape(message)}")

    def warn(self, message: str) -> None:
        """A problem that does not stop the command (a node of a listing did not answer)."""
        self._break_line()
        self._end_bar()
        say(f"[yellow]![/] {escape(message)}")

    def _token(self, text: str) -> None:
        self._end_bar()
        if self.quiet_tokens:
            return
        sys.stdout.write(text)
        sys.stdout.flush()
        self._line_open = True

    def _end_line(self) -> None:
        """A whole reply: end its line on stdout."""
        if self._line_open:
            self._line_open = False
            sys.stdout.write("\n")
            sys.stdout.flush()

    def _break_line(self) -> None:
        """Anything else after tokens (an error, "canceled") starts on a line of its own,
        the newline going to stderr so stdout keeps exactly the tokens that arrived (B53,
        B152)."""
        if self._line_open:
            self._line_open = False
            err_console().print()

    def _progress(self, event: ProgressEvent) -> None:
        if self._bar is None or self._bar_phase != event.phase:
            self._end_bar()
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(TextColumn(f"  {event.phase}"), BarColumn(),
                                 TextColumn("{task.completed:.0f}/{task.total:.0f} " + event.unit),
                                 TextColumn("{task.description}"),
                                 TimeElapsedColumn(), console=err_console(), transient=False)
            self._bar.start()
            self._task = self._bar.add_task(event.message, total=event.total)
            self._bar_phase = event.phase
        assert self._task is not None
        self._bar.update(self._task, completed=event.done, total=event.total,
                         description=event.message)

    def _end_bar(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
            self._bar_phase = None

    def close(self) -> None:
        """The flow ended (or broke off): stop a bar, and put what follows on a line of its
        own ("canceled", an error) without adding to stdout."""
        self._end_bar()
        self._break_line()


def print_error(err: RbeeError) -> None:
    say(f"[bold red]error:[/] {escape(err.message)}")
    if err.hint:
        say(f"[yellow]hint:[/] {escape(err.hint)}")


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, default=str) + "\n")


def print_table(columns: Sequence[str], rows: Iterable[Sequence[Any]], empty: str) -> None:
    """Aligned columns on stdout, header in bold on a terminal; never cut to the terminal's
    width (scripts that do not use --json still get every cell)."""
    cells = [["-" if v is None else str(v) for v in row] for row in rows]
    if not cells:
        sys.stderr.write(empty + "\n")
        return
    widths = [max(len(c) for c in column) for column in zip(columns, *cells, strict=False)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.ljust(w) for v, w in zip(values, widths, strict=False)).rstrip()

    bold, plain = ("\033[1m", "\033[0m") if sys.stdout.isatty() else ("", "")
    sys.stdout.write(f"{bold}{line(columns)}{plain}\n")
    sys.stdout.writelines(line(row) + "\n" for row in cells)


def ago(timestamp: float | None) -> str:
    if not timestamp:
        return "never"
    seconds = max(0, time.time() - timestamp)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"
