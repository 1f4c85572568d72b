"""B162, B163, B173, B174, B177, B178: forms that behave, and one event log for every flow."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from textual import events
from textual.widgets import Input, Label, ProgressBar, Static

from rbee_agent.protocol import RbeeError
from rbee_tui.config import load_config
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
from rbee_tui.ops.workers import parse_gpu_layers
from rbee_tui.screens.download import DownloadScreen
from rbee_tui.screens.install import InstallScreen
from rbee_tui.screens.node_form import NodeFormScreen
from rbee_tui.screens.spawn import SpawnScreen
from rbee_tui.widgets.event_log import EventLog, describe, describe_error, status_line
from tests.tui_support import Notifications, fill, make_app, until, wait_for_workers

SIZE = (120, 36)
FINGERPRINT = "SHA256:" + "x7Q2mZ9pL0aVv3kR8tYbN1cW4eH6jU5sD2fG7hK9lAVv"


def test_b162_one_description_per_event_kind() -> None:
    error = RbeeError("SSH_UNREACHABLE", "Cannot reach 10.0.0.2:22: connection refused")
    lines = {type(e).__name__: describe(e) for e in [
        PhaseStarted("ssh", "Connecting to gpu2"), PhaseDone("ssh", "connected"),
        Attempt("ssh", 1, 3, error, retry_in_s=0.2), Attempt("ssh", 3, 3, None),
        OutputLine("install", "Successfully installed rbee-0.1.0"),
        HostKeyUnknown("10.0.0.2", 22, "ssh-ed25519", FINGERPRINT), Queued(3),
        Note("download", "attempt 2/6: connection reset, resuming at 41.2 MB in 0.4 s"),
        Finished("Agent 0.1.0 installed on gpu2 and healthy")]}
    plain = {k: v.plain if v is not None else None for k, v in lines.items()}
    assert plain["PhaseStarted"] == "→ Connecting to gpu2"
    assert plain["PhaseDone"] == "  ✓ connected"
    assert plain["Attempt"] == "  attempt 3/3: ok"
    assert plain["OutputLine"] == "    Successfully installed rbee-0.1.0"
    assert FINGERPRINT in (plain["HostKeyUnknown"] or "")
    assert plain["Queued"] == "  queued, 3 ahead"
    assert plain["Note"] == "  · attempt 2/6: connection reset, resuming at 41.2 MB in 0.4 s"
    assert status_line(Note("agent", "the agent of node 'gpu2' does not answer: starting it "
                                     "over SSH")) == ("the agent of node 'gpu2' does not "
                                                      "answer: starting it over SSH")
    assert plain["Finished"] == "✓ Agent 0.1.0 installed on gpu2 and healthy"
    retry = describe(Attempt("ssh", 1, 3, error, retry_in_s=0.2))
    assert retry is not None and retry.plain == (
        "  attempt 1/3: Cannot reach 10.0.0.2:22: connection refused; retrying in 0.2 s")
    assert describe(Token("x", 0)) is None and describe(Progress("d", 1, 2, "MB")) is None
    failed = describe_error(RbeeError("INSTALL_FAILED", "pip failed on gpu2", hint="See the log",
                                      details={"stderr_tail": ["ERROR: no space left"]}))
    assert failed.plain == "✗ pip failed on gpu2\n    ERROR: no space left\n  hint: See the log"


async def test_b173_keys_typed_right_after_opening_land_in_the_first_field() -> None:
    app, _ = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        # As a fast typist or a terminal paste: the keys arrive before the form has mounted.
        driver = app._driver
        assert driver is not None
        for key in ["a", *"anode2"]:
            driver.send_message(events.Key(key, key))
        await until(pilot, lambda: isinstance(app.screen, NodeFormScreen)
                    and app.screen.query_one("#name", Input).value == "anode2")


async def test_b173_node_form_is_labelled_has_the_agent_port_and_fits_80x24() -> None:
    app, _ = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("a", *"gpu2", "tab", *"10.0.0.22")
        form = app.screen
        assert isinstance(form, NodeFormScreen)
        labels = [str(lbl.render()) for lbl in form.query(".field-label")]
        assert labels == ["Name", "SSH host", "SSH port", "SSH user", "Key file",
                          "Install path", "Agent port"]
        form.query_one("#agent-port", Input).value = "9300"
        node = form.node_from_form()
        assert (node.name, node.ssh_host, node.agent_port) == ("gpu2", "10.0.0.22", 9300)
        form.query_one("#agent-port", Input).value = "99999"
        await pilot.pause()
        assert "Agent port" in str(form.query_one("#form-error", Static).render())
        save = form.query_one("#save")
        assert save.region.bottom <= 24 or form.query_one(".dialog").max_scroll_y > 0


async def test_b173_spawn_form_sends_every_setting_and_closes_when_the_worker_is_up() -> None:
    app, source = make_app()
    notes = Notifications(app)
    async with app.run_test(size=SIZE) as pilot:
        await fill(app, source, 1)
        await pilot.press("j", "w")
        form = app.screen
        assert isinstance(form, SpawnScreen)
        await wait_for_workers(pilot, "spawn-models")
        assert form.query_one("#spawn-model", Input).value == "smollm2-135m"
        assert form.query_one("#spawn-backend", Input).value == "cuda"  # the node has it
        form.query_one("#spawn-ctx", Input).value = "4096"
        form.query_one("#spawn-slots", Input).value = "4"
        form.query_one("#spawn-gpu-layers", Input).value = "nope"
        form.query_one("#spawn-gpu-layers", Input).focus()
        await pilot.press("enter")
        assert "gpu-layers: all, auto, or a number" in str(
            form.query_one("#spawn-status", Label).render())
        form.query_one("#spawn-gpu-layers", Input).value = "24"
        await pilot.press("enter")  # Enter from the last field submits
        await wait_for_workers(pilot, "spawn")
        assert app.screen is not form, "the dialog closes once the worker is up"
        await notes.wait_for("worker w3-new is")
    body = source.bodies["/v1/workers"][0]
    assert body == {"model_ref": "smollm2-135m", "backend": "cuda", "device": 0,
                    "ctx_size": 4096, "slots": 4, "gpu_layers": 24, "new": False}
    assert [parse_gpu_layers(v) for v in ("", "all", "auto", "7")] == [None, -1, "auto", 7]


async def test_b174_models_dialog_adds_a_file_on_the_node() -> None:
    app, source = make_app()
    notes = Notifications(app)
    async with app.run_test(size=SIZE) as pilot:
        await fill(app, source, 1)
        await pilot.press("j", "m")
        await wait_for_workers(pilot, "models")
        await pilot.press("n", *"file:///srv/models/mine.gguf", "enter")
        await wait_for_workers(pilot, "download")
        assert not isinstance(app.screen, DownloadScreen)
        await notes.wait_for("mine is already on gpu1")
    assert source.bodies["/v1/models/download"] == [
        {"model_ref": "file:///srv/models/mine.gguf"}]


async def download(pilot: Any, ref: str) -> DownloadScreen:
    """Open the models dialog of gpu1, ask for `ref`, and wait until the download ended."""
    await fill(pilot.app, pilot.app.source, 1)
    await pilot.press("j", "m")
    await wait_for_workers(pilot, "models")
    await pilot.press("n", *ref, "enter")
    await wait_for_workers(pilot, "download")
    dialog = pilot.app.screen
    assert isinstance(dialog, DownloadScreen)
    return dialog


async def test_b177_download_retries_and_resumes_show_in_the_dialog() -> None:
    app, _ = make_app()
    async with app.run_test(size=SIZE) as pilot:
        dialog = await download(pilot, "hf:bees/flaky-GGUF")
        lines = dialog.query_one(EventLog).plain
        assert "  · attempt 2/3: connection reset, resuming at 25.0 MB in 0.4 s" in lines
        assert "  · attempt 3/3: checksum mismatch on tiny.gguf, fetching it again" in lines
        assert lines[-1] == "✗ tiny.gguf failed 3 times"


async def test_b174_b163_a_failed_download_stops_its_bar_and_shows_the_whole_error() -> None:
    app, _ = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        dialog = await download(pilot, "hf:bees/missing-GGUF")
        assert not dialog.query_one(ProgressBar).display, "no bar moves after a failure"
        log = dialog.query_one(EventLog)
        text = "\n".join(log.plain)
        assert "checked at https://huggingface.co/api/models" in text
        assert "private repos need HF_TOKEN on the node." in text
        assert max(strip.cell_length for strip in log.lines) <= log.size.width
        rendered = " ".join(strip.text.strip() for strip in log.lines)
        assert "private repos need HF_TOKEN on the node." in rendered  # wrapped, whole


def scripted_install(monkeypatch: pytest.MonkeyPatch, long_line: str
                     ) -> list[dict[str, Any]]:
    """The SSH install replaced by its events; returns the arguments of each call."""
    calls: list[dict[str, Any]] = []

    async def install(node: Any, settings: Any, **kwargs: Any) -> AsyncIterator[Event]:
        calls.append(kwargs)
        yield PhaseStarted("install", "Installing the agent into ~/.local/share/rbee-agent")
        yield OutputLine("install", long_line)
        if kwargs.get("backend") == "cuda":
            yield Note("cuda", "llama.cpp on the node already offloads to the GPU: no rebuild")
        yield Finished("Agent 0.1.0 installed on lab-a100 at ~/.local/share/rbee-agent, "
                       "started (pid 4242, systemd user unit rbee-agent.service) and healthy "
                       "on 127.0.0.1:9200", {"agent_version": "0.1.0", "api_key": "k"})

    monkeypatch.setattr("rbee_tui.ssh.install_agent", install)
    return calls


async def test_b163_install_log_and_summary_wrap_and_the_dialog_turns_into_the_result(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    long_line = ("Collecting llama-cpp-python==0.3.36 (from rbee==0.1.0) Using cached "
                 "llama_cpp_python-0.3.36-cp311-cp311-linux_x86_64.whl (4.2 MB) from the "
                 "wheel cache under ~/.cache/rbee/wheels")
    calls = scripted_install(monkeypatch, long_line)
    app, source = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await fill(app, source, 1)
        await pilot.press("G", "i")
        dialog = app.screen
        assert isinstance(dialog, InstallScreen)
        assert dialog.focused is dialog.query_one("#install-cpu"), "no GPU seen: cpu first"
        await pilot.press("enter")
        await wait_for_workers(pilot, "install")
        log = dialog.query_one(EventLog)
        rendered = " ".join(strip.text.strip() for strip in log.lines)
        assert "from the wheel cache under ~/.cache/rbee/wheels" in rendered
        assert max(strip.cell_length for strip in log.lines) <= log.size.width
        summary = str(dialog.query_one("#install-status", Static).render())
        assert "healthy on 127.0.0.1:9200" in summary
        assert dialog.focused is dialog.query_one("#install-close")
        await pilot.press("enter")
        assert app.screen is app.dashboard
    assert [c["backend"] for c in calls] == ["cpu"]
    assert app.config.nodes["lab-a100"].agent_version == "0.1.0"
    saved = load_config()  # the operation saved the key, as `rbee nodes install` does
    assert saved.nodes["lab-a100"].api_key == "k"


async def test_b178_install_with_cuda_from_the_dashboard(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    """A node with NVIDIA GPUs: the dialog says so, offers cuda first, and the install runs
    the CLI's operation with backend cuda; its notes show in the log."""
    calls = scripted_install(monkeypatch, "Building wheel for llama-cpp-python (CUDA)")
    app, source = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await fill(app, source, 1)
        await pilot.press("j", "i")  # gpu1: two RTX 4090s
        dialog = app.screen
        assert isinstance(dialog, InstallScreen)
        texts = " ".join(str(lbl.render()) for lbl in dialog.query(".hint"))
        assert "gpu1 has 2 NVIDIA GPU(s) (NVIDIA RTX 4090)" in texts
        assert "needs nvcc there" in texts
        assert dialog.focused is dialog.query_one("#install-cuda")
        await pilot.press("enter")
        await wait_for_workers(pilot, "install")
        assert ("  · llama.cpp on the node already offloads to the GPU: no rebuild"
                in dialog.query_one(EventLog).plain)
    assert [c["backend"] for c in calls] == ["cuda"]
    assert calls[0]["api_key"] is None and calls[0]["accept_new_host_key"] is False


async def test_b05_b71_the_node_form_saves_through_the_clis_operation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`e` then a new agent port only: `ops.nodes.edit` saves it without an SSH check (how
    the node is reached did not change), off the UI thread, and the dialog closes."""
    from tests.test_tui_pilot import saves_off_the_ui_thread

    async def no_ssh(*args: Any, **kwargs: Any) -> AsyncIterator[Event]:
        raise AssertionError("the SSH check ran for a change that does not need it")
        yield  # an async generator, as the real check

    monkeypatch.setattr("rbee_tui.ssh.check_connection", no_ssh)
    writes = saves_off_the_ui_thread(monkeypatch, "rbee_tui.ops.nodes.save_config")
    app, source = make_app()
    notes = Notifications(app)
    async with app.run_test(size=SIZE) as pilot:
        await fill(app, source, 1)
        await pilot.press("G", "e")
        form = app.screen
        assert isinstance(form, NodeFormScreen)
        form.query_one("#agent-port", Input).value = "9300"
        await pilot.press("enter")
        await wait_for_workers(pilot, "node-form")
        assert app.screen is app.dashboard
        await notes.wait_for("Node 'lab-a100' saved.")
    assert writes == [False]
    assert load_config().nodes["lab-a100"].agent_port == 9300


async def test_b177_a_dialog_shows_what_the_link_did_on_the_way() -> None:
    """A node whose agent does not answer: the download dialog shows each retried connect
    (the link's steps, not the flow's own events) before the error."""
    from rbee_tui.app import RbeeApp
    from rbee_tui.links import NodeLinks
    from rbee_tui.node_source import LiveNodeSource
    from tests.tui_support import silent_node_config

    config = silent_node_config()
    links = NodeLinks(config)
    app = RbeeApp(config, LiveNodeSource(config, links), links, poll=False, save_theme=False)
    async with app.run_test(size=SIZE) as pilot:
        dialog = DownloadScreen(app.fleet, "lan")
        await app.push_screen(dialog)
        await pilot.press(*"hf:bees/tiny-GGUF", "enter")
        await wait_for_workers(pilot, "download")
        lines = dialog.query_one(EventLog).plain
        assert any(line.startswith("  attempt 1/2: ") and "retrying in 0 s" in line
                   for line in lines), lines
        assert lines[-1].startswith("✗ ")
