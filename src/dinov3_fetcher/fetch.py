"""fetch_dinov3(): cache check -> lock -> plan -> transfer -> verify -> publish -> manifest.

A warm run (dino_root already holds the requested checkpoint) reads the manifest and a few kilobytes of
headers and returns: no HTTP request, and huggingface_hub is not even imported.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__, env
from .config import DEFAULT_REVISION, check_repo_id, check_revision, resolve_dino_root
from .errors import (
    ConfigError,
    DiskSpaceError,
    FetchInterrupted,
    HubResponseError,
    LocalEntryNotFoundError,
    LockTimeoutError,
    NotDinov3Error,
)
from .progress import Progress, human_bytes
from .safetensors import SafetensorsError, TensorInfo, read_header
from .state import SPACE_MARGIN, FileRecord, Manifest, StateDir, atomic_write_bytes, owner_gone, owner_tag
from .validate import (
    CONFIG,
    INDEX,
    PREPROCESSOR,
    SINGLE,
    check_filename,
    config_problem,
    find_problems,
    read_json_object,
    registry_mismatch,
    shards_from_index,
    tensor_mismatch,
    validate_dinov3,
)
from .variants import DEFAULT_MODEL
from .verify import sha256_file

if TYPE_CHECKING:
    from .headstart import HeadStart
    from .hub import RemoteFile, Snapshot
    from .transfer import Transfer

__all__ = ["FetchResult", "PlannedFile", "fetch", "fetch_dinov3", "plan", "validate_dinov3"]

OPTIONAL = ("README.md", "LICENSE.md")
# Weight names transformers loads by itself: a stray one next to another model's files would be loaded instead.
_STANDARD_WEIGHTS = re.compile(r"model\.safetensors(\.index\.json)?|model-\d{5}-of-\d{5}\.safetensors")


@dataclass
class PlannedFile:
    name: str
    size: int
    present: int  # bytes already on disk (a complete file reused, or a partial download)
    reuse: bool  # the complete file is already in dino_root or staged


@dataclass
class FetchResult:
    path: Path
    repo_id: str
    revision: str
    commit: str
    cached: bool  # True when nothing had to be downloaded (warm run, or --update with nothing changed)
    files: dict[str, FileRecord] = field(default_factory=dict)
    bytes_fetched: int = 0
    bytes_resumed: int = 0
    seconds: float = 0.0
    requests_made: bool = False  # False: answered from disk alone; True: the Hub was asked (e.g. --update)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path), "repo_id": self.repo_id, "revision": self.revision, "commit": self.commit,
            "cached": self.cached, "requests_made": self.requests_made,
            "bytes_fetched": self.bytes_fetched, "bytes_resumed": self.bytes_resumed,
            "seconds": round(self.seconds, 3),
            "files": {k: {"size": v.size, "sha256": v.sha256} for k, v in sorted(self.files.items())},
        }


def _root(dino_root: str | os.PathLike[str]) -> Path:
    if not str(dino_root).strip():
        raise ConfigError("dino_root is empty", "pass a folder, e.g. dino_root=Path('dinov3')")
    return resolve_dino_root(dino_root, Path.cwd())


def ready(root: Path, repo_id: str, revision: str) -> Manifest | None:
    """The manifest if ``root`` holds a valid checkpoint of repo_id@revision, else None (zero network)."""
    manifest = StateDir(root).read_manifest()
    if manifest is None or not manifest.matches(repo_id, revision):
        return None
    return manifest if not find_problems(root, manifest) else None


def fetch_dinov3(
    dino_root: str | os.PathLike[str],
    model_name: str = DEFAULT_MODEL,
    *,
    revision: str = DEFAULT_REVISION,
    update: bool = False,
    quiet: bool = True,
) -> Path:
    """Make ``dino_root`` hold the checkpoint of ``model_name`` at ``revision``, verified; return its path.

    Returns at once, with no network request, when dino_root already holds it (a branch is not re-checked
    unless ``update=True``). Otherwise downloads what is missing (resuming partial downloads), checks every
    file's size and sha256, and publishes the files together with a manifest.

    Raises:
        ConfigError: dino_root is a file or cannot be created/written; the model id or revision is malformed.
        AuthenticationError: no or invalid token, or a gated repo whose access is not granted yet.
        RepositoryNotFoundError: no such repo on the endpoint.
        RevisionNotFoundError: no such branch, tag or commit.
        NotDinov3Error: the repo is not a DINOv3 model, or its weights disagree with its config.
        LocalEntryNotFoundError: HF_HUB_OFFLINE=1 and the checkpoint is not complete on disk.
        IntegrityError: a file's bytes did not match the Hub's size or hash (it was discarded).
        DiskSpaceError: not enough free space (an OSError); partial data is kept.
        NetworkError: the endpoint could not be reached or kept failing; partial data is kept.
        LockTimeoutError: another fetcher held dino_root for longer than the lock timeout.
        FetchInterrupted: Ctrl-C; partial data is kept.
    """
    return fetch(dino_root, model_name, revision=revision, update=update,
                 progress=Progress(quiet=quiet)).path


def fetch(
    dino_root: str | os.PathLike[str],
    model_name: str = DEFAULT_MODEL,
    *,
    revision: str = DEFAULT_REVISION,
    update: bool = False,
    progress: Progress | None = None,
    lock_timeout: float | None = None,
) -> FetchResult:
    """fetch_dinov3 with a detailed result (what was fetched, resumed, reused). Raises what it raises."""
    t0 = time.monotonic()
    progress = progress or Progress(quiet=True)
    root = _root(dino_root)
    repo_id, revision = check_repo_id(model_name), check_revision(revision)
    if not update and (m := ready(root, repo_id, revision)):
        return FetchResult(root, m.repo_id, m.revision, m.commit, True, m.files, seconds=time.monotonic() - t0)
    if env.is_offline():
        raise _offline_error(root, repo_id, revision)
    state = StateDir(root)
    try:
        state.ensure()
    except OSError as exc:
        raise ConfigError(f"cannot create {state.path}: {exc.strerror}",
                          "make dino_root's folder writable or point dino_root elsewhere") from None
    with _locked(state, lock_timeout if lock_timeout is not None else env.lock_timeout(), progress):
        if not update and (m := ready(root, repo_id, revision)):
            return FetchResult(root, m.repo_id, m.revision, m.commit, True, m.files,
                               seconds=time.monotonic() - t0)
        try:
            result = _fetch_locked(state, repo_id, revision, progress)
        except KeyboardInterrupt:
            raise FetchInterrupted("interrupted; the partial download is kept in " + str(state.partial),
                                   "run the same command again: it resumes where it stopped") from None
    result.seconds = time.monotonic() - t0
    return result


@contextlib.contextmanager
def _locked(state: StateDir, timeout: float, progress: Progress) -> Iterator[None]:
    if env.lock_disabled():
        yield
        return
    from filelock import FileLock, Timeout

    lock = FileLock(state.lock_path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        progress.message(f"waiting for another fetcher to finish with {state.root} (up to {timeout:.0f} s)")
        try:
            lock.acquire(timeout=timeout, poll_interval=0.2)
        except Timeout:
            raise LockTimeoutError(
                f"another fetcher held the lock on {state.root} for more than {timeout:.0f} s",
                "wait for it, raise --lock-timeout (DINOV3_FETCHER_LOCK_TIMEOUT), or stop it; "
                "a killed fetcher's lock is released by the OS") from None
    try:
        yield
    finally:
        lock.release()


def _offline_error(root: Path, repo_id: str, revision: str) -> LocalEntryNotFoundError:
    manifest = StateDir(root).read_manifest()
    if manifest is None:
        why = "dino_root holds no checkpoint fetched by this tool"
    elif not manifest.matches(repo_id, revision):
        why = f"dino_root holds {manifest.repo_id}@{manifest.revision}, not {repo_id}@{revision}"
    else:
        why = "; ".join(str(p) for p in find_problems(root, manifest)[:3])
    partial = StateDir(root).partial
    kept = sum(f.stat().st_size for f in partial.glob("*/data")) if partial.is_dir() else 0
    extra = f"; {human_bytes(kept)} of partial downloads are kept" if kept else ""
    return LocalEntryNotFoundError(
        f"HF_HUB_OFFLINE is set and {root} is not a complete checkpoint of {repo_id}@{revision}: {why}{extra}",
        "unset HF_HUB_OFFLINE to download it (partial downloads resume)")


class _Run:
    """The state of one locked fetch: what is planned, where each file currently is."""

    def __init__(self, state: StateDir, snap: Snapshot, old: Manifest | None, transfer: Transfer | None = None,
                 head: HeadStart | None = None) -> None:
        self.state, self.snap, self.old, self.transfer, self.head = state, snap, old, transfer, head
        self.read_only = transfer is None  # a dry run: never rename, create or hash anything (see reusable)
        self.paths: dict[str, Path] = {}
        self.records: dict[str, FileRecord] = {}
        self.reuse_cache: dict[str, Path | None] = {}  # reusable()'s verdict per name: hash a file once
        self.fetched = 0
        self.resumed = 0
        self.lock = threading.Lock()  # get() may run in two threads (see _get_all)

    def remote(self, name: str) -> RemoteFile:
        rf = self.snap.files.get(name)
        if rf is None and name in (CONFIG, PREPROCESSOR):
            raise NotDinov3Error(f"{self.snap.repo_id} has no {name}: not a transformers DINOv3 checkpoint",
                                 "pick a DINOv3 repo ('dinov3-fetcher list' shows the official ones)")
        if rf is None:
            raise HubResponseError(f"{self.snap.repo_id} has no {name}",
                                   "a DINOv3 repo needs config.json, preprocessor_config.json and safetensors "
                                   "weights; check the repo id")
        return rf

    def staged_path(self, rf: RemoteFile) -> Path:
        """Where a verified download waits to be published: in this process's own folder (two fetchers
        without a working lock never move each other's files), named by content (a staged file is always
        exactly the file its name says, whichever run of whichever model left it there)."""
        return _staged_dir(self.state) / f"{rf.identity}.{rf.name}"

    def reusable(self, rf: RemoteFile) -> Path | None:
        """A complete copy of this exact file already on disk: staged (verified), or published per the manifest.

        A staged copy left by a fetcher that is gone is adopted (renamed into ours). A published copy is
        trusted by its size only when the manifest is complete: after a publish that stopped half-way the
        file under that name may still be the old one, so it is re-hashed (once per run: the verdict is
        cached). In a read-only run (dry run) nothing is renamed or hashed: a dead fetcher's staged copy is
        reported where it is, and a published file under an incomplete manifest counts as missing.
        """
        if rf.name not in self.reuse_cache:
            self.reuse_cache[rf.name] = self._reusable(rf)
        return self.reuse_cache[rf.name]

    def _reusable(self, rf: RemoteFile) -> Path | None:
        own = self.staged_path(rf)
        if own.is_file() and own.stat().st_size == rf.size:
            return own
        for other in self.state.staged.glob(f"*/{rf.identity}.{rf.name}"):
            if other.parent != own.parent and _owner_gone(other.parent) and other.stat().st_size == rf.size:
                if self.read_only:
                    return other
                with contextlib.suppress(OSError):
                    own.parent.mkdir(parents=True, exist_ok=True)
                    os.rename(other, own)
                    return own
        rec = self.old.files.get(rf.name) if self.old else None
        if rec is None or rec.size != rf.size or rec.git_oid != rf.git_oid or (rf.sha256 and rec.sha256 != rf.sha256):
            return None
        p = self.state.root / rf.name
        if not (p.is_file() and p.stat().st_size == rf.size):
            return None
        if self.old is not None and not self.old.complete and (self.read_only or sha256_file(p) != rec.sha256):
            return None
        return p

    def get(self, name: str) -> Path:
        from .transfer import Target

        rf = self.remote(name)
        check_filename(name)
        if (p := self.reusable(rf)) is not None:
            self.paths[name] = p
            rec = self.old.files.get(name) if self.old else None
            if rec is None or rec.size != rf.size or rec.git_oid != rf.git_oid:  # a staged file of a new version
                rec = FileRecord(rf.size, rf.sha256 or sha256_file(p), rf.git_oid)
            self.records[name] = rec
            return p
        if self.head and not rf.sha256 and (body := self.head.take_small(name, rf.git_oid)) is not None:
            return self._put_small(rf, body)
        target = Target(name, self.snap.url(name), rf.size, rf.identity, rf.sha256,
                        None if rf.sha256 else rf.git_oid)
        assert self.transfer is not None, "a dry run never downloads"
        done = self.head.take(target) if self.head else None
        if done is None:
            done = self.transfer.download(target)
        dest = self.staged_path(rf)
        self.transfer.finish(done, dest)
        with self.lock:
            self.fetched += done.fetched
            self.resumed += done.resumed_from
        self.paths[name] = dest
        self.records[name] = FileRecord(rf.size, done.sha256, rf.git_oid)
        return dest

    def _put_small(self, rf: RemoteFile, body: bytes) -> Path:
        """Stage a small file the head start already downloaded (and checked against rf's git blob id)."""
        assert self.transfer is not None
        progress = self.transfer.progress
        progress.start_file(rf.name, rf.size, 0)
        dest = self.staged_path(rf)
        atomic_write_bytes(dest, body)
        progress.advance(len(body))
        progress.end_file(rf.name)
        with self.lock:
            self.fetched += len(body)
        self.paths[rf.name] = dest
        self.records[rf.name] = FileRecord(rf.size, hashlib.sha256(body).hexdigest(), rf.git_oid)
        return dest

    def partial_bytes(self, rf: RemoteFile) -> int:
        """Bytes of this file's best resumable partial download: the folder the next claim would take (the
        public one, a dead fetcher's claim left by a SIGKILL, or ours), as ``Transfer.claim`` chooses."""
        from .transfer import missing_bytes, resumable

        folders = resumable(self.state.partial, rf.identity)
        return min(max([rf.size - missing_bytes(p, rf.size) for p in folders] + [0]), rf.size)


def _staged_dir(state: StateDir) -> Path:
    return state.staged / owner_tag()


def _owner_gone(folder: Path) -> bool:
    """Is the fetcher that owns this staged folder gone? On another host: untouched for a day."""
    return owner_gone(folder.name, folder, 86400)


def plan_files(run: _Run, weights: list[str]) -> list[PlannedFile]:
    out = []
    for name in weights + [n for n in OPTIONAL if n in run.snap.files]:
        rf = run.remote(name)
        reuse = run.reusable(rf) is not None
        out.append(PlannedFile(name, rf.size, rf.size if reuse else run.partial_bytes(rf), reuse))
    return out


@dataclass
class DryRun:
    root: Path
    repo_id: str
    revision: str
    commit: str
    files: list[PlannedFile]
    free: int

    @property
    def to_download(self) -> int:
        return sum(f.size - f.present for f in self.files)

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.root), "repo_id": self.repo_id, "revision": self.revision, "commit": self.commit,
                "bytes_to_download": self.to_download, "bytes_present": sum(f.present for f in self.files),
                "free_bytes": self.free,
                "files": [{"name": f.name, "size": f.size, "present": f.present, "reuse": f.reuse}
                          for f in self.files]}


def plan(dino_root: str | os.PathLike[str], model_name: str = DEFAULT_MODEL, *,
         revision: str = DEFAULT_REVISION) -> DryRun:
    """What a fetch would download (one metadata request; writes nothing).

    Shards are taken from the repo listing (model-*-of-*.safetensors), since the index is not downloaded.

    Raises:
        the Hub errors of fetch_dinov3, and LocalEntryNotFoundError when offline.
    """
    from . import hub

    root = _root(dino_root)
    repo_id, revision = check_repo_id(model_name), check_revision(revision)
    if env.is_offline():
        raise LocalEntryNotFoundError("HF_HUB_OFFLINE is set: a dry run needs one request to the Hub",
                                      "unset HF_HUB_OFFLINE, or use 'dinov3-fetcher info' to see what is on disk")
    snap = hub.snapshot(repo_id, revision, hub.get_token())
    state = StateDir(root)
    run = _Run(state, snap, state.read_manifest())
    names = [n for n in (CONFIG, PREPROCESSOR) if n in snap.files]
    if SINGLE in snap.files:
        weights = [SINGLE]
    else:
        weights = [n for n in (INDEX,) if n in snap.files] + sorted(
            n for n in snap.files if n.startswith("model-") and n.endswith(".safetensors"))
    existing = root
    while not existing.exists():
        existing = existing.parent
    return DryRun(root, repo_id, revision, snap.commit, plan_files(run, names + weights),
                  shutil.disk_usage(existing).free)


def _hub_json(run: _Run, name: str) -> dict[str, Any]:
    """A JSON file of the repo (verified against the Hub's hash), parsed; a broken one is the Hub's fault."""
    path = run.get(name)
    try:
        return read_json_object(path)
    except ValueError as exc:
        raise HubResponseError(f"{run.snap.repo_id}'s {name} {exc}",
                               "the repo (or HF_ENDPOINT's copy of it) is broken; pick another revision or "
                               "report it to the repo's owner") from None


def _get_all(run: _Run, names: list[str]) -> None:
    """``run.get`` each weight file, two at a time, so that one file's sha256 tail overlaps the next transfer.

    A file's hasher still has its last pieces to hash after the final byte arrives; one file after another,
    that tail (~0.1 s per 200 MB shard on 2 cores, with the other core idle) added up to a third more time
    for a sharded checkpoint. Files with the same content never run together (they share a partial folder).
    The first error stops the other download and is raised; Ctrl-C stops both and keeps their progress.
    """
    from .transfer import FILES_AT_ONCE

    assert run.transfer is not None
    transfer = run.transfer
    identities = [run.remote(n).identity for n in names]
    if len(names) < 2 or len(set(identities)) < len(identities):
        for name in names:
            run.get(name)
        return
    todo, lock = list(names), threading.Lock()
    errors: list[BaseException] = []

    def worker() -> None:
        while True:
            with lock:
                if errors or not todo:
                    return
                name = todo.pop(0)
            try:
                run.get(name)
            except BaseException as exc:
                with lock:
                    errors.append(exc)
                transfer.cancel.set()
                return

    threads = [threading.Thread(target=worker, daemon=True, name=f"file-{i}") for i in range(FILES_AT_ONCE)]
    for t in threads:
        t.start()
    try:
        for t in threads:
            while t.is_alive():
                t.join(0.2)
    except KeyboardInterrupt:
        transfer.cancel.set()
        for t in threads:
            while t.is_alive():
                t.join(0.2)
        raise
    if errors:  # the cause, not the FetchInterrupted that the cancel gave the other download
        raise next((e for e in errors if not isinstance(e, FetchInterrupted)), errors[0])


def _check_space(state: StateDir, planned: list[PlannedFile]) -> None:
    needed = sum(p.size - p.present for p in planned)
    free = shutil.disk_usage(state.path).free
    if needed + SPACE_MARGIN > free:
        raise DiskSpaceError(
            f"not enough disk space in {state.root}: {human_bytes(needed)} still to download, "
            f"{human_bytes(free)} free", "free some space or point dino_root at a bigger disk",
            needed=needed, free=free)


def _fetch_locked(state: StateDir, repo_id: str, revision: str, progress: Progress) -> FetchResult:
    from . import hub
    from .headstart import HeadStart
    from .http import HttpPool
    from .transfer import Settings, Transfer

    token = hub.get_token()
    hub.load_api()
    settings = Settings.from_env()
    ep = env.endpoint()
    pool = HttpPool(settings.timeout, hub.user_agent(), token, ep)

    def raise_status(status: int, headers: dict[str, str], body: bytes, url: str) -> Any:
        hub.raise_for_file_status(status, headers, body, url, repo_id, revision)

    transfer = Transfer(settings, pool, state.partial, state.root, progress, raise_status)
    # The weights start flowing now; huggingface_hub's listing (below) decides whether they are kept.
    old = state.read_manifest()
    head = HeadStart(Transfer(settings, pool, state.partial, state.root, progress, raise_status), state, old,
                     repo_id, revision, ep, transfer.cancel)
    head.start()
    try:
        snap = hub.snapshot(repo_id, revision, token)
        run = _Run(state, snap, old, transfer, head)
        cfg = _hub_json(run, CONFIG)
        if reason := config_problem(cfg) or registry_mismatch(repo_id, cfg):
            raise NotDinov3Error(f"{repo_id} is not a usable DINOv3 checkpoint: {reason}",
                                 "pick a DINOv3 repo ('dinov3-fetcher list' shows the official ones)")
        run.get(PREPROCESSOR)
        if SINGLE in snap.files:
            weights = [SINGLE]
        elif INDEX in snap.files:
            weights = shards_from_index(_hub_json(run, INDEX))
        else:
            raise NotDinov3Error(f"{repo_id} has no safetensors weights ({SINGLE} or {INDEX})",
                                 "pick a repo with safetensors weights")
        planned = plan_files(run, weights)
        _check_space(state, planned)
        progress.total = sum(p.size for p in planned)
        progress.done += sum(p.size for p in planned if p.reuse)  # += : head-start bytes are counted already
        _get_all(run, [p.name for p in planned if p.name in weights])
        for p in planned:
            if p.name not in weights:
                run.get(p.name)
        tensors: dict[str, TensorInfo] = {}
        for name in weights:
            try:
                tensors.update(read_header(run.paths[name]))
            except SafetensorsError as exc:
                raise HubResponseError(f"{repo_id}: {exc}", "the repo's weights are broken; report it") from None
        if reason := tensor_mismatch(cfg, tensors):
            raise NotDinov3Error(f"{repo_id}'s weights disagree with its config: {reason}",
                                 "the repo is inconsistent; pick another revision or repo")
    finally:
        head.stop()
        progress.close()
        pool.close()
    manifest = Manifest(repo_id, revision, snap.commit, run.records, __version__)
    old = run.old
    if old is not None and old.complete and old.commit == snap.commit and old.files == run.records:
        # --update found nothing new: the files are the ones verified before, so their checks still hold.
        manifest.verified_at, manifest.verified_deep_at = old.verified_at, old.verified_deep_at
    _publish(state, manifest, run.paths, old)
    _drop_stale_partials(state)
    return FetchResult(state.root, repo_id, revision, snap.commit, run.fetched == 0 and run.resumed == 0,
                       run.records, run.fetched, run.resumed, requests_made=True)


def _publish(state: StateDir, manifest: Manifest, paths: dict[str, Path], old: Manifest | None) -> None:
    """Move the verified files into dino_root together; the manifest says 'incomplete' until all are there."""
    root = state.root
    manifest.complete = False
    state.write_manifest(manifest)
    for name, src in paths.items():
        if src != root / name:
            os.replace(src, root / name)
    # Only what we put there: the old manifest's files. Without a trustworthy list (none, or the incomplete
    # one of a publish that stopped half-way), also the standard weight names transformers would load in
    # place of ours; any other file (a user's model_student.safetensors) is left alone.
    stale = set(old.files) if old else set()
    if old is None or not old.complete:
        stale |= {p.name for p in root.iterdir() if _STANDARD_WEIGHTS.fullmatch(p.name)}
    for name in stale - set(paths):
        with contextlib.suppress(OSError, ValueError):
            (root / check_filename(name)).unlink()
    manifest.complete = True
    state.write_manifest(manifest)


def _drop_stale_partials(state: StateDir) -> None:
    """After a successful fetch, partial downloads of other contents (changed files, other models) go."""
    from .transfer import abandoned_or_unclaimed

    for p in state.partial.iterdir():
        if abandoned_or_unclaimed(p):
            shutil.rmtree(p, ignore_errors=True)
    for p in state.staged.iterdir() if state.staged.is_dir() else ():
        if p == _staged_dir(state) or not p.is_dir() or _owner_gone(p):  # never another live fetcher's files
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
