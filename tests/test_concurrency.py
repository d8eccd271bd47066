"""Many fetchers, one dino_root: 8 processes, 8 threads, a held lock, a lock left by a killed process, and
two fetchers with the lock disabled (what filesystems with no-op locks do). Asserted on what users see:
the path each returns, the bytes on disk, the bytes the server sent, the messages and exit codes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from filelock import FileLock

from checkpoints import vit_repo_files
from conftest import TINY, cli_env, start
from dinov3_fetcher import validate_dinov3
from helpers import fetch, partial_progress, sha256
from hub_server import HubServer

MiB = 1 << 20
MODEL = "model.safetensors"
N = 8
FETCHED = ("config.json", "preprocessor_config.json", MODEL, "README.md", "LICENSE.md")


def assert_checkpoint(dino_root: Path, files: dict[str, bytes]) -> None:
    for name in FETCHED:
        assert sha256((dino_root / name).read_bytes()) == sha256(files[name]), name


def watch_never_half_written(dino_root: Path, files: dict[str, bytes], stop: threading.Event,
                             seen: list[str]) -> None:
    """Like a training job polling dino_root: whenever it looks valid, its weights must be the right bytes."""
    want = sha256(files[MODEL])
    while not stop.is_set():
        if validate_dinov3(dino_root):
            try:
                got = sha256((dino_root / MODEL).read_bytes())
            except FileNotFoundError:  # replaced between the check and the read: look again
                continue
            seen.append("ok" if got == want else "WRONG")
        time.sleep(0.01)


@pytest.fixture
def repo(hub: HubServer) -> dict[str, bytes]:
    files = vit_repo_files(hidden=256, intermediate=1024, layers=4)  # ~12.6 MB
    hub.add_repo(TINY, files)
    hub.faults.add(path_suffix=MODEL, host="cdn", throttle_bps=16 * MiB)  # the first fetch takes ~0.8 s
    return files


def one_copy(files: dict[str, bytes]) -> int:
    return sum(len(files[n]) for n in FETCHED)


def test_eight_processes_share_one_download(hub: HubServer, repo: dict[str, bytes], dino_root: Path,
                                            tmp_path: Path) -> None:
    # The weights are held until every other process waits for the lock: one that started after the download
    # ended (a slow start on a loaded machine) would find the checkpoint there and not wait at all.
    hub.faults.add(path_suffix=MODEL, host="cdn", pause_at=8 * MiB)
    stop, seen = threading.Event(), []
    watcher = threading.Thread(target=watch_never_half_written, args=(dino_root, repo, stop, seen))
    watcher.start()
    logs = [tmp_path / f"stderr{i}" for i in range(N)]  # read while the processes run
    procs: list[subprocess.Popen[str]] = []
    try:
        for log in logs:
            with open(log, "w") as err:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "dinov3_fetcher", "--dino-root", str(dino_root), "--model", TINY, "--json"],
                    env=cli_env(), stdout=subprocess.PIPE, stderr=err, text=True))
        while not hub.paused.is_set() or \
                sum("waiting for another fetcher" in log.read_text() for log in logs) < N - 1:
            assert all(p.poll() is None for p in procs), [log.read_text() for log in logs]
            time.sleep(0.01)
        hub.resume.set()
        results = [(p.communicate(timeout=120)[0], log.read_text()) for p, log in zip(procs, logs, strict=True)]
    finally:
        hub.resume.set()
        stop.set()
        watcher.join()
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert [p.returncode for p in procs] == [0] * N, [err for _, err in results]
    paths = {json.loads(out)["path"] for out, _ in results}
    assert paths == {str(dino_root)}
    assert_checkpoint(dino_root, repo)
    served = sum(r.body_bytes for r in hub.file_gets())
    assert one_copy(repo) <= served <= one_copy(repo) + 64 * 1024, served  # each byte served about once
    waiters = [err for _, err in results if "waiting for another fetcher" in err]
    assert len(waiters) >= N // 2, [err for _, err in results]
    assert "WRONG" not in seen and "ok" in seen  # it did see a valid folder, and never a wrong one


def test_eight_threads_share_one_download(hub: HubServer, repo: dict[str, bytes], dino_root: Path) -> None:
    results: list[Path | BaseException] = []

    def run() -> None:
        try:
            results.append(fetch(dino_root, TINY).path)
        except BaseException as exc:
            results.append(exc)

    threads = [threading.Thread(target=run) for _ in range(N)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == [dino_root] * N
    assert_checkpoint(dino_root, repo)
    served = sum(r.body_bytes for r in hub.file_gets())
    assert one_copy(repo) <= served <= one_copy(repo) + 64 * 1024, served


@pytest.mark.parametrize("how", ["flag", pytest.param("env", marks=pytest.mark.slow)])
def test_waiter_says_it_waits_and_times_out_with_exit_12(hub: HubServer, repo: dict[str, bytes],
                                                         dino_root: Path, run_cli: Any, how: str) -> None:
    (dino_root / ".dinov3-fetcher").mkdir(parents=True)
    holder = FileLock(dino_root / ".dinov3-fetcher" / "lock")  # another fetcher, busy for a long time
    with holder:
        t0 = time.monotonic()
        if how == "flag":
            proc = run_cli("--dino-root", str(dino_root), "--model", TINY, "--lock-timeout", "1")
        else:
            proc = run_cli("--dino-root", str(dino_root), "--model", TINY, DINOV3_FETCHER_LOCK_TIMEOUT="1")
        took = time.monotonic() - t0
    assert proc.returncode == 12, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("waiting for another fetcher to finish with") and "up to 1 s" in lines[0]
    assert lines[-1].startswith("dinov3-fetcher: error: another fetcher held the lock on")
    assert "more than 1 s" in lines[-1] and "--lock-timeout" in lines[-1]
    assert took >= 1.0  # it waited the second it was given (and gave up on its own: the run returned)
    assert hub.file_gets() == []  # it never started downloading under someone else's lock
    assert not (dino_root / MODEL).exists()


def test_a_lock_held_by_a_killed_fetcher_does_not_block(hub: HubServer, repo: dict[str, bytes],
                                                        dino_root: Path) -> None:
    hub.faults.add(path_suffix=MODEL, host="cdn", pause_at=8 * MiB)  # past the weights' first record: no end
    weights = sha256(repo[MODEL])  # its partial folder's name (the small files have records of their own)
    first = start(dino_root)
    try:
        while not any(n.startswith(weights) and done for n, done in partial_progress(dino_root).items()):
            time.sleep(0.005)
            assert first.poll() is None, first.communicate()
        os.kill(first.pid, signal.SIGKILL)  # it dies holding the lock and a claimed partial folder
        first.communicate()
    finally:
        hub.resume.set()
        if first.poll() is None:
            first.kill()
            first.communicate()
    hub.clear()
    second = start(dino_root, "--json", "--lock-timeout", "5")
    out, err = second.communicate(timeout=60)
    assert second.returncode == 0, err
    assert "waiting for another fetcher" not in err  # the dead fetcher's lock went with it: no wait at all
    assert json.loads(out)["bytes_resumed"] > 0  # and it adopted the dead fetcher's partial download
    assert_checkpoint(dino_root, repo)


@pytest.mark.parametrize("stagger", [0.0, pytest.param(0.4, marks=pytest.mark.slow)])
def test_without_the_lock_two_fetchers_waste_bandwidth_but_never_publish_wrong_bytes(
        hub: HubServer, repo: dict[str, bytes], dino_root: Path, stagger: float) -> None:
    """DINOV3_FETCHER_NO_LOCK=1 does what NFS/Lustre/GPFS with no-op locks do: both fetchers run at once."""
    stop, seen = threading.Event(), []
    watcher = threading.Thread(target=watch_never_half_written, args=(dino_root, repo, stop, seen))
    watcher.start()
    try:
        a = start(dino_root, "--json", DINOV3_FETCHER_NO_LOCK="1")
        time.sleep(stagger)
        b = start(dino_root, "--json", DINOV3_FETCHER_NO_LOCK="1")
        results = [p.communicate(timeout=120) for p in (a, b)]
    finally:
        stop.set()
        watcher.join()
    assert (a.returncode, b.returncode) == (0, 0), [err for _, err in results]
    assert {json.loads(out)["path"] for out, _ in results} == {str(dino_root)}
    assert_checkpoint(dino_root, repo)
    assert "WRONG" not in seen and "ok" in seen  # it did see a valid folder, and never a wrong one
    assert hub.bytes_served(MODEL) <= 2 * len(repo[MODEL])  # at worst each fetched it once
    assert validate_dinov3(dino_root)
    deep = subprocess.run([sys.executable, "-m", "dinov3_fetcher", "verify", "--dino-root", str(dino_root),
                           "--deep"], env=cli_env(), capture_output=True, text=True, timeout=60)
    assert deep.returncode == 0, deep.stderr
