"""The sender's side of the broadcast (global rank 0): see the package's docstring for the protocol."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from .._errors import IntegrityError
from .._ranks import NodeStats, outcome
from .ends import Source
from .wire import (
    ABORT,
    CHUNK,
    DATA,
    DROP,
    END,
    POLL,
    Broken,
    FileSpec,
    Range,
    Report,
    Wire,
    isend,
    missing_pieces,
    send_obj,
    torch_modules,
    verdict,
    wait_all,
)

__all__ = ["send"]


def send(files: Sequence[FileSpec], source: Source, group: Any, *, meta: dict[str, Any] | None = None,
         chunk: int = CHUNK, finish: Callable[[], None] | None = None) -> Report:
    """The sender's side (global rank 0 of the job, a member of ``group``). A collective with ``receive``.

    Streams every receiver the ranges it announced, in file order, waiting for ``source.ready`` to pass each
    piece. ``finish``, if given, runs after the data step (e.g. waits for the download that ``source``
    follows): what it raises is the sender's error. Returns the Report (the bytes and seconds of every
    member), or raises on every member the error of the lowest failing rank (``source`` failing, a
    receiver's disk or sha256), or ``NetworkError(BROKEN)`` if a member died. A relay for many nodes would
    keep this loop and the headers: the sender sends each piece to the first receiver of a chain that needs
    it, and each receiver forwards it to the next.
    """
    torch, dist = torch_modules()
    rank = dist.get_rank()
    t0 = time.monotonic()
    files = list(files)
    wire = Wire(torch, dist, group)
    peers = [r for r in dist.get_process_group_ranks(group) if r != rank]
    dead: set[int] = set()
    header = {"files": [(f.name, f.size, f.sha256) for f in files], "meta": dict(meta or {}), "chunk": chunk}
    send_obj(wire, header, peers, dead)
    announced: dict[int, dict[str, Any]] = {}
    for r in peers:  # step 2: what each receiver misses
        if r in dead:
            continue
        try:
            announced[r] = wire.recv_obj(r)
        except Broken:
            dead.add(r)
    stats = NodeStats(rank, "sender")
    report = Report(files, dict(meta or {}), {rank: stats}, rank)
    refused = dead or any(a["error"] is not None for a in announced.values())
    active = sorted(r for r, a in announced.items() if a["error"] is None and any(a["missing"]))
    mine: BaseException | None = None
    if refused:  # a receiver could not say what it misses: nobody takes anything, everybody learns why
        wait_all([w for r in active for w in isend(wire, wire.head(ABORT), r, dead)], dead)
    elif active:
        mine = _stream(wire, files, source, {r: announced[r]["missing"] for r in active}, chunk, stats, dead)
    if finish is not None:
        try:
            finish()
        except BaseException as exc:
            mine = mine or exc
    stats.seconds = time.monotonic() - t0
    # step 4: gather every outcome, decide, tell everyone (all through the sender: a dead sender is seen at once)
    outcomes: dict[int, dict[str, Any]] = {}
    for r in peers:
        if r in dead:
            continue
        try:
            outcomes[r] = wire.recv_obj(r)
        except Broken:
            dead.add(r)
    errors = [(rank, outcome(mine, rank))] + [(r, a["error"]) for r, a in sorted(announced.items())]
    errors += [(r, o["error"]) for r, o in sorted(outcomes.items())]
    failure = min(((r, e) for r, e in errors if e is not None), key=lambda x: x[0], default=(None, None))[1]
    if dead:
        failure = {"broken": True}
    nodes = {rank: stats, **{r: o["stats"] for r, o in outcomes.items()}}
    decided = {"failure": failure, "nodes": nodes}
    send_obj(wire, decided, peers, dead)
    return verdict(decided, report, mine)




def _stream(wire: Wire, files: list[FileSpec], source: Source, wants: dict[int, list[list[Range]]], chunk: int,
            stats: NodeStats, dead: set[int]) -> BaseException | None:
    """Step 3 on the sender. Returns the source's error (every receiver got an abort header), or None."""
    torch = wire.torch
    size = min(chunk, max((f.size for f in files), default=1)) or 1
    bufs = [bytearray(size) for _ in range(2)]
    views = [memoryview(b) for b in bufs]
    tensors = [torch.frombuffer(b, dtype=torch.uint8) for b in bufs]
    pending: list[tuple[int, Any]] = []  # the sends of the previous window: its buffer is busy until they end
    which, kind, mine, drop = 0, END, None, -1
    try:
        for idx, spec in enumerate(files):
            pieces = {r: missing_pieces(m[idx], chunk) for r, m in wants.items()}
            for w in sorted({s // chunk for ps in pieces.values() for s, _ in ps}):
                part = {r: [p for p in ps if p[0] // chunk == w] for r, ps in pieces.items() if r not in dead}
                spans = [p for ps in part.values() for p in ps]
                if not spans:
                    continue
                lo, hi = min(p[0] for p in spans), max(p[1] for p in spans)
                while source.ready(spec.name) < hi:
                    time.sleep(POLL)
                source.readinto(spec.name, lo, views[which][:hi - lo])
                works: list[tuple[int, Any]] = []
                for r, ps in part.items():
                    for s, e in ps:
                        works += isend(wire, wire.head(DATA, idx, s, e - s), r, dead)
                        works += isend(wire, tensors[which][s - lo:e - lo], r, dead)
                        stats.bytes += e - s
                        stats.files[spec.name] = stats.files.get(spec.name, 0) + e - s
                wait_all(pending, dead)
                pending, which = works, 1 - which
    except BaseException as exc:  # the source failed (or Ctrl-C): every receiver stops at its next header
        mine, kind = exc, ABORT
        if isinstance(exc, IntegrityError):  # the source's bytes were wrong: the receivers drop what they hold
            drop = DROP
    wait_all(pending, dead)
    wait_all([w for r in wants for w in isend(wire, wire.head(kind, drop), r, dead)], dead)
    return mine
