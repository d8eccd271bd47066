"""The ModelScope source (dinov3_fetcher._sources.modelscope) against the ModelScope emulator."""

from __future__ import annotations

import hashlib
import os
import pickle
import socket
import time
from pathlib import Path
from typing import NoReturn

import pytest

from checkpoints import vit_repo_files
from dinov3_fetcher._errors import (
    AuthenticationError,
    ConfigError,
    HubResponseError,
    NetworkError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from dinov3_fetcher._http import Auth
from dinov3_fetcher._net import refusal
from dinov3_fetcher._retry import RetryPolicy
from dinov3_fetcher._sources import modelscope as msrc
from dinov3_fetcher._sources.modelscope import ModelScopeSource, pinned_id
from dinov3_fetcher._sources.source import Snapshot
from modelscope_server import ModelScopeServer

REPO = "facebook/dinov3-vits16-pretrain-lvd1689m"
PRIVATE = "facebook/private"
GRANTED, NOTGRANTED = "ms-valid-granted", "ms-valid-notgranted"
FILES = vit_repo_files()


@pytest.fixture
def ms(ms: ModelScopeServer) -> ModelScopeServer:
    ms.add_repo(REPO, FILES)
    ms.add_repo(PRIVATE, FILES, private=True)
    ms.grant(PRIVATE, GRANTED)
    return ms


def fetch(src: ModelScopeSource, snap: Snapshot, name: str) -> tuple[int, bytes]:
    """GET a file the way the transfer layer will: the source's scoped pool, redirects followed."""
    pool = src.pool()
    try:
        answer = pool.get(src.file_url(snap, name), {})
        body = answer.read()
        pool.finish(answer)
        return answer.resp.status, body
    finally:
        pool.close()


# ---------- listing ----------

def test_listing_of_a_tiny_dinov3_repo(ms: ModelScopeServer) -> None:
    src = ModelScopeSource.from_env()
    assert src.endpoint == ms.endpoint and src.auth() is None
    snap = src.snapshot(REPO, "master")
    assert (snap.source, snap.endpoint, snap.repo_id, snap.revision) == ("modelscope", ms.endpoint, REPO, "master")
    assert sorted(snap.files) == sorted(FILES)
    for name, data in FILES.items():
        f = snap.files[name]
        assert (f.name, f.size, f.sha256, f.git_oid) == (name, len(data), hashlib.sha256(data).hexdigest(), None)
    assert len(snap.commit) == 40 and int(snap.commit, 16) >= 0
    (listing,) = ms.listing_gets(REPO)
    assert "Revision=master" in listing.path and "Recursive=True" in listing.path
    assert "authorization" not in listing.headers and "cookie" not in listing.headers


def test_pinned_id_changes_exactly_when_the_files_change(ms: ModelScopeServer) -> None:
    src = ModelScopeSource.from_env()
    first = src.snapshot(REPO, "master").commit
    assert src.snapshot(REPO, "master").commit == first
    ms.add_commit(REPO, {"config.json": FILES["config.json"]})  # a new commit, same bytes
    assert src.snapshot(REPO, "master").commit == first
    ms.add_commit(REPO, {"config.json": b'{"changed": 1}'})
    changed = src.snapshot(REPO, "master").commit
    assert changed != first
    ms.add_commit(REPO, {"LICENSE.md": None})  # a deletion leaves every other file's Revision as it was
    assert src.snapshot(REPO, "master").commit not in (first, changed)
    assert pinned_id(src.snapshot(REPO, "master").files) == src.snapshot(REPO, "master").commit


def test_tags_and_branches(ms: ModelScopeServer) -> None:
    ms.add_tag(REPO, "v1.0", "master")
    ms.add_commit(REPO, {"config.json": b'{"changed": 1}'}, branch="dev")
    src = ModelScopeSource.from_env()
    assert src.snapshot(REPO, "v1.0").files["config.json"].size == len(FILES["config.json"])
    assert src.snapshot(REPO, "dev").files["config.json"].size == len(b'{"changed": 1}')


def test_file_urls_serve_the_listed_bytes(ms: ModelScopeServer) -> None:
    src = ModelScopeSource(ms.endpoint, GRANTED)
    snap = src.snapshot(PRIVATE, "master")
    for name in ("model.safetensors", "config.json", "preprocessor_config.json"):
        status, body = fetch(src, snap, name)
        assert status == 200 and hashlib.sha256(body).hexdigest() == snap.files[name].sha256
    assert ms.bytes_served("model.safetensors", host="storage") == len(FILES["model.safetensors"])
    assert ms.bytes_served("/config.json", host="api") == len(FILES["config.json"])
    assert src.file_url(snap, "a b/c.json").endswith("/repo?Revision=master&FilePath=a+b%2Fc.json")


# ---------- errors ----------

def test_unknown_repo_is_exit_5(ms: ModelScopeServer) -> None:
    with pytest.raises(RepositoryNotFoundError) as err:
        ModelScopeSource.from_env().snapshot("facebook/nope", "master")
    assert err.value.exit_code == 5 and "MODELSCOPE_API_TOKEN" in err.value.hint


def test_unknown_revision_is_exit_6(ms: ModelScopeServer) -> None:
    with pytest.raises(RevisionNotFoundError) as err:
        ModelScopeSource.from_env().snapshot(REPO, "v9.9")
    assert err.value.exit_code == 6 and "master" in err.value.hint
    assert [r.status for r in ms.listing_gets(REPO)] == [200]  # the site's 200 with Files: null


def test_private_repo_without_token_is_exit_4_naming_the_variable_and_page(ms: ModelScopeServer) -> None:
    with pytest.raises(AuthenticationError) as err:
        ModelScopeSource.from_env().snapshot(PRIVATE, "master")
    assert err.value.exit_code == 4 and err.value.status == 401
    assert "MODELSCOPE_API_TOKEN" in err.value.hint and f"{ms.endpoint}/models/{PRIVATE}" in err.value.hint


def test_private_repo_without_access(ms: ModelScopeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELSCOPE_API_TOKEN", NOTGRANTED)
    with pytest.raises(AuthenticationError) as err:
        ModelScopeSource.from_env().snapshot(PRIVATE, "master")
    assert err.value.status == 403 and f"{ms.endpoint}/models/{PRIVATE}" in err.value.hint
    assert NOTGRANTED not in str(err.value)


def test_private_repo_hidden_as_404(ms: ModelScopeServer) -> None:
    ms.hide_private = True
    with pytest.raises(RepositoryNotFoundError) as err:
        ModelScopeSource.from_env().snapshot(PRIVATE, "master")
    assert "MODELSCOPE_API_TOKEN" in err.value.hint


@pytest.mark.parametrize("override", [{"Sha256": ""}, {"Sha256": "abc"}, {"Size": None}, {"Size": -1},
                                      {"Size": True}, {"Path": ""}])
def test_listing_without_size_or_sha256_is_refused(ms: ModelScopeServer, override: dict[str, object]) -> None:
    ms.entry_overrides["model.safetensors"] = override
    with pytest.raises(HubResponseError):
        ModelScopeSource.from_env().snapshot(REPO, "master")


def test_truncated_listing_is_refused(ms: ModelScopeServer) -> None:
    ms.add_repo("big/repo", {f"f{i:04d}.json": b"{}" for i in range(3001)})
    with pytest.raises(HubResponseError, match="3000"):
        ModelScopeSource.from_env().snapshot("big/repo", "master")


def test_malformed_repo_id_is_a_config_error(ms: ModelScopeServer) -> None:
    with pytest.raises(ConfigError):
        ModelScopeSource.from_env().snapshot("../etc/passwd", "master")
    assert ms.requests == []


def test_raise_for_status_of_file_answers(ms: ModelScopeServer) -> None:
    src = ModelScopeSource(ms.endpoint, None)
    snap = Snapshot("modelscope", ms.endpoint, PRIVATE, "master", "0" * 40, {})
    api_url = src.file_url(snap, "model.safetensors")
    storage_url = f"{ms.storage_endpoint}/lfs/{'a' * 64}/model.safetensors?Signature=x"
    cases: list[tuple[int, str, type[Exception]]] = [
        (401, api_url, AuthenticationError), (403, api_url, AuthenticationError), (404, api_url, HubResponseError),
        (503, api_url, NetworkError), (429, api_url, NetworkError), (400, api_url, NetworkError),
    ]
    for status, url, cls in cases:
        with pytest.raises(cls) as err:
            src.raise_for_status(status, {}, b"", url, PRIVATE, "master")
        assert type(err.value) is cls, (status, url)
    for status in (401, 403):  # the storage host's refusal is read before the source's (_net.refusal)
        refused = refusal(status, storage_url, api_url, b"<Error><Code>AccessDenied</Code></Error>", "m.bin")
        assert isinstance(refused, NetworkError) and "AccessDenied" in refused.message
        assert refused.message.startswith(f"the storage host {ms.storage_endpoint.removeprefix('http://')} refused")
    assert refusal(403, api_url, api_url) is None and refusal(404, storage_url, api_url) is None
    with pytest.raises(AuthenticationError) as auth_err:
        src.raise_for_status(401, {}, b"", api_url, PRIVATE, "master")
    assert "MODELSCOPE_API_TOKEN" in auth_err.value.hint


# ---------- retries ----------

def test_429_and_503_are_retried(ms: ModelScopeServer) -> None:
    ms.faults.add(status=429, retry_after="0", path_suffix="repo/files", times=1)
    ms.faults.add(status=503, path_suffix="repo/files", times=1, after=1)
    snap = ModelScopeSource.from_env().snapshot(REPO, "master")
    assert sorted(snap.files) == sorted(FILES)
    assert [r.status for r in ms.listing_gets(REPO)] == [429, 503, 200]


def test_retries_are_bounded(ms: ModelScopeServer) -> None:
    ms.faults.add(status=503, path_suffix="repo/files")
    src = ModelScopeSource(ms.endpoint, None, retry=RetryPolicy(retries=3, backoff=0.0))
    with pytest.raises(NetworkError) as err:
        src.snapshot(REPO, "master")
    assert err.value.exit_code == 10 and "4 tries" in err.value.message
    assert len(ms.listing_gets(REPO)) == 4


def test_unreachable_endpoint_is_a_network_error(ms: ModelScopeServer) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    src = ModelScopeSource(f"http://127.0.0.1:{port}", None, retry=RetryPolicy(retries=2, backoff=0.0))
    with pytest.raises(NetworkError, match="3 tries"):
        src.snapshot(REPO, "master")


# ---------- token scoping ----------

def test_listing_carries_the_token_both_ways_and_never_the_hf_token(ms: ModelScopeServer,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELSCOPE_API_TOKEN", GRANTED)
    monkeypatch.setenv("HF_TOKEN", "hf_secret_never_to_modelscope")
    src = ModelScopeSource.from_env()
    auth = src.auth()
    assert auth == Auth(ms.endpoint, {"Authorization": f"Bearer {GRANTED}", "Cookie": f"m_session_id={GRANTED}"})
    assert GRANTED not in repr(src)
    snap = src.snapshot(PRIVATE, "master")
    (listing,) = ms.listing_gets(PRIVATE)
    assert listing.headers["authorization"] == f"Bearer {GRANTED}"
    assert listing.headers["cookie"] == f"m_session_id={GRANTED}"
    fetch(src, snap, "model.safetensors")
    fetch(src, snap, "config.json")
    storage = [r for r in ms.requests if r.host == "storage"]
    api_files = ms.file_gets(host="api")
    assert storage and api_files
    assert all(r.headers.get("authorization") == f"Bearer {GRANTED}" for r in api_files)
    assert all("authorization" not in r.headers and "cookie" not in r.headers for r in storage)
    assert not any("hf_secret" in str(r.headers) for r in ms.requests)


def test_empty_token_variable_means_anonymous_even_with_a_saved_login(ms: ModelScopeServer,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from modelscope_hub import HubConfig

    HubConfig().save_token(GRANTED)
    monkeypatch.setenv("MODELSCOPE_API_TOKEN", "")
    assert msrc.token() is None
    with pytest.raises(AuthenticationError):
        ModelScopeSource.from_env().snapshot(PRIVATE, "master")


def test_token_with_a_newline_is_a_config_error(ms: ModelScopeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELSCOPE_API_TOKEN", "abc\r\nX-Evil: 1")
    with pytest.raises(ConfigError) as err:
        msrc.token()
    assert "abc" not in str(err.value)


# ---------- saved login ----------

def test_saved_login_written_by_the_real_client(ms: ModelScopeServer, tmp_path: Path) -> None:
    from modelscope_hub import HubConfig

    HubConfig().save_token(GRANTED)  # what 'modelscope login' does
    assert msrc.credentials_file() == tmp_path / "ms_home" / "credentials" / "cookies"
    assert msrc.token() == GRANTED
    snap = ModelScopeSource.from_env().snapshot(PRIVATE, "master")
    assert sorted(snap.files) == sorted(FILES)
    assert ms.listing_gets(PRIVATE)[0].headers["authorization"] == f"Bearer {GRANTED}"


def test_saved_login_expired_is_none(ms: ModelScopeServer) -> None:
    from modelscope_hub import HubConfig

    HubConfig().save_token(GRANTED)
    path = msrc.credentials_file()
    jar = pickle.loads(path.read_bytes())  # the test's own file, written just above by the real client
    for c in jar:
        c.expires = int(time.time()) - 10
    path.write_bytes(pickle.dumps(jar))
    assert msrc.saved_token() is None


class _Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("touch pwned",))


def test_saved_login_never_runs_code(ms: ModelScopeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = msrc.credentials_file()
    path.parent.mkdir(parents=True)
    path.write_bytes(pickle.dumps(_Evil()))
    assert msrc.saved_token() is None and msrc.token() is None
    assert not (tmp_path / "pwned").exists()
    path.write_bytes(b"not a pickle")
    assert msrc.saved_token() is None


# ---------- endpoint ----------

@pytest.mark.parametrize(("env", "expected"), [
    ({}, "https://modelscope.cn"),
    ({"MODELSCOPE_ENDPOINT": "http://mirror.local:8080/"}, "http://mirror.local:8080"),
    ({"MODELSCOPE_ENDPOINT": "www.modelscope.ai"}, "https://www.modelscope.ai"),
    ({"MODELSCOPE_ENDPOINT": "HTTPS://X.example//"}, "HTTPS://X.example"),
    ({"MODELSCOPE_DOMAIN": " modelscope.ai "}, "https://modelscope.ai"),
    ({"MODELSCOPE_ENDPOINT": "http://a.example", "MODELSCOPE_DOMAIN": "b.example"}, "http://a.example"),
    ({"MODELSCOPE_ENDPOINT": "", "MODELSCOPE_DOMAIN": "b.example"}, "https://b.example"),
])
def test_endpoint_precedence(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], expected: str) -> None:
    for name in ("MODELSCOPE_ENDPOINT", "MODELSCOPE_DOMAIN"):
        monkeypatch.delenv(name, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert msrc.endpoint() == expected


@pytest.mark.parametrize("value", ["http://", "https://:80", "http://h:99999", "http://u:pw@[::1", "ftp x"])
def test_malformed_endpoint_is_exit_3(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", value)
    with pytest.raises(ConfigError) as err:
        ModelScopeSource.from_env()
    assert err.value.exit_code == 3 and "MODELSCOPE_ENDPOINT" in err.value.message
    assert "pw" not in str(err.value)


# ---------- with the transfer layer (what a fetch from ModelScope must handle) ----------

def _transfer_once(ms: ModelScopeServer, tmp_path: Path, token: str | None) -> tuple[bool, str]:
    from dinov3_fetcher._job import Target
    from dinov3_fetcher._progress import Progress
    from dinov3_fetcher._state import StateDir
    from dinov3_fetcher._transfer import Settings, Transfer

    src = ModelScopeSource(ms.endpoint, token)
    repo = PRIVATE if token else REPO
    snap = src.snapshot(repo, "master")

    def raise_status(status: int, headers: dict[str, str], body: bytes, url: str) -> NoReturn:
        src.raise_for_status(status, headers, body, url, repo, "master")

    state = StateDir(tmp_path)
    state.ensure()
    settings = Settings(connections=1, retry=RetryPolicy(retries=2, backoff=0.0))
    t = Transfer(settings, src.pool(), state, Progress(quiet=True), raise_status)
    rf = snap.files["model.safetensors"]
    try:
        done = t.download(Target(rf.name, src.file_url(snap, rf.name), rf.size, rf.identity, rf.sha256))
    except Exception as exc:  # reported to the assertion
        return False, f"{type(exc).__name__}: {exc}"
    finally:
        t.pool.close()
    return done.path.read_bytes() == FILES["model.safetensors"], ""


def test_transfer_resumes_through_the_storage_redirect_without_the_token(ms: ModelScopeServer,
                                                                         tmp_path: Path) -> None:
    ms.faults.add(cut_after=50_000, path_suffix="model.safetensors", host="storage", times=1)
    ok, why = _transfer_once(ms, tmp_path, GRANTED)
    assert ok, why
    gets = ms.file_gets("model.safetensors", host="storage")
    assert [(g.range, g.status) for g in gets] == [(None, 200), (f"bytes=50000-{len(FILES['model.safetensors']) - 1}",
                                                                  206)]
    assert ms.bytes_served("model.safetensors") == len(FILES["model.safetensors"])
    assert all("authorization" not in g.headers and "cookie" not in g.headers for g in gets)
    assert all(r.headers.get("cookie") == f"m_session_id={GRANTED}" for r in ms.file_gets(host="api"))


def test_transfer_takes_a_200_with_content_range_as_a_ranged_answer(ms: ModelScopeServer, tmp_path: Path) -> None:
    ms.range_as_200 = True
    ms.faults.add(cut_after=50_000, path_suffix="model.safetensors", host="storage", times=1)
    ok, why = _transfer_once(ms, tmp_path, None)
    assert ok, why
    assert ms.bytes_served("model.safetensors") == len(FILES["model.safetensors"])
