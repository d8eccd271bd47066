"""What the ranks of a torch.distributed job share so that every rank ends the same way: an exception as plain
data that every rank rebuilds alike, the lowest failing rank's outcome of a step, a gloo group of our own (it
works whatever the job's backend is, NCCL included, needs no GPU, and waits as long as a big download takes),
and what ``fetch_once(details=True)`` returns on every rank."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import pickle
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from . import _errors as errors
from ._config import FetchRequest
from ._errors import FetcherError, VerificationError

__all__ = ["JobResult", "NodeStats", "check_fetched", "destroy", "first_failure", "gloo_group", "local_rank",
           "outcome", "rebuild"]


@dataclass
class NodeStats:
    """One node's part in a broadcast (its leader's): by global rank."""

    rank: int
    role: str  # "sender", "receiver" or "warm" (a receiver that missed nothing)
    bytes: int = 0  # sent (sender: all receivers together) or received over the group
    seconds: float = 0.0  # from the start of send/receive to the end of the data step
    files: dict[str, int] = field(default_factory=dict)  # bytes per file


@dataclass
class JobResult:
    """What ``fetch_once(..., details=True)`` returns on every rank: the path, the commit the job's nodes hold,
    and (``share="broadcast"``) the bytes and seconds of every node's leader, by global rank. A node's
    ``role`` is ``sender`` (rank 0: ``bytes`` is what it sent to all the others together), ``receiver`` or
    ``warm`` (held the checkpoint, received nothing)."""

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


def gloo_group(dist: ModuleType, timeout: float) -> Any:
    return dist.new_group(backend="gloo", timeout=dt.timedelta(seconds=timeout))


def destroy(dist: ModuleType, group: Any) -> None:
    with contextlib.suppress(Exception):  # older torch cannot destroy a subgroup; it is freed at exit
        dist.destroy_process_group(group)


def local_rank(dist: ModuleType, group: Any) -> int:
    """LOCAL_RANK as torchrun sets it; without it, this rank's index among the ranks on the same host."""
    value = os.environ.get("LOCAL_RANK")
    if value is not None and value.strip().isdigit():
        return int(value)
    hosts: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(hosts, socket.gethostname(), group=group)
    me = dist.get_rank()
    return sum(1 for r, h in enumerate(hosts) if h == hosts[me] and r < me)


def check_fetched(req: FetchRequest, leader_rank: str) -> None:
    """VerificationError unless this node's dino_root holds the checkpoint (a rank that waited for its leader)."""
    from ._validate import why_not

    if (why := why_not(req.dino_root, req.model, req.revision)) is None:
        return
    raise VerificationError(
        f"after {leader_rank} fetched {req.model}@{req.revision}, {req.dino_root} is not a complete checkpoint of "
        f"it on {socket.gethostname()}: {why}",
        "with shared_fs=True dino_root must be on a filesystem every node sees; otherwise use shared_fs=False")
