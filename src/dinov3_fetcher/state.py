"""What dino_root holds, as recorded by us: the manifest and the state folder's layout.

dino_root/
  config.json, preprocessor_config.json, model.safetensors ...   the checkpoint, as transformers loads it
  .dinov3-fetcher/
    manifest.json     repo, requested revision, resolved commit, each file's size and sha256, tool version
    lock              the inter-process lock (advisory; correctness never depends on it)
    partial/          resumable downloads, one folder per file content (named by its hash)
    staged/           files that were verified and wait to be published together

The manifest is written last and atomically; while a publish is under way it says ``complete: false``,
so a crash in the middle never leaves a directory that looks valid with files of two models.
"""

from __future__ import annotations

import json
import os
import re
import socket
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "HOST",
    "SPACE_MARGIN",
    "FileRecord",
    "Manifest",
    "StateDir",
    "atomic_write_bytes",
    "is_commit",
    "is_sha256",
    "owner_gone",
    "owner_tag",
    "pid_alive",
]

STATE_DIRNAME = ".dinov3-fetcher"
MANIFEST_FORMAT = 1
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
SPACE_MARGIN = 16 * 1024 * 1024  # free space left over after a download, on top of what it needs


HOST = socket.gethostname().replace(".", "_")  # no dots: claim and staged folders are named <...>.<host>.<pid>


def owner_tag() -> str:
    """This process as it names the partial and staged folders it owns: ``<host>.<pid>``."""
    return f"{HOST}.{os.getpid()}"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owner_gone(tag: str, touched: Path, stale_after: float) -> bool:
    """Is the fetcher named by ``tag`` (``<host>.<pid>``) gone? On this host: its pid is dead. On another
    host (a shared filesystem): ``touched`` has not changed for ``stale_after`` seconds, or is gone."""
    host, _, pid = tag.rpartition(".")
    if not pid.isdigit() or "." in host:
        return False
    if host == HOST:
        return not pid_alive(int(pid))
    try:
        return time.time() - touched.stat().st_mtime > stale_after
    except OSError:
        return True


def is_commit(revision: str) -> bool:
    return bool(_COMMIT.match(revision))


def is_sha256(value: str) -> bool:
    return bool(_SHA256.match(value))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old content or the new one, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class FileRecord:
    size: int
    sha256: str
    git_oid: str | None = None  # the Hub's blob id (git sha1 of the file, or of its LFS pointer)


@dataclass
class Manifest:
    repo_id: str
    revision: str  # as requested: branch, tag or commit
    commit: str  # as resolved by the Hub
    files: dict[str, FileRecord]
    tool_version: str
    fetched_at: float = field(default_factory=time.time)
    complete: bool = True
    verified_at: float | None = None
    verified_deep_at: float | None = None
    format: int = MANIFEST_FORMAT

    def to_json(self) -> bytes:
        data = asdict(self)
        return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Manifest:
        data: Any = json.loads(raw)
        if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
            raise ValueError("unknown manifest format")
        files = {str(k): FileRecord(int(v["size"]), str(v["sha256"]), v.get("git_oid"))
                 for k, v in data["files"].items()}
        return cls(
            repo_id=str(data["repo_id"]),
            revision=str(data["revision"]),
            commit=str(data["commit"]),
            files=files,
            tool_version=str(data.get("tool_version", "")),
            fetched_at=float(data.get("fetched_at", 0.0)),
            complete=bool(data.get("complete", False)),
            verified_at=data.get("verified_at"),
            verified_deep_at=data.get("verified_deep_at"),
        )

    def matches(self, repo_id: str, revision: str) -> bool:
        """Is this the checkpoint asked for? A commit must equal the resolved one; a name the requested one."""
        if not self.complete or self.repo_id.lower() != repo_id.lower():
            return False
        return self.commit == revision if is_commit(revision) else self.revision == revision


class StateDir:
    """Paths inside dino_root's state folder."""

    def __init__(self, dino_root: Path) -> None:
        self.root = dino_root
        self.path = dino_root / STATE_DIRNAME
        self.manifest_path = self.path / "manifest.json"
        self.lock_path = self.path / "lock"
        self.partial = self.path / "partial"
        self.staged = self.path / "staged"

    def read_manifest(self) -> Manifest | None:
        """The manifest, or None when absent or unreadable (an unreadable one is treated as absent)."""
        try:
            return Manifest.from_json(self.manifest_path.read_bytes())
        except (OSError, ValueError, KeyError, TypeError, RecursionError):
            return None

    def write_manifest(self, manifest: Manifest) -> None:
        atomic_write_bytes(self.manifest_path, manifest.to_json())

    def ensure(self) -> None:
        for p in (self.partial, self.staged):
            p.mkdir(parents=True, exist_ok=True)
