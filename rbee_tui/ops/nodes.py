"""Node operations (B01-B09, B140-B149): the registry, the agent's life, live status.

Both faces call these: `rbee nodes …` and the dashboard's node form, install screen and
agent key. Each flow yields events and ends with one `Finished` carrying its whole result
(a nested flow's own `Finished` becomes a `PhaseDone`, so a summary is said once). Registry
writes go through `save_config`, which merges by node (B145).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal

from rbee_agent import __version__
from rbee_agent.protocol import ErrorCode, NodeInfo, RbeeError
from rbee_tui import local_agent
from rbee_tui.config import Config, Node, save_config
from rbee_tui.defaults import LOCALHOST
from rbee_tui.events import Event, Finished, Note, PhaseDone, PhaseStarted
from rbee_tui.links import NodeLinks

# ------------------------------------------------------------------ registry stamps


def checked(node: Node, facts: Finished) -> Node:
    """B01: a node that answered the SSH check, stamped with what it said and when."""
    version = facts.data.get("agent_version")
    return node.model_copy(update={
        "status": "agent installed" if version else "reachable",
        "agent_version": version or node.agent_version,
        "last_connected": time.time(),
    })


def installed(node: Node, done: Finished) -> Node:
    """B06: after an install, the node's key (for the registry only; never printed)."""
    return node.model_copy(update={
        "api_key": done.data.get("api_key", node.api_key), "status": "agent up",
        "agent_version": done.data.get("agent_version"), "last_connected": time.time(),
    })


def answered(node: Node, version: str, when: float | None = None) -> Node:
    return node.model_copy(update={"status": "agent up", "agent_version": version,
                                   "last_connected": when or time.time()})


def touch(config: Config, name: str, version: str) -> None:
    """B143: a request the agent served updates the node's last contact."""
    if name in config.nodes and not config.nodes[name].is_local:
        config.nodes[name] = answered(config.nodes[name], version)
        save_config(config)


async def _inner(flow: AsyncIterator[Event]) -> AsyncIterator[Event]:
    """A nested flow's events, its Finished said as a step (the outer flow finishes)."""
    async for event in flow:
        yield PhaseDone(getattr(event, "phase", "done"), event.message) \
            if isinstance(event, Finished) else event


async def _ssh_check(node: Node, config: Config, accept: bool) -> AsyncIterator[Event | Node]:
    from rbee_tui import ssh

    async for event in ssh.check_connection(node, config.settings, accept_new_host_key=accept):
        if isinstance(event, Finished):
            yield checked(node, event)
        else:
            yield event


# ------------------------------------------------------------------ add, edit, remove


def refuse_existing(config: Config, name: str) -> None:
    if name == LOCALHOST or name in config.nodes:
        raise RbeeError(
            ErrorCode.NODE_EXISTS,
            f"A node named '{name}' is already in the registry",
            hint=f"Change it with 'rbee nodes edit {name} …' or remove it with "
            f"'rbee nodes remove {name}'.",
        )


async def add(config: Config, node: Node, *, accept_new_host_key: bool = False
              ) -> AsyncIterator[Event]:
    """B01-B03: test SSH, and only a node that answered is saved."""
    refuse_existing(config, node.name)
    async for event in _checked_and_saved(config, node, True, accept_new_host_key, "saved to"):
        yield event


REACH_FIELDS = ("ssh_host", "ssh_port", "ssh_user", "ssh_key")


async def edit(config: Config, updated: Node, *, accept_new_host_key: bool = False
               ) -> AsyncIterator[Event]:
    """B05: a change to how the node is reached is tested before it is saved."""
    before = config.node(updated.name)
    check = any(getattr(updated, f) != getattr(before, f) for f in REACH_FIELDS)
    async for event in _checked_and_saved(config, updated, check, accept_new_host_key,
                                          "updated in"):
        yield event


async def _checked_and_saved(config: Config, node: Node, check: bool, accept: bool,
                             verb: str) -> AsyncIterator[Event]:
    if check:
        async for item in _ssh_check(node, config, accept):
            if isinstance(item, Node):
                node = item
            else:
                yield item
    config.nodes[node.name] = node
    path = await asyncio.to_thread(save_config, config)
    yield Finished(f"node '{node.name}' {verb} {path}", {"node": node.name})


def remove(config: Config, name: str) -> str:
    node = config.node(name)
    if node.is_local:
        raise RbeeError(ErrorCode.INVALID_REQUEST, "localhost is always a node; it cannot be "
                        "removed", hint="Stop its agent with: rbee nodes stop localhost")
    config.nodes.pop(name, None)
    save_config(config)
    return (f"node '{name}' removed (its agent keeps running; stop it first with "
            f"'rbee nodes stop {name}' if you want)")


# ------------------------------------------------------------------ the agent's life


def _not_local(node: Node, what: str) -> None:
    if node.is_local:
        raise RbeeError(ErrorCode.INVALID_REQUEST,
                        f"localhost runs the agent from this installation; {what}",
                        hint="Start it with: rbee nodes start localhost")


async def install(config: Config, node: Node, *, accept_new_host_key: bool = False,
                  backend: str = "cpu") -> AsyncIterator[Event]:
    """B06, B149: install or upgrade the agent over SSH and keep its key in the registry."""
    from rbee_tui import ssh

    _not_local(node, "nothing to install")
    async for event in ssh.install_agent(node, config.settings, api_key=node.api_key,
                                         accept_new_host_key=accept_new_host_key,
                                         backend=backend):
        if isinstance(event, Finished):
            config.nodes[node.name] = installed(node, event)
            await asyncio.to_thread(save_config, config)
        yield event


async def start_agent(config: Config, node: Node) -> AsyncIterator[Event]:
    """B07, B09, B140: start the node's agent (no-op when it runs) and prove it answers
    as itself before saying it started."""
    if node.is_local:
        yield PhaseStarted("start", "Starting this config's local agent")
        agent = await local_agent.find_or_start_async(config.settings)
        if agent.note:
            yield Note("start", agent.note)
        state = "started" if agent.started_here else "already running"
        yield Finished(f"local agent {state} at {agent.url} (pid {agent.pid})",
                       {"url": agent.url, "pid": agent.pid, "started": agent.started_here,
                        "agent_instance_id": agent.instance_id})
        return
    from rbee_tui import ssh

    async for event in _stamped(config, node, ssh.start_agent(node, config.settings)):
        yield event


async def _stamped(config: Config, node: Node, flow: AsyncIterator[Event]
                   ) -> AsyncIterator[Event]:
    """A remote agent flow whose Finished proved the agent answers: saved as last contact."""
    async for event in flow:
        if isinstance(event, Finished):
            config.nodes[node.name] = answered(node, event.data["agent_version"])
            await asyncio.to_thread(save_config, config)
        yield event


async def stop_agent(config: Config, node: Node) -> AsyncIterator[Event]:
    """B07, B09: stop the node's agent; on localhost only one rbee started."""
    if node.is_local:
        yield PhaseStarted("stop", "Stopping the local agent rbee started")
        pid = await asyncio.to_thread(local_agent.stop_recorded)
        yield Finished(f"local agent (pid {pid}) stopped", {"stopped": True, "pid": pid})
        return
    from rbee_tui import ssh

    async for event in ssh.stop_agent(node, config.settings):
        if isinstance(event, Finished) and node.name in config.nodes:
            config.nodes[node.name] = node.model_copy(update={"status": "agent stopped"})
            await asyncio.to_thread(save_config, config)
        yield event


async def restart_agent(config: Config, node: Node) -> AsyncIterator[Event]:
    if node.is_local:
        if local_agent.recorded_pid() is not None:
            async for event in _inner(stop_agent(config, node)):
                yield event
        async for event in start_agent(config, node):
            yield event
        return
    from rbee_tui import ssh

    async for event in _stamped(config, node, ssh.restart_agent(node, config.settings)):
        yield event


# ------------------------------------------------------------------ check and status


def describe_gpus(info: NodeInfo) -> str:
    """B149: which GPUs the node has and whether its llama.cpp can use them."""
    gpus = "; ".join(f"GPU {g.index} {g.name}" + (f" ({g.vram_total_mb} MB)"
                                                   if g.vram_total_mb else "")
                     for g in info.gpus) or "no GPU"
    offload = {True: "can offload to a GPU", False: "CPU-only",
               None: "offload not reported"}[info.gpu_offload]
    return f"{gpus}; llama.cpp {offload}"


async def check(config: Config, links: NodeLinks, node: Node, *,
                accept_new_host_key: bool = False) -> AsyncIterator[Event]:
    """B04, B149: SSH (for an SSH node), then the agent: it answers as itself, its
    version, memory, backends, GPUs and GPU offload; one summary at the end."""
    if node.transport == "ssh":
        async for item in _ssh_check(node, config, accept_new_host_key):
            if isinstance(item, Node):
                node = item
            else:
                yield item
    yield PhaseStarted("agent", f"Asking the agent of {node.name}")
    client = await links.open(node.name, cold_start=False)
    async with client:
        health = await client.check_version()
        info = await client.node_info()
    who = f" (pid {info.agent_pid})" if info.agent_pid else ""
    yield PhaseDone("agent", f"rbee {health.version} answers with this node's key{who}")
    if info.gpus and info.gpu_offload is False:
        yield Note("gpu", f"{node.name} has NVIDIA GPUs but a CPU-only llama.cpp: "
                          f"rbee nodes install {node.name} --backend cuda builds it with CUDA")
    if not node.is_local:
        config.nodes[node.name] = answered(node, health.version)
        await asyncio.to_thread(save_config, config)
    result = {"node": node.name, "agent_version": health.version, "hostname": info.hostname,
              "ram_available_mb": info.ram_available_mb, "backends": info.backends,
              "gpus": [g.model_dump() for g in info.gpus], "gpu_offload": info.gpu_offload,
              "agent_pid": info.agent_pid, "agent_instance_id": info.agent_instance_id}
    yield Finished(f"{node.name}: agent {health.version} on {info.hostname}, "
                   f"{info.ram_available_mb} MB RAM free, backends "
                   f"{', '.join(info.backends)}; {describe_gpus(info)}", result)


@dataclass(frozen=True)
class NodeStatus:
    """One node as its agent answered just now (B141), or why it did not."""

    node: Node
    state: Literal["up", "down"]
    reason: str | None = None
    agent_version: str | None = None
    answered_at: float | None = None  # None: it did not answer now; see node.last_connected
    info: NodeInfo | None = None


async def status(config: Config, links: NodeLinks, node: Node, timeout_s: float
                 ) -> NodeStatus:
    """Ask one agent, authenticated (so "up" means this node's agent), within timeout_s."""
    if node.is_local:
        found = await asyncio.to_thread(local_agent.lookup, config.settings)
        if found.agent is None or found.version is None:
            return NodeStatus(node, "down", reason=found.reason)
        return _answered_status(node, found.version, found.info)
    try:
        async with asyncio.timeout(timeout_s):
            client = await links.peek(node.name)
            async with client:
                health, info = await asyncio.gather(client.health(), client.node_info())
    except RbeeError as err:
        return NodeStatus(node, "down", reason=err.message)
    except TimeoutError:
        return NodeStatus(node, "down", reason=f"no answer within {timeout_s:g} s")
    return _answered_status(node, health.version, info)


def _answered_status(node: Node, version: str, info: NodeInfo | None) -> NodeStatus:
    reason = None if version == __version__ else f"runs rbee {version}; this rbee is {__version__}"
    return NodeStatus(node, "up", reason, version, time.time(), info)


async def statuses(config: Config, links: NodeLinks) -> list[NodeStatus]:
    """B141: every node asked at once; those that answered get their last contact saved."""
    timeout = config.settings.status_timeout_s
    found = await asyncio.gather(*(status(config, links, node, timeout)
                                   for node in config.all_nodes()))
    changed = False
    for one in found:
        if one.node.is_local or one.node.name not in config.nodes:
            continue
        if one.answered_at is not None and one.agent_version is not None:
            config.nodes[one.node.name] = answered(one.node, one.agent_version, one.answered_at)
            changed = True
        elif one.node.status != "agent down":
            config.nodes[one.node.name] = one.node.model_copy(update={"status": "agent down"})
            changed = True
    if changed:
        await asyncio.to_thread(save_config, config)
    return found
