"""The head start (headstart.py): the weights flow before huggingface_hub's listing answers, and nothing it
fetched is kept unless that listing agrees."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from checkpoints import shard_files, vit_repo_files
from conftest import GRANTED, TINY
from dinov3_fetcher import fetch_dinov3, validate_dinov3
from dinov3_fetcher.errors import AuthenticationError, NotDinov3Error
from hub_server import HubServer

MODEL = "model.safetensors"


def _partials(dino_root: Path) -> list[str]:
    partial = dino_root / ".dinov3-fetcher" / "partial"
    return sorted(p.name for p in partial.iterdir()) if partial.is_dir() else []


def _wait_for(pred: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred() and time.monotonic() < deadline:
        time.sleep(0.01)


def _head_seen(hub: HubServer, name: str) -> bool:
    return any(r.method == "HEAD" and r.path.endswith("/" + name) for r in list(hub.requests))


def test_weights_flow_while_the_listing_is_held_back(hub: HubServer, dino_root: Path) -> None:
    files = vit_repo_files(hidden=256, intermediate=1024, layers=4)  # ~13 MB
    hub.add_repo(TINY, files)
    hub.model_info_hook = lambda: time.sleep(1.0)
    fetch_dinov3(dino_root, TINY)
    info = [r for r in hub.requests if r.path.startswith(f"/api/models/{TINY}")]
    cdn = [r for r in hub.file_gets(MODEL) if r.host == "cdn"]
    assert info and cdn
    assert cdn[0].t < info[0].t + 1.0  # the weights reached the CDN while model_info was still held back
    assert hub.bytes_served(MODEL) == len(files[MODEL])  # once: the early download was adopted
    assert len(hub.file_gets("/config.json")) == 1  # and the config it read too
    assert (dino_root / MODEL).read_bytes() == files[MODEL]
    assert validate_dinov3(dino_root) and _partials(dino_root) == []


def test_sharded_weights_get_a_head_start_too(hub: HubServer, dino_root: Path) -> None:
    files = shard_files(vit_repo_files(hidden=128, intermediate=512, layers=4), 3)
    hub.add_repo(TINY, files)
    hub.model_info_hook = lambda: time.sleep(1.0)
    fetch_dinov3(dino_root, TINY)
    info = [r for r in hub.requests if r.path.startswith(f"/api/models/{TINY}")]
    shards = sorted(n for n in files if n.startswith("model-"))
    assert len(shards) == 3
    for name in shards:
        gets = [r for r in hub.file_gets(name) if r.host == "cdn"]
        assert gets and gets[0].t < info[0].t + 1.0, name
        assert hub.bytes_served(name) == len(files[name])
        assert (dino_root / name).read_bytes() == files[name]
    assert len(hub.file_gets("/model.safetensors.index.json")) == 1
    assert validate_dinov3(dino_root)


def test_a_branch_that_moves_under_the_head_start_gives_the_new_commit(hub: HubServer, dino_root: Path) -> None:
    old = vit_repo_files(seed=1, hidden=128, intermediate=512, layers=2)
    new = vit_repo_files(seed=2, hidden=128, intermediate=512, layers=2)
    assert old[MODEL] != new[MODEL]
    hub.add_repo(TINY, old)
    moved: list[str] = []

    def move() -> None:  # once the head start has resolved the old weights, main moves on
        if not moved:
            _wait_for(lambda: _head_seen(hub, MODEL))
            moved.append(hub.add_commit(TINY, {MODEL: new[MODEL]}))

    hub.model_info_hook = move
    path = fetch_dinov3(dino_root, TINY)
    assert (path / MODEL).read_bytes() == new[MODEL]  # never the old weights the head start went for
    manifest = json.loads((path / ".dinov3-fetcher" / "manifest.json").read_bytes())
    assert manifest["commit"] == moved[0]
    assert validate_dinov3(path)
    assert _partials(path) == []  # the early download of the old weights is not left behind


def test_a_branch_that_moves_with_the_same_weights_downloads_them_once(hub: HubServer, dino_root: Path) -> None:
    files = vit_repo_files(hidden=128, intermediate=512, layers=2)
    hub.add_repo(TINY, files)
    moved: list[str] = []

    def move() -> None:
        if not moved:
            _wait_for(lambda: _head_seen(hub, MODEL))
            moved.append(hub.add_commit(TINY, {"README.md": b"# a new model card\n"}))

    hub.model_info_hook = move
    fetch_dinov3(dino_root, TINY)
    assert hub.bytes_served(MODEL) == len(files[MODEL])  # same sha256 at the new commit: adopted
    assert (dino_root / "README.md").read_bytes() == b"# a new model card\n"
    manifest = json.loads((dino_root / ".dinov3-fetcher" / "manifest.json").read_bytes())
    assert manifest["commit"] == moved[0]


def test_no_head_start_for_a_repo_that_is_not_dinov3(hub: HubServer, dino_root: Path) -> None:
    files = vit_repo_files(hidden=128, intermediate=512, layers=2)
    cfg = json.loads(files["config.json"])
    cfg["model_type"] = "vit"
    hub.add_repo(TINY, {**files, "config.json": json.dumps(cfg).encode()})
    with pytest.raises(NotDinov3Error):
        fetch_dinov3(dino_root, TINY)
    assert hub.file_gets(MODEL) == []
    assert not any(r.method == "HEAD" and r.path.endswith(MODEL) for r in hub.requests)


def test_gated_repo_the_head_start_uses_the_token_on_the_hub_only(hub: HubServer, dino_root: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    files = vit_repo_files(hidden=128, intermediate=512, layers=2)
    hub.add_repo(TINY, files, gated=True)
    hub.grant(TINY, GRANTED)
    hub.model_info_hook = lambda: time.sleep(0.5)
    monkeypatch.setenv("HF_TOKEN", GRANTED)
    fetch_dinov3(dino_root, TINY)
    info = [r for r in hub.requests if r.path.startswith(f"/api/models/{TINY}")]
    cdn = [r for r in hub.file_gets(MODEL) if r.host == "cdn"]
    assert cdn[0].t < info[0].t + 0.5  # the head start ran, with the token
    assert all("authorization" not in r.headers for r in hub.requests if r.host == "cdn")
    assert all(r.headers.get("authorization") == f"Bearer {GRANTED}" for r in hub.requests if r.host == "hub")


def test_gated_repo_without_a_token_still_says_401_and_fetches_nothing(hub: HubServer, dino_root: Path) -> None:
    hub.add_repo(TINY, vit_repo_files(), gated=True)
    with pytest.raises(AuthenticationError) as info:
        fetch_dinov3(dino_root, TINY)
    assert info.value.status == 401 and "no token was sent" in str(info.value)
    assert [r for r in hub.requests if r.host == "cdn"] == []


def test_an_intact_checkpoint_is_not_fetched_again_by_update(hub: HubServer, dino_root: Path) -> None:
    files = vit_repo_files(hidden=128, intermediate=512, layers=2)
    hub.add_repo(TINY, files)
    fetch_dinov3(dino_root, TINY)
    hub.clear()
    fetch_dinov3(dino_root, TINY, update=True)
    assert hub.file_gets() == []  # the head start checked config.json with a HEAD, and the weights not at all
