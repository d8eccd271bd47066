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
    # ModelScope: the newest commit of the site's listing (a revision the site takes, for --revision); "" on the
    # Hub, whose ``commit`` is already one.
    site_revision: str = ""
    format: int = MANIFEST_FORMAT

    def to_json(self) -> bytes:
        """The manifest as the bytes of manifest.json."""
        data = asdict(self)
        return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Manifest:
        """Parse manifest.json; ValueError (its text says what is wrong) for anything this tool did not write:
        not JSON, another format, a field of the wrong type, a time that is not one."""
        from ._userfile import parse_json

        data: Any = parse_json(raw)
        if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
            raise ValueError("it is not a manifest of this format")
        files = data.get("files")
        if not isinstance(files, dict):
            raise ValueError("files is not an object")
        records = {}
        for name, rec in files.items():
            if not isinstance(rec, dict) or not _count(rec.get("size")) or not isinstance(rec.get("sha256"), str) \
                    or not isinstance(rec.get("git_oid"), str | None):
                raise ValueError(f"the record of {name!r} is not a size and a sha256")
            records[name] = FileRecord(rec["size"], rec["sha256"], rec.get("git_oid"))
        for key in ("repo_id", "revision", "commit"):
            if not isinstance(data.get(key), str):
                raise ValueError(f"{key} is not a string")
        for key in ("tool_version", "source", "endpoint", "site_revision"):
            if not isinstance(data.get(key, ""), str):
                raise ValueError(f"{key} is not a string")
        return cls(
            repo_id=data["repo_id"],
            revision=data["revision"],
            commit=data["commit"],
            files=records,
            tool_version=data.get("tool_version", ""),
            source=data.get("source", "hf"),
            endpoint=data.get("endpoint", ""),
            official=data["official"] if isinstance(data.get("official"), bool) else None,
            fetched_at=_time(data, "fetched_at", 0.0),
            complete=data.get("complete") is True,
            verified_at=_time(data, "verified_at", None),
            verified_deep_at=_time(data, "verified_deep_at", None),
            damaged=_names(data.get("damaged")),
            previous=_names(data.get("previous")),
            site_revision=data.get("site_revision", ""),
        )

    def matches(self, repo_id: str, revision: str, source: str | None = None) -> bool:
        """Is this the checkpoint asked for? A commit must equal the resolved one (or the commit that was asked
        for: a commit's files never change, and ModelScope's pinned id is a digest of its listing, not a commit); a
        name the requested one; and, when ``source`` is given, it came from that source (a revision name means
        nothing on another)."""
        if not self.complete or self.repo_id.lower() != repo_id.lower():
            return False
        if source is not None and self.source != source:
            return False
        return revision in (self.commit, self.revision) if is_commit(revision) else self.revision == revision




_LAST_TIME = 253402300799.0  # 9999-12-31 23:59:59 UTC: the last second a date can show


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _time(data: dict[str, Any], key: str, default: float | None) -> Any:
    """``data[key]`` as seconds since the epoch (``default`` when absent or null); ValueError for anything else."""
    value = data.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= _LAST_TIME:
        raise ValueError(f"{key} is not a time ({str(value)[:40]!r})")
    return float(value)


def _names(value: Any) -> list[str]:
    """A list of file names from the manifest (anything else: none)."""
    return [str(v) for v in value] if isinstance(value, list) else []
