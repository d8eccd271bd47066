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
from ._errors import IntegrityError, interrupted
from ._hashing import git_blob_id
from ._http import HttpPool, Redirects
from ._job import FetchContext, Job, Stop, Target
from ._observe import FetchObserver
from ._progress import Progress
from ._retry import RetryPolicy
from ._state import StateDir, on_disk, owner_tag, write_new

__all__ = ["FILES_AT_ONCE", "Downloaded", "Settings", "Transfer"]

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
class Downloaded:
    """A verified download, still in its partial folder."""

    path: Path  # the verified data file, still inside the claimed partial folder
    sha256: str
    fetched: int  # bytes received over the network for this file
    resumed_from: int  # bytes already on disk when this run started


class Transfer:
    """Downloads files into dino_root's partial folders; one instance per fetch.

    ``early``, when set, is asked first for each file: a source of bytes that may already hold the verified
    download (the head start, see _headstart); it answers None when it does not, and the transfer runs.
    ``budget`` caps the streams of all its files together (``beside`` shares it); ``observer`` is told of each
    download as it starts (see _observe).
    """

    def __init__(self, settings: Settings, pool: HttpPool, state: StateDir, progress: Progress,
                 raise_status: Callable[[int, dict[str, str], bytes, str], NoReturn], *,
                 endpoint_var: str = "HF_ENDPOINT", budget: Budget | None = None,
                 observer: FetchObserver | None = None) -> None:
        self.settings, self.pool, self.state, self.progress = settings, pool, state, progress
        self.raise_status, self.endpoint_var, self.observer = raise_status, endpoint_var, observer
        self.budget = budget or Budget.for_connections(settings.connections, settings.block)
        self.cancel = Stop()
        self.redirects = Redirects()
        self.early: Callable[[Target], Downloaded | None] | None = None
        self.context = FetchContext(pool, self.redirects, self.budget, progress, self.cancel, settings.retry,
                                    settings.min_split, endpoint_var, raise_status, state.root)

    def beside(self) -> Transfer:
        """A Transfer for downloads that run beside this one's (the head start's): the same pool, state folder,
        progress, stream budget and observer; its own cancel event and remembered redirects, no early source."""
        return Transfer(self.settings, self.pool, self.state, self.progress, self.raise_status,
                        endpoint_var=self.endpoint_var, budget=self.budget, observer=self.observer)

    def store_body(self, target: Target, body: bytes) -> Downloaded:
        """A small file already read whole (by the head start) as a verified download, like ``download``'s."""
        sha = hashlib.sha256(body).hexdigest()
        if len(body) != target.size or (target.sha256 and sha != target.sha256) or (
                target.git_oid and git_blob_id(body) != target.git_oid):
            raise IntegrityError(f"{target.name}: the early copy differs from the listing", "run again",
                                 file=target.name)
        folder = self.state.claim(target.identity, target.size)
        try:
            with on_disk(self.state.root):
                write_new(folder / "data", body)
        except BaseException:
            self.state.release(folder, target.identity)  # never left claimed (and heartbeating) by a failed write
            raise
        self.progress.start_file(target.name, target.size, 0)
        self.progress.advance(len(body))
        self.progress.end_file(target.name)
        return Downloaded(folder / "data", sha, len(body), 0)

    def download(self, target: Target) -> Downloaded:
        """Fetch ``target`` (resuming what is on disk) and verify it.

        Raises:
            IntegrityError: size or hash mismatch (the partial data is deleted).
            NetworkError: the retries ran out (the partial data is kept).
            DiskSpaceError: the disk filled up (the partial data is kept).
            FetchInterrupted: Ctrl-C / SIGTERM (the partial data is kept).
        """
        if self.early is not None and (early := self.early(target)) is not None:
            return early
        folder = self.state.claim(target.identity, target.size)
        try:
            job = Job(self.context, target, folder)
        except BaseException:
            self.state.release(folder, target.identity)  # EACCES, EMFILE...: the folder stays resumable, unowned
            raise
        keep, orphans = True, False
        self.cancel.watch(job)
        try:
            if self.observer is not None:
                self.observer.started(target.name, target.size, target.sha256, job)
            self.progress.start_file(target.name, target.size, job.resumed_from)
            # A file of two pieces or more may have every stream of the fetch (as the files before it end, their
            # streams come to it); a smaller one is one request.
            n_workers = self.budget.cap if target.size >= 2 * self.settings.min_split else 1
            job.piece_size = self.settings.min_split if n_workers > 1 else 0
            job.streams = n_workers
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
                # On an error or Ctrl-C no worker may hold up the exit for the whole read timeout: their body reads
                # are cut at once (a cancel's ``Stop`` has cut them already); one still waiting for an answer's
                # headers gets 2 s, then is left (a daemon thread) with its fds open.
                if job.error is not None:
                    job.cut_reads()
                deadline = time.monotonic() + 2.0
                for w in workers:
                    while w.is_alive() and ((job.error is None and not self.cancel.is_set())
                                            or time.monotonic() < deadline):
                        w.join(0.2)
                orphans = any(w.is_alive() for w in workers)
            if job.error is not None:
                raise job.error
            if self.cancel.is_set():
                raise interrupted()
            self.progress.end_file(target.name)
            return Downloaded(job.data_path, digest, job.fetched, job.resumed_from)
        except IntegrityError:
            keep = False
            raise
        except KeyboardInterrupt:
            self.cancel.set()
            raise
        finally:
            self.cancel.forget(job)
            if not orphans:
                os.close(job.fd)
            if keep and sys.exc_info()[0] is not None and not orphans and job.on_disk() == 0:
                keep = False  # stopped before its first byte: nothing to resume, no folder left behind
            if keep:
                job.save()
                if sys.exc_info()[0] is not None:
                    self.state.release(folder, target.identity)
            else:
                self.state.discard(folder)
            if job.progress_fd is not None and not orphans:
                os.close(job.progress_fd)

    def stage(self, done: Downloaded, dest: Path) -> None:
        """Move a verified download to ``dest`` (its staged path) and drop its (now empty) partial folder."""
        if dest.parent == self.state.staged / owner_tag():
            self.state.own_staged()  # a real folder, never a planted link
        with on_disk(self.state.root):
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(done.path, dest)
        self.state.discard(done.path.parent)


