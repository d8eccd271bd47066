"""The broadcast's vocabulary and transport: file specs, the report, the transfer group, and point-to-point
messages on it that turn a broken group into one error."""

from __future__ import annotations

import datetime as dt
import importlib
import pickle
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from .._errors import NetworkError
from .._ranks import NodeStats, rebuild

MiB = 1024 * 1024
CHUNK = 32 * MiB  # largest piece; also the alignment of the sender's read windows
DATA, END, ABORT = 0, 1, 2
DROP = -2  # an abort header's file index when the source's bytes were wrong (IntegrityError)
POLL = 0.05  # seconds between two looks at the source's ready frontier
BROKEN = ("the broadcast of the teacher's files broke off: a rank of the transfer group stopped "
          "(killed, out of memory, or its node failed)")
BROKEN_HINT = "run the job again: every node resumes from the bytes it already wrote"

Range = tuple[int, int]

__all__ = ["ABORT", "BROKEN", "BROKEN_HINT", "CHUNK", "DATA", "DROP", "END", "POLL", "Broken", "FileSpec", "NodeStats",
           "Range", "Report", "Wire", "check_ranges", "guard", "is_transport", "isend", "leaders_group",
           "missing_pieces", "send_obj", "torch_modules", "verdict", "wait_all"]

@dataclass(frozen=True)
class FileSpec:
    name: str
    size: int
    sha256: str  # of the whole file; the receiver's check


@dataclass
class Report:
    files: list[FileSpec]
    meta: dict[str, Any]
    nodes: dict[int, NodeStats]  # by global rank: the same on every member
    rank: int

    @property
    def mine(self) -> NodeStats:
        return self.nodes[self.rank]


def torch_modules() -> tuple[ModuleType, ModuleType]:
    return importlib.import_module("torch"), importlib.import_module("torch.distributed")


def leaders_group(dist: ModuleType, group: Any, local_rank: int, timeout: float) -> tuple[Any, list[int]]:
    """The transfer group: global rank 0 and local rank 0 of every node, on gloo. A collective on ``group``
    (every rank calls it, as ``new_group`` wants); returns (group, its global ranks), the group being
    ``GroupMember.NON_GROUP_MEMBER`` on the other ranks."""
    ranks: list[int | None] = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, local_rank, group=group)
    members = [r for r, lr in enumerate(ranks) if r == 0 or lr == 0]
    sub = dist.new_group(ranks=members, backend="gloo", timeout=dt.timedelta(seconds=timeout))
    return sub, members


def missing_pieces(ranges: Iterable[Range], chunk: int) -> list[Range]:
    """Ranges cut at every multiple of ``chunk``: each piece lies inside one chunk-aligned window."""
    out: list[Range] = []
    for s, e in ranges:
        while s < e:
            stop = min(e, (s // chunk + 1) * chunk)
            out.append((s, stop))
            s = stop
    return out


def check_ranges(spec: FileSpec, ranges: Sequence[Range]) -> list[Range]:
    clean = sorted((int(s), int(e)) for s, e in ranges)
    prev = 0
    for s, e in clean:
        if not (prev <= s < e <= spec.size):
            raise ValueError(f"bad missing ranges for {spec.name}: {clean}")
        prev = e
    return clean


class Broken(Exception):
    """The process group failed under us (a peer gone, a timeout)."""


def guard(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        if is_transport(exc):
            raise Broken(str(exc)) from None
        raise


def is_transport(exc: BaseException) -> bool:
    """An error of the process group itself (a peer gone, a timeout), not of our source or sink."""
    dist_error = getattr(importlib.import_module("torch.distributed"), "DistError", None)
    if dist_error is not None and isinstance(exc, dist_error):
        return True
    return isinstance(exc, RuntimeError) and any(
        w in str(exc).lower() for w in ("gloo", "connection", "timed out", "timeout", "peer", "socket"))


class Wire:
    """Point-to-point messages with one peer role on ``group``: small objects (pickled) and headers."""

    def __init__(self, torch: ModuleType, dist: ModuleType, group: Any) -> None:
        self.torch, self.dist, self.group = torch, dist, group

    def isend_obj(self, obj: Any, dst: int) -> list[Any]:
        raw = bytearray(pickle.dumps(obj))
        size = self.torch.tensor([len(raw)], dtype=self.torch.int64)
        payload = self.torch.frombuffer(raw, dtype=self.torch.uint8)
        return [self.dist.isend(size, dst=dst, group=self.group), self.dist.isend(payload, dst=dst, group=self.group)]

    def recv_obj(self, src: int) -> Any:
        size = self.torch.zeros(1, dtype=self.torch.int64)
        guard(self.dist.recv, size, src=src, group=self.group)
        raw = bytearray(int(size.item()))
        guard(self.dist.recv, self.torch.frombuffer(raw, dtype=self.torch.uint8), src=src, group=self.group)
        return pickle.loads(bytes(raw))  # peers of one job only: the same trust as torch's all_gather_object

    def head(self, kind: int, idx: int = -1, offset: int = 0, n: int = 0) -> Any:
        return self.torch.tensor([kind, idx, offset, n], dtype=self.torch.int64)


def isend(wire: Wire, tensor: Any, r: int, dead: set[int]) -> list[tuple[int, Any]]:
    """Post a send to ``r`` unless it is dead; a send that fails at once marks it dead."""
    if r in dead:
        return []
    try:
        return [(r, wire.dist.isend(tensor, dst=r, group=wire.group))]
    except Exception as exc:
        if not is_transport(exc):
            raise
        dead.add(r)
        return []


def send_obj(wire: Wire, obj: Any, peers: Iterable[int], dead: set[int]) -> None:
    works: list[tuple[int, Any]] = []
    for r in peers:
        if r in dead:
            continue
        try:
            works += [(r, w) for w in wire.isend_obj(obj, r)]
        except Exception as exc:
            if not is_transport(exc):
                raise
            dead.add(r)
    wait_all(works, dead)


def wait_all(works: Iterable[tuple[int, Any]], dead: set[int]) -> None:
    """Wait for sends; a peer whose send fails is dead (it gets nothing more)."""
    for r, work in works:
        try:
            work.wait()
        except Exception as exc:
            if not is_transport(exc):
                raise
            dead.add(r)


def verdict(verdict: dict[str, Any], report: Report, mine: BaseException | None) -> Report:
    failure = verdict["failure"]
    if failure is not None:
        if failure.get("broken"):
            raise NetworkError(BROKEN, BROKEN_HINT)
        if mine is not None and failure["rank"] == report.rank:
            raise mine
        raise rebuild(failure)
    report.nodes = dict(verdict["nodes"])
    return report

