"""The broadcast protocol: one sender streams files to the other nodes over a gloo group.

Three or four "nodes" on this host (one rank each), each with its own folders: node 0 sends from its source
folder, the others receive into their own partial and final folders. The ranks run under real torchrun (an agent
per node, ``--nnodes 3 --node-rank N``) or forked with the environment torchrun gives its workers
(``launch.forked``). Faults are injected in the worker script (a sink wrapper, a source wrapper that SIGKILLs its
own process), never in the module. The tests of many processes are skipped when torch is not installed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import pytest

import launch
from dinov3_fetcher._broadcast.ends import PartialSink
from dinov3_fetcher._broadcast.relay import POOL, overlap, pieces
from dinov3_fetcher._broadcast.wire import BROKEN, FileSpec
from dinov3_fetcher._errors import ConfigError, DiskSpaceError
from helpers import wait_all

needs_torch = pytest.mark.skipif(
    importlib.util.find_spec("torch") is None,
    reason="torch is not installed (the [load] extra): run bash .ci/install-load-extra.sh",
)
# Under pytest-xdist, the tests whose ranks are forked run on one worker: one fork server imports torch once.
pytestmark = pytest.mark.xdist_group("forked-ranks")

MiB = 1024 * 1024
PIECE = 1 * MiB  # small pieces, so that a few MB make several
# Under torchrun (an agent per node, as in a job) and forked with the environment torchrun sets (the same
# workers, without a torch import per process: launch.forked).
LAUNCHERS = pytest.mark.parametrize("torchrun", [pytest.param(True, marks=pytest.mark.slow, id="torchrun"),
                                                 pytest.param(False, id="forked")])

WORKER = r"""
import datetime as dt, json, os, signal, sys, threading, time
from pathlib import Path

import torch.distributed as dist

from dinov3_fetcher._broadcast.ends import FileSource, PartialSink
from dinov3_fetcher._broadcast.receiver import receive
from dinov3_fetcher._broadcast.sender import send
from dinov3_fetcher._broadcast.wire import FileSpec, leaders_group
from dinov3_fetcher._errors import FetcherError

out_dir, cfg = sys.argv[1], json.loads(Path(sys.argv[2]).read_text())
node = int(os.environ["GROUP_RANK"])
dist.init_process_group("gloo", timeout=dt.timedelta(seconds=60))
rank = dist.get_rank()
members = list(range(dist.get_world_size()))  # one rank per node: each leads its node
group = leaders_group(dist, members, timeout=cfg["timeout"])
files = [FileSpec(*f) for f in cfg["files"]]
result = {"rank": rank, "node": node, "members": members}
t0 = time.monotonic()
try:
    if rank == 0:
        src = Path(cfg["src"])
        grown = {f.name: f.size for f in files}
        grow = cfg.get("grow")
        seen_growing = threading.Event()
        if grow:  # the file is still being written (downloaded) while it is sent
            full = (src / "full" / grow).read_bytes()
            grown[grow] = 0
            (src / grow).write_bytes(b"")

            def writer():
                with open(src / grow, "r+b") as f:
                    for pos in range(0, len(full), 256 * 1024):
                        if pos >= len(full) // 2:
                            seen_growing.wait(60)  # the second half only once the first half is being sent
                        f.seek(pos)
                        f.write(full[pos:pos + 256 * 1024])
                        f.flush()
                        grown[grow] = min(len(full), pos + 256 * 1024)
                        time.sleep(0.02 if seen_growing.is_set() else 0.002)  # then slower than the sender

            threading.Thread(target=writer, daemon=True).start()
        read = {"bytes": 0, "while_growing": 0}

        class Probe(FileSource):
            def ready(self, name):
                fails = cfg.get("source_fails")  # the fault: the file "hold" waits for its last piece (its download's
                if fails and name == fails["hold"]:  # sha256), and meanwhile the download of file "file" fails its
                    size = files[[f.name for f in files].index(name)].size  # sha256
                    if read["bytes"] >= (size - 1) // cfg["piece"] * cfg["piece"]:  # all but the last piece went out
                        from dinov3_fetcher._errors import IntegrityError

                        raise IntegrityError(fails["file"] + ": sha256 differs from the listing", "run again",
                                             file=fails["file"])
                    return size - 1
                return super().ready(name)

            def readinto(self, name, offset, buf):
                if cfg.get("kill_at") is not None and read["bytes"] >= cfg["kill_at"]:
                    os.kill(os.getpid(), signal.SIGKILL)
                super().readinto(name, offset, buf)
                if name == cfg.get("flip") and not read.get("flipped"):  # a bit flips in rank 0's memory after
                    buf[0] ^= 0xFF  # the read, in the first piece of that file: it enters the chain corrupt
                    read["flipped"] = offset
                read["bytes"] += len(buf)
                if name == grow and grown[name] < files[[f.name for f in files].index(name)].size:
                    read["while_growing"] += len(buf)
                    seen_growing.set()

        source = Probe({f.name: src / f.name for f in files}, ready=lambda name: grown[name])
        report = send(files, source, group, meta={"commit": "c0ffee"}, piece=cfg["piece"])
        result["read"] = read
    else:
        sink = PartialSink(Path(cfg["nodes"][str(node)]["partial"]), Path(cfg["nodes"][str(node)]["final"]))
        if cfg.get("corrupt_node") == node:
            inner = sink

            class Corrupt:  # flips one byte of the first piece of the last file (bad disk, DIMM), or dies
                done = False

                def missing(self, spec):
                    return inner.missing(spec)

                def write(self, spec, offset, data):
                    if cfg.get("kill_receiver"):
                        os.kill(os.getpid(), signal.SIGKILL)
                    if cfg.get("disk_full_at") is not None and offset >= cfg["disk_full_at"]:
                        from dinov3_fetcher._errors import DiskSpaceError

                        raise DiskSpaceError("the disk filled up while receiving " + spec.name, "free space", free=0)
                    if spec.name == files[-1].name and not Corrupt.done:
                        data = bytearray(data)
                        data[0] ^= 0xFF
                        Corrupt.done = True
                    inner.write(spec, offset, memoryview(data))

                def complete(self, spec):
                    inner.complete(spec)

                def close(self):
                    inner.close()

            sink = Corrupt()
        if cfg.get("null_sink"):  # the bench's transport ceiling: receive, write nothing, check nothing

            class Null:
                def missing(self, spec):
                    return [(0, spec.size)]

                def write(self, spec, offset, data):
                    pass

                def complete(self, spec):
                    pass

                def close(self):
                    pass

            sink = Null()
        report = receive(sink, group, progress=sys.stderr)
    result.update(ok=True, meta=report.meta,
                  nodes={str(r): {"role": s.role, "bytes": s.bytes, "files": s.files, "sent": s.sent}
                         for r, s in report.nodes.items()})
    code = 0
except FetcherError as exc:
    result.update(ok=False, type=type(exc).__name__, message=exc.message, hint=exc.hint)
    code = exc.exit_code
result["seconds"] = time.monotonic() - t0
hwm = [line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:")]
result["maxrss_mb"] = int(hwm[0].split()[1]) / 1024 if hwm else None  # this process's peak (not ru_maxrss: exec)
Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
try:
    dist.destroy_process_group()
finally:
    sys.exit(code)
"""


def _spec(name: str, data: bytes) -> list[Any]:
    return [name, len(data), hashlib.sha256(data).hexdigest()]


class Job:
    """Three "nodes" on this host: node 0 holds the source files, nodes 1 and 2 their own folders."""

    def __init__(self, tmp: Path, files: dict[str, bytes], grow: str | None = None, nodes: int = 3) -> None:
        self.tmp, self.files, self.nodes = tmp, files, nodes
        src = tmp / "node0" / "source"
        (src / "full").mkdir(parents=True)
        for name, data in files.items():
            (src / ("full" if name == grow else ".") / name).write_bytes(data)
        self.cfg: dict[str, Any] = {
            "files": [_spec(n, d) for n, d in files.items()], "src": str(src), "grow": grow, "piece": PIECE,
            "timeout": 60,
            "nodes": {str(n): {"partial": str(tmp / f"node{n}" / "partial"), "final": str(tmp / f"node{n}" / "final")}
                      for n in range(1, nodes)},
        }
        self.runs = 0

    def final(self, node: int, name: str) -> Path:
        return Path(self.cfg["nodes"][str(node)]["final"]) / name

    def partial(self, node: int, name: str) -> Path:
        return Path(self.cfg["nodes"][str(node)]["partial"]) / hashlib.sha256(self.files[name]).hexdigest()

    def left(self, node: int) -> int:
        """The bytes ``node`` still misses: none of a published file, the recorded rest of a partial one."""
        out = 0
        for name, data in self.files.items():
            record = self.partial(node, name) / "progress.json"
            if record.exists():
                out += sum(e - s for s, e in json.loads(record.read_text())["remaining"])
            elif not self.final(node, name).exists():
                out += len(data)
        return out

    def run(self, torchrun: bool = False,
            **overrides: Any) -> tuple[list[subprocess.CompletedProcess[str]], dict[int, dict[str, Any]]]:
        """One run of the job, until every process ended: under torchrun, or forked."""
        self.runs += 1
        out = self.tmp / f"run{self.runs}"
        out.mkdir()
        cfg_path = out / "cfg.json"
        cfg_path.write_text(json.dumps({**self.cfg, **overrides}))
        worker = self.tmp / "worker.py"
        worker.write_text(WORKER)
        args = [str(out), str(cfg_path)]
        if torchrun:
            procs: list[Any] = launch.torchrun(worker, args, nodes=self.nodes)
        else:
            procs = launch.forked(worker, args, out, nodes=self.nodes)
        done = wait_all(procs)
        results = {int(f.stem[4:]): json.loads(f.read_text()) for f in out.glob("rank*.json")}
        return done, results


def _blob(n: int, seed: int) -> bytes:
    return (hashlib.sha256(str(seed).encode()).digest() * (n // 32 + 1))[:n]


def _files() -> dict[str, bytes]:
    return {"model-00001-of-00002.safetensors": _blob(5 * MiB + 123, 1),
            "model-00002-of-00002.safetensors": _blob(6 * MiB + 77, 2)}


def _stderr(procs: list[subprocess.CompletedProcess[str]]) -> list[str]:
    return [p.stderr[-3000:] for p in procs]


@needs_torch
@LAUNCHERS
def test_cold_partial_warm_and_a_file_sent_while_it_grows(tmp_path: Path, torchrun: bool) -> None:
    """Four nodes: node 1 is cold, node 2 holds file a and a partial of file b, node 3 holds both."""
    files = _files()
    a, b = files
    job = Job(tmp_path, files, grow=b, nodes=4)
    for node, names in ((2, [a]), (3, [a, b])):
        for name in names:
            job.final(node, name).parent.mkdir(parents=True, exist_ok=True)
            job.final(node, name).write_bytes(files[name])
    folder = job.partial(2, b)
    folder.mkdir(parents=True)
    (folder / "data").write_bytes(files[b][:4 * MiB])
    kept = [(int(2.5 * MiB), 3 * MiB), (4 * MiB, len(files[b]))]  # missing: a hole and the tail
    (folder / "progress.json").write_text(json.dumps({"identity": hashlib.sha256(files[b]).hexdigest(),
                                                      "size": len(files[b]), "remaining": kept}))
    node2_needs = sum(e - s for s, e in kept)

    procs, results = job.run(torchrun=torchrun)
    assert all(p.returncode == 0 for p in procs), _stderr(procs)
    assert sorted(results) == [0, 1, 2, 3] and all(r["ok"] for r in results.values()), results
    assert results[0]["members"] == [0, 1, 2, 3]
    nodes = results[1]["nodes"]
    assert all(r["nodes"] == nodes for r in results.values())  # every rank learns every node's bytes
    assert all(r["meta"] == {"commit": "c0ffee"} for r in results.values())
    total = sum(len(d) for d in files.values())
    assert (nodes["1"]["role"], nodes["1"]["bytes"]) == ("receiver", total)
    assert nodes["2"]["bytes"] == node2_needs and nodes["2"]["files"] == {b: node2_needs}  # only what it missed
    assert (nodes["3"]["role"], nodes["3"]["bytes"]) == ("warm", 0)  # took no part in the transfer
    # a chain: rank 0 -> node 1 (misses most) -> node 2; each link carries what the rest of the chain misses, once
    assert nodes["0"]["bytes"] == nodes["0"]["sent"] == total
    assert nodes["1"]["sent"] == node2_needs and nodes["2"]["sent"] == nodes["3"]["sent"] == 0
    assert results[0]["read"]["bytes"] == total  # each piece is read once
    assert results[0]["read"]["while_growing"] > 0  # file b was sent while it was still being written
    for node in (1, 2, 3):
        for name, data in files.items():
            assert job.final(node, name).read_bytes() == data
    assert not job.partial(2, b).exists() and not job.partial(1, a).exists()
    assert "rank 1 received 11.5 MB of 11.5 MB from rank 0" in procs[1].stderr  # the progress line
    assert "from rank 1" in procs[2].stderr
    assert "received" not in procs[3].stderr


@needs_torch
@LAUNCHERS
def test_sender_killed_midway_one_error_everywhere_then_the_rerun_resumes(tmp_path: Path, torchrun: bool) -> None:
    files = _files()
    job = Job(tmp_path, files)
    procs, results = job.run(torchrun=torchrun, kill_at=(POOL + 2) * PIECE)  # two pieces past rank 0's buffers
    assert procs[0].returncode != 0
    assert sorted(results) == [1, 2], _stderr(procs)  # rank 0 was killed, the others answered
    assert {(r["type"], r["message"]) for r in results.values()} == {("NetworkError", BROKEN)}
    left = {node: job.left(node) for node in (1, 2)}
    total = sum(len(d) for d in files.values())
    assert all(0 < n <= total - 2 * PIECE for n in left.values()), left  # what arrived before the kill is recorded
    # rank 0 read the first file whole before the kill: a node may have verified and placed it (whole, right);
    # the second was never read whole, so no node holds it
    a, b = files
    for node in (1, 2):
        assert not job.final(node, a).exists() or job.final(node, a).read_bytes() == files[a]
        assert not job.final(node, b).exists()

    procs, results = job.run(torchrun=torchrun)
    assert all(p.returncode == 0 for p in procs), _stderr(procs)
    nodes = results[0]["nodes"]
    for node in (1, 2):
        assert sum(nodes[str(node)]["files"].values()) == left[node]  # only the rest
        for name, data in files.items():
            assert job.final(node, name).read_bytes() == data


@needs_torch
def test_rank_0s_file_failing_its_sha256_is_dropped_on_every_node_and_only_that_file(tmp_path: Path) -> None:
    files = _files()
    a, b = files
    job = Job(tmp_path, files)
    # rank 0 has sent all of a but its last piece (its sha256 pending) when its copy of b fails its sha256
    procs, results = job.run(source_fails={"hold": a, "file": b})
    assert sorted(results) == [0, 1, 2], _stderr(procs)
    assert {(r["type"], r["message"]) for r in results.values()} == {("IntegrityError", results[0]["message"])}
    assert b in results[0]["message"]
    tail = len(files[a]) - (len(files[a]) - 1) // PIECE * PIECE
    for node in (1, 2):  # what a node holds of b is dropped; what it holds of a is sound, and kept
        assert not job.partial(node, b).exists()
        assert json.loads((job.partial(node, a) / "progress.json").read_text())["remaining"] == [
            [len(files[a]) - tail, len(files[a])]]

    procs, results = job.run()
    assert all(p.returncode == 0 for p in procs), _stderr(procs)
    for node in (1, 2):  # the rerun sends only a's last piece, and b
        assert results[0]["nodes"][str(node)]["files"] == {a: tail, b: len(files[b])}
        assert all(job.final(node, n).read_bytes() == d for n, d in files.items())


@needs_torch
def test_a_corrupt_piece_entering_the_chain_is_published_nowhere_and_the_rerun_completes(tmp_path: Path) -> None:
    files = _files()
    a, b = files
    job = Job(tmp_path, files)
    procs, results = job.run(flip=b)  # rank 0 -> node 1 -> node 2: both get the bad piece of b
    assert sorted(results) == [0, 1, 2], _stderr(procs)
    assert all(p.returncode != 0 for p in procs), _stderr(procs)
    assert {r["type"] for r in results.values()} == {"IntegrityError"}
    assert len({(r["message"], r["hint"]) for r in results.values()}) == 1  # node 1's, the lowest failing rank
    assert b in results[0]["message"] and "sha256" in results[0]["message"]
    for node in (1, 2):
        assert job.final(node, a).read_bytes() == files[a]
        assert not job.final(node, b).exists() and not job.partial(node, b).exists()  # discarded
    procs, results = job.run()
    assert all(r["ok"] for r in results.values()), _stderr(procs)
    nodes = results[0]["nodes"]
    assert nodes["1"]["files"] == nodes["2"]["files"] == {b: len(files[b])}
    for node in (1, 2):
        assert job.final(node, b).read_bytes() == files[b]


@needs_torch
@pytest.mark.slow
def test_a_corrupt_piece_on_one_node_is_caught_there_and_raised_everywhere(tmp_path: Path) -> None:
    files = _files()
    a, b = files
    job = Job(tmp_path, files)
    procs, results = job.run(corrupt_node=2)
    assert sorted(results) == [0, 1, 2], _stderr(procs)
    assert all(p.returncode != 0 for p in procs), _stderr(procs)
    assert {r["type"] for r in results.values()} == {"IntegrityError"}
    assert len({(r["message"], r["hint"]) for r in results.values()}) == 1
    assert b in results[0]["message"] and "sha256" in results[0]["message"]
    assert job.final(1, b).read_bytes() == files[b]  # node 1 is fine
    assert job.final(2, a).read_bytes() == files[a]
    assert not job.final(2, b).exists() and not job.partial(2, b).exists()  # the bad copy was discarded


# -- without torch -----------------------------------------------------------------------------------------


def test_pieces_stay_inside_their_windows_and_go_as_far_down_the_chain_as_they_are_needed() -> None:
    assert list(pieces([[(0, 10)]], 4)) == [(0, 4, 0), (4, 8, 0), (8, 10, 0)]
    # the first member misses everything, the second [3, 9) and [13, 14), the third nothing of this file
    assert list(pieces([[(0, 16)], [(3, 9), (13, 14)], []], 4)) == [
        (0, 3, 0), (3, 4, 1), (4, 8, 1), (8, 9, 1), (9, 12, 0), (12, 13, 0), (13, 14, 1), (14, 16, 0)]
    assert list(pieces([[(2, 3)], [(6, 7)]], 4)) == [(2, 3, 0), (6, 7, 1)]  # the first member passes [6, 7) on
    assert list(pieces([[], []], 4)) == []
    assert overlap([(3, 9), (13, 14)], 0, 16) == [(3, 9), (13, 14)]
    assert overlap([(3, 9), (13, 14)], 4, 8) == [(4, 8)] and overlap([(3, 9)], 9, 12) == []


def test_partial_sink_records_what_it_wrote_in_the_fetchers_format(tmp_path: Path) -> None:
    from dinov3_fetcher._http import HttpPool
    from dinov3_fetcher._job import Job as _Job
    from dinov3_fetcher._job import Target
    from dinov3_fetcher._progress import Progress
    from dinov3_fetcher._state import StateDir
    from dinov3_fetcher._transfer import Settings, Transfer

    def refuse(status: int, headers: dict[str, str], body: bytes, url: str) -> NoReturn:
        raise AssertionError("no request is made")

    data = _blob(3 * MiB + 5, 7)
    spec = FileSpec("model.safetensors", len(data), hashlib.sha256(data).hexdigest())
    sink = PartialSink(tmp_path / "partial", tmp_path / "final")
    assert sink.missing(spec) == [(0, len(data))]
    sink.write(spec, 0, memoryview(data)[:MiB])
    sink.write(spec, 2 * MiB, memoryview(data)[2 * MiB:])
    sink.close()
    folder = tmp_path / "partial" / spec.sha256
    assert sink.missing(spec) == [(MiB, 2 * MiB)]
    # the fetcher's own transfer code reads the record as a resumable partial of the same bytes
    transfer = Transfer(Settings(), HttpPool(5, "test"), StateDir(tmp_path), Progress(quiet=True), refuse)
    job = _Job(transfer.context, Target(spec.name, "http://unused", spec.size, spec.sha256, spec.sha256), folder)
    os.close(job.fd)
    assert job.resumed_from == len(data) - MiB
    assert [(s.pos, s.end) for s in job.segments] == [(MiB, 2 * MiB)]

    sink = PartialSink(tmp_path / "partial", tmp_path / "final")  # a later run resumes and publishes
    sink.write(spec, MiB, memoryview(data)[MiB:2 * MiB])
    sink.complete(spec)
    sink.close()
    assert (tmp_path / "final" / spec.name).read_bytes() == data and not folder.exists()
    assert sink.missing(spec) == []


def test_a_receivers_disk_errors_say_what_to_do_and_its_own_errors_pass_unchanged(
        tmp_path: Path, tmpfs: Callable[..., Path]) -> None:
    data = _blob(2 * MiB, 3)
    spec = FileSpec("model.safetensors", len(data), hashlib.sha256(data).hexdigest())
    small = tmpfs("1m")  # room for the folder and its record, not for the bytes
    with pytest.raises(DiskSpaceError) as full:
        PartialSink(small / "partial", small / "final").write(spec, 0, memoryview(data))
    assert full.value.message.startswith("the disk filled up while receiving model.safetensors (")
    assert "the transfer resumes" in full.value.hint

    read_only = tmpfs("4m")
    r = subprocess.run(["mount", "-o", "remount,ro", str(read_only)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot remount read-only: {r.stderr}")
    with pytest.raises(ConfigError) as refused:
        PartialSink(read_only / "partial", read_only / "final").write(spec, 0, memoryview(data))
    assert "read-only filesystem" in refused.value.message

    class Claiming(PartialSink):  # a sink whose own code refuses the file (the fetcher's: its space check)
        def missing(self, spec: FileSpec) -> list[tuple[int, int]]:
            raise DiskSpaceError("not enough disk space in dino_root: 2.1 MB still to download", "free some space",
                                 needed=len(data), free=0)

    with pytest.raises(DiskSpaceError) as own:
        Claiming(tmp_path / "partial", tmp_path / "final").write(spec, 0, memoryview(data))
    assert (own.value.message, own.value.needed) == ("not enough disk space in dino_root: 2.1 MB still to download",
                                                     len(data))


@needs_torch
@pytest.mark.slow
def test_a_relay_killed_midway_every_other_member_raises_one_error_and_the_rerun_resumes(tmp_path: Path) -> None:
    files = _files()
    job = Job(tmp_path, files, nodes=4)  # the chain: rank 0 -> node 1 -> node 2 -> node 3
    procs, results = job.run(corrupt_node=2, kill_receiver=True)  # node 2 dies at its first write
    assert sorted(results) == [0, 1, 3], _stderr(procs)
    assert {(r["type"], r["message"]) for r in results.values()} == {("NetworkError", BROKEN)}
    total = sum(len(d) for d in files.values())
    left = {node: job.left(node) for node in (1, 2, 3)}
    assert left[2] > 0 and left[1] < total  # the head got pieces, and recorded them
    procs, results = job.run()
    assert all(r["ok"] for r in results.values()), _stderr(procs)
    nodes = results[0]["nodes"]
    for node in (1, 2, 3):
        assert sum(nodes[str(node)]["files"].values()) == left[node]  # only the rest
        for name, data in files.items():
            assert job.final(node, name).read_bytes() == data


@needs_torch
@pytest.mark.slow
def test_a_full_disk_on_one_node_is_raised_everywhere_and_what_it_wrote_is_kept(tmp_path: Path) -> None:
    files = _files()
    a, b = files
    job = Job(tmp_path, files)
    procs, results = job.run(corrupt_node=1, disk_full_at=2 * MiB)
    assert sorted(results) == [0, 1, 2], _stderr(procs)
    assert {(r["type"], r["message"]) for r in results.values()} == {("DiskSpaceError", f"the disk filled up while "
                                                                                          f"receiving {a}")}
    assert job.final(2, b).read_bytes() == files[b]  # node 2 was fine
    record = json.loads((job.partial(1, a) / "progress.json").read_text())
    assert record["remaining"] == [[2 * MiB, len(files[a])]]  # the first 2 MiB stay
    procs, results = job.run()
    assert all(r["ok"] for r in results.values()), _stderr(procs)
    assert results[0]["nodes"]["1"]["bytes"] == len(files[a]) - 2 * MiB + len(files[b])
    assert results[0]["nodes"]["2"]["role"] == "warm"
