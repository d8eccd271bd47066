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
from .._ranks import NodeStats, is_transport, rebuild

MiB = 1024 * 1024
PIECE = 2 * MiB  # the largest piece: small, so that each hop of the chain adds little (2 MiB at 25 MB/s: 0.08 s)
DATA, END, ABORT = 0, 1, 2  # a header's kind: a piece follows; the data step is over; it stopped (a failure)
DROP = -2  # an abort header's file index when the source's bytes were wrong (IntegrityError); its offset is
# then the index of the file whose bytes were (-1: any unfinished file's may be)
POLL = 0.05  # seconds between two looks at the source's ready frontier
BROKEN = ("the broadcast of the teacher's files broke off: a rank of the transfer group stopped "
          "(killed, out of memory, or its node failed)")
BROKEN_HINT = "run the job again: every node resumes from the bytes it already wrote"

Range = tuple[int, int]

__all__ = ["ABORT", "BROKEN", "BROKEN_HINT", "DATA", "DROP", "END", "PIECE", "POLL", "Broken", "FileSpec", "Range",
           "Report", "Wire", "check_ranges", "guard", "leaders_group", "send_obj", "torch_modules", "verdict",
           "wait_all"]


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


def leaders_group(dist: ModuleType, members: list[int], timeout: float) -> Any:
    """The transfer group of ``members`` (global rank 0 and each other node's leader), on gloo. Every rank of the
    job calls it, as ``new_group`` wants; the other ranks get ``GroupMember.NON_GROUP_MEMBER``."""
    return dist.new_group(ranks=members, backend="gloo", timeout=dt.timedelta(seconds=timeout))


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


class Wire:
    """Point-to-point messages with one peer role on ``group``: small objects (pickled) and headers."""

    def __init__(self, torch: ModuleType, dist: ModuleType, group: Any) -> None:
        self.torch, self.dist, self.group = torch, dist, group

    def isend_obj(self, obj: Any, dst: int) -> list[Any]:
        raw = bytearray(pickle.dumps(obj))
        size = self.torch.tensor([len(raw)], dtype=self.torch.int64)
        payload = self.torch.frombuffer(raw, dtype=self.torch.uint8)
        return [guard(self.dist.isend, size, dst=dst, group=self.group),
                guard(self.dist.isend, payload, dst=dst, group=self.group)]

    def recv_obj(self, src: int) -> Any:
        size = self.torch.zeros(1, dtype=self.torch.int64)
        guard(self.dist.recv, size, src=src, group=self.group)
        raw = bytearray(int(size.item()))
        guard(self.dist.recv, self.torch.frombuffer(raw, dtype=self.torch.uint8), src=src, group=self.group)
        return pickle.loads(bytes(raw))  # peers of one job only: the same trust as torch's all_gather_object

    def head(self, kind: int, idx: int = -1, offset: int = 0, n: int = 0, last: int = -1) -> Any:
        """A header: its kind, and for a piece the file's index, the offset, the length and the position in the
        chain of the last member that needs it (an abort's index: DROP or -1; a drop's offset: the wrong file's
        index, or -1)."""
        return self.torch.tensor([kind, idx, offset, n, last], dtype=self.torch.int64)


def send_obj(wire: Wire, obj: Any, peers: Iterable[int], dead: set[int]) -> None:
    works: list[tuple[int, Any]] = []
    for r in peers:
        if r in dead:
            continue
        try:
            works += [(r, w) for w in wire.isend_obj(obj, r)]
        except Broken:
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


def verdict(decided: dict[str, Any], report: Report, mine: BaseException | None) -> Report:
    """The sender's decision, on a member: the Report, or the one error every member raises."""
    failure = decided["failure"]
    if failure is not None:
        if failure.get("broken"):
            raise NetworkError(BROKEN, BROKEN_HINT)
        if mine is not None and failure["rank"] == report.rank:
            raise mine
        raise rebuild(failure)
    report.nodes = dict(decided["nodes"])
    return report

