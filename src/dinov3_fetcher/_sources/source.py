"""What a source is: the ``Source`` interface every hub implements, and the snapshot of a repo it answers.

A source answers four questions and nothing else: which pinned id a revision is now (``snapshot``), which
files it holds with their sizes and hashes (``Snapshot.files``), where one file's bytes are and which headers
go with them (``file_url``, ``auth``), and what a failed answer means for the user (``raise_for_status``).
Everything else (resume, verification, publishing) is the same whichever source the bytes come from.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn, Protocol

if TYPE_CHECKING:
    import threading

    from .._http import Auth
    from .._job import Target
    from .._manifest import Manifest
    from .._transfer import Downloaded, Transfer

__all__ = ["EarlyBytes", "RemoteFile", "Snapshot", "Source"]


@dataclass(frozen=True)
class RemoteFile:
    """One file of a snapshot: its size and the hash that its bytes must have."""
    name: str
    size: int
    sha256: str | None  # the content's sha256 when the source lists it (Hub LFS files, every ModelScope file)
    git_oid: str | None = None  # the Hub's git blob id (of the file, or of its LFS pointer)

    @property
    def identity(self) -> str:
        """A content address: two files with the same identity have the same bytes."""
        return self.sha256 or self.git_oid or ""


@dataclass(frozen=True)
class Snapshot:
    """A revision of a repo as a source lists it, pinned to one id."""
    source: str  # "hf" or "modelscope"
    endpoint: str  # the source's base URL, without a trailing slash
    repo_id: str
    revision: str  # as requested
    commit: str  # the pinned id the revision resolved to (40 hex on the Hub)
    files: Mapping[str, RemoteFile]
    # A revision the site itself takes for this state, where ``commit`` is not one (ModelScope: the commit asked
    # for, else the newest commit among the listed files); "" when ``commit`` is one, or none is known.
    site_revision: str = ""


class EarlyBytes(Protocol):
    """Downloads a source starts before its listing is known (see _headstart); the transfer asks it first."""

    def start(self) -> None: ...

    def take(self, target: Target) -> Downloaded | None: ...

    def stop(self) -> None: ...


class Source(Protocol):
    """A hub the files come from (see the module docstring)."""
    name: str
    endpoint: str
    endpoint_var: str  # the environment variable that sets the endpoint, for error hints

    def user_agent(self) -> str:
        """The User-Agent of every request for this source."""

    def snapshot(self, repo_id: str, revision: str) -> Snapshot:
        """Resolve ``revision`` and list the files. Raises the FetcherError that says what went wrong."""

    def file_url(self, snap: Snapshot, name: str) -> str:
        """The URL whose GET (redirects followed) answers the file's bytes, Range honoured or not."""

    def auth(self) -> Auth | None:
        """The credential for the endpoint's origin, or None (anonymous)."""

    def raise_for_status(self, status: int, headers: Mapping[str, str], body: bytes, url: str,
                         repo_id: str, revision: str) -> NoReturn:
        """Turn a failed file answer into the FetcherError that explains it."""

    def early(self, transfer: Transfer, old: Manifest | None, repo_id: str, revision: str,
              cancel: threading.Event) -> EarlyBytes | None:
        """Downloads to start while ``snapshot`` is under way, or None (the source has no such shortcut)."""
