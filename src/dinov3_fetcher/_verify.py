"""``verify``: check dino_root offline against its manifest; ``deep`` re-hashes every byte."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

from ._hashing import sha256_file
from ._manifest import Manifest
from ._progress import Progress
from ._state import StateDir
from ._validate import Problem, find_problems

__all__ = ["FileCheck", "VerifyReport", "verify_dinov3"]


@dataclass
class FileCheck:
    """verify's verdict on one file."""
    name: str
    size: int
    ok: bool
    detail: str

    def __str__(self) -> str:  # as error messages show it: "model.safetensors: sha256 ... differs ..."
        return f"{self.name}: {self.detail}"


@dataclass
class VerifyReport:
    """What verify found."""
    root: Path
    manifest: Manifest | None
    deep: bool
    files: list[FileCheck] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """Did every check pass?"""
        return not self.problems and all(f.ok for f in self.files)


def _record_verified(state: StateDir, checked: Manifest, deep: bool, damaged: list[str] | None = None) -> None:
    """Write the time of a passing verification into the manifest, or with ``damaged`` the files a deep one
    found altered (a fetch re-downloads them), unless a fetch changed or holds the manifest meanwhile.

    Best effort: a read-only dino_root, a fetcher holding the lock, or a manifest that is no longer the one
    that was checked (a fetch published in between) all mean: record nothing, and never overwrite.
    """
    with state.locked_if_free() as locked:
        current = state.read_manifest() if locked else None
        if current is None or _identity(current) != _identity(checked):
            return
        if damaged:
            current.damaged = sorted(set(damaged))
        else:
            now = time.time()
            current.verified_at = now
            if deep:
                current.verified_deep_at, current.damaged = now, []
        with contextlib.suppress(OSError):  # a read-only dino_root can still be verified
            state.write_manifest(current)


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
    # A deep check re-hashes: it does not take an earlier deep check's damage marks for granted (it may clear them).
    report.problems = find_problems(root, dataclasses.replace(manifest, damaged=[]) if deep and manifest else manifest)
    if manifest is None:
        if root.is_dir():  # else find_problems' "is not a folder" says it all: there is no manifest to look for
            report.problems.insert(0, Problem("manifest.json", "is missing: dino_root was not fetched by this "
                                              "tool (run a fetch to record one)"))
    else:
        bad = {p.file for p in report.problems}
        damaged: list[str] = []
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
            if not ok:
                damaged.append(name)
            report.files.append(FileCheck(name, rec.size, ok, "sha256 ok" if ok else
                                          f"sha256 {digest[:12]}... differs from the manifest's {rec.sha256[:12]}..."))
        if report.ok:
            _record_verified(state, manifest, deep)
        elif damaged:
            _record_verified(state, manifest, deep, damaged)
    if progress is not None:
        progress.close()
    report.seconds = time.monotonic() - t0
    return report
