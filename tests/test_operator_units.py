"""The operator side's small pieces, without processes: the retry policy and the HTTP retry
transport (B142), hints (B146), the registry merge (B145), GPU words (B149), the CLI's
parser (B150, B151)."""

from __future__ import annotations

import argparse
import re
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from rbee_agent import __version__
from rbee_agent.protocol import ErrorCode, GpuInfo, NodeInfo, RbeeError
from rbee_tui import cli
from rbee_tui.client import AgentClient, localize_hint, version_mismatch
from rbee_tui.config import Config, Node, OperatorSettings, load_config, save_config
from rbee_tui.events import Attempt
from rbee_tui.ops.nodes import describe_gpus
from rbee_tui.retry import RetryPolicy, policy
from tests.support import REPO

HEALTH = {"status": "ok", "version": __version__, "api_version": "1"}


# ------------------------------------------------------------------ B142: one retry policy


def test_b142_policy_says_how_long_to_wait_after_each_try() -> None:
    p = policy(4, 1.0, 2.0)
    assert [p.wait_after(n) for n in (1, 2, 3, 4)] == [1.0, 2.0, 2.0, None]
    assert policy(1).wait_after(1) is None and policy(3).wait_after(1) == 0.0


def test_b142_older_config_keys_become_the_policy() -> None:
    settings = OperatorSettings.model_validate({
        "ssh_attempts": 2, "ssh_backoff_ms": [0, 150, 300],
        "http_backoff_s": [0.0, 0.05, 0.1], "busy_retry_s": [1.0, 2.0]})
    assert settings.ssh_retry == RetryPolicy(attempts=2, backoff_s=(0.15, 0.3))
    assert settings.http_retry == RetryPolicy(attempts=3, backoff_s=(0.05, 0.1))
    assert settings.queue_full_retry == RetryPolicy(attempts=3, backoff_s=(1.0, 2.0))
    settings.ssh_backoff_ms = [0, 10, 10]
    assert settings.ssh_retry.backoff_s == (0.01, 0.01)


def _client(handler: object, attempts: list[Attempt], **settings: object) -> AgentClient:
    values: dict[str, object] = {"http_retry": {"attempts": 3, "backoff_s": [0.01]}}
    values.update(settings)
    return AgentClient("gpu1", "http://agent", "key", OperatorSettings.model_validate(values),
                       transport=httpx.MockTransport(handler),  # type: ignore[arg-type]
                       on_attempt=attempts.append)


async def test_b142_http_connect_failures_are_retried_and_each_try_is_shown() -> None:
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.method)
        if len(calls) < 3:
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200, json=HEALTH)

    attempts: list[Attempt] = []
    async with _client(handler, attempts) as client:
        assert (await client.health()).version == __version__
    assert len(calls) == 3
    assert [(a.number, a.total, a.retry_in_s) for a in attempts] == [(1, 3, 0.01), (2, 3, 0.01)]
    assert attempts[0].error is not None and "gpu1" in attempts[0].error.message


async def test_b142_a_read_timeout_is_retried_for_a_get_only() -> None:
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.method)
        if request.method == "POST" or len(calls) == 1:
            raise httpx.ReadTimeout("slow", request=request)
        return httpx.Response(200, json={"workers": []})

    attempts: list[Attempt] = []
    async with _client(handler, attempts) as client:
        assert await client.workers() == []
        with pytest.raises(RbeeError) as caught:
            await client.request("POST", "/v1/workers", json={})
    assert calls == ["GET", "GET", "POST"], "a POST that may have arrived is never repeated"
    assert caught.value.code == ErrorCode.AGENT_UNREACHABLE
    assert "no answer within" in caught.value.message


# ------------------------------------------------------------------ B146: hints


def test_b146_agent_hints_name_the_node_they_are_about() -> None:
    assert (localize_hint("See the worker log: rbee logs --node NAME --worker w1", "gpu1")
            == "See the worker log: rbee logs --node gpu1 --worker w1")
    assert (localize_hint("its log may say why: rbee logs --worker w1-ab", "gpu1")
            == "its log may say why: rbee logs --node gpu1 --worker w1-ab")
    assert (localize_hint("List the models with 'rbee models list', or …", "n2")
            == "List the models with 'rbee models list --node n2', or …")


def test_b146_version_mismatch_says_which_side_to_upgrade() -> None:
    older = version_mismatch("gpu1", "0.0.1")
    assert older.hint == "Upgrade the node: rbee nodes install gpu1"
    newer = version_mismatch("gpu1", "99.0.0")
    assert newer.hint is not None and newer.hint.startswith(
        "The node runs the newer rbee: upgrade rbee on this machine to 99.0.0")
    assert newer.details["upgrade"] == "operator"


async def test_b140_a_refused_key_says_it_is_another_agent() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, json={"error": {"code": "INVALID_API_KEY",
                                                   "message": "bad key", "details": {}}})

    async with _client(handler, []) as client:
        with pytest.raises(RbeeError) as caught:
            await client.workers()
    assert "does not accept this node's API key" in caught.value.message
    assert "another agent" in caught.value.message


# ------------------------------------------------------------------ B145: the registry


COMMENTED = """\
# my nodes; rbee must keep this comment
[settings]
theme = "rbee-light"  # the light one

[nodes.keep]
# the lab box
ssh_host = "10.0.0.9"
"""


def test_b145_a_save_writes_only_its_own_changes_and_keeps_comments(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(COMMENTED)
    dashboard = load_config(path)  # a long-lived reader, like the dashboard
    cli_run = load_config(path)
    cli_run.nodes["added"] = Node(name="added", ssh_host="10.0.0.2")
    save_config(cli_run, path)
    dashboard.settings.poll_interval_s = 1.0  # the dashboard saves something else
    dashboard.nodes["keep"] = dashboard.nodes["keep"].model_copy(update={"ssh_port": 2222})
    save_config(dashboard, path)
    text = path.read_text()
    again = load_config(path)
    assert set(again.nodes) == {"keep", "added"}, "the dashboard's save dropped a node"
    assert again.nodes["keep"].ssh_port == 2222 and again.settings.poll_interval_s == 1.0
    assert "# my nodes; rbee must keep this comment" in text
    assert "# the lab box" in text and "# the light one" in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    del dashboard.nodes["keep"]
    save_config(dashboard, path)
    assert set(load_config(path).nodes) == {"added"}


def test_b145_a_node_removed_elsewhere_is_not_brought_back(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    first = Config(nodes={"n1": Node(name="n1", ssh_host="h")})
    save_config(first, path)
    stale = load_config(path)
    remover = load_config(path)
    del remover.nodes["n1"]
    save_config(remover, path)
    stale.nodes["n1"] = stale.nodes["n1"].model_copy(update={"last_connected": 5.0})
    save_config(stale, path)
    assert load_config(path).nodes == {}


def test_b145_temp_files_of_interrupted_saves_are_swept(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    save_config(Config(), path)
    for leftover in (".config.toml.abc123", ".config.toml.x7.tmp"):
        (tmp_path / leftover).write_text("api_key = 'secret'")
    save_config(Config(nodes={"n": Node(name="n", ssh_host="h")}), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.toml"]


# ------------------------------------------------------------------ B149: GPU words


def test_b149_check_says_which_gpus_and_whether_llama_cpp_offloads() -> None:
    info = NodeInfo(hostname="h", os="Linux", arch="x86_64", cpu_count=8, cpu_percent=0,
                    ram_total_mb=1, ram_available_mb=1, models_dir="/m", disk_free_mb=1,
                    backends=["cpu", "cuda"], gpus=[GpuInfo(index=0, name="NVIDIA H100",
                                                            vram_total_mb=81559)],
                    gpu_offload=False)
    assert describe_gpus(info) == "GPU 0 NVIDIA H100 (81559 MB); llama.cpp CPU-only"
    info.gpu_offload, info.gpus = None, []
    assert describe_gpus(info) == "no GPU; llama.cpp offload not reported"


def test_b149_cuda_build_command_line() -> None:
    from rbee_tui.install import _Steps, llama_requirement
    from rbee_tui.remote_agent import AgentLayout

    steps = _Steps.__new__(_Steps)
    steps.layout = AgentLayout("/home/u/rbee agent", 9200)
    command = steps.cuda_command("/usr/local/cuda/bin/nvcc")
    assert command.startswith("CMAKE_ARGS='-DGGML_CUDA=on -DGGML_RPC=on' "
                              "CUDACXX=/usr/local/cuda/bin/nvcc "
                              "FORCE_CMAKE=1 '/home/u/rbee agent/venv/bin/python' -m pip")
    for part in ("install -v", "--no-cache-dir", "--force-reinstall", "--no-deps",
                 "--no-binary llama-cpp-python", llama_requirement()):
        assert part in command, part
    assert re.fullmatch(r"llama-cpp-python==\d+\.\d+\.\d+", llama_requirement())


# ------------------------------------------------------------------ B150, B151: the CLI


def _options(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.Action]]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += [(f"{name} {o}", a) for o, a in _options(sub)]
        elif not isinstance(action, argparse._HelpAction):
            found.append((action.dest, action))
    return found


def test_b151_every_option_has_help_and_no_internal_ids() -> None:
    options = _options(cli.build_parser())
    assert len(options) > 60
    for name, action in options:
        assert action.help and action.help != argparse.SUPPRESS, f"{name} has no help"
        assert not re.search(r"\bB\d{2,3}\b", action.help), f"{name}: {action.help}"


def test_b151_help_loads_no_heavy_module() -> None:
    code = ("import sys, contextlib, io\n"
            "from rbee_tui import cli\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    code = cli.main(['--help']) if False else None\n"
            "    try:\n        cli.main(['nodes', '--help'])\n"
            "    except SystemExit:\n        pass\n"
            "print(sorted(m for m in ('pydantic', 'httpx', 'rich', 'textual', 'asyncssh')"
            " if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, check=True).stdout
    assert out.strip() == "[]"


def test_b150_a_mistyped_subcommand_or_node_gets_a_suggestion() -> None:
    with pytest.raises(cli.UsageError) as caught:
        cli.build_parser().parse_args(["nodes", "lst"])
    assert "did you mean 'list'?" in str(caught.value)
    with pytest.raises(RbeeError) as missing:
        Config(nodes={"node1": Node(name="node1", ssh_host="h")}).node("nod1")
    assert "did you mean node1?" in missing.value.message
    parsed = cli.build_parser().parse_args(["models", "rm", "--model", "x"])
    assert parsed.handler == "models_remove"
    assert cli.build_parser().parse_args(["nodes", "rm", "n1"]).handler == "nodes_remove"


async def test_b43_sse_lines_are_read_one_way() -> None:
    from rbee_agent.protocol import iter_sse_data

    async def lines() -> AsyncIterator[str]:
        for line in [": a comment", "data: {\"a\": 1}", "", "event: x", "data: one",
                     "data:two", "", "", "data: [DONE]"]:
            yield line

    assert [d async for d in iter_sse_data(lines())] == ['{"a": 1}', "one\ntwo", "[DONE]"]


def test_b200_agent_install_builds_llama_cpp_with_rpc() -> None:
    """A CPU node that pip builds llama-cpp-python on can lend its CPU to a split."""
    from rbee_tui.install import _Steps
    from rbee_tui.remote_agent import AgentLayout

    steps = _Steps.__new__(_Steps)
    steps.layout = AgentLayout("/home/u/rbee agent", 9200)
    steps.wheel = "/home/u/rbee agent/wheels/rbee-0.1-py3-none-any.whl"
    first = steps.pip_command().split(" && ")[0]
    assert first.startswith('CMAKE_ARGS="-DGGML_RPC=on ${CMAKE_ARGS:-}" ')
    assert "[agent]" in first


async def test_b172_workers_list_prints_vram_and_gpu_layers_as_the_dashboard(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """`rbee workers list` has the dashboard's VRAM MB and GPU LAYERS ("24/30"), and its
    SLOTS FREE is the dashboard's cell; a spawn's summary names the GPU layers."""
    import argparse

    from rbee_tui import cli_commands
    from rbee_tui.cli_output import EventPrinter
    from rbee_tui.ops import workers as worker_ops
    from rbee_tui.widgets.tables import WorkersTable
    from tests.tui_support import NOW, scripted_config, worker

    on_gpu = worker("w2-77c1", "qwen2.5-7b-instruct", "busy", 98765, busy=True, device=1,
                    gpu_layers=24)
    on_cpu = worker("w1-0001", "smollm2-135m", "idle", 12).model_copy(
        update={"backend": "cpu", "vram_mb": None, "gpu_layers": 0})

    async def list_all(links: object, names: list[str], timeout_s: float
                       ) -> list[worker_ops.NodeWorkers]:
        return [worker_ops.NodeWorkers("gpu1", (on_gpu,)),
                worker_ops.NodeWorkers("localhost", (on_cpu,))]

    monkeypatch.setattr(worker_ops, "list_all", list_all)
    args = argparse.Namespace(node=None, json=False)
    assert await cli_commands.cmd_workers_list(args, scripted_config(), None,  # type: ignore[arg-type]
                                               EventPrinter()) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert " ".join(header.split()) == ("NODE ID MODEL BACKEND STATE SLOTS FREE QUEUED TOKENS "
                                        "RSS MB VRAM MB GPU LAYERS URL")
    gpu_row, cpu_row = (row.split() for row in rows)
    dashboard = WorkersTable.cells(on_gpu, None, NOW)
    assert gpu_row[5] == str(dashboard[4]) == "0/1", "SLOTS FREE: available/total in both"
    assert gpu_row[9:11] == ["5200", "24/30"] and [str(c) for c in dashboard[7:10:2]] == [
        "5200", "24/30"]
    assert cpu_row[9:11] == ["-", "-"]
    assert worker_ops.ready_message(on_gpu).endswith(", 24/30 layers on GPU")
    assert "layers" not in worker_ops.ready_message(on_cpu)
