"""``fetch_once(..., share="broadcast")``: one download per job; every other node receives rank 0's bytes.

Every rank: ``_gloo_group``, ``_local_rank``, ``leaders_group`` (global rank 0 and local rank 0 of each node).
Global rank 0 fetches from the source as ``fetch_dinov3`` does (``_fetch.fetch``) and sends every file of the
manifest it publishes (``send``; the list holds every file's size and sha256, the small non-LFS files
included, so the receivers never ask the source anything). Every other leader receives into its own
dino_root (``receive`` into a ``StateSink``): under the node's lock, into claimed partial folders of
``_state.StateDir`` (identity = the file's sha256, the progress record of ``encode_progress``), hashed while
the bytes arrive, staged once the sha256 matches, then published together with a manifest whose ``source`` is
``"broadcast"`` and whose ``endpoint`` names rank 0's host and the original source. A warm node (``ready``)
announces nothing and takes no part in the data step; a node holding a partial (or a staged file, or the same
file published under an older manifest) announces only what it misses. Then the outer exchange of
``_distributed`` runs on every rank: the same path everywhere, or the lowest failing rank's error everywhere.

Rank 0 sends while it downloads (``_share_send``): the file list as soon as its fetch has planned (config and
preprocessor fetched, the weights' sha256 listed), each weight file up to the prefix its download has written
and hashed, then (meta ``more``) a second round with what the fetch got after the weights (README, LICENSE).
Every receiver checks each file's sha256 itself, and publishes only when rank 0's whole fetch succeeded.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from . import __version__
from . import _env as env
from ._broadcast import CHUNK, FileSpec, NodeStats, Report, receive
from ._broadcast_files import PartialSink, _OpenFile, _same_size
from ._broadcast_wire import BROKEN, BROKEN_HINT, Range, _is_transport, leaders_group
from ._config import FetchRequest
from ._distributed import (
    _check_fetched,
    _destroy,
    _first_failure,
    _gloo_group,
    _local_rank,
    _outcome,
    _rebuild,
)
from ._errors import DiskSpaceError, NetworkError, VerificationError
from ._manifest import FileRecord, Manifest
from ._progress import Progress, human_bytes
from ._share_send import merge
from ._state import SPACE_MARGIN, StateDir, remaining, write_new

__all__ = ["CHUNK", "JobResult", "StateSink", "fetch_broadcast"]


@dataclass
class JobResult:
    """What ``fetch_once(..., details=True)`` returns on every rank: the path, the commit the job's nodes hold,
    and (``share="broadcast"``) the bytes and seconds of every node's leader, by global rank. A node's
    ``role`` is ``sender`` (rank 0: ``bytes`` is what it sent to all the others together), ``receiver`` or
    ``warm`` (held the checkpoint, received nothing)."""

    path: Path
    commit: str = ""
    nodes: dict[int, NodeStats] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "commit": self.commit,
                "nodes": {str(r): asdict(s) for r, s in sorted(self.nodes.items())}}


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
        from ._fetch import ready

        self._entered = True
        self.state.ensure()
        self._stack.enter_context(self.state.locked(env.lock_timeout(), Progress(quiet=True),
                                                    disabled=env.lock_disabled()))
        self.old = self.state.read_manifest()
        self.warm = not self.update and ready(self.req, self.old) is not None

    def _held(self, spec: FileSpec) -> bool:
        rec = self.old.files.get(spec.name) if self.old is not None and self.old.complete else None
        return (rec is not None and rec.sha256 == spec.sha256 and rec.size == spec.size
                and _same_size(self.state.root / spec.name, spec.size))

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
            write_new(path, b"")
            self.paths[spec.name] = path
            return []
        folder = self.state.claim(spec.sha256, spec.size)
        ranges = remaining(folder, spec.sha256, spec.size)
        self._claims[spec.name] = (spec, folder, ranges)
        self._needed += sum(e - s for s, e in ranges)
        free = shutil.disk_usage(self.state.path).free
        if self._needed + SPACE_MARGIN > free:
            raise DiskSpaceError(
                f"not enough disk space in {self.state.root} on {socket.gethostname()}: {human_bytes(self._needed)} "
                f"to receive plus a {human_bytes(SPACE_MARGIN)} margin, {human_bytes(free)} free",
                "free some space or point dino_root at a bigger disk", needed=self._needed, free=free)
        return ranges

    def _file(self, spec: FileSpec) -> _OpenFile:
        f = self._open.get(spec.name)
        if f is None:  # the ranges the claim announced (missing() has already run for this file)
            _, folder, ranges = self._claims[spec.name]
            f = self._open[spec.name] = _OpenFile(spec, folder, ranges)
        return f

    def _place(self, spec: FileSpec, folder: Path) -> None:
        """As Transfer.finish: into a real staged folder of ours (with its heartbeat), the claim dropped."""
        del self._claims[spec.name]
        self.state.own_staged()
        dest = self.state.staged_path(spec.sha256, spec.name)
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
        from ._validate import why_not

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


def _sender(req: FetchRequest, update: bool, group: Any) -> tuple[Report | None, BaseException | None]:
    """Rank 0: fetch, and send the files while they download (``_share_send``)."""
    from ._share_send import serve

    return serve(req, update, group, CHUNK)


def _receiver(req: FetchRequest, update: bool, group: Any) -> tuple[Report | None, BaseException | None]:
    sink = StateSink(req, update)
    report: Report | None = None
    mine: BaseException | None = None
    try:
        report = receive(sink, group, progress=sys.stderr)
        if report.meta.get("more"):  # rank 0 sends what it fetched after the weights (see _share_send)
            report = merge(report, receive(sink, group, progress=sys.stderr))
        if not report.meta.get("failed"):
            sink.publish(report)
    except BaseException as exc:
        mine = exc
    finally:
        sink.unlock()
    return report, mine


def _exchange(fn: Any, *args: Any) -> Any:
    """A collective of the outer group; a rank that died (the killed sender) gives the same error everywhere."""
    try:
        return fn(*args)
    except Exception as exc:
        if _is_transport(exc):
            raise NetworkError(BROKEN, BROKEN_HINT) from None
        raise


def fetch_broadcast(dist: ModuleType, req: FetchRequest, *, update: bool, timeout: float,
                    details: bool) -> Path | JobResult:
    """The body of ``fetch_once(..., share="broadcast")`` inside an initialised process group."""
    rank = dist.get_rank()
    group = _gloo_group(dist, timeout)
    bgroup: Any = None
    members: list[int] = []
    report: Report | None = None
    mine: BaseException | None = None
    try:
        local_rank = _exchange(_local_rank, dist, group)
        bgroup, members = _exchange(leaders_group, dist, group, local_rank, timeout)
        if rank == 0:
            report, mine = _sender(req, update, bgroup)
        elif rank in members:
            report, mine = _receiver(req, update, bgroup)
        failure = _exchange(_first_failure, dist, group, _outcome(mine, rank))
        if failure is None and rank not in members:
            try:
                _check_fetched(req, "this node's local rank 0 (receiving from rank 0)")
            except BaseException as exc:
                mine = exc
            failure = _exchange(_first_failure, dist, group, _outcome(mine, rank))
        elif failure is None:
            failure = _exchange(_first_failure, dist, group, None)
        shared: list[Any] = [None]
        if failure is None:  # every rank learns every node's bytes and seconds, and the commit
            if rank == 0 and report is not None:
                shared = [(report.meta.get("commit", ""), report.nodes)]
            _exchange(dist.broadcast_object_list, shared, 0, group)
    finally:
        if bgroup is not None and rank in members:
            _destroy(dist, bgroup)
        _destroy(dist, group)
    if failure is not None:
        if mine is not None and failure["rank"] == rank:
            raise mine
        raise _rebuild(failure)
    if not details:
        return req.dino_root
    commit, nodes = shared[0] or ("", {})
    return JobResult(req.dino_root, commit, dict(nodes))
