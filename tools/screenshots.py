"""Regenerate screenshots/*.svg and *.png from a real run (B79, B176): `./dev.sh screenshots`.

Runs the real dashboard against a real local agent with the bundled model, in an isolated
config (nothing of yours is touched), drives it with Textual's Pilot and saves one SVG per
screen: dashboard, chat mid-stream, saved chats, models, logs, help, node form, install
log, and the gateway panel with real requests through the openai SDK. The
install log comes from a real install attempt over SSH when `RBEE_SCREENSHOT_SSH` names a
node (`user@host:port`); otherwise it shows a real failing install against a closed port,
which is what an operator sees when a node is unreachable.

The app runs with the settings a new user has (default theme, poll interval, timeouts); only
the local agent's port is chosen free, so a running agent of yours is never touched.

Textual's SVGs ask a CDN for Fira Code; offline a viewer falls back to whatever it has, and
columns collide. `offline_svg` rewrites each SVG to name monospace fonts that are installed
almost everywhere (DejaVu Sans Mono, Menlo, Consolas…) with no download, and a PNG is drawn
beside each SVG with `rsvg-convert` (its text laid out with real spaces, which librsvg
measures exactly, unlike the no-break spaces Textual writes). `--png FILE.svg…` draws PNGs of
any Textual SVG, a test snapshot for instance, to look at it.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "screenshots"
SIZE = (120, 36)
MONOSPACE = ('"Fira Code", "DejaVu Sans Mono", "Menlo", "Consolas", "Liberation Mono", '
             '"Noto Sans Mono", monospace')


def offline_svg(svg: str) -> str:
    """The same picture, drawn with locally installed monospace fonts: no CDN, no
    proportional fallback."""
    svg = re.sub(r"\s*url\(\"https://[^)]*\)\s*format\(\"[a-z0-9]+\"\)[,;]?", "", svg)
    svg = svg.replace('src: local("FiraCode-Regular"),', 'src: local("FiraCode-Regular");')
    svg = svg.replace('src: local("FiraCode-Bold"),', 'src: local("FiraCode-Bold");')
    return svg.replace("font-family: Fira Code, monospace;", f"font-family: {MONOSPACE};")


def svg_to_png(svg_path: Path, png_path: Path) -> None:
    """Draw a Textual SVG as a PNG with librsvg, which lays text out with the installed
    DejaVu Sans Mono; no-break spaces become plain preserved spaces so columns line up."""
    svg = offline_svg(svg_path.read_text())
    svg = svg.replace('font-family: "Fira Code", ', "font-family: ")
    svg = svg.replace("&#160;", " ").replace("<svg ", '<svg xml:space="preserve" ', 1)
    converter = shutil.which("rsvg-convert")
    if converter is None:
        raise SystemExit("screenshots: rsvg-convert is needed for PNGs "
                         "(Debian/Ubuntu: apt install librsvg2-bin)")
    subprocess.run([converter, "-o", str(png_path)], input=svg.encode(), check=True)


async def lab_node(home: Path) -> object:
    """A second node: this machine over a real OpenSSH sshd on loopback when sshd is
    installed (the install log then shows a real, successful install into a temporary
    path); otherwise a closed port, and the install log shows the real failure."""
    import getpass

    from rbee_tui.config import Node

    install = home / "gpu-lab"
    if os.access("/usr/sbin/sshd", os.X_OK):
        from rbee_tui.ssh import check_connection
        from tests.ssh_support import fast_settings, make_key, start_sshd

        key = make_key(home / "id_ed25519")
        sshd = start_sshd(home / "sshd", [key])
        SSHD.append(sshd)
        node = Node(name="gpu-lab", ssh_host="127.0.0.1", ssh_port=sshd.port,
                    ssh_user=getpass.getuser(), ssh_key=str(key), install_path=str(install),
                    agent_port=free_port())

        async for _ in check_connection(node, fast_settings(), accept_new_host_key=True):
            pass
        return node
    return Node(name="gpu-lab", ssh_host="127.0.0.1", ssh_port=free_port(),
                install_path=str(install))


SSHD: list[object] = []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_for(pilot: object, check: object, limit_s: float = 60.0,
                   required: bool = True) -> None:
    """Let the app run until `check()` holds (each round: the app idle, then a short poll)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        await pilot.pause(0.05)  # type: ignore[attr-defined]
    if required:
        raise SystemExit(f"screenshots: timed out waiting for {check}")


def dump_tasks_on_usr1() -> None:
    """`kill -USR1 PID` prints every asyncio task's stack: what a stuck run waits for."""
    import signal

    loop = asyncio.get_running_loop()

    def dump() -> None:
        for task in asyncio.all_tasks(loop):
            task.print_stack(file=sys.stderr)

    loop.add_signal_handler(signal.SIGUSR1, dump)


async def shoot(home: Path) -> None:
    dump_tasks_on_usr1()
    from textual.widgets import Input, Label

    from rbee_tui.app import RbeeApp
    from rbee_tui.config import load_config, save_config
    from rbee_tui.links import NodeLinks
    from rbee_tui.node_source import LiveNodeSource
    from rbee_tui.screens.install import InstallScreen
    from rbee_tui.widgets.log_view import LogView
    from rbee_tui.widgets.tables import KeyedTable, WorkersTable

    config = load_config()
    config.nodes["gpu-lab"] = await lab_node(home)  # type: ignore[assignment]
    config.settings.gateway_port = free_port()  # 8080 may be someone's
    save_config(config)
    links = NodeLinks(config)
    app = RbeeApp(config, LiveNodeSource(config, links), links, save_theme=False)

    def save(name: str) -> None:
        for box in app.screen.query(Input):
            box.cursor_blink = False
        svg = OUT / f"{name}.svg"
        app.save_screenshot(filename=svg.name, path=str(OUT))
        svg.write_text(offline_svg(svg.read_text()))
        svg_to_png(svg, svg.with_suffix(".png"))
        print(f"screenshots/{name}.svg, .png", flush=True)

    async def settled(*groups: str) -> None:
        """The screen's loading workers done (by group), the latest polls drawn (not at the
        next frame of the dashboard, up to 0.5 s later), then the screen redrawn."""
        app.fleet.flush()
        await pilot.pause()
        waiting = [w for w in app.workers if w.group in groups]
        if waiting:  # (an empty list would mean every worker, the log followers too)
            await app.workers.wait_for_complete(waiting)
        await pilot.pause()

    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.snapshot("localhost").status == "up")
        await pilot.press("a", *"gpu2", "tab", *"10.0.0.22", "tab", "tab", *"ops")
        await settled()
        save("node-form")
        await pilot.press("escape", "G", "i")
        install = app.screen
        assert isinstance(install, InstallScreen)
        await pilot.pause()
        await pilot.press("enter")  # the backend the dialog offers first (cpu here)
        # A real install: pip may build llama-cpp-python on the node (minutes).
        await wait_for(pilot, lambda: install.query_one("#install-status").display,
                       limit_s=1800)
        await settled("install")
        save("install-log")
        await pilot.press("escape", "g", "c")
        chat = app.screen
        await settled("chat-models")
        await pilot.press(*"Write a short poem about honey bees.", "enter")

        def streaming() -> bool:
            status = str(chat.query_one("#chat-status", Label).render())
            return "tokens ·" in status and int(status.split()[0]) >= 40

        await wait_for(pilot, streaming)
        save("chat")
        await wait_for(pilot, lambda: chat.generating is None)  # type: ignore[attr-defined]
        await pilot.press("escape")
        app.poll_now("localhost")
        app.poll_now("gpu-lab")
        await wait_for(pilot, lambda: app.dashboard.query_one(WorkersTable).row_count > 0)
        # The reply counted and the worker idle again (the agent's health check may take a
        # while to report it), and a few polls, so the history graphs have points.
        def served() -> bool:
            workers = app.snapshot("localhost").workers
            return bool(workers) and all(w.state == "idle" and w.tokens_served for w in workers)

        await wait_for(pilot, served, limit_s=90, required=False)
        await wait_for(pilot, lambda: len(app.fleet.stats_of("localhost").ram_used_mb) >= 4)
        await settled()
        save("dashboard")
        await pilot.press("question_mark")
        await settled()
        save("help")
        await pilot.press("escape", "m")
        await settled("models")
        await wait_for(pilot, lambda: app.screen.query_one(KeyedTable).row_count > 0)
        save("models")
        await pilot.press("escape", "l")
        await wait_for(pilot, lambda: len(app.screen.query_one(LogView).lines()) >= 2)
        await settled()
        save("logs")
        await pilot.press("escape", "c")
        await settled("chat-models")
        await pilot.press("ctrl+o")
        await settled()
        save("chats")
        await pilot.press("escape", "escape", "o", "s")
        await settled("gateway-toggle")
        await gateway_traffic(app.gateway.status())
        app.screen.show_status()  # type: ignore[attr-defined]
        await settled()
        save("gateway")
        await pilot.press("s")
        await settled("gateway-toggle")
        await pilot.press("escape")
        from rbee_tui import ssh

        node = app.config.nodes.get("gpu-lab")
        if node is not None and node.api_key:
            async for _ in ssh.stop_agent(node, app.config.settings):
                pass


async def gateway_traffic(status: object) -> None:
    """A few real requests through the dashboard's gateway, as any OpenAI client sends them."""
    import openai

    url, key = status.url, status.key  # type: ignore[attr-defined]
    async with openai.AsyncOpenAI(base_url=url, api_key=key, max_retries=0) as client:
        for _ in range(3):
            await client.chat.completions.create(
                model="smollm2-135m", max_tokens=8,
                messages=[{"role": "user", "content": "Say hello."}])


def main() -> int:
    if sys.argv[1:2] == ["--png"]:
        for name in sys.argv[2:]:
            svg = Path(name)
            svg_to_png(svg, svg.with_suffix(".png"))
            print(svg.with_suffix(".png"))
        return 0
    OUT.mkdir(exist_ok=True)
    home = Path(tempfile.mkdtemp(prefix="rbee-screens-"))
    port = free_port()
    (home / "config.toml").write_text(f"[settings]\nlocal_agent_port = {port}\n")
    os.environ["RBEE_CONFIG"] = str(home / "config.toml")
    try:
        asyncio.run(shoot(home))
    finally:
        from rbee_tui import local_agent

        pid = local_agent.recorded_pid()
        if pid is not None:
            local_agent.stop(pid)
        for sshd in SSHD:
            sshd.stop()  # type: ignore[attr-defined]
        shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
