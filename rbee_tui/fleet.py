"""What the dashboard knows about every node, published to the screens in frames (B70, B166).

The app's poller hands each `NodeSnapshot` to `Fleet.apply`; screens subscribe to
`Fleet.changed` (a Textual `Signal`) instead of reading the app's attributes. Statistics
(`NodeStats`) are updated at once, but publishing is coalesced: the names of the nodes that
changed are collected and published together at most once per `frame_s`, so 32 nodes polled
at 32 different instants cost a few repaints a second instead of 16. What a person must see
at once is never held back: a node going down or coming up, a node without a row yet, and a
worker appearing or disappearing are published at the next frame.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from textual.dom import DOMNode
from textual.signal import Signal
from textual.timer import Timer

from rbee_tui.config import Config
from rbee_tui.node_source import NodeSnapshot, NodeSource
from rbee_tui.node_stats import NodeStats

Clock = Callable[[], float]


@dataclass(frozen=True)
class FleetUpdate:
    """Nodes whose data changed since the last publication; `registry` when nodes were added
    or removed (rows must be rebuilt, not just updated)."""

    names: frozenset[str]
    registry: bool = False


class Fleet:
    def __init__(self, config: Config, source: NodeSource, owner: DOMNode,
                 frame_s: float = 0.5, clock: Clock = time.time) -> None:
        self.config = config
        self.source = source
        self.frame_s = frame_s
        self.clock = clock
        self.snapshots: dict[str, NodeSnapshot] = {}
        self.stats: dict[str, NodeStats] = {}
        # What is being done to a node right now ("starting agent…"), shown in its row
        # until the next poll answers (B170).
        self.activity: dict[str, str] = {}
        self._held: set[str] = set()  # activities that last until cleared, not until a poll
        self.changed: Signal[FleetUpdate] = Signal(owner, "fleet-changed")
        self._owner = owner
        self._pending: set[str] = set()
        self._registry = False
        self._timer: Timer | None = None
        self._urgent = False

    # ------------------------------------------------------------------ reading

    def names(self) -> list[str]:
        return self.config.names()

    def snapshot(self, name: str) -> NodeSnapshot:
        return self.snapshots.get(name) or NodeSnapshot(name=name, status="unknown",
                                                        polled_at=0.0)

    def stats_of(self, name: str) -> NodeStats:
        stats = self.stats.get(name)
        if stats is None:
            stats = self.stats[name] = NodeStats()
        return stats

    def up_count(self) -> int:
        return sum(1 for n in self.names() if self.snapshot(n).status == "up")

    # ------------------------------------------------------------------ writing

    def apply(self, snapshot: NodeSnapshot) -> None:
        name = snapshot.name
        before = self.snapshots.get(name)
        self.snapshots[name] = snapshot
        self.stats_of(name).add(snapshot)
        ended = name not in self._held and self.activity.pop(name, None) is not None
        self._mark(name, urgent=ended or _must_show_now(before, snapshot))

    def set_activity(self, name: str, note: str, *, hold: bool = False) -> None:
        """Say what is being done to a node: until its next poll answers, or with `hold`
        until `clear_activity` (a start or stop flow that outlasts several polls)."""
        self.activity[name] = note
        if hold:
            self._held.add(name)
        self._mark(name, urgent=True)

    def clear_activity(self, name: str) -> None:
        self._held.discard(name)
        if self.activity.pop(name, None) is not None:
            self._mark(name, urgent=True)

    def forget(self, name: str) -> None:
        self.snapshots.pop(name, None)
        self.stats.pop(name, None)
        self.activity.pop(name, None)
        self._held.discard(name)
        self.registry_changed()

    def registry_changed(self) -> None:
        self._registry = True
        self._mark(None, urgent=True)

    def _mark(self, name: str | None, urgent: bool) -> None:
        if name is not None:
            self._pending.add(name)
        if urgent:
            if not self._urgent:
                self._urgent = True
                self._owner.call_later(self.flush)
        elif self._timer is None:
            self._timer = self._owner.set_timer(self.frame_s, self.flush, name="fleet-frame")

    def flush(self) -> None:
        """Publish what changed since the last frame (called by the frame timer)."""
        if self._timer is not None:
            self._timer.stop()
            self._timer = None
        self._urgent = False
        if not self._pending and not self._registry:
            return
        update = FleetUpdate(frozenset(self._pending), self._registry)
        self._pending.clear()
        self._registry = False
        self.changed.publish(update)


def _must_show_now(before: NodeSnapshot | None, after: NodeSnapshot) -> bool:
    """A change a person must see at the next frame rather than within `frame_s`."""
    if before is None or before.status != after.status:
        return True
    return {w.id for w in before.workers} != {w.id for w in after.workers}
