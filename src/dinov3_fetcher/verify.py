"""``verify``: check dino_root offline against its manifest; ``deep`` re-hashes every byte."""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from .env import lock_disabled
from .hashing import read_range
from .progress import Progress
from .state import Manifest, StateDir
from .validate import Problem, find_problems

__all__ = ["FileCheck", "VerifyReport", "sha256_file", "verify_dinov3"]


@dataclass
class FileCheck:
    name: str
    size: int
    ok: bool
    detail: str

    def __str__(self) -> str:  # as error messages show it: "model.safetensors: sha256 ... differs ..."
        return f"{self.name}: {self.detail}"


@dataclass
class VerifyReport:
    root: Path
    manifest: Manifest | None
    deep: bool
    files: list[FileCheck] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems and all(f.ok for f in self.files)


def sha256_file(path: Path, progress: Progress | None = None) -> str:
    """sha256 of a file, read in 8 MiB blocks into one reused buffer (hashlib releases the GIL on them).

    Read, not memory-mapped like a download in progress (``hashing``): these are the user's files, and an
    I/O error or a truncation by another process while a mapping is read kills the process with SIGBUS.
    """
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        read_range(f.fileno(), 0, os.fstat(f.fileno()).st_size, [h], progress.advance if progress else None)
    return h.hexdigest()


def _record_verified(state: StateDir, checked: Manifest, deep: bool) -> None:
    """Write the time of a passing verification into the manifest, unless a fetch changed or holds it meanwhile.

    Best effort: a read-only dino_root, a fetcher holding the lock, or a manifest that is no longer the one
    that was checked (a fetch published in between) all mean: record nothing, and never overwrite.
    """
    from filelock import FileLock, Timeout

    lock = FileLock(state.lock_path)
    if not lock_disabled():
        try:
            lock.acquire(timeout=0)
        except (Timeout, OSError):
            return
    try:
        current = state.read_manifest()
        if current is None or _identity(current) != _identity(checked):
            return
        now = time.time()
        current.verified_at = now
        if deep:
            current.verified_deep_at = now
        with contextlib.suppress(OSError):  # a read-only dino_root can still be verified
            state.write_manifest(current)
    finally:
        if lock.is_locked:
            lock.release()


def _identity(m: Manifest) -> tuple[object, ...]:
    return m.repo_id, m.revision, m.commit, m.files, m.complete, m.fetched_at


def verify_dinov3(root: Path, *, deep: bool = False, progress: Progress | None = None) -> VerifyReport:
    """Check ``root`` without network: structure and headers always; every sha256 when ``deep``.

    Records the time of a passing verification in the manifest. Never raises for a bad directory.
    """
    t0 = time.monotonic()
    state = StateDir(root)
    manifest = state.read_manifest()
    report = VerifyReport(root, manifest, deep)
    report.problems = find_problems(root, manifest)
    if manifest is None:
        if root.is_dir():  # else find_problems' "is not a folder" says it all: there is no manifest to look for
            report.problems.insert(0, Problem("manifest.json", "is missing: dino_root was not fetched by this "
                                              "tool (run a fetch to record one)"))
    else:
        bad = {p.file for p in report.problems}
        if progress is not None and deep:
            progress.total = sum(r.size for r in manifest.files.values())
        for name, rec in sorted(manifest.files.items()):
            path = root / name
            if name in bad or not path.is_file():
                report.files.append(FileCheck(name, rec.size, False, "missing or wrong size"))
                continue
            if not deep:
                report.files.append(FileCheck(name, rec.size, True, "size ok"))
                continue
            digest = sha256_file(path, progress)
            ok = digest == rec.sha256
            report.files.append(FileCheck(name, rec.size, ok, "sha256 ok" if ok else
                                          f"sha256 {digest[:12]}... differs from the manifest's {rec.sha256[:12]}..."))
        if report.ok:
            _record_verified(state, manifest, deep)
    if progress is not None:
        progress.close()
    report.seconds = time.monotonic() - t0
    return report
