"""B08: the operator's registry and settings in TOML — 0600, atomic, human-editable."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from rbee_agent.protocol import RbeeError
from rbee_tui.config import (
    LOCALHOST,
    Config,
    Node,
    config_path,
    load_config,
    save_config,
    validate_node_name,
)
from tests.cli_support import RbeeEnv


def test_b08_rbee_config_names_the_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RBEE_CONFIG", str(tmp_path / "x.toml"))
    assert config_path() == tmp_path / "x.toml"


def test_b08_saved_with_mode_0600_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "c" / "config.toml"
    config = Config(nodes={"gpu1": Node(name="gpu1", ssh_host="10.0.0.2", api_key="secret")})
    config.settings.poll_interval_s = 1.5
    save_config(config, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert "[nodes.gpu1]" in text and "poll_interval_s = 1.5" in text
    assert "ssh_backoff_ms" not in text, "defaults are not written: the file stays short"
    again = load_config(path)
    assert again.nodes["gpu1"].api_key == "secret" and again.settings.poll_interval_s == 1.5
    assert list(path.parent.iterdir()) == [path], "no temp file left behind"


def test_b08_localhost_is_always_a_node(tmp_path: Path) -> None:
    config = load_config(tmp_path / "missing.toml")
    assert config.names() == [LOCALHOST]
    assert config.node(LOCALHOST).is_local


def test_b08_hand_edits_with_mistakes_get_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("[nodes.gpu1]\nssh_port = 'twenty-two'\n")
    with pytest.raises(RbeeError) as err:
        load_config(path)
    assert "nodes.gpu1.ssh_port" in err.value.message and str(path) in err.value.message
    path.write_text("[nodes.gpu1\n")
    with pytest.raises(RbeeError) as err:
        load_config(path)
    assert "not valid TOML" in err.value.message


@pytest.mark.parametrize("name", ["GPU1", "-x", "a b", "x" * 33, ""])
def test_b01_bad_node_names_are_refused(name: str) -> None:
    with pytest.raises(RbeeError):
        validate_node_name(name)


def test_b08_a_broken_file_is_reported_and_left_alone(rbee: RbeeEnv) -> None:
    rbee.config.write_text("[settings\nbroken = yes\n")
    before = rbee.config.read_bytes()
    r = rbee.run("nodes", "list")
    assert r.returncode == 1 and "not valid TOML" in r.stderr and "Traceback" not in r.stderr
    assert rbee.config.read_bytes() == before
