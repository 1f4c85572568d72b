"""Base screens that route their workers' failures to the app's notifications (B78).

Worker.StateChanged does not bubble past the screen that owns the worker, so every screen
forwards a failed worker's error to `RbeeApp.show_error` itself.
"""

from __future__ import annotations

from typing import TypeVar

from textual import on
from textual.screen import ModalScreen, Screen
from textual.worker import Worker, WorkerState

R = TypeVar("R")


def _report(screen: Screen[object], event: Worker.StateChanged) -> None:
    if event.state == WorkerState.ERROR and event.worker.error is not None:
        show = getattr(screen.app, "show_error", None)
        if show is not None:
            show(event.worker.error)


class RbeeScreen(Screen[R]):
    @on(Worker.StateChanged)
    def _worker_failed(self, event: Worker.StateChanged) -> None:
        _report(self, event)


class RbeeModal(ModalScreen[R]):
    @on(Worker.StateChanged)
    def _worker_failed(self, event: Worker.StateChanged) -> None:
        _report(self, event)
