"""A fetch never destroys or misreports data:

- files in dino_root it did not put there are adopted (same bytes) or refused (exit 3), never replaced;
- altered bytes of the same size are remembered by ``verify --deep`` and repaired (``--repair``);
- another host's claim is judged by its heartbeat as this process watched it, never by file times;
- links in the state folder (its lock included) are never followed to delete or write outside dino_root;
- published files follow the umask;
- a failed first fetch leaves no empty state folders (nor an empty dino_root) behind.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from checkpoints import shard_files, vit_repo_files
from conftest import TINY, WatchClock, cli_env, start
from dinov3_fetcher import fetch_dinov3, validate_dinov3
from dinov3_fetcher._errors import AuthenticationError, ConfigError, RepositoryNotFoundError
from dinov3_fetcher._state import STALE_AFTER, StateDir
from dinov3_fetcher._verify import verify_dinov3
from helpers import dead_pid, error_line, fetch, sha256, tree
from hub_server import HubServer

FETCHED = ("config.json", "preprocessor_config.json", "model.safetensors", "README.md", "LICENSE.md")
MODEL = "model.safetensors"
MiB = 1 << 20


# -- 5. published files follow the umask ---------------------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o002])
@pytest.mark.parametrize("sharded", [False, True])
def test_published_files_follow_the_umask(hub: HubServer, dino_root: Path, umask: int, sharded: bool) -> None:
    files = vit_repo_files()
    if sharded:
        files = shard_files(files, 2)
    hub.add_repo(TINY, files)
    old = os.umask(umask)
    try:
        fetch_dinov3(dino_root, TINY)
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    published = [p for p in dino_root.iterdir() if p.is_file()] + [dino_root / ".dinov3-fetcher" / "manifest.json"]
    assert len(published) >= 5
    modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in published}
    assert modes == {p.name: oct(want) for p in published}


# -- 19. a failed first fetch leaves nothing behind ----------------------------------------------------------
@pytest.mark.parametrize("root_exists", [False, True])
@pytest.mark.parametrize("case", ["missing-repo", "gated-401"])
def test_a_failed_first_fetch_leaves_no_empty_state_folders(hub: HubServer, tmp_path: Path, case: str,
                                                            root_exists: bool) -> None:
    hub.add_repo(TINY, vit_repo_files(), gated=True)
    dino_root = tmp_path / "new" / "dinov3"
    if root_exists:
        dino_root.mkdir(parents=True)
    with pytest.raises(RepositoryNotFoundError if case == "missing-repo" else AuthenticationError):
        fetch_dinov3(dino_root, "tiny-org/no-such-repo" if case == "missing-repo" else TINY)
    if root_exists:
        assert list(dino_root.iterdir()) == []
    else:
        assert not (tmp_path / "new").exists()  # neither dino_root nor the parent it created


def test_a_failed_fetch_keeps_its_resumable_data(hub: HubServer, dino_root: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from dinov3_fetcher._errors import NetworkError

    files = vit_repo_files(hidden=256, intermediate=1024, layers=4)
    hub.add_repo(TINY, files)
    hub.faults.add(cut_after=3 * MiB, path_suffix=MODEL, host="cdn", times=1)
    monkeypatch.setenv("DINOV3_FETCHER_RETRIES", "0")
    with pytest.raises(NetworkError):
        fetch_dinov3(dino_root, TINY)
    weights = hashlib.sha256(files[MODEL]).hexdigest()  # README and LICENSE, fetched beside, may be cut too
    kept = list((dino_root / ".dinov3-fetcher" / "partial").glob(f"{weights}*/data"))
    assert len(kept) == 1 and kept[0].stat().st_size >= 2 * MiB
    hub.clear()
    fetch_dinov3(dino_root, TINY)
    assert hub.bytes_served(MODEL) <= len(files[MODEL]) - 2 * MiB


# -- 1. a fetch never replaces or removes a file it did not put there ----------------------------------------
def test_dino_root_dot_next_to_the_pipelines_config_is_refused_untouched(hub: HubServer, tiny: dict[str, bytes],
                                                                        tmp_path: Path, run_cli) -> None:
    project = tmp_path / "project"
    project.mkdir()
    config = json.dumps({"train": {"dino_root": ".", "dino_model": TINY, "epochs": 3}}).encode()
    (project / "config.json").write_bytes(config)
    (project / "README.md").write_bytes(b"# my pipeline\n")
    before = tree(project)
    r = run_cli("--config", "config.json", cwd=project)
    assert r.returncode == 3, r.stderr
    assert "config.json" in r.stderr and "README.md" in r.stderr and '"dinov3"' in r.stderr
    assert tree(project) == before  # untouched, and no state folder left behind either
    assert hub.bytes_served(MODEL) == 0  # refused before any weight moved
    # The advice works: a folder of its own.
    config2 = json.dumps({"train": {"dino_root": "dinov3", "dino_model": TINY, "epochs": 3}}).encode()
    (project / "config.json").write_bytes(config2)
    assert run_cli("--config", "config.json", cwd=project).returncode == 0
    assert (project / "config.json").read_bytes() == config2 and validate_dinov3(project / "dinov3")


SHARDED = shard_files(vit_repo_files(), 2)
SHARDED_NAMES = ("model.safetensors.index.json", *sorted(n for n in SHARDED if n.startswith("model-")))


CASES = [(False, n, "none") for n in FETCHED] + [(True, n, "none") for n in (*SHARDED_NAMES, MODEL)] \
    + [(False, n, "other-model") for n in ("README.md", "LICENSE.md")] \
    + [(True, n, "other-model") for n in SHARDED_NAMES]


# ``True, model.safetensors, none``: a name the publish would remove (the repo is sharded), not replace.
# ``other-model``: dino_root holds a checkpoint of ours whose manifest does not list the user's file.
@pytest.mark.parametrize(("sharded", "name", "manifest"), CASES)
def test_a_users_file_under_a_published_name_is_refused_untouched(hub: HubServer, dino_root: Path, sharded: bool,
                                                                  name: str, manifest: str) -> None:
    files = SHARDED if sharded else vit_repo_files()
    hub.add_repo(TINY, files)
    if manifest == "other-model":
        other = {k: v for k, v in vit_repo_files(seed=7).items() if k != name}  # single file, no such name
        hub.add_repo("tiny-org/other", other)
        fetch_dinov3(dino_root, "tiny-org/other")
    dino_root.mkdir(parents=True, exist_ok=True)
    (dino_root / name).write_bytes(b"the user's own bytes\n")
    before = tree(dino_root)
    hub.clear()
    with pytest.raises(ConfigError) as info:
        fetch_dinov3(dino_root, TINY)
    assert info.value.exit_code == 3 and name in info.value.message and "dino_root" in info.value.hint
    if manifest == "none":  # a folder the tool never used: not even a state folder is left in it
        assert tree(dino_root) == before
    assert {k: v for k, v in tree(dino_root).items() if not k.startswith(".dinov3-fetcher/")} == \
        {k: v for k, v in before.items() if not k.startswith(".dinov3-fetcher/")}
    assert not [r for r in hub.file_gets() if r.path.endswith(".safetensors")]  # nothing big was downloaded


def test_a_folder_under_the_weights_name_is_refused_before_any_download(
        hub: HubServer, tiny: dict[str, bytes], dino_root: Path, run_cli: Any) -> None:
    (dino_root / MODEL).mkdir(parents=True)
    (dino_root / MODEL / "x").write_text("x")
    for _ in range(2):
        r = run_cli("--dino-root", str(dino_root), "--model", TINY)
        assert r.returncode == 3, r.stderr
        assert MODEL in error_line(r.stderr)
    assert hub.bytes_served(MODEL) == 0, "the weights were downloaded before the folder was noticed"
    assert (dino_root / MODEL / "x").read_text() == "x"


@pytest.mark.parametrize("sharded", [False, True])
def test_the_listed_bytes_already_there_are_adopted_without_a_download(hub: HubServer, dino_root: Path,
                                                                       sharded: bool) -> None:
    files = SHARDED if sharded else vit_repo_files()
    hub.add_repo(TINY, files)
    dino_root.mkdir(parents=True)
    for name, data in files.items():  # e.g. copied by hand from another machine
        (dino_root / name).write_bytes(data)
    result = fetch(dino_root, TINY)
    assert result.bytes_fetched == 0 and not [r for r in hub.file_gets() if r.path.endswith(".safetensors")]
    assert validate_dinov3(dino_root)
    m = StateDir(dino_root).read_manifest()
    assert m is not None and all(m.files[n].sha256 == sha256(files[n]) for n in m.files)


# -- 2. altered bytes of the same size are repaired ----------------------------------------------------------
def alter(path: Path) -> None:
    """Flip one byte near the end (tensor data, or text): same size, same headers, other bytes."""
    data = bytearray(path.read_bytes())
    data[-2] ^= 0x01
    path.write_bytes(bytes(data))


def downloaded(hub: HubServer) -> set[str]:
    """The files whose bytes the server sent (hub redirects and CDN answers alike)."""
    return {q.path.split("?")[0].rsplit("/", 1)[-1] for q in hub.file_gets() if q.body_bytes}


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dinov3_fetcher", *args], env=cli_env(), capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("names", [(MODEL,), ("README.md",), (MODEL, "LICENSE.md"),
                                   ("model-00002-of-00002.safetensors",)])
@pytest.mark.parametrize("then", ["fetch", "update", "repair", "repair-cli"])
def test_verify_deep_remembers_altered_bytes_and_a_fetch_repairs_exactly_them(hub: HubServer, dino_root: Path,
                                                                              names: tuple[str, ...],
                                                                              then: str) -> None:
    files = SHARDED if names[0].startswith("model-") else vit_repo_files()
    hub.add_repo(TINY, files)
    fetch_dinov3(dino_root, TINY)
    for name in names:
        alter(dino_root / name)
    assert validate_dinov3(dino_root)  # sizes and headers hold: only a deep check can tell
    if then == "repair-cli":  # what a user runs and reads
        r = cli("verify", "--dino-root", str(dino_root), "--deep")
        assert r.returncode == 13, r.stderr
        assert f"dinov3-fetcher --repair --dino-root {dino_root}" in r.stderr
    else:
        assert not verify_dinov3(dino_root, deep=True).ok
    assert not validate_dinov3(dino_root)  # remembered
    m = StateDir(dino_root).read_manifest()
    assert m is not None and m.damaged == sorted(names)
    hub.clear()
    if then == "repair-cli":  # the command the hint names
        r = cli("--repair", "--dino-root", str(dino_root), "--model", TINY)
        assert r.returncode == 0, r.stderr
    else:
        assert not fetch(dino_root, TINY, update=then == "update", repair=then == "repair").cached
    # Exactly those (the head start re-reads a sharded repo's small index on every run that asks the Hub).
    extra = {"model.safetensors.index.json"} if "model.safetensors.index.json" in files else set()
    assert downloaded(hub) - extra == set(names)
    assert hub.bytes_served() == sum(len(files[n]) for n in set(names) | (downloaded(hub) & extra))
    assert m.files and all((dino_root / n).read_bytes() == files[n] for n in m.files)
    assert validate_dinov3(dino_root)
    report = verify_dinov3(dino_root, deep=True)
    assert report.ok and report.manifest is not None and report.manifest.damaged == []


@pytest.mark.parametrize("names", [(MODEL,), ("config.json",), ("README.md", "preprocessor_config.json"), ()])
def test_repair_without_a_verify_rehashes_and_redownloads_only_what_is_wrong(hub: HubServer, tiny: dict[str, bytes],
                                                                             dino_root: Path,
                                                                             names: tuple[str, ...]) -> None:
    fetch_dinov3(dino_root, TINY)
    for name in names:
        data = (dino_root / name).read_bytes()
        if name.endswith(".json"):  # still valid JSON, same size: a newline became a space
            (dino_root / name).write_bytes(data.replace(b"\n", b" ", 1))
        else:
            alter(dino_root / name)
    assert fetch(dino_root, TINY).cached  # a plain fetch trusts the sizes
    hub.clear()
    result = fetch(dino_root, TINY, repair=True)
    assert downloaded(hub) == set(names)
    assert result.bytes_fetched == sum(len(tiny[n]) for n in names)
    assert all((dino_root / n).read_bytes() == tiny[n] for n in FETCHED)


# -- 4. nothing is deleted or written outside dino_root through links in the state folder --------------------
def shared_folder(tmp_path: Path) -> Path:
    """A folder outside dino_root that holds other people's things, shaped like a state folder's contents."""
    shared = tmp_path / "shared"
    for rel, data in {"project-a/data": b"a" * 1000, "project-b/progress.json": b"{}",
                      "partial/x/data": b"x" * 10, "staged/y": b"y", "notes.txt": b"keep me"}.items():
        (shared / rel).parent.mkdir(parents=True, exist_ok=True)
        (shared / rel).write_bytes(data)
    return shared


@pytest.mark.parametrize("link", [".dinov3-fetcher", ".dinov3-fetcher/partial", ".dinov3-fetcher/staged"])
def test_a_state_folder_that_is_a_link_is_refused_and_nothing_outside_changes(
        hub: HubServer, tiny: dict[str, bytes], dino_root: Path, tmp_path: Path, link: str) -> None:
    shared = shared_folder(tmp_path)
    before = tree(shared)
    fetch_dinov3(dino_root, TINY)  # a checkpoint whose next fetch has something to publish and clean up
    hub.add_commit(TINY, {"README.md": b"# changed\n"})
    import shutil

    shutil.rmtree(dino_root / link)
    (dino_root / link).symlink_to(shared, target_is_directory=True)
    with pytest.raises(ConfigError) as info:
        fetch_dinov3(dino_root, TINY, update=True)
    assert info.value.exit_code == 3 and str(dino_root / link) in info.value.message
    assert tree(shared) == before


# Either outcome is safe for a first fetch: it succeeds without following the link, or refuses (exit 3) naming it.
@pytest.mark.parametrize("link", ["partial", "staged", "partial/<id>", "staged/<owner>"])
def test_links_in_the_state_folder_of_a_first_fetch_are_never_followed(
        hub: HubServer, tiny: dict[str, bytes], dino_root: Path, tmp_path: Path, run_cli: Any, link: str) -> None:
    outside = shared_folder(tmp_path)
    state = dino_root / ".dinov3-fetcher"
    (state / "partial").mkdir(parents=True)
    (state / "staged").mkdir()
    if link in ("partial", "staged"):
        (state / link).rmdir()
        (state / link).symlink_to(outside, target_is_directory=True)
    elif link == "partial/<id>":
        (state / "partial" / sha256(tiny[MODEL])).symlink_to(outside, target_is_directory=True)
    else:  # a staged folder named like a dead fetcher's on another host
        (state / "staged" / "otherhost.1").symlink_to(outside, target_is_directory=True)
    before = tree(outside)
    r = run_cli("--dino-root", str(dino_root), "--model", TINY)
    assert tree(outside) == before, "a file outside dino_root was written, moved or deleted"
    if r.returncode == 3:
        assert ".dinov3-fetcher" in error_line(r.stderr)
    else:
        assert r.returncode == 0, r.stderr
        assert (dino_root / MODEL).read_bytes() == tiny[MODEL]


def test_a_lock_that_is_a_link_is_refused_and_its_target_untouched(
        hub: HubServer, tiny: dict[str, bytes], dino_root: Path, tmp_path: Path, run_cli: Any) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("a user's file\n")
    (dino_root / ".dinov3-fetcher").mkdir(parents=True)
    (dino_root / ".dinov3-fetcher" / "lock").symlink_to(victim)
    r = run_cli("--dino-root", str(dino_root), "--model", TINY)
    assert victim.read_text() == "a user's file\n"
    assert r.returncode == 3, r.stderr
    assert "lock" in error_line(r.stderr)


def planted(dino_root: Path, tmp_path: Path, case: str, files: dict[str, bytes]) -> Path:
    """Plant a link in the state folder as someone else could; returns the outside folder it points into."""
    outside = tmp_path / "outside"
    outside.mkdir()
    size, ident = len(files[MODEL]), sha256(files[MODEL])
    progress = json.dumps({"identity": ident, "size": size, "remaining": [[0, size]]}).encode().ljust(4096)
    state = dino_root / ".dinov3-fetcher"
    partial = state / "partial"
    partial.mkdir(parents=True)
    (state / "staged").mkdir()
    if case == "partial-folder":  # partial/<id> -> a folder outside, shaped like a resumable download
        (outside / "data").write_bytes(b"\0" * size)
        (outside / "progress.json").write_bytes(progress)
        (partial / ident).symlink_to(outside, target_is_directory=True)
    elif case in ("data", "progress-tmp"):  # a real partial folder with one link in it
        (partial / ident).mkdir()
        (outside / "victim").write_bytes(b"v" * size)
        if case == "data":
            (partial / ident / "data").symlink_to(outside / "victim")
            (partial / ident / "progress.json").write_bytes(progress)
        else:
            (partial / ident / "data").write_bytes(b"")
            (partial / ident / "progress.json.tmp").symlink_to(outside / "victim")
    elif case == "staged-file":  # a dead fetcher's staged copy that is a link to other bytes of the same size
        from dinov3_fetcher._state import host

        HOST = host()

        (outside / "victim").write_bytes(b"v" * size)
        dead = state / "staged" / f"{HOST}.{dead_pid()}"
        dead.mkdir()
        (dead / f"{ident}.{MODEL}").symlink_to(outside / "victim")
    elif case == "own-staged-folder":  # this process's staged folder, planted as a link
        from dinov3_fetcher._state import owner_tag

        (outside / "keep").write_bytes(b"keep")
        (state / "staged" / owner_tag()).symlink_to(outside, target_is_directory=True)
    return outside


@pytest.mark.parametrize("case", ["partial-folder", "data", "progress-tmp", "staged-file", "own-staged-folder"])
def test_a_link_planted_in_the_state_folder_is_never_followed(hub: HubServer, tiny: dict[str, bytes],
                                                              dino_root: Path, tmp_path: Path, case: str) -> None:
    outside = planted(dino_root, tmp_path, case, tiny)
    before = tree(outside)
    fetch_dinov3(dino_root, TINY)
    assert tree(outside) == before  # not one byte written, moved or deleted there
    for name in FETCHED:
        p = dino_root / name
        assert not p.is_symlink() and p.read_bytes() == tiny[name], name
    assert not [p for p in (dino_root / ".dinov3-fetcher").rglob("*") if p.is_symlink()]  # the links are gone
    assert validate_dinov3(dino_root)


# -- 3. two hosts, no working lock: liveness by heartbeat as watched, never by file times --------------------
@pytest.fixture
def big(hub: HubServer) -> dict[str, bytes]:
    files = vit_repo_files(hidden=256, intermediate=1024, layers=4)  # ~12.6 MB: one connection, one claim
    hub.add_repo(TINY, files)
    return files


def host_claims(dino_root: Path, files: dict[str, bytes], host: str) -> list[Path]:
    partial = dino_root / ".dinov3-fetcher" / "partial"
    return list(partial.glob(f"{sha256(files[MODEL])}.{host}.*")) if partial.is_dir() else []


@pytest.mark.parametrize("case", ["no-progress-record-yet", "clock-skew"])
def test_another_hosts_live_claim_is_never_taken(hub: HubServer, big: dict[str, bytes], dino_root: Path,
                                                 case: str) -> None:
    """Host A stalls mid-download (a slow mirror, a long retry): without a progress record yet, or with one whose
    time looks ancient to host B (clock skew). B must not take A's folder: both succeed with the right bytes."""
    pause_at = MiB if case == "no-progress-record-yet" else 6 * MiB  # past the first record (4 MiB)
    hub.faults.add(path_suffix=MODEL, host="cdn", times=1, pause_at=pause_at)  # A's body waits for hub.resume
    a = start(dino_root, "--json", DINOV3_FETCHER_NO_LOCK="1", DINOV3_FETCHER_HOSTNAME="host-a",
              DINOV3_FETCHER_TIMEOUT="600")  # A waits for the paused body (its heartbeat goes on)
    try:
        while not hub.paused.is_set() or not host_claims(dino_root, big, "host-a"):
            assert a.poll() is None, a.communicate()
            time.sleep(0.02)
        (claim,) = host_claims(dino_root, big, "host-a")
        if case == "clock-skew":  # the 6 MiB sent are read, and the record at 4 MiB written, in A's own time
            while not (claim / "progress.json").exists():
                assert a.poll() is None, a.communicate()
                time.sleep(0.02)
            old = time.time() - 3600  # as host B's clock sees it
            os.utime(claim / "progress.json", (old, old))
            os.utime(claim, (old, old))
        b = start(dino_root, "--json", DINOV3_FETCHER_NO_LOCK="1", DINOV3_FETCHER_HOSTNAME="host-b")
        out_b, err_b = b.communicate()
        assert b.returncode == 0, err_b
        assert claim.is_dir() and a.poll() is None  # B finished while A's folder is still A's
        assert json.loads(out_b)["bytes_resumed"] == 0  # B took none of A's bytes
        hub.resume.set()
        _, err_a = a.communicate()
    finally:
        hub.resume.set()
        if a.poll() is None:
            a.kill()
            a.communicate()
    assert a.returncode == 0, err_a
    assert all((dino_root / n).read_bytes() == big[n] for n in FETCHED)
    assert validate_dinov3(dino_root) and verify_dinov3(dino_root, deep=True).ok


def test_an_abandoned_claim_of_another_host_is_copied_after_watching_it(hub: HubServer, big: dict[str, bytes],
                                                                        dino_root: Path, watch_clock: WatchClock,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A claim of host A whose heartbeat this process watched stay still is adopted, by copying its done ranges
    into a folder of our own: A's data file (which A could still hold open) is never written, never published."""
    from dinov3_fetcher._errors import NetworkError

    hub.faults.add(cut_after=5 * MiB, path_suffix=MODEL, host="cdn", times=1)
    monkeypatch.setenv("DINOV3_FETCHER_RETRIES", "0")
    with pytest.raises(NetworkError):
        fetch_dinov3(dino_root, TINY)
    (released,) = [p for p in (dino_root / ".dinov3-fetcher" / "partial").iterdir() if "." not in p.name]
    claim = released.with_name(f"{released.name}.host-a.4242")  # as host A's fetcher left it, gone since
    released.rename(claim)
    (claim / "heartbeat").write_bytes(b"4242 17\n")
    done = len(big[MODEL]) - sum(e - s for s, e in json.loads((claim / "progress.json").read_bytes())["remaining"])
    assert done >= 4 * MiB
    old = time.time() - 3600
    os.utime(claim / "progress.json", (old, old))  # file times play no part, whatever they say
    held = os.open(claim / "data", os.O_RDONLY)  # the inode A would still write through
    before = os.pread(held, len(big[MODEL]), 0)
    hub.clear()
    result = fetch(dino_root, TINY)
    assert watch_clock.now >= STALE_AFTER["partial"]  # adopted only once watched still for as long as that
    try:
        assert os.pread(held, len(big[MODEL]) + 1, 0) == before  # not one byte written into A's file
        assert os.fstat(held).st_ino != (dino_root / MODEL).stat().st_ino  # nor A's file published
    finally:
        os.close(held)
    assert result.bytes_resumed == done and hub.bytes_served(MODEL) == len(big[MODEL]) - done
    assert (dino_root / MODEL).read_bytes() == big[MODEL]
    assert not claim.exists()  # abandoned: removed once copied


def test_a_deep_verify_that_passes_again_clears_the_damage_mark(hub: HubServer, tiny: dict[str, bytes],
                                                                dino_root: Path) -> None:
    fetch_dinov3(dino_root, TINY)
    good = (dino_root / MODEL).read_bytes()
    alter(dino_root / MODEL)
    assert not verify_dinov3(dino_root, deep=True).ok
    assert not validate_dinov3(dino_root) and not verify_dinov3(dino_root).ok  # the quick check reports it too
    (dino_root / MODEL).write_bytes(good)  # put back by hand
    report = verify_dinov3(dino_root, deep=True)
    assert report.ok and validate_dinov3(dino_root)
    hub.clear()
    assert fetch(dino_root, TINY).cached and hub.requests == []  # warm again


@pytest.mark.parametrize("alive", [True, False])
def test_another_hosts_staged_file_is_judged_by_its_heartbeat_not_its_file_times(
        hub: HubServer, tiny: dict[str, bytes], dino_root: Path, watch_clock: WatchClock, alive: bool) -> None:
    """Host A staged the weights and is about to publish them (alive: its heartbeat moves) or died (it does not).
    File times say "a day old" either way (clock skew): only the heartbeat, as watched here, decides."""
    folder = dino_root / ".dinov3-fetcher" / "staged" / "host-a.4242"
    folder.mkdir(parents=True)
    staged = folder / f"{sha256(tiny[MODEL])}.{MODEL}"
    staged.write_bytes(tiny[MODEL])
    (folder / "heartbeat").write_bytes(b"4242 1\n")
    old = time.time() - 2 * 86400
    for p in (staged, folder / "heartbeat", folder):
        os.utime(p, (old, old))
    if alive:  # host A's heartbeat thread beats while this process watches
        beats = itertools.count(2)
        watch_clock.each_sleep = lambda: (folder / "heartbeat").write_bytes(f"4242 {next(beats)}\n".encode())
    result = fetch(dino_root, TINY)
    assert (dino_root / MODEL).read_bytes() == tiny[MODEL]
    if alive:  # A's file stays A's to publish; we downloaded our own
        assert staged.read_bytes() == tiny[MODEL] and hub.bytes_served(MODEL) == len(tiny[MODEL])
        assert watch_clock.sleeps > 0 and watch_clock.now < STALE_AFTER["staged"]
    else:  # watched still for as long as the staleness table says: adopted, nothing downloaded
        assert not staged.exists() and hub.bytes_served(MODEL) == 0 and result.bytes_fetched < len(tiny[MODEL])
        assert watch_clock.now >= STALE_AFTER["staged"]


def test_verify_never_writes_through_a_linked_state_folder(hub: HubServer, tiny: dict[str, bytes],
                                                           dino_root: Path, tmp_path: Path) -> None:
    """verify records its time in the manifest; with `.dinov3-fetcher` a link to a shared folder it must not."""
    fetch_dinov3(dino_root, TINY)
    shared = tmp_path / "shared-state"
    (dino_root / ".dinov3-fetcher").rename(shared)
    (dino_root / ".dinov3-fetcher").symlink_to(shared)
    before = {p.name: p.read_bytes() for p in shared.iterdir() if p.is_file()}
    report = verify_dinov3(dino_root, deep=True)
    assert report.ok
    assert {p.name: p.read_bytes() for p in shared.iterdir() if p.is_file()} == before


def _left_by(folder: Path, files: dict[str, int], beat: bytes = b"4242 17\n") -> Path:
    """A partial or staged folder as a fetcher of another host left it when it was killed: its files and a
    heartbeat that nobody beats any more."""
    folder.mkdir(parents=True)
    for name, size in files.items():
        (folder / name).write_bytes(b"\0" * size)
    (folder / "heartbeat").write_bytes(beat)
    return folder


def test_other_hosts_abandoned_leftovers_are_shown_then_removed_by_a_fetch_of_another_model(
        hub: HubServer, tiny: dict[str, bytes], dino_root: Path, run_cli: Any) -> None:
    state = dino_root / ".dinov3-fetcher"
    partial = _left_by(state / "partial" / f"{'a' * 64}.hostB.4242", {"data": 3 * MiB, "progress.json": 4096})
    staged = _left_by(state / "staged" / "hostB.4243", {f"{'b' * 64}.model.safetensors": 2 * MiB})
    info = json.loads(run_cli("info", "--dino-root", str(dino_root), "--json").stdout)["leftovers"]
    assert info["count"] == 2 and info["bytes"] == 5 * MiB + 4096 + 2 * len(b"4242 17\n")
    assert set(info["folders"]) == {f"partial/{partial.name}", f"staged/{staged.name}"}
    text = run_cli("info", "--dino-root", str(dino_root)).stdout
    assert "left over:  2 partial or staged download folder(s) of other fetchers, 5.2 MB" in text, text
    # Another model, on this host: it watches their heartbeats from its start and removes those that stayed
    # still for the staleness time (DINOV3_FETCHER_STALE_AFTER, the documented setting, made 0 here).
    r = run_cli("--dino-root", str(dino_root), "--model", TINY, "-q", DINOV3_FETCHER_STALE_AFTER="0")
    assert r.returncode == 0, r.stderr
    assert not partial.exists() and not staged.exists()
    assert (dino_root / MODEL).read_bytes() == tiny[MODEL]
    assert "left over:  nothing" in run_cli("info", "--dino-root", str(dino_root)).stdout


def test_a_fetch_never_waits_for_the_verdict_on_another_hosts_leftovers(
        hub: HubServer, tiny: dict[str, bytes], dino_root: Path, run_cli: Any) -> None:
    """Leftovers not yet proven abandoned when a fetch ends stay for a later fetch: the fetch returns at once
    (with an hour's staleness time, a fetch that waited for the verdict would not end within the run's timeout)."""
    partial = _left_by(dino_root / ".dinov3-fetcher" / "partial" / f"{'d' * 64}.hostB.4242", {"data": MiB})
    r = run_cli("--dino-root", str(dino_root), "--model", TINY, "-q", DINOV3_FETCHER_STALE_AFTER="3600")
    assert r.returncode == 0, r.stderr
    assert (dino_root / MODEL).read_bytes() == tiny[MODEL]
    assert (partial / "data").stat().st_size == MiB
    info = json.loads(run_cli("info", "--dino-root", str(dino_root), "--json").stdout)["leftovers"]
    assert list(info["folders"]) == [f"partial/{partial.name}"]


def test_a_live_fetcher_of_another_host_keeps_its_folders_through_a_fetch_of_another_model(
        hub: HubServer, tiny: dict[str, bytes], dino_root: Path, run_cli: Any) -> None:
    claim = _left_by(dino_root / ".dinov3-fetcher" / "partial" / f"{'c' * 64}.hostC.77", {"data": MiB})
    beats = ("import pathlib, sys, time\nbeat = pathlib.Path(sys.argv[1])\nfor n in range(10**9):\n"
             "    beat.write_bytes(f'77 {n:>20}\\n'.encode())\n    time.sleep(0.1)\n")
    owner = subprocess.Popen([sys.executable, "-c", beats, str(claim / "heartbeat")])  # host C's heartbeat thread
    try:
        r = run_cli("--dino-root", str(dino_root), "--model", TINY, "-q")  # the default staleness time
        assert r.returncode == 0, r.stderr
        assert (claim / "data").stat().st_size == MiB  # its beat changed while watched: alive, kept
    finally:
        owner.kill()
        owner.wait()
    assert (dino_root / MODEL).read_bytes() == tiny[MODEL]


def test_warm_fetches_remove_a_killed_fetchers_leftovers_once_proven_abandoned_without_a_request(
        hub: HubServer, tiny: dict[str, bytes], dino_root: Path, watch_clock: WatchClock) -> None:
    """A fetch of another model was killed on host B (its partial download and staged folder stay, their
    heartbeat still) and one on this host (a dead pid); then a model already on disk is fetched again and again,
    warm each time: this host's leftovers go at once, host B's once its heartbeat was watched unchanged for the
    staleness time (across the warm fetches: each takes no time, the clock moves between them); a beat seen
    meanwhile restarts the watch. No request is ever made, the checkpoint stays as it was."""
    from dinov3_fetcher._state.owners import host

    fetch(dino_root, TINY)
    before = tree(dino_root)
    state = dino_root / ".dinov3-fetcher"
    partial = _left_by(state / "partial" / f"{'e' * 64}.hostB.4242", {"data": 3 * MiB, "progress.json": 4096})
    staged = _left_by(state / "staged" / "hostB.4243", {f"{'f' * 64}.model.safetensors": 2 * MiB})
    here = _left_by(state / "partial" / f"{'9' * 64}.{host()}.{dead_pid()}", {"data": MiB})
    hub.clear()
    stale = STALE_AFTER["partial"]
    assert fetch(dino_root, TINY).cached  # watching from now on
    assert not here.exists() and partial.exists() and staged.exists()
    watch_clock.now += stale / 2
    (staged / "heartbeat").write_bytes(b"4243 18\n")  # host B's publish beat once more: alive, watched anew
    assert fetch(dino_root, TINY).cached
    watch_clock.now += stale / 2
    assert fetch(dino_root, TINY).cached  # the partial download's beat was still for the staleness time
    assert not partial.exists() and staged.exists()
    watch_clock.now += stale
    assert fetch(dino_root, TINY).cached
    assert not staged.exists()
    assert hub.requests == [] and watch_clock.sleeps == 0  # no request, no wait
    assert tree(dino_root) == before


@pytest.mark.parametrize("stale_after", ["0", "3600"])
def test_short_warm_runs_of_this_host_together_watch_another_hosts_leftovers(
        hub: HubServer, tiny: dict[str, bytes], dino_root: Path, run_cli: Any, stale_after: str) -> None:
    """Each warm run takes milliseconds, far less than the staleness time: the watch goes on from one run (one
    process) to the next through the note each leaves, so runs of a few milliseconds remove host B's leftovers
    once they were watched still for DINOV3_FETCHER_STALE_AFTER seconds in all (0 here: at the second run; an
    hour: not yet), with no request."""
    assert run_cli("--dino-root", str(dino_root), "--model", TINY, "-q").returncode == 0
    partial = _left_by(dino_root / ".dinov3-fetcher" / "partial" / f"{'e' * 64}.hostB.4242", {"data": MiB})
    hub.clear()
    for run in (1, 2):
        r = run_cli("--dino-root", str(dino_root), "--model", TINY, "--json", DINOV3_FETCHER_STALE_AFTER=stale_after)
        assert r.returncode == 0 and json.loads(r.stdout)["cached"], r.stderr
        assert partial.exists() == (run == 1 or stale_after == "3600")  # the first run only starts the watch
    assert hub.requests == []
    assert (dino_root / MODEL).read_bytes() == tiny[MODEL]


def _syscalls(trace: Path) -> list[tuple[str, str, str]]:
    """strace's record as (call, path, second path) in order: ("open", path, ""), ("fsync", path the descriptor
    was opened on, ""), ("rename", source, destination). One process: its threads share the descriptors."""
    pending: dict[str, str] = {}
    fds: dict[str, str] = {}
    out: list[tuple[str, str, str]] = []
    for raw in trace.read_text().splitlines():
        pid, _, line = raw.partition(" ")
        line = line.lstrip()  # strace pads a pid shorter than 5 digits: "6197  openat(...)"
        if line.endswith("<unfinished ...>"):
            pending[pid] = line.removesuffix("<unfinished ...>")
            continue
        if line.startswith("<... ") and pid in pending:
            line = pending.pop(pid) + line.partition("resumed>")[2]
        call, _, rest = line.partition("(")
        paths = re.findall(r'"((?:[^"\\]|\\.)*)"', rest)
        result = rest.rpartition("= ")[2].split()[0] if "= " in rest else ""
        if call in ("open", "openat") and result.isdigit() and paths:
            fds[result] = paths[-1]
            out.append(("open", paths[-1], ""))
        elif call in ("fsync", "fdatasync") and result == "0":
            out.append(("fsync", fds.get(rest.partition(")")[0].strip(), "?"), ""))
        elif call.startswith("rename") and result == "0" and len(paths) == 2:
            out.append(("rename", paths[0], paths[1]))
    return out


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed (apt-get install strace)")
@pytest.mark.parametrize("sharded", [False, True])
def test_publishing_syncs_every_file_and_folder_before_the_manifest_that_says_complete(
        hub: HubServer, dino_root: Path, tmp_path: Path, sharded: bool) -> None:
    """Crash consistency, by the order of the system calls of a real CLI run (strace): after a power loss the
    manifest can only say 'complete' over bytes and names that reached the disk before it."""
    files = vit_repo_files()
    hub.add_repo(TINY, shard_files(files, 2) if sharded else files)
    trace = tmp_path / "trace"
    calls_traced = "trace=open,openat,fsync,fdatasync,rename,renameat,renameat2"
    cli = [sys.executable, "-m", "dinov3_fetcher", "--dino-root", str(dino_root), "--model", TINY, "-q"]
    proc = subprocess.run(["strace", "-f", "-qq", "-s", "4096", "-o", str(trace), "-e", calls_traced, *cli],
                          env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    calls = _syscalls(trace)
    state, manifest = str(dino_root / ".dinov3-fetcher"), str(dino_root / ".dinov3-fetcher" / "manifest.json")
    names = sorted(p.name for p in dino_root.iterdir() if p.is_file())
    assert len(names) >= (6 if sharded else 5)
    moves = {dst: (i, src) for i, (call, src, dst) in enumerate(calls) if call == "rename"}
    writes = [i for i, (call, _, dst) in enumerate(calls) if call == "rename" and dst == manifest]
    assert len(writes) == 2  # the manifest that says incomplete, then the one that says complete
    incomplete, complete = writes
    fsyncs = [(i, path) for i, (call, path, _) in enumerate(calls) if call == "fsync"]

    def synced(path: str, after: int, before: int) -> bool:
        return any(after < i < before and p == path for i, p in fsyncs)

    first_move = min(moves[str(dino_root / n)][0] for n in names)
    last_move = max(moves[str(dino_root / n)][0] for n in names)
    assert incomplete < first_move and synced(state, incomplete, first_move)  # 'incomplete' on the disk first
    for n in names:
        at, src = moves[str(dino_root / n)]
        assert synced(src, 0, at), n  # the bytes before the name
        assert synced(str(Path(src).parent), at, complete), n  # the staged folder it left
    assert synced(str(dino_root), last_move, complete)  # the published names
    assert synced(moves[manifest][1], incomplete, complete)  # the complete manifest's own bytes
    assert synced(state, complete, len(calls))  # and its name
