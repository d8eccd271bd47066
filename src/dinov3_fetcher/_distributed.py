"""Fetch once per training job: ``fetch_once`` inside torch.distributed (torchrun), a plain fetch outside it.

One rank per node fetches (``shared_fs=True``: global rank 0 only, for a dino_root every node sees; see
``_ranks.leaders``); the other ranks wait, then check that dino_root holds the checkpoint. Every rank returns
the same path or raises the same error: the outcome of each step is exchanged with ``all_gather_object`` on a
gloo group of our own (so it works whatever the job's backend is, NCCL included, needs no GPU, and waits as long
as a big download takes: ``timeout``), and every rank reaches every collective whatever happens, so a failed
fetch cannot leave the others stuck at a barrier. The first exchange, before anything is fetched, holds every
rank's call: a rank that failed before it (its dino_root is a file...) or that asks for another checkpoint
than rank 0 fails the job on every rank at once.

    torch.distributed.init_process_group("nccl")
    path = fetch_once(cfg.dino_root, "facebook/dinov3-vitl16-pretrain-lvd1689m")
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Literal, overload

from . import _errors as errors
from ._config import FetchRequest, make_request
from ._ranks import (
    Call,
    JobResult,
    agree,
    check_fetched,
    collective,
    destroy,
    first_failure,
    gloo_group,
    leaders,
    outcome,
    raise_failure,
)
from ._registry import DEFAULT_MODEL

__all__ = ["DEFAULT_TIMEOUT", "any_rank", "fetch_once"]

DEFAULT_TIMEOUT = 6 * 3600.0  # seconds the other ranks wait for the fetching rank (a 27 GB ViT-7B on a slow link)


def _dist() -> ModuleType | None:
    """torch.distributed if a default process group is initialised, else None (without importing torch when
    nothing imported it: then no group can be initialised)."""
    if "torch.distributed" not in sys.modules:
        return None
    try:
        dist = importlib.import_module("torch.distributed")
    except ImportError:
        return None
    if not dist.is_available() or not dist.is_initialized():
        return None
    return dist


def any_rank(flag: bool, timeout: float = 600.0, error: BaseException | None = None) -> bool:
    """True if ``flag`` is true on any rank (a collective: call it on every rank); ``flag`` outside a job.

    ``error``: what this rank raised before it (a device it cannot use...), so that no rank is left waiting at
    the collective it will not reach: every rank raises the lowest failing rank's error instead (outside a
    job, this rank raises it)."""
    dist = _dist()
    if dist is None:
        if error is not None:
            raise error
        return flag
    rank = dist.get_rank()
    group = collective(gloo_group, dist, timeout)
    try:
        flags: list[tuple[bool, dict[str, Any] | None] | None] = [None] * dist.get_world_size()
        collective(dist.all_gather_object, flags, (bool(flag), outcome(error, rank)), group)
    finally:
        destroy(dist, group)
    failure = next((f[1] for f in flags if f is not None and f[1] is not None), None)
    if failure is not None:
        raise_failure(failure, error, rank)
    return any(f is not None and f[0] for f in flags)


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

    - ``shared_fs=False`` (default): one rank per node fetches into that node's dino_root: its local rank 0
      (on global rank 0's node, rank 0 itself).
    - ``shared_fs=True``: global rank 0 fetches; dino_root must be on a filesystem all nodes see.
    - The other ranks wait (up to ``timeout`` seconds), then check dino_root holds the checkpoint, offline.

    Every rank returns the same path, or raises the same error: if a fetching rank fails (gated repo, no
    space, network...), every rank raises that error (same type, message and hint); if a waiting rank finds
    dino_root incomplete, every rank raises that VerificationError. The lowest failing rank's error wins.
    Before anything is fetched, every rank's call is exchanged: a rank that failed to start (its dino_root is
    a file...) fails every rank with its error, and a rank that asks for another model, revision or source
    than rank 0, or another ``share``, ``shared_fs`` or ``update``, fails every rank with a ConfigError.

    ``share="broadcast"`` (nodes with their own disks, no shared filesystem): global rank 0 alone fetches from
    the source; one rank of every other node receives the bytes over a gloo group (the job's fabric), relayed
    along a chain of the nodes so that no link carries them more than once, verifies each file's sha256 and
    publishes them in its own dino_root (see ``_broadcast``). Warm nodes receive nothing; a node holding a
    partial receives only what it misses. The receiving nodes print a progress line on stderr.
    ``details=True`` returns a ``JobResult`` (path, commit, and with a broadcast the bytes and seconds of every
    node) instead of the path.
    """
    from ._fetch import fetch

    req: FetchRequest | None = None
    mine: BaseException | None = None
    try:
        if share not in (None, "broadcast"):
            raise errors.ConfigError(f"share={share!r} is not a way to share the teacher between nodes",
                                     "use share=None (one fetch per node, or per job with shared_fs) or 'broadcast'")
        if share == "broadcast" and shared_fs:
            raise errors.ConfigError("share='broadcast' is for nodes with their own disks; shared_fs=True says "
                                     "dino_root is one folder every node sees", "pass one of them, not both")
        req = make_request(dino_root, model_name, revision, source)
    except Exception as exc:  # inside a job, every rank learns it in the first exchange (none waits for this one)
        mine = exc
    dist = _dist()
    if dist is None:
        if mine is not None:
            raise mine
        assert req is not None
        res = fetch(req, update=update)
        return JobResult(res.path, res.commit) if details else res.path
    rank = dist.get_rank()
    group = collective(gloo_group, dist, timeout)  # every rank creates it and joins the first exchange, whatever failed
    try:
        asks = (req.model, req.revision, req.source, share or "", shared_fs, update) if req is not None else None
        calls: list[Call | None] = [None] * dist.get_world_size()
        collective(dist.all_gather_object, calls, Call.here(rank, asks, outcome(mine, rank)), group)
        failure = agree([c for c in calls if c is not None])
        if failure is None:
            assert req is not None
            chosen = leaders([c for c in calls if c is not None], shared_fs)
            if share == "broadcast":
                from ._broadcast.job import fetch_broadcast

                return fetch_broadcast(dist, group, req, chosen, update=update, timeout=timeout, details=details)
            path = req.dino_root
            if rank in chosen:
                try:
                    path = fetch(req, update=update).path
                except BaseException as exc:  # every rank must reach the collective below, whatever happened
                    mine = exc
            failure = collective(first_failure, dist, group, outcome(mine, rank))
            if failure is None and rank not in chosen:
                try:
                    check_fetched(req, "rank 0" if shared_fs else "this node's fetching rank")
                except BaseException as exc:
                    mine = exc
                failure = collective(first_failure, dist, group, outcome(mine, rank))
            elif failure is None:
                failure = collective(first_failure, dist, group, None)
    finally:
        destroy(dist, group)
    if failure is None:
        return JobResult(path) if details else path
    raise_failure(failure, mine, rank)
