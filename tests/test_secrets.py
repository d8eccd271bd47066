"""The token never leaks: not in stdout, stderr (with --debug tracebacks), --json output, exception messages,
the manifest or any file we write under dino_root or HF_HOME, on success and on every kind of error.
A known token is grepped for everywhere after each scenario.
"""

from __future__ import annotations

import ast
import os
import socket
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from checkpoints import vit_repo_files
from conftest import TINY
from dinov3_fetcher._errors import FetcherError, NetworkError
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


@pytest.mark.parametrize("flags", [[], ["--json"], ["--debug"]])
def test_a_signed_cdn_url_is_named_by_its_host_never_printed_whole(
        hub: HubServer, tiny: dict[str, bytes], dino_root: Path, run_cli: Any, flags: list[str]) -> None:
    signed = f"{hub.endpoint}/{TINY}/resolve/main/{MODEL}?X-Amz-Credential=AKIAEXAMPLE&X-Amz-Signature=f00d"
    hub.redirect_location = lambda _: signed  # a redirect loop through a signed URL: "too many redirects"
    r = run_cli("--dino-root", str(dino_root), "--model", TINY, *flags, DINOV3_FETCHER_RETRIES="1")
    assert r.returncode == 10, r.stderr
    out = r.stdout + r.stderr
    assert "X-Amz-" not in out and "Signature" not in out
    # one error line (with --debug, after the traceback)
    (line,) = [ln for ln in r.stderr.splitlines() if ln.startswith("dinov3-fetcher: error:")]
    assert "127.0.0.1" in line and " -> " in line


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


# Signed-URL schemes a CDN or storage host uses (each value holds a marker that must never be printed): S3's,
# Aliyun CDN's, Akamai's, Tencent COS's, and made-up ones no list of parameter names could know.
SIGNING = {
    "s3": "X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAZZs3CRED%2F20260101&X-Amz-Signature=ZZs3SIG0f00d",
    "aliyun": "auth_key=1700000000-0-0-ZZaliyunSIG9a8b7c",
    "akamai": "hdnts=exp=1700000000~acl=/*~hmac=ZZakamaiSIG4d5e6f",
    "tencent": "q-sign-algorithm=sha1&q-ak=ZZtencentAK&q-sign-time=1700000000;1700003600&q-signature=ZZtencentSIG12",
    "token": "token=ZZtokenSECRETxyz",
    "sig": "expires=1700000000&sig=ZZsigSECRETabc",
}


def _markers(query: str) -> list[str]:
    return [m for m in query.replace("%2F", "&").replace("~", "&").replace("=", "&").split("&") if "ZZ" in m]


def _space_in_the_path(hub: HubServer, query: str) -> None:
    """The CDN location's path holds a space (the client cannot even send it: http.client quotes the request)."""
    hub.redirect_location = lambda location: f"{location.partition('?')[0].replace('/lfs/', '/lfs/a b/')}?{query}"


def _a_redirect_loop(hub: HubServer, query: str) -> None:
    """The Hub redirects to a signed URL that redirects back again: "too many redirects"."""
    hub.redirect_location = lambda location: f"{hub.endpoint}/{TINY}/resolve/main/{MODEL}?{query}"


@pytest.mark.parametrize("mode", [[], ["--json"], ["--debug"]])
@pytest.mark.parametrize("scheme", list(SIGNING))
def test_a_signed_location_whose_path_holds_a_space_is_never_printed(hub: HubServer, tiny: dict[str, bytes],
                                                                       dino_root: Path, run_cli: Any,
                                                                       mode: list[str], scheme: str) -> None:
    """Whatever the signing scheme is called, no part of its query reaches the error line, --json or --debug."""
    _space_in_the_path(hub, SIGNING[scheme])
    proc = run_cli("--dino-root", str(dino_root), "--model", TINY, *mode, DINOV3_FETCHER_RETRIES="1")
    assert proc.returncode == 10, proc.stderr
    out = proc.stdout + proc.stderr
    assert "InvalidURL" in out  # the request that could not be sent is what the error is about
    for marker in _markers(SIGNING[scheme]):
        assert marker not in out, out
    assert "?<query hidden>" in out  # what it was is said, the credential is not
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("dinov3-fetcher: error:")]
    assert "127.0.0.1" in line and " -> " in line


@pytest.mark.parametrize("scheme", list(SIGNING))
def test_a_redirect_loop_through_signed_urls_is_never_printed_with_debug(hub: HubServer, tiny: dict[str, bytes],
                                                                          dino_root: Path, run_cli: Any,
                                                                          scheme: str) -> None:
    _a_redirect_loop(hub, SIGNING[scheme])
    proc = run_cli("--dino-root", str(dino_root), "--model", TINY, "--debug", DINOV3_FETCHER_RETRIES="1")
    assert proc.returncode == 10, proc.stderr
    assert "too many redirects" in proc.stderr
    for marker in _markers(SIGNING[scheme]):
        assert marker not in proc.stdout + proc.stderr, proc.stderr


@pytest.mark.parametrize("scenario", [_space_in_the_path, _a_redirect_loop])
@pytest.mark.parametrize("scheme", list(SIGNING))
def test_an_error_raised_to_python_holds_no_signed_url(hub: HubServer, tiny: dict[str, bytes], dino_root: Path,
                                                       monkeypatch: pytest.MonkeyPatch, scheme: str,
                                                       scenario: Callable[[HubServer, str], None]) -> None:
    """The NetworkError a trainer logs (its text, repr, traceback and every exception chained to it) holds no part
    of a signed URL's query, whatever the signing scheme is called."""
    scenario(hub, SIGNING[scheme])
    monkeypatch.setenv("DINOV3_FETCHER_RETRIES", "1")
    with pytest.raises(NetworkError) as info:
        fetch(dino_root, TINY)
    exc = info.value
    text = str(exc) + repr(exc) + exc.message + exc.hint + "".join(traceback.format_exception(exc))
    chained: BaseException | None = exc
    while chained is not None:
        text += repr(chained.args) + str(chained)
        chained = chained.__cause__ or chained.__context__
    assert "127.0.0.1" in str(exc)
    for marker in _markers(SIGNING[scheme]):
        assert marker not in text, text


def test_a_fifo_as_the_saved_modelscope_login_never_blocks_an_error_line(hub: HubServer, dino_root: Path,
                                                                        tmp_path: Path, run_cli: Any) -> None:
    """Every message is scrubbed of the saved logins: one that is a FIFO is skipped, not waited on."""
    home = tmp_path / "ms_home"
    (home / "credentials").mkdir(parents=True)
    os.mkfifo(home / "credentials" / "cookies")
    for mode in ([], ["--json"]):
        proc = run_cli("--dino-root", str(dino_root), "--model", "nobody/nothing", *mode, MODELSCOPE_HOME=str(home),
                       timeout=60)
        assert proc.returncode == 5, proc.stderr
        assert proc.stderr.count("dinov3-fetcher: error: repo nobody/nothing was not found") == 1, proc.stderr


def test_a_fifo_as_the_token_file_is_refused_naming_it(hub: HubServer, tiny: dict[str, bytes], dino_root: Path,
                                                      isolated: Path, run_cli: Any) -> None:
    os.mkfifo(isolated / "token")
    proc = run_cli("--dino-root", str(dino_root), "--model", TINY, timeout=60)
    assert proc.returncode == 3, proc.stderr
    assert f"the token file {isolated / 'token'}" in proc.stderr and "is a FIFO" in proc.stderr, proc.stderr
    assert "hf auth login" in proc.stderr


_BOTH_TOKENS = """\
import sys
from dinov3_fetcher._sources import hf
ours = hf.get_token()
asked = "huggingface_hub.utils" in sys.modules  # its client
import huggingface_hub
print(repr((ours, huggingface_hub.get_token(), asked)))
"""


@pytest.mark.parametrize(("env", "stored", "quick"), [
    ({"HF_TOKEN": "hf_one"}, None, True),
    ({"HF_TOKEN": " hf_two\r\n"}, None, True),
    ({"HF_TOKEN": "", "HUGGING_FACE_HUB_TOKEN": "hf_three"}, None, True),
    ({"HF_TOKEN": "hf_four"}, "token", True),  # the variable comes before the stored token
    ({}, None, True),  # no token anywhere
    ({"HF_TOKEN": "  "}, None, False),  # blank: as if unset, and huggingface_hub says what that means
    ({}, "token", False),  # a stored token: huggingface_hub may refresh it
    ({"HF_OIDC_RESOURCE": ""}, None, True),
    ({"HF_HOME": ""}, "work/token", False),  # set but empty: huggingface_hub looks in the working folder
    ({"HF_HOME": "", "XDG_CACHE_HOME": ""}, "work/token", False),
    ({"XDG_CACHE_HOME": "{tmp}/xdg", "HF_HOME": None}, "xdg/huggingface/token", False),
    ({"HF_TOKEN_PATH": "{tmp}/elsewhere/token"}, "elsewhere/token", False),
    ({"HUGGINGFACE_CO_STAGING": "1"}, "home/.cache/huggingface_staging/token", False),
], ids=["HF_TOKEN", "cleaned", "old-name", "over-stored", "none", "blank", "stored", "empty-oidc", "empty-home",
        "empty-cache", "xdg", "token-path", "staging"])
def test_a_token_read_without_huggingface_hub_is_the_one_it_reads(isolated: Path, tmp_path: Path,
                                                                  env: dict[str, str | None], stored: str | None,
                                                                  quick: bool) -> None:
    # A cold fetch's first requests go out before huggingface_hub's client is imported, with the token it would
    # give: its own get_token, in a new process (its constants are read at import), decides what is right.
    (tmp_path / "work").mkdir()
    (tmp_path / "home").mkdir()
    if stored is not None:
        path = isolated / stored if stored == "token" else tmp_path / stored
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("hf_stored\n")
    run_env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
                                                                 "HF_TOKEN_PATH", "HF_OIDC_RESOURCE")}
    run_env["HOME"] = str(tmp_path / "home")
    run_env.update({k: v.format(tmp=tmp_path) for k, v in env.items() if v is not None})
    for name in (k for k, v in env.items() if v is None):
        run_env.pop(name, None)
    proc = subprocess.run([sys.executable, "-c", _BOTH_TOKENS], env=run_env, capture_output=True, text=True,
                          timeout=60, cwd=tmp_path / "work")
    assert proc.returncode == 0, proc.stderr
    ours, theirs, asked = ast.literal_eval(proc.stdout)
    assert ours == theirs
    assert asked is not quick  # where the environment decides, huggingface_hub's client is not imported for it
