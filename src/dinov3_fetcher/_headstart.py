"""A head start for the weights: their transfer begins while huggingface_hub is still answering.

On a cold fetch, huggingface_hub's ``model_info`` and then config.json, preprocessor_config.json and the
index each cost a round trip, and until they answered, the weights (all but a few KB of the bytes) could
not start. ``HeadStart`` learns what the weights will be from the Hub's ``resolve`` answers, the way
huggingface_hub's own ``hf_hub_download`` does (config.json with its ``X-Repo-Commit``, each weight file's
``X-Linked-Etag`` and ``X-Linked-Size``), asking config.json and the index at once, with the single file's HEAD
(then the shards' HEADs at once), or with the shards' HEADs where the registry knows their names, and starts the
files' transfer as soon as they are known and fit on the disk, in the background, beside ``model_info`` (and
beside the ``HfApi`` import: see ``HfSource.early``).

Nothing it learns is trusted. ``fetch`` adopts an early download only when huggingface_hub's listing gives
the same size and sha256, and the bytes were checked against that sha256 as always; otherwise the early
downloads are stopped and their partial data is kept for resume. Anything that goes wrong here (401/403 on
a gated repo, 404, a mirror without those headers, a config that is not DINOv3, too little free space)
means no head start and nothing more: the main path meets the same problem and reports it, with
huggingface_hub's reading of the error.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Generator, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import quote

from ._errors import interrupted
from ._hashing import git_blob_id
from ._http import etag_value, redirect_target
from ._ids import is_commit, is_sha256
from ._job import Target
from ._layout import CONFIG, INDEX, SINGLE, shards_from_index
from ._manifest import Manifest
from ._registry import variant_for
from ._state import fits
from ._transfer import FILES_AT_ONCE, Downloaded, Transfer
from ._validate import config_problem, registry_mismatch

__all__ = ["HeadStart"]

HEADS_AT_ONCE = 8  # the shards' HEAD requests in parallel
QUICK_RTT = 0.01  # seconds: a round trip under this, the streams wait for huggingface_hub's import (HeadStart)
MAX_JSON = 16 * 1024 * 1024  # config.json and the index are a few KB; a bigger answer is not one of them


@dataclass
class _EarlyDownload:
    target: Target
    started: bool = False
    result: Downloaded | None = None
    error: Exception | None = None  # why it failed (its partial data is kept, unless the bytes were wrong)
    adopted: bool = False  # handed to the main path (under HeadStart.lock)
    released: bool = False  # given back unclaimed by stop() (under HeadStart.lock): never handed over
    finished: threading.Event = field(default_factory=threading.Event)


class HeadStart:
    """Early downloads of one fetch's weights; ``take`` hands one over to the main path."""

    def __init__(self, main: Transfer, old: Manifest | None, repo_id: str, revision: str, endpoint: str,
                 main_cancel: threading.Event) -> None:
        self.transfer = main.beside()  # its own cancel event; the main one's pool, state, progress and budget
        self.main_cancel = main_cancel  # the main path's: once set (Ctrl-C, an error), the head start stops too
        self.state, self.old, self.repo_id = main.state, old, repo_id
        self.base = f"{endpoint}/{repo_id}/resolve/"
        self.revision = revision
        self.jobs: dict[str, _EarlyDownload] = {}
        self.small: dict[str, bytes] = {}  # config.json and the index as read here, for take()
        # Set once this head start's answer for config.json is in (or none will come): the main path, which needs
        # config.json next to plan, waits for the request already made instead of making it a second time.
        self.config_known = threading.Event()
        self.announced = 0  # the weights' total size as the index gives it, before the shards' HEADs answer
        self.all_known = False  # every weight file's HEAD answered as expected (set by _targets at its end)
        self.taken: set[str] = set()  # names the main path asked for: never started here after that
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []
        self.running = 0  # download workers alive (at most FILES_AT_ONCE)
        # Set by the caller once huggingface_hub's client is imported (see ``HfSource.early``). Where the round trip
        # is short (the same host, a LAN), the weights' streams wait for it: they would fill at once, and their
        # reads would take the CPU the import needs (a hand-off of the GIL at every read: 0.3-0.4 s more of both
        # on 2 cores). On a longer one they start at once: their first bytes are round trips away.
        self.streams_may_start = threading.Event()

    def start(self) -> None:
        """Begin: learn the weights from the resolve answers and start their transfer, in the background."""
        self._spawn(self._plan, "head-start")

    def _spawn(self, fn: Callable[[], None], name: str) -> None:
        t = threading.Thread(target=fn, daemon=True, name=name)
        with self.lock:
            self.threads.append(t)
        t.start()

    # -- what to fetch ----------------------------------------------------------------------------------
    def _plan(self) -> None:
        """Start each weight file as soon as its resolve answer is in (a shard need not wait for the others), once
        all of them are known to fit on the disk: a checkpoint that does not fit is refused by the main path
        before its first byte, not after the head start filled the disk with the shards that did (a 7B shard is
        4.5 GB). For shards, the index's total size says so before their HEADs answer; where it does not (the
        disk is tight, a partial download may make the difference), every HEAD is awaited and counted exactly,
        and none starts if one of them did not answer as expected."""
        try:
            free, needed, known = self.state.free_space(), 0, []
            identities: set[str] = set()
            for t in self._targets():
                if t.identity in identities:  # same bytes as another file: they would share a partial folder
                    continue
                identities.add(t.identity)
                needed += t.size - min(t.size, self.state.partial_bytes(t.identity, t.size))
                known.append(t)
                if fits(max(needed, self.announced), free):
                    while known:
                        self._start(known.pop(0))
            if known and self.all_known and fits(needed, free):  # the exact count of every file fits after all
                for t in known:
                    self._start(t)
        except Exception:  # no (more) head start: the main path meets the same problem and reports it
            return
        finally:
            self.config_known.set()  # (when config.json was never asked)

    def _start(self, t: Target) -> None:
        with self.lock:
            if self.transfer.cancel.is_set():
                return
            self.jobs[t.name] = _EarlyDownload(t)
            spawn = self.running < FILES_AT_ONCE
            if spawn:
                self.running += 1
        if spawn:
            self._spawn(self._worker, f"head-start-{t.name}")

    def _targets(self) -> Iterator[Target]:
        """The weight files to start, each as soon as it is known. config.json and the first answer of both
        layouts (the single file's HEAD, the index) are asked at once, at the revision: one round trip for
        all three, each answer checked against config.json's commit. Where the registry knows the shards' names
        (the 7B's) and a token is set, their HEADs go with the index instead of the single file's, so that the
        first shard starts as soon as the index confirms them."""
        rev = quote(self.revision, safe="")
        variant = variant_for(self.repo_id)
        order = (INDEX, SINGLE) if variant is not None and variant.sharded else (SINGLE, INDEX)
        if self.old is not None and (INDEX in self.old.files) != (order[0] == INDEX):
            order = order[::-1]  # the layout on disk first: an update usually keeps it
        known: tuple[str, ...] = ()  # the shards' names, asked with the index
        # Not without a token: the Hub refuses every file of a gated repo (all of Meta's are), and 6 refused HEADs
        # more would count against its rate limit for nothing.
        if variant is not None and order[0] == INDEX and self.transfer.pool.auth is not None:
            known = variant.shard_names
        with ThreadPoolExecutor(2 + (len(known) or 1)) as ex:
            cfg_answer = ex.submit(self._known_config)
            # Cold, both layouts are asked at once (one 404 more, one round trip less); an update, or shards whose
            # names are known, ask the layout expected, and the other only if that one is gone.
            first = {order[0]: ex.submit(self._layout, order[0], rev)}
            asked = {name: ex.submit(self._lfs, rev, name) for name in known}
            if self.old is None and not known:
                first[order[1]] = ex.submit(self._layout, order[1], rev)
            if (answer := cfg_answer.result()) is None:
                return
            commit, body = answer
            cfg = json.loads(body)
            if not isinstance(cfg, dict) or config_problem(cfg) or registry_mismatch(self.repo_id, cfg):
                return  # not a DINOv3 checkpoint: nothing big is fetched before the main path refuses it
            for layout in order:
                found = first[layout].result() if layout in first else self._layout(layout, commit)
                if found is None or found[0] != commit:
                    continue
                if isinstance(found[1], Target):
                    self.all_known = True
                    if self._needed(found[1]):
                        yield found[1]
                    return
                self.small[INDEX] = found[1]
                index = json.loads(found[1])
                meta = index.get("metadata") if isinstance(index, dict) else None
                total = meta.get("total_size") if isinstance(meta, dict) else None
                # the tensors' bytes: the shards' headers add a few KB each, within fits()'s margin
                self.announced = total if isinstance(total, int) and total > 0 else 1 << 62
                names = shards_from_index(index if isinstance(index, dict) else {})
                self.all_known = yield from self._shards(commit, names, asked)
                return

    def _layout(self, layout: str, rev: str) -> tuple[str, Target | bytes] | None:
        """(commit, the single file's target or the index's bytes) at ``rev``, or None."""
        return self._lfs(rev, SINGLE) if layout == SINGLE else self._small(self.base + rev + "/" + INDEX)

    def _shards(self, commit: str, names: list[str],
                asked: Mapping[str, Future[tuple[str, Target] | None]]) -> Generator[Target, None, bool]:
        """The shards the index names, each yielded in order; those before the first that does not answer as
        expected (the main path fetches the rest). A shard's HEAD ``asked`` already (at the revision, with the
        index) is not made again; the others go a few at a time (at once for a DINOv3's 6), at the commit.
        Returns whether every shard answered as expected."""
        with ThreadPoolExecutor(min(HEADS_AT_ONCE, max(1, len(names)))) as ex:
            answers = [asked[n] if n in asked else ex.submit(self._lfs, commit, n) for n in names]
            for answer in answers:
                found = answer.result()
                if found is None or found[0] != commit:
                    return False
                if self._needed(found[1]):
                    yield found[1]
        return True

    def _known_config(self) -> tuple[str, bytes] | None:
        """``_config``, its body kept for take() and ``config_known`` set as soon as it is in."""
        try:
            answer = self._config()
            if answer is not None:
                with self.lock:
                    self.small[CONFIG] = answer[1]
            return answer
        finally:
            self.config_known.set()

    def _config(self) -> tuple[str, bytes] | None:
        """(commit, config.json) at the revision; the copy on disk when the Hub's git blob id says it is intact."""
        url = self.base + quote(self.revision, safe="") + "/" + CONFIG
        rec = self.old.files.get(CONFIG) if self.old else None
        if rec is None:
            return self._small(url)
        resp = self.transfer.pool.head(url).resp  # an intact file is never downloaded again
        commit = resp.getheader("X-Repo-Commit") or ""
        etag = etag_value(resp.getheader("ETag"))
        # A record from a source that lists no git ids (ModelScope) has none: the bytes on disk decide below.
        if resp.status != 200 or not is_commit(commit) or (rec.git_oid is not None and etag != rec.git_oid):
            return None if resp.status != 200 else self._small(url)
        try:
            body = (self.state.root / CONFIG).read_bytes()
        except OSError:
            body = b""
        if git_blob_id(body) != etag:  # not intact
            return self._small(url)
        return commit, body

    def _small(self, url: str) -> tuple[str, bytes] | None:
        """(commit, body) of a small file from the Hub, or None."""
        answer = self.transfer.pool.get(url, {})
        resp = answer.resp
        try:
            body = answer.read(MAX_JSON + 1) if resp.status == 200 else b""
        finally:
            self.transfer.pool.finish(answer)
        commit = resp.getheader("X-Repo-Commit") or ""
        if resp.status != 200 or len(body) > MAX_JSON or not is_commit(commit):
            return None
        return commit, body

    def _lfs(self, rev: str, name: str) -> tuple[str, Target] | None:
        """(commit, the weight file as the Hub's resolve answer at ``rev`` describes it: sha256 and size), or
        None. The target's URL names the commit, whatever ``rev`` was."""
        asked = self.base + rev + "/" + quote(name)
        answer = self.transfer.pool.head(asked)
        self.transfer.budget.first_byte(answer.seconds_per_trip())
        resp = answer.resp
        commit = resp.getheader("X-Repo-Commit") or (rev if is_commit(rev) else "")  # at a commit: that one
        sha = etag_value(resp.getheader("X-Linked-Etag") or resp.getheader("ETag"))
        size = resp.getheader("X-Linked-Size") or resp.getheader("Content-Length") or ""
        if resp.status >= 400 or not is_commit(commit) or not is_sha256(sha) or not size.isdigit():
            return None
        url = self.base + commit + "/" + quote(name)
        target = Target(name, url, int(size), sha, sha)
        location = resp.getheader("Location")
        if resp.status in (301, 302, 303, 307, 308) and location:
            # The GETs go straight there (one round trip less); a location refused later (expired, signed
            # per request) is re-resolved from then on: Redirects.forget. The first one's connection opens
            # now, while the download is planned and set up (its claim, files and workers).
            with contextlib.suppress(Exception):
                where = redirect_target(asked, location)
                self.transfer.redirects.remember(target.url, where)
                if self._needed(target):
                    self.transfer.pool.warm(where, 1)
        return commit, target

    def _needed(self, t: Target) -> bool:
        """False when a complete copy is on disk already (published or staged): the main path reuses it."""
        rec = self.old.files.get(t.name) if self.old else None
        if rec is not None and rec.sha256 == t.sha256 and rec.size == t.size:
            return False
        return not self.state.any_staged(t.identity, t.name)

    # -- the downloads ----------------------------------------------------------------------------------
    def _worker(self) -> None:
        rtt = self.transfer.budget.rtt
        if rtt is None or rtt < QUICK_RTT:
            while not self.streams_may_start.wait(0.05) and not self.transfer.cancel.is_set():
                pass
        while True:
            with self.lock:
                job = next((j for n, j in self.jobs.items() if not j.started and n not in self.taken), None)
                if job is None or self.transfer.cancel.is_set() or self.main_cancel.is_set():
                    self.running -= 1  # under the lock: _plan starts another worker for a file it adds later
                    return
                job.started = True
            try:
                job.result = self.transfer.download(job.target)
            except Exception as exc:  # handed to the main path by take()
                job.error = exc
            finally:
                job.finished.set()

    def take(self, target: Target) -> Downloaded | None:
        """The early download of ``target`` once it is done, if it fetched exactly that content (same size and
        sha256 as huggingface_hub lists); None for the transfer to download it itself. config.json and the
        index, read here whole, are handed over when their git blob id is the one listed.

        Raises what that early download raised (its retries ran out, the disk filled up, wrong bytes): it was
        the very download the main path would make, with the same settings. Only a download stopped by
        ``stop`` is left to the main path, which resumes it.
        """
        if target.name == CONFIG and self.threads:  # asked at the start: its answer comes sooner than a new one's
            while not self.config_known.wait(0.2) and not self.main_cancel.is_set():
                pass
        with self.lock:
            body = self.small.get(target.name)
        if body is not None and not target.sha256 and target.git_oid and git_blob_id(body) == target.git_oid:
            return self.transfer.store_body(target, body)
        with self.lock:
            self.taken.add(target.name)
            job = self.jobs.get(target.name)
            if job is None or not job.started:
                return None
        if (job.target.size, job.target.sha256) != (target.size, target.sha256):
            self.stop()  # the Hub's listing disagrees (a branch that moved, a mirror's headers): all stop
            return None
        while not job.finished.wait(0.2):
            if self.main_cancel.is_set():  # Ctrl-C, or another file failed: stop this one as well
                self.transfer.cancel.set()
        if self.main_cancel.is_set():
            raise interrupted()
        with self.lock:
            if job.error is not None and not self.transfer.cancel.is_set():
                raise job.error
            if job.released or job.result is None:
                return None  # stopped (its partial is kept, and the main path resumes it)
            job.adopted = True
            return job.result

    def stop(self, timeout: float = 2.5) -> None:
        """Stop every early download and wait until each has saved its progress and let go of its folder.

        Bounded, so that Ctrl-C still exits at once: a download stops at once, or within ~2 s where a request
        still waits for its answer's headers (``Transfer.download``). One
        still running after that keeps its folder claimed by this live process, so nothing deletes it
        under it, and the next run adopts it.
        """
        self.transfer.cancel.set()
        deadline = time.monotonic() + timeout
        with self.lock:
            threads = list(self.threads)
        for t in threads:
            with contextlib.suppress(RuntimeError):
                t.join(max(0.0, deadline - time.monotonic()))
        with self.lock:
            unused = [j for j in self.jobs.values() if j.result is not None and not j.adopted and not j.released]
            for j in unused:
                j.released = True
        for j in unused:  # complete but not wanted (yet): unclaimed, so the main path or a later run may take it
            assert j.result is not None
            self.transfer.state.release(j.result.path.parent, j.target.identity)
