"""The "any node" chat (B197): the gateway's routing picks the node, rbee's own inference
flow (`run_inference`) does the rest, so the dashboard shows the same steps, queue and
progress as for a chosen node.

The order of nodes is `Fleet.plan`'s, the one the gateway uses; the chat's requests count
as the gateway's in flight, so a burst of chats and gateway requests spreads over the
nodes. A node that cannot be reached before the first token is marked down and the next
one is tried (as the gateway does, B188); once tokens arrived, an error is the chat's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass

from rbee_agent.protocol import ErrorCode, RbeeError
from rbee_gateway.routing import Fleet
from rbee_tui.config import Config
from rbee_tui.events import Event, Note, Token
from rbee_tui.orchestrator import ClientOpener, InferenceSpec, run_inference

ANY_NODE = "any node"  # not a valid node name (no spaces), so it never shadows one
# Errors that say the node, not the request, is the problem: another node may answer.
NODE_FAILURES = (ErrorCode.AGENT_UNREACHABLE, ErrorCode.SSH_UNREACHABLE)


@dataclass(frozen=True)
class RoutedTo:
    """The node the routing chose for this attempt (the first event of each)."""

    node: str
    model: str  # the model's name there


async def routed_inference(fleet: Fleet, spec: InferenceSpec, config: Config,
                           open_client: ClientOpener) -> AsyncIterator[Event | RoutedTo]:
    model, order = await fleet.plan(spec.model_ref)
    for position, node in enumerate(order):
        yield RoutedTo(node, model)
        spoke = False
        try:
            with fleet.in_flight(node, model):
                attempt = dataclasses.replace(spec, node=node, model_ref=model)
                async for event in run_inference(attempt, config, open_client):
                    spoke = spoke or isinstance(event, Token)
                    yield event
            return
        except RbeeError as err:
            if err.code not in NODE_FAILURES:
                raise
            fleet.mark_down(node, err.message)
            if spoke or position == len(order) - 1:
                raise
            yield Note("route", f"{node} did not answer ({err.message}): trying "
                                f"{order[position + 1]}")
