"""What a fetch tells whoever follows it while it runs (the broadcast's sender on rank 0): a small typed seam.

The fetch (``_fetch.fetch(..., observer=...)``) calls three methods, from its own threads, and hands over plain
values only, so that the fetch never depends on who observes it:

- ``planned(plan)`` once the listing is read and the small files (config, preprocessor, index) are fetched and
  verified, before the weights' transfer: the commit, where it comes from, each file's expected record, the
  weights in download order, the files already verified on disk, an Event that stops the fetch, and whether
  the weights are Meta's release;
- ``started(name, size, sha256, download)`` as each weight file's download starts (the head start's too):
  ``download.fd`` is its data file (the same inode through the moves to staged and into dino_root) and every byte
  below ``download.hashed`` is on disk for good and has been hashed;
- ``verified(name, path)`` as each weight file is verified (downloaded and its hashes matched, or reused).

A method must return quickly: it runs inside the fetch.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ._manifest import FileRecord

__all__ = ["Download", "FetchObserver", "FetchPlan"]


@dataclass(frozen=True)
class FetchPlan:
    """A fetch's plan as ``planned`` receives it."""

    commit: str
    source: str  # the source's name ("hf", "modelscope"), as the manifest records it
    endpoint: str  # where the source was reached, for messages (no credentials)
    records: dict[str, FileRecord]  # every file fetched so far and every weight; a weight's sha256 is "" when
    # only its bytes will tell (a listing without sha256)
    weights: list[str]  # in the order the fetch downloads them
    later: dict[str, FileRecord]  # the optional files (README, LICENSE) as listed (sha256 "" when the listing
    # gives only the git id): fetched beside the weights, verified when it returns
    held: dict[str, Path]  # the files verified on disk already (config, preprocessor, index)
    cancel: threading.Event  # set: every download stops at once and the fetch raises FetchInterrupted
    official: bool | None  # by ``records``: the weights are Meta's release (True), are not (False), as the manifest
    # will say (``_registry.check_official``); None: unknown, or a weight's sha256 is not listed
    site_revision: str = ""  # as the manifest records it (ModelScope: the newest commit of its listing)


class Download(Protocol):
    """One weight file's download while it runs."""

    @property
    def fd(self) -> int:
        """Its data file, open for reading and writing (owned by the download: duplicate it to keep it)."""

    @property
    def hashed(self) -> int:
        """Every byte below this is on disk for good and has been hashed."""


class FetchObserver(Protocol):
    """Told of the fetch's plan, of each weight file's download as it starts, and of each verified weight."""

    def planned(self, plan: FetchPlan) -> None: ...

    def started(self, name: str, size: int, sha256: str | None, download: Download) -> None: ...

    def verified(self, name: str, path: Path) -> None: ...
