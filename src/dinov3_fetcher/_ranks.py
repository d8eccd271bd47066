"""What the ranks of a torch.distributed job share so that every rank ends the same way: an exception as plain
data that every rank rebuilds alike, the lowest failing rank's outcome of a step, a gloo group of our own (it
works whatever the job's backend is, NCCL included, needs no GPU, and waits as long as a big download takes),
and what ``fetch_once(details=True)`` returns on every rank."""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib
import os
import pickle
import socket
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

from . import _errors as errors
from ._config import FetchRequest
from ._errors import FetcherError, VerificationError

__all__ = ["STOPPED", "Call", "JobResult", "NodeStats", "agree", "check_fetched", "collective", "destroy",
           "first_failure", "gloo_group", "is_transport", "leaders", "outcome", "raise_failure", "rebuild"]


@dataclass
class NodeStats:
    """One node's part in a broadcast (its leader's): by global rank."""

    rank: int
    role: str  # "sender", "receiver" or "warm" (a receiver that missed nothing: outside the chain)
    bytes: int = 0  # the sender: what it sent; a receiver: what it received (its own pieces and those it relayed)
    seconds: float = 0.0  # from the start of send/receive to the end of the data step
    files: dict[str, int] = field(default_factory=dict)  # bytes per file: sent (the sender), or taken for itself
    sent: int = 0  # what it sent to the next node of the chain (the sender: to the first)


@dataclass
class JobResult:
    """What ``fetch_once(..., details=True)`` returns on every rank: the path; the commit (``share="broadcast"``:
    the one rank 0 fetched, which every node holds once the job succeeded, a node at an older commit having
    received the files that changed; outside a job: the fetch's; "" when each node, or rank 0 on a shared
    filesystem, fetched on its own); and (``share="broadcast"``) the bytes and seconds of every node's leader,
    by global rank. A node's ``role`` is ``sender`` (rank 0), ``receiver`` (a link of the chain: ``bytes`` it
    received, ``files`` what it took for itself, ``sent`` what it passed on) or ``warm`` (received nothing: it
    held the checkpoint at rank 0's commit, or shares its dino_root with a node that fetched or received it)."""

    path: Path
    commit: str = ""
    nodes: dict[int, NodeStats] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "commit": self.commit,
                "nodes": {str(r): asdict(s) for r, s in sorted(self.nodes.items())}}


def outcome(exc: BaseException | None, rank: int) -> dict[str, Any] | None:
    """An exception as plain data that every rank can turn back into the same exception."""
    if exc is None:
        return None
    out: dict[str, Any] = {"rank": rank, "module": type(exc).__module__, "name": type(exc).__qualname__,
                           "text": str(exc)}
    if isinstance(exc, FetcherError):
        out["attrs"] = {k: v for k, v in vars(exc).items() if isinstance(v, (str, int, float, bool, type(None)))}
        out["errno"] = getattr(exc, "errno", None)
    else:
        try:
            out["pickled"] = pickle.dumps(exc)
        except Exception:
            out["pickled"] = None
    return out


def raise_failure(failure: dict[str, Any], mine: BaseException | None, rank: int) -> NoReturn:
    """Raise the job's failure on this rank: its own exception where it is the failing rank, else the rebuilt
    one."""
    if mine is not None and failure["rank"] == rank:
        raise mine
    raise rebuild(failure)


def rebuild(out: dict[str, Any]) -> BaseException:
    """The exception another rank raised, rebuilt here (same type and message)."""
    cls = getattr(errors, out["name"], None) if out["module"] == errors.__name__ else None
    if isinstance(cls, type) and issubclass(cls, FetcherError):
        attrs = out.get("attrs", {})
        exc = cls.__new__(cls)
        FetcherError.__init__(exc, attrs.get("message", out["text"]), attrs.get("hint", ""))
        exc.__dict__.update(attrs)
        if out.get("errno") is not None and isinstance(exc, OSError):
            exc.errno = out["errno"]
        return exc
    if out.get("pickled"):
        try:
            rebuilt = pickle.loads(out["pickled"])
            if isinstance(rebuilt, BaseException):
                return rebuilt
        except Exception:
            pass
    return RuntimeError(f"rank {out['rank']} failed to fetch: {out['name']}: {out['text']}")


def first_failure(dist: ModuleType, group: Any, mine: dict[str, Any] | None) -> dict[str, Any] | None:
    """All ranks' outcomes of one step; the failure of the lowest failing rank, or None. A collective."""
    outcomes: list[dict[str, Any] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(outcomes, mine, group=group)
    return next((o for o in outcomes if o is not None), None)


STOPPED = ("a rank of the job stopped while the others waited for the teacher (killed, out of memory, or its "
           "node failed)", "run the job again: what was fetched is kept")


def collective(fn: Callable[..., Any], *args: Any, stopped: tuple[str, str] = STOPPED) -> Any:
    """``fn(*args)``, a collective: a rank that died (a reset, a timeout) is one NetworkError on every rank."""
    try:
        return fn(*args)
    except Exception as exc:
        if is_transport(exc):
            raise errors.NetworkError(*stopped) from None
        raise


def gloo_group(dist: ModuleType, timeout: float) -> Any:
    return dist.new_group(backend="gloo", timeout=dt.timedelta(seconds=timeout))


def destroy(dist: ModuleType, group: Any) -> None:
    with contextlib.suppress(Exception):  # older torch cannot destroy a subgroup; it is freed at exit
        dist.destroy_process_group(group)


Asks = tuple[str, str, str, str, bool, bool]  # what a rank asks: model, revision, source, share, shared_fs, update


@dataclass(frozen=True)
class Call:
    """What one rank asked of ``fetch_once`` and where it runs: every rank's, in the job's first exchange."""

    rank: int
    node: str  # the node it runs on: torchrun's GROUP_RANK, else the host name
    local_rank: int | None  # LOCAL_RANK, when the launcher sets it
    asks: Asks | None  # None: it failed
    error: dict[str, Any] | None = None  # what it raised before the exchange (``outcome``)

    @classmethod
    def here(cls, rank: int, asks: Asks | None,
             error: dict[str, Any] | None) -> Call:
        node = os.environ.get("GROUP_RANK", "").strip()
        value = os.environ.get("LOCAL_RANK", "").strip()
        return cls(rank, f"node {node}" if node.isdigit() else socket.gethostname(),
                   int(value) if value.isdigit() else None, asks, error)


def agree(calls: list[Call]) -> dict[str, Any] | None:
    """The first exchange's failure, the same on every rank: the lowest rank that failed before it, or whose call
    differs from rank 0's (every rank of a job must fetch the same checkpoint the same way); None if all agree."""
    want = calls[0].asks
    for call in calls:
        if call.error is not None:
            return call.error
        if call.asks != want and want is not None and call.asks is not None:
            return outcome(errors.ConfigError(
                f"rank {call.rank} called fetch_once for {_asks(call.asks)}, rank 0 for {_asks(want)}: every rank "
                f"of a job fetches the same checkpoint the same way",
                "pass the same model, revision, source, share, shared_fs and update on every rank (e.g. "
                "from the job's one config)"), call.rank)
    return None


def _asks(asks: Asks) -> str:
    model, revision, source, share, shared_fs, update = asks
    return f"{model}@{revision} from {source} (share={share or None!r}, shared_fs={shared_fs}, update={update})"


def leaders(calls: list[Call], shared_fs: bool) -> list[int]:
    """The rank that fetches (or receives) for each node, ascending: global rank 0 for its own node (a second one
    there would wait on the node's lock while rank 0 fetches into the same dino_root), else the node's local rank
    0, else its lowest rank. ``shared_fs``: rank 0 alone."""
    if shared_fs:
        return [0]
    out = {calls[0].node: 0}
    for call in calls:
        if call.node not in out or (call.local_rank == 0 and calls[out[call.node]].local_rank != 0
                                    and out[call.node] != 0):
            out[call.node] = call.rank
    return sorted(out.values())


def is_transport(exc: BaseException) -> bool:
    """An error of the process group itself (a peer gone, a timeout), not of our source or sink."""
    dist_error = getattr(importlib.import_module("torch.distributed"), "DistError", None)
    if dist_error is not None and isinstance(exc, dist_error):
        return True
    return isinstance(exc, RuntimeError) and any(
        w in str(exc).lower() for w in ("gloo", "connection", "timed out", "timeout", "peer", "socket"))


def check_fetched(req: FetchRequest, leader_rank: str) -> None:
    """VerificationError unless this node's dino_root holds the checkpoint (a rank that waited for its leader)."""
    from ._validate import why_not

    if (why := why_not(req.dino_root, req.model, req.revision)) is None:
        return
    raise VerificationError(
        f"after {leader_rank} fetched {req.model}@{req.revision}, {req.dino_root} is not a complete checkpoint of "
        f"it on {socket.gethostname()}: {why}",
        "with shared_fs=True dino_root must be on a filesystem every node sees; otherwise use shared_fs=False")
