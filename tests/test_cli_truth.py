"""B140-B152 end to end on this machine: the real `rbee` command, real local agents, the real
model. What rbee says (up, started, stopped, done) must be what happened."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import psutil

from tests.agent_support import AgentProc
from tests.cli_support import RbeeEnv, make_env
from tests.support import LONG_PROMPT, REPO, default_sigint, free_port


def unpinned(env: RbeeEnv, port: int | None = None) -> None:
    """A config that lets rbee choose its local agent's port (recorded: `port`)."""
    env.config.write_text("[settings]\n")
    if port is not None:
        agent_toml = env.state / "local-agent" / "agent.toml"
        agent_toml.parent.mkdir(parents=True, exist_ok=True)
        agent_toml.write_text(f"port = {port}\n")


def test_b140_another_configs_agent_on_our_port_is_not_taken_for_ours(
        rbee: RbeeEnv, tmp_path: Path) -> None:
    first = rbee.run("nodes", "start", "localhost")
    assert first.returncode == 0, first.stderr
    holder = rbee.agent_pid()
    other = make_env(tmp_path / "other")
    try:
        other.write_config({"local_agent_port": rbee.port})  # pinned to the taken port
        pinned = other.run("infer", "--prompt", "Hi", "--max-tokens", "2")
        assert pinned.returncode == 1
        assert (f"Port {rbee.port} on this machine is held by another rbee agent (pid "
                f"{holder}, user ") in pinned.stderr
        assert "INVALID_API_KEY" not in pinned.stderr and "not valid" not in pinned.stderr

        unpinned(other, port=rbee.port)  # it had chosen that port once; someone took it
        moved = other.run("infer", "--prompt", "Hi", "--max-tokens", "2", "--json")
        assert moved.returncode == 0, moved.stderr
        assert f"port {rbee.port} is held by another rbee agent (pid {holder}" in moved.stderr
        recorded = tomllib.loads((other.state / "local-agent" / "agent.toml").read_text())
        assert recorded["port"] != rbee.port
        assert other.agent_pid() not in (None, holder)
        assert psutil.pid_exists(holder or -1), "the other config's agent is left alone"
    finally:
        other.stop_local_agent()


def test_b140_an_unpinned_config_chooses_and_keeps_its_port(tmp_path: Path) -> None:
    env = make_env(tmp_path / "a")
    unpinned(env)
    try:
        r = env.run("nodes", "start", "localhost", "--json")
        assert r.returncode == 0, r.stderr
        port = tomllib.loads((env.state / "local-agent" / "agent.toml").read_text())["port"]
        assert json.loads(r.stdout)["url"] == f"http://127.0.0.1:{port}"
        again = env.run("nodes", "start", "localhost", "--json")
        assert json.loads(again.stdout)["started"] is False
    finally:
        env.stop_local_agent()


def test_b141_nodes_list_shows_what_each_agent_answers_now(rbee: RbeeEnv, agent: AgentProc
                                                          ) -> None:
    gone = free_port()
    rbee.write_config({"status_timeout_s": 2}, nodes={
        "gone": {"transport": "direct", "agent_host": "127.0.0.1", "agent_port": gone,
                 "api_key": "k", "status": "agent up", "last_connected": 1.0},
        "live": {"transport": "direct", "agent_host": "127.0.0.1", "agent_port": agent.port,
                 "api_key": agent.key, "status": "unknown"}})
    listed = rbee.run("nodes", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    by_name = {n["name"]: n for n in json.loads(listed.stdout)}
    assert by_name["localhost"]["status"] == "down"
    assert "agent not running" in by_name["localhost"]["reason"]
    assert rbee.agent_pid() is None, "a listing starts nothing"
    assert by_name["live"]["status"] == "up" and by_name["live"]["answered_at"] > 0
    assert by_name["gone"]["status"] == "down" and "Cannot reach" in by_name["gone"]["reason"]
    saved = tomllib.loads(rbee.config.read_text())["nodes"]
    assert saved["live"]["status"] == "agent up" and saved["live"]["last_connected"] > 1
    assert saved["gone"]["status"] == "agent down" and saved["gone"]["last_connected"] == 1.0
    table = rbee.run("nodes", "list").stdout
    assert re.search(r"live .* up .* \ds ago", table), table
    assert re.search(r"gone .* down .* last \d+d ago", table), table


def test_b141_workers_list_lists_every_reachable_node_and_reports_the_others(
        rbee: RbeeEnv) -> None:
    gone = free_port()
    rbee.write_config({"status_timeout_s": 2}, nodes={
        "aaa-gone": {"transport": "direct", "agent_host": "127.0.0.1", "agent_port": gone,
                     "api_key": "k"}})
    spawned = rbee.run("workers", "spawn", "--model", "smollm2-135m", "--json")
    assert spawned.returncode == 0, spawned.stderr
    r = rbee.run("workers", "list", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [(w["node"], w["id"]) for w in rows] == [("localhost", json.loads(spawned.stdout)
                                                     ["id"])]
    assert f"aaa-gone: Cannot reach the agent of node 'aaa-gone' at http://127.0.0.1:{gone}" \
        in r.stderr


def test_b144_a_worker_stopped_mid_stream_is_a_failure_with_the_partial_saved(
        rbee: RbeeEnv) -> None:
    agent_toml = rbee.state / "local-agent" / "agent.toml"
    agent_toml.parent.mkdir(parents=True, exist_ok=True)
    agent_toml.write_text("stop_grace_s = 1.0\n")  # the drain ends long before the reply
    warm = rbee.run("infer", "--prompt", "Hi", "--max-tokens", "1", "--json")
    assert warm.returncode == 0, warm.stderr
    worker = json.loads(warm.stdout)["worker_id"]
    proc = rbee.popen("infer", "--raw", "--prompt", LONG_PROMPT, "--max-tokens", "1500",
                      "--temperature", "0")
    assert proc.stdout is not None
    got = proc.stdout.read(30)
    stop = rbee.run("workers", "stop", "--id", worker)
    out, err = proc.communicate(timeout=60)
    assert stop.returncode == 0, stop.stderr
    assert proc.returncode == 1, err
    assert "finish reason 'cancelled'" in err or "broke" in err, err
    match = re.search(r"got (\d+) of 1500 tokens; partial text saved to (\S+)", err)
    assert match, err
    assert Path(match.group(2)).read_text() == got + out


def test_b144_the_readme_example_answers_with_text(rbee: RbeeEnv) -> None:
    # greedy, so the same every run: as a plain completion this model ends at once
    r = rbee.run("infer", "--prompt", "Why is the sky blue?", "--max-tokens", "20",
                 "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip(), "the README's first example says something"
    raw = rbee.run("infer", "--raw", "--prompt", "Why is the sky blue?", "--max-tokens", "20",
                   "--temperature", "0")
    assert raw.returncode == 1 and "The model answered nothing" in raw.stderr
    assert "drop --raw" in raw.stderr


def test_b150_b152_typos_get_suggestions_and_nothing_is_spawned(rbee: RbeeEnv) -> None:
    node = rbee.run("infer", "--node", "localhots", "--prompt", "x")
    assert node.returncode == 1 and "did you mean localhost?" in node.stderr
    model = rbee.run("infer", "--model", "smollm2-135", "--prompt", "x")
    assert model.returncode == 1
    assert "Node 'localhost' has no model 'smollm2-135'; did you mean smollm2-135m?" \
        in model.stderr
    assert "spawning one" not in model.stderr and "Starting a" not in model.stderr
    sub = rbee.run("workers", "lsit")
    assert sub.returncode == 2 and "did you mean 'list'?" in sub.stderr
    gone = rbee.run("models", "remove", "--model", "nope")
    assert gone.returncode == 1 and "has no model 'nope'" in gone.stderr


def test_b152_canceled_is_on_a_line_of_its_own(rbee: RbeeEnv) -> None:
    import signal

    assert rbee.run("infer", "--prompt", "Hi", "--max-tokens", "1").returncode == 0
    proc = subprocess.Popen([*rbee_cmd(), "infer", "--raw", "--prompt", LONG_PROMPT,
                             "--max-tokens", "1500", "--temperature", "0"],
                            cwd=REPO, env=rbee.env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT,  # one stream, as on a terminal
                            preexec_fn=default_sigint)
    assert proc.stdout is not None
    seen = ""
    while "Generating" not in seen or seen.count(",") < 5:
        char = proc.stdout.read(1)
        assert char, f"the command ended before generating: {seen}"
        seen += char
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert "\ncanceled\n" in seen + out


def rbee_cmd() -> list[str]:
    return [sys.executable, "-m", "rbee_tui"]
