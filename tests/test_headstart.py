"""The head start (headstart.py): the weights flow before huggingface_hub's listing answers, and nothing it
fetched is kept unless that listing agrees."""

from __future__ import annotations

import hashlib
import json
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from checkpoints import shard_files, vit_repo_files
from conftest import GRANTED, TINY, start
from dinov3_fetcher import _headstart as headstart
from dinov3_fetcher import fetch_dinov3, validate_dinov3
from dinov3_fetcher._errors import AuthenticationError, NotDinov3Error
from dinov3_fetcher._layout import INDEX
from dinov3_fetcher._registry import DEFAULT_MODEL, variant_for
from helpers import socket_queues
from hub_server import HubServer

MODEL = "model.safetensors"
PREPROCESSOR = "preprocessor_config.json"
MiB = 1 << 20


def _partials(dino_root: Path) -> list[str]:
    partial = dino_root / ".dinov3-fetcher" / "partial"
    return sorted(p.name for p in partial.iterdir()) if partial.is_dir() else []


def _wait_for(pred: Callable[[], bool]) -> None:
    """Until ``pred()`` holds (a test whose event never comes ends at the pytest timeout)."""
    while not pred():
        time.sleep(0.01)


def _head_seen(hub: HubServer, name: str) -> bool:
    return any(r.method == "HEAD" and r.path.endswith("/" + name) for r in list(hub.requests))


def _cdn_seen(hub: HubServer, name: str) -> bool:
    return any(r.host == "cdn" and r.path.partition("?")[0].endswith("/" + name) for r in list(hub.requests))


def _hold_listing_until(hub: HubServer, *names: str) -> list[bool]:
    """Hold model_info back until the CDN has been asked for each file; what it saw, per call."""
    seen: list[bool] = []

    def hook() -> None:
        _wait_for(lambda: all(_cdn_seen(hub, n) for n in names))
        seen.append(all(_cdn_seen(hub, n) for n in names))

    hub.model_info_hook = hook
    return seen


def _resolve_commits(hub: HubServer, name: str) -> set[str]:
    """The commits of the hub's resolve requests for a file: the head start's HEAD (its GETs then go straight to
    the HEAD's Location) and the main path's GETs, at the listing's commit."""
    return {r.path.split("/resolve/")[1].split("/")[0] for r in list(hub.requests)
            if r.host == "hub" and "/resolve/" in r.path and r.method in ("GET", "HEAD")
            and r.path.partition("?")[0].endswith("/" + name)}


def test_weights_flow_while_the_listing_is_held_back(hub: HubServer, dino_root: Path) -> None:
    files = vit_repo_files(hidden=256, intermediate=1024, layers=4)  # ~13 MB
    hub.add_repo(TINY, files)
    seen = _hold_listing_until(hub, MODEL)
    fetch_dinov3(dino_root, TINY)
    assert seen == [True]  # the weights reached the CDN while model_info was still held back
    assert hub.bytes_served(MODEL) == len(files[MODEL])  # once: the early download was adopted
    assert len(hub.file_gets("/config.json")) == 1  # and the config it read too
    assert (dino_root / MODEL).read_bytes() == files[MODEL]
    assert validate_dinov3(dino_root) and _partials(dino_root) == []


def test_the_config_the_head_start_asked_for_is_awaited_not_asked_again(hub: HubServer, dino_root: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from dinov3_fetcher._headstart import HeadStart

    files = vit_repo_files(hidden=128, intermediate=512, layers=2)
    hub.add_repo(TINY, files)
    # the head start's config.json: its answer held after the first byte, and the listing held until then, so
    # the main path needs config.json while that answer is still on its way
    hub.faults.add(path_suffix="/config.json", times=1, pause_at=1)

    def listing() -> None:
        hub.paused.wait()

    hub.model_info_hook = listing

    class AnswersWhenAwaited(threading.Event):
        """The head start's "config.json is in": the Hub lets the held answer go once the main path waits for it."""

        def wait(self, timeout: float | None = None) -> bool:
            hub.resume.set()
            return super().wait(timeout)

    init = HeadStart.__init__

    def init_(self: HeadStart, *args: object, **kwargs: object) -> None:
        init(self, *args, **kwargs)
        self.config_known = AnswersWhenAwaited()

    monkeypatch.setattr(HeadStart, "__init__", init_)
    fetch_dinov3(dino_root, TINY)
    assert len(hub.file_gets("/config.json")) == 1  # the head start's, whole
    assert hub.resume.is_set()  # the main path waited for it
    assert (dino_root / "config.json").read_bytes() == files["config.json"]
    assert validate_dinov3(dino_root)


def test_a_config_the_head_start_failed_to_get_is_asked_again_by_the_main_path(hub: HubServer,
                                                                              dino_root: Path) -> None:
    files = vit_repo_files(hidden=128, intermediate=512, layers=2)
    hub.add_repo(TINY, files)
    hub.faults.add(path_suffix="/config.json", times=1, status=500)  # the head start's request
    fetch_dinov3(dino_root, TINY)
    assert [r.status for r in hub.file_gets("/config.json")] == [500, 200]  # the main path's, once that one failed
    assert (dino_root / "config.json").read_bytes() == files["config.json"]


def test_sharded_weights_get_a_head_start_too(hub: HubServer, dino_root: Path) -> None:
    files = shard_files(vit_repo_files(hidden=128, intermediate=512, layers=4), 3)
    hub.add_repo(TINY, files)
    shards = sorted(n for n in files if n.startswith("model-"))
    assert len(shards) == 3
    seen = _hold_listing_until(hub, *shards[:2])  # two files at a time
    fetch_dinov3(dino_root, TINY)
    assert seen == [True]
    for name in shards:
        assert hub.bytes_served(name) == len(files[name])
        assert (dino_root / name).read_bytes() == files[name]
    assert len(hub.file_gets("/model.safetensors.index.json")) == 1
    assert validate_dinov3(dino_root)


def _registry_knows_shards(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    """The registry says TINY is sharded on the Hub in ``count`` shards (as it says of the 7B: 6)."""
    default = variant_for(DEFAULT_MODEL)
    assert default is not None
    known = replace(default, repo_id=TINY, sharded=True, shards=count)
    monkeypatch.setattr(headstart, "variant_for", lambda repo_id: known if repo_id == TINY else None)


def _three_shards(hub: HubServer, monkeypatch: pytest.MonkeyPatch,
                  registry_says: int) -> tuple[dict[str, bytes], list[str]]:
    """TINY as 3 shards on the Hub, the registry saying ``registry_says`` shards; its files and shard names."""
    files = shard_files(vit_repo_files(hidden=128, intermediate=512, layers=4), 3)
    hub.add_repo(TINY, files)
    _registry_knows_shards(monkeypatch, registry_says)
    return files, sorted(n for n in files if n.startswith("model-"))


def _resolve_heads(hub: HubServer, name: str, at: str | None = None) -> int:
    """The hub's HEADs of ``name``'s resolve (at the revision ``at`` only, or any)."""
    return sum(1 for r in list(hub.requests) if r.host == "hub" and r.method == "HEAD"
               and "/resolve/" in r.path and r.path.partition("?")[0].endswith("/" + name)
               and (at is None or f"/resolve/{at}/" in r.path))


def test_shards_the_registry_names_are_asked_with_the_index_not_after_it(
        hub: HubServer, dino_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files, shards = _three_shards(hub, monkeypatch, 3)
    monkeypatch.setenv("HF_TOKEN", GRANTED)
    hub.faults.add(path_suffix="/" + INDEX, host="hub", pause_at=0, times=1)  # the index's body is held
    seen = _hold_listing_until(hub, shards[0])  # the main path takes the index the head start read
    held: list[bool] = []

    def watch() -> None:  # while the index is held, the shards' HEADs come (or never: 30 s, then it goes on)
        try:
            deadline = time.monotonic() + 30
            hub.paused.wait(30)
            while not all(_resolve_heads(hub, n, at="main") for n in shards) and time.monotonic() < deadline:
                time.sleep(0.01)
            held.append(hub.paused.is_set() and all(_resolve_heads(hub, n, at="main") for n in shards))
        finally:
            hub.resume.set()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    fetch_dinov3(dino_root, TINY)
    watcher.join()
    assert held == [True] and seen == [True]
    assert _resolve_heads(hub, MODEL) == 0  # the single file is not asked where the shards are known
    for name in shards:
        assert _resolve_heads(hub, name) == 1  # asked once, at the revision, with the index
        assert hub.bytes_served(name) == len(files[name])
        assert (dino_root / name).read_bytes() == files[name]
    assert len(hub.file_gets("/" + INDEX)) == 1
    assert validate_dinov3(dino_root)


def test_shards_named_otherwise_than_the_registry_says_are_fetched_as_the_index_names_them(
        hub: HubServer, dino_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files, shards = _three_shards(hub, monkeypatch, 2)  # model-0000K-of-00002: not on the Hub
    monkeypatch.setenv("HF_TOKEN", GRANTED)
    seen = _hold_listing_until(hub, *shards[:2])  # the head start fetches them: the main path takes them over
    fetch_dinov3(dino_root, TINY)
    assert seen == [True]
    assert {_resolve_heads(hub, f"model-0000{k}-of-00002.safetensors", at="main") for k in (1, 2)} == {1}  # 404
    for name in shards:
        assert _resolve_heads(hub, name) == 1 and _resolve_heads(hub, name, at="main") == 0  # at the commit
        assert hub.bytes_served(name) == len(files[name])  # each once, in whole
        assert (dino_root / name).read_bytes() == files[name]
    assert _partials(dino_root) == []
    assert validate_dinov3(dino_root)


def test_without_a_token_the_shards_the_registry_names_wait_for_the_index(
        hub: HubServer, dino_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files, shards = _three_shards(hub, monkeypatch, 3)  # a gated repo refuses them all without a token: not asked
    fetch_dinov3(dino_root, TINY)
    for name in shards:
        assert _resolve_heads(hub, name) == 1 and _resolve_heads(hub, name, at="main") == 0
        assert (dino_root / name).read_bytes() == files[name]
    assert validate_dinov3(dino_root)


def test_a_branch_that_moves_under_the_head_start_gives_the_new_commit(hub: HubServer, dino_root: Path) -> None:
    old = vit_repo_files(seed=1, hidden=128, intermediate=512, layers=2)
    new = vit_repo_files(seed=2, hidden=128, intermediate=512, layers=2)
    assert old[MODEL] != new[MODEL]
    hub.add_repo(TINY, old)
    moved: list[str] = []

    def move() -> None:  # once the head start has asked the CDN for the old weights, main moves on
        if not moved:
            _wait_for(lambda: _cdn_seen(hub, MODEL))
            moved.append(hub.add_commit(TINY, {MODEL: new[MODEL]}))

    hub.model_info_hook = move
    first = hub.repos[TINY].refs["main"]
    path = fetch_dinov3(dino_root, TINY)
    # the head start asked at the revision (the old commit then) and went for the old weights at the CDN
    assert _resolve_commits(hub, MODEL) == {"main", moved[0]}
    old_sha = hashlib.sha256(old[MODEL]).hexdigest()
    assert any(r.host == "cdn" and f"/{old_sha}/" in r.path for r in list(hub.requests))
    assert first != moved[0]
    assert (path / MODEL).read_bytes() == new[MODEL]  # never published
    manifest = json.loads((path / ".dinov3-fetcher" / "manifest.json").read_bytes())
    assert manifest["commit"] == moved[0]
    assert validate_dinov3(path)
    assert _partials(path) == []  # the early download of the old weights is not left behind


def test_a_branch_that_moves_with_the_same_weights_downloads_them_once(hub: HubServer, dino_root: Path) -> None:
    files = vit_repo_files(hidden=128, intermediate=512, layers=2)
    hub.add_repo(TINY, files)
    moved: list[str] = []

    def move() -> None:  # once the head start has asked the CDN for the weights, main moves on
        if not moved:
            _wait_for(lambda: _cdn_seen(hub, MODEL))
            moved.append(hub.add_commit(TINY, {"README.md": b"# a new model card\n"}))

    hub.model_info_hook = move
    first = hub.repos[TINY].refs["main"]
    fetch_dinov3(dino_root, TINY)
    # only the head start's HEAD (at the revision, when it still named the first commit): same sha256 at the new
    # commit, so the early download is kept and the main path asks nothing more
    assert _resolve_commits(hub, MODEL) == {"main"} and first != moved[0]
    assert hub.bytes_served(MODEL) == len(files[MODEL])
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
    # nothing big is fetched before the main path refuses it: the weights' HEAD (asked beside config.json, one
    # round trip for both) is all the head start sent for them
    assert hub.file_gets(MODEL) == []
    assert not any(r.host == "cdn" for r in hub.requests)


def test_gated_repo_the_head_start_uses_the_token_on_the_hub_only(hub: HubServer, dino_root: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    files = vit_repo_files(hidden=128, intermediate=512, layers=2)
    hub.add_repo(TINY, files, gated=True)
    hub.grant(TINY, GRANTED)
    seen = _hold_listing_until(hub, MODEL)
    monkeypatch.setenv("HF_TOKEN", GRANTED)
    fetch_dinov3(dino_root, TINY)
    assert seen == [True]  # the head start ran, with the token
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


def test_ctrl_c_during_a_sharded_head_start_exits_promptly_and_resumes(hub: HubServer, dino_root: Path) -> None:
    files = shard_files(vit_repo_files(hidden=256, intermediate=1024, layers=4), 3)  # 3 x ~4.5 MB
    hub.add_repo(TINY, files)
    shards = sorted(n for n in files if n.startswith("model-"))
    hub.faults.add(path_suffix=".safetensors", host="cdn", pause_at=3 * MiB)  # every shard's body waits there
    # the fetch's first request after the listing: held, so the Ctrl-C lands after the listing confirmed the
    # head start (before that, by design, nothing the head start fetched is kept)
    hub.faults.add(path_suffix=PREPROCESSOR, pause_at=100)
    proc = start(dino_root, DINOV3_FETCHER_TIMEOUT="600")  # no read gives up on its own
    port = int(hub.cdn_endpoint.rsplit(":", 1)[1])

    def listed_paused_and_read() -> bool:  # each stream read its 3 MiB, so wrote its first 1 MiB reads
        gets = [r for r in hub.file_gets(".safetensors") if r.host == "cdn"]
        return (len(gets) >= 2 and all(r.body_bytes == 3 * MiB for r in gets) and not socket_queues(port)
                and [r.body_bytes for r in hub.file_gets(PREPROCESSOR)] == [100])

    _wait_for(lambda: listed_paused_and_read() or proc.poll() is not None)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate()  # it exits while the server still holds every body: it waits for no read
    assert not hub.resume.is_set()
    assert proc.returncode == 130 and "resumes" in err and "Traceback" not in err, err
    served = {n: hub.bytes_served(n) for n in shards}
    assert sum(served.values()) < sum(len(files[n]) for n in shards)  # it stopped: not everything was sent

    hub.resume.set()
    hub.faults.clear()
    hub.clear()
    fetch_dinov3(dino_root, TINY)
    for n in shards:
        assert (dino_root / n).read_bytes() == files[n]
    assert sum(hub.bytes_served(n) for n in shards) < sum(len(files[n]) for n in shards)  # resumed, not redone


def _interrupt_the_import(dino_root: Path, monkeypatch: pytest.MonkeyPatch, when: Callable[[], bool]) -> None:
    """Fetch with a Ctrl-C in huggingface_hub's import, once ``when`` holds; then no head start thread is left."""
    import threading

    from dinov3_fetcher._errors import FetchInterrupted
    from dinov3_fetcher._sources import hf

    def interrupted_import() -> None:
        _wait_for(when)
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(hf, "load_api", interrupted_import)
        with pytest.raises((FetchInterrupted, KeyboardInterrupt)):
            fetch_dinov3(dino_root, TINY)
    _wait_for(lambda: not any(t.name.startswith("head-start") for t in threading.enumerate()))
    assert not any(t.name.startswith("head-start") for t in threading.enumerate())


def test_ctrl_c_while_huggingface_hub_imports_stops_the_head_start(hub: HubServer, dino_root: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # The head start's resolve requests go out while HfApi imports; a Ctrl-C in that import must stop it
    # there, not leave it downloading in the background of a library caller (which then downloads twice).
    import threading

    files = vit_repo_files(hidden=128, intermediate=512, layers=2)
    hub.add_repo(TINY, files)
    # a short round trip, whatever a loaded machine makes of localhost's (the streams wait for the import)
    monkeypatch.setattr(headstart, "QUICK_RTT", 3600.0)

    # the head start knows the weights: its worker for them waits for this import to end
    _interrupt_the_import(dino_root, monkeypatch,
                          lambda: any(t.name == f"head-start-{MODEL}" for t in threading.enumerate()))
    assert hub.bytes_served(MODEL) == 0  # no stream started after the interrupt
    fetch_dinov3(dino_root, TINY)  # the same process again: the weights come once
    assert hub.bytes_served(MODEL) == len(files[MODEL])
    assert (dino_root / MODEL).read_bytes() == files[MODEL]


def test_on_a_long_round_trip_the_streams_go_on_during_the_import_and_a_ctrl_c_there_stops_them(
        hub: HubServer, dino_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Where the round trip is long (here: any, the threshold moved below the emulator's), the weights' streams
    # do not wait for HfApi's import; a Ctrl-C in that import stops them there, and the next fetch resumes them.
    monkeypatch.setattr(headstart, "QUICK_RTT", 0.0)

    files = vit_repo_files(hidden=256, intermediate=1024, layers=4)  # ~13 MB: one stream
    hub.add_repo(TINY, files)
    size, held = len(files[MODEL]), 8 * MiB
    hub.faults.add(path_suffix=MODEL, host="cdn", pause_at=held)  # the weights' body waits there
    port = int(hub.cdn_endpoint.rsplit(":", 1)[1])

    def written() -> int:
        return sum(p.stat().st_size for p in (dino_root / ".dinov3-fetcher" / "partial").glob("*/data"))

    # the head start's stream of the weights has read and written what the server sent: the import ends there
    _interrupt_the_import(dino_root, monkeypatch, lambda: [r.body_bytes for r in hub.file_gets(MODEL)] == [held]
                          and not socket_queues(port) and written() == held)
    hub.faults.clear()
    hub.resume.set()
    hub.clear()
    fetch_dinov3(dino_root, TINY)  # the same process again: it resumes what the head start had written
    assert size - held <= hub.bytes_served(MODEL) < size
    assert (dino_root / MODEL).read_bytes() == files[MODEL]
