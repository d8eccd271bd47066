"""Rank 0's side of ``fetch_once(..., share="broadcast")``: its own fetch, sent while it downloads.

The fetch (``_fetch.fetch``) runs in the calling thread, as a plain fetch does (Ctrl-C, signals), with a
``FetchingSource`` as its observer (``_observe.FetchObserver``); the sending (``sender.send``) runs in a
thread of its own. The FetchingSource is told three things by the fetch:

- ``planned(plan)``: once the fetch has planned, with the small files (config, preprocessor, index) already
  fetched and verified. The file list (name, size, sha256) and the manifest's records, commit and source are
  final from here on, so ``send`` starts: step 1 (the list), step 2 (what each receiver misses) and the small
  files go out while the weights are still downloading;
- ``started(name, size, sha256, download)``: a weight file's download (the main transfer's, or the head
  start's). The FetchingSource keeps a duplicate of its fd on the claimed partial's data file: it is the same
  inode through the moves to staged and to dino_root;
- ``verified(name, path)``: a weight file whose hashes matched (or that rank 0 held already).

A weight file may be sent up to the download's hashed prefix (``download.hashed``): those bytes are on disk for
good (the download never writes below its frontier again) and rank 0's sha256 has read them. Its last byte
waits until that sha256 matched (``verified``): no receiver completes a file before rank 0 has verified it. A
prefix already on disk (a resumed download) counts as soon as the job has hashed it; a file rank 0 holds
already (reused, staged) is ready whole. Every receiver checks each file's sha256 itself as well
(``ends.PartialSink.complete``, against the listed sha256). A file whose sha256 fails on rank 0 is published
nowhere: rank 0's IntegrityError aborts the stream with a drop of that file (see the package's docstring), the
receivers discard what they hold of it, and every rank raises rank 0's error (the lowest failing rank). ``finish``
waits for rank 0's whole fetch (tensor checks, publish) before the verdict of ``send``'s step 4, so a fetch
that fails after its last byte still fails the job everywhere.

Files go out in list order: the small ones (ready at once), then the weights in the order the fetch downloads
them (``_fetch._fetch_weights`` takes them in that order, ``_transfer.FILES_AT_ONCE`` at a time). The sender
waits only on the file the download is furthest along; its backlog when the download ends is at most what the
other files in flight got meanwhile, which the link between nodes (faster than the Hub's) clears quickly.

No plan (rank 0 warm, its fetch failed before planning, a weight listed without sha256): ``send`` starts once
the fetch has ended, with the files of the manifest it published (or an empty list and its error).
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from typing import Any

from .._config import FetchRequest
from .._errors import FetcherError, VerificationError, interrupted
from .._manifest import FileRecord, Manifest
from .._observe import Download, FetchPlan
from .._ranks import NodeStats
from .._state import StateDir
from .background import Background
from .ends import FileSource
from .sender import send
from .wire import FileSpec, Report

__all__ = ["FetchingSource", "merge", "serve"]


class FetchingSource(FileSource):
    """Rank 0's fetch as the broadcast's ``Source`` (see the module's docstring)."""

    def __init__(self, req: FetchRequest) -> None:
        super().__init__({})
        self.req = req
        self.cond = threading.Condition()
        self.specs: dict[str, FileSpec] = {}
        self.meta: dict[str, Any] | None = None  # set by planned(): the list is final
        self.plan: FetchPlan | None = None
        self.verified_paths: dict[str, Path] = {}  # files rank 0 verified (held, or told by verified())
        self.jobs: dict[str, tuple[int, str | None, Download, int]] = {}  # by name: the latest download and a
        # dup of its fd
        self.spare: list[int] = []  # fds of downloads replaced by a later one (closed at the end)
        self.using: dict[str, Download | None] = {}  # what readinto reads each file through (sender thread only)
        self.ended = False
        self.closed = False
        self.error: BaseException | None = None
        self.manifest: Manifest  # what rank 0 published (set by finish)

    # -- the fetch's side (its thread) -------------------------------------------------------------------
    def fetch(self, update: bool) -> None:
        """Rank 0's fetch, its outcome kept for the sending thread."""
        from .._fetch import fetch

        try:
            fetch(self.req, update=update, observer=self)
        except BaseException as exc:
            self.error = exc
        with self.cond:
            self.ended = True
            self.cond.notify_all()

    def started(self, name: str, size: int, sha256: str | None, download: Download) -> None:
        with self.cond:
            if self.closed:  # the sending is over (it failed): nothing reads this download any more
                return
            fd = os.dup(download.fd)
            old = self.jobs.get(name)
            self.jobs[name] = (size, sha256, download, fd)
            if old is not None:
                self.spare.append(old[3])

    def verified(self, name: str, path: Path) -> None:
        with self.cond:
            self.verified_paths[name] = path

    def planned(self, plan: FetchPlan) -> None:
        records = plan.records
        if any(not records[n].sha256 for n in plan.weights):  # a weight listed without its sha256 (a mirror):
            return  # sent once the fetch is done
        order = sorted(n for n in records if n not in plan.weights) + plan.weights
        meta = {**_meta(plan.commit, plan.source, plan.endpoint, records, plan.site_revision, plan.official,
                        plan.later), "more": bool(plan.later)}
        with self.cond:
            self.plan = plan
            self.verified_paths.update(plan.held)
            self.specs = {n: FileSpec(n, records[n].size, records[n].sha256) for n in order}
            self.meta = meta
            self.cond.notify_all()

    # -- the sender's side (its thread) ------------------------------------------------------------------
    def serve(self, group: Any, piece: int) -> tuple[Report | None, BaseException | None]:
        """``send``, as soon as the list is known; then, if the list said ``more``, a second ``send`` of the
        files the fetch got after the weights (its README and LICENSE: their sha256 is known once they are
        fetched, and the Hub's head start keeps every stream of the budget on the weights until then). A
        failed fetch still sends (an empty list), so that the receivers finish the protocol and learn the
        error in the outer exchange."""
        with self.cond:
            while self.meta is None and not self.ended:
                self.cond.wait()
            planned = self.meta is not None
        mine: BaseException | None = None
        meta: dict[str, Any] = {"failed": True}
        files: list[FileSpec] = []
        try:
            if planned:
                assert self.meta is not None
                files, meta = list(self.specs.values()), self.meta
            elif self.error is not None:
                raise self.error
            else:
                files, meta = self._published()
        except BaseException as exc:  # every leader must reach send/receive, whatever happened
            mine = exc
        report: Report | None = None
        try:
            report = send(files, self, group, meta=meta, piece=piece, finish=self.finish if planned else None)
            if meta.get("more"):  # the verdict was success on every member: every receiver takes the rest
                report = merge(report, self._rest(group, piece))
        except BaseException as exc:
            mine = mine or exc
        finally:
            self.close()
        return report, mine

    def _published(self) -> tuple[list[FileSpec], dict[str, Any]]:
        """The list from the manifest rank 0's fetch published (it was warm, or planned nothing to overlap)."""
        m = StateDir(self.req.dino_root).read_manifest()
        if m is None:
            raise VerificationError(f"{self.req.dino_root} changed on rank 0 right after its fetch",
                                    "run the job again")
        self.paths = {n: self.req.dino_root / n for n in m.files}
        self.specs = {n: FileSpec(n, r.size, r.sha256) for n, r in sorted(m.files.items())}
        return list(self.specs.values()), _manifest_meta(m)

    def finish(self, stopped: bool) -> None:
        """After the data step: wait for rank 0's fetch; its error, or a manifest that does not hold the files
        sent, fails the job on every rank (the receivers publish nothing). ``stopped``: the job fails whatever
        the fetch does (a member is gone, or refused): the fetch is cancelled (its partial stays resumable)."""
        if stopped and self.plan is not None:
            self.plan.cancel.set()
        with self.cond:
            while not self.ended:
                self.cond.wait()
        if self.error is not None:
            raise self.error
        m = StateDir(self.req.dino_root).read_manifest()
        assert self.meta is not None
        sent = {n: (s, h) for n, (s, h, _) in self.meta["records"].items()}
        held = {n: (r.size, r.sha256) for n, r in m.files.items()} if m is not None else {}
        if m is None or m.commit != self.meta["commit"] or {n: held.get(n) for n in sent} != sent \
                or (set(held) - set(sent) and not self.meta["more"]):
            raise VerificationError(f"{self.req.dino_root} changed on rank 0 right after its fetch",
                                    "run the job again")
        self.manifest = m

    def _rest(self, group: Any, piece: int) -> Report:
        """The second ``send``: the manifest's files the first one did not list, with the manifest's records."""
        m = self.manifest
        rest = sorted(n for n in m.files if n not in self.specs)
        source = FileSource({n: self.req.dino_root / n for n in rest})
        try:
            return send([FileSpec(n, m.files[n].size, m.files[n].sha256) for n in rest], source, group,
                        meta=_manifest_meta(m), piece=piece)
        finally:
            source.close()

    def ready(self, name: str) -> int:
        spec = self.specs[name]
        with self.cond:
            entry = self.jobs.get(name)
            ended, error = self.ended, self.error
            path = self.verified_paths.get(name) if self.plan is not None and not ended else self.req.dino_root / name
        if error is not None:
            raise error
        if entry is not None and entry[:2] == (spec.size, spec.sha256):
            _, _, download, fd = entry
            if self.using.get(name) is not download:
                self._fds[name] = fd  # the download's own data file (its fd is one of self.jobs': closed at the end)
                self.using[name] = download
            if download.hashed >= spec.size and not (ended or path is not None):
                return spec.size - 1  # the last byte once rank 0's sha256 matched: no receiver completes before
            return download.hashed
        if name in self._fds and self.using.get(name) is None:  # opened from its path below: whole
            return spec.size
        if path is None:
            return 0
        try:  # a file rank 0 holds (reused, staged): whole; opened now, the fd outlives the publish's move
            self._fds[name] = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            return 0  # moved by the publish meanwhile: next time from dino_root
        self.using[name] = None
        with self.cond:
            self.spare.append(self._fds[name])
        return spec.size

    def close(self) -> None:
        with self.cond:
            self.closed = True
            fds = [fd for _, _, _, fd in self.jobs.values()] + self.spare
            self.jobs.clear()
            self.spare = []
        for fd in fds:
            os.close(fd)
        self._fds.clear()


def _meta(commit: str, source: str, endpoint: str, records: dict[str, FileRecord], site_revision: str,
          official: bool | None, later: dict[str, FileRecord]) -> dict[str, Any]:
    """What the receivers' manifests say besides their files, as rank 0's says it: ``records`` are the files
    of this round; ``later`` (the first round of a fetch; none in a round of a published manifest's files) the
    optional files a second round may send, as listed, so that each node checks every name it will publish
    before any byte moves."""
    return {"commit": commit, "host": socket.gethostname(), "source": source, "endpoint": endpoint,
            "site_revision": site_revision, "official": official, "records": _records(records),
            "later": _records(later)}


def _manifest_meta(m: Manifest) -> dict[str, Any]:
    return _meta(m.commit, m.source, m.endpoint, m.files, m.site_revision, m.official, {})


def _records(records: dict[str, FileRecord]) -> dict[str, tuple[int, str, str | None]]:
    return {n: (r.size, r.sha256, r.git_oid) for n, r in records.items()}


def merge(first: Report, then: Report) -> Report:
    """One Report of two rounds of ``send``/``receive``: the files of both, the last meta, each member's
    bytes, seconds and files summed (a receiver in either round is a receiver)."""
    nodes: dict[int, NodeStats] = {}
    for r in sorted(set(first.nodes) | set(then.nodes)):
        a, b = first.nodes.get(r), then.nodes.get(r)
        if a is None or b is None:
            nodes[r] = a or b  # type: ignore[assignment]
            continue
        role = "receiver" if "receiver" in (a.role, b.role) else a.role
        nodes[r] = NodeStats(r, role, a.bytes + b.bytes, a.seconds + b.seconds, {**a.files, **b.files},
                             a.sent + b.sent)
    return Report(first.files + then.files, then.meta, nodes, first.rank)


def serve(req: FetchRequest, update: bool, group: Any, piece: int) -> tuple[Report | None, BaseException | None]:
    """Rank 0: its fetch in this thread, the sending in another; returns (report, its error or the fetch's)."""
    feed = FetchingSource(req)
    sending = Background(lambda: feed.serve(group, piece), "dinov3-broadcast-send")
    try:
        feed.fetch(update)  # (it keeps its own error; a Ctrl-C right after it is taken below)
        sending.wait()
    except BaseException as exc:  # Ctrl-C (SIGTERM) while the sending runs: the sending thread aborts with it at
        # its next piece, so that the receivers learn it and every rank raises one error
        stop = exc if isinstance(exc, FetcherError) else interrupted()
        with feed.cond:
            feed.error = feed.error or stop
            feed.cond.notify_all()
        sending.done.wait(30)
    report, mine = sending.out[0] if sending.out else (None, RuntimeError("the broadcast's sending thread ended "
                                                                          "without a result"))
    return report, mine or feed.error
