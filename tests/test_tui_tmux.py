"""The real `rbee` in a real terminal (tmux): the dashboard shows localhost live, and a
chat answer from the bundled model appears."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import psutil
import pytest

from tests.cli_support import RbeeEnv
from tests.support import REPO

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None,
                                reason="tmux is not installed (.ci/run installs it)")


@pytest.fixture
def tmux(rbee: RbeeEnv) -> Iterator[Callable[..., str]]:
    session = f"rbee-test-{time.monotonic_ns()}"
    # The short sleep lets the resize below land before the app reads its terminal size.
    command = (f"sleep 0.5; cd {shlex.quote(str(REPO))} && "
               f"RBEE_CONFIG={shlex.quote(str(rbee.config))} "
               f"TERM=xterm-256color {shlex.quote(sys.executable)} -m rbee_tui")
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "120", "-y", "36",
                    command], check=True)
    # A detached session may still take the server's default size (80x24): insist.
    subprocess.run(["tmux", "set-option", "-t", session, "window-size", "manual"], check=False)
    subprocess.run(["tmux", "resize-window", "-t", session, "-x", "120", "-y", "36"],
                   check=False)

    def screen(*keys: str) -> str:
        if keys:
            subprocess.run(["tmux", "send-keys", "-t", session, *keys], check=True)
        return subprocess.run(["tmux", "capture-pane", "-t", session, "-p"], check=True,
                              capture_output=True, text=True).stdout

    yield screen
    subprocess.run(["tmux", "kill-session", "-t", session], check=False)
    # The dashboard may be killed while the agent it started is still starting: the agent
    # must be findable (its pid recorded at once) so that stopping this config's agent
    # leaves none behind.
    rbee.stop_local_agent()
    left = [p.pid for p in psutil.process_iter(["cmdline"])
            if str(rbee.home) in " ".join(p.info["cmdline"] or []) and "rbee_agent" in
            " ".join(p.info["cmdline"] or [])]
    assert not left, f"agents left running for this config: {left}"


def wait_screen(screen: Callable[..., str], needle: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = screen()
        if needle in text:
            return text
        time.sleep(0.2)
    raise AssertionError(f"{needle!r} never appeared; the screen was:\n{text}")


def test_b70_b72_real_rbee_in_tmux_shows_localhost_and_chats(tmux: Callable[..., str]) -> None:
    text = wait_screen(tmux, "● up")
    assert "localhost" in text and "1/1 nodes up" in text
    tmux("c")
    wait_screen(tmux, "Message smollm2-135m on localhost")
    tmux("What is the capital of France?", "Enter")
    text = wait_screen(tmux, "tokens/s", timeout=120)
    assert "What is the capital of France?" in text
    tmux("Escape")
    if "Stop/back" in tmux():  # the reply was still streaming: that Esc stopped it
        tmux("Escape")
    wait_screen(tmux, "Workers on localhost")
    text = wait_screen(tmux, "smollm2-135m", timeout=10)  # the next 2 s poll shows it
    assert "w1-" in text  # the worker's row (its id), however wide the terminal came up


def test_b173_keys_typed_fast_after_a_land_in_the_new_nodes_name(tmux: Callable[..., str]
                                                                ) -> None:
    wait_screen(tmux, "localhost")
    tmux("a" + "anode2")  # one write: the terminal delivers all seven keys at once
    text = wait_screen(tmux, "Add a node")
    text = wait_screen(tmux, "anode2")
    name_line = next(line for line in text.splitlines() if "Name" in line)
    assert "anode2" in name_line
