"""fetch_once(..., share="broadcast") with several "nodes" on this host (each its own dino_root), against the
Hub emulator: rank 0 downloads once, the other nodes' leaders receive its bytes over gloo.

Each worker writes what it got (path, commit, nodes' stats, or the error) to rank<N>.json. One test runs under
real ``torchrun --nnodes 3 --node-rank N`` (an agent per node); the others fork the ranks with the environment
torchrun gives its workers (``launch.forked``: separate processes, gloo over TCP, real signals, without a torch
import per process), as tests/test_broadcast.py does. Skipped, with the reason, when torch is not installed.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import launch
from checkpoints import shard_files, vit_repo_files
from conftest import mounted_tmpfs
from dinov3_fetcher import fetch_dinov3
from dinov3_fetcher._broadcast.wire import BROKEN
from dinov3_fetcher._distributed import fetch_once
from dinov3_fetcher._errors import ConfigError
from helpers import wait_all
from hub_server import HubServer
from launch import job_env
from modelscope_server import ModelScopeServer

needs_torch = pytest.mark.skipif(
    importlib.util.find_spec("torch") is None,
    reason="torch is not installed (the [load] extra): run bash .ci/install-load-extra.sh",
)
# Under pytest-xdist, the tests whose ranks are forked run on one worker: one fork server imports torch once.
pytestmark = pytest.mark.xdist_group("forked-ranks")

MODEL = "tiny-org/dinov3-vit-share"
WEIGHTS = "model.safetensors"
KiB = 1024
PAUSE = 2 * 1024 * KiB  # where the Hub holds rank 0's download of the weights (of ~3 MB) back
WORKER = """\
import json, os, signal, sys, time
from pathlib import Path

cfg = json.loads(Path(sys.argv[2]).read_text())
out_dir = sys.argv[1]
node, rank = int(os.environ["GROUP_RANK"]), int(os.environ["RANK"])
cfg.update(cfg.get("node", {}).get(str(node), {}))  # what one node does differently
root = cfg["root"].replace("{node}", str(node))

import dinov3_fetcher._broadcast.job as share

share.PIECE = cfg["piece"]  # small pieces: several even for a tiny checkpoint
if rank == 0 and cfg.get("kill_at") is not None:  # the fault: rank 0 dies (SIGKILL) in the middle of the weights
    from dinov3_fetcher._broadcast import ends as bf

    read = bf.FileSource.readinto

    def readinto(self, name, offset, buf):
        if name == "model.safetensors" and offset >= cfg["kill_at"]:
            os.kill(os.getpid(), signal.SIGKILL)
        read(self, name, offset, buf)

    bf.FileSource.readinto = readinto
if rank == 0 and cfg.get("interrupt_at") is not None:  # the fault: Ctrl-C on rank 0 in the middle of the weights
    from dinov3_fetcher._broadcast import ends as bf

    read_, sent = bf.FileSource.readinto, []

    def readinto_(self, name, offset, buf):
        if name == "model.safetensors" and offset >= cfg["interrupt_at"] and not sent:
            sent.append(offset)
            os.kill(os.getpid(), signal.SIGINT)  # to the main thread, wherever it is (here: waiting on the sending)
            while self.error is None:  # (self: the FetchingSource) this piece waits for the Ctrl-C to land
                time.sleep(0.01)
        read_(self, name, offset, buf)

    bf.FileSource.readinto = readinto_
if rank == 0 and cfg.get("interrupt_after_send"):  # the fault: Ctrl-C on rank 0 once every node's verdict was a
    from dinov3_fetcher._broadcast import feed  # success (after the last piece), before the job's own outcome

    serve = feed.FetchingSource.serve

    def serve_(self, group, piece):
        out = serve(self, group, piece)
        os.kill(os.getpid(), signal.SIGINT)  # to the main thread, waiting for this sending to end
        with self.cond:
            while self.error is None:  # it took the Ctrl-C
                self.cond.wait()
        return out

    feed.FetchingSource.serve = serve_

if cfg.get("die_at") is not None and os.environ["LOCAL_RANK"] == "0":  # the fault: this node's leader dies
    from dinov3_fetcher._broadcast import node as receiving  # (SIGKILL) once it has written that far

    write = receiving.StateSink.write

    def write_(self, spec, offset, data):
        if spec.name == "model.safetensors" and offset >= cfg["die_at"]:
            os.kill(os.getpid(), signal.SIGKILL)
        write(self, spec, offset, data)

    receiving.StateSink.write = write_

if cfg.get("ctrl_c_at") is not None and os.environ["LOCAL_RANK"] == "0":  # the fault: Ctrl-C on this node's leader
    from dinov3_fetcher._broadcast import node as receiving  # once it has written that far (its writer's thread
    # sends it; Python raises it in the main thread)

    write_at, pressed = receiving.StateSink.write, []

    def ctrl_c(self, spec, offset, data):
        if spec.name == "model.safetensors" and offset >= cfg["ctrl_c_at"] and not pressed:
            pressed.append(offset)
            os.kill(os.getpid(), signal.SIGINT)
        write_at(self, spec, offset, data)

    receiving.StateSink.write = ctrl_c

import torch.distributed as dist

from dinov3_fetcher._distributed import fetch_once
from dinov3_fetcher._errors import FetcherError

dist.init_process_group("gloo")
t0 = time.monotonic()
try:
    if cfg.get("teacher"):  # through the bridge: DinoV3Config(share=...) -> load_teacher -> fetch_once
        import torch
        from dinov3_bridge import DinoV3Config, DinoV3Teacher

        teacher = DinoV3Teacher(DinoV3Config(root=root, model_name=cfg["model"], share="broadcast"))
        with torch.no_grad():
            out = teacher.model(pixel_values=teacher.preprocess(torch.zeros(224, 224, 3, dtype=torch.uint8)))
        result = {"ok": True, "path": root, "shape": list(out.last_hidden_state.shape)}
    else:
        res = fetch_once(root, cfg["model"], share=cfg.get("share", "broadcast"), timeout=cfg.get("timeout", 120),
                         update=cfg.get("update", False), source=cfg.get("source"), details=True)
        result = {"ok": True, **res.to_dict()}
    dist.barrier()  # the ranks are still in step
    code = 0
except FetcherError as exc:
    result = {"ok": False, "type": type(exc).__name__, "message": exc.message, "hint": exc.hint}
    code = exc.exit_code
result.update(rank=rank, node=node, seconds=time.monotonic() - t0)
Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
dist.destroy_process_group()
sys.exit(code)
"""


class Job:
    """``nodes`` "nodes" of ``nproc`` ranks on this host, node N's dino_root being tmp/node<N>/dinov3."""

    def __init__(self, tmp: Path, nodes: int = 3, nproc: int = 1, piece: int = 256 * KiB) -> None:
        self.tmp, self.nodes, self.nproc, self.runs = tmp, nodes, nproc, 0
        self.procs: list[Any] = []  # the processes of the latest run
        self.cfg: dict[str, Any] = {"root": str(tmp / "node{node}" / "dinov3"), "model": MODEL, "piece": piece}

    def root(self, node: int) -> Path:
        return self.tmp / f"node{node}" / "dinov3"

    def run(self, *, torchrun: bool = False, env: dict[str, str] | None = None,
            rank_of: Callable[[int, int], int] | None = None,
            **overrides: Any) -> tuple[list[subprocess.CompletedProcess[str]], dict[int, dict[str, Any]]]:
        """One run of the job, until every process ended; ``rank_of(node, local_rank)`` numbers the ranks (not
        under torchrun)."""
        self.runs += 1
        out = self.tmp / f"run{self.runs}"
        out.mkdir()
        cfg = out / "cfg.json"
        cfg.write_text(json.dumps({**self.cfg, **overrides}))
        worker = self.tmp / "worker.py"
        worker.write_text(WORKER)
        args, job = [str(out), str(cfg)], job_env(**(env or {}))
        if torchrun:
            self.procs = launch.torchrun(worker, args, nodes=self.nodes, nproc=self.nproc, env=job)
        else:
            self.procs = launch.forked(worker, args, out, nodes=self.nodes, nproc=self.nproc, env=job,
                                       rank_of=rank_of)
        done = wait_all(self.procs)
        results = {int(f.stem[4:]): json.loads(f.read_text()) for f in out.glob("rank*.json")}
        return done, results


def _stderr(procs: list[subprocess.CompletedProcess[str]]) -> list[str]:
    return [p.stderr[-3000:] for p in procs]


@pytest.fixture
def model(hub: HubServer) -> dict[str, bytes]:
    """A DINOv3 ViT of ~3 MB: a dozen 256 KiB windows, so that a transfer can be cut in the middle."""
    files = vit_repo_files(hidden=128, intermediate=512, layers=4)
    hub.add_repo(MODEL, files)
    return files


def _listings(hub: HubServer) -> list[Any]:
    return [r for r in hub.requests if r.path.startswith("/api/models/")]


def _manifest(root: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((root / ".dinov3-fetcher" / "manifest.json").read_text())
    return data


def _same_checkpoint(job: Job, node: int, files: dict[str, bytes]) -> None:
    for name in (WEIGHTS, "config.json", "preprocessor_config.json"):
        assert (job.root(node) / name).read_bytes() == files[name], (node, name)
    m = _manifest(job.root(node))
    assert m["complete"] and m["files"][WEIGHTS]["sha256"] == hashlib.sha256(files[WEIGHTS]).hexdigest()


@needs_torch
def test_four_nodes_relay_the_checkpoint_along_a_chain_each_link_carrying_it_once(
        hub: HubServer, model: dict[str, bytes], tmp_path: Path) -> None:
    job = Job(tmp_path, nodes=4)
    procs, results = job.run()
    assert all(p.returncode == 0 for p in procs), _stderr(procs)
    assert sorted(results) == [0, 1, 2, 3] and all(r["ok"] for r in results.values()), results
    assert hub.bytes_served(WEIGHTS) == len(model[WEIGHTS])  # one download for the whole job
    assert len(hub.file_gets("/config.json")) == 1 and len(_listings(hub)) == 1
    assert all(r["path"] == str(job.root(r["node"])) for r in results.values())  # each node's own dino_root
    for node in range(4):
        _same_checkpoint(job, node, model)
    total = sum(len(model[n]) for n in _manifest(job.root(0))["files"])
    nodes = results[0]["nodes"]
    assert all(r["nodes"] == nodes for r in results.values())  # every rank learns every node's stats
    # rank 0 -> node 1 -> node 2 -> node 3: rank 0 sends the checkpoint once, each relay passes it on once, the
    # last node sends nothing; every node takes all of it for itself
    assert [nodes[r]["sent"] for r in "0123"] == [total, total, total, 0]
    assert [nodes[r]["role"] for r in "0123"] == ["sender", "receiver", "receiver", "receiver"]
    assert all(nodes[r]["bytes"] == sum(nodes[r]["files"].values()) == total for r in "123")
    assert "from rank 0" in procs[1].stderr and "from rank 2" in procs[3].stderr  # the progress lines

    # node 2 lost its disk; nodes 1 and 3 are warm: outside the chain, node 2 takes everything from rank 0
    shutil.rmtree(job.root(2))
    hub.clear()
    procs, results = job.run()
    assert all(p.returncode == 0 for p in procs), _stderr(procs)
    nodes = results[0]["nodes"]
    assert [(nodes[r]["role"], nodes[r]["bytes"], nodes[r]["sent"]) for r in "0123"] == [
        ("sender", total, total), ("warm", 0, 0), ("receiver", total, 0), ("warm", 0, 0)]
    assert hub.bytes_served(WEIGHTS) == 0 and not _listings(hub)  # rank 0 was warm
    _same_checkpoint(job, 2, model)


@needs_torch
@pytest.mark.slow
def test_three_nodes_under_torchrun_the_hub_serves_the_weights_once_and_a_warm_node_is_skipped(
        hub: HubServer, model: dict[str, bytes], tmp_path: Path) -> None:
    job = Job(tmp_path, nproc=2)
    procs, results = job.run(torchrun=True)
    assert all(p.returncode == 0 for p in procs), _stderr(procs)
    assert sorted(results) == list(range(6)) and all(r["ok"] for r in results.values()), results
    assert hub.bytes_served(WEIGHTS) == len(model[WEIGHTS])  # one download for the whole job
    assert len(hub.file_gets("/config.json")) == 1
    assert all(r["path"] == str(job.root(r["node"])) for r in results.values())  # each node's own dino_root
    assert len({r["commit"] for r in results.values()}) == 1
    for node in (0, 1, 2):
        _same_checkpoint(job, node, model)
    assert _manifest(job.root(0))["source"] == "hf"
    for node in (1, 2):
        m = _manifest(job.root(node))
        assert m["source"] == "hf" and m["endpoint"].startswith("broadcast: rank 0 on ") and "hf" in m["endpoint"]
        assert m["commit"] == _manifest(job.root(0))["commit"]
        assert not list((job.root(node) / ".dinov3-fetcher" / "partial").iterdir())
        hub.clear()  # what a node received is the checkpoint asked for: a later plain fetch there is warm
        assert fetch_dinov3(job.root(node), MODEL, details=True).cached and hub.requests == []
    total = sum(len(model[n]) for n in _manifest(job.root(0))["files"])
    nodes = results[0]["nodes"]
    assert all(r["nodes"] == nodes for r in results.values())  # every rank learns every node's stats
    assert set(nodes) == {"0", "2", "4"}  # the leaders: rank 0 and local rank 0 of nodes 1 and 2
    assert [nodes[r]["role"] for r in ("0", "2", "4")] == ["sender", "receiver", "receiver"]
    assert nodes["2"]["bytes"] == nodes["4"]["bytes"] == total and nodes["0"]["bytes"] == total
    assert "received" in procs[1].stderr and "from rank 0" in procs[1].stderr  # the progress line (node 1)
    assert "received" not in procs[0].stderr

    # node 2 lost its disk; node 1 is warm: it takes no part, node 2 receives everything, the Hub nothing
    shutil.rmtree(job.root(2))
    procs, results = job.run()
    assert all(p.returncode == 0 for p in procs), _stderr(procs)
    nodes = results[0]["nodes"]
    assert (nodes["2"]["role"], nodes["2"]["bytes"]) == ("warm", 0)
    assert (nodes["4"]["role"], nodes["4"]["bytes"]) == ("receiver", total)
    assert hub.bytes_served(WEIGHTS) == 0  # counted since the clear above: nothing more from the Hub
    _same_checkpoint(job, 2, model)


def _while_paused(job: Job, hub: HubServer, until: Callable[[], bool], **overrides: Any) -> tuple[Any, bool]:
    """Run the job while the Hub holds back a body at a fault's ``pause_at``: wait for ``until`` to hold (or
    the job to end), let the body go on, and return the job's (processes, results) and whether ``until`` held
    while the Hub held the rest back. Rank 0 waits for the Hub as long as it takes (its read timeout: 300 s);
    a job that never gets there ends at pytest's timeout, its processes killed."""
    out: list[Any] = []
    env = {"DINOV3_FETCHER_TIMEOUT": "300", **overrides.pop("env", {})}
    runner = threading.Thread(target=lambda: out.append(job.run(env=env, **overrides)), daemon=True)
    runner.start()
    held = False
    try:
        while not hub.paused.wait(0.05) and runner.is_alive():
            pass
        while not (held := until()) and runner.is_alive():
            time.sleep(0.05)
        held = held and runner.is_alive()
    except BaseException:
        for p in job.procs:
            p.kill()
        raise
    finally:
        hub.resume.set()
    runner.join()
    assert out, "the job's run failed"
    return out[0], held


def _left(root: Path, sha: str) -> int:
    """Bytes of the weights a node's partial folder (claimed or released) still misses, as recorded."""
    records = list((root / ".dinov3-fetcher" / "partial").glob(f"{sha}*/progress.json"))
    assert len(records) == 1, records
    return sum(e - s for s, e in json.loads(records[0].read_text())["remaining"])


def _received(root: Path, sha: str) -> int:
    """Bytes of the weights a receiving node has written in its partial folder (claimed or released)."""
    return sum(p.stat().st_size for p in (root / ".dinov3-fetcher" / "partial").glob(f"{sha}*/data"))


@needs_torch
def test_receivers_get_the_weights_while_rank_0_still_downloads_them(hub: HubServer, model: dict[str, bytes],
                                                                     tmp_path: Path) -> None:
    # The Hub stops the weights at 2 MiB (of ~3 MB) until the test lets them go on: rank 0's download is
    # then half done, and the receivers must already hold what rank 0 has written and hashed of it.
    job = Job(tmp_path)
    size, sha = len(model[WEIGHTS]), hashlib.sha256(model[WEIGHTS]).hexdigest()
    assert size > PAUSE + 256 * KiB
    hub.faults.add(pause_at=PAUSE, path_suffix=WEIGHTS, times=1)
    got: dict[int, int] = {}

    def received() -> bool:  # rank 0 reads 1 MiB at a time: it has written at least 1 MiB when the Hub stops
        got.update({node: _received(job.root(node), sha) for node in (1, 2)})
        return min(got.values()) >= 1024 * KiB and hub.bytes_served(WEIGHTS) == PAUSE \
            and not (job.root(0) / WEIGHTS).exists()

    (procs, results), held = _while_paused(job, hub, received)
    assert held and max(got.values()) <= PAUSE, got  # while the Hub still held the rest back
    assert all(p.returncode == 0 for p in procs), _stderr(procs)
    assert sorted(results) == [0, 1, 2] and all(r["ok"] for r in results.values()), results
    assert hub.bytes_served(WEIGHTS) == size  # still one download for the whole job
    for node in (0, 1, 2):
        _same_checkpoint(job, node, model)
    nodes = results[0]["nodes"]
    assert nodes["1"]["files"][WEIGHTS] == nodes["2"]["files"][WEIGHTS] == size


@needs_torch
def test_a_sharded_checkpoint_goes_out_in_order_while_later_shards_still_download(hub: HubServer,
                                                                                   tmp_path: Path) -> None:
    files = shard_files(vit_repo_files(hidden=128, intermediate=512, layers=4), 3)
    hub.add_repo(MODEL + "-sharded", files)
    first, second = "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors"
    assert len(files[second]) > 256 * KiB
    hub.faults.add(pause_at=256 * KiB, path_suffix=second, times=1)
    job = Job(tmp_path)
    sha = hashlib.sha256(files[first]).hexdigest()
    (procs, results), held = _while_paused(  # the first shard, whole and verified, on both receivers
        job, hub, lambda: hub.bytes_served(second) == 256 * KiB
        and all(list(job.root(n).glob(f".dinov3-fetcher/staged/*/{sha}.{first}")) for n in (1, 2)),
        model=MODEL + "-sharded")
    assert held
    assert all(p.returncode == 0 for p in procs), _stderr(procs)
    assert sorted(results) == [0, 1, 2] and all(r["ok"] for r in results.values()), results
    shards = [n for n in files if n.endswith(".safetensors")]
    assert len(shards) == 3 and all(hub.bytes_served(n) == len(files[n]) for n in shards)  # each once
    published = set(_manifest(job.root(0))["files"])
    assert set(shards) < published
    for node in (0, 1, 2):
        assert all((job.root(node) / n).read_bytes() == files[n] for n in published), node
        assert _manifest(job.root(node))["complete"] and set(_manifest(job.root(node))["files"]) == published


@needs_torch
@pytest.mark.slow
def test_weights_rank_0_holds_already_are_sent_whole_while_its_fetch_runs(
        hub: HubServer, model: dict[str, bytes], tmp_path: Path) -> None:
    job = Job(tmp_path)
    procs, _ = job.run()
    assert all(p.returncode == 0 for p in procs), _stderr(procs)
    # rank 0 lost its manifest (it fetches again: the listed bytes it holds are adopted, not downloaded);
    # the other nodes lost everything
    (job.root(0) / ".dinov3-fetcher" / "manifest.json").unlink()
    for node in (1, 2):
        shutil.rmtree(job.root(node))
    hub.clear()
    procs, results = job.run()
    assert all(p.returncode == 0 for p in procs), _stderr(procs)
    assert hub.bytes_served(WEIGHTS) == 0 and any(r.path.startswith("/api/models/") for r in hub.requests)
    nodes = results[0]["nodes"]
    assert nodes["1"]["files"][WEIGHTS] == nodes["2"]["files"][WEIGHTS] == len(model[WEIGHTS])
    for node in (0, 1, 2):
        _same_checkpoint(job, node, model)


@needs_torch
def test_bytes_rank_0_got_wrong_are_sent_while_it_downloads_but_published_nowhere(
        hub: HubServer, model: dict[str, bytes], tmp_path: Path) -> None:
    job = Job(tmp_path)
    size, sha = len(model[WEIGHTS]), hashlib.sha256(model[WEIGHTS]).hexdigest()
    hub.faults.add(corrupt_at=100, pause_at=PAUSE, path_suffix=WEIGHTS, times=1)
    # the receivers hold a wrong MiB (rank 0 only finds out by its sha256, at the end)
    (procs, results), held = _while_paused(job, hub, lambda: min(_received(job.root(n), sha) for n in (1, 2))
                                           >= 1024 * KiB)
    assert held
    assert sorted(results) == [0, 1, 2], _stderr(procs)
    assert all(p.returncode != 0 for p in procs)
    assert {r["type"] for r in results.values()} == {"IntegrityError"}
    assert len({(r["message"], r["hint"]) for r in results.values()}) == 1  # rank 0's, on every rank
    assert WEIGHTS in results[0]["message"] and "listing" in results[0]["message"]
    for node in (0, 1, 2):
        root = job.root(node)
        assert not (root / WEIGHTS).exists() and not (root / ".dinov3-fetcher" / "manifest.json").exists()
        assert not list(root.glob(f".dinov3-fetcher/staged/*/{sha}.{WEIGHTS}"))
        assert _received(root, sha) == 0  # the wrong copy was discarded, there as on rank 0

    procs, results = job.run()
    assert all(p.returncode == 0 for p in procs), _stderr(procs)
    for node in (0, 1, 2):
        _same_checkpoint(job, node, model)
    assert hub.bytes_served(WEIGHTS) == 2 * size


@needs_torch
@pytest.mark.slow
def test_rank_0_losing_the_hub_mid_file_fails_every_rank_and_each_node_resumes_what_it_holds(
        hub: HubServer, model: dict[str, bytes], tmp_path: Path) -> None:
    job = Job(tmp_path)
    size, sha = len(model[WEIGHTS]), hashlib.sha256(model[WEIGHTS]).hexdigest()
    # the CDN stops at 1.5 MiB until the receivers hold 1 MiB, cuts the file at 2 MiB, then answers 503
    hub.faults.add(pause_at=1536 * KiB, cut_after=2048 * KiB, path_suffix=WEIGHTS, host="cdn", times=1)
    hub.faults.add(status=503, path_suffix=WEIGHTS, host="cdn", after=1)
    (procs, results), held = _while_paused(
        job, hub, lambda: min(_received(job.root(n), sha) for n in (1, 2)) >= 1024 * KiB,
        env={"DINOV3_FETCHER_RETRIES": "1"})
    assert held
    assert sorted(results) == [0, 1, 2], _stderr(procs)
    assert {r["type"] for r in results.values()} == {"NetworkError"}
    assert len({(r["message"], r["hint"]) for r in results.values()}) == 1 and WEIGHTS in results[0]["message"]
    left = {}
    for node in (1, 2):  # what each node received is recorded (it is rank 0's hashed prefix: sound)
        assert not (job.root(node) / WEIGHTS).exists()
        record = json.loads((job.root(node) / ".dinov3-fetcher" / "partial" / sha / "progress.json").read_text())
        left[node] = sum(e - s for s, e in record["remaining"])
        assert left[node] <= size - 1024 * KiB

    hub.faults.clear()
    procs, results = job.run()
    assert all(p.returncode == 0 for p in procs), _stderr(procs)
    nodes = results[0]["nodes"]
    for node in (1, 2):
        assert nodes[str(node)]["files"][WEIGHTS] == left[node]
        _same_checkpoint(job, node, model)
    assert hub.bytes_served(WEIGHTS) == size  # rank 0 resumed its own 2 MiB as well


@needs_torch
def test_rank_0_resumes_its_partial_and_sends_the_prefix_it_already_held(
        hub: HubServer, model: dict[str, bytes], tmp_path: Path) -> None:
    job = Job(tmp_path)
    data = model[WEIGHTS]
    sha, held = hashlib.sha256(data).hexdigest(), 1024 * KiB
    folder = job.root(0) / ".dinov3-fetcher" / "partial" / sha  # rank 0 holds the first MiB from an earlier run
    folder.mkdir(parents=True)
    (folder / "data").write_bytes(data[:held])
    (folder / "progress.json").write_text(json.dumps({"identity": sha, "size": len(data),
                                                      "remaining": [[held, len(data)]]}))
    procs, results = job.run()
    assert all(p.returncode == 0 for p in procs), _stderr(procs)
    assert hub.bytes_served(WEIGHTS) == len(data) - held
    nodes = results[0]["nodes"]
    assert nodes["1"]["files"][WEIGHTS] == nodes["2"]["files"][WEIGHTS] == len(data)
    for node in (0, 1, 2):
        _same_checkpoint(job, node, model)


def _fill(where: Path, leave: int) -> Path:
    """Fill ``where``'s filesystem up to ``leave`` bytes free."""
    filler = where / "filler"
    with filler.open("wb") as f:
        with contextlib.suppress(OSError):  # until the disk is full (a receiver may be writing meanwhile)
            while True:
                f.write(b"\0" * (64 * KiB))
                f.flush()
        f.truncate(max(0, f.tell() - leave))
    return filler


@needs_torch
def test_a_relay_whose_disk_fills_up_keeps_relaying_every_rank_raises_its_error_and_the_rerun_resumes(
        hub: HubServer, model: dict[str, bytes], tmp_path: Path) -> None:
    job = Job(tmp_path)  # the chain: rank 0 -> node 1 -> node 2
    size, sha = len(model[WEIGHTS]), hashlib.sha256(model[WEIGHTS]).hexdigest()
    hub.faults.add(pause_at=PAUSE, path_suffix=WEIGHTS, times=1)
    with mounted_tmpfs(tmp_path / "node1", "24m") as disk:  # room for the checkpoint and the 16 MiB margin: accepted
        filler = disk / "filler"

        def then_full() -> bool:  # node 1 got its first MiB, then its disk fills up: room for a progress record
            if _received(job.root(1), sha) < 1024 * KiB:
                return False
            _fill(disk, 64 * KiB)
            return True

        (procs, results), held = _while_paused(job, hub, then_full)
        assert held
        assert sorted(results) == [0, 1, 2], _stderr(procs)
        assert [p.returncode for p in procs] == [9, 9, 9]  # DiskSpaceError's exit code, on every rank
        assert {r["type"] for r in results.values()} == {"DiskSpaceError"}
        assert len({(r["message"], r["hint"]) for r in results.values()}) == 1
        assert "receiving " + WEIGHTS in results[0]["message"]
        assert (job.root(0) / WEIGHTS).exists()  # rank 0's own fetch succeeded; the receivers publish nothing
        for node in (1, 2):
            assert not (job.root(node) / WEIGHTS).exists()
        # node 1 went on passing the weights on: node 2 holds them, verified (staged for the rerun)
        assert list(job.root(2).glob(f".dinov3-fetcher/staged/*/{sha}.{WEIGHTS}"))
        left = _left(job.root(1), sha)
        assert 0 < left <= size - 1024 * KiB  # what node 1 wrote before the disk filled is recorded

        filler.unlink()  # space again: the rerun completes, node 1 receives only the rest, node 2 nothing of it
        procs, results = job.run()
        assert all(p.returncode == 0 for p in procs), _stderr(procs)
        for node in (1, 2):
            _same_checkpoint(job, node, model)
    nodes = results[0]["nodes"]
    later = {n: len(model[n]) for n in ("README.md", "LICENSE.md")}  # sent after the weights: not in the first run
    assert nodes["2"]["files"] == later and nodes["1"]["files"] == {WEIGHTS: left, **later}
    assert hub.bytes_served(WEIGHTS) == size


def _ended_while_rank_0_is_held(job: Job, hub: HubServer, answering: int,
                                node: dict[str, dict[str, int]]) -> tuple[Any, Any]:
    """Run ``job`` with ``node``'s fault while the Hub holds back rank 0's download after its first ``PAUSE``
    bytes; the job must end (``answering`` ranks answered) while it is still held: (procs, results)."""
    hub.faults.add(pause_at=PAUSE, path_suffix=WEIGHTS, times=1)
    served: list[int] = []

    def ended() -> bool:
        if len(list(job.tmp.glob(f"run{job.runs}/rank*.json"))) < answering:
            return False
        served.append(hub.bytes_served(WEIGHTS))
        return True

    (procs, results), _ = _while_paused(job, hub, ended, node=node)
    assert served == [PAUSE], _stderr(procs)  # the job ended while rank 0's download was held back
    return procs, results


@needs_torch
def test_a_relay_killed_mid_transfer_ends_the_job_at_once_on_every_rank_and_the_rerun_completes(
        hub: HubServer, model: dict[str, bytes], tmp_path: Path) -> None:
    job = Job(tmp_path)  # the chain: rank 0 -> node 1 -> node 2
    size, sha = len(model[WEIGHTS]), hashlib.sha256(model[WEIGHTS]).hexdigest()
    # node 1 dies once it has written a MiB of the weights: rank 0 and node 2 see a reset; rank 0 stops sending
    # and its own download (a 27 GB file would not be finished first); node 2, behind it, does not hang
    procs, results = _ended_while_rank_0_is_held(job, hub, 2, {"1": {"die_at": 1024 * KiB}})
    assert sorted(results) == [0, 2] and procs[1].returncode == -9, _stderr(procs)
    assert {(r["type"], r["message"]) for r in results.values()} == {("NetworkError", BROKEN)}
    for node in (1, 2):
        assert not (job.root(node) / WEIGHTS).exists()
    left = _left(job.root(2), sha)
    assert left < size  # node 2 got the start of the weights through node 1 before it died, and recorded it

    hub.clear()
    procs, results = job.run()
    assert all(p.returncode == 0 for p in procs), _stderr(procs)
    assert results[0]["nodes"]["2"]["files"][WEIGHTS] == left  # only the rest
    for node in range(3):
        _same_checkpoint(job, node, model)
    assert hub.bytes_served(WEIGHTS) == size - PAUSE  # rank 0 resumed its own partial


@needs_torch
@pytest.mark.slow
def test_a_node_without_the_space_is_refused_before_any_byte_moves(hub: HubServer, model: dict[str, bytes],
                                                                 tmp_path: Path) -> None:
    job = Job(tmp_path)
    with mounted_tmpfs(tmp_path / "node1", "8m"):  # less than the checkpoint plus the 16 MiB margin
        procs, results = job.run()
        assert sorted(results) == [0, 1, 2], _stderr(procs)
        assert [p.returncode for p in procs] == [9, 9, 9]
        assert {r["type"] for r in results.values()} == {"DiskSpaceError"}
        assert len({(r["message"], r["hint"]) for r in results.values()}) == 1
        assert "not enough disk space" in results[0]["message"]
        assert not (job.root(2) / WEIGHTS).exists() and not list(job.root(2).glob(".dinov3-fetcher/partial/*/data"))
    shutil.rmtree(tmp_path / "node1")
    procs, results = job.run()
    assert all(p.returncode == 0 for p in procs), _stderr(procs)
    for node in (0, 1, 2):
        _same_checkpoint(job, node, model)
    assert hub.bytes_served(WEIGHTS) == len(model[WEIGHTS])


@needs_torch
@pytest.mark.slow
@pytest.mark.parametrize("rank_0", ["a local rank 0", "node 0's local rank 1"])
def test_nodes_whose_local_rank_0_is_not_their_lowest_rank(hub: HubServer, model: dict[str, bytes],
                                                            tmp_path: Path, rank_0: str) -> None:
    # A launcher other than torchrun (which numbers each node's ranks from its local rank 0) may do this: on
    # nodes 1 and 2 the local rank 0 is the higher global rank (3 and 5), so the leaders are 0, 3 and 5. When
    # global rank 0 is not node 0's local rank 0 either, rank 0 still leads its node: node 0's local rank 0
    # (rank 1) only waits for the outcome, it does not also receive into the dino_root rank 0 fetches into.
    job = Job(tmp_path, nproc=2)
    rank_0_leads = rank_0 == "a local rank 0"
    procs, results = job.run(rank_of=lambda node, lr: 2 * node + (lr if node == 0 and rank_0_leads else 1 - lr))
    assert all(p.returncode == 0 for p in procs), _stderr(procs)
    assert sorted(results) == list(range(6)) and all(r["ok"] for r in results.values()), results
    nodes = results[0]["nodes"]
    assert {r: s["role"] for r, s in nodes.items()} == {"0": "sender", "3": "receiver", "5": "receiver"}
    assert all(r["path"] == str(job.root(r["node"])) for r in results.values())
    assert hub.bytes_served(WEIGHTS) == len(model[WEIGHTS])
    for node in (0, 1, 2):
        _same_checkpoint(job, node, model)


@needs_torch
@pytest.mark.slow
def test_sender_killed_midway_every_rank_one_error_then_the_rerun_receives_only_the_rest(
        hub: HubServer, model: dict[str, bytes], tmp_path: Path) -> None:
    job = Job(tmp_path)
    size = len(model[WEIGHTS])
    procs, results = job.run(kill_at=size // 2)
    assert procs[0].returncode != 0
    assert sorted(results) == [1, 2], _stderr(procs)  # rank 0 was killed, the others answered
    assert {(r["type"], r["message"]) for r in results.values()} == {("NetworkError", BROKEN)}
    sha = hashlib.sha256(model[WEIGHTS]).hexdigest()
    left = {}
    for node in (1, 2):
        assert not (job.root(node) / WEIGHTS).exists()
        record = json.loads((job.root(node) / ".dinov3-fetcher" / "partial" / sha / "progress.json").read_text())
        left[node] = sum(e - s for s, e in record["remaining"])
        assert 0 < left[node] <= size - size // 4  # what arrived before the kill is recorded

    procs, results = job.run()
    assert all(p.returncode == 0 for p in procs), _stderr(procs)
    nodes = results[0]["nodes"]
    for node, rank in ((1, "1"), (2, "2")):
        # only the rest: config.json and preprocessor_config.json (sent first, while rank 0 downloaded the
        # weights) were staged; README.md and LICENSE.md come after the weights
        assert nodes[rank]["files"] == {WEIGHTS: left[node], **{n: len(model[n]) for n in ("README.md", "LICENSE.md")}}
        _same_checkpoint(job, node, model)
    assert hub.bytes_served(WEIGHTS) == size  # rank 0 was warm on the rerun


@needs_torch
@pytest.mark.parametrize("when", ["while it sends", "after its last piece"])
def test_ctrl_c_on_rank_0_gives_every_rank_one_error_nothing_published_and_the_rerun_completes(
        hub: HubServer, model: dict[str, bytes], tmp_path: Path, when: str) -> None:
    job = Job(tmp_path)
    fetch_dinov3(job.root(0), MODEL)  # rank 0 warm: its fetch ends at once and the Ctrl-C lands while it sends
    size = len(model[WEIGHTS])
    fault = {"interrupt_at": size // 2} if when == "while it sends" else {"interrupt_after_send": True}
    procs, results = job.run(**fault)
    assert sorted(results) == [0, 1, 2], "\n".join(p.stderr[-2500:] for p in procs)  # no raw KeyboardInterrupt
    assert {r["type"] for r in results.values()} == {"FetchInterrupted"}, results
    assert len({r["message"] for r in results.values()}) == 1
    for node in (1, 2):
        assert not (job.root(node) / WEIGHTS).exists()
        assert not (job.root(node) / ".dinov3-fetcher" / "manifest.json").exists()
    procs, results = job.run()
    assert all(p.returncode == 0 for p in procs), _stderr(procs)
    for node in (0, 1, 2):
        _same_checkpoint(job, node, model)
    if when == "after its last piece":  # every file arrived and was verified: kept staged, nothing sent again
        assert all(results[0]["nodes"][r]["bytes"] == 0 for r in "12"), results[0]["nodes"]


@needs_torch
@pytest.mark.slow
def test_a_sha256_mismatch_on_one_node_is_caught_there_and_raised_on_every_rank(
        hub: HubServer, model: dict[str, bytes], tmp_path: Path) -> None:
    job = Job(tmp_path)
    data = model[WEIGHTS]
    sha = hashlib.sha256(data).hexdigest()
    folder = job.root(2) / ".dinov3-fetcher" / "partial" / sha  # node 2's disk holds a bad first MiB
    folder.mkdir(parents=True)
    (folder / "data").write_bytes(b"\0" * (1024 * KiB))
    (folder / "progress.json").write_text(json.dumps({"identity": sha, "size": len(data),
                                                      "remaining": [[1024 * KiB, len(data)]]}))
    procs, results = job.run()
    assert sorted(results) == [0, 1, 2], _stderr(procs)
    assert all(p.returncode != 0 for p in procs)
    assert {r["type"] for r in results.values()} == {"IntegrityError"}
    assert len({(r["message"], r["hint"]) for r in results.values()}) == 1
    assert WEIGHTS in results[0]["message"] and "sha256" in results[0]["message"]
    assert not (job.root(1) / WEIGHTS).exists()  # a failed job publishes nothing; node 1's verified copy is staged
    assert list((job.root(1) / ".dinov3-fetcher" / "staged").glob(f"*/{sha}.{WEIGHTS}"))
    assert not (job.root(2) / WEIGHTS).exists() and not folder.exists()  # the bad copy was discarded

    procs, results = job.run()
    assert all(p.returncode == 0 for p in procs), _stderr(procs)
    nodes = results[0]["nodes"]
    # node 1 took its staged copies; README.md and LICENSE.md come after the weights: the first run stopped before
    assert nodes["1"]["files"] == {n: len(model[n]) for n in ("README.md", "LICENSE.md")}
    assert nodes["2"]["files"][WEIGHTS] == len(data) and "config.json" not in nodes["2"]["files"]
    for node in (1, 2):
        _same_checkpoint(job, node, model)
    assert hub.bytes_served(WEIGHTS) == len(data)


@needs_torch
@pytest.mark.slow
def test_rank_0_refused_by_the_hub_every_rank_raises_its_error_and_no_node_writes(hub: HubServer,
                                                                               tmp_path: Path) -> None:
    hub.add_repo(MODEL, vit_repo_files(), gated=True)
    job = Job(tmp_path)
    procs, results = job.run()
    assert sorted(results) == [0, 1, 2], _stderr(procs)
    assert {r["type"] for r in results.values()} == {"AuthenticationError"}
    assert len({(r["message"], r["hint"]) for r in results.values()}) == 1
    assert hub.file_gets(WEIGHTS) == []
    assert len([r for r in hub.requests if r.path.startswith("/api/models/")]) == 1  # rank 0 alone asked
    for node in (1, 2):
        assert not (job.root(node) / WEIGHTS).exists() and not (job.root(node) / ".dinov3-fetcher" /
                                                                 "manifest.json").exists()


@needs_torch
@pytest.mark.slow
def test_the_bridge_loads_a_teacher_each_node_received(hub: HubServer, model: dict[str, bytes],
                                                      tmp_path: Path) -> None:
    job = Job(tmp_path)
    procs, results = job.run(teacher=True)
    assert all(p.returncode == 0 for p in procs), _stderr(procs)
    assert sorted(results) == [0, 1, 2] and len({tuple(r["shape"]) for r in results.values()}) == 1, results
    assert hub.bytes_served(WEIGHTS) == len(model[WEIGHTS])
    for node in (1, 2):
        assert _manifest(job.root(node))["endpoint"].startswith("broadcast: ")
        _same_checkpoint(job, node, model)


@needs_torch
@pytest.mark.parametrize("share", ["broadcast", pytest.param(None, marks=pytest.mark.slow)])
def test_a_node_asking_for_another_checkpoint_fails_every_rank_before_anything_is_fetched(
        hub: HubServer, model: dict[str, bytes], tmp_path: Path, share: str | None) -> None:
    hub.add_repo(MODEL + "-other", model)
    job = Job(tmp_path, nodes=2)
    procs, results = job.run(share=share, node={"1": {"model": MODEL + "-other"}})
    assert sorted(results) == [0, 1], _stderr(procs)
    assert [p.returncode for p in procs] == [3, 3]  # ConfigError's exit code, on every rank
    assert {r["type"] for r in results.values()} == {"ConfigError"}
    assert len({(r["message"], r["hint"]) for r in results.values()}) == 1
    message = results[0]["message"]
    assert "rank 1" in message and MODEL + "-other" in message and "rank 0" in message
    assert hub.requests == []  # checked in the first exchange: rank 0 asked the Hub nothing
    assert not job.root(1).exists() and not job.root(0).exists()  # nothing published (nor created) anywhere


@needs_torch
@pytest.mark.parametrize("share", [None, pytest.param("broadcast", marks=pytest.mark.slow)])
def test_a_node_failing_before_the_first_exchange_fails_every_rank_at_once(
        hub: HubServer, model: dict[str, bytes], tmp_path: Path, share: str | None) -> None:
    job = Job(tmp_path, nodes=2)
    job.root(1).parent.mkdir()
    job.root(1).write_text("not a folder")  # node 1's dino_root is a file: make_request refuses it
    procs, results = job.run(share=share)  # were rank 0 left waiting, it would fail at fetch_once's timeout
    assert sorted(results) == [0, 1], _stderr(procs)
    assert [p.returncode for p in procs] == [3, 3]
    assert {r["type"] for r in results.values()} == {"ConfigError"}, results  # not torch's DistStoreError
    assert len({(r["message"], r["hint"]) for r in results.values()}) == 1 and str(job.root(1)) in results[0]["message"]
    assert hub.requests == [] and not job.root(0).exists()


@needs_torch
def test_a_node_passing_another_update_fails_every_rank_before_anything_is_fetched(
        hub: HubServer, model: dict[str, bytes], tmp_path: Path) -> None:
    job = Job(tmp_path, nodes=2)
    procs, results = job.run(node={"1": {"update": True}})  # node 1 would check for a newer commit, rank 0 not
    assert sorted(results) == [0, 1], _stderr(procs)
    assert [p.returncode for p in procs] == [3, 3]
    assert {r["type"] for r in results.values()} == {"ConfigError"}
    assert len({(r["message"], r["hint"]) for r in results.values()}) == 1
    assert "update=True" in results[0]["message"] and "update=False" in results[0]["message"]
    assert hub.requests == [] and not job.root(0).exists() and not job.root(1).exists()


@needs_torch
def test_a_warm_node_at_an_older_commit_receives_what_changed_and_holds_rank_0s_commit(
        hub: HubServer, model: dict[str, bytes], tmp_path: Path) -> None:
    job = Job(tmp_path, nodes=2)
    fetch_dinov3(job.root(1), MODEL)  # node 1 fetched the model earlier; its branch has moved on since
    older = _manifest(job.root(1))["commit"]
    new = vit_repo_files(seed=7, hidden=128, intermediate=512, layers=4)
    assert new[WEIGHTS] != model[WEIGHTS]
    commit = hub.add_commit(MODEL, {WEIGHTS: new[WEIGHTS]})
    hub.clear()
    procs, results = job.run()
    assert all(p.returncode == 0 for p in procs), _stderr(procs)
    assert {r["commit"] for r in results.values()} == {commit} and commit != older  # what every rank is told...
    for node in (0, 1):  # ...is what every node holds
        assert _manifest(job.root(node))["commit"] == commit
        assert (job.root(node) / WEIGHTS).read_bytes() == new[WEIGHTS]
    assert results[0]["nodes"]["1"]["files"] == {WEIGHTS: len(new[WEIGHTS])}  # only the file that changed
    assert hub.bytes_served(WEIGHTS) == len(new[WEIGHTS])  # rank 0's download, once


@needs_torch
def test_a_users_files_on_a_receiving_node_are_refused_there_before_any_byte_moves(
        hub: HubServer, model: dict[str, bytes], tmp_path: Path) -> None:
    job = Job(tmp_path, nodes=2)
    own = {"config.json": b'{"my": "pipeline config"}\n', "README.md": b"my own notes\n"}
    job.root(1).mkdir(parents=True)
    for name, data in own.items():  # node 1's dino_root is the pipeline's own folder
        (job.root(1) / name).write_bytes(data)
    (job.root(1) / "LICENSE.md").write_bytes(model["LICENSE.md"])  # exactly the listed bytes: adopted
    procs, results = job.run()
    assert sorted(results) == [0, 1], _stderr(procs)
    assert [p.returncode for p in procs] == [3, 3]  # as a plain fetch into that folder: ConfigError
    assert {r["type"] for r in results.values()} == {"ConfigError"}
    assert len({(r["message"], r["hint"]) for r in results.values()}) == 1
    message = results[0]["message"]
    assert "config.json" in message and "README.md" in message and "LICENSE.md" not in message
    assert all((job.root(1) / n).read_bytes() == data for n, data in own.items())  # untouched
    assert not (job.root(1) / WEIGHTS).exists() and not list(job.root(1).glob(".dinov3-fetcher/partial/*/data"))
    assert not (job.root(1) / ".dinov3-fetcher" / "manifest.json").exists()

    for name in own:  # the user moves their files out of the way: the rerun completes
        (job.root(1) / name).unlink()
    procs, results = job.run()
    assert all(p.returncode == 0 for p in procs), _stderr(procs)
    _same_checkpoint(job, 1, model)
    assert (job.root(1) / "LICENSE.md").read_bytes() == model["LICENSE.md"]
    assert "LICENSE.md" not in results[0]["nodes"]["1"]["files"] and "README.md" in results[0]["nodes"]["1"]["files"]


@needs_torch
def test_ctrl_c_on_a_receiver_ends_the_job_at_once_with_its_error_on_every_rank_and_the_rerun_completes(
        hub: HubServer, model: dict[str, bytes], tmp_path: Path) -> None:
    job = Job(tmp_path)  # the chain: rank 0 -> node 1 -> node 2
    size, sha = len(model[WEIGHTS]), hashlib.sha256(model[WEIGHTS]).hexdigest()
    # Ctrl-C on node 1 once it has written 512 KiB of the weights: rank 0 hears of it at once and stops sending
    # and downloading (a rank 0 that learnt it only at the end of its download would wait for the Hub for good)
    procs, results = _ended_while_rank_0_is_held(job, hub, 3, {"1": {"ctrl_c_at": 512 * KiB}})
    assert sorted(results) == [0, 1, 2], _stderr(procs)
    assert {r["type"] for r in results.values()} == {"FetchInterrupted"}, results
    assert len({(r["message"], r["hint"]) for r in results.values()}) == 1
    assert [p.returncode for p in procs] == [130, 130, 130]
    left = {}
    for node in (1, 2):  # nothing published; what each node wrote is recorded for the rerun
        assert not (job.root(node) / WEIGHTS).exists()
        assert not (job.root(node) / ".dinov3-fetcher" / "manifest.json").exists()
        recorded = list(job.root(node).glob(f".dinov3-fetcher/partial/{sha}*/progress.json"))
        left[node] = _left(job.root(node), sha) if recorded else size
    assert left[1] <= size - 512 * KiB  # node 1 kept what it wrote before it was interrupted

    hub.clear()
    procs, results = job.run()
    assert all(p.returncode == 0 for p in procs), _stderr(procs)
    for node in (1, 2):
        assert results[0]["nodes"][str(node)]["files"].get(WEIGHTS, 0) == left[node]  # only the rest
        _same_checkpoint(job, node, model)
    assert hub.bytes_served(WEIGHTS) == size - PAUSE  # rank 0 resumed its own partial


@needs_torch
def test_nodes_sharing_one_dino_root_each_get_the_checkpoint_rank_0_fetched_into_it(
        hub: HubServer, model: dict[str, bytes], tmp_path: Path) -> None:
    job = Job(tmp_path)
    shared = tmp_path / "shared" / "dinov3"  # every node's dino_root is this one folder
    # A receiver waiting for another's lock would hold the job until the lock timeout (LockTimeoutError).
    for _ in ("cold", "warm"):
        procs, results = job.run(root=str(shared), env={"DINOV3_FETCHER_LOCK_TIMEOUT": "20"})
        assert all(p.returncode == 0 for p in procs), _stderr(procs)
        assert sorted(results) == [0, 1, 2] and all(r["path"] == str(shared) for r in results.values()), results
        nodes = results[0]["nodes"]
        assert [(nodes[r]["role"], nodes[r]["bytes"]) for r in "12"] == [("warm", 0), ("warm", 0)]
        assert hub.bytes_served(WEIGHTS) == len(model[WEIGHTS])  # rank 0's download, once for both runs
        assert (shared / WEIGHTS).read_bytes() == model[WEIGHTS] and _manifest(shared)["complete"]
        assert _manifest(shared)["source"] == "hf" and not _manifest(shared)["endpoint"].startswith("broadcast")


@needs_torch
def test_nodes_receiving_from_modelscope_record_what_rank_0_records(ms: ModelScopeServer, tmp_path: Path) -> None:
    files = vit_repo_files(hidden=128, intermediate=512, layers=4)
    ms.add_repo(MODEL, files)
    registry = tmp_path / "registry.json"  # the weights pinned as an official release's
    registry.write_text(json.dumps({MODEL: {"sha256": hashlib.sha256(files[WEIGHTS]).hexdigest(),
                                            "size": len(files[WEIGHTS])}}))
    job = Job(tmp_path, nodes=2)
    procs, results = job.run(source="modelscope", env={"DINOV3_FETCHER_REGISTRY": str(registry)})
    assert all(p.returncode == 0 for p in procs), _stderr(procs)
    sent, received = _manifest(job.root(0)), _manifest(job.root(1))
    assert sent["source"] == "modelscope" and sent["site_revision"] and sent["official"] is True
    keys = ("commit", "site_revision", "official", "source")
    assert {k: received[k] for k in keys} == {k: sent[k] for k in keys}
    assert {r["commit"] for r in results.values()} == {sent["commit"]}
    assert received["endpoint"].startswith("broadcast: rank 0 on ")


def test_share_arguments_are_checked_before_anything_runs(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="share="):
        fetch_once(tmp_path, MODEL, share="torrent")
    with pytest.raises(ConfigError, match="shared_fs"):
        fetch_once(tmp_path, MODEL, share="broadcast", shared_fs=True)


def test_outside_a_process_group_broadcast_is_a_plain_fetch(hub: HubServer, model: dict[str, bytes],
                                                            tmp_path: Path) -> None:
    res = fetch_once(tmp_path / "dinov3", MODEL, share="broadcast", details=True)
    assert res.path == tmp_path / "dinov3" and res.nodes == {}
    assert res.commit == _manifest(res.path)["commit"] and _manifest(res.path)["source"] == "hf"
    assert (res.path / WEIGHTS).read_bytes() == model[WEIGHTS]
    assert fetch_once(tmp_path / "dinov3", MODEL, share="broadcast") == tmp_path / "dinov3"
