"""The chat pane (B72, B160): pick node and model, type, tokens stream in as Markdown.

Every conversation is saved as it goes (`ChatStore`): opening the chat on a node and model
reopens the last conversation there, ctrl+O lists them all, ctrl+N starts a new one, ctrl+S
edits its system prompt and sampling settings. Esc stops a reply; only an Esc while nothing
streams goes back, so a late Esc never throws away a conversation (it is saved anyway).

Streaming follows oterm (lesson 7): one `Markdown.get_stream` per reply, `stop()` in
`finally`, then a final `update(full_text)` where streaming may have rendered it wrong
(`_needs_full_render`) or did not get all of it; the conversation scrolls only while it is
anchored at the bottom. Until the first token the status line counts the seconds (and says
"queued, N ahead" while the worker's queue holds the request). The flow is the
orchestrator's; the status line is `status_line` of the event log.

"any node" (B197) is a target beside the nodes: the gateway's routing (`router`) picks the
node for each reply, the model list is every reachable node's, and the status line names
the node that answered.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.timer import Timer
from textual.widgets import Footer, Label, Markdown, ProgressBar, Select
from textual.widgets.markdown import MarkdownStream
from textual.worker import Worker

from rbee_agent.protocol import ChatMessage, ErrorCode, RbeeError
from rbee_gateway.any_node import ANY_NODE, RoutedTo, routed_inference
from rbee_gateway.routing import Fleet as RoutingFleet
from rbee_tui.chat_store import ChatStore, Conversation
from rbee_tui.defaults import DEFAULT_MODEL
from rbee_tui.events import Event, Finished, Note, Progress, Queued, Token
from rbee_tui.fleet import Fleet
from rbee_tui.links import reporting_to
from rbee_tui.orchestrator import InferenceSpec, run_inference
from rbee_tui.screens.base import RbeeScreen, notify_error
from rbee_tui.widgets.chat_input import ChatInput
from rbee_tui.widgets.event_log import status_line
from rbee_tui.widgets.top_bar import TopBar


def _needs_full_render(text: str) -> bool:
    """Whether a streamed reply must be rendered again from its whole text.

    Textual's incremental `Markdown.append` renders what a full parse does, except around
    HTML blocks (a block before one can be lost) and link or footnote definitions (which
    change text above them). Re-rendering costs a parse and a remount of every block
    (~100-200 ms for a 2,000-token reply), so it is done only when one of those can occur.
    """
    return "<" in text or "]:" in text


class ChatScreen(RbeeScreen[None]):
    HELP_TITLE = "Chat"
    BINDINGS = [
        Binding("escape", "stop_or_back", "Stop/back", id="chat.stop",
                tooltip="Stop the reply being generated; when nothing streams, go back "
                        "(the conversation is saved)"),
        Binding("ctrl+n", "new_chat", "New", id="chat.new",
                tooltip="Start a new conversation (this one stays saved)"),
        Binding("ctrl+o", "app.chats", "Chats", id="chat.list",
                tooltip="Saved conversations: reopen, rename, delete, export Markdown"),
        Binding("ctrl+s", "settings", "Settings", id="chat.settings",
                tooltip="System prompt, max tokens, temperature, top-p, seed of this chat"),
        Binding("ctrl+y", "copy_reply", "Copy reply", id="chat.copy",
                tooltip="Copy the last reply to the clipboard"),
        Binding("question_mark,f1", "app.help", "Help", show=False, id="chat.help",
                tooltip="Every key of the chat"),
    ]

    def __init__(self, fleet: Fleet, store: ChatStore, node: str, model: str | None = None,
                 conversation_id: int | None = None,
                 router: Callable[[], RoutingFleet] | None = None) -> None:
        super().__init__()
        self.fleet = fleet
        self.router = router
        self.answered_by: str | None = None  # "any node": the node of the last reply
        self.store = store
        self.node = node
        self.model = model or DEFAULT_MODEL
        self.conversation = self._initial(conversation_id)
        self.generating: Worker[None] | None = None
        self._waiting_since: float | None = None
        self._waiting_text = ""
        self._ticker: Timer | None = None
        self._first_token: float | None = None

    def _initial(self, conversation_id: int | None) -> Conversation:
        if conversation_id is not None:
            conversation = self.store.get(conversation_id)
            self.node, self.model = conversation.node, conversation.model
            return conversation
        return self.store.latest(self.node, self.model) or Conversation(0, self.node,
                                                                         self.model)

    def accept_early_key(self, character: str) -> bool:
        """Keys typed right after `c` belong in the message (B173)."""
        if not self.is_mounted:
            self._early += character
        else:
            self.query_one(ChatInput).insert(character)
        return True

    _early = ""

    @property
    def history(self) -> list[ChatMessage]:
        return self.conversation.messages

    def crumbs(self) -> list[str]:
        return [self.node, "chat", self.conversation.title or "new chat"]

    def compose(self) -> ComposeResult:
        yield TopBar()
        with Horizontal(id="chat-pickers"):
            yield Select(self._targets(), value=self.node, allow_blank=False, id="chat-node")
            yield Select([(self.model, self.model)], value=self.model, allow_blank=False,
                         id="chat-model")
        yield VerticalScroll(id="conversation")
        with Horizontal(id="chat-status-bar"):
            yield Label("", id="chat-status")
            yield ProgressBar(id="chat-progress", show_eta=False)
        yield ChatInput(placeholder=self._placeholder(), id="chat-input")
        yield Footer()

    def _targets(self) -> list[tuple[str, str]]:
        targets = [(n, n) for n in self.fleet.names()]
        if self.router is not None or self.node == ANY_NODE:
            targets.append((f"{ANY_NODE} (routed like the gateway)", ANY_NODE))
        return targets

    @property
    def any_node(self) -> bool:
        return self.node == ANY_NODE

    def _routing(self) -> RoutingFleet:
        if self.router is None:
            raise RbeeError(ErrorCode.INVALID_REQUEST, "This chat has no gateway routing",
                            hint="Pick a node in the chat's node list.")
        return self.router()

    def _placeholder(self) -> str:
        return (f"Message {self.model} on {self.node}…  "
                "(enter sends · ctrl+j new line · f1 keys)")

    async def on_mount(self) -> None:
        self.query_one("#chat-progress").display = False
        self.query_one("#conversation", VerticalScroll).anchor()
        box = self.query_one("#chat-input", ChatInput)
        box.focus()
        if self._early:
            box.insert(self._early)
            self._early = ""
        await self._show_conversation()
        self.load_models()

    # ------------------------------------------------------------------ conversations

    async def _show_conversation(self) -> None:
        box = self.query_one("#conversation", VerticalScroll)
        await box.remove_children()
        blocks: list[Markdown] = []
        if self.conversation.system_prompt:
            blocks.append(Markdown(f"**System:** {self.conversation.system_prompt}",
                                   classes="system"))
        for message in self.conversation.messages:
            blocks.append(Markdown(message.content,
                                   classes="user" if message.role == "user" else "assistant"))
        await box.mount_all(blocks)
        count = len(self.conversation.messages)
        self._status(f"{count} messages, saved" if count else
                     "new chat · ctrl+s: system prompt and settings · ctrl+o: saved chats")
        self.show_crumbs()

    async def switch_to(self, conversation: Conversation) -> None:
        self.conversation = conversation
        self.node, self.model = conversation.node, conversation.model
        await self._show_conversation()

    def _status(self, text: str) -> None:
        self.query_one("#chat-status", Label).update(text)

    # ------------------------------------------------------------------ pickers

    @work(exclusive=True, group="chat-models", exit_on_error=False)
    async def load_models(self) -> None:
        if self.any_node:  # every model of every reachable node
            routing = self._routing()
            await routing.refresh_stale()
            ids = [entry.id for entry, _ in routing.models()]
        else:
            reply = await self.fleet.source.models(self.node)
            ids = [m.id for m in reply.models]
        picker = self._picker("#chat-model")
        with picker.prevent(Select.Changed):
            picker.set_options([(i, i) for i in ids] or [(self.model, self.model)])
            if self.model in ids or not ids:
                picker.value = self.model
        if ids and self.model not in ids:
            picker.value = ids[0]  # posts Changed: the chat follows the model

    @on(Select.Changed, "#chat-node")
    async def _node_changed(self, event: Select.Changed) -> None:
        if isinstance(event.value, str) and event.value != self.node:
            if self._busy():
                self._picker("#chat-node").value = self.node
                return
            self.node = event.value
            await self._follow_pickers()
            self.load_models()

    @on(Select.Changed, "#chat-model")
    async def _model_changed(self, event: Select.Changed) -> None:
        if isinstance(event.value, str) and event.value != self.model:
            if self._busy():
                self._picker("#chat-model").value = self.model
                return
            self.model = event.value
            await self._follow_pickers()

    def _picker(self, selector: str) -> Select[str]:
        picker: Select[str] = self.query_one(selector, Select)
        return picker

    async def _follow_pickers(self) -> None:
        """Another node or model: reopen its last conversation, or start one."""
        latest = self.store.latest(self.node, self.model)
        await self.switch_to(latest or Conversation(0, self.node, self.model))
        self.query_one(ChatInput).placeholder = self._placeholder()

    def _busy(self) -> bool:
        if self.generating is None:
            return False
        self.notify("A reply is streaming: Esc stops it first.", severity="warning")
        return True

    # ------------------------------------------------------------------ chatting

    @on(ChatInput.Submitted)
    async def _send(self, event: ChatInput.Submitted) -> None:
        text = event.text.strip()
        if not text or self.generating is not None:
            return
        event.chat_input.clear()
        self.store.add_message(self.conversation, ChatMessage(role="user", content=text))
        self.show_crumbs()
        conversation = self.query_one("#conversation", VerticalScroll)
        await conversation.mount(Markdown(text, classes="user"))
        reply = Markdown("", classes="assistant")
        await conversation.mount(reply)
        self.generating = self.run_worker(self._generate(reply), group="chat",
                                          exclusive=True, exit_on_error=False)

    def spec(self) -> InferenceSpec:
        settings = self.conversation.settings
        messages = list(self.conversation.messages)
        if self.conversation.system_prompt:
            messages.insert(0, ChatMessage(role="system",
                                           content=self.conversation.system_prompt))
        return InferenceSpec(node=self.node, model_ref=self.model, backend=None,
                             messages=messages, max_tokens=settings.max_tokens,
                             temperature=settings.temperature, top_p=settings.top_p,
                             seed=settings.seed)

    def _wait(self, text: str) -> None:
        """Until the first token: the step, and the seconds since Enter (B160)."""
        self._waiting_text = text
        self._tick()

    def _tick(self) -> None:
        if self._waiting_since is None:
            return
        elapsed = time.perf_counter() - self._waiting_since
        self._status(self._named(f"{self._waiting_text} · {elapsed:.1f} s"))

    def _events(self) -> AsyncIterator[Event | RoutedTo]:
        spec, config = self.spec(), self.fleet.config
        if self.any_node:
            return routed_inference(self._routing(), spec, config,
                                    self.fleet.source.open_client)
        return run_inference(spec, config, self.fleet.source.open_client)

    def _named(self, text: str) -> str:
        """The status line, led by the node that answers when the chat is routed."""
        return f"{self.answered_by} · {text}" if self.any_node and self.answered_by else text

    async def _generate(self, reply: Markdown) -> None:
        conversation = self.conversation
        progress = self.query_one("#chat-progress", ProgressBar)  # held: it may unmount
        stream = Markdown.get_stream(reply)
        parts: list[str] = []
        self._first_token = None
        self.answered_by = None
        self._waiting_since = time.perf_counter()
        self._ticker = self.set_interval(0.1, self._tick)
        self._wait("waiting for the first token")
        try:
            with reporting_to(self._show_step):  # a cold start, a retry: this chat's steps
                async for event in self._events():
                    if isinstance(event, Token):
                        await self._show_token(stream, parts, event.text)
                    else:
                        self._show_step(event)
        except RbeeError as err:
            self._status(f"[red]{err.message}[/red]")
            notify_error(self, err)
        except BaseException:
            self._status(f"stopped after {len(parts)} tokens · Esc again goes back")
            raise
        finally:
            progress.display = False
            await self._end_reply(conversation, reply, stream, "".join(parts))

    async def _show_token(self, stream: MarkdownStream, parts: list[str], text: str) -> None:
        if self._first_token is None:
            self._first_token = time.perf_counter()
            self._stop_waiting()
            self.query_one("#chat-progress").display = False
        parts.append(text)
        await stream.write(text)
        elapsed = time.perf_counter() - self._first_token
        rate = (len(parts) - 1) / elapsed if elapsed > 0 else 0.0
        self._status(self._named(f"{len(parts)} tokens · {rate:.1f} tokens/s"))

    def _show_step(self, event: Event | RoutedTo) -> None:
        """Every event but a token: the status line until the first token. A note (a cold
        start, no room for another worker) is also a notification, so the next step does
        not hide it (B177)."""
        match event:
            case RoutedTo(node=node):
                self.answered_by = node
                self._wait(f"routed to {node}")
            case Progress(total=total, done=done):
                progress = self.query_one("#chat-progress", ProgressBar)
                progress.display = True
                progress.update(total=total, progress=done)
                self._wait(status_line(event) or "")
            case Queued():
                self._wait(status_line(event) or "")
            case Finished(message=message):
                self._status(self._named(message))
            case _:
                line = status_line(event)
                if isinstance(event, Note):
                    self.notify(event.message, title=f"Chat on {self.node}")
                if line and self._first_token is None:
                    self._wait(line)

    async def _end_reply(self, conversation: Conversation, reply: Markdown,
                         stream: MarkdownStream, text: str) -> None:
        """Whatever ended the reply: render it whole where needed and save it."""
        self._stop_waiting()
        await stream.stop()
        if not text or reply.source != text or _needs_full_render(text):
            await reply.update(text or "*(no reply)*")
        if text:
            self.store.add_message(conversation, ChatMessage(role="assistant", content=text))
        self.generating = None

    def _stop_waiting(self) -> None:
        self._waiting_since = None
        if self._ticker is not None:
            self._ticker.stop()
            self._ticker = None

    # ------------------------------------------------------------------ keys

    def action_stop_or_back(self) -> None:
        if self.generating is not None:
            self.generating.cancel()
            return
        self.app.pop_screen()

    async def action_new_chat(self) -> None:
        if self._busy():
            return
        await self.switch_to(Conversation(0, self.node, self.model))
        self._status("new chat")

    def action_scroll_transcript(self, pages: int) -> None:
        box = self.query_one("#conversation", VerticalScroll)
        if pages < 0:
            box.scroll_page_up(animate=False)
        else:
            box.scroll_page_down(animate=False)

    def last_reply(self) -> str | None:
        replies = [m.content for m in self.conversation.messages if m.role == "assistant"]
        return replies[-1] if replies else None

    def action_copy_reply(self) -> None:
        text = self.last_reply()
        if text is None:
            self.notify("No reply to copy yet.", severity="warning")
            return
        self.app.copy_to_clipboard(text)
        self.notify(f"Copied the last reply ({len(text)} characters) to the clipboard.")

    def action_settings(self) -> None:
        from rbee_tui.screens.chat_settings import ChatSettingsScreen

        async def saved(changed: bool | None) -> None:
            if changed:
                self.store.save_settings(self.conversation)
                await self._show_conversation()
                self._status("settings saved for this chat")

        self.app.push_screen(ChatSettingsScreen(self.conversation), saved)
