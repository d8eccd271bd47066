"""Bytes: a resumable, verified download of each file into dino_root's partial folders (see _job for one
file's workers and hasher, _state for the partial folders), then the move of the verified file into place."""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from . import _env as env
from ._budget import Budget
from ._errors import FetchInterrupted, IntegrityError
from ._hashing import git_blob_id
from ._http import Connection, HttpPool, Response
from ._job import Job
from ._observe import FetchObserver
from ._progress import Progress
from ._retry import RetryPolicy
from ._state import StateDir, owner_tag, write_new

__all__ = ["FILES_AT_ONCE", "Settings", "Target", "Transfer"]

MiB = 1024 * 1024
FILES_AT_ONCE = 3  # weight files downloaded together: a file's tail (and its sha256 tail) overlaps the others


@dataclass(frozen=True)
class Settings:
    """Transfer knobs; each has an environment variable (see the README)."""

    connections: int | None = None  # DINOV3_FETCHER_CONNECTIONS: streams for the whole fetch (None: adaptive)
    min_split: int = 16 * MiB  # never split a file into pieces smaller than this
    block: int = 1 * MiB  # read/write block
    timeout: float = env.DEFAULT_TIMEOUT  # DINOV3_FETCHER_TIMEOUT (or HF_HUB_DOWNLOAD_TIMEOUT)
    retry: RetryPolicy = field(default_factory=RetryPolicy)  # DINOV3_FETCHER_RETRIES, DINOV3_FETCHER_BACKOFF

    @classmethod
    def from_env(cls) -> Settings:
        """The settings from DINOV3_FETCHER_* (and HF_HUB_DOWNLOAD_TIMEOUT)."""
        timeout = env.timeout()
        connections = env.number("DINOV3_FETCHER_CONNECTIONS", 0)
        return cls(connections=max(1, int(connections)) if connections else None, timeout=timeout,
                   retry=RetryPolicy.from_env())


@dataclass(frozen=True)
class Target:
    """A file to download: where, its size, and the hashes its bytes must have."""
    name: str
    url: str
    size: int
    identity: str  # content address used to name the partial folder
    sha256: str | None = None  # expected sha256 (LFS files)
    git_oid: str | None = None  # expected git blob sha1 (regular files)


@dataclass
class Done:
    """A verified download, still in its partial folder."""
    path: Path  # the verified data file, still inside the claimed partial folder
    sha256: str
    fetched: int  # bytes received over the network for this file
    resumed_from: int  # bytes already on disk when this run started


@dataclass
class Transfer:
    """Downloads files into dino_root's partial folders; one instance per fetch.

    ``early``, when set, is asked first for each file: a source of bytes that may already hold the verified
    download (the head start, see _headstart); it answers None when it does not, and the transfer runs.
    ``budget`` caps the streams of all its files together; the head start's Transfer shares the main one's.
    """

    settings: Settings
    pool: HttpPool
    state: StateDir
    progress: Progress
    raise_status: Callable[[int, dict[str, str], bytes, str], NoReturn]
    cancel: threading.Event = field(default_factory=threading.Event)
    early: Callable[[Target], Done | None] | None = None
    endpoint_var: str = "HF_ENDPOINT"  # the variable that points at the source, named in error hints
    _locations: dict[str, str] = field(default_factory=dict)
    _per_request: set[str] = field(default_factory=set)  # files whose signed locations serve one request only
    budget: Budget = None  # type: ignore[assignment]  # None: one from the settings (see __post_init__)
    observer: FetchObserver | None = None  # told of each download as it starts (see _observe)

    def __post_init__(self) -> None:
        if self.budget is None:
            self.budget = Budget.for_connections(self.settings.connections, self.settings.block)

    def remember_location(self, target: Target, location: str) -> None:
        """Where ``target``'s URL redirects (a HEAD's Location): used until it is refused (``forget_location``)."""
        if target.url not in self._per_request:
            self._locations.setdefault(target.url, location)

    def open(self, target: Target, headers: dict[str, str]) -> tuple[str, Connection, Response]:
        """GET the target's URL (or the location it last redirected to, until one was refused) with ``headers``."""
        url = self._locations.get(target.url, target.url)
        final, conn, resp = self.pool.get(url, headers)
        resp.remembered_location = url != target.url  # type: ignore[attr-defined]  # a 403 there: stale
        if final != url and target.url not in self._per_request:
            self._locations[target.url] = final
        return final, conn, resp

    def forget_location(self, target: Target) -> bool:
        """A remembered redirect target was refused (expired, or signed for another range): re-resolve from now
        on, for every request of this file. True if there was one."""
        if self._locations.pop(target.url, None) is None:
            return False
        self._per_request.add(target.url)
        return True

    def store(self, target: Target, body: bytes) -> Done:
        """A small file already read whole (by the head start) as a verified download, like ``download``'s."""
        sha = hashlib.sha256(body).hexdigest()
        if len(body) != target.size or (target.sha256 and sha != target.sha256) or (
                target.git_oid and git_blob_id(body) != target.git_oid):
            raise IntegrityError(f"{target.name}: the early copy differs from the listing", "run again")
        folder = self.state.claim(target.identity, target.size)
        try:
            write_new(folder / "data", body)
        except BaseException:
            self.state.release(folder, target.identity)  # never left claimed (and heartbeating) by a failed write
            raise
        self.progress.start_file(target.name, target.size, 0)
        self.progress.advance(len(body))
        self.progress.end_file(target.name)
        return Done(folder / "data", sha, len(body), 0)

    def download(self, target: Target) -> Done:
        """Fetch ``target`` (resuming what is on disk) and verify it.

        Raises:
            IntegrityError: size or hash mismatch (the partial data is deleted).
            NetworkError: the retries ran out (the partial data is kept).
            DiskSpaceError: the disk filled up (the partial data is kept).
            FetchInterrupted: Ctrl-C / SIGTERM (the partial data is kept).
        """
        if self.early is not None and (done := self.early(target)) is not None:
            return done
        folder = self.state.claim(target.identity, target.size)
        try:
            job = Job(self, target, folder)
        except BaseException:
            self.state.release(folder, target.identity)  # EACCES, EMFILE...: the folder stays resumable, unowned
            raise
        keep, orphans = True, False
        try:
            if self.observer is not None:
                self.observer.started(target.name, target.size, target.sha256, job)
            self.progress.start_file(target.name, target.size, job.resumed_from)
            n_workers = min(self.budget.cap, max(1, target.size // self.settings.min_split))
            job.piece = self.settings.min_split if n_workers > 1 else 0
            workers = [threading.Thread(target=job.worker, daemon=True, name=f"fetch-{i}") for i in range(n_workers)]
            if job.segments:
                for w in workers:
                    w.start()
            try:
                digest = job.hash_all()
            except BaseException as exc:
                with job.lock:
                    job.error = job.error or exc
                    job.lock.notify_all()
                raise
            finally:
                # On an error or Ctrl-C, a worker stuck in a stalled read must not hold up the exit for the
                # whole read timeout: give the workers 2 s, then leave them (daemon threads) and their fds open.
                deadline = time.monotonic() + 2.0
                for w in workers:
                    while w.is_alive() and ((job.error is None and not self.cancel.is_set())
                                            or time.monotonic() < deadline):
                        w.join(0.2)
                orphans = any(w.is_alive() for w in workers)
            if job.error is not None:
                raise job.error
            if self.cancel.is_set():
                raise FetchInterrupted("interrupted", "run the same command again: it resumes")
            self.progress.end_file(target.name)
            return Done(job.data_path, digest, job.fetched, job.resumed_from)
        except IntegrityError:
            keep = False
            raise
        except KeyboardInterrupt:
            self.cancel.set()
            raise
        finally:
            if not orphans:
                os.close(job.fd)
            if keep:
                job.save()
                if sys.exc_info()[0] is not None:
                    self.state.release(folder, target.identity)
            else:
                self.state.discard(folder)
            if job.progress_fd is not None and not orphans:
                os.close(job.progress_fd)

    def finish(self, done: Done, dest: Path) -> None:
        """Move a verified file to ``dest`` and drop its (now empty) partial folder."""
        if dest.parent == self.state.staged / owner_tag():
            self.state.own_staged()  # a real folder, never a planted link
        else:
            dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(done.path, dest)
        self.state.discard(done.path.parent)


