"""The split workers this dashboard holds (B211): their SSH tunnels live in this process.

A split's RPC traffic goes through forwards that the operator's process opens
(docs/architecture.md, "Split models"), so whoever started the split must stay up while it
serves. The CLI stays in the foreground; the dashboard is long-lived, so it holds each split
it spawned in a task of its own, not in the spawn dialog: closing the dialog does not end a
split that is loading or serving. The task runs `SplitWorker` (the CLI's operation) from start
to end: start, watch, and on every way out (the worker stopped with `x`, a peer lost, the
dashboard left) `close`, which stops the split worker and the RPC servers on every node.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from rbee_agent.protocol import ErrorCode, RbeeError, WorkerInfo
from rbee_tui.config import Config
from rbee_tui.events import Event
from rbee_tui.links import NodeLinks
from rbee_tui.ops.split import SplitSpec, SplitWorker

Listener = Callable[[Event | WorkerInfo | RbeeError], None]
Ended = Callable[[SplitWorker, RbeeError | None], None]


class HeldSplit:
    """One split and the task that holds it. `listener` (the spawn dialog, while it is open)
    is told its start's events, the ready worker, or the error that ended the start."""

    def __init__(self, split: SplitWorker, listener: Listener | None) -> None:
        self.split = split
        self.listener = listener
        self.task: asyncio.Task[None] | None = None

    def tell(self, item: Event | WorkerInfo | RbeeError) -> bool:
        """Whether someone was listening."""
        if self.listener is None:
            return False
        self.listener(item)
        return True


class HeldSplits:
    def __init__(self, config: Config, links: Callable[[], NodeLinks], ended: Ended) -> None:
        self.config = config
        self._links = links
        self._ended = ended  # told when a split ends, with the error when it failed
        self.held: list[HeldSplit] = []

    def start(self, spec: SplitSpec, listener: Listener | None) -> HeldSplit:
        held = HeldSplit(SplitWorker(spec, self.config, self._links()), listener)
        self.held.append(held)
        held.task = asyncio.create_task(self._hold(held), name=f"split {','.join(spec.nodes)}")
        return held

    async def _hold(self, held: HeldSplit) -> None:
        split, failure, ready = held.split, None, False
        try:
            async for item in split.start():
                held.tell(item)
            ready = True
            failure = await split.watch()
        except RbeeError as err:
            failure = await split.explain(err) if ready else err
        except Exception as exc:  # a task's error would otherwise go unseen
            failure = RbeeError(ErrorCode.WORKER_START_FAILED if not ready
                                else ErrorCode.WORKER_CRASHED,
                                f"The split over {', '.join(split.spec.nodes)} failed: {exc}",
                                hint="Check the nodes (rbee nodes check NODE), then spawn the "
                                     "split again.")
        finally:
            await asyncio.shield(split.close())
            self.held.remove(held)
        if ready or failure is None or not held.tell(failure):
            self._ended(split, failure)

    def of_worker(self, node: str, worker_id: str) -> HeldSplit | None:
        return next((h for h in self.held if h.split.spec.head == node and h.split.worker
                     and h.split.worker.id == worker_id), None)

    async def aclose(self) -> None:
        """Leaving the dashboard ends every split it holds, on every node."""
        tasks = [h.task for h in self.held if h.task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
