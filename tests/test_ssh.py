"""The SSH layer against an in-process asyncssh server on loopback (fast; B01, B02, B10).

The server runs commands for real on this machine, serves SFTP over the real filesystem and
forwards ports, so these tests exercise rbee_tui.ssh end to end without OpenSSH.
"""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from rbee_agent import __version__
from rbee_agent.protocol import ErrorCode, RbeeError
from rbee_tui.events import Attempt, Event, Finished, HostKeyUnknown, PhaseDone, PhaseStarted
from rbee_tui.ssh import AgentForward, check_connection, connect
from tests.ssh_support import AsyncSshServer, SshEnv, TinyHttp, fast_settings

pytest_plugins = ["tests.ssh_fixtures"]  # ssh_env, asyncssh_server, sshd, tiny_http…


async def run_flow(flow: AsyncIterator[Event]) -> tuple[list[Event], RbeeError | None]:
    events: list[Event] = []
    try:
        async for event in flow:
            events.append(event)
    except RbeeError as err:
        return events, err
    return events, None


def attempts(events: list[Event]) -> list[Attempt]:
    return [e for e in events if isinstance(e, Attempt)]


async def trust(env: SshEnv, server: AsyncSshServer) -> None:
    """Accept the server's host key once, as the operator would on first contact."""
    _, err = await run_flow(check_connection(env.node(server.port), fast_settings(),
                                             accept_new_host_key=True))
    assert err is None


# ------------------------------------------------------------------ B01: key and attempts


async def test_b01_missing_key_is_refused_before_anything_is_sent(ssh_env: SshEnv) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        listener.setblocking(False)
        port = listener.getsockname()[1]
        missing = ssh_env.tmp / "keys" / "nope"
        events, err = await run_flow(check_connection(ssh_env.node(port, ssh_key=str(missing)),
                                                      fast_settings()))
        assert err is not None and err.code == ErrorCode.SSH_KEY_MISSING
        assert str(missing) in err.message
        assert events == []
        with pytest.raises(BlockingIOError):
            listener.accept()  # no connection was ever made


async def test_b01_each_attempt_is_reported_with_backoff(ssh_env: SshEnv,
                                                         closed_port: int) -> None:
    settings = fast_settings(ssh_attempts=3, ssh_backoff_ms=[0, 150, 300])
    started = time.monotonic()
    events, err = await run_flow(check_connection(ssh_env.node(closed_port), settings))
    elapsed = time.monotonic() - started
    tries = attempts(events)
    assert [(a.number, a.total) for a in tries] == [(1, 3), (2, 3), (3, 3)]
    assert all(a.error is not None and a.error.code == ErrorCode.SSH_UNREACHABLE for a in tries)
    assert [a.retry_in_s for a in tries] == [0.15, 0.3, None]
    assert elapsed >= 0.45, "the backoff was not waited"
    assert err is not None and err.code == ErrorCode.SSH_UNREACHABLE
    assert f"127.0.0.1:{closed_port}" in err.message and "refused" in err.message
    assert err.hint and "sshd" in err.hint
    assert not any(isinstance(e, Finished) for e in events)


async def test_b01_a_silent_host_times_out_on_every_attempt(ssh_env: SshEnv,
                                                            silent_port: int) -> None:
    settings = fast_settings(ssh_connect_timeout_s=0.3, ssh_attempts=2, ssh_backoff_ms=[0])
    started = time.monotonic()
    events, err = await run_flow(check_connection(ssh_env.node(silent_port), settings))
    elapsed = time.monotonic() - started
    assert len(attempts(events)) == 2
    assert err is not None and err.code == ErrorCode.SSH_UNREACHABLE
    assert "within 0.3 s" in err.message and f"127.0.0.1:{silent_port}" in err.message
    assert 0.6 <= elapsed < 3


# ------------------------------------------------------------------ B02: auth


async def test_b02_auth_refused_has_the_fix_and_is_not_retried(
        ssh_env: SshEnv, asyncssh_server: AsyncSshServer) -> None:
    await trust(ssh_env, asyncssh_server)
    node = ssh_env.node(asyncssh_server.port, ssh_key=str(ssh_env.other_key))
    events, err = await run_flow(check_connection(node, fast_settings()))
    assert err is not None and err.code == ErrorCode.SSH_AUTH_FAILED
    assert len(attempts(events)) == 1, "a refused login must not be retried"
    assert node.ssh_user is not None and f"'{node.ssh_user}'" in err.message
    assert f"127.0.0.1:{asyncssh_server.port}" in err.message
    assert str(ssh_env.other_key) in err.message
    assert err.hint is not None
    for fix in ("authorized_keys", "ssh-copy-id", "600"):
        assert fix in err.hint


async def test_b02_a_passphrase_key_is_explained_locally(ssh_env: SshEnv) -> None:
    import asyncssh

    key = asyncssh.generate_private_key("ssh-ed25519")
    path = ssh_env.tmp / "keys" / "locked"
    key.write_private_key(str(path), "pkcs8-pem", passphrase="secret")
    events, err = await run_flow(check_connection(ssh_env.node(22, ssh_key=str(path)),
                                                  fast_settings()))
    assert events == []
    assert err is not None and err.code == ErrorCode.SSH_AUTH_FAILED
    assert "passphrase" in err.message and err.hint and "ssh-add" in err.hint


# ------------------------------------------------------------------ B01: host keys


async def test_b01_unknown_host_key_is_asked_about_and_not_retried(
        ssh_env: SshEnv, asyncssh_server: AsyncSshServer) -> None:
    events, err = await run_flow(check_connection(ssh_env.node(asyncssh_server.port),
                                                  fast_settings()))
    assert err is not None and err.code == ErrorCode.SSH_HOST_KEY_UNKNOWN
    assert len(attempts(events)) == 1
    asked = [e for e in events if isinstance(e, HostKeyUnknown)]
    assert asked == [HostKeyUnknown("127.0.0.1", asyncssh_server.port, "ssh-ed25519",
                                    asyncssh_server.fingerprint)]
    assert err.details["fingerprint"] == asyncssh_server.fingerprint
    assert err.details["key_type"] == "ssh-ed25519"
    assert err.details["host"] == "127.0.0.1" and err.details["port"] == asyncssh_server.port
    assert not ssh_env.known_hosts.exists()


async def test_b01_accepted_host_key_goes_to_rbees_own_known_hosts(
        ssh_env: SshEnv, asyncssh_server: AsyncSshServer, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    node = ssh_env.node(asyncssh_server.port)
    events, err = await run_flow(check_connection(node, fast_settings(),
                                                  accept_new_host_key=True))
    assert err is None and isinstance(events[-1], Finished)
    line = ssh_env.known_hosts.read_text().strip()
    assert line.startswith(f"[127.0.0.1]:{asyncssh_server.port} ssh-ed25519 ")
    assert stat.S_IMODE(ssh_env.known_hosts.stat().st_mode) == 0o600
    assert not (home / ".ssh").exists(), "~/.ssh/known_hosts must not be touched"
    # now known: no question, no flag needed
    events, err = await run_flow(check_connection(node, fast_settings()))
    assert err is None and not any(isinstance(e, HostKeyUnknown) for e in events)
    assert ssh_env.known_hosts.read_text().strip() == line


async def test_b01_changed_host_key_is_refused_loudly_even_when_accepting(
        ssh_env: SshEnv, asyncssh_server: AsyncSshServer) -> None:
    await trust(ssh_env, asyncssh_server)
    recorded = ssh_env.known_hosts.read_text()
    old_fingerprint = asyncssh_server.fingerprint
    await asyncssh_server.swap_host_key()
    events, err = await run_flow(check_connection(ssh_env.node(asyncssh_server.port),
                                                  fast_settings(), accept_new_host_key=True))
    assert err is not None and err.code == ErrorCode.SSH_HOST_KEY_CHANGED
    assert "CHANGED" in err.message and asyncssh_server.fingerprint in err.message
    assert err.details["fingerprint"] == asyncssh_server.fingerprint
    assert err.details["recorded"][0]["fingerprint"] == old_fingerprint
    assert err.hint and str(ssh_env.known_hosts) in err.hint
    assert len(attempts(events)) == 1
    assert not any(isinstance(e, HostKeyUnknown) for e in events)
    assert not any(isinstance(e, Finished) for e in events)
    assert ssh_env.known_hosts.read_text() == recorded


# ------------------------------------------------------------------ B01: what the node is


async def test_b01_finished_reports_hostname_python_and_agent(
        ssh_env: SshEnv, asyncssh_server: AsyncSshServer) -> None:
    node = ssh_env.node(asyncssh_server.port)
    events, err = await run_flow(check_connection(node, fast_settings(),
                                                  accept_new_host_key=True))
    assert err is None
    phases = [(type(e).__name__, e.phase) for e in events
              if isinstance(e, PhaseStarted | PhaseDone)]
    assert phases == [("PhaseStarted", "ssh"), ("PhaseDone", "ssh"),
                      ("PhaseStarted", "probe"), ("PhaseDone", "probe")]
    done = events[-1]
    assert isinstance(done, Finished)
    facts = done.data
    assert facts["hostname"] == socket.gethostname()
    assert facts["uname"].startswith(os.uname().sysname)
    assert facts["python"].count(".") == 2 and facts["python_ok"] is True
    assert facts["agent_installed"] is False and facts["agent_version"] is None
    assert facts["attempts"] == 1 and facts["user"] == node.ssh_user
    # an installed agent is found at the install path, with its version
    install = ssh_env.install
    install.mkdir()
    (install / "venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    events, err = await run_flow(check_connection(node, fast_settings()))
    assert err is None and isinstance(events[-1], Finished)
    assert events[-1].data["agent_installed"] is True
    assert events[-1].data["agent_version"] == __version__
    assert f"rbee {__version__}" in events[-1].message


# ------------------------------------------------------------------ the connection object


async def test_command_failure_carries_the_stderr_tail_and_the_command(
        ssh_env: SshEnv, asyncssh_server: AsyncSshServer) -> None:
    await trust(ssh_env, asyncssh_server)
    async with connect(ssh_env.node(asyncssh_server.port), fast_settings()) as conn:
        ok = await conn.run("echo out; echo err >&2")
        assert (ok.exit_status, ok.stdout, ok.stderr) == (0, "out\n", "err\n")
        lenient = await conn.run("exit 4", check=False)
        assert lenient.exit_status == 4 and not lenient.ok
        command = "echo first >&2; echo 'disk is full' >&2; exit 3"
        with pytest.raises(RbeeError) as caught:
            await conn.run(command)
    err = caught.value
    assert err.code == ErrorCode.SSH_COMMAND_FAILED
    assert "disk is full" in err.message and "exit 3" in err.message
    assert err.details["command"] == command and err.details["exit_status"] == 3
    assert err.details["stderr_tail"] == ["first", "disk is full"]


async def test_stream_yields_lines_while_the_command_runs(
        ssh_env: SshEnv, asyncssh_server: AsyncSshServer) -> None:
    await trust(ssh_env, asyncssh_server)
    async with connect(ssh_env.node(asyncssh_server.port), fast_settings()) as conn:
        started = time.monotonic()
        seen: list[tuple[str, float]] = []
        with pytest.raises(RbeeError) as caught:
            async for line in conn.stream("echo one; sleep 0.5; echo two >&2; exit 2"):
                seen.append((line, time.monotonic() - started))
    assert [s[0] for s in seen] == ["one", "two"]
    assert seen[0][1] < 0.4, "the first line came only when the command ended"
    assert caught.value.code == ErrorCode.SSH_COMMAND_FAILED
    assert caught.value.details["stderr_tail"] == ["one", "two"]


async def test_sftp_upload_and_private_files(ssh_env: SshEnv,
                                             asyncssh_server: AsyncSshServer) -> None:
    await trust(ssh_env, asyncssh_server)
    local = ssh_env.tmp / "payload.bin"
    local.write_bytes(os.urandom(300_000))
    remote = ssh_env.tmp / "remote"
    remote.mkdir()
    async with connect(ssh_env.node(asyncssh_server.port), fast_settings()) as conn:
        await conn.upload(local, str(remote / "payload.bin"))
        await conn.write_file(str(remote / "secret.toml"), b"api_key = 'x'\n")
        await conn.write_file(str(remote / "secret.toml"), b"api_key = 'y'\n")
        assert await conn.read_file(str(remote / "secret.toml")) == b"api_key = 'y'\n"
        assert await conn.read_file(str(remote / "absent")) is None
        assert await conn.abs_path("~/x/../y") == str(Path.home() / "y")
        with pytest.raises(RbeeError) as caught:
            await conn.upload(local, str(remote / "no" / "such" / "dir" / "f"))
    assert (remote / "payload.bin").read_bytes() == local.read_bytes()
    assert stat.S_IMODE((remote / "secret.toml").stat().st_mode) == 0o600
    assert sorted(p.name for p in remote.iterdir()) == ["payload.bin", "secret.toml"]
    assert caught.value.code == ErrorCode.SSH_COMMAND_FAILED


# ------------------------------------------------------------------ B10: forwards and tunnels


async def get_json(url: str) -> Any:
    async with httpx.AsyncClient(timeout=5) as http:
        reply = await http.get(url)
        reply.raise_for_status()
        return reply.json()


async def test_b10_forward_reaches_a_port_on_the_node(
        ssh_env: SshEnv, asyncssh_server: AsyncSshServer, tiny_http: TinyHttp) -> None:
    await trust(ssh_env, asyncssh_server)
    async with connect(ssh_env.node(asyncssh_server.port), fast_settings()) as conn:
        port = await conn.forward("127.0.0.1", tiny_http.port)
        assert port != tiny_http.port
        assert (await get_json(f"http://127.0.0.1:{port}/v1/health"))["version"] == "tiny"
    assert tiny_http.hits == 1
    with pytest.raises(httpx.ConnectError):
        await get_json(f"http://127.0.0.1:{port}/v1/health")  # closed with the connection


async def test_b10_forward_reopens_the_ssh_connection_after_it_dropped(
        ssh_env: SshEnv, asyncssh_server: AsyncSshServer, tiny_http: TinyHttp) -> None:
    await trust(ssh_env, asyncssh_server)
    node = ssh_env.node(asyncssh_server.port, agent_port=tiny_http.port)
    forward = AgentForward(node, fast_settings())
    try:
        url = await forward.url()
        assert await forward.url() == url, "a live forward is reused"
        assert (await get_json(url + "/v1/health"))["version"] == "tiny"
        await asyncssh_server.drop_connections()
        await asyncio.sleep(0.05)
        with pytest.raises(httpx.TransportError):
            await get_json(url + "/v1/health")
        fresh = await forward.url()
        assert (await get_json(fresh + "/v1/health"))["version"] == "tiny"
        assert len(asyncssh_server.live) == 1
    finally:
        await forward.aclose()
    assert tiny_http.hits == 2


async def test_b10_reconnect_checks_the_link_before_reopening(
        ssh_env: SshEnv, asyncssh_server: AsyncSshServer, tiny_http: TinyHttp) -> None:
    await trust(ssh_env, asyncssh_server)
    node = ssh_env.node(asyncssh_server.port, agent_port=tiny_http.port)
    forward = AgentForward(node, fast_settings(ssh_connect_timeout_s=0.5))
    try:
        url = await forward.url()
        first = forward.connection
        # the agent is down but SSH is fine: same connection, same URL
        await tiny_http.close()
        assert await forward.reconnect() == url
        assert forward.connection is first
        await tiny_http.start()
        # the link hangs without closing: reconnect() finds out and reopens
        assert first is not None and not first.closed
        frozen = asyncssh_server.freeze_connections()
        fresh = await forward.reconnect()
        assert forward.connection is not first and first.closed
        assert (await get_json(fresh + "/v1/health"))["version"] == "tiny"
    finally:
        await forward.aclose()
    await asyncio.sleep(0.05)
    # (the frozen one never reads the client's goodbye: it stays on the server's side)
    assert [c for c in asyncssh_server.live if c not in frozen] == [], \
        "the forward's connection is closed"


async def test_b10_forward_to_an_unreachable_node_fails_with_the_address(
        ssh_env: SshEnv, closed_port: int) -> None:
    forward = AgentForward(ssh_env.node(closed_port), fast_settings(ssh_attempts=1))
    with pytest.raises(RbeeError) as caught:
        await forward.url()
    assert caught.value.code == ErrorCode.SSH_UNREACHABLE
    assert f"127.0.0.1:{closed_port}" in caught.value.message
