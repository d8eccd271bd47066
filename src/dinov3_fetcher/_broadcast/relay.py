"""Step 3 of the broadcast, the data, along a chain: rank 0 -> the chain's first member -> the next -> ...

Rank 0 sends each piece once, to the first member; every member writes the part of the piece it misses and
passes the piece on to the next member while it receives the following one, as far down the chain as the
piece's header says it is needed (``last``: the chain position of the last member that misses any of it). So
every link carries at most the checkpoint once, whatever the number of nodes, and the job takes about one
transfer time plus one piece per hop. Members that miss more come first; a member that misses nothing is not in
the chain at all.

Memory: each rank holds ``POOL`` piece buffers, reused (``Pool``); a buffer is free again once the send that
passes it on has completed and the writer has written this member's part of it. A member whose next member is
gone (a reset) stops passing pieces on and keeps receiving (``Forward.broken``), so that nobody before it
blocks; rank 0 learns it and stops the chain (see ``sender``).
"""

from __future__ import annotations

import bisect
import itertools
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from .._ranks import NodeStats, is_transport
from .wire import ABORT, DATA, Broken, Range, Wire, guard

__all__ = ["POOL", "Forward", "Piece", "Pool", "overlap", "pieces", "relay"]

POOL = 4  # piece buffers per rank: one being received, the others being passed on or written


class Piece:
    """One reused buffer, and how many users (the loop, the send passing it on, the writer) still hold it."""

    def __init__(self, torch: Any, size: int) -> None:
        self.buf = bytearray(size)
        self.view = memoryview(self.buf)
        self.tensor = torch.frombuffer(self.buf, dtype=torch.uint8)
        self.users = 0


class Pool:
    """``POOL`` pieces of ``size`` bytes; ``take`` waits for one to be let go by all its users."""

    def __init__(self, torch: Any, size: int, count: int = POOL) -> None:
        self.cond = threading.Condition()
        self.free = [Piece(torch, size) for _ in range(count)]

    def take(self, forward: Forward | None) -> Piece:
        """A free piece (held once, by the caller). While none is free: the oldest send passing one on is waited
        for (the caller's thread owns ``forward``), else the writer, which lets its pieces go as it goes."""
        while True:
            with self.cond:
                if self.free:
                    piece = self.free.pop()
                    piece.users = 1
                    return piece
            if forward is not None and forward.pending:
                forward.reap()
                continue
            with self.cond:
                self.cond.wait_for(lambda: bool(self.free), timeout=1.0)

    def hold(self, piece: Piece) -> None:
        with self.cond:
            piece.users += 1

    def release(self, piece: Piece) -> None:
        with self.cond:
            piece.users -= 1
            if piece.users == 0:
                self.free.append(piece)
                self.cond.notify()


class Forward:
    """Headers and pieces to one peer (the next member of the chain), sent in order without waiting; a piece is
    let go once its send completed. A peer that is gone makes ``broken`` true: it gets nothing more, and what was
    pending is let go."""

    def __init__(self, wire: Wire, dst: int, pool: Pool, stats: NodeStats) -> None:
        self.wire, self.dst, self.pool, self.stats = wire, dst, pool, stats
        self.pending: deque[tuple[list[Any], Piece | None]] = deque()
        self.broken = False

    def send(self, kind: int, idx: int = -1, offset: int = 0, n: int = 0, last: int = -1,
             piece: Piece | None = None) -> None:
        if self.broken:
            return
        dist, group = self.wire.dist, self.wire.group
        works: list[Any] = []
        try:
            works.append(dist.isend(self.wire.head(kind, idx, offset, n, last), dst=self.dst, group=group))
            if piece is not None:
                works.append(dist.isend(piece.tensor[:n], dst=self.dst, group=group))
        except Exception as exc:
            if not is_transport(exc):
                raise
            self.broken = True
        if piece is not None and len(works) == 2:
            self.pool.hold(piece)
            self.stats.sent += n
        self.pending.append((works, piece if len(works) == 2 else None))
        if self.broken:
            self.close()

    def reap(self) -> None:
        """Wait for the oldest send; let its piece go."""
        works, piece = self.pending.popleft()
        try:
            for work in works:
                work.wait()
        except Exception as exc:
            if not is_transport(exc):
                raise
            self.broken = True
        finally:
            if piece is not None:
                self.pool.release(piece)

    def close(self) -> None:
        while self.pending:
            self.reap()


def pieces(wants: Sequence[Sequence[Range]], size: int) -> Iterator[tuple[int, int, int]]:
    """The pieces of one file for a chain whose member at position p misses ``wants[p]`` (sorted, disjoint):
    ``(start, end, last)``, each inside one ``size``-aligned window, cut wherever a member's need begins or ends
    (so that each member misses all of a piece or none of it), ``last`` the position of the last member that
    misses it."""
    edges = sorted({x for ranges in wants for r in ranges for x in r})
    starts = [[s for s, _ in ranges] for ranges in wants]
    for a, b in itertools.pairwise(edges):
        last = -1
        for p in range(len(wants) - 1, -1, -1):
            i = bisect.bisect_right(starts[p], a) - 1
            if i >= 0 and wants[p][i][1] > a:
                last = p
                break
        if last < 0:
            continue
        while a < b:
            stop = min(b, (a // size + 1) * size)
            yield a, stop, last
            a = stop


def overlap(ranges: Sequence[Range], start: int, end: int) -> list[Range]:
    """The parts of [start, end) inside ``ranges`` (sorted, disjoint)."""
    i = max(0, bisect.bisect_right(ranges, (start, start)) - 1)
    out: list[Range] = []
    while i < len(ranges) and ranges[i][0] < end:
        s, e = max(ranges[i][0], start), min(ranges[i][1], end)
        if s < e:
            out.append((s, e))
        i += 1
    return out


def relay(wire: Wire, prev: int, forward: Forward | None, position: int, missing: list[list[Range]],
          pool: Pool, stats: NodeStats, take: Callable[[int, int, Piece, list[Range]], None],
          on_broken: Callable[[], None]) -> tuple[int, int, int, bool]:
    """A chain member's data step: headers and pieces from ``prev`` until an end or an abort. Each piece's part
    this member misses goes to ``take(idx, offset, piece, parts)`` (which holds the piece until it has written
    it); the piece goes on to ``forward`` if a later member needs it. ``on_broken`` is called as soon as the next
    member is found gone, while pieces still come. The end or abort is passed on (an abort when ``prev`` was
    gone). Returns the last header's kind, file index and offset, and whether a neighbour was gone."""
    dist, group = wire.dist, wire.group
    head = wire.head(DATA)
    told, gone = False, False
    kind, idx, offset = DATA, -1, 0
    while True:
        try:
            guard(dist.recv, head, src=prev, group=group)
        except Broken:
            gone = True
            break
        kind, idx, offset, n, last = (int(v) for v in head.tolist())
        if kind != DATA:
            break
        piece = pool.take(forward)
        try:
            guard(dist.recv, piece.tensor[:n], src=prev, group=group)
        except Broken:
            pool.release(piece)
            gone = True
            break
        stats.bytes += n
        if parts := overlap(missing[idx], offset, offset + n):
            take(idx, offset, piece, parts)
        if forward is not None and last > position:
            forward.send(DATA, idx, offset, n, last, piece)
        pool.release(piece)
        if forward is not None and forward.broken and not told:
            told = True
            on_broken()
    if gone:
        kind, idx, offset = ABORT, -1, 0
    if forward is not None:
        forward.send(kind, idx, offset)
        forward.close()
    return kind, idx, offset, gone or (forward is not None and forward.broken)
