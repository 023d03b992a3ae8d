"""The one key CLI: ``ferry keys`` and ``python -m ferry_common.signing`` are the same parser."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from ferry_cli.main import main as ferry_main
from ferry_common.signing import load_keyring
from ferry_common.signing.cli import main as keys_main


def test_ferry_keys_init_and_generate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "keys"
    assert ferry_main(["keys", "init", str(d), "--host", "host-a", "--client", "ops"]) == 0
    assert json.loads((d / "trust.json").read_text()) == {
        "coordinator": "coordinator.pub", "host/host-a/*": "host-a.pub", "client/ops": "client-ops.pub",
    }
    assert ferry_main(["keys", "generate", "--dir", str(d), "extra-1", "extra-2"]) == 0
    for name in ("extra-1", "extra-2"):
        assert stat.S_IMODE((d / f"{name}.key").stat().st_mode) == 0o600
    assert {"extra-1", "extra-2", "coordinator", "host-a"} <= set(load_keyring(d).private_keys)
    assert str(d / "extra-2.pub") in capsys.readouterr().out


def test_an_existing_key_is_refused_with_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert keys_main(["generate", "--dir", str(tmp_path), "k"]) == 0
    before = (tmp_path / "k.key").read_bytes()
    assert ferry_main(["keys", "generate", "--dir", str(tmp_path), "k"]) == 1
    assert "k.key exists: not overwritten" in capsys.readouterr().err
    assert (tmp_path / "k.key").read_bytes() == before
    assert keys_main(["keygen", str(tmp_path), "bad/name"]) == 1  # not a plain file name


def test_python_dash_m_runs_the_same_cli(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "ferry_common.signing", "keygen", str(tmp_path), "host-c"],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "host-c.key").exists() and (tmp_path / "host-c.pub").exists()
    usage = subprocess.run(
        [sys.executable, "-m", "ferry_common.signing", "--help"], capture_output=True, text=True, timeout=60
    )
    assert all(cmd in usage.stdout for cmd in ("init", "generate", "keygen"))
