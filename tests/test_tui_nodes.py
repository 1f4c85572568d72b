"""B71, B163, B173: node setup from the keyboard against a real SSH server (asyncssh, on
loopback): inline validation, live attempts, the host-key fingerprint shown whole (wrapped)
and confirmed, save on success."""

from __future__ import annotations

import getpass

from textual.widgets import Input, Static

from rbee_tui.config import load_config
from rbee_tui.screens.node_form import NodeFormScreen
from rbee_tui.widgets.event_log import EventLog
from tests.ssh_support import AsyncSshServer, SshEnv
from tests.tui_support import make_app, until, wait_for_workers

pytest_plugins = ["tests.ssh_fixtures"]

SIZE = (80, 24)  # the fingerprint must be readable in the smallest terminal we support


async def fill_form(pilot, values: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
    for field, value in values.items():
        box = pilot.app.screen.query_one(f"#{field}", Input)
        box.value = value
    await pilot.pause()


async def test_b71_add_node_trusting_its_key_then_saved(ssh_env: SshEnv,
                                                        asyncssh_server: AsyncSshServer) -> None:
    app, _ = make_app()
    app.config.settings.ssh_connect_timeout_s = 2.0
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("a")
        form = app.screen
        assert isinstance(form, NodeFormScreen)
        await fill_form(pilot, {"name": "Bad Name"})
        assert "lowercase" in str(form.query_one("#form-error", Static).render())
        await fill_form(pilot, {"name": "gpu1"})
        assert "already a node" in str(form.query_one("#form-error", Static).render())
        await fill_form(pilot, {"name": "gpu7", "host": "127.0.0.1",
                                "port": str(asyncssh_server.port), "user": getpass.getuser(),
                                "key": str(ssh_env.key)})
        await pilot.press("enter")  # Enter in any field runs Test & save
        await wait_for_workers(pilot, "node-form")
        assert form.query_one("#trust").display
        events = form.query_one("#attempts", EventLog)
        log = "\n".join(events.plain)
        assert asyncssh_server.fingerprint in log and "attempt 1/3" in log
        # Shown whole: the rendered lines (wrapped at the dialog's width) hold every
        # character of the fingerprint, none cut at the edge.
        rendered = "".join(strip.text for strip in events.lines)
        assert asyncssh_server.fingerprint in rendered.replace(" ", "")
        assert max(strip.cell_length for strip in events.lines) <= events.size.width
        assert app.screen is form, "nothing is saved before the key is trusted"
        assert form.focused is form.query_one("#trust"), "the next step has the focus"
        await pilot.press("enter")
        await wait_for_workers(pilot, "node-form")
        await until(pilot, lambda: app.screen is not form)
    saved = load_config().nodes["gpu7"]
    assert saved.ssh_port == asyncssh_server.port and saved.status == "reachable"
    assert saved.last_connected is not None


async def test_b71_unreachable_node_is_not_saved(ssh_env: SshEnv, closed_port: int) -> None:
    app, _ = make_app()
    app.config.settings.ssh_connect_timeout_s = 1.0
    app.config.settings.ssh_backoff_ms = [0, 10, 10]
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("a")
        form = app.screen
        await fill_form(pilot, {"name": "gone", "host": "127.0.0.1", "port": str(closed_port)})
        await pilot.press("enter")
        await wait_for_workers(pilot, "node-form")
        log = "\n".join(form.query_one("#attempts", EventLog).plain)
        assert "✗" in log
        assert "attempt 3/3" in log and f"127.0.0.1:{closed_port}" in log
        assert app.screen is form
        await pilot.press("escape")
    assert "gone" not in load_config().nodes
