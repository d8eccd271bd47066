"""Fetch once per training job: ``fetch_once`` inside torch.distributed (torchrun), a plain fetch outside it.

Local rank 0 of each node fetches (``shared_fs=True``: global rank 0 only, for a dino_root every node sees);
the other ranks wait, then check that dino_root holds the checkpoint. Every rank returns the same path or
raises the same error: the outcome of each step is exchanged with ``all_gather_object`` on a gloo group of
our own (so it works whatever the job's backend is, NCCL included, needs no GPU, and waits as long as a big
download takes: ``timeout``), and every rank reaches every collective whatever happens, so a failed fetch
cannot leave the others stuck at a barrier.

    torch.distributed.init_process_group("nccl")
    path = fetch_once(cfg.dino_root, "facebook/dinov3-vitl16-pretrain-lvd1689m")
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib
import os
import pickle
import socket
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal, overload

from . import _errors as errors
from ._config import FetchRequest, make_request
from ._errors import FetcherError, VerificationError
from ._registry import DEFAULT_MODEL

if TYPE_CHECKING:
    from ._share import JobResult

__all__ = ["DEFAULT_TIMEOUT", "any_rank", "fetch_once"]

DEFAULT_TIMEOUT = 6 * 3600.0  # seconds the other ranks wait for the fetching rank (a 27 GB ViT-7B on a slow link)


def _dist() -> ModuleType | None:
    """torch.distributed if torch is installed and a default process group is initialised, else None."""
    try:
        dist = importlib.import_module("torch.distributed")
    except ImportError:
        return None
    if not dist.is_available() or not dist.is_initialized():
        return None
    return dist


def _outcome(exc: BaseException | None, rank: int) -> dict[str, Any] | None:
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


def _rebuild(out: dict[str, Any]) -> BaseException:
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


def _first_failure(dist: ModuleType, group: Any, mine: dict[str, Any] | None) -> dict[str, Any] | None:
    """All ranks' outcomes of one step; the failure of the lowest failing rank, or None. A collective."""
    outcomes: list[dict[str, Any] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(outcomes, mine, group=group)
    return next((o for o in outcomes if o is not None), None)


def _gloo_group(dist: ModuleType, timeout: float) -> Any:
    return dist.new_group(backend="gloo", timeout=dt.timedelta(seconds=timeout))


def _destroy(dist: ModuleType, group: Any) -> None:
    with contextlib.suppress(Exception):  # older torch cannot destroy a subgroup; it is freed at exit
        dist.destroy_process_group(group)


def any_rank(flag: bool, timeout: float = 600.0) -> bool:
    """True if ``flag`` is true on any rank (a collective: call it on every rank); ``flag`` outside a job."""
    dist = _dist()
    if dist is None:
        return flag
    group = _gloo_group(dist, timeout)
    try:
        flags: list[bool | None] = [None] * dist.get_world_size()
        dist.all_gather_object(flags, bool(flag), group=group)
    finally:
        _destroy(dist, group)
    return any(flags)


def _local_rank(dist: ModuleType, group: Any) -> int:
    """LOCAL_RANK as torchrun sets it; without it, this rank's index among the ranks on the same host."""
    value = os.environ.get("LOCAL_RANK")
    if value is not None and value.strip().isdigit():
        return int(value)
    hosts: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(hosts, socket.gethostname(), group=group)
    me = dist.get_rank()
    return sum(1 for r, h in enumerate(hosts) if h == hosts[me] and r < me)


def _check_fetched(req: FetchRequest, leader_rank: str) -> None:
    from ._validate import why_not

    if (why := why_not(req.dino_root, req.model, req.revision)) is None:
        return
    raise VerificationError(
        f"after {leader_rank} fetched {req.model}@{req.revision}, {req.dino_root} is not a complete checkpoint of "
        f"it on {socket.gethostname()}: {why}",
        "with shared_fs=True dino_root must be on a filesystem every node sees; otherwise use shared_fs=False")


@overload
def fetch_once(dino_root: str | os.PathLike[str], model_name: str = ..., *, revision: str | None = ...,
               shared_fs: bool = ..., update: bool = ..., timeout: float = ..., source: str | None = ...,
               share: str | None = ..., details: Literal[False] = ...) -> Path: ...
@overload
def fetch_once(dino_root: str | os.PathLike[str], model_name: str = ..., *, revision: str | None = ...,
               shared_fs: bool = ..., update: bool = ..., timeout: float = ..., source: str | None = ...,
               share: str | None = ..., details: Literal[True]) -> JobResult: ...
def fetch_once(
    dino_root: str | os.PathLike[str],
    model_name: str = DEFAULT_MODEL,
    *,
    revision: str | None = None,
    shared_fs: bool = False,
    update: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
    source: str | None = None,
    share: str | None = None,
    details: bool = False,
) -> Path | JobResult:
    """``fetch_dinov3`` once per node (or per job) in a torch.distributed job; the path on every rank.

    Call it on every rank, after ``torch.distributed.init_process_group`` (any backend) and before the
    teacher is loaded. Without torch, or without an initialised process group, it is ``fetch_dinov3``.

    - ``shared_fs=False`` (default): local rank 0 of each node fetches into that node's dino_root.
    - ``shared_fs=True``: global rank 0 fetches; dino_root must be on a filesystem all nodes see.
    - The other ranks wait (up to ``timeout`` seconds), then check dino_root holds the checkpoint, offline.

    Every rank returns the same path, or raises the same error: if a fetching rank fails (gated repo, no
    space, network...), every rank raises that error (same type, message and hint); if a waiting rank finds
    dino_root incomplete, every rank raises that VerificationError. The lowest failing rank's error wins.

    ``share="broadcast"`` (nodes with their own disks, no shared filesystem): global rank 0 alone fetches from
    the source; local rank 0 of every other node receives the bytes from it over a gloo group (the job's
    fabric), verifies each file's sha256 and publishes them in its own dino_root (see ``_share``). Warm nodes
    receive nothing; a node holding a partial receives only what it misses. The receiving nodes print a
    progress line on stderr. ``details=True`` returns a ``JobResult`` (path, commit, and with a broadcast the
    bytes and seconds of every node) instead of the path.
    """
    from ._fetch import fetch

    if share not in (None, "broadcast"):
        raise errors.ConfigError(f"share={share!r} is not a way to share the teacher between nodes",
                                 "use share=None (one fetch per node, or per job with shared_fs) or 'broadcast'")
    if share == "broadcast" and shared_fs:
        raise errors.ConfigError("share='broadcast' is for nodes with their own disks; shared_fs=True says "
                                 "dino_root is one folder every node sees", "pass one of them, not both")
    req = make_request(dino_root, model_name, revision, source)
    dist = _dist()
    if dist is None or share == "broadcast":
        from ._share import JobResult, fetch_broadcast

        if dist is not None:
            return fetch_broadcast(dist, req, update=update, timeout=timeout, details=details)
        res = fetch(req, update=update)
        return JobResult(res.path, res.commit) if details else res.path
    rank = dist.get_rank()
    group = _gloo_group(dist, timeout)
    try:
        local_rank = _local_rank(dist, group)
        leader = rank == 0 if shared_fs else local_rank == 0
        mine: BaseException | None = None
        path = req.dino_root
        if leader:
            try:
                path = fetch(req, update=update).path
            except BaseException as exc:  # every rank must reach the collective below, whatever happened
                mine = exc
        failure = _first_failure(dist, group, _outcome(mine, rank))
        if failure is None and not leader:
            try:
                _check_fetched(req, "rank 0" if shared_fs else "local rank 0")
            except BaseException as exc:
                mine = exc
            failure = _first_failure(dist, group, _outcome(mine, rank))
        elif failure is None:
            failure = _first_failure(dist, group, None)
    finally:
        _destroy(dist, group)
    if failure is None:
        if details:
            from ._share import JobResult

            return JobResult(path)
        return path
    if mine is not None and failure["rank"] == rank:
        raise mine
    raise _rebuild(failure)
