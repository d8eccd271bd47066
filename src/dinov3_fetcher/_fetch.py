"""fetch_dinov3(): warm check -> lock -> snapshot -> plan -> transfer -> verify -> publish -> manifest.

A warm run (dino_root already holds the requested checkpoint) reads the manifest and a few kilobytes of
headers and returns: no request, and no hub client is even imported.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, overload

from . import _env as env
from ._config import FetchRequest, make_request
from ._errors import (
    FetcherError,
    FetchInterrupted,
    HubResponseError,
    IntegrityError,
    LocalEntryNotFoundError,
    NotDinov3Error,
    disk_error,
)
from ._manifest import FileRecord, Manifest
from ._progress import Progress, human_bytes
from ._registry import DEFAULT_MODEL, OfficialCheck, check_official, pins
from ._state import StateDir, on_disk
from ._version import __version__

if TYPE_CHECKING:
    from ._http import HttpPool
    from ._observe import FetchObserver
    from ._plan import Run
    from ._sources.source import EarlyBytes, Source

__all__ = ["FetchResult", "fetch", "fetch_dinov3", "ready"]

_SMALL_GRACE = 5.0  # seconds a small file under way may take to end when a weight file failed (see _fetch_weights)


@dataclass
class FetchResult:
    """What a fetch did: where the checkpoint is, which commit, and what was downloaded, resumed or reused."""

    path: Path
    repo_id: str
    revision: str
    commit: str
    cached: bool  # True when nothing had to be downloaded (warm run, or --update with nothing changed)
    files: dict[str, FileRecord] = field(default_factory=dict)
    bytes_fetched: int = 0
    bytes_resumed: int = 0
    seconds: float = 0.0
    requests_made: bool = False  # False: answered from disk alone; True: the source was asked (e.g. --update)
    source: str = "hf"
    official: bool | None = None  # the weights are Meta's release (True), are not (False), unknown (None)
    official_message: str = ""  # the one line that says so ("" when there is nothing to compare with)

    def to_dict(self) -> dict[str, Any]:
        """The result as JSON-able data (what --json prints)."""
        return {
            "path": str(self.path), "source": self.source, "repo_id": self.repo_id, "revision": self.revision,
            "commit": self.commit, "cached": self.cached, "requests_made": self.requests_made,
            "bytes_fetched": self.bytes_fetched, "bytes_resumed": self.bytes_resumed,
            "seconds": round(self.seconds, 3), "official": self.official, "official_check": self.official_message,
            "files": {k: {"size": v.size, "sha256": v.sha256} for k, v in sorted(self.files.items())},
        }


def ready(req: FetchRequest, manifest: Manifest | None = None) -> Manifest | None:
    """The manifest if dino_root holds a valid checkpoint of the request, else None (zero network).
    ``manifest``: the one already read, else it is read here."""
    manifest = manifest or StateDir(req.dino_root).read_manifest()
    if manifest is None or not manifest.matches(req.model, req.revision, req.source):
        return None
    # The checks (and the listing's, in _fetch_locked) are imported where used: a cold fetch opens its first
    # connection before it needs them.
    from ._validate import find_problems

    return manifest if not find_problems(req.dino_root, manifest) else None


@overload
def fetch_dinov3(dino_root: str | os.PathLike[str], model_name: str = ..., *, revision: str | None = ...,
                 update: bool = ..., quiet: bool = ..., source: str | None = ...,
                 require_official: bool = ..., repair: bool = ..., details: Literal[False] = ...) -> Path: ...
@overload
def fetch_dinov3(dino_root: str | os.PathLike[str], model_name: str = ..., *, revision: str | None = ...,
                 update: bool = ..., quiet: bool = ..., source: str | None = ...,
                 require_official: bool = ..., repair: bool = ..., details: Literal[True]) -> FetchResult: ...
def fetch_dinov3(
    dino_root: str | os.PathLike[str],
    model_name: str = DEFAULT_MODEL,
    *,
    revision: str | None = None,
    update: bool = False,
    quiet: bool = True,
    source: str | None = None,
    require_official: bool = False,
    repair: bool = False,
    details: bool = False,
) -> Path | FetchResult:
    """Make ``dino_root`` hold the checkpoint of ``model_name`` at ``revision``, verified; return its path.

    Returns at once, with no network request, when dino_root already holds it (a branch is not re-checked
    unless ``update=True``). Otherwise downloads what is missing (resuming partial downloads), checks every
    file's size and sha256, and publishes the files together with a manifest. ``dino_root`` is relative to the
    working directory. ``revision`` defaults to the source's default branch (``main``; ``master`` on
    ModelScope); ``source`` to DINOV3_FETCHER_SOURCE, else ``"hf"``. ``details=True`` returns a FetchResult.
    ``require_official=True`` refuses (IntegrityError, nothing published) unless the weights' sha256 is the pinned
    one of Meta's release (see ``dinov3-fetcher list``).
    ``repair=True`` re-hashes every file the manifest lists (instead of trusting sizes) and re-downloads only
    what is wrong; files that ``verify --deep`` found altered are re-downloaded by any fetch.

    Raises:
        ConfigError: dino_root is a file or cannot be created/written; it holds files this tool did not put
            there under names it would publish or remove (refused before any download; the listed bytes
            themselves are adopted instead); its state folder, ``partial`` or ``staged`` is a symbolic link;
            the model id or revision is malformed.
        AuthenticationError: no or invalid token, or a gated repo whose access is not granted yet.
        RepositoryNotFoundError: no such repo on the endpoint.
        RevisionNotFoundError: no such branch, tag or commit.
        NotDinov3Error: the repo is not a DINOv3 model, or its weights disagree with its config.
        LocalEntryNotFoundError: HF_HUB_OFFLINE=1 and the checkpoint is not complete on disk.
        IntegrityError: a file's bytes did not match the listed size or hash (it was discarded), or
            ``require_official`` and the weights are not Meta's release (nothing was published).
        DiskSpaceError: not enough free space, or dino_root's filesystem failed (an OSError); partial data is
            kept.
        NetworkError: the endpoint could not be reached or kept failing; partial data is kept.
        LockTimeoutError: another fetcher held dino_root for longer than the lock timeout.
        FetchInterrupted: Ctrl-C; partial data is kept.
    """
    result = fetch(make_request(dino_root, model_name, revision, source, require_official), update=update,
                   progress=Progress(quiet=quiet), repair=repair)
    return result if details else result.path


def fetch(req: FetchRequest, *, update: bool = False, progress: Progress | None = None,
          lock_timeout: float | None = None, repair: bool = False,
          observer: FetchObserver | None = None) -> FetchResult:
    """The fetch of an already validated request, with a detailed result. Raises what fetch_dinov3 raises.
    ``observer`` is told the plan, each weight's download as it starts and each weight once verified
    (``_observe``). A failure of dino_root's filesystem that no step named is still what it means for the user
    (``_errors.disk_error``: exit 3 or 9, naming the path), never a bare OSError."""
    try:
        return _fetch(req, update=update, progress=progress, lock_timeout=lock_timeout, repair=repair,
                      observer=observer)
    except OSError as exc:
        if isinstance(exc, FetcherError) or not exc.filename or \
                not Path(os.path.abspath(os.fsdecode(exc.filename))).is_relative_to(req.dino_root):
            raise
        raise disk_error(exc, req.dino_root) from exc


def _fetch(req: FetchRequest, *, update: bool, progress: Progress | None, lock_timeout: float | None,
           repair: bool, observer: FetchObserver | None) -> FetchResult:
    t0 = time.monotonic()
    progress = progress or Progress(quiet=True)
    pins()  # a malformed DINOV3_FETCHER_REGISTRY is refused now, not after hours of download
    if not (update or repair) and (m := ready(req)):
        StateDir(req.dino_root).drop_abandoned()  # what killed fetchers left, once proven gone: no request, no wait
        return _cached(req, m, t0)
    if env.is_offline():
        if update and (m := ready(req)):
            raise LocalEntryNotFoundError(
                f"HF_HUB_OFFLINE is set, so --update cannot ask the source whether {req.model}@{req.revision} "
                f"moved; {req.dino_root} holds it complete at commit {m.commit[:12]}",
                "unset HF_HUB_OFFLINE to check for updates, or drop --update to use what is there")
        raise _offline_error(req)
    state = StateDir(req.dino_root)
    timeout = lock_timeout if lock_timeout is not None else env.lock_timeout()
    pool = _warmed_pool(req)
    created = state.missing_folders()  # what this fetch creates: removed again if it fails and they stay empty
    try:
        state.ensure()
        with state.locked(timeout, progress):
            old = state.read_manifest()  # once under the lock
            if not (update or repair) and (m := ready(req, old)):
                return _cached(req, m, t0)
            state.watch_leftovers()  # other hosts' leftovers: judged by their heartbeats when this fetch ends
            result = _fetch_locked(state, req, old, progress, pool, repair=repair, observer=observer)
    except KeyboardInterrupt:
        state.remove_if_empty(created)
        raise FetchInterrupted("interrupted; the partial download is kept in " + str(state.partial),
                               "run the same command again: it resumes where it stopped") from None
    except BaseException:
        state.remove_if_empty(created)
        raise
    finally:
        pool.close()
    result.seconds = time.monotonic() - t0
    return result


def _warmed_pool(req: FetchRequest) -> HttpPool:
    """The fetch's connection pool; for the Hub, with connections to the endpoint opening already (before the
    lock and the Hub client's import), so that the head start's first requests find them open: a request on a
    connection opened a round trip earlier costs one round trip instead of two (three over TLS). A fetch that
    then finds the checkpoint complete (another fetcher had the lock) closes them unused: no request is made."""
    from ._dial import FIRST_CONNECTIONS
    from ._http import HttpPool

    pool = HttpPool(env.timeout(), "")
    if req.source == "hf":
        from ._sources.hf import endpoint

        pool.warm(endpoint(), FIRST_CONNECTIONS)  # the command opened them as it started, where it could: _dial
    return pool


def _cached(req: FetchRequest, m: Manifest, t0: float) -> FetchResult:
    check = _official(req, m.files, published=True)
    return FetchResult(req.dino_root, m.repo_id, m.revision, m.commit, True, m.files,
                       seconds=time.monotonic() - t0, source=m.source, official=check.official,
                       official_message=check.message)


def _official(req: FetchRequest, files: dict[str, FileRecord], *, published: bool) -> OfficialCheck:
    """The weights compared with Meta's pinned release; with ``require_official``, IntegrityError unless equal."""
    check = check_official(req.model, files)
    if req.require_official and check.official is not True:
        what = (check.message.removeprefix("warning: ") if check.official is False else
                f"there is no pinned sha256 of Meta's release to compare {req.model}'s weights with")
        where = (f"{req.dino_root} is left as it is" if published else
                 "nothing was published; dino_root keeps what it held")
        raise IntegrityError(f"--require-official: {what}; {where}",
                             "fetch an official id from a source that has the release (--source hf|modelscope), "
                             "or drop --require-official (train.dino_require_official) to accept this copy")
    return check


def _offline_error(req: FetchRequest) -> LocalEntryNotFoundError:
    from ._validate import why_not

    why = why_not(req.dino_root, req.model, req.revision) or "it was changed while this fetch looked at it"
    partial = StateDir(req.dino_root).partial
    kept = sum(f.stat().st_size for f in partial.glob("*/data")) if partial.is_dir() else 0
    extra = f"; {human_bytes(kept)} of partial downloads are kept" if kept else ""
    return LocalEntryNotFoundError(
        f"HF_HUB_OFFLINE is set and {req.dino_root} is not a complete checkpoint of {req.model}@{req.revision}: "
        f"{why}{extra}", "unset HF_HUB_OFFLINE to download it (partial downloads resume)")


def _telling(run: Run, observer: FetchObserver) -> Callable[[str], Path]:
    """``run.fetch_file``, telling ``observer`` of each file it verified."""

    def fetch_and_tell(name: str) -> Path:
        path = run.fetch_file(name)
        observer.verified(name, path)
        return path

    return fetch_and_tell


def _fetch_weights(run: Run, names: list[str], files_at_once: int, get: Callable[[str], Path],
                   beside: list[str] | None = None) -> None:
    """``get`` (``run.fetch_file``) each weight file, ``files_at_once`` at a time, so that one file's sha256 tail
    overlaps the next transfer; meanwhile one more thread fetches the small files ``beside`` (README, LICENSE)
    with ``run.fetch_file``, so that their round trips overlap the weights instead of following them (on a far
    link each is a round trip at the end of the fetch). Files with the same content never run together (they share
    a partial folder). The first error stops the others and is raised; Ctrl-C stops all and keeps their progress."""
    assert run.transfer is not None
    transfer = run.transfer
    identities = [run.remote(n).identity for n in names]
    at_once = 1 if len(names) < 2 or len(set(identities)) < len(identities) else files_at_once
    todo, lock = list(names), threading.Lock()
    errors: list[BaseException] = []  # appended under ``lock``; read without it (a list's length is atomic)
    ended = threading.Event()  # a worker ended: the wait below wakes at once (not at its next poll)

    def worker(queue: list[str], fetch: Callable[[str], Path]) -> None:
        try:
            while True:
                with lock:
                    if errors or not queue:
                        return
                    name = queue.pop(0)
                try:
                    fetch(name)
                except BaseException as exc:
                    with lock:
                        errors.append(exc)
                    return
        finally:
            ended.set()

    small = threading.Thread(target=worker, args=(list(beside or []), run.fetch_file), daemon=True,
                             name="file-small")
    workers = [*(threading.Thread(target=worker, args=(todo, get), daemon=True, name=f"file-{i}")
                 for i in range(at_once)), small]
    try:
        for t in workers:
            t.start()
        while True:
            ended.clear()
            if errors or not any(t.is_alive() for t in workers):
                break
            ended.wait(0.2)
        if errors:
            # The first error stops the others; a small file under way ends first (a request or two), so
            # that it is staged whole rather than left half-written beside the weights' partial data.
            small.join(_SMALL_GRACE)
    except BaseException:  # Ctrl-C (or anything else that ends this wait): every download stops, progress kept
        transfer.cancel.set()
        raise
    finally:
        if errors:
            transfer.cancel.set()
        for t in workers:
            while t.is_alive():
                t.join(0.2)
    if errors:  # the cause, not the FetchInterrupted that the cancel gave the other download
        raise next((e for e in errors if not isinstance(e, FetchInterrupted)), errors[0])


def _holds_unrecorded_files(root: Path, old: Manifest | None) -> bool:
    """Is there a file under a name a fetch publishes (or a standard weight name) that no manifest records?"""
    from ._layout import may_publish

    ours = set(old.files) | set(old.previous) if old else set()
    try:
        return any(may_publish(p.name) and p.name not in ours for p in root.iterdir())
    except OSError:
        return False


def _fetch_locked(state: StateDir, req: FetchRequest, old: Manifest | None, progress: Progress, pool: HttpPool,
                  *, repair: bool = False, observer: FetchObserver | None = None) -> FetchResult:
    from ._layout import CONFIG, INDEX, PREPROCESSOR, SINGLE, files_to_publish, optional_files, weight_files
    from ._observe import FetchPlan
    from ._plan import Run
    from ._safetensors import SafetensorsError, TensorInfo, read_header
    from ._sources import get_source
    from ._transfer import FILES_AT_ONCE, Settings, Transfer
    from ._validate import config_problem, registry_mismatch, tensor_mismatch

    settings = Settings.from_env()
    head_start = not _holds_unrecorded_files(state.root, old)
    source: Source = get_source(req.source)
    pool.user_agent = source.user_agent()
    pool.set_auth(source.auth())

    def raise_status(status: int, headers: dict[str, str], body: bytes, url: str) -> Any:
        source.raise_for_status(status, headers, body, url, req.model, req.revision)

    transfer = Transfer(settings, pool, state, progress, raise_status, endpoint_var=source.endpoint_var,
                        observer=observer)
    # The weights may start flowing now (the Hub's head start); the listing below decides whether they are kept.
    # Not when dino_root holds files we did not put there: the fetch may refuse it (Run.check_foreign).
    early: EarlyBytes | None = None
    try:
        if head_start:
            early = source.early(transfer, old, req.model, req.revision, transfer.cancel)
        transfer.early = early.take if early is not None else None
        snap = source.snapshot(req.model, req.revision)
        run = Run(state, source, snap, old, transfer, repair=repair)
        publishing = files_to_publish(snap.files, weight_files(snap.files) or [])  # shards by their listed names
        run.check_foreign(publishing)  # before any download
        cfg = run.fetch_json(CONFIG)
        if reason := config_problem(cfg) or registry_mismatch(req.model, cfg):
            raise NotDinov3Error(f"{req.model} is not a usable DINOv3 checkpoint: {reason}",
                                 "pick a DINOv3 repo ('dinov3-fetcher list' shows the official ones)")
        run.fetch_file(PREPROCESSOR)
        weights = weight_files(snap.files, lambda: run.fetch_json(INDEX))
        if weights is None:
            raise NotDinov3Error(f"{req.model} has no safetensors weights ({SINGLE} or {INDEX})",
                                 "pick a repo with safetensors weights")
        run.check_foreign(publishing + [n for n in weights if n not in publishing])  # the index's other shards
        planned = run.plan(weights + optional_files(snap.files))
        state.check_space(sum(p.size - p.present for p in planned))
        progress.expect({p.name: p.size for p in planned})
        progress.done += sum(p.size for p in planned if p.reuse)  # += : head-start bytes are counted already
        order = [p.name for p in planned if p.name in weights]
        later = [p.name for p in planned if p.name not in weights]  # README, LICENSE: fetched beside the weights
        get: Callable[[str], Path] = run.fetch_file
        if observer is not None:  # before the weights' transfer
            records = {**run.records, **{n: run.expected(n) for n in order}}
            official = check_official(req.model, records).official if all(records[n].sha256 for n in order) else None
            observer.planned(FetchPlan(snap.commit, source.name, env.display_origin(source.endpoint), records, order,
                                       {n: run.expected(n) for n in later},
                                       dict(run.paths), transfer.cancel, official, snap.site_revision))
            get = _telling(run, observer)
        _fetch_weights(run, order, FILES_AT_ONCE, get, beside=later)
        tensors: dict[str, TensorInfo] = {}
        with on_disk(state.root):
            for name in weights:
                try:
                    tensors.update(read_header(run.paths[name]))
                except SafetensorsError as exc:  # its bytes (an OSError goes to on_disk)
                    raise HubResponseError(f"{req.model}: {exc}", "the repo's weights are broken; report it") from None
        if reason := tensor_mismatch(cfg, tensors):
            raise NotDinov3Error(f"{req.model}'s weights disagree with its config: {reason}",
                                 "the repo is inconsistent; pick another revision or repo")
    finally:
        if early is not None:
            early.stop()
        progress.close()
        pool.close()
    check = _official(req, run.records, published=False)  # before anything is published
    manifest = Manifest(req.model, req.revision, snap.commit, run.records, __version__, source=source.name,
                        endpoint=env.display_origin(source.endpoint), official=check.official,
                        site_revision=snap.site_revision)
    if old is not None and old.complete and old.commit == snap.commit and old.files == run.records \
            and not old.damaged and not repair:
        # --update found nothing new: the files are the ones verified before, so their checks still hold.
        manifest.verified_at, manifest.verified_deep_at = old.verified_at, old.verified_deep_at
    state.publish(manifest, run.paths, old)
    state.drop_stale()
    return FetchResult(state.root, req.model, req.revision, snap.commit, run.fetched == 0 and run.resumed == 0,
                       run.records, run.fetched, run.resumed, requests_made=True, source=source.name,
                       official=check.official, official_message=check.message)
