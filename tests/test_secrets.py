"""The token never leaks: not in stdout, stderr (with --debug tracebacks), --json output, exception messages,
the manifest or any file we write under dino_root or HF_HOME, on success and on every kind of error.
A known token is grepped for everywhere after each scenario.
"""

from __future__ import annotations

import socket
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from checkpoints import vit_repo_files
from conftest import TINY
from dinov3_fetcher._errors import FetcherError
from helpers import fetch
from hub_server import HubServer

SECRET = "hf_SeCrEt0123456789abcdefghijKLMNOP"  # a valid token on the emulator, granted on TINY
BAD_SECRET = "hf_InvalidButSecret9876543210zyxwv"  # a token the Hub rejects (401): still a secret
MODEL = "model.safetensors"


@pytest.fixture
def gated(hub: HubServer) -> dict[str, bytes]:
    files = vit_repo_files()
    hub.add_repo(TINY, files, gated=True)
    hub.valid_tokens.add(SECRET)
    hub.grant(TINY, SECRET)
    hub.add_repo("tiny-org/not-granted", files, gated=True)
    return files


def files_containing(top: Path, secret: str) -> list[str]:
    needle = secret.encode()
    return [str(p) for p in top.rglob("*") if p.is_file() and needle in p.read_bytes()]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


Scenario = Callable[[HubServer, Path], tuple[list[str], dict[str, str], int]]

SCENARIOS: dict[str, Scenario] = {
    "success": lambda hub, root: (["--model", TINY, "-v", "--progress"], {}, 0),
    "gated-not-granted": lambda hub, root: (["--model", "tiny-org/not-granted"], {}, 4),
    "token-rejected": lambda hub, root: (["--model", TINY], {"HF_TOKEN": BAD_SECRET}, 4),
    "corrupt-bytes": lambda hub, root: (hub.faults.add(path_suffix=MODEL, corrupt_at=100) and
                                        ["--model", TINY], {}, 8),
    "retries-exhausted": lambda hub, root: (hub.faults.add(path_suffix=MODEL, status=503) and
                                            ["--model", TINY], {"DINOV3_FETCHER_RETRIES": "1"}, 10),
    "hub-unreachable": lambda hub, root: (["--model", TINY],
                                          {"HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}"}, 10),
    "lock-timeout": lambda hub, root: (["--model", TINY, "--lock-timeout", "0.3"], {}, 12),
}


@pytest.mark.parametrize("token_from", ["env", pytest.param("token-file", marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_token_never_appears_in_output_or_files(hub: HubServer, gated: dict[str, bytes], dino_root: Path,
                                                 tmp_path: Path, isolated: Path, run_cli: Any, name: str,
                                                 token_from: str) -> None:
    args, env, code = SCENARIOS[name](hub, dino_root)
    env = {"HF_TOKEN": SECRET, **env}
    if token_from == "token-file":  # as 'hf auth login' stores it
        (isolated / "token").write_text(env.pop("HF_TOKEN"))
        env["HF_TOKEN"] = None  # type: ignore[assignment]
    holder = None
    if name == "lock-timeout":
        from filelock import FileLock

        (dino_root / ".dinov3-fetcher").mkdir(parents=True)
        holder = FileLock(dino_root / ".dinov3-fetcher" / "lock")
        holder.acquire()
    try:
        outputs = []
        proc = run_cli("--dino-root", str(dino_root), *args, "--json", "--debug", **env)  # JSON + tracebacks
        assert proc.returncode == code, proc.stderr
        outputs += [proc.stdout, proc.stderr]
        if code:
            assert "Traceback" in proc.stderr  # --debug really printed the traceback that was scrubbed
    finally:
        if holder is not None:
            holder.release()
    secrets = (SECRET, BAD_SECRET)
    for text in outputs:
        for s in secrets:
            assert s not in text, text
            assert s[3:20] not in text  # not even a recognisable part of it
    if code == 0:
        assert "Bearer" not in "".join(outputs)
        assert (dino_root / ".dinov3-fetcher" / "manifest.json").is_file()
    for s in secrets:
        if token_from == "token-file":
            assert files_containing(tmp_path, s) in ([], [str(isolated / "token")])  # only the user's own file
        else:
            assert files_containing(tmp_path, s) == []


@pytest.mark.parametrize("name", ["gated-not-granted", "token-rejected", "corrupt-bytes", "retries-exhausted",
                                  "hub-unreachable"])
def test_token_never_appears_in_exception_messages_or_tracebacks(
        hub: HubServer, gated: dict[str, bytes], dino_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        name: str) -> None:
    args, env, code = SCENARIOS[name](hub, dino_root)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(FetcherError) as info:
        fetch(dino_root, args[1])
    exc = info.value
    assert exc.exit_code == code  # the scenario's own failure, not any exception
    text = "".join(traceback.format_exception(exc)) + repr(exc) + str(exc)
    chained: BaseException | None = exc
    while chained is not None:  # the causes and contexts too, with their args
        text += repr(chained.args)
        chained = chained.__cause__ or chained.__context__
    for s in (SECRET, BAD_SECRET):
        assert s not in text, text
    assert files_containing(tmp_path, SECRET) == []
