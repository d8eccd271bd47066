"""The manifest: what dino_root holds, as this tool recorded it (``.dinov3-fetcher/manifest.json``).

Repo, requested revision, the pinned commit it resolved to, each file's size and sha256, where it came from,
and the tool version. Written last and atomically; ``complete: false`` while a publish is under way, so a
crash in the middle never leaves a folder that looks valid with files of two models.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from ._ids import is_commit

__all__ = ["FileRecord", "Manifest"]

MANIFEST_FORMAT = 1


@dataclass(frozen=True)
class FileRecord:
    """One published file: its size and sha256 (and the Hub's git id, when it listed one)."""
    size: int
    sha256: str
    git_oid: str | None = None  # the Hub's blob id (git sha1 of the file, or of its LFS pointer)


@dataclass
class Manifest:
    """What dino_root holds, as this tool published it."""
    repo_id: str
    revision: str  # as requested: branch, tag or commit
    commit: str  # the pinned id the revision resolved to (the Hub's commit)
    files: dict[str, FileRecord]
    tool_version: str
    source: str = "hf"  # where the bytes came from: "hf" (the Hub or a mirror of it) or "modelscope"
    endpoint: str = ""  # that source's endpoint (no credentials)
    official: bool | None = None  # the weights are Meta's release (True), are not (False), unknown (None)
    fetched_at: float = field(default_factory=time.time)
    complete: bool = True
    verified_at: float | None = None
    verified_deep_at: float | None = None
    # Files whose bytes ``verify --deep`` found altered: not trusted by their size, re-downloaded by a fetch.
    damaged: list[str] = field(default_factory=list)
    # While a publish is under way (complete false): the files the manifest it replaces listed, still ours.
    previous: list[str] = field(default_factory=list)
    format: int = MANIFEST_FORMAT

    def to_json(self) -> bytes:
        """The manifest as the bytes of manifest.json."""
        data = asdict(self)
        return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Manifest:
        """Parse manifest.json; ValueError, KeyError or TypeError for anything else."""
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
            source=str(data.get("source", "hf")),
            endpoint=str(data.get("endpoint", "")),
            official=data["official"] if isinstance(data.get("official"), bool) else None,
            fetched_at=float(data.get("fetched_at", 0.0)),
            complete=bool(data.get("complete", False)),
            verified_at=data.get("verified_at"),
            verified_deep_at=data.get("verified_deep_at"),
            damaged=_names(data.get("damaged")),
            previous=_names(data.get("previous")),
        )

    def matches(self, repo_id: str, revision: str, source: str | None = None) -> bool:
        """Is this the checkpoint asked for? A commit must equal the resolved one; a name the requested one;
        and, when ``source`` is given, it came from that source (a revision name means nothing on another)."""
        if not self.complete or self.repo_id.lower() != repo_id.lower():
            return False
        if source is not None and self.source != source:
            return False
        return self.commit == revision if is_commit(revision) else self.revision == revision




def _names(value: Any) -> list[str]:
    """A list of file names from the manifest (anything else: none)."""
    return [str(v) for v in value] if isinstance(value, list) else []
