"""The broadcast's vocabulary and transport (see ``_broadcast`` for the protocol): file specs, stats, the
``Source``/``Sink`` protocols, the transfer group, and point-to-point messages on it that turn a broken group
into one error."""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib
import pickle
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Protocol, TextIO

from ._distributed import _rebuild
from ._errors import NetworkError
from ._progress import human_bytes

MiB = 1024 * 1024
CHUNK = 32 * MiB  # largest piece; also the alignment of the sender's read windows
_DATA, _END, _ABORT = 0, 1, 2
_DROP = -2  # an abort header's file index when the source's bytes were wrong (IntegrityError)
_POLL = 0.05  # seconds between two looks at the source's ready frontier
BROKEN = ("the broadcast of the teacher's files broke off: a rank of the transfer group stopped "
          "(killed, out of memory, or its node failed)")
BROKEN_HINT = "run the job again: every node resumes from the bytes it already wrote"

Range = tuple[int, int]



@dataclass(frozen=True)
class FileSpec:
    name: str
    size: int
    sha256: str  # of the whole file; the receiver's check


@dataclass
class NodeStats:
    rank: int
    role: str  # "sender", "receiver" or "warm" (a receiver that missed nothing)
    bytes: int = 0  # sent (sender: all receivers together) or received over the group
    seconds: float = 0.0  # from the start of send/receive to the end of the data step
    files: dict[str, int] = field(default_factory=dict)  # bytes per file


@dataclass
class Report:
    files: list[FileSpec]
    meta: dict[str, Any]
    nodes: dict[int, NodeStats]  # by global rank: the same on every member
    rank: int

    @property
    def mine(self) -> NodeStats:
        return self.nodes[self.rank]


class Source(Protocol):
    """The sender's bytes: a file may still be growing (being downloaded) while it is sent."""

    def ready(self, name: str) -> int:
        """Bytes of ``name`` that may be sent: every byte below this is final (written, or verified).
        Raise the download's error if it failed; it is then raised on every rank."""

    def readinto(self, name: str, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with the bytes of ``name`` from ``offset`` (all of them are below ``ready``)."""


class Sink(Protocol):
    """A receiver's own copy, e.g. the fetcher's partial folder of each file."""

    def missing(self, spec: FileSpec) -> list[Range]:
        """The byte ranges of ``spec`` this node lacks: sorted, disjoint, inside [0, size); [] if it holds it."""

    def write(self, spec: FileSpec, offset: int, data: memoryview) -> None:
        """Write ``data`` at ``offset`` and record it as done (may be batched until ``close``)."""

    def complete(self, spec: FileSpec) -> None:
        """Every missing byte of ``spec`` was written: verify it (raise IntegrityError) and stage it."""

    def close(self) -> None:
        """Record what was written, whatever happened before: the next run resumes from it."""

    # Optional: ``drop()``, called when the sender's source failed its sha256 (the abort says so): forget
    # every file not completed, its bytes may be as wrong as the source's (``PartialSink.drop``).


def _torch() -> tuple[ModuleType, ModuleType]:
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


def _check_ranges(spec: FileSpec, ranges: Sequence[Range]) -> list[Range]:
    clean = sorted((int(s), int(e)) for s, e in ranges)
    prev = 0
    for s, e in clean:
        if not (prev <= s < e <= spec.size):
            raise ValueError(f"bad missing ranges for {spec.name}: {clean}")
        prev = e
    return clean


class _Line:
    """The receiving node's progress line on stderr (one line every ``every`` seconds, and a last one)."""

    def __init__(self, stream: TextIO | None, rank: int, src: int, total: int, every: float = 2.0) -> None:
        self.stream, self.rank, self.src, self.total, self.every = stream, rank, src, total, every
        self.t0 = self.last = time.monotonic()

    def show(self, done: int, final: bool = False, end: str = "done") -> None:
        now = time.monotonic()
        if self.stream is None or (not final and now - self.last < self.every):
            return
        self.last = now
        rate = done / max(now - self.t0, 1e-6)
        end = end if final else f"{100 * done / max(self.total, 1):.0f}%"
        with contextlib.suppress(OSError, ValueError):
            self.stream.write(f"dinov3-fetcher: rank {self.rank} received {human_bytes(done)} of "
                              f"{human_bytes(self.total)} from rank {self.src} ({human_bytes(rate)}/s) {end}\n")
            self.stream.flush()


class _Broken(Exception):
    """The process group failed under us (a peer gone, a timeout)."""


def _guard(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        if _is_transport(exc):
            raise _Broken(str(exc)) from None
        raise


def _is_transport(exc: BaseException) -> bool:
    """An error of the process group itself (a peer gone, a timeout), not of our source or sink."""
    dist_error = getattr(importlib.import_module("torch.distributed"), "DistError", None)
    if dist_error is not None and isinstance(exc, dist_error):
        return True
    return isinstance(exc, RuntimeError) and any(
        w in str(exc).lower() for w in ("gloo", "connection", "timed out", "timeout", "peer", "socket"))


class _Wire:
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
        _guard(self.dist.recv, size, src=src, group=self.group)
        raw = bytearray(int(size.item()))
        _guard(self.dist.recv, self.torch.frombuffer(raw, dtype=self.torch.uint8), src=src, group=self.group)
        return pickle.loads(bytes(raw))  # peers of one job only: the same trust as torch's all_gather_object

    def head(self, kind: int, idx: int = -1, offset: int = 0, n: int = 0) -> Any:
        return self.torch.tensor([kind, idx, offset, n], dtype=self.torch.int64)


def _isend(wire: _Wire, tensor: Any, r: int, dead: set[int]) -> list[tuple[int, Any]]:
    """Post a send to ``r`` unless it is dead; a send that fails at once marks it dead."""
    if r in dead:
        return []
    try:
        return [(r, wire.dist.isend(tensor, dst=r, group=wire.group))]
    except Exception as exc:
        if not _is_transport(exc):
            raise
        dead.add(r)
        return []


def _send_obj(wire: _Wire, obj: Any, peers: Iterable[int], dead: set[int]) -> None:
    works: list[tuple[int, Any]] = []
    for r in peers:
        if r in dead:
            continue
        try:
            works += [(r, w) for w in wire.isend_obj(obj, r)]
        except Exception as exc:
            if not _is_transport(exc):
                raise
            dead.add(r)
    _wait_all(works, dead)


def _wait_all(works: Iterable[tuple[int, Any]], dead: set[int]) -> None:
    """Wait for sends; a peer whose send fails is dead (it gets nothing more)."""
    for r, work in works:
        try:
            work.wait()
        except Exception as exc:
            if not _is_transport(exc):
                raise
            dead.add(r)


def _verdict(verdict: dict[str, Any], report: Report, mine: BaseException | None) -> Report:
    failure = verdict["failure"]
    if failure is not None:
        if failure.get("broken"):
            raise NetworkError(BROKEN, BROKEN_HINT)
        if mine is not None and failure["rank"] == report.rank:
            raise mine
        raise _rebuild(failure)
    report.nodes = dict(verdict["nodes"])
    return report

