"""Interruption, for real: the fetcher is a subprocess killed with SIGKILL at random points of a download
(and SIGINT like a Ctrl-C), then run again. After every kill, what the partial state claims is on disk must
be true, dino_root must never look valid with wrong bytes, and each restart fetches only what is missing
(plus what was in flight at the kill).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from checkpoints import big_vit_repo_dir, vit_repo_files
from conftest import TINY, cli_env, start
from dinov3_fetcher import _job, validate_dinov3
from dinov3_fetcher import _transfer as transfer
from dinov3_fetcher._budget import READ_AHEAD
from helpers import freeze, socket_queues
from hub_server import HubServer

MiB = 1 << 20
MODEL = "model.safetensors"
SAVE_EVERY = _job.SAVE_EVERY


def kill_bound(connections: int | None) -> int:
    """What a SIGKILL may cost, per the design, in bytes the server sent that the next run asks for again:
    progress not yet recorded (less than SAVE_EVERY, plus the block that crossed it) plus one block read or being
    written per connection; with the adaptive budget (``connections=None``), all reads under way together stay
    within ``_budget.READ_AHEAD``. Measured at a gated kill (see ``freeze``), where nothing is left in socket
    buffers."""
    in_flight = READ_AHEAD if connections is None else connections * transfer.Settings.block
    return SAVE_EVERY + in_flight + transfer.Settings.block


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 * MiB):
            h.update(block)
    return h.hexdigest()


def partial_state(dino_root: Path, identity: str) -> tuple[list[Path], int]:
    """The partial folders of one file's content, and the bytes the newest progress record says are on disk."""
    folders = sorted((dino_root / ".dinov3-fetcher" / "partial").glob(f"{identity}*"))
    done = 0
    for f in folders:
        try:
            data = json.loads((f / "progress.json").read_bytes())
            done = max(done, data["size"] - sum(e - s for s, e in data["remaining"]))
        except (OSError, ValueError):
            pass
    return folders, done


def assert_partial_truthful(dino_root: Path, identity: str, source: Path) -> None:
    """Every byte progress.json says is done really is the source's byte at that offset."""
    for folder in (dino_root / ".dinov3-fetcher" / "partial").glob(f"{identity}*"):
        try:
            remaining = json.loads((folder / "progress.json").read_bytes())["remaining"]
        except FileNotFoundError:
            continue
        size = source.stat().st_size
        done, pos = [], 0
        for s, e in sorted(remaining):
            if s > pos:
                done.append((pos, s))
            pos = e
        if pos < size:
            done.append((pos, size))
        with open(folder / "data", "rb") as got, open(source, "rb") as want:
            for s, e in done:
                got.seek(s)
                want.seek(s)
                while s < e:
                    n = min(8 * MiB, e - s)
                    assert got.read(n) == want.read(n), f"{folder.name}: bytes {s}..{s + n} recorded as done are wrong"
                    s += n


def assert_never_wrong(dino_root: Path, expected: dict[str, str]) -> None:
    """If dino_root passes the quick validation, its files are the right ones, byte for byte."""
    if validate_dinov3(dino_root):
        for name, digest in expected.items():
            assert sha256_file(dino_root / name) == digest, f"{name} looks valid but holds wrong bytes"


@dataclass
class KillReport:
    missing_before: int
    missing_after: int
    served: int
    frozen: bool  # killed after ``freeze``: the waste is bounded by the design (``kill_bound``)

    @property
    def wasted(self) -> int:
        """Bytes the server sent this run that the next run has to fetch again."""
        return self.served - (self.missing_before - self.missing_after)


def kill_and_restart(hub: HubServer, dino_root: Path, source: Path, expected: dict[str, str],
                     triggers: list[tuple[Callable[[int], bool], bool, bool]],
                     env: dict[str, str]) -> list[KillReport]:
    """Start the fetcher once per trigger and SIGKILL it when the trigger (given the bytes served to this run
    so far) says so, after ``freeze`` when the trigger's first flag says so; check the on-disk state after each
    kill. The second flag: the Hub holds the file's last byte back (``pause_at``) until the kill, so that the run
    cannot end before its kill point, however late the test sees it come (a loaded machine); without it the run
    may end first, and the series stops there. Returns one report per kill."""
    size = source.stat().st_size
    identity = hashlib.sha256(source.read_bytes()).hexdigest() if size < 64 * MiB else sha256_file(source)
    hold = hub.faults.add(path_suffix=MODEL, host="cdn", pause_at=size - 1)  # every body that would send it waits
    reports = []
    for trigger, frozen, held in triggers:
        _, done = partial_state(dino_root, identity)
        missing = size - done
        hub.clear()
        hold.times = None if held else 0  # 0: the rule is spent (the bodies held by killed runs stay held)
        proc = start(dino_root, "-q", **env)
        while proc.poll() is None and not trigger(hub.bytes_served(MODEL)):
            time.sleep(0.002)
        if proc.poll() is None and frozen:
            freeze(hub.gate, hub.cdn_endpoint, proc)
        try:
            if proc.poll() is not None:  # it finished before the kill point
                assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
                proc.communicate()
                break
            os.kill(proc.pid, signal.SIGKILL)
            proc.communicate()
        finally:
            hub.gate.set()
        assert proc.returncode == -signal.SIGKILL
        folders, done_after = partial_state(dino_root, identity)
        assert len(folders) <= 1, f"partial data of one file spread over {folders}"
        assert_partial_truthful(dino_root, identity, source)
        assert_never_wrong(dino_root, expected)
        reports.append(KillReport(missing, size - done_after, hub.bytes_served(MODEL), frozen))
    hold.times = 0
    return reports


def finish(hub: HubServer, dino_root: Path, source: Path, expected: dict[str, str], env: dict[str, str]) -> int:
    """Run once more to completion; returns the model bytes that run fetched."""
    hub.clear()
    proc = start(dino_root, "--json", **env)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    for name, digest in expected.items():
        assert sha256_file(dino_root / name) == digest, name
    assert json.loads(out)["files"][MODEL]["sha256"] == expected[MODEL]
    assert not list((dino_root / ".dinov3-fetcher" / "partial").iterdir())
    return hub.bytes_served(MODEL)


def expected_digests(files: dict[str, Path | bytes]) -> dict[str, str]:
    out = {}
    for name in ("config.json", "preprocessor_config.json", MODEL):
        v = files[name]
        out[name] = sha256_file(v) if isinstance(v, Path) else hashlib.sha256(v).hexdigest()
    return out


def _run_kill_series(hub: HubServer, dino_root: Path, src: Path, n_kills: int, throttle: int, connections: int,
                     seed: int, adaptive: bool = False) -> tuple[list[KillReport], int]:
    files: dict[str, Path | bytes] = {p.name: p for p in src.iterdir()}
    hub.add_repo(TINY, files)
    expected = expected_digests(files)
    size = (src / MODEL).stat().st_size
    hub.faults.add(path_suffix=MODEL, host="cdn", throttle_bps=throttle)
    env = {} if adaptive else {"DINOV3_FETCHER_CONNECTIONS": str(connections)}
    rng = random.Random(seed)
    # Every kill but the last is held (kill_and_restart): the points are spread over the file (a run's own
    # bytes stay short of what it misses), so each is reached with the last byte still held back.
    triggers: list[tuple[Callable[[int], bool], bool, bool]] = []
    for i in range(n_kills):
        if i == n_kills - 1:  # the last kill lands in the last MiBs: hashing or publishing may be under way
            left = rng.uniform(0, 2 * MiB)
            triggers.append((lambda served, left=left: served >= size - left, False, False))
        elif i % 7 == 3:  # before or right at the first byte: during start-up and metadata calls
            triggers.append((lambda served: served > 0, True, True))
        else:
            amount = rng.uniform(0.1, 1.4) * size / (n_kills + 1)  # random points spread over the file
            # Every other kill lands unannounced, with bytes in flight and in socket buffers (what a kill in
            # real life does); its cost depends on scheduling, so only the frozen kills are held to the bound.
            triggers.append((lambda served, a=amount: served >= a, i % 2 == 0, True))
    reports = kill_and_restart(hub, dino_root, src / MODEL, expected, triggers, env)
    final_missing = size - partial_state(dino_root, expected[MODEL])[1]
    fetched = finish(hub, dino_root, src / MODEL, expected, env)
    assert fetched <= final_missing + SAVE_EVERY, (fetched, final_missing)
    bound = kill_bound(None if adaptive else connections)
    for r in reports:
        assert r.missing_after <= r.missing_before  # a kill never loses what an earlier run recorded
        if r.frozen:
            assert r.wasted <= bound, (r, bound)
    assert any(r.frozen for r in reports)
    return reports, fetched


def _summary(reports: list[KillReport], fetched: int) -> str:
    def stats(rs: list[KillReport]) -> str:
        w = [r.wasted for r in rs] or [0]
        return f"max {max(w) / MiB:.2f} MiB mean {sum(w) / len(w) / MiB:.2f} MiB"

    frozen = [r for r in reports if r.frozen]
    return (f"{len(reports)} kills; wasted per kill: {len(frozen)} frozen {stats(frozen)}, "
            f"{len(reports) - len(frozen)} unannounced {stats([r for r in reports if not r.frozen])}; "
            f"last run fetched {fetched / MiB:.2f} MiB")


def test_sigkill_at_three_points_then_resume(hub: HubServer, tmp_path: Path, dino_root: Path) -> None:
    src = big_vit_repo_dir(tmp_path / "src", hidden=512, intermediate=2048, layers=3)  # ~38 MB, 2 connections
    reports, fetched = _run_kill_series(hub, dino_root, src, n_kills=5, throttle=16 * MiB, connections=8, seed=1)
    assert len(reports) >= 4  # the last kill point is in the last 2 MiB: the run may have finished first
    print(_summary(reports, fetched))


@pytest.mark.slow
def test_sigkill_at_twenty_random_points_of_a_large_download(hub: HubServer, tmp_path: Path,
                                                             dino_root: Path) -> None:
    src = big_vit_repo_dir(tmp_path / "src", hidden=1024, intermediate=4096, layers=6)  # ~300 MB
    assert (src / MODEL).stat().st_size > 250 * MiB
    reports, fetched = _run_kill_series(hub, dino_root, src, n_kills=22, throttle=12 * MiB, connections=8,
                                        seed=int(os.environ.get("KILL_SEED", "20")))
    assert len(reports) >= 21
    print(_summary(reports, fetched))


@pytest.mark.slow
def test_sigkill_series_with_the_adaptive_budget(hub: HubServer, tmp_path: Path, dino_root: Path) -> None:
    """Streams grow with a link throttled per connection (up to 18 on this file): the bytes in flight at a kill
    (reads under way, bytes not yet recorded) stay within the resume bound all the same."""
    src = big_vit_repo_dir(tmp_path / "src", hidden=1024, intermediate=4096, layers=6)  # ~300 MB
    reports, fetched = _run_kill_series(hub, dino_root, src, n_kills=12, throttle=4 * MiB, connections=0,
                                        seed=int(os.environ.get("KILL_SEED", "21")), adaptive=True)
    assert len(reports) >= 11
    print(_summary(reports, fetched))


# -- SIGINT ---------------------------------------------------------------------------------------------------


def test_sigint_exits_130_saying_it_resumes_and_the_next_run_does(hub: HubServer, dino_root: Path) -> None:
    files = vit_repo_files(hidden=256, intermediate=1024, layers=4)
    size = len(files[MODEL])
    hub.add_repo(TINY, files)
    hub.faults.add(path_suffix=MODEL, host="cdn", throttle_bps=4 * MiB)
    hub.faults.add(path_suffix=MODEL, host="cdn", pause_at=8 * MiB)  # the download cannot end before the Ctrl-C
    proc = start(dino_root)
    identity = hashlib.sha256(files[MODEL]).hexdigest()
    while not partial_state(dino_root, identity)[1]:  # a progress record: the download is the fetch's own
        time.sleep(0.005)
        assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate()
    hub.resume.set()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "resumes" in err and "Traceback" not in err
    _, kept = partial_state(dino_root, hashlib.sha256(files[MODEL]).hexdigest())
    assert kept >= 3 * MiB

    hub.faults.clear()
    hub.clear()
    proc = start(dino_root)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "resuming model.safetensors" in err
    assert hashlib.sha256((dino_root / MODEL).read_bytes()).hexdigest() == hashlib.sha256(files[MODEL]).hexdigest()
    assert hub.bytes_served(MODEL) == size - kept


def test_sigint_during_a_stalled_read_does_not_wait_for_the_read_timeout(hub: HubServer, dino_root: Path) -> None:
    files = vit_repo_files(hidden=256, intermediate=1024, layers=4)
    hub.add_repo(TINY, files)
    hub.faults.add(path_suffix=MODEL, host="cdn", pause_at=6 * MiB)  # the body stops there until hub.resume
    proc = start(dino_root, DINOV3_FETCHER_TIMEOUT="600")  # longer than the test may run
    port, identity = int(hub.cdn_endpoint.rsplit(":", 1)[1]), hashlib.sha256(files[MODEL]).hexdigest()
    # a progress record (at 4 MiB): the download is the fetch's own, past the head start; then every byte sent
    # was read: it is blocked in a read now
    while not (partial_state(dino_root, identity)[1] and hub.paused.is_set()) or socket_queues(port):
        time.sleep(0.005)
        assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate()  # it exits while the read it was in would still wait (the body is held)
    assert not hub.resume.is_set()
    assert proc.returncode == 130 and "resumes" in err, err
    _, kept = partial_state(dino_root, identity)
    assert kept >= 4 * MiB  # what arrived before the stall is kept for the next run


# -- the file changes on the server between runs --------------------------------------------------------------


def _leave_partial(hub: HubServer, dino_root: Path, cut: int) -> None:
    hub.faults.add(path_suffix=MODEL, host="cdn", times=1, cut_after=cut)
    proc = start(dino_root, DINOV3_FETCHER_RETRIES="0")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 10, err
    hub.faults.clear()
    hub.clear()


def test_new_commit_between_runs_discards_the_partial_instead_of_splicing(hub: HubServer,
                                                                          dino_root: Path) -> None:
    v1 = vit_repo_files(seed=1, hidden=256, intermediate=1024, layers=4)
    v2 = vit_repo_files(seed=2, hidden=256, intermediate=1024, layers=4)
    assert len(v1[MODEL]) == len(v2[MODEL]) and v1[MODEL] != v2[MODEL]
    hub.add_repo(TINY, v1)
    _leave_partial(hub, dino_root, 6 * MiB)
    hub.add_commit(TINY, {MODEL: v2[MODEL]})  # main moves on: new commit, new ETag, same size
    proc = start(dino_root, "--json")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert (dino_root / MODEL).read_bytes() == v2[MODEL]
    assert [g.range for g in hub.file_gets(MODEL) if g.host == "cdn"] == [None]  # from byte 0, no splice
    assert hub.bytes_served(MODEL) == len(v2[MODEL])
    assert json.loads(out)["bytes_resumed"] == 0
    assert not list((dino_root / ".dinov3-fetcher" / "partial").iterdir())  # v1's partial is gone too


def test_file_changed_under_the_same_listing_is_refused_not_spliced(hub: HubServer, dino_root: Path) -> None:
    """A mirror whose bytes changed while its listing did not. The CDN's ETag is opaque (the Xet bridge sends its
    Xet hash there), so the sha256 of the bytes decides: the spliced file is refused and discarded."""
    v1 = vit_repo_files(seed=1, hidden=256, intermediate=1024, layers=4)
    v2 = vit_repo_files(seed=2, hidden=256, intermediate=1024, layers=4)
    hub.add_repo(TINY, v1)
    _leave_partial(hub, dino_root, 6 * MiB)
    sha1, sha2 = (hashlib.sha256(v[MODEL]).hexdigest() for v in (v1, v2))
    hub.add_repo("other/repo", v2)
    hub.lfs_blobs[sha1] = hub.lfs_blobs[sha2]  # the CDN now serves v2's bytes (and ETag) at v1's address
    proc = start(dino_root)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 8, err
    assert f"sha256 {sha2[:12]}" not in err  # not v2's digest either: v1's head with v2's tail, refused
    assert "does not match" in err and "discarded" in err
    assert not (dino_root / MODEL).exists()
    assert partial_state(dino_root, sha1) == ([], 0)


# -- a crash in the middle of publishing --------------------------------------------------------------------------

_CRASH_IN_PUBLISH = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from dinov3_fetcher import fetch_dinov3

    root, real = Path(sys.argv[1]), os.replace

    def replace(src: Any, dst: Any, *a: Any, **k: Any) -> None:
        if Path(dst) == root / "model.safetensors":  # SIGKILL right before the weights are moved in
            os.kill(os.getpid(), signal.SIGKILL)
        real(src, dst, *a, **k)

    os.replace = replace
    fetch_dinov3(root, sys.argv[2], update=True)
""").replace("Any", "object")


def test_sigkill_in_the_middle_of_publishing_never_leaves_wrong_bytes(hub: HubServer, dino_root: Path,
                                                                      run_cli: Any) -> None:
    v1 = vit_repo_files(seed=1, hidden=128, intermediate=512, layers=2)
    v2 = vit_repo_files(seed=2, hidden=128, intermediate=512, layers=2)
    assert len(v1[MODEL]) == len(v2[MODEL])
    hub.add_repo(TINY, v1)
    assert run_cli("--dino-root", str(dino_root), "--model", TINY).returncode == 0
    hub.add_commit(TINY, {MODEL: v2[MODEL], "README.md": b"# v2\n"})
    crash = subprocess.run([sys.executable, "-c", _CRASH_IN_PUBLISH, str(dino_root), TINY], env=cli_env(),
                           capture_output=True, text=True, timeout=60)
    assert crash.returncode == -signal.SIGKILL, crash.stderr
    assert not validate_dinov3(dino_root)  # a half-published folder never passes for a checkpoint

    proc = run_cli("--dino-root", str(dino_root), "--model", TINY)
    assert proc.returncode == 0, proc.stderr
    assert (dino_root / MODEL).read_bytes() == v2[MODEL]
    assert (dino_root / "README.md").read_bytes() == b"# v2\n"
    deep = run_cli("verify", "--dino-root", str(dino_root), "--deep")
    assert deep.returncode == 0, deep.stderr
