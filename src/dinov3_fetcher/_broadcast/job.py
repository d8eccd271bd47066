"""``fetch_once(..., share="broadcast")``: one download per job; every other node receives rank 0's bytes.

``fetch_once`` has made the job's gloo group, checked in its first exchange that every rank asks for the same
checkpoint, and chosen each node's leader (``_ranks.leaders``: rank 0 for its own node). Every rank makes the
transfer group of the leaders (``leaders_group``). Global rank 0 fetches from the source as ``fetch_dinov3``
does (``_fetch.fetch``) and sends every file of the manifest it publishes (``feed``, ``sender``; the list holds
every file's size and sha256, the small non-LFS files included, so the receivers never ask the source anything).
Every other leader receives into its own dino_root (``receiver`` into a ``node.StateSink``): under the node's
lock, once the names it will publish are checked against files the user put there, into claimed partial
folders, hashed while the bytes arrive, staged once the sha256 matches. A warm node (the checkpoint at rank 0's
commit) announces nothing and takes no part in the data step; so does a node whose lock another fetcher holds
(a dino_root several nodes share), which checks the folder once every node published; a node holding a partial
(or a staged file, or the same file published under an older manifest) announces only what it misses. The
receiving runs in a thread of its own, so that a Ctrl-C on a receiver reaches the sender at once. Then an
exchange on the job's group: the transfer's outcome on every rank, rank 0's whole fetch included. Only when
every rank succeeded do the receivers publish (together, with a manifest whose ``endpoint`` names rank 0's host
and the original source, its commit rank 0's), and a last exchange (after the checks of the ranks that waited)
gives the same path everywhere, or the lowest failing rank's error everywhere; a failure (a Ctrl-C on rank 0
after its last piece too) leaves every node's verified files staged for the next run.

Rank 0 sends while it downloads (``feed``): the file list as soon as its fetch has planned (config and
preprocessor fetched, the weights' sha256 listed), each weight file up to the prefix its download has written
and hashed, then (meta ``more``) a second round with what the fetch got after the weights (README, LICENSE).
Every receiver checks each file's sha256 itself, and publishes only when the whole job's transfer succeeded.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from .._config import FetchRequest
from .._errors import interrupted
from .._ranks import JobResult, check_fetched, collective, destroy, first_failure, outcome, raise_failure
from .background import Background, Outcome
from .feed import merge, serve
from .node import StateSink
from .receiver import Stop, receive
from .wire import BROKEN, BROKEN_HINT, PIECE, Report, leaders_group

__all__ = ["PIECE", "fetch_broadcast"]


def _receiver(req: FetchRequest, update: bool, group: Any) -> tuple[StateSink, Report | None, BaseException | None]:
    """Receive every round rank 0 sends into this node's dino_root (staged, verified); not published yet.

    The rounds run in a thread of their own, as rank 0's sending does: a Ctrl-C lands in this (the main)
    thread, whatever the transfer is blocked on, and is handed to it (``receiver.Stop``), so that every rank
    ends with this node's FetchInterrupted at once. A second Ctrl-C stops waiting for the transfer."""
    sink = StateSink(req, update)
    stop = Stop()

    def rounds() -> Outcome:
        report: Report | None = None
        try:
            report = receive(sink, group, progress=sys.stderr, listed=sink.expect, stop=stop)
            if report.meta.get("more"):  # rank 0 sends what it fetched after the weights (see feed)
                report = merge(report, receive(sink, group, progress=sys.stderr, listed=sink.expect, stop=stop))
        except BaseException as exc:
            return report, exc
        return report, None

    receiving = Background(rounds, "dinov3-broadcast-receive")
    try:
        receiving.wait()
    except KeyboardInterrupt:
        stop.set(interrupted())
        receiving.done.wait()
    report, mine = receiving.out[0]
    return sink, report, mine or stop.error  # (interrupted after its last outcome went out: the job's exchange)


def fetch_broadcast(dist: ModuleType, group: Any, req: FetchRequest, members: list[int], *, update: bool,
                    timeout: float, details: bool) -> Path | JobResult:
    """The body of ``fetch_once(..., share="broadcast")``: ``group`` is the job's gloo group, ``members`` the
    ranks that fetch or receive for their node (rank 0 first). A collective of every rank."""
    rank = dist.get_rank()
    report: Report | None = None
    mine: BaseException | None = None
    sink: StateSink | None = None
    broken = (BROKEN, BROKEN_HINT)
    bgroup = collective(leaders_group, dist, members, timeout, stopped=broken)
    try:
        if rank == 0:
            report, mine = serve(req, update, bgroup, PIECE)
        elif rank in members:
            sink, report, mine = _receiver(req, update, bgroup)
        # the transfer's outcome on every rank, rank 0's whole fetch included (a Ctrl-C on it after its last
        # piece too): the receivers publish only when it is a success
        failure = collective(first_failure, dist, group, outcome(mine, rank), stopped=broken)
        if failure is None:
            if sink is not None and report is not None:
                try:
                    sink.publish(report)
                except BaseException as exc:
                    mine = exc
                finally:
                    sink.unlock()  # another node's receiver on this dino_root (deferred) checks it next
            failure = collective(first_failure, dist, group, outcome(mine, rank), stopped=broken)
        if failure is None:  # the ranks that waited for their leader, and the leaders that waited for the lock
            try:
                if rank not in members:
                    check_fetched(req, "this node's leader (receiving from rank 0)")
                elif sink is not None:
                    sink.settle()
            except BaseException as exc:
                mine = exc
            failure = collective(first_failure, dist, group, outcome(mine, rank), stopped=broken)
        shared: list[Any] = [None]
        if failure is None:  # every rank learns every node's bytes and seconds, and the commit
            if rank == 0 and report is not None:
                shared = [(report.meta.get("commit", ""), report.nodes)]
            collective(dist.broadcast_object_list, shared, 0, group, stopped=broken)
    finally:
        if sink is not None:
            sink.unlock()
        if rank in members:
            destroy(dist, bgroup)
    if failure is not None:
        raise_failure(failure, mine, rank)
    if not details:
        return req.dino_root
    commit, nodes = shared[0] or ("", {})
    return JobResult(req.dino_root, commit, dict(nodes))
