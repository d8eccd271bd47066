"""The ModelScope emulator (tests/modelscope_server.py) against the real client, modelscope_hub 0.5.1."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# modelscope_hub reads its retry caps at import: no multi-second waits between the tests' retries.
os.environ.setdefault("MODELSCOPE_DOWNLOAD_RETRY_MAX_DELAY_SECONDS", "1")
os.environ.setdefault("MODELSCOPE_REPO_TREE_PAGE_RETRY_MAX_DELAY_SECONDS", "1")

import modelscope_hub
from modelscope_hub import HubApi, HubConfig

from checkpoints import vit_repo_files
from helpers import sha256
from modelscope_server import CODE_NOT_FOUND, ModelScopeServer

REPO = "facebook/dinov3-vits16-pretrain-lvd1689m"
GRANTED, NOTGRANTED = "ms-valid-granted", "ms-valid-notgranted"
FILES = vit_repo_files()
WEIGHTS = FILES["model.safetensors"]


@pytest.fixture
def ms(ms: ModelScopeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModelScopeServer:
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "ms_cache"))
    # a module constant, not an env knob: the 1 s pause before refetching a file that failed its sha256
    monkeypatch.setattr(modelscope_hub._download, "DOWNLOAD_INTEGRITY_RETRY_BACKOFF", 0.0)
    ms.add_repo(REPO, FILES)
    ms.add_repo("facebook/private", FILES, private=True)
    ms.grant("facebook/private", GRANTED)
    return ms


def api(token: str | None = None) -> HubApi:
    """A client configured as a user would: MODELSCOPE_ENDPOINT, MODELSCOPE_HOME, an optional token."""
    return HubApi(HubConfig(token=token if token is not None else ""))


def test_snapshot_download_lfs_via_storage_git_files_direct(ms: ModelScopeServer, tmp_path: Path) -> None:
    root = api().download_repo(REPO, "model", local_dir=tmp_path / "out")
    got = {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    got = {k: v for k, v in got.items() if not k.startswith((".cache/", ".download_state/", ".msc", ".mv"))}
    assert got == FILES
    assert len(ms.listing_gets(REPO)) == 1
    # the weights went through the storage host after a 302, the small git files came from the API directly
    assert ms.bytes_served("model.safetensors", host="storage") == len(WEIGHTS)
    assert ms.bytes_served("model.safetensors", host="api") == 0
    assert [r.status for r in ms.file_gets("model.safetensors", host="api")] == [302]
    assert ms.bytes_served("/config.json", host="api") == len(FILES["config.json"])
    assert ms.file_gets(host="storage", path_suffix="config.json") == []
    # it asked for the default revision, master, and probed the region once
    assert "Revision=master" in ms.listing_gets(REPO)[0].path
    assert sum(r.path.endswith("/internalAccelerationInfo") for r in ms.requests) == 1


def test_listing_envelope_as_the_client_reads_it(ms: ModelScopeServer) -> None:
    files = api().list_repo_files(REPO, "model")
    assert sorted(f.path for f in files) == sorted(FILES)
    names = sorted(f["Path"] for f in api().legacy.list_repo_files(REPO, "model"))
    assert names == sorted(FILES)


def test_one_file_download(ms: ModelScopeServer, tmp_path: Path) -> None:
    path = api().download_file(REPO, "model", "model.safetensors", local_dir=tmp_path / "one",
                               expected_sha256=sha256(WEIGHTS), file_size=len(WEIGHTS))
    assert path.read_bytes() == WEIGHTS
    assert ms.listing_gets() == []


def _partial(tmp_path: Path, name: str, data: bytes, n: int) -> Path:
    target = tmp_path / "one" / name
    target.parent.mkdir(parents=True, exist_ok=True)
    (target.parent / (name + ".incomplete")).write_bytes(data[:n])
    return target


@pytest.mark.parametrize("range_as_200", [False, True])
def test_resume_of_a_partial_from_storage(ms: ModelScopeServer, tmp_path: Path, range_as_200: bool) -> None:
    ms.range_as_200 = range_as_200  # 200 + Content-Range for an honoured Range, as some ModelScope storage answers
    n = len(WEIGHTS) // 3
    _partial(tmp_path, "model.safetensors", WEIGHTS, n)
    path = api().download_file(REPO, "model", "model.safetensors", local_dir=tmp_path / "one",
                               expected_sha256=sha256(WEIGHTS), file_size=len(WEIGHTS))
    assert path.read_bytes() == WEIGHTS
    (get,) = ms.file_gets("model.safetensors", host="storage")
    assert get.range == f"bytes={n}-"
    assert get.status == (200 if range_as_200 else 206)
    assert ms.bytes_served("model.safetensors") == len(WEIGHTS) - n  # resumed, not restarted


def test_git_file_ignores_range_and_the_client_restarts(ms: ModelScopeServer, tmp_path: Path) -> None:
    data = FILES["config.json"]
    _partial(tmp_path, "config.json", data, 10)
    path = api().download_file(REPO, "model", "config.json", local_dir=tmp_path / "one",
                               expected_sha256=sha256(data), file_size=len(data))
    assert path.read_bytes() == data
    (get,) = ms.file_gets("/config.json")
    assert get.range == "bytes=10-" and get.status == 200 and get.body_bytes == len(data)


def test_cut_then_resume_within_one_call(ms: ModelScopeServer, tmp_path: Path) -> None:
    ms.faults.add(cut_after=4096, path_suffix="model.safetensors", host="storage", times=1)
    path = api().download_file(REPO, "model", "model.safetensors", local_dir=tmp_path / "one",
                               expected_sha256=sha256(WEIGHTS), file_size=len(WEIGHTS))
    assert path.read_bytes() == WEIGHTS
    gets = ms.file_gets("model.safetensors", host="storage")
    assert [g.range for g in gets] == [None, "bytes=4096-"]
    assert ms.bytes_served("model.safetensors") == len(WEIGHTS)


def test_corrupt_byte_is_caught_by_the_listing_sha256(ms: ModelScopeServer, tmp_path: Path) -> None:
    ms.faults.add(corrupt_at=100, path_suffix="model.safetensors", times=1)
    root = api().download_repo(REPO, "model", local_dir=tmp_path / "out")
    assert (root / "model.safetensors").read_bytes() == WEIGHTS
    assert len(ms.file_gets("model.safetensors", host="storage")) == 2  # bad copy discarded, fetched again


def test_unknown_repo(ms: ModelScopeServer, tmp_path: Path) -> None:
    with pytest.raises(modelscope_hub.NotExistError):
        api().download_repo("facebook/nope", "model", local_dir=tmp_path / "out")
    with pytest.raises(modelscope_hub.NotExistError):
        api().download_file("facebook/nope", "model", "config.json", local_dir=tmp_path / "one")


def test_unknown_file_carries_the_business_code(ms: ModelScopeServer, tmp_path: Path) -> None:
    with pytest.raises(modelscope_hub.NotExistError) as err:
        api().download_file(REPO, "model", "nope.json", local_dir=tmp_path / "one")
    assert err.value.status_code == 404
    assert f'"Code": {CODE_NOT_FOUND}' in str(err.value.response_body).replace("'", '"')


def test_private_repo_without_token_or_access(ms: ModelScopeServer, tmp_path: Path) -> None:
    with pytest.raises(modelscope_hub.AuthenticationError):
        api().download_repo("facebook/private", "model", local_dir=tmp_path / "a")
    with pytest.raises(modelscope_hub.PermissionDeniedError):
        api(NOTGRANTED).download_repo("facebook/private", "model", local_dir=tmp_path / "b")
    ms.hide_private = True
    with pytest.raises(modelscope_hub.NotExistError):
        api().download_repo("facebook/private", "model", local_dir=tmp_path / "c")


def test_unknown_token_counts_as_anonymous(ms: ModelScopeServer, tmp_path: Path) -> None:
    root = api("ms-bogus").download_repo(REPO, "model", local_dir=tmp_path / "out")
    assert (root / "model.safetensors").read_bytes() == WEIGHTS


def test_unknown_revision_is_an_empty_snapshot(ms: ModelScopeServer, tmp_path: Path) -> None:
    root = api().download_repo(REPO, "model", revision="v9.9", local_dir=tmp_path / "out")
    assert [p for p in root.rglob("*") if p.is_file() and p.name in FILES] == []
    assert ms.file_gets() == []


def test_branches_tags_and_commits(ms: ModelScopeServer, tmp_path: Path) -> None:
    first = ms.repos[REPO].branches["master"]
    ms.add_tag(REPO, "v1.0", "master")
    second = ms.add_commit(REPO, {"config.json": b'{"changed": true}'})
    files = {f["Path"]: f for f in api().legacy.list_repo_files(REPO, "model")}
    assert files["config.json"]["Revision"] == second
    assert files["model.safetensors"]["Revision"] == first  # the commit that last changed the file
    old = api().download_repo(REPO, "model", revision="v1.0", local_dir=tmp_path / "v1")
    assert (old / "config.json").read_bytes() == FILES["config.json"]
    pinned = api().download_repo(REPO, "model", revision=first, local_dir=tmp_path / "c1")
    assert (pinned / "config.json").read_bytes() == FILES["config.json"]
    branches, tags = api().legacy.list_revisions_detail(REPO, "model")
    assert [b["Revision"] for b in branches] == ["master"] and [t["Revision"] for t in tags] == ["v1.0"]


def test_token_sent_both_ways_and_only_to_the_api(ms: ModelScopeServer, tmp_path: Path) -> None:
    root = api(GRANTED).download_repo("facebook/private", "model", local_dir=tmp_path / "out")
    assert (root / "model.safetensors").read_bytes() == WEIGHTS
    (listing,) = ms.listing_gets("facebook/private")
    assert listing.headers["authorization"] == f"Bearer {GRANTED}"
    assert f"m_session_id={GRANTED}" in listing.headers["cookie"]
    storage = [r for r in ms.requests if r.host == "storage"]
    assert storage and all("authorization" not in r.headers and "cookie" not in r.headers for r in storage)
    assert all(GRANTED not in str(r.headers) for r in storage)


def test_saved_login_is_the_cookie_jar(ms: ModelScopeServer, tmp_path: Path) -> None:
    HubConfig().save_token(GRANTED)  # what 'modelscope login' writes: a pickled jar under MODELSCOPE_HOME
    assert (tmp_path / "ms_home" / "credentials" / "cookies").is_file()
    root = HubApi().download_repo("facebook/private", "model", local_dir=tmp_path / "out")
    assert (root / "config.json").read_bytes() == FILES["config.json"]


def test_listing_429_retry_after_then_503(ms: ModelScopeServer, tmp_path: Path) -> None:
    ms.faults.add(status=429, retry_after="0", path_suffix="repo/files", times=1)
    ms.faults.add(status=503, retry_after="0", path_suffix="repo/files", times=1, after=1)
    root = api().download_repo(REPO, "model", local_dir=tmp_path / "out")
    assert (root / "config.json").read_bytes() == FILES["config.json"]
    assert [r.status for r in ms.listing_gets(REPO)] == [429, 503, 200]


def test_storage_rejects_unsigned_urls(ms: ModelScopeServer) -> None:
    import urllib.request

    blob_sha = sha256(WEIGHTS)
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{ms.storage_endpoint}/lfs/{blob_sha}/model.safetensors", timeout=5)
    assert err.value.code == 404


def test_reset_then_resume(ms: ModelScopeServer, tmp_path: Path) -> None:
    ms.faults.add(cut_after=8192, reset=True, path_suffix="model.safetensors", host="storage", times=1)
    path = api().download_file(REPO, "model", "model.safetensors", local_dir=tmp_path / "one",
                               expected_sha256=sha256(WEIGHTS), file_size=len(WEIGHTS))
    assert path.read_bytes() == WEIGHTS
    gets = ms.file_gets("model.safetensors", host="storage")
    assert len(gets) == 2 and gets[1].range is not None and gets[1].range.startswith("bytes=")


def test_stall_then_continue(ms: ModelScopeServer, tmp_path: Path) -> None:
    ms.faults.add(stall_after=1000, stall_seconds=0.2, path_suffix="model.safetensors", times=1)
    path = api().download_file(REPO, "model", "model.safetensors", local_dir=tmp_path / "one")
    assert path.read_bytes() == WEIGHTS
    assert ms.bytes_served("model.safetensors") == len(WEIGHTS)


@pytest.mark.parametrize("linked_etag", [False, True])
def test_linked_etag_is_the_only_check_of_a_lone_file(ms: ModelScopeServer, tmp_path: Path,
                                                      linked_etag: bool) -> None:
    ms.linked_etag = linked_etag
    ms.faults.add(corrupt_at=100, path_suffix="model.safetensors", times=1)
    path = api().download_file(REPO, "model", "model.safetensors", local_dir=tmp_path / "one")
    # without a hash to check (no listing, no X-Linked-ETag) the client keeps the corrupt copy
    assert (path.read_bytes() == WEIGHTS) is linked_etag
    assert len(ms.file_gets("model.safetensors", host="storage")) == (2 if linked_etag else 1)
