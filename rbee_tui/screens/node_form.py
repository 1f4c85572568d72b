"""Add or edit a node from the keyboard (B01, B02, B71, B173).

Every field labelled, validated as you type; Enter in any field runs "Test & save": the SSH
check with each attempt shown live in the event log. An unknown host key shows its whole
fingerprint (wrapped, never cut) and waits for the operator to trust it. Checking and saving
are the CLI's `ops.nodes.add`/`edit` (an edit that changes how the node is reached is
checked; one that does not is saved as it is); the dialog closes with the saved node.
"""

from __future__ import annotations

from pathlib import Path

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.validation import Function, Integer, Regex, ValidationResult, Validator
from textual.widgets import Button, Input, Label, Static

from rbee_agent.protocol import ErrorCode, RbeeError
from rbee_tui.config import DEFAULT_INSTALL_PATH, NODE_NAME_RE, Config, Node
from rbee_tui.events import Finished, HostKeyUnknown
from rbee_tui.ops import nodes as node_ops
from rbee_tui.screens.base import RbeeModal, form_row
from rbee_tui.widgets.event_log import EventLog


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


LABELS = {"name": "Name", "host": "SSH host", "port": "SSH port", "user": "SSH user",
          "key": "Key file", "install": "Install path", "agent-port": "Agent port"}


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
        with VerticalScroll(classes="dialog form node-form"):
            yield Label("Edit node" if n else "Add a node", classes="question")
            yield form_row(LABELS["name"], Input(
                n.name if n else "", placeholder="e.g. gpu1", id="name",
                disabled=n is not None, validators=[
                    Regex(NODE_NAME_RE.pattern,
                          failure_description="1-32 lowercase letters, digits, - or _"),
                    _FreeName(self.config, n.name if n else None)]))
            yield form_row(LABELS["host"], Input(
                n.ssh_host or "" if n else "", placeholder="hostname or IP", id="host",
                validators=[Function(lambda v: bool(v.strip()), "a host is needed")]))
            yield form_row(LABELS["port"], Input(
                str(n.ssh_port) if n else "22", id="port", type="integer",
                validators=[Integer(1, 65535)]))
            yield form_row(LABELS["user"], Input(
                n.ssh_user or "" if n else "", placeholder="default: yours", id="user"))
            yield form_row(LABELS["key"], Input(
                n.ssh_key or "" if n else "", placeholder="default: ssh-agent / ~/.ssh keys",
                id="key", validators=[Function(_key_exists, "no such key file")]))
            yield form_row(LABELS["install"], Input(
                n.install_path if n else DEFAULT_INSTALL_PATH, id="install"))
            yield form_row(LABELS["agent-port"], Input(
                str(n.agent_port) if n else "9200", id="agent-port", type="integer",
                validators=[Integer(1, 65535)]))
            yield Static("", id="form-error")
            yield EventLog(id="attempts", max_lines=200)
            with Horizontal(classes="buttons"):
                yield Button("Test & save (enter)", variant="primary", id="save")
                yield Button("Trust host key", variant="warning", id="trust")
                yield Button("Cancel", id="cancel")

    def on_mount(self) -> None:
        self.query_one("#trust").display = False
        self.query_one("#attempts").display = False
        first = "#host" if self.editing else "#name"
        self.query_one(first, Input).focus()

    @on(Input.Changed)
    def _validate_inline(self, event: Input.Changed) -> None:
        result = event.validation_result
        error = "" if result is None or result.is_valid else (
            f"{LABELS.get(event.input.id or '', '')}: " + "; ".join(result.failure_descriptions))
        self.query_one("#form-error", Static).update(f"[red]{error}[/red]" if error else "")

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
        problems = [f"{LABELS.get(i.id or '', '')}: {desc}" for i in self.query(Input)
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
            "agent_port": int(values["agent-port"] or 9200),
        })

    @work(exclusive=True, group="node-form", exit_on_error=False)
    async def test_and_save(self) -> None:
        log = self.query_one("#attempts", EventLog)
        error = self.query_one("#form-error", Static)
        try:
            node = self.node_from_form()
        except RbeeError as err:
            error.update(f"[red]{err.message}[/red]")
            return
        log.display = True
        log.reset()
        error.update("")
        # The CLI's operations (`rbee nodes add/edit`): the SSH check, then the registry.
        flow = node_ops.edit if self.editing else node_ops.add
        try:
            async for event in flow(self.config, node,
                                    accept_new_host_key=self.accept_host_key):
                log.show(event)
                if isinstance(event, HostKeyUnknown):
                    self.query_one("#trust").display = True
                    self.query_one("#trust", Button).focus()
                elif isinstance(event, Finished):
                    self.dismiss(self.config.nodes[node.name])
                    return
        except RbeeError as err:
            log.show_error(err)
            error.update(f"[red]{err.message}[/red]")
