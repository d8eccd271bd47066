"""One fetch's plan: for each file of the snapshot, whether a complete copy is already on disk, how much of a
partial one is, and where each file is once verified. Also the dry run, which plans and writes nothing.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._errors import HubResponseError, LocalEntryNotFoundError, NotDinov3Error
from ._hashing import git_blob_hasher, hash_file, sha256_file
from ._layout import (
    CONFIG,
    PREPROCESSOR,
    check_filename,
    files_to_publish,
    read_json_object,
    weight_files,
)
from ._manifest import FileRecord, Manifest
from ._state import StateDir, on_disk, record_for

if TYPE_CHECKING:
    from ._config import FetchRequest
    from ._sources.source import RemoteFile, Snapshot, Source
    from ._transfer import Transfer

__all__ = ["DryRun", "PlannedFile", "Run", "dry_run"]

_GIT_CHECK_MAX = 16 * 1024 * 1024  # a published file this small may be re-hashed to compare its git blob id


@dataclass
class PlannedFile:
    """One file of a fetch and how much of it is already on disk."""
    name: str
    size: int
    present: int  # bytes already on disk (a complete file reused, or a partial download)
    reuse: bool  # the complete file is already in dino_root or staged


class Run:
    """The state of one locked fetch: what the snapshot holds, and where each file currently is."""

    def __init__(self, state: StateDir, source: Source, snap: Snapshot, old: Manifest | None,
                 transfer: Transfer | None = None, *, repair: bool = False) -> None:
        self.state, self.source, self.snap, self.old, self.transfer = state, source, snap, old, transfer
        self.repair = repair  # re-hash every published file instead of trusting its size (--repair)
        self.read_only = transfer is None  # a dry run: never rename, create or hash anything (see reusable)
        self.paths: dict[str, Path] = {}
        self.records: dict[str, FileRecord] = {}
        self.reuse_cache: dict[str, Path | None] = {}  # reusable()'s verdict per name: hash a file once
        self.record_cache: dict[str, FileRecord | None] = {}  # record()'s verdict per name
        self.adopted: dict[str, str] = {}  # files found in dino_root, not ours, but the listed bytes: name -> sha256
        self.fetched = 0
        self.resumed = 0
        self.lock = threading.Lock()  # fetch_file() runs in several threads (see _fetch._fetch_weights)

    def remote(self, name: str) -> RemoteFile:
        """The listed file ``name``; NotDinov3Error for a missing config, HubResponseError otherwise."""
        rf = self.snap.files.get(name)
        if rf is None and name in (CONFIG, PREPROCESSOR):
            raise NotDinov3Error(f"{self.snap.repo_id} has no {name}: not a transformers DINOv3 checkpoint",
                                 "pick a DINOv3 repo ('dinov3-fetcher list' shows the official ones)")
        if rf is None:
            raise HubResponseError(f"{self.snap.repo_id} has no {name}",
                                   "a DINOv3 repo needs config.json, preprocessor_config.json and safetensors "
                                   "weights; check the repo id")
        return rf

    def reusable(self, rf: RemoteFile) -> Path | None:
        """A complete copy of this exact file already on disk: staged (verified), or published per the manifest.

        A staged copy left by a fetcher that is gone is adopted. A published copy is trusted by its size only
        when the manifest is complete: after a publish that stopped half-way the file under that name may
        still be the old one, so it is re-hashed (once per run), as is every file in a repair; one that
        ``verify --deep`` marked damaged is never reused. In a read-only run (dry run) nothing is
        renamed or hashed: a published file under an incomplete manifest counts as missing. A file the user
        put there with exactly the listed bytes is reused once ``check_foreign`` adopted it.
        """
        if rf.name not in self.reuse_cache:
            with on_disk(self.state.root):
                self.reuse_cache[rf.name] = self._reusable(rf)
        return self.reuse_cache[rf.name]

    def record(self, rf: RemoteFile) -> FileRecord | None:
        """The old manifest's record of this exact file (see ``_state.record_for``), once per run.

        A file listed with a git id only (the Hub's regular files) whose record came from a source that lists
        sha256 only (ModelScope) has no git id to compare: the published file decides, if small, by its git
        blob id and its sha256 (both must match: the listing's id, and the manifest's hash).
        """
        if rf.name in self.record_cache:
            return self.record_cache[rf.name]
        rec = record_for(self.old, rf.name, rf.size, rf.sha256, rf.git_oid)
        old = self.old.files.get(rf.name) if self.old is not None else None
        if (rec is None and old is not None and old.git_oid is None and rf.git_oid and not rf.sha256
                and old.size == rf.size <= _GIT_CHECK_MAX):
            p = self.state.root / rf.name
            sha, git = hashlib.sha256(), git_blob_hasher(rf.size)  # both from one read
            try:
                read = hash_file(p, [sha, git]) if p.is_file() and p.stat().st_size == rf.size else 0
            except OSError:
                read = 0
            if read == rf.size and git.hexdigest() == rf.git_oid and sha.hexdigest() == old.sha256:
                rec = FileRecord(old.size, old.sha256, rf.git_oid)
        self.record_cache[rf.name] = rec
        return rec

    def _reusable(self, rf: RemoteFile) -> Path | None:
        if rf.name in self.adopted:
            return self.state.root / rf.name
        if (staged := self.state.find_staged(rf.identity, rf.name, rf.size, adopt=not self.read_only)) is not None:
            return staged
        rec = self.record(rf)
        if rec is None:
            return None
        p = self.state.root / rf.name
        if not (p.is_file() and p.stat().st_size == rf.size):
            return None
        if self.old is not None and rf.name in self.old.damaged:  # verify --deep found its bytes altered
            return None
        rehash = self.repair or (self.old is not None and not self.old.complete)
        if rehash and (self.read_only or sha256_file(p) != rec.sha256):
            return None
        return p

    def expected(self, name: str) -> FileRecord:
        """The record ``name`` will have once verified, as far as it is known before its bytes: the listing's, or
        for a copy on disk the manifest's (or the sha256 its adoption computed); sha256 "" when only the bytes
        will tell (a listing without sha256)."""
        rf = self.remote(name)
        rec = self.record(rf) if self.reusable(rf) is not None and name not in self.adopted else None
        return rec or FileRecord(rf.size, self.adopted.get(name) or rf.sha256 or "", rf.git_oid)

    def fetch_file(self, name: str) -> Path:
        """The verified file ``name``: reused from disk, or downloaded (resuming a partial) and staged."""
        from ._job import Target

        rf = self.remote(name)
        check_filename(name)
        if (p := self.reusable(rf)) is not None:
            self.paths[name] = p
            rec = self.record(rf) if name not in self.adopted else None
            if rec is None:
                with on_disk(self.state.root):
                    rec = FileRecord(rf.size, self.adopted.get(name) or rf.sha256 or sha256_file(p), rf.git_oid)
            self.records[name] = rec
            return p
        assert self.transfer is not None, "a dry run never downloads"
        target = Target(name, self.source.file_url(self.snap, name), rf.size, rf.identity, rf.sha256,
                        None if rf.sha256 else rf.git_oid)
        done = self.transfer.download(target)
        dest = self.state.staged_path(rf.identity, name)
        self.transfer.stage(done, dest)
        with self.lock:
            self.fetched += done.fetched
            self.resumed += done.resumed_from
        self.paths[name] = dest
        self.records[name] = FileRecord(rf.size, done.sha256, rf.git_oid)
        return dest

    def check_foreign(self, names: Collection[str]) -> None:
        """Refuse to replace or delete a file this tool did not put in dino_root (``StateDir.check_foreign``):
        ``names`` are the files the fetch would publish; one in dino_root that no manifest of ours records is
        adopted if its bytes are exactly the listed file, else refused.

        Raises:
            ConfigError: the conflicting files, and what to do.
        """
        listed = {n: FileRecord(rf.size, rf.sha256 or "", rf.git_oid) for n in names
                  if (rf := self.snap.files.get(n)) is not None}
        before = set(self.adopted)
        # the current manifest too: another fetcher (no working lock) may have published meanwhile
        self.state.check_foreign(names, listed, (self.old, self.state.read_manifest()), self.adopted)
        for name in set(self.adopted) - before:
            self.reuse_cache.pop(name, None)

    def fetch_json(self, name: str) -> dict[str, Any]:
        """A JSON file of the repo (verified against the listing), parsed; a broken one is the source's fault."""
        path = self.fetch_file(name)
        with on_disk(self.state.root):
            try:
                return read_json_object(path)
            except ValueError as exc:  # its bytes (an OSError goes to on_disk)
                raise HubResponseError(f"{self.snap.repo_id}'s {name} {exc}",
                                       "the repo (or the endpoint's copy of it) is broken; pick another revision "
                                       "or report it to the repo's owner") from None

    def plan(self, names: list[str]) -> list[PlannedFile]:
        """Each of ``names`` with what of it is already on disk."""
        out = []
        for name in names:
            rf = self.remote(name)
            reuse = self.reusable(rf) is not None
            present = rf.size if reuse else min(self.state.partial_bytes(rf.identity, rf.size), rf.size)
            out.append(PlannedFile(name, rf.size, present, reuse))
        return out


@dataclass
class DryRun:
    """What a fetch would download, as --dry-run shows it."""
    root: Path
    repo_id: str
    revision: str
    commit: str
    files: list[PlannedFile]
    free: int
    source: str = "hf"
    official: bool | None = None  # by the listing's sha256 of the weights: Meta's release or not (None: unknown)
    official_message: str = ""

    @property
    def to_download(self) -> int:
        """Bytes still to download."""
        return sum(f.size - f.present for f in self.files)

    def to_dict(self) -> dict[str, Any]:
        """The dry run as JSON-able data."""
        return {"path": str(self.root), "source": self.source, "repo_id": self.repo_id, "revision": self.revision,
                "commit": self.commit, "bytes_to_download": self.to_download,
                "bytes_present": sum(f.present for f in self.files), "free_bytes": self.free,
                "official": self.official, "official_check": self.official_message,
                "files": [{"name": f.name, "size": f.size, "present": f.present, "reuse": f.reuse}
                          for f in self.files]}


def dry_run(req: FetchRequest) -> DryRun:
    """What a fetch would download (one metadata request; writes nothing).

    Shards are taken from the repo listing (model-*-of-*.safetensors), since the index is not downloaded.

    Raises:
        the source errors of a fetch, and LocalEntryNotFoundError when offline.
    """
    from . import _env as env
    from ._sources import get_source

    if env.is_offline():
        raise LocalEntryNotFoundError("HF_HUB_OFFLINE is set: a dry run needs one request to the source",
                                      "unset HF_HUB_OFFLINE, or use 'dinov3-fetcher info' to see what is on disk")
    source = get_source(req.source)
    snap = source.snapshot(req.model, req.revision)
    state = StateDir(req.dino_root)
    run = Run(state, source, snap, state.read_manifest())
    names = [n for n in files_to_publish(snap.files, weight_files(snap.files) or []) if n in snap.files]
    from ._registry import check_official

    listed = {n: FileRecord(f.size, f.sha256) for n, f in snap.files.items() if f.sha256}
    check = check_official(req.model, listed)  # what the listing says the weights are, before any byte moves
    return DryRun(req.dino_root, req.model, req.revision, snap.commit, run.plan(names),
                  state.free_space(), source.name, check.official, check.message)
