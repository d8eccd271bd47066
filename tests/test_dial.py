"""The command's first connections (``_dial``): opened as it starts for a cold fetch from the Hub, never for a
warm one or anything else, and taken by the fetch's pool for its first requests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY
from dinov3_fetcher import _dial
from dinov3_fetcher._cli import build_parser
from dinov3_fetcher._http import HttpPool
from hub_server import HubServer


@pytest.fixture
def no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.lower().endswith("_proxy") and name.lower() != "no_proxy":
            monkeypatch.delenv(name)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.delenv("DINOV3_FETCHER_SOURCE", raising=False)
    monkeypatch.setattr(_dial, "_dials", {})


def _manifest(root: Path) -> None:
    (root / ".dinov3-fetcher").mkdir(parents=True)
    (root / ".dinov3-fetcher" / "manifest.json").write_text("{}")


def test_a_cold_fetch_from_the_hub_dials_its_endpoint(no_proxy_env: None, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "https://Hub.example:8443/")
    root = tmp_path / "dinov3"
    assert _dial._target(["--dino-root", str(root)]) == ("hub.example", 8443)
    assert _dial._target(["fetch", f"--dino-root={root}", "-q", "--model", TINY, "--revision", "main"]) \
        == ("hub.example", 8443)
    config = tmp_path / "cfg" / "config.json"
    config.parent.mkdir()
    config.write_text(json.dumps({"train": {"dino_root": "../dinov3", "dino_source": "hf"}}))
    monkeypatch.chdir(tmp_path / "cfg")
    assert _dial._target(["--config", "config.json"]) == ("hub.example", 8443)
    monkeypatch.delenv("HF_ENDPOINT")
    assert _dial._target(["--dino-root", str(root)]) == ("huggingface.co", 443)
    _manifest(root)  # a manifest: maybe warm, so no connection ...
    assert _dial._target(["--config", "config.json"]) is None
    assert _dial._target(["--dino-root", str(root)]) is None
    assert _dial._target(["--dino-root", str(root), "--update"]) == ("huggingface.co", 443)  # ... unless asked


@pytest.mark.parametrize(("argv", "env", "config"), [
    (["verify", "--dino-root", "R"], {}, None),
    (["info", "--dino-root", "R"], {}, None),
    (["list"], {}, None),
    (["--help"], {}, None),
    (["--dino-root", "R", "--dry-run"], {}, None),
    (["--dino-root", "R", "--dino"], {}, None),  # not a flag it knows: argparse decides
    (["--dino-root"], {}, None),
    (["--dino-root", "R", "--source", "modelscope"], {}, None),
    (["--dino-root", "R"], {"DINOV3_FETCHER_SOURCE": "modelscope"}, None),
    (["--config", "C"], {}, {"dino_root": "r", "dino_source": "modelscope"}),
    (["--config", "C"], {}, {"dino_model": "x"}),  # no dino_root
    (["--config", "C"], {}, None),  # no config file
    (["--dino-root", "R"], {"HF_HUB_OFFLINE": "1"}, None),
    (["--dino-root", "R"], {"https_proxy": "http://proxy.example:3128"}, None),
    (["--dino-root", "R"], {"HF_ENDPOINT": "ftp://hub.example"}, None),
    (["--dino-root", "R"], {"HF_ENDPOINT": "https://user:pw@hub.example"}, None),
    (["--dino-root", "R"], {"HF_ENDPOINT": "https://hub.example:99999"}, None),
], ids=["verify", "info", "list", "help", "dry-run", "abbreviation", "no-value", "modelscope-flag",
        "modelscope-env", "modelscope-config", "no-root-in-config", "no-config", "offline", "proxy", "ftp",
        "credentials", "bad-port"])
def test_nothing_else_dials(no_proxy_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                            argv: list[str], env: dict[str, str], config: dict[str, str] | None) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if config is not None:
        (tmp_path / "C").write_text(json.dumps({"train": config}))
    monkeypatch.chdir(tmp_path)
    _dial.start(argv)  # never raises: what it cannot tell means no connection
    assert _dial._dials == {}


def test_it_looks_for_the_manifest_where_the_state_folder_keeps_it() -> None:
    from dinov3_fetcher._state import STATE_DIRNAME, StateDir

    assert _dial._STATE == STATE_DIRNAME
    assert StateDir(Path("/r")).manifest_path == Path("/r", _dial._STATE, "manifest.json")


def test_it_knows_every_flag_of_the_fetch_command() -> None:
    # A flag it does not know means no early connection: each one the fetch takes is known, with or without a value.
    parser = build_parser("fetch")
    fetch = next(a for a in parser._actions if a.dest == "command").choices["fetch"]  # type: ignore[union-attr]
    for action in fetch._actions:
        for option in action.option_strings:
            if option in ("-h", "--help"):
                continue
            takes_value = action.nargs != 0
            known = option in ("--config", "--dino-root", "--source", *_dial._VALUED) if takes_value else \
                option in ("--update", "--dry-run", *_dial._SWITCHES)
            assert known, option


def test_the_pool_takes_the_dialed_connections_for_its_first_requests(no_proxy_env: None, hub: HubServer,
                                                                      tmp_path: Path) -> None:
    hub.add_repo(TINY, {"config.json": b"{}"})
    _dial.start(["--dino-root", str(tmp_path / "dinov3")])
    dial = next(iter(_dial._dials.values()))
    dialed = {s.getsockname()[1] for s in dial.socks}
    assert len(dialed) == _dial.FIRST_CONNECTIONS
    pool = HttpPool(5, "ua")
    pool.warm(hub.endpoint, _dial.FIRST_CONNECTIONS)
    url = f"{hub.endpoint}/{TINY}/resolve/main/config.json"
    for _ in range(_dial.FIRST_CONNECTIONS):
        pool.head(url)
    pool.close()
    assert {r.peer for r in hub.requests} <= dialed  # no connection of its own: the dialed ones, in use
    assert dial.socks == []


def test_the_command_dials_before_it_imports_what_a_fetch_needs(no_proxy_env: None, tmp_path: Path) -> None:
    # The connects start before the HTTP client, the command line's parser and huggingface_hub are imported.
    script = (
        "import socket, sys\n"
        "seen = []\n"
        "connect = socket.socket.connect_ex\n"
        "def record(self, addr):\n"
        "    seen.append(sorted(m for m in sys.modules if m in WATCHED))\n"
        "    return connect(self, addr)\n"
        "WATCHED = {'http.client', 'dinov3_fetcher._cli', 'dinov3_fetcher._fetch', 'huggingface_hub'}\n"
        "socket.socket.connect_ex = record\n"
        "sys.argv = ['dinov3-fetcher', '--dino-root', sys.argv[1], '-q']\n"
        "from dinov3_fetcher._entry import main\n"
        "main()\n"
        "print(seen)\n"
    )
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "DINOV3_FETCHER_TIMEOUT": "2",
           "DINOV3_FETCHER_RETRIES": "0"}  # nothing listens there: the fetch fails, as it should
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "dinov3")], env=env, capture_output=True,
                          text=True, timeout=120)
    assert "error" in proc.stderr, proc.stderr
    assert proc.stdout.strip() == str([[]] * _dial.FIRST_CONNECTIONS), proc.stdout
