"""Disk space, on a real small filesystem: a tmpfs mounted by the test (needs root; skipped otherwise).

- Free space is checked before downloading, counting the bytes still missing (not the whole size) after a
  partial run, and a refusal says needed vs available and the margin it keeps.
- A disk that fills up during the download (another writer takes the space) gives the disk error (exit 9),
  keeps the partial data resumable, and leaves the checkpoint already in dino_root untouched.
- No space or no inode for the state folder's small files (lock, staging) is the same disk error.
- A dino_root on a read-only filesystem is a config error (exit 3) and its checkpoint stays as it was.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from checkpoints import shard_files, vit_repo_files
from conftest import TINY, checkpoint_tree, cli_env
from dinov3_fetcher import fetch_dinov3
from dinov3_fetcher._progress import human_bytes
from dinov3_fetcher._state import SPACE_MARGIN
from helpers import error_line, partial_progress, tree
from hub_server import HubServer

MiB = 1 << 20
MODEL = "model.safetensors"



def fill(path: Path, limit: int | None = None) -> int:
    """Write a ballast file until the disk is full (or ``limit`` bytes); returns its size."""
    block, n = b"\0" * MiB, 0
    with open(path, "wb", buffering=0) as f:
        while limit is None or n < limit:
            try:
                n += f.write(block if limit is None else block[: min(MiB, limit - n)])
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
    return n


def fill_inodes(where: Path) -> int:
    """Create empty files in ``where`` (created) until the filesystem has no inode left; returns how many."""
    where.mkdir()
    n = 0
    while True:
        try:
            (where / str(n)).touch()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
            return n
        n += 1


def kept(dino_root: Path) -> int:
    return sum(partial_progress(dino_root).values())


def fetch(run_cli: Any, dino_root: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return run_cli("--dino-root", str(dino_root), "--model", TINY, *args, **env)


def test_space_is_checked_before_downloading_and_counts_only_missing_bytes(
        hub: HubServer, tmpfs: Callable[[str], Path], run_cli: Any) -> None:
    disk = tmpfs("64m")
    dino_root = disk / "dinov3"
    v1 = vit_repo_files(seed=1, hidden=512, intermediate=2048, layers=3)  # ~39 MB: fits once, not twice
    size = len(v1[MODEL])
    hub.add_repo(TINY, v1)

    hub.faults.add(path_suffix=MODEL, host="cdn", times=1, cut_after=30 * MiB)
    assert fetch(run_cli, dino_root, DINOV3_FETCHER_RETRIES="0", DINOV3_FETCHER_CONNECTIONS="1").returncode == 10
    assert kept(dino_root) == 30 * MiB
    hub.faults.clear()

    # 30 MiB are on disk; counting the whole file again would need ~39 MB + margin, more than is free now.
    ballast = fill(disk / "ballast", 15 * MiB)
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    hub.clear()
    proc = fetch(run_cli, dino_root)
    assert proc.returncode == 9, proc.stderr
    missing_mb = f"{(size - 30 * MiB) / 1e6:.1f} MB still to download"
    assert missing_mb in proc.stderr, proc.stderr  # the bytes still missing, not the whole size
    assert f"{free / 1e6:.1f} MB free" in proc.stderr, proc.stderr
    assert "margin" in proc.stderr and human_bytes(SPACE_MARGIN) in proc.stderr, proc.stderr  # and what it keeps
    assert hub.bytes_served(MODEL) == 0  # refused before downloading
    assert kept(dino_root) == 30 * MiB

    (disk / "ballast").unlink()
    hub.clear()
    proc = fetch(run_cli, dino_root)
    assert proc.returncode == 0, proc.stderr
    assert (dino_root / MODEL).read_bytes() == v1[MODEL]
    assert hub.bytes_served(MODEL) == size - 30 * MiB
    assert ballast == 15 * MiB

    # A new version of the same size does not fit next to the current one: refused, nothing touched.
    before = checkpoint_tree(dino_root)
    v2 = vit_repo_files(seed=2, hidden=512, intermediate=2048, layers=3)
    hub.add_commit(TINY, {MODEL: v2[MODEL]})
    hub.clear()
    proc = fetch(run_cli, dino_root, "--update")
    assert proc.returncode == 9, proc.stderr
    assert f"{size / 1e6:.1f} MB still to download" in proc.stderr and "MB free" in proc.stderr
    assert "free some space" in proc.stderr
    assert hub.bytes_served(MODEL) == 0
    assert checkpoint_tree(dino_root) == before


@pytest.mark.parametrize("case", ["every-head-answers", "a-head-refused"])
def test_shards_that_do_not_all_fit_are_refused_before_the_first_weight_byte(
        hub: HubServer, tmpfs: Callable[[str], Path], run_cli: Any, case: str) -> None:
    # Four shards of ~19 MB on a 56 MiB disk: the first two would fit, all four do not. The head start learns the
    # shards one HEAD at a time; it must not start any of them before it knows they all fit (a 7B is 6 x 4.5 GB:
    # two shards written before the refusal would be 9 GB for nothing), nor once a HEAD it needed to know that
    # was refused (the ones that did answer fit, but say nothing of the rest).
    disk = tmpfs("56m")
    dino_root = disk / "dinov3"
    files = shard_files(vit_repo_files(seed=3, hidden=512, intermediate=2048, layers=5), 4)
    shards = sorted(n for n in files if n.endswith(".safetensors"))
    total = sum(len(files[n]) for n in shards)
    assert len(shards) == 4 and total > 56 * MiB - 16 * MiB > 2 * max(len(files[n]) for n in shards)
    hub.add_repo(TINY, files)
    if case == "a-head-refused":
        hub.faults.add(path_suffix=shards[1], host="hub", head=True, status=503)
    proc = fetch(run_cli, dino_root)
    assert proc.returncode == 9, proc.stderr
    needed = total + len(files["README.md"]) + len(files["LICENSE.md"])
    assert "not enough disk space" in proc.stderr and f"{needed / 1e6:.1f} MB still to download" in proc.stderr
    assert hub.bytes_served(".safetensors") == 0  # not one byte of a shard was asked for
    assert not list((dino_root / ".dinov3-fetcher" / "partial").glob("*/data"))


def test_disk_filling_up_mid_download_keeps_partial_and_previous_checkpoint(
        hub: HubServer, tmpfs: Callable[[str], Path], run_cli: Any) -> None:
    disk = tmpfs("64m")
    dino_root = disk / "dinov3"
    v1 = vit_repo_files(seed=1, hidden=256, intermediate=1024, layers=4)  # ~13 MB
    hub.add_repo(TINY, v1)
    assert fetch(run_cli, dino_root).returncode == 0
    before = checkpoint_tree(dino_root)

    v2 = vit_repo_files(seed=2, hidden=384, intermediate=1536, layers=4, heads=6)  # ~28 MB: passes the check
    hub.add_commit(TINY, v2)
    # the body stops past the first record (4 MiB) until the disk is full: the download cannot end first
    hub.faults.add(path_suffix=MODEL, host="cdn", throttle_bps=10 * MiB, pause_at=8 * MiB)
    hub.clear()
    proc = subprocess.Popen([sys.executable, "-m", "dinov3_fetcher", "--dino-root", str(dino_root), "--model",
                             TINY, "--update"], env=cli_env(DINOV3_FETCHER_TIMEOUT="600"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # (no read gives up on the held body on its own)
    try:
        while kept(dino_root) < 4 * MiB:  # a progress record: the fetch's own download, past the head start
            time.sleep(0.005)
            assert proc.poll() is None, proc.communicate()
        fill(disk / "ballast")  # someone else takes every free byte
    except BaseException:
        proc.kill()
        proc.communicate()
        raise
    finally:
        hub.resume.set()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 9, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "the disk filled up while writing model.safetensors" in lines[0], err
    assert "run again: the download resumes" in lines[0]
    assert checkpoint_tree(dino_root) == before  # the previous checkpoint, byte for byte, manifest included
    have = kept(dino_root)
    assert have >= 4 * MiB  # the partial data is kept ...

    (disk / "ballast").unlink()
    hub.faults.clear()
    hub.clear()
    proc2 = fetch(run_cli, dino_root, "--update", "--json")
    assert proc2.returncode == 0, proc2.stderr
    assert (dino_root / MODEL).read_bytes() == v2[MODEL]
    assert json.loads(proc2.stdout)["bytes_resumed"] == have  # ... and resumable
    assert hub.bytes_served(MODEL) == len(v2[MODEL]) - have


def test_a_receiver_whose_disk_is_full_when_a_file_opens_gets_a_disk_space_error(tmpfs: Callable[[str], Path]) -> None:
    # Broadcast: a receiving node's disk may fill between two files; opening the next one (its folder,
    # its progress record) then fails with ENOSPC, which must be the DiskSpaceError every rank reports (exit 9),
    # with no file descriptor left open.
    from dinov3_fetcher._broadcast.ends import PartialSink
    from dinov3_fetcher._broadcast.wire import FileSpec
    from dinov3_fetcher._errors import DiskSpaceError

    root = tmpfs("1m")
    (root / "partial").mkdir()
    fill(root / "ballast")
    data = b"x" * 10000
    spec = FileSpec("w.safetensors", len(data), hashlib.sha256(data).hexdigest())
    sink = PartialSink(root / "partial", root / "final")
    fds = len(list(Path("/proc/self/fd").iterdir()))
    with pytest.raises(DiskSpaceError):
        sink.write(spec, 0, memoryview(data))
    assert len(list(Path("/proc/self/fd").iterdir())) == fds


@pytest.mark.parametrize("case", ["no-inode-for-the-lock", "no-inode-for-staging", "no-space-for-small-files"])
def test_no_space_or_inode_for_the_state_folders_files_is_the_disk_error(
        hub: HubServer, tiny: dict[str, bytes], tmpfs: Callable[..., Path], run_cli: Any, case: str) -> None:
    disk = tmpfs("8m", 64 if "inode" in case else None)
    dino_root = disk / "dinov3"
    state = dino_root / ".dinov3-fetcher"
    (state / "partial").mkdir(parents=True)
    (state / "staged").mkdir()
    if case != "no-inode-for-the-lock":
        (state / "lock").touch()
    if "inode" in case:
        assert fill_inodes(disk / "ballast") > 0
    else:
        fill(disk / "ballast")
    r = fetch(run_cli, dino_root)
    assert r.returncode == 9, r.stderr
    assert str(dino_root) in error_line(r.stderr)
    assert not (dino_root / MODEL).exists()


@pytest.mark.parametrize("case", ["--update", "model-switch"])
def test_a_read_only_dino_root_is_a_config_error_and_its_checkpoint_stays(
        hub: HubServer, tiny: dict[str, bytes], tmpfs: Callable[..., Path], run_cli: Any, case: str) -> None:
    disk = tmpfs("32m")  # the tiny checkpoint plus the 16 MiB space margin
    dino_root = disk / "dinov3"
    fetch_dinov3(dino_root, TINY)
    before = tree(dino_root)
    r0 = subprocess.run(["mount", "-o", "remount,ro", str(disk)], capture_output=True, text=True)
    if r0.returncode:
        pytest.skip(f"cannot remount read-only: {r0.stderr}")
    if case == "--update":
        hub.add_commit(TINY, {"README.md": b"# a new model card\n"})
        r = fetch(run_cli, dino_root, "--update")
    else:
        hub.add_repo("tiny-org/other", vit_repo_files(seed=3))
        r = run_cli("--dino-root", str(dino_root), "--model", "tiny-org/other")
    assert tree(dino_root) == before
    assert r.returncode == 3, r.stderr
    assert "read-only" in error_line(r.stderr)


def test_every_errno_of_dino_roots_filesystem_is_a_documented_exit_code_naming_the_path() -> None:
    """Whatever errno dino_root's filesystem raises (a stale NFS handle, an I/O error, a name it refuses...), the
    error is one line with a documented exit code that names the path and what to do; never a bare OSError
    (exit 1, "unexpected error")."""
    from dinov3_fetcher._errors import ConfigError, DiskSpaceError, FetcherError, disk_error

    root = Path("/mnt/shared/dinov3")
    for code in sorted(errno.errorcode):
        where = f"{root}/.dinov3-fetcher/partial/0123abcd.host.42"
        err = disk_error(OSError(code, os.strerror(code), where), root, "writing model.safetensors")
        assert isinstance(err, FetcherError) and err.exit_code in (3, 9), (errno.errorcode[code], err)
        assert str(root) in str(err) and "\n" not in str(err) and err.hint, (errno.errorcode[code], err)
    for code in (errno.EIO, errno.ESTALE, errno.EREMOTEIO, errno.ENXIO):
        err = disk_error(OSError(code, os.strerror(code), str(root / MODEL)), root, "writing model.safetensors")
        assert isinstance(err, DiskSpaceError) and err.errno == code and err.exit_code == 9
        assert err.message.startswith(f"the filesystem of {root} failed while writing model.safetensors: ")
        assert f"({errno.errorcode[code]} on {root / MODEL})" in err.message
    for code in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG, errno.EINVAL):
        err = disk_error(OSError(code, os.strerror(code), str(root)), root)
        assert isinstance(err, ConfigError) and f"cannot use {root} as dino_root: " in err.message


def test_a_file_where_the_state_folder_needs_a_folder_is_named_with_the_fix(
        hub: HubServer, tiny: dict[str, bytes], tmpfs: Callable[..., Path], run_cli: Any) -> None:
    """On a real filesystem: ``.dinov3-fetcher/staged`` is a file (EEXIST when the fetch makes the folder): exit 3,
    one line naming it and saying to remove it; after that the fetch works."""
    dino_root = tmpfs("32m") / "dinov3"
    (dino_root / ".dinov3-fetcher").mkdir(parents=True)
    (dino_root / ".dinov3-fetcher" / "staged").write_text("not a folder")
    r = fetch(run_cli, dino_root)
    assert r.returncode == 3, r.stderr
    line = error_line(r.stderr)
    assert f"(EEXIST on {dino_root}/.dinov3-fetcher/staged) -> remove {dino_root}/.dinov3-fetcher/staged" in line
    assert len(r.stderr.strip().splitlines()) == 1
    (dino_root / ".dinov3-fetcher" / "staged").unlink()
    assert fetch(run_cli, dino_root).returncode == 0
