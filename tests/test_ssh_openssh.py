"""The SSH layer against a real OpenSSH sshd on loopback (B01, B02, B10).

sshd runs with a temporary config (its own host key, authorized_keys, no PAM). Tests skip,
saying why, where sshd is not installed or cannot run; .ci/run installs openssh-server.
"""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import asyncssh
import httpx
import pytest

from rbee_agent.protocol import ErrorCode, RbeeError
from rbee_tui.events import Attempt, Event, Finished, HostKeyUnknown
from rbee_tui.ssh import AgentForward, check_connection, connect
from tests.ssh_support import OpenSshd, SshEnv, TinyHttp, fast_settings

pytest_plugins = ["tests.ssh_fixtures"]  # ssh_env, asyncssh_server, sshd, tiny_http…


async def run_flow(flow: AsyncIterator[Event]) -> tuple[list[Event], RbeeError | None]:
    events: list[Event] = []
    try:
        async for event in flow:
            events.append(event)
    except RbeeError as err:
        return events, err
    return events, None


def sshd_fingerprint(server: OpenSshd) -> str:
    out = subprocess.run(["ssh-keygen", "-lf", str(server.home / "ssh_host_ed25519_key.pub")],
                         capture_output=True, text=True, check=True)
    return out.stdout.split()[1]


async def test_b01_openssh_host_key_is_asked_then_remembered(ssh_env: SshEnv,
                                                             sshd: OpenSshd) -> None:
    node = ssh_env.node(sshd.port)
    events, err = await run_flow(check_connection(node, fast_settings()))
    assert err is not None and err.code == ErrorCode.SSH_HOST_KEY_UNKNOWN
    assert [e for e in events if isinstance(e, HostKeyUnknown)] == [
        HostKeyUnknown("127.0.0.1", sshd.port, "ssh-ed25519", sshd_fingerprint(sshd))]

    events, err = await run_flow(check_connection(node, fast_settings(),
                                                  accept_new_host_key=True))
    assert err is None, err
    done = events[-1]
    assert isinstance(done, Finished)
    assert done.data["python_ok"] is True and done.data["agent_installed"] is False
    assert done.data["home"] == str(Path.home())
    blob = sshd.host_key_pub.split()[1]
    assert ssh_env.known_hosts.read_text() == f"[127.0.0.1]:{sshd.port} ssh-ed25519 {blob}\n"

    events, err = await run_flow(check_connection(node, fast_settings()))
    assert err is None and isinstance(events[-1], Finished)


async def test_b02_openssh_refuses_an_unknown_key_with_the_fix(ssh_env: SshEnv,
                                                               sshd: OpenSshd) -> None:
    await run_flow(check_connection(ssh_env.node(sshd.port), fast_settings(),
                                    accept_new_host_key=True))
    node = ssh_env.node(sshd.port, ssh_key=str(ssh_env.other_key))
    events, err = await run_flow(check_connection(node, fast_settings()))
    assert err is not None and err.code == ErrorCode.SSH_AUTH_FAILED
    assert len([e for e in events if isinstance(e, Attempt)]) == 1
    assert err.hint and "authorized_keys" in err.hint and "ssh-copy-id" in err.hint


async def test_b01_openssh_changed_host_key_is_refused(ssh_env: SshEnv, sshd: OpenSshd) -> None:
    impostor = asyncssh.generate_private_key("ssh-ed25519")
    line = impostor.export_public_key("openssh").decode().split()[:2]
    ssh_env.known_hosts.parent.mkdir(parents=True, exist_ok=True)
    ssh_env.known_hosts.write_text(f"[127.0.0.1]:{sshd.port} {' '.join(line)}\n")
    events, err = await run_flow(check_connection(ssh_env.node(sshd.port), fast_settings(),
                                                  accept_new_host_key=True))
    assert err is not None and err.code == ErrorCode.SSH_HOST_KEY_CHANGED
    assert err.details["fingerprint"] == sshd_fingerprint(sshd)
    assert not any(isinstance(e, HostKeyUnknown | Finished) for e in events)


async def test_openssh_run_sftp_and_forward(ssh_env: SshEnv, sshd: OpenSshd,
                                            tiny_http: TinyHttp) -> None:
    node = ssh_env.node(sshd.port, agent_port=tiny_http.port)
    local = ssh_env.tmp / "blob"
    local.write_bytes(b"x" * 70_000)
    async with connect(node, fast_settings(), accept_new_host_key=True) as conn:
        with pytest.raises(RbeeError) as caught:
            await conn.run("echo 'no such thing' >&2; exit 7")
        await conn.upload(local, str(ssh_env.tmp / "uploaded"))
        await conn.write_file(str(ssh_env.tmp / "private"), b"secret")
        port = await conn.forward("127.0.0.1", tiny_http.port)
        async with httpx.AsyncClient() as http:
            assert (await http.get(f"http://127.0.0.1:{port}/")).json()["version"] == "tiny"
    assert caught.value.code == ErrorCode.SSH_COMMAND_FAILED
    assert caught.value.details["stderr_tail"] == ["no such thing"]
    assert caught.value.details["exit_status"] == 7
    assert (ssh_env.tmp / "uploaded").read_bytes() == local.read_bytes()
    assert (ssh_env.tmp / "private").stat().st_mode & 0o777 == 0o600

    forward = AgentForward(node, fast_settings())
    try:
        async with httpx.AsyncClient() as http:
            reply = await http.get(await forward.url() + "/v1/health")
        assert reply.json()["version"] == "tiny"
    finally:
        await forward.aclose()
