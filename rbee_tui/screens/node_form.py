"""Add or edit a node from the keyboard (B01, B02, B71).

Inline validation on every field; "Test & save" runs the SSH check with each attempt shown
live; an unknown host key shows its fingerprint and waits for the operator to trust it; the
node is returned (and saved by the app) only when the check succeeded.
"""

from __future__ import annotations

from pathlib import Path

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.validation import Function, Integer, Regex, ValidationResult, Validator
from textual.widgets import Button, Input, Label, Log

from rbee_agent.protocol import ErrorCode, RbeeError
from rbee_tui.config import DEFAULT_INSTALL_PATH, NODE_NAME_RE, Config, Node
from rbee_tui.events import Attempt, Finished, HostKeyUnknown, PhaseStarted
from rbee_tui.ops import nodes as node_ops
from rbee_tui.screens.base import RbeeModal


class _FreeName(Validator):
    def __init__(self, config: Config, current: str | None) -> None:
        super().__init__("that name is taken")
        self.config = config
        self.current = current

    def validate(self, value: str) -> ValidationResult:
        taken = value in self.config.names() and value != self.current
        return self.failure(f"'{value}' is already a node") if taken else self.success()


def _key_exists(value: str) -> bool:
    return not value or Path(value).expanduser().is_file()


class NodeFormScreen(RbeeModal[Node | None]):
    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel", id="node_form.cancel",
                        tooltip="Close without saving")]

    def __init__(self, config: Config, node: Node | None) -> None:
        super().__init__()
        self.config = config
        self.editing = node
        self.accept_host_key = False

    def compose(self) -> ComposeResult:
        n = self.editing
        with Vertical(classes="dialog node-form"):
            yield Label("Edit node" if n else "Add a node", classes="question")
            yield Input(n.name if n else "", placeholder="name (e.g. gpu1)", id="name",
                        disabled=n is not None, validators=[
                            Regex(NODE_NAME_RE.pattern, failure_description=(
                                "1-32 lowercase letters, digits, - or _")),
                            _FreeName(self.config, n.name if n else None)])
            yield Input(n.ssh_host or "" if n else "", placeholder="SSH host", id="host",
                        validators=[Function(lambda v: bool(v.strip()), "a host is needed")])
            yield Input(str(n.ssh_port) if n else "22", placeholder="port", id="port",
                        type="integer", validators=[Integer(1, 65535)])
            yield Input(n.ssh_user or "" if n else "", placeholder="user (default: yours)",
                        id="user")
            yield Input(n.ssh_key or "" if n else "",
                        placeholder="key file (default: ssh-agent / ~/.ssh keys)", id="key",
                        validators=[Function(_key_exists, "no such key file")])
            yield Input(n.install_path if n else DEFAULT_INSTALL_PATH,
                        placeholder="install path on the node", id="install")
            yield Label("", id="form-error")
            yield Log(id="attempts", max_lines=200)
            with Horizontal(classes="buttons"):
                yield Button("Test & save", variant="primary", id="save")
                yield Button("Trust host key", variant="warning", id="trust")
                yield Button("Cancel", id="cancel")

    TITLES = {"name": "name", "host": "SSH host", "port": "SSH port", "user": "SSH user",
              "key": "key file", "install": "install path"}

    def on_mount(self) -> None:
        for box in self.query(Input):
            box.border_title = self.TITLES.get(box.id or "", "")
        self.query_one("#trust").display = False
        self.query_one("#attempts").display = False

    @on(Input.Changed)
    def _validate_inline(self, event: Input.Changed) -> None:
        result = event.validation_result
        error = "" if result is None or result.is_valid else "; ".join(
            result.failure_descriptions)
        self.query_one("#form-error", Label).update(f"[red]{error}[/red]" if error else "")

    @on(Button.Pressed, "#cancel")
    def _cancel(self) -> None:
        self.dismiss(None)

    @on(Button.Pressed, "#trust")
    def _trust(self) -> None:
        self.accept_host_key = True
        self.query_one("#trust").display = False
        self.test_and_save()

    @on(Button.Pressed, "#save")
    @on(Input.Submitted)
    def _save(self) -> None:
        self.accept_host_key = False
        self.test_and_save()

    def node_from_form(self) -> Node:
        problems = [desc for i in self.query(Input)
                    if (r := i.validate(i.value)) is not None and not r.is_valid
                    for desc in r.failure_descriptions]
        if problems:
            raise RbeeError(ErrorCode.INVALID_REQUEST, "; ".join(problems))
        values = {i.id: i.value.strip() for i in self.query(Input)}
        key = values["key"]
        base = self.editing or Node(name=values["name"])
        return base.model_copy(update={
            "ssh_host": values["host"], "ssh_port": int(values["port"] or 22),
            "ssh_user": values["user"] or None,
            "ssh_key": str(Path(key).expanduser()) if key else None,
            "install_path": values["install"] or DEFAULT_INSTALL_PATH,
        })

    @work(exclusive=True, group="node-form", exit_on_error=False)
    async def test_and_save(self) -> None:
        from rbee_tui import ssh

        log = self.query_one("#attempts", Log)
        error = self.query_one("#form-error", Label)
        try:
            node = self.node_from_form()
        except RbeeError as err:
            error.update(f"[red]{err.message}[/red]")
            return
        log.display = True
        log.clear()
        error.update("")
        try:
            async for event in ssh.check_connection(
                node, self.config.settings, accept_new_host_key=self.accept_host_key
            ):
                if isinstance(event, PhaseStarted):
                    log.write_line(event.message)
                elif isinstance(event, Attempt):
                    outcome = "ok" if event.error is None else event.error.message
                    log.write_line(f"attempt {event.number}/{event.total}: {outcome}")
                elif isinstance(event, HostKeyUnknown):
                    log.write_line(f"unknown host key {event.key_type} {event.fingerprint}")
                    log.write_line("Check it matches the node, then press 'Trust host key'.")
                    self.query_one("#trust").display = True
                elif isinstance(event, Finished):
                    log.write_line(event.message)
                    self.dismiss(node_ops.checked(node, event))
                    return
        except RbeeError as err:
            log.write_line(f"✗ {err.message}")
            if err.hint:
                log.write_line(f"  hint: {err.hint}")
            error.update(f"[red]{err.message}[/red]")
