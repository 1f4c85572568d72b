"""The one place where a flow's events become lines on the screen (principle 1, B162).

Chat, install, node form, download and spawn all show their flow through `EventLog` (or,
for a one-line status, through `status_line`), so an attempt, a note (a download resumed, a
cold start, a moved port), a host key or an error reads the same everywhere. Lines wrap at
the widget's width: a host-key fingerprint, an error, a hint or an install summary is never
cut at the dialog's edge.
"""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.widgets import RichLog

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
    Progress,
    Queued,
    Token,
)


def describe(event: Event) -> Text | None:
    """The line(s) an event adds to a log; None for events shown elsewhere (tokens, bars)."""
    match event:
        case PhaseStarted(message=message):
            return Text(f"→ {message}")
        case PhaseDone(phase=phase, message=message):
            return Text(f"  ✓ {message or phase}", style="green")
        case Attempt(number=number, total=total, error=None):
            return Text(f"  attempt {number}/{total}: ok")
        case Attempt(number=number, total=total, error=RbeeError() as error,
                     retry_in_s=wait):
            retry = f"; retrying in {wait:g} s" if wait is not None and number < total else ""
            return Text(f"  attempt {number}/{total}: {error.message}{retry}", style="yellow")
        case OutputLine(line=line):
            return Text(f"    {line}", style="dim")
        case Note(message=message):
            return Text(f"  · {message}", style="cyan")
        case HostKeyUnknown(host=host, port=port, key_type=key_type, fingerprint=fingerprint):
            return Text.assemble(
                (f"The host key of {host}:{port} is new to rbee:\n", "bold yellow"),
                (f"  {key_type} {fingerprint}\n", "bold"),
                "Check that it matches the node's own key (on the node: ssh-keygen -lf "
                "/etc/ssh/ssh_host_ed25519_key.pub), then press 'Trust host key'.")
        case Queued(ahead=ahead):
            return Text(f"  queued, {ahead} ahead", style="cyan")
        case Finished(message=message):
            return Text(f"✓ {message}", style="bold green")
        case Progress() | Token():
            return None
    return None


def status_line(event: Event) -> str | None:
    """A one-line status for an event (the chat's status bar), or None to keep the last."""
    match event:
        case Progress(phase=phase, done=done, total=total, unit=unit, message=message):
            extra = f"  {message}" if message else ""
            return f"{phase}: {done:.0f}/{total:.0f} {unit}{extra}"
        case Queued(ahead=ahead):
            return f"queued, {ahead} ahead"
        case Token():
            return None
    text = describe(event)
    return None if text is None else text.plain.strip().lstrip("→✓· ").strip()


def describe_error(error: RbeeError) -> Text:
    """An error as the CLI prints it: what went wrong, the node's own words, what to do."""
    text = Text(f"✗ {error.message}", style="bold red")
    tail: Any = error.details.get("stderr_tail") or error.details.get("last_lines") or []
    for line in tail if isinstance(tail, list) else []:
        text.append(f"\n    {line}", style="red")
    if error.hint:
        text.append(f"\n  hint: {error.hint}", style="yellow")
    return text


class EventLog(RichLog):
    """A wrapping log of flow events; `plain` keeps the text for search and tests."""

    DEFAULT_CSS = """
    EventLog { height: auto; max-height: 12; min-height: 1; background: $surface; }
    """

    def __init__(self, *, id: str | None = None, classes: str | None = None,
                 max_lines: int | None = 2000) -> None:
        super().__init__(id=id, classes=classes, wrap=True, markup=False, highlight=False,
                         max_lines=max_lines, min_width=20)
        self.plain: list[str] = []

    def show(self, event: Event) -> None:
        text = describe(event)
        if text is not None:
            self.add(text)

    def show_error(self, error: RbeeError) -> None:
        self.add(describe_error(error))

    def add(self, text: Text | str) -> None:
        line = text if isinstance(text, Text) else Text(text)
        self.plain.append(line.plain)
        self.write(line)

    def reset(self) -> None:
        self.plain.clear()
        self.clear()
