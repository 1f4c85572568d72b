"""Model operations on a node's catalog (B35-B37, B150): list, download, remove, and the
check that a model exists before anything is started for it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from rbee_agent.model_refs import CatalogRef, parse_model_ref
from rbee_agent.protocol import CatalogEntry, ErrorBody, ErrorCode, RbeeError
from rbee_tui.client import AgentClient
from rbee_tui.config import did_you_mean
from rbee_tui.events import Event, Finished, Note, PhaseDone, PhaseStarted, Progress

MB = 1024 * 1024


def download_progress(done: int, total: int, speed_mbps: float | None) -> Progress:
    speed = f"{speed_mbps:.1f} MB/s" if speed_mbps else ""
    return Progress("download", round(done / MB, 1), round(total / MB, 1), "MB", speed)


async def require_model(client: AgentClient, model_ref: str) -> CatalogEntry | None:
    """B150: a catalog name the node does not know is an error before anything is spawned,
    with the closest name it does know. `hf:` and `file://` references are provisioned by
    the agent, so they pass (None)."""
    if not isinstance(parse_model_ref(model_ref), CatalogRef):
        return None
    models = (await client.models()).models
    for entry in models:
        if model_ref in (entry.id, entry.reference):
            return entry
    ids = [m.id for m in models]
    close = did_you_mean(model_ref, ids)
    raise RbeeError(
        ErrorCode.MODEL_NOT_FOUND,
        f"Node '{client.node}' has no model '{model_ref}'"
        + (f"; did you mean {close}?" if close else ""),
        hint=f"Models there: {', '.join(ids) or 'none'} (rbee models list --node "
        f"{client.node}); fetch another with rbee models download --node {client.node} "
        "--model hf:org/repo",
        details={"node": client.node, "model_ref": model_ref, "known": ids},
    )


async def download(client: AgentClient, model_ref: str) -> AsyncIterator[Event]:
    """`rbee models download` and the models screen: B37's progress, and its retries and
    resumes as notes (B142)."""
    parse_model_ref(model_ref)
    yield PhaseStarted("download", f"Fetching {model_ref} on {client.node}")
    job = await client.download(model_ref)
    if job.stage == "complete":
        yield Finished(f"{job.model_id} is already on {client.node}", job.model_dump())
        return
    if job.joined:
        yield PhaseDone("download", "joined the download already under way")
    last_note: str | None = None
    try:
        async for event in client.download_progress(job.job_id):
            if event.note and event.note != last_note:
                last_note = event.note
                yield Note("download", event.note)
            if event.stage == "downloading":
                yield download_progress(event.bytes_downloaded, event.bytes_total,
                                        event.speed_mbps)
            elif event.stage == "failed" and event.error is not None:
                raise RbeeError.from_body(ErrorBody(error=event.error))
            elif event.stage == "complete":
                yield Finished(f"{event.model_id} downloaded to {event.local_path}",
                               event.model_dump())
                return
    except asyncio.CancelledError:
        with contextlib.suppress(RbeeError, TimeoutError):
            async with asyncio.timeout(5):
                await asyncio.shield(client.cancel_download(job.job_id))
        raise


async def remove(client: AgentClient, model_id: str) -> str:
    """Delete a model (file and catalog row); the message to show."""
    await require_model(client, model_id)
    await client.delete_model(model_id)
    return f"model {model_id} removed from {client.node}"
