"""A receiving node's dino_root as the broadcast's ``Sink``: claimed partial folders, verified, staged, then
published under a manifest that says where the files came from."""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

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

    The node's lock is taken at the first ``missing`` (so that a lock timeout is reported like any other
    error of the transfer) and held until ``unlock``, after ``publish``."""

    def __init__(self, req: FetchRequest, update: bool) -> None:
        self.req, self.update = req, update
        self.state = StateDir(req.dino_root)
        self._stack = contextlib.ExitStack()
        self._entered = False
        self.warm = False
        self.old: Manifest | None = None
        self.paths: dict[str, Path] = {}  # verified files: published (held) or staged
        self._claims: dict[str, tuple[FileSpec, Path, list[Range]]] = {}
        self._needed = 0
        super().__init__(self.state.partial, self.state.root, folder=lambda spec: self._claims[spec.name][1])
        self.where = f" on {socket.gethostname()}"

    def _enter(self) -> None:
        if self._entered:
            return
        from .._fetch import ready

        self._entered = True
        self.state.ensure()
        self._stack.enter_context(self.state.locked(env.lock_timeout(), Progress(quiet=True),
                                                    disabled=env.lock_disabled()))
        self.old = self.state.read_manifest()
        self.warm = not self.update and ready(self.req, self.old) is not None

    def _held(self, spec: FileSpec) -> bool:
        rec = self.old.files.get(spec.name) if self.old is not None and self.old.complete else None
        return (rec is not None and rec.sha256 == spec.sha256 and rec.size == spec.size
                and same_size(self.state.root / spec.name, spec.size))

    def missing(self, spec: FileSpec) -> list[Range]:
        self._enter()
        if self.warm:
            return []
        if self._held(spec):
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

        if self.warm:
            return
        meta = report.meta
        records = {n: FileRecord(int(s), str(h), g) for n, (s, h, g) in meta["records"].items()}
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
                                source=str(meta["source"]), endpoint=f"broadcast: {endpoint}")
            self.state.publish(manifest, dict(self.paths), old)
            self.state.drop_stale()
        if (why := why_not(self.req.dino_root, self.req.model, self.req.revision)) is not None:
            raise VerificationError(f"after the broadcast, {self.req.dino_root} on {socket.gethostname()} is not a "
                                    f"complete checkpoint of {self.req.model}@{self.req.revision}: {why}",
                                    "run the job again")

    def unlock(self) -> None:
        self._stack.close()
