"""Process-level guards for a worker: die with the parent, drain on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import sys
import threading
import time

log = logging.getLogger("rbee.worker")

_PR_SET_PDEATHSIG = 1


def die_with_parent(expected_parent: int) -> None:
    """Exit when the process that started us dies, so a hard-killed agent leaves no orphans.

    On Linux the kernel delivers SIGKILL the moment the parent goes (PR_SET_PDEATHSIG); we
    then re-check the parent pid, since it may already have died before the call. Elsewhere a
    watcher thread polls the parent pid.
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0:
                if os.getppid() != expected_parent:
                    os._exit(1)
                return
        except (OSError, AttributeError):
            pass

    def watch() -> None:
        while os.getppid() == expected_parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def drain_on_signals(on_signal: object) -> None:
    """Route SIGTERM and SIGINT to the worker's graceful shutdown (B46)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)  # type: ignore[arg-type]
