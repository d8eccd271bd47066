"""A receiving node's dino_root as the broadcast's ``Sink``: claimed partial folders, verified, staged, then
published under a manifest that says where the files came from."""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path
from typing import Any

from .. import _env as env
from .._config import FetchRequest
from .._errors import VerificationError
from .._manifest import FileRecord, Manifest
from .._progress import Progress
from .._state import StateDir, on_disk, remaining, write_new
from .._version import __version__
from .ends import OpenFile, PartialSink, same_size
from .wire import FileSpec, Range, Report

__all__ = ["StateSink"]


class StateSink(PartialSink):
    """A receiving node's dino_root as a ``Sink``: claimed partial folders, verified, staged, then published.

    ``expect`` (told each round's file list, before ``missing``) takes the node's lock if no other fetcher holds
    it (a lock timeout, or a wait, would stall the whole job at its second step), and holds it until ``unlock``,
    after ``publish``. Another fetcher holding it (on a dino_root several nodes share: rank 0's fetch, or another
    node's receiver) makes this node wait for the end of the broadcast, receiving nothing (``deferred``), and
    ``settle`` then checks what that fetcher left."""

    def __init__(self, req: FetchRequest, update: bool) -> None:
        self.req, self.update = req, update
        self.state = StateDir(req.dino_root)
        self._stack = contextlib.ExitStack()
        self._entered = False
        self.warm = False  # holds the checkpoint at rank 0's commit: takes no part
        self.deferred = False  # another fetcher held the lock: takes no part, checked by ``settle``
        self.commit = ""  # rank 0's
        self.old: Manifest | None = None
        self.adopted: dict[str, str] = {}  # files the user put there with exactly the listed bytes: name -> sha256
        self.paths: dict[str, Path] = {}  # verified files: published (held) or staged
        self._claims: dict[str, tuple[FileSpec, Path, list[Range]]] = {}
        self._needed = 0
        super().__init__(self.state.partial, self.state.root, folder=lambda spec: self._claims[spec.name][1])
        self.where = f" on {socket.gethostname()}"

    def expect(self, files: list[FileSpec], meta: dict[str, Any]) -> None:
        """A round's file list and meta, before ``missing``. At the first: the lock (if free), the manifest, and
        whether the node is warm (the checkpoint asked for, at rank 0's commit: a node on an older commit
        takes the files that changed). Then, not warm: every name the node would publish, this round's and
        those a later round may send, checked against files the user put there, before any byte moves
        (``StateDir.check_foreign``: refused, or adopted when they are exactly the listed bytes)."""
        from .._fetch import ready

        if "records" not in meta:  # rank 0 failed before it had a list: nothing is sent, its error is the job's
            return
        if not self._entered:
            self._entered = True
            self.commit = str(meta["commit"])
            self.state.ensure()
            if not self._stack.enter_context(self.state.locked_if_free()):
                self.deferred = True
                return
            self.old = self.state.read_manifest()
            self.warm = (not self.update and self.old is not None and self.old.commit == self.commit
                         and ready(self.req, self.old) is not None)
            if self.warm:
                self.unlock()  # nothing to write here: another node sharing this dino_root may take the lock
        if self.warm or self.deferred:
            return
        listed = _records({**meta["later"], **meta["records"]})
        self.state.check_foreign(list(listed), listed, (self.old,), self.adopted)

    def _held(self, spec: FileSpec) -> bool:
        rec = self.old.files.get(spec.name) if self.old is not None and self.old.complete else None
        return (rec is not None and rec.sha256 == spec.sha256 and rec.size == spec.size
                and same_size(self.state.root / spec.name, spec.size))

    def missing(self, spec: FileSpec) -> list[Range]:
        if self.warm or self.deferred:
            return []
        if self._held(spec) or self.adopted.get(spec.name) == spec.sha256:
            self.paths[spec.name] = self.state.root / spec.name
            return []
        if (staged := self.state.find_staged(spec.sha256, spec.name, spec.size, adopt=True)) is not None:
            self.paths[spec.name] = staged
            return []
        if spec.size == 0:
            self.state.own_staged()  # a real folder of ours, with its heartbeat (a planted link is removed)
            path = self.state.staged_path(spec.sha256, spec.name)
            with on_disk(self.state.root):
                write_new(path, b"")
            self.paths[spec.name] = path
            return []
        folder = self.state.claim(spec.sha256, spec.size)
        ranges = remaining(folder, spec.sha256, spec.size)
        self._claims[spec.name] = (spec, folder, ranges)
        self._needed += sum(e - s for s, e in ranges)
        self.state.check_space(self._needed, on=self.where)
        return ranges

    def _file(self, spec: FileSpec) -> OpenFile:
        f = self._open.get(spec.name)
        if f is None:  # the ranges the claim announced (missing() has already run for this file)
            _, folder, ranges = self._claims[spec.name]
            f = self._open[spec.name] = self._start(spec, folder, ranges)
        return f

    def _place(self, spec: FileSpec, folder: Path) -> None:
        """As Transfer.finish: into a real staged folder of ours (with its heartbeat), the claim dropped."""
        del self._claims[spec.name]
        self.state.own_staged()
        dest = self.state.staged_path(spec.sha256, spec.name)
        with on_disk(self.state.root):
            os.replace(folder / "data", dest)
        self.state.discard(folder)
        self.paths[spec.name] = dest

    def _discard(self, folder: Path) -> None:
        self._claims = {n: c for n, c in self._claims.items() if c[1] != folder}
        self.state.discard(folder)

    def _unfinished(self) -> None:
        """Hand unfinished partial folders back under their public name (their progress is recorded)."""
        for spec, folder, _ in self._claims.values():
            self.state.release(folder, spec.sha256)
        self._claims.clear()

    def publish(self, report: Report) -> None:
        """Move the received files into dino_root with a manifest saying where they came from (not on a warm
        node, nor when dino_root already holds exactly these files at this commit)."""
        from .._validate import why_not

        if self.warm or self.deferred:
            return
        meta = report.meta
        records = _records(meta["records"])
        if (lost := [f.name for f in report.files if f.name not in self.paths]):
            raise VerificationError(f"the broadcast ended without {', '.join(lost)} on {socket.gethostname()}",
                                    "run the job again")
        old = self.old
        same = (old is not None and old.complete and old.commit == meta["commit"] and old.files == records
                and all(p == self.state.root / n for n, p in self.paths.items()))
        if not same:
            endpoint = f"rank 0 on {meta['host']}, from {meta['source']}"
            endpoint += f" ({meta['endpoint']})" if meta.get("endpoint") else ""
            # The source is rank 0's (the checkpoint is that source's, so later runs asking it are warm); the
            # endpoint says it came by broadcast from rank 0.
            manifest = Manifest(self.req.model, self.req.revision, meta["commit"], records, __version__,
                                source=str(meta["source"]), endpoint=f"broadcast: {endpoint}",
                                official=meta.get("official"), site_revision=str(meta.get("site_revision", "")))
            self.state.publish(manifest, dict(self.paths), old)
            self.state.drop_stale()
        if (why := why_not(self.req.dino_root, self.req.model, self.req.revision)) is not None:
            raise VerificationError(f"after the broadcast, {self.req.dino_root} on {socket.gethostname()} is not a "
                                    f"complete checkpoint of {self.req.model}@{self.req.revision}: {why}",
                                    "run the job again")

    def settle(self) -> None:
        """After every node published: a deferred node waits for the lock (its holder's publish), then checks that
        dino_root holds the checkpoint at rank 0's commit (VerificationError if not)."""
        from .._validate import why_not

        if not self.deferred:
            return
        with self.state.locked(env.lock_timeout(), Progress(quiet=True)):
            m = self.state.read_manifest()
            why = why_not(self.req.dino_root, self.req.model, self.req.revision, m)
            if why is None and m is not None and m.commit != self.commit:
                why = f"it holds commit {m.commit[:12]}, rank 0 sent {self.commit[:12]}"
        if why is not None:
            raise VerificationError(f"another fetcher held the lock on {self.req.dino_root} on "
                                    f"{socket.gethostname()} while rank 0 sent the teacher, and left it not a "
                                    f"complete checkpoint of {self.req.model}@{self.req.revision}: {why}",
                                    "run the job again once that fetcher has ended")

    def unlock(self) -> None:
        self._stack.close()


def _records(sent: dict[str, Any]) -> dict[str, FileRecord]:
    """The file records of rank 0's list as the wire carries them: name -> (size, sha256, git blob id)."""
    return {n: FileRecord(int(s), str(h), g) for n, (s, h, g) in sent.items()}
