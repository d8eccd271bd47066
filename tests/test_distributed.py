"""fetch_once in a torch.distributed job (CPU, gloo) against the Hub emulator: under a real ``torchrun`` (an agent
per node), or with the ranks forked with the environment torchrun gives its workers (``launch.forked``).

Each worker initialises gloo, calls fetch_once and writes what it got (path, or error type/message) to
rank<N>.json. The tests of many processes are skipped, with the reason, when torch is not installed (see
DEVELOPERS.md).
"""

from __future__ import annotations

import errno
import importlib.util
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

import launch
from checkpoints import vit_repo_files
from conftest import TINY
from dinov3_fetcher._distributed import fetch_once
from dinov3_fetcher._errors import AuthenticationError, ConfigError, DiskSpaceError
from dinov3_fetcher._ranks import Call, agree, leaders, outcome, rebuild
from helpers import wait_all
from hub_server import HubServer

needs_torch = pytest.mark.skipif(
    importlib.util.find_spec("torch") is None,
    reason="torch is not installed (the [load] extra): run bash .ci/install-load-extra.sh",
)
# Under pytest-xdist, the tests whose ranks are forked run on one worker: one fork server imports torch once.
pytestmark = pytest.mark.xdist_group("forked-ranks")

GATED = "tiny-org/dinov3-vit-gated"
WORKER = """\
import json, os, sys, time
from pathlib import Path

import torch.distributed as dist

from dinov3_fetcher._distributed import fetch_once
from dinov3_fetcher._errors import FetcherError

out_dir, root, model, shared, mode = sys.argv[1:6]
root = root.replace("{node}", os.environ.get("GROUP_RANK", "0"))
dist.init_process_group("gloo")
rank = dist.get_rank()
t0 = time.monotonic()
try:
    result = {"ok": True}
    if mode.startswith("teacher"):
        import torch
        from dinov3_fetcher import load_teacher

        # "teacher-cuda-on-1": rank 1 asks for a device this CPU-only torch cannot give, before anything is fetched
        device = "cuda" if mode == "teacher-cuda-on-1" and rank == 1 else "cpu"
        teacher, preprocess = load_teacher(root, device, model_name=model or None, shared_fs=shared == "1")
        with torch.no_grad():
            out = teacher(pixel_values=preprocess(torch.zeros(224, 224, 3, dtype=torch.uint8)))
        result["shape"] = list(out.last_hidden_state.shape)
        path = root
    else:
        path = fetch_once(root, model, shared_fs=shared == "1")
    dist.barrier()  # the ranks are still in step
    result["path"], code = str(path), 0
except FetcherError as exc:
    result = {"ok": False, "type": type(exc).__name__, "message": exc.message, "hint": exc.hint}
    code = exc.exit_code
result.update(rank=rank, local_rank=int(os.environ["LOCAL_RANK"]), seconds=time.monotonic() - t0)
Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
dist.destroy_process_group()
sys.exit(code)
"""


def _api_calls(hub: HubServer) -> list[str]:
    return [r.path for r in hub.requests if r.path.startswith("/api/models/")]


Outcome = tuple[list[subprocess.CompletedProcess[str]], list[dict[str, Any]]]


def _job(tmp_path: Path, root: str, model: str, *, torchrun: bool = False, shared_fs: bool = False, nproc: int = 2,
         nodes: int = 1, mode: str = "fetch") -> Outcome:
    """Run the worker on ``nodes`` "nodes" of ``nproc`` ranks on this host: under torchrun (an agent per node),
    or forked (``launch.forked``); the processes and every rank's result, once every process ended."""
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    args = [str(out), root, model, "1" if shared_fs else "0", mode]
    if torchrun:
        procs: list[Any] = launch.torchrun(worker, args, nodes=nodes, nproc=nproc)
    else:
        procs = launch.forked(worker, args, out, nodes=nodes, nproc=nproc)
    done = wait_all(procs)
    results = [json.loads(f.read_text()) for f in sorted(out.glob("rank*.json"))]
    return done, sorted(results, key=lambda r: r["rank"])


@needs_torch
def test_the_ranks_of_a_node_under_torchrun_download_the_weights_once(hub: HubServer, tiny: dict[str, bytes],
                                                                      tmp_path: Path, dino_root: Path) -> None:
    procs, results = _job(tmp_path, str(dino_root), TINY, torchrun=True, nproc=3)
    assert procs[0].returncode == 0, procs[0].stderr[-3000:]
    assert [r["rank"] for r in results] == [0, 1, 2]
    assert all(r["ok"] and r["path"] == str(dino_root) for r in results), results
    gets = hub.file_gets("model.safetensors")
    assert hub.bytes_served("model.safetensors") == len(tiny["model.safetensors"]), gets
    assert len({r.path for r in gets if r.host == "cdn"}) == 1
    assert len(hub.file_gets("/config.json")) == 1  # (not preprocessor_config.json)
    assert len(_api_calls(hub)) == 1  # one rank asked the Hub; the others only read the disk
    assert (dino_root / "model.safetensors").read_bytes() == tiny["model.safetensors"]


@needs_torch
def test_gated_repo_every_rank_raises_the_same_error_without_hanging(hub: HubServer, tmp_path: Path,
                                                                     dino_root: Path) -> None:
    hub.add_repo(GATED, vit_repo_files(), gated=True)
    # the job ends on its own (a rank left waiting would end only at fetch_once's timeout of 6 hours, or at
    # pytest's), every rank with rank 0's error
    procs, results = _job(tmp_path, str(dino_root), GATED, nproc=3)
    assert all(p.returncode == 4 for p in procs), [p.stderr[-2000:] for p in procs]  # AuthenticationError's
    assert [r["rank"] for r in results] == [0, 1, 2]
    assert {r["type"] for r in results} == {"AuthenticationError"}
    assert len({(r["message"], r["hint"]) for r in results}) == 1, results
    assert "gated" in results[0]["message"].lower() or "401" in results[0]["message"]
    assert hub.file_gets("model.safetensors") == []
    assert len(_api_calls(hub)) == 1  # rank 0 asked and was refused; ranks 1 and 2 got its error, not their own


def test_errors_cross_ranks_with_their_type_message_and_details() -> None:
    disk = DiskSpaceError("not enough disk space", "free some", needed=10, free=1)
    back = rebuild(outcome(disk, 0) or {})
    assert type(back) is DiskSpaceError and str(back) == str(disk)
    assert (back.message, back.hint, back.needed, back.free, back.errno) == ("not enough disk space", "free some",
                                                                            10, 1, errno.ENOSPC)
    auth = rebuild(outcome(AuthenticationError("gated", "ask for access", status=403), 2) or {})
    assert isinstance(auth, AuthenticationError) and auth.status == 403 and auth.hint == "ask for access"
    assert isinstance(auth, PermissionError)
    other = rebuild(outcome(ValueError("odd"), 1) or {})
    assert type(other) is ValueError and str(other) == "odd"

    class Local(Exception):  # cannot be pickled: rebuilt as a RuntimeError naming it
        pass

    local = rebuild(outcome(Local("x"), 3) or {})
    assert type(local) is RuntimeError and "rank 3" in str(local) and "Local: x" in str(local)


def test_each_node_has_one_leader_and_rank_0_leads_its_own() -> None:
    def calls(*layout: tuple[str, int | None]) -> list[Call]:
        return [Call(r, node, local, ("m", "main", "hf", "", False, False)) for r, (node, local) in enumerate(layout)]

    torchrun = calls(("node 0", 0), ("node 0", 1), ("node 1", 0), ("node 1", 1))
    assert leaders(torchrun, shared_fs=False) == [0, 2] and leaders(torchrun, shared_fs=True) == [0]
    # another launcher: rank 0 is node a's local rank 1, node b's local rank 0 is its higher rank
    other = calls(("a", 1), ("a", 0), ("b", 1), ("b", 0))
    assert leaders(other, shared_fs=False) == [0, 3]
    assert leaders(calls(("a", None), ("b", None), ("a", None), ("b", None)), shared_fs=False) == [0, 1]


def test_the_first_exchange_fails_every_rank_alike_on_the_lowest_failing_or_disagreeing_rank() -> None:
    asks = ("facebook/dinov3-vits16-pretrain-lvd1689m", "main", "hf", "broadcast", False, False)
    same = [Call(r, f"node {r}", 0, asks) for r in range(3)]
    assert agree(same) is None
    other = (asks[0], "v2", *asks[2:])
    early = outcome(ConfigError("dino_root is a file", "point it at a folder"), 2)
    failure = agree([same[0], Call(1, "node 1", 0, other), Call(2, "node 2", 0, None, early)])
    assert failure is not None
    back = rebuild(failure)
    assert type(back) is ConfigError and back.hint.startswith("pass the same model")
    assert "rank 1" in back.message and "@v2" in back.message and "@main" in back.message
    assert agree([same[0], same[1], Call(2, "node 2", 0, None, early)]) == early


@needs_torch
@pytest.mark.slow
def test_two_nodes_fetch_once_per_node_or_once_per_job(hub: HubServer, tiny: dict[str, bytes],
                                                       tmp_path: Path) -> None:
    """Two torchrun agents on this host stand for two nodes (2 ranks each), each with its own dino_root."""
    size = len(tiny["model.safetensors"])
    per_node = str(tmp_path / "node{node}" / "dinov3")
    (tmp_path / "a").mkdir()
    procs, results = _job(tmp_path / "a", per_node, TINY, torchrun=True, nproc=2, nodes=2)
    assert all(p.returncode == 0 for p in procs), [p.stderr[-2000:] for p in procs]
    assert [(r["rank"], r["local_rank"]) for r in results] == [(0, 0), (1, 1), (2, 0), (3, 1)]
    assert {r["path"] for r in results} == {per_node.format(node=0), per_node.format(node=1)}
    assert hub.bytes_served("model.safetensors") == 2 * size  # once per node

    hub.clear()
    shared = str(tmp_path / "shared" / "dinov3")
    (tmp_path / "b").mkdir()
    procs, results = _job(tmp_path / "b", shared, TINY, torchrun=True, shared_fs=True, nproc=2, nodes=2)
    assert all(p.returncode == 0 for p in procs), [p.stderr[-2000:] for p in procs]
    assert {r["path"] for r in results} == {shared}
    assert hub.bytes_served("model.safetensors") == size  # once per job


@needs_torch
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers is not installed")
def test_load_teacher_in_torchrun_fetches_once(hub: HubServer, tiny: dict[str, bytes], tmp_path: Path,
                                               dino_root: Path) -> None:
    procs, results = _job(tmp_path, str(dino_root), TINY, torchrun=True, mode="teacher")
    assert procs[0].returncode == 0, procs[0].stderr[-3000:]
    assert [r["shape"] for r in results] == [[1, 201, 32]] * 2
    assert hub.bytes_served("model.safetensors") == len(tiny["model.safetensors"])
    assert len(_api_calls(hub)) == 1

    hub.clear()  # warm, no model named: every rank agrees to load what is there, without a request
    procs, results = _job(tmp_path, str(dino_root), "", torchrun=True, mode="teacher")
    assert procs[0].returncode == 0, procs[0].stderr[-3000:]
    assert len(results) == 2 and hub.requests == []


@needs_torch
@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers is not installed")
@pytest.mark.timeout(120)  # a rank left waiting for rank 1 would wait out the exchange's 600 s
def test_a_rank_that_cannot_load_fails_every_rank_before_anything_is_fetched(hub: HubServer, tiny: dict[str, bytes],
                                                                             tmp_path: Path, dino_root: Path) -> None:
    procs, results = _job(tmp_path, str(dino_root), TINY, nproc=3, mode="teacher-cuda-on-1")
    assert [r["rank"] for r in results] == [0, 1, 2], [p.stderr[-2000:] for p in procs]
    assert {r["type"] for r in results} == {"LoadError"}
    assert len({(r["message"], r["hint"]) for r in results}) == 1 and "cuda" in results[0]["message"]
    assert all(p.returncode == procs[1].returncode != 0 for p in procs)
    assert hub.requests == [] and not dino_root.exists()  # the job stopped before its fetch


def test_without_a_process_group_it_is_a_plain_fetch(hub: HubServer, tiny: dict[str, bytes],
                                                     dino_root: Path) -> None:
    assert fetch_once(dino_root, TINY) == dino_root
    assert hub.bytes_served("model.safetensors") == len(tiny["model.safetensors"])
