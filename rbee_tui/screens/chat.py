"""The chat pane (B72): pick node and model, type, tokens stream in as Markdown.

oterm's pattern: one `Markdown.get_stream` per reply, `stop()` in `finally`, then a final
`update(full_text)` where streaming may have rendered it wrong (`_needs_full_render`) or the
stream did not get all of it; the full text is kept in our own history;
the conversation scrolls only while it is anchored at the bottom. Esc cancels the running
flow, which cancels the request on the worker. The flow itself is the orchestrator's.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import Footer, Header, Input, Label, Markdown, ProgressBar, Select
from textual.worker import Worker

from rbee_agent.protocol import ChatMessage, RbeeError
from rbee_tui.events import Attempt, Finished, PhaseDone, PhaseStarted, Progress, Token
from rbee_tui.orchestrator import InferenceSpec, run_inference
from rbee_tui.screens.base import RbeeScreen

if TYPE_CHECKING:
    from rbee_tui.app import RbeeApp

DEFAULT_MODEL = "smollm2-135m"


def _needs_full_render(text: str) -> bool:
    """Whether a streamed reply must be rendered again from its whole text.

    Textual's incremental `Markdown.append` renders what a full parse does, except around
    HTML blocks (a block before one can be lost) and link or footnote definitions (which
    change text above them). Re-rendering costs a parse and a remount of every block
    (~100-200 ms for a 2,000-token reply), so it is done only when one of those can occur.
    """
    return "<" in text or "]:" in text


class ChatScreen(RbeeScreen[None]):
    BINDINGS = [
        Binding("escape", "stop_or_back", "Stop/back", id="chat.stop",
                tooltip="Stop the reply being generated; when idle, go back"),
        Binding("ctrl+n", "new_chat", "New chat", id="chat.new",
                tooltip="Forget the conversation and start again"),
    ]

    def __init__(self, node: str, model: str | None = None) -> None:
        super().__init__()
        self.node = node
        self.model = model or DEFAULT_MODEL
        self.history: list[ChatMessage] = []
        self.generating: Worker[None] | None = None

    @property
    def rbee(self) -> RbeeApp:
        return self.app  # type: ignore[return-value]

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="chat-pickers"):
            yield Select([(n, n) for n in self.rbee.config.names()], value=self.node,
                         allow_blank=False, id="chat-node")
            yield Select([(self.model, self.model)], value=self.model, allow_blank=False,
                         id="chat-model")
        yield VerticalScroll(id="conversation")
        with Horizontal(id="chat-status-bar"):
            yield Label("", id="chat-status")
            yield ProgressBar(id="chat-progress", show_eta=False)
        yield Input(placeholder=f"Message {self.model} on {self.node}…  (enter sends)",
                    id="chat-input")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = f"chat on {self.node}"
        self.query_one("#chat-progress").display = False
        self.query_one("#conversation", VerticalScroll).anchor()
        self.query_one("#chat-input", Input).focus()
        self.load_models()

    # ------------------------------------------------------------------ pickers

    @work(exclusive=True, group="chat-models", exit_on_error=False)
    async def load_models(self) -> None:
        reply = await self.rbee.source.models(self.node)
        options = [(m.id, m.id) for m in reply.models] or [(self.model, self.model)]
        picker = self.query_one("#chat-model", Select)
        picker.set_options(options)
        ids = [m.id for m in reply.models]
        if self.model in ids or not ids:
            picker.value = self.model
        else:
            picker.value = ids[0]

    @on(Select.Changed, "#chat-node")
    def _node_changed(self, event: Select.Changed) -> None:
        if isinstance(event.value, str) and event.value != self.node:
            self.node = event.value
            self.sub_title = f"chat on {self.node}"
            self.load_models()

    @on(Select.Changed, "#chat-model")
    def _model_changed(self, event: Select.Changed) -> None:
        if isinstance(event.value, str):
            self.model = event.value
            self.query_one("#chat-input", Input).placeholder = (
                f"Message {self.model} on {self.node}…  (enter sends)")

    # ------------------------------------------------------------------ chatting

    @on(Input.Submitted, "#chat-input")
    async def _send(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        if not text or self.generating is not None:
            return
        event.input.value = ""
        self.history.append(ChatMessage(role="user", content=text))
        conversation = self.query_one("#conversation", VerticalScroll)
        await conversation.mount(Markdown(text, classes="user"))
        reply = Markdown("", classes="assistant")
        await conversation.mount(reply)
        self.generating = self.run_worker(self._generate(reply), group="chat",
                                          exclusive=True, exit_on_error=False)

    async def _generate(self, reply: Markdown) -> None:
        spec = InferenceSpec(node=self.node, model_ref=self.model, backend=None,
                             messages=list(self.history), max_tokens=512, temperature=0.7)
        status = self.query_one("#chat-status", Label)
        progress = self.query_one("#chat-progress", ProgressBar)
        stream = Markdown.get_stream(reply)
        parts: list[str] = []
        first: float | None = None
        try:
            async for event in run_inference(spec, self.rbee.config,
                                             self.rbee.source.open_client):
                if isinstance(event, Token):
                    if first is None:
                        first = time.perf_counter()
                        progress.display = False
                    parts.append(event.text)
                    await stream.write(event.text)
                    elapsed = time.perf_counter() - first
                    rate = (len(parts) - 1) / elapsed if elapsed > 0 else 0.0
                    status.update(f"{len(parts)} tokens · {rate:.1f} tokens/s")
                elif isinstance(event, PhaseStarted):
                    status.update(event.message + "…")
                elif isinstance(event, Progress):
                    progress.display = True
                    progress.update(total=event.total, progress=event.done)
                    status.update(f"{event.phase}: {event.done:.0f}/{event.total:.0f} "
                                  f"{event.unit}")
                elif isinstance(event, Attempt) and event.error is not None:
                    status.update(f"{event.error.message}; retrying in {event.retry_in_s:g} s")
                elif isinstance(event, Finished):
                    status.update(event.message)
                elif isinstance(event, PhaseDone):
                    pass
        except RbeeError as err:
            status.update(f"[red]{err.message}[/red]")
            self.rbee.show_error(err)
        except BaseException:
            status.update(f"stopped after {len(parts)} tokens")
            raise
        finally:
            progress.display = False
            await stream.stop()
            text = "".join(parts)
            if not text or reply.source != text or _needs_full_render(text):
                await reply.update(text or "*(no reply)*")
            if text:
                self.history.append(ChatMessage(role="assistant", content=text))
            self.generating = None

    # ------------------------------------------------------------------ keys

    def action_stop_or_back(self) -> None:
        if self.generating is not None:
            self.generating.cancel()
            return
        self.app.pop_screen()

    async def action_new_chat(self) -> None:
        if self.generating is not None:
            self.generating.cancel()
        self.history.clear()
        await self.query_one("#conversation", VerticalScroll).remove_children()
        self.query_one("#chat-status", Label).update("new chat")
