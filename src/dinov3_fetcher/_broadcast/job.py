"""``fetch_once(..., share="broadcast")``: one download per job; every other node receives rank 0's bytes.

Every rank: ``_gloo_group``, ``_local_rank``, ``leaders_group`` (global rank 0 and local rank 0 of each node).
Global rank 0 fetches from the source as ``fetch_dinov3`` does (``_fetch.fetch``) and sends every file of the
manifest it publishes (``send``; the list holds every file's size and sha256, the small non-LFS files
included, so the receivers never ask the source anything). Every other leader receives into its own
dino_root (``receive`` into a ``StateSink``): under the node's lock, into claimed partial folders of
``_state.StateDir`` (identity = the file's sha256, the progress record of ``encode_progress``), hashed while
the bytes arrive, staged once the sha256 matches, then published together with a manifest whose ``source`` is
``"broadcast"`` and whose ``endpoint`` names rank 0's host and the original source. A warm node (``ready``)
announces nothing and takes no part in the data step; a node holding a partial (or a staged file, or the same
file published under an older manifest) announces only what it misses. Then the outer exchange of
``_distributed`` runs on every rank: the same path everywhere, or the lowest failing rank's error everywhere.

Rank 0 sends while it downloads (``_share_send``): the file list as soon as its fetch has planned (config and
preprocessor fetched, the weights' sha256 listed), each weight file up to the prefix its download has written
and hashed, then (meta ``more``) a second round with what the fetch got after the weights (README, LICENSE).
Every receiver checks each file's sha256 itself, and publishes only when rank 0's whole fetch succeeded.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from .._config import FetchRequest
from .._errors import NetworkError
from .._ranks import JobResult, check_fetched, destroy, first_failure, gloo_group, local_rank, outcome, rebuild
from .feed import merge, serve
from .node import StateSink
from .receiver import receive
from .wire import BROKEN, BROKEN_HINT, CHUNK, Report, is_transport, leaders_group

__all__ = ["CHUNK", "fetch_broadcast"]


def _sender(req: FetchRequest, update: bool, group: Any) -> tuple[Report | None, BaseException | None]:
    """Rank 0: fetch, and send the files while they download (``feed``)."""
    return serve(req, update, group, CHUNK)


def _receiver(req: FetchRequest, update: bool, group: Any) -> tuple[Report | None, BaseException | None]:
    sink = StateSink(req, update)
    report: Report | None = None
    mine: BaseException | None = None
    try:
        report = receive(sink, group, progress=sys.stderr)
        if report.meta.get("more"):  # rank 0 sends what it fetched after the weights (see feed)
            report = merge(report, receive(sink, group, progress=sys.stderr))
        if not report.meta.get("failed"):
            sink.publish(report)
    except BaseException as exc:
        mine = exc
    finally:
        sink.unlock()
    return report, mine


def _exchange(fn: Any, *args: Any) -> Any:
    """A collective of the outer group; a rank that died (the killed sender) gives the same error everywhere."""
    try:
        return fn(*args)
    except Exception as exc:
        if is_transport(exc):
            raise NetworkError(BROKEN, BROKEN_HINT) from None
        raise


def fetch_broadcast(dist: ModuleType, req: FetchRequest, *, update: bool, timeout: float,
                    details: bool) -> Path | JobResult:
    """The body of ``fetch_once(..., share="broadcast")`` inside an initialised process group."""
    rank = dist.get_rank()
    group = gloo_group(dist, timeout)
    bgroup: Any = None
    members: list[int] = []
    report: Report | None = None
    mine: BaseException | None = None
    try:
        lrank = _exchange(local_rank, dist, group)
        bgroup, members = _exchange(leaders_group, dist, group, lrank, timeout)
        if rank == 0:
            report, mine = _sender(req, update, bgroup)
        elif rank in members:
            report, mine = _receiver(req, update, bgroup)
        failure = _exchange(first_failure, dist, group, outcome(mine, rank))
        if failure is None and rank not in members:
            try:
                check_fetched(req, "this node's local rank 0 (receiving from rank 0)")
            except BaseException as exc:
                mine = exc
            failure = _exchange(first_failure, dist, group, outcome(mine, rank))
        elif failure is None:
            failure = _exchange(first_failure, dist, group, None)
        shared: list[Any] = [None]
        if failure is None:  # every rank learns every node's bytes and seconds, and the commit
            if rank == 0 and report is not None:
                shared = [(report.meta.get("commit", ""), report.nodes)]
            _exchange(dist.broadcast_object_list, shared, 0, group)
    finally:
        if bgroup is not None and rank in members:
            destroy(dist, bgroup)
        destroy(dist, group)
    if failure is not None:
        if mine is not None and failure["rank"] == rank:
            raise mine
        raise rebuild(failure)
    if not details:
        return req.dino_root
    commit, nodes = shared[0] or ("", {})
    return JobResult(req.dino_root, commit, dict(nodes))
