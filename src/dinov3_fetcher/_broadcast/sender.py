"""Rank 0's side of the broadcast (see the package's docstring for the protocol): the file list, the chain, the
pieces to the chain's first member, and the one verdict."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from .._errors import IntegrityError
from .._ranks import NodeStats, outcome
from .ends import Source
from .relay import Forward, Pool, pieces
from .wire import (
    ABORT,
    DATA,
    DROP,
    END,
    PIECE,
    POLL,
    Broken,
    FileSpec,
    Range,
    Report,
    Wire,
    send_obj,
    torch_modules,
    verdict,
)

__all__ = ["send"]


def send(files: Sequence[FileSpec], source: Source, group: Any, *, meta: dict[str, Any] | None = None,
         piece: int = PIECE, finish: Callable[[bool], None] | None = None) -> Report:
    """The sender's side (global rank 0 of the job, a member of ``group``). A collective with ``receive``.

    Sends every piece some member misses once, to the first member of the chain, waiting for ``source.ready`` to
    pass each piece. ``finish(stopped)``, if given, runs after the data step (e.g. waits for the download that
    ``source`` follows; ``stopped``: the job fails whatever the source does, so it may stop at once): what it
    raises is the sender's error, unless ``stopped``. Returns the Report (the bytes and seconds of every
    member), or raises on every member the error of the lowest failing rank (``source`` failing, a member's
    disk or sha256), or ``NetworkError(BROKEN)`` if a member died.
    """
    torch, dist = torch_modules()
    rank = dist.get_rank()
    t0 = time.monotonic()
    files = list(files)
    wire = Wire(torch, dist, group)
    peers = [r for r in dist.get_process_group_ranks(group) if r != rank]
    dead: set[int] = set()
    send_obj(wire, {"files": [(f.name, f.size, f.sha256) for f in files], "meta": dict(meta or {}),
                    "piece": piece}, peers, dead)
    announced: dict[int, dict[str, Any]] = {}
    for r in peers:  # step 2: what each member misses
        if r in dead:
            continue
        try:
            announced[r] = wire.recv_obj(r)
        except Broken:
            dead.add(r)
    stats = NodeStats(rank, "sender")
    report = Report(files, dict(meta or {}), {rank: stats}, rank)
    refused = bool(dead) or any(a["error"] is not None for a in announced.values())
    wants = {r: a["missing"] for r, a in announced.items() if a["error"] is None and any(a["missing"])}
    # a member that could not say what it misses: nobody takes anything, everybody learns why
    chain = [] if refused else sorted(wants, key=lambda r: (-sum(e - s for m in wants[r] for s, e in m), r))
    send_obj(wire, {"chain": chain}, peers, dead)
    inbox = Inbox(wire, [r for r in peers if r not in dead])
    mine: BaseException | None = None
    stopped = refused
    if chain:
        mine, stopped = _stream(wire, files, source, [wants[r] for r in chain], chain[0], piece, stats, inbox)
    if finish is not None:
        try:
            finish(stopped)
        except BaseException as exc:
            if not stopped:  # else it is what the stop did (the download cancelled), not a cause
                mine = mine or exc
    stats.seconds = time.monotonic() - t0
    # step 4: every outcome, one decision, told to everyone (all through the sender: a dead sender is seen at once)
    outcomes = inbox.wait()
    dead |= inbox.dead
    errors = [(rank, outcome(mine, rank))] + [(r, a["error"]) for r, a in sorted(announced.items())]
    errors += [(r, o["error"]) for r, o in sorted(outcomes.items())]
    failure = min(((r, e) for r, e in errors if e is not None), key=lambda x: x[0], default=(None, None))[1]
    if dead or any(o["broken"] for o in outcomes.values()):
        failure = {"broken": True}
    decided = {"failure": failure, "nodes": {rank: stats, **{r: o["stats"] for r, o in outcomes.items()}}}
    send_obj(wire, decided, peers, dead)
    return verdict(decided, report, mine)


class Inbox:
    """Each member's outcome, received from the end of step 2 on in a thread per member, so that the sender
    learns at once, while it still streams, that a member is gone or found its neighbour gone."""

    def __init__(self, wire: Wire, peers: list[int]) -> None:
        self.wire = wire
        self.lock = threading.Lock()
        self.outcomes: dict[int, dict[str, Any]] = {}
        self.dead: set[int] = set()
        self.threads = [threading.Thread(target=self._receive, args=(r,), name=f"dinov3-broadcast-outcome-{r}",
                                         daemon=True) for r in peers]
        for t in self.threads:
            t.start()

    def _receive(self, r: int) -> None:
        try:
            got = self.wire.recv_obj(r)
        except Broken:
            with self.lock:
                self.dead.add(r)
            return
        with self.lock:
            self.outcomes[r] = got

    def stopping(self) -> bool:
        """Is a member gone, did one find its neighbour gone, or did one fail before the end of the data step
        (interrupted)? The job fails: stop sending."""
        with self.lock:
            return bool(self.dead) or any(o["broken"] or o["error"] is not None for o in self.outcomes.values())

    def wait(self) -> dict[int, dict[str, Any]]:
        for t in self.threads:
            t.join()
        return dict(self.outcomes)


class _Stop(Exception):
    """The chain is broken: the sender stops."""


def _stream(wire: Wire, files: list[FileSpec], source: Source, wants: list[list[list[Range]]], first: int,
            size: int, stats: NodeStats, inbox: Inbox) -> tuple[BaseException | None, bool]:
    """Step 3 on the sender: every piece once, to ``first``. Returns the source's error (the chain got an abort
    header) or None, and whether the chain broke (a member gone)."""
    pool = Pool(wire.torch, size)
    forward = Forward(wire, first, pool, stats)
    kind, drop, bad, mine, broke = END, -1, -1, None, False
    try:
        for idx, spec in enumerate(files):
            for s, e, last in pieces([w[idx] for w in wants], size):
                while source.ready(spec.name) < e:
                    if inbox.stopping():
                        raise _Stop
                    time.sleep(POLL)
                if forward.broken or inbox.stopping():
                    raise _Stop
                piece = pool.take(forward)
                try:
                    source.readinto(spec.name, s, piece.view[:e - s])
                    forward.send(DATA, idx, s, e - s, last, piece)
                finally:
                    pool.release(piece)
                stats.files[spec.name] = stats.files.get(spec.name, 0) + e - s
    except _Stop:
        kind, broke = ABORT, True
    except BaseException as exc:  # the source failed (or Ctrl-C): every member stops at its next header
        mine, kind = exc, ABORT
        if isinstance(exc, IntegrityError):  # the source's bytes were wrong: the members drop what they hold of
            drop = DROP  # that file (of every unfinished one, if the error does not say which)
            bad = next((i for i, f in enumerate(files) if f.name == exc.file), -1)
    forward.send(kind, drop, bad)
    forward.close()
    stats.bytes = stats.sent
    return mine, broke or forward.broken
