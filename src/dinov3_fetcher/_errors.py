"""The exception hierarchy: every error a user can cause or meet, each with what to do next.

Each class is also a stdlib type where one fits (``except OSError`` still catches a full disk), carries
a one-line ``message`` and a ``hint`` (the fix), and an ``exit_code`` that the CLI returns. The table
of exit codes lives here, next to the classes, so that the CLI and the README cannot drift apart.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

from ._progress import human_bytes
from ._secrets import scrub

__all__ = [
    "AuthenticationError",
    "ConfigError",
    "DiskSpaceError",
    "FetchInterrupted",
    "FetcherError",
    "HubResponseError",
    "IntegrityError",
    "LoadError",
    "LocalEntryNotFoundError",
    "LockTimeoutError",
    "NetworkError",
    "NotDinov3Error",
    "RepositoryNotFoundError",
    "RevisionNotFoundError",
    "VerificationError",
]


class FetcherError(Exception):
    """Base of every error raised by dinov3-fetcher on purpose (``short``: its few words in the exit-code list).

    Attributes:
        message: what went wrong, one line, no secrets (scrubbed here: a token or a signed URL's query that
            reached it is hidden, so ``str(exc)`` is safe to log).
        hint: what to do about it, one line, scrubbed alike.
        exit_code: the CLI's exit status for this class (see the README's table).
    """

    exit_code = 1
    short = "error"

    def __init__(self, message: str, hint: str = "") -> None:
        self.message = scrub(message)
        self.hint = scrub(hint)
        super().__init__(self.one_line())

    def one_line(self) -> str:
        """The message and its fix as one line: what the CLI prints after 'error:'."""
        return f"{self.message} -> {self.hint}" if self.hint else self.message

    def __str__(self) -> str:
        return self.one_line()


class ConfigError(FetcherError, ValueError):
    """The pipeline config, a flag or an argument is unusable (missing file, bad JSON, bad dino_root...)."""

    exit_code = 3
    short = "config"


class AuthenticationError(FetcherError, PermissionError):
    """No token, a token the Hub rejects, or a gated repo whose access is not granted yet.

    ``status`` is 401 (no or invalid token) or 403 (token valid, access not granted yet).
    """

    exit_code = 4
    short = "auth"

    def __init__(self, message: str, hint: str = "", *, status: int | None = None) -> None:
        self.status = status
        super().__init__(message, hint)


class RepositoryNotFoundError(FetcherError, LookupError):
    """The repo id does not exist on the endpoint (or is private and the token cannot see it)."""

    exit_code = 5
    short = "repo"


class RevisionNotFoundError(FetcherError, LookupError):
    """The branch, tag or commit does not exist in the repo."""

    exit_code = 6
    short = "revision"


class NotDinov3Error(FetcherError, ValueError):
    """The repo's config.json does not describe a DINOv3 model, or its weights disagree with it."""

    exit_code = 7
    short = "not DINOv3"


class IntegrityError(FetcherError, ValueError):
    """Bytes that do not match the Hub's size or hash. The bad file was discarded, never published.

    ``file`` is the name of the file whose bytes were wrong, when it is one file's (None otherwise)."""

    exit_code = 8
    short = "integrity"

    def __init__(self, message: str, hint: str = "", *, file: str | None = None) -> None:
        self.file = file
        super().__init__(message, hint)


class HubResponseError(IntegrityError):
    """An answer from the Hub (listing, index, header) that is malformed or unsafe to act on."""


class DiskSpaceError(FetcherError, OSError):
    """Not enough free space in dino_root's filesystem (checked before downloading, or hit while writing), or that
    filesystem failed (an I/O error, a stale NFS handle: ``errno`` is then the filesystem's own)."""

    exit_code = 9
    short = "disk"

    def __init__(self, message: str, hint: str = "", *, needed: int | None = None, free: int | None = None):
        self.needed = needed
        self.free = free
        FetcherError.__init__(self, message, hint)
        self.errno = errno.ENOSPC


def disk_full(exc: OSError, folder: Path, doing: str, hint: str) -> OSError:
    """ENOSPC/EDQUOT met while ``doing`` (e.g. "writing model.safetensors") as a DiskSpaceError, the one message
    of a disk that filled up, with the free space of ``folder``'s filesystem (of its nearest existing parent);
    any other OSError as it is."""
    if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
        return exc
    existing = folder
    while not existing.is_dir() and existing != existing.parent:
        existing = existing.parent
    try:
        free = shutil.disk_usage(existing).free
    except OSError:
        free = 0
    return DiskSpaceError(f"the disk filled up while {doing} ({human_bytes(free)} free)", hint, free=free)


_TOO_LONG = "is longer than the system allows"
# Why a path cannot be a folder of dino_root, by errno: the path is wrong for it (exit 3, fix the path).
_NOT_A_FOLDER = {
    errno.ENOENT: "a folder on its path does not exist and cannot be created there (a folder of /proc or /sys, "
                  "or one removed while the fetch ran)",
    errno.ENOTDIR: "a folder on its path is a file",
    errno.ELOOP: "its path goes through a loop of symbolic links",
    errno.ENAMETOOLONG: f"its path (or a name in it) {_TOO_LONG}",
    errno.EINVAL: "its filesystem refuses the name (a character or a length it does not allow)",
    errno.EISDIR: "a name the fetch writes a file under is a folder",
    errno.EEXIST: "a name the fetch creates a folder under is taken by a file",
    errno.EXDEV: "it spans two filesystems where the fetch moves files",
    errno.EMLINK: "its folder holds as many entries as its filesystem allows",
    errno.ENOTEMPTY: "a folder the fetch replaces there is not empty",
    errno.ENOTSUP: "its filesystem does not support what the fetch does there",
}


def not_a_folder(code: int, *, names_fit: bool = False) -> str | None:
    """Why a path cannot be a folder of dino_root, by the errno that refused it (the path is wrong for it: exit 3,
    fix the path); None for an errno that says something else. ``names_fit``: every name in the path is known to
    be short enough, so a path too long is too long as a whole."""
    if code == errno.ENAMETOOLONG and names_fit:
        return f"its path {_TOO_LONG}"
    return _NOT_A_FOLDER.get(code)


def disk_error(exc: OSError, root: Path, doing: str = "", hint: str = "") -> OSError | ConfigError:
    """What an OSError from dino_root's filesystem means for the user, whatever its errno: no space or no inodes
    (DiskSpaceError, exit 9); a folder that cannot be written or a path no folder can have (ConfigError, exit 3,
    naming the path); any other failure of the filesystem itself (EIO, ESTALE on NFS...: DiskSpaceError, exit 9,
    which keeps the OSError's errno). ``doing`` defaults to writing the file the error names; ``hint`` to freeing
    space in ``root``."""
    if isinstance(exc, FetcherError):
        return exc
    where = f"{exc.filename}" if exc.filename else str(root)
    code = exc.errno or 0
    name = errno.errorcode.get(code, f"errno {code}")
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        why = "it is on a read-only filesystem" if code == errno.EROFS else exc.strerror
        return ConfigError(f"cannot write in {root}: {why} ({where})",
                           "make dino_root writable, or point train.dino_root (--dino-root) at a writable folder")
    if (wrong := not_a_folder(code)) is not None:
        taken = code in (errno.EEXIST, errno.EISDIR, errno.ENOTEMPTY) and exc.filename  # a name in the way
        return ConfigError(f"cannot use {root} as dino_root: {wrong} ({name} on {where})",
                           f"remove {where} (the fetch makes it itself) and run again" if taken else
                           "point train.dino_root (or --dino-root) at a folder on a local or network disk, "
                           "e.g. ./dinov3")
    if code in (errno.ENOSPC, errno.EDQUOT):
        return disk_full(exc, root, doing or f"writing {where}", hint or f"free space (or files: inodes may be "
                         f"used up) in {root}, or point dino_root at a bigger disk; the next run resumes")
    failed = DiskSpaceError(f"the filesystem of {root} failed{f' while {doing}' if doing else ''}: "
                            f"{exc.strerror or type(exc).__name__} ({name} on {where})",
                            "check the disk or the network filesystem (dmesg; an NFS server that restarted, a "
                            "mount gone stale), then run again: it resumes")
    failed.errno = exc.errno
    return failed


class NetworkError(FetcherError, ConnectionError):
    """The endpoint could not be reached or kept failing after the retries."""

    exit_code = 10
    short = "network"


class LocalEntryNotFoundError(FetcherError, FileNotFoundError):
    """Offline (HF_HUB_OFFLINE=1) and dino_root does not hold a complete checkpoint of the requested model."""

    exit_code = 11
    short = "offline"


class LockTimeoutError(FetcherError, TimeoutError):
    """Another fetcher held dino_root's lock for longer than the lock timeout."""

    exit_code = 12
    short = "lock timeout"


class VerificationError(FetcherError, ValueError):
    """``verify`` found a problem in dino_root (missing, truncated or altered file)."""

    exit_code = 13
    short = "verify failed"


class LoadError(FetcherError, RuntimeError):
    """The optional loading step failed: torch or transformers missing or too old, or the model did not load."""

    exit_code = 14
    short = "load failed"


class FetchInterrupted(FetcherError, KeyboardInterrupt):
    """Ctrl-C or SIGTERM during a fetch; the partial data is kept and the next run resumes."""

    exit_code = 130
    short = "interrupted"


def interrupted() -> FetchInterrupted:
    """The error of a download stopped by a Ctrl-C (SIGTERM) or its fetch's cancel, on one rank or on every rank of
    a broadcast: its partial data is kept, and the next run resumes it."""
    return FetchInterrupted("interrupted", "run the same command again: it resumes")


# Exit codes that are not an exception class: success, unexpected failure, usage error (argparse).
EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_USAGE = 2

EXIT_CODES: dict[str, int] = {
    "ok": EXIT_OK,
    "unexpected error (a bug: please report it with --debug output)": EXIT_UNEXPECTED,
    "usage error (bad flag)": EXIT_USAGE,
    **{cls.__name__: cls.exit_code for cls in (
        ConfigError, AuthenticationError, RepositoryNotFoundError, RevisionNotFoundError, NotDinov3Error,
        IntegrityError, DiskSpaceError, NetworkError, LocalEntryNotFoundError, LockTimeoutError,
        VerificationError, LoadError, FetchInterrupted,
    )},
}


def exit_code_summary() -> str:
    """The exit codes in a few words each, from the classes above (the CLI's --help)."""
    classes = (ConfigError, AuthenticationError, RepositoryNotFoundError, RevisionNotFoundError, NotDinov3Error,
               IntegrityError, DiskSpaceError, NetworkError, LocalEntryNotFoundError, LockTimeoutError,
               VerificationError, LoadError, FetchInterrupted)
    return ", ".join([f"{EXIT_OK} ok", f"{EXIT_UNEXPECTED} bug", f"{EXIT_USAGE} usage"] +
                     [f"{c.exit_code} {c.short}" for c in classes]) + " (the README's 'Exit codes' has each)"
