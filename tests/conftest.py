"""Shared fixtures: every test runs against a real local Hub emulator, with its environment sandboxed.

- ``isolated`` (autouse): HF_HOME, tokens, endpoint, offline flags and our DINOV3_FETCHER_* knobs point at a
  temp dir or are unset, so no test touches ~/.cache or the real Hub; retries back off in milliseconds.
- ``hub``: a HubServer (tests/hub_server.py) with HF_ENDPOINT pointing at it.
- ``tiny``: a tiny DINOv3 ViT repo on that hub (``TINY``), returning its files.
- ``ms``: a ModelScopeServer (tests/modelscope_server.py), empty, with MODELSCOPE_ENDPOINT pointing at it (a test
  module that wants repos on it overrides ``ms`` with a fixture of the same name that adds them).
- ``run_cli``: run ``python -m dinov3_fetcher`` as a real subprocess with the sandboxed environment.
- ``watch_clock``: the clock by which this process judges other hosts' heartbeats, in the test's hands.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from huggingface_hub import constants

from checkpoints import vit_repo_files
from hub_server import HubServer
from modelscope_server import ModelScopeServer

# torch's thread pool (OpenMP) spin-waits for work; with the suite's workers and their subprocesses sharing the
# machine's cores, that spinning costs more CPU than the tests' tensors. The tests check outcomes, not speed: one
# thread in this process and in every process it starts (set before anything imports torch).
for _threads in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_threads, "1")

TINY = "tiny-org/dinov3-vit-tiny"
GRANTED, NOTGRANTED = "hf_valid_granted", "hf_valid_notgranted"
_OUR_ENV = ("HF_TOKEN", "HF_ENDPOINT", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DOWNLOAD_TIMEOUT",
            "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy")


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "hf_home"
    home.mkdir()
    for name in list(os.environ):
        if name.startswith("DINOV3_FETCHER_") or name in _OUR_ENV:
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,127.0.0.2,127.0.0.3,localhost")
    monkeypatch.setenv("DINOV3_FETCHER_BACKOFF", "0.01")
    monkeypatch.setenv("DINOV3_FETCHER_TIMEOUT", "5")
    # huggingface_hub read these at import; point them at the sandbox too (subprocesses get the env).
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(home / ".agent_harnesses.json"))
    return home


def _has_load_extra() -> bool:
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None:
        return False
    from importlib.metadata import version

    from dinov3_fetcher import _load as load

    return load._version_tuple(version("transformers")) >= load.MIN_TRANSFORMERS


needs_load = pytest.mark.skipif(
    not _has_load_extra(),
    reason="the [load] extra (torch, transformers>=4.56) is not installed: run bash .ci/install-load-extra.sh",
)


def point_hub_client(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    """huggingface_hub's own functions (hf_hub_download, get_hf_file_metadata) at ``endpoint``: it read
    HF_ENDPOINT at import (the rest of its sandbox is ``isolated``'s)."""
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")


@contextlib.contextmanager
def mounted_tmpfs(where: Path, size: str, inodes: int | None = None) -> Iterator[Path]:
    """A small tmpfs mounted at ``where`` (created), unmounted at the end; the test skips without root."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    where.mkdir(parents=True)
    opts = f"size={size}" + (f",nr_inodes={inodes}" if inodes else "")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """``tmpfs(size, inodes=None)``: a fresh small filesystem for the test (see ``mounted_tmpfs``)."""
    n = itertools.count()
    with contextlib.ExitStack() as stack:
        yield lambda size, inodes=None: stack.enter_context(mounted_tmpfs(tmp_path / f"tmpfs{next(n)}", size, inodes))


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    with HubServer() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        yield server


@pytest.fixture
def tiny(hub: HubServer) -> dict[str, bytes]:
    files = vit_repo_files()
    hub.add_repo(TINY, files)
    return files


@pytest.fixture
def ms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModelScopeServer]:
    for name in list(os.environ):  # modelscope_hub read its own knobs at import: only ours count from here on
        if name.startswith("MODELSCOPE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("MODELSCOPE_HOME", str(tmp_path / "ms_home"))  # no saved login of the real user
    with ModelScopeServer() as server:
        monkeypatch.setenv("MODELSCOPE_ENDPOINT", server.endpoint)
        yield server


@pytest.fixture
def dino_root(tmp_path: Path) -> Path:
    return tmp_path / "work" / "dinov3"


def checkpoint_tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` (relative path -> sha256), the lock and in-flight partial/staged data excluded."""
    import hashlib

    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and not rel.startswith((".dinov3-fetcher/partial", ".dinov3-fetcher/staged")) \
                and rel != ".dinov3-fetcher/lock":
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def cli_env(**extra: str | None) -> dict[str, str]:
    env = dict(os.environ)
    for k, v in extra.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def start(dino_root: Path, *args: str, **env: str) -> subprocess.Popen[str]:
    """``python -m dinov3_fetcher --dino-root DINO_ROOT --model TINY ARGS`` in the background (env: overrides)."""
    cmd = [sys.executable, "-m", "dinov3_fetcher", "--dino-root", str(dino_root), "--model", TINY, *args]
    return subprocess.Popen(cmd, env=cli_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


class WatchClock:
    """The clock by which this process judges another host's heartbeat (``_state.owners``), driven by the test:
    it stands still until the watcher sleeps; each sleep moves it on by the seconds asked, after running
    ``each_sleep`` (what the other host does meanwhile: beat, or not). The product's own staleness table applies,
    without waiting its seconds."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps = 0
        self.each_sleep: Callable[[], None] = lambda: None

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps += 1
        self.each_sleep()
        self.now += seconds


@pytest.fixture
def watch_clock(monkeypatch: pytest.MonkeyPatch) -> WatchClock:
    from dinov3_fetcher._state import owners

    clock = WatchClock()
    monkeypatch.setattr(owners.HEARTBEATS, "clock", clock.monotonic)
    monkeypatch.setattr(owners.HEARTBEATS, "sleep", clock.sleep)
    return clock


@pytest.fixture
def run_cli() -> Any:
    """``python -m dinov3_fetcher ARGS`` run to its end (``subprocess.run``'s result), in a process of its own
    forked by the command line's fork server (``launch.cli``: the interpreter's start-up and the imports are
    shared by the suite's hundreds of runs); ``fresh=True``: in a new interpreter, for what a start-up does
    (imports, bytecode)."""
    def run(*args: str, cwd: Path | None = None, timeout: float = 120, input: str | None = None,
            fresh: bool = False, **env: str | None) -> subprocess.CompletedProcess[str]:
        import launch  # here: it imports this module

        return launch.cli(args, cli_env(**env), cwd=cwd, timeout=timeout, input=input, fresh=fresh)

    return run


def pytest_configure(config: pytest.Config) -> None:
    """Byte-compile this project's sources once, as an install does (``uv sync`` installs them editable, which
    compiles nothing): with PYTHONDONTWRITEBYTECODE=1 each of the suite's hundreds of CLI processes would
    compile them again. What the processes run is the same."""
    if hasattr(config, "workerinput"):  # a pytest-xdist worker: its controller has done it
        return
    import compileall

    for package in ("dinov3_fetcher", "dinov3_bridge"):
        compileall.compile_dir(Path(__file__).resolve().parent.parent / "src" / package, quiet=1)


# The tests that run jobs of many processes (torchrun "nodes", torch imports) go first: under pytest-xdist the many
# short tests then fill both workers to the end, instead of one long job running alone at the end.
_FIRST = ("test_share.py", "test_broadcast.py", "test_distributed.py", "test_load.py", "test_bridge.py",
          "test_interrupt.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: _FIRST.index(item.path.name) if item.path.name in _FIRST else len(_FIRST))


def pytest_sessionfinish() -> None:
    """End the fork server of the forked ranks (``launch``), if this process started one: its time counts here."""
    if (launch := sys.modules.get("launch")) is not None:
        launch.shutdown()


from net_fixtures import forward_proxy, olah, tls_hub  # noqa: E402, F401  (fixtures: TLS hub, proxy.py, olah)
