"""dino_root's state folder, and every rule about what may be in it.

    dino_root/.dinov3-fetcher/
      manifest.json   what dino_root holds (see _manifest)
      lock            the inter-process lock (advisory: correctness never depends on it)
      partial/        resumable downloads, one folder per file content: ``data`` + ``progress.json``
      staged/         verified files waiting to be published together, one folder per fetcher

A fetcher owns a partial folder by renaming it to ``<content>.<host>.<pid>`` (a claim) and stages into
``staged/<host>.<pid>/``, so two fetchers never write into the same file even where the lock silently
fails. A claim or staged folder whose owner is gone (``owners``) is adopted by the next fetcher.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
from collections.abc import Collection, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from .. import _env as env
from .._errors import ConfigError, DiskSpaceError, LockTimeoutError, disk_error
from .._manifest import FileRecord, Manifest
from .._progress import Progress, human_bytes
from .files import (
    atomic_write_bytes,
    copy_partial,
    missing_bytes,
    open_data,
    own_entries,
    remaining,
    save_progress,
    sync_dir,
    sync_file,
    write_new,
)
from .owners import (
    HEARTBEATS,
    STALE_AFTER,
    host,
    other_host,
    owner_gone,
    owner_tag,
)

if TYPE_CHECKING:
    from filelock import FileLock

__all__ = ["SPACE_MARGIN", "STALE_AFTER", "StateDir", "fits", "host", "on_disk", "open_data", "owner_tag",
           "record_for", "remaining", "same_bytes", "save_progress", "write_new"]

STATE_DIRNAME = ".dinov3-fetcher"
_TRASH = re.compile(r"\.trash\d+$")  # a claim being removed (see claim): never resumed, always deleted
SPACE_MARGIN = 16 * 1024 * 1024  # free space left over after a download, on top of what it needs


def fits(needed: int, free: int) -> bool:
    """Do ``needed`` more bytes fit in ``free`` with ``SPACE_MARGIN`` to spare?"""
    return needed + SPACE_MARGIN <= free


@contextlib.contextmanager
def on_disk(root: Path, doing: str = "", hint: str = "") -> Iterator[None]:
    """Around system calls on dino_root's filesystem, and nothing else (nothing inside raises a FetcherError):
    an OSError they raise becomes what it means for the user (``_errors.disk_error``: no space, a folder that
    cannot be written); ``doing`` and ``hint`` word the disk-full message (default: writing the file it names;
    free space in ``root``)."""
    try:
        yield
    except OSError as exc:
        raise disk_error(exc, root, doing, hint) from None


class StateDir:
    """dino_root's state folder: paths, manifest, lock, partial downloads, staged files, publishing."""

    def __init__(self, dino_root: Path) -> None:
        self.root = dino_root
        self.path = dino_root / STATE_DIRNAME
        self.manifest_path = self.path / "manifest.json"
        self.lock_path = self.path / "lock"
        self.partial = self.path / "partial"
        self.staged = self.path / "staged"

    # -- manifest ------------------------------------------------------------------------------------------
    def read_manifest(self) -> Manifest | None:
        """The manifest, or None when absent or unreadable (an unreadable one is treated as absent)."""
        return self.manifest_or_damage()[0]

    def manifest_or_damage(self) -> tuple[Manifest | None, str | None]:
        """(the manifest, None); (None, why it cannot be read) for a damaged one; (None, None) when absent.
        Never waits: a FIFO or a device in its place is damage too."""
        from .._userfile import JSON_LIMIT, Refused, read_regular

        try:
            return Manifest.from_json(read_regular(self.manifest_path, JSON_LIMIT)), None
        except Refused as exc:
            return None, None if exc.missing else f"it {exc.reason}"
        except ValueError as exc:
            return None, f"it {exc}" if str(exc).startswith(("is ", "holds ")) else str(exc)

    def write_manifest(self, manifest: Manifest) -> None:
        """Replace manifest.json atomically and durably: its bytes, then its name (the state folder) on the disk."""
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.manifest_path, manifest.to_json())
        sync_dir(self.path)

    def ensure(self) -> None:
        """Create the partial and staged folders.

        Raises:
            ConfigError: the state folder, ``partial`` or ``staged`` is a symbolic link: a fetch deletes and
                writes in them, and never does so outside dino_root.
        """
        for p in (self.path, self.partial, self.staged):
            if p.is_symlink():
                raise ConfigError(
                    f"{p} is a symbolic link (to {p.readlink()}): the fetcher deletes and writes files in it, "
                    "and never outside dino_root", f"remove the link (rm {p}); the fetcher recreates the folder")
        with on_disk(self.root):
            for p in (self.partial, self.staged):
                p.mkdir(parents=True, exist_ok=True)

    def free_space(self) -> int:
        """Bytes free on dino_root's filesystem (that of its nearest existing parent while it does not exist)."""
        existing = self.path
        while not existing.is_dir() and existing != existing.parent:
            existing = existing.parent
        with on_disk(self.root):
            return shutil.disk_usage(existing).free

    def check_space(self, needed: int, on: str = "") -> None:
        """DiskSpaceError unless ``needed`` more bytes fit on dino_root's disk (``fits``); ``on``: where the
        message says the disk is (e.g. " on node-3")."""
        free = self.free_space()
        if not fits(needed, free):
            raise DiskSpaceError(
                f"not enough disk space in {self.root}{on}: {human_bytes(needed)} still to download plus a "
                f"{human_bytes(SPACE_MARGIN)} margin, {human_bytes(free)} free",
                "free some space or point dino_root at a bigger disk", needed=needed, free=free)

    def missing_folders(self) -> list[Path]:
        """The folders ``ensure`` would create (dino_root and its missing parents included), deepest first."""
        out = [self.partial, self.staged, self.path]
        p = self.root
        while not p.exists() and not p.is_symlink() and p != p.parent:
            out.append(p)
            p = p.parent
        return [p for p in out if not p.exists() and not p.is_symlink()]

    def remove_if_empty(self, created: list[Path]) -> None:
        """After a failed fetch: remove what ``missing_folders`` listed and is still empty (the lock file of a
        state folder this fetch created, too), so that a failed first fetch leaves nothing behind. A folder
        that holds anything (a resumable partial download) stays, and so do its parents."""
        if self.path in created:
            for p in self.partial.iterdir() if self.partial.is_dir() and not self.partial.is_symlink() else ():
                with contextlib.suppress(OSError):  # released, and not one byte in it: nothing to resume
                    if "." not in p.name and not p.is_symlink() and (p / "data").lstat().st_size == 0:
                        shutil.rmtree(p)
            try:
                for p in (self.partial, self.staged):
                    if p.is_dir() and not p.is_symlink():
                        p.rmdir()
            except OSError:
                return  # it holds something (resumable data): keep it all
            # Unlinked while we hold it: a fetcher already waiting on this file may then run beside the next
            # one, which wastes bandwidth but is safe (correctness never depends on the lock).
            with contextlib.suppress(OSError):
                self.lock_path.unlink(missing_ok=True)
        for p in created:
            with contextlib.suppress(OSError):
                p.rmdir()

    # -- the lock ------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self, timeout: float, progress: Progress, disabled: bool | None = None) -> Iterator[None]:
        """Hold dino_root's lock; LockTimeoutError after ``timeout`` seconds of waiting for another fetcher.
        ``disabled`` (default: DINOV3_FETCHER_NO_LOCK): run without it."""
        if env.lock_disabled() if disabled is None else disabled:
            yield
            return
        from filelock import FileLock

        if self.lock_path.is_symlink():  # the lock file is opened for writing: never through a link
            raise ConfigError(f"{self.lock_path} is a symbolic link", "remove it; the next fetch creates the lock file")
        lock = FileLock(self.lock_path)
        with on_disk(self.root):
            got = _acquire(lock, 0)
        if not got:
            progress.message(f"waiting for another fetcher to finish with {self.root} (up to {timeout:.0f} s)")
            with on_disk(self.root):
                got = _acquire(lock, timeout)
            if not got:
                raise LockTimeoutError(
                    f"another fetcher held the lock on {self.root} for more than {timeout:.0f} s",
                    "wait for it, raise --lock-timeout (DINOV3_FETCHER_LOCK_TIMEOUT), or stop it; "
                    "a killed fetcher's lock is released by the OS")
        try:
            yield
        finally:
            lock.release()

    @contextlib.contextmanager
    def locked_if_free(self) -> Iterator[bool]:
        """Hold dino_root's lock if no other fetcher does, without waiting: True; False when it is held or cannot
        be taken (a link, a folder that cannot be written). True at once when the lock is disabled."""
        if self.path.is_symlink() or self.lock_path.is_symlink():  # never written through a link
            yield False
            return
        if env.lock_disabled():
            yield True
            return
        from filelock import FileLock

        lock = FileLock(self.lock_path)
        try:
            got = _acquire(lock, 0)
        except OSError:
            got = False
        try:
            yield got
        finally:
            if got:
                lock.release()

    # -- partial downloads ---------------------------------------------------------------------------------
    def _abandoned(self, folder: Path, identity: str) -> bool:
        return owner_gone(folder.name[len(identity) + 1:], folder, "partial")

    def resumable(self, identity: str) -> list[Path]:
        """The partial folders of this content that a claim may take: ours, the public one, a gone fetcher's."""
        mine = f"{identity}.{owner_tag()}"
        with HEARTBEATS.one_pass():
            return [p for p in (self.partial / identity, *self.partial.glob(f"{identity}.*")) if p.is_dir()
                    and not p.is_symlink() and (p.name in (identity, mine) or self._abandoned(p, identity))]

    def partial_bytes(self, identity: str, size: int) -> int:
        """Bytes of this content already on disk in the best resumable partial folder (what a claim would take)."""
        return max([size - missing_bytes(p, identity, size) for p in self.resumable(identity)] + [0])

    def claim(self, identity: str, size: int) -> Path:
        """Take the best resumable partial folder for this content, or start an empty one; ours beats from now on.

        A public folder or a dead fetcher's of this host is renamed to ours; another host's claim that this
        process watched go silent is copied (its done ranges) into a fresh folder of ours, then removed: its
        owner may be alive after all and still hold its data file open.
        """
        with on_disk(self.root):
            mine = self.partial / f"{identity}.{owner_tag()}"
            if mine.is_symlink():  # planted: never written through
                mine.unlink()
            if mine.is_dir():
                HEARTBEATS.own(mine)
                return own_entries(mine)
            others = [p for p in self.partial.glob(f"{identity}.*")
                      if p.is_dir() and not p.is_symlink() and other_host(p.name[len(identity) + 1:])]
            HEARTBEATS.watch(others, "partial")  # a verdict on each other host's claim of it (seconds at most)
            adopted = False
            for c in sorted(self.resumable(identity), key=lambda p: missing_bytes(p, identity, size)):
                try:
                    if not adopted and c in others:
                        adopted = copy_partial(c, mine, identity, size)
                    elif not adopted:
                        os.rename(c, mine)
                        adopted = True
                    if c.exists() and c != mine:
                        trash = c.with_name(f"{c.name}.trash{os.getpid()}")
                        os.rename(c, trash)
                        shutil.rmtree(trash, ignore_errors=True)
                except OSError:
                    continue
            mine.mkdir(parents=True, exist_ok=True)
            HEARTBEATS.own(mine)
            return own_entries(mine)

    def release(self, folder: Path, identity: str) -> None:
        """Hand a partial folder back under its public name so that any later run may resume it."""
        HEARTBEATS.disown(folder)
        with contextlib.suppress(OSError):
            os.rename(folder, self.partial / identity)

    def discard(self, folder: Path) -> None:
        """Remove a claimed partial folder of ours (its file was verified and moved, or its bytes were wrong)."""
        HEARTBEATS.disown(folder)
        shutil.rmtree(folder, ignore_errors=True)

    # -- staged files --------------------------------------------------------------------------------------
    def staged_path(self, identity: str, name: str) -> Path:
        """Where a verified download waits to be published: in this process's own folder (two fetchers without
        a working lock never move each other's files), named by content (a staged file is always exactly the
        file its name says, whichever run of whichever model left it there)."""
        staged = f"{identity}.{name}"
        if len(staged.encode()) > 255:  # a long (legal) file name: name the staged copy by a digest of it
            staged = f"{identity}.{hashlib.sha256(name.encode()).hexdigest()[:32]}"
        return self.staged / owner_tag() / staged

    def find_staged(self, identity: str, name: str, size: int, *, adopt: bool) -> Path | None:
        """A staged copy of this content: ours, or one a gone fetcher left (moved into ours when ``adopt``)."""
        own = self.staged_path(identity, name)
        if not own.parent.is_symlink() and not own.is_symlink() and own.is_file() and own.stat().st_size == size:
            return own
        for other in self.staged.glob(f"*/{own.name}"):
            if other.parent == own.parent or other.parent.is_symlink() or other.is_symlink() \
                    or other.stat().st_size != size:
                continue
            if adopt and other_host(other.parent.name):
                HEARTBEATS.watch([other.parent], "staged")
            if not owner_gone(other.parent.name, other.parent, "staged"):
                continue
            if not adopt:
                return other
            with contextlib.suppress(OSError):
                self._own_staged()
                os.rename(other, own)
                return own
        return None

    def own_staged(self) -> Path:
        """This process's staged folder, a real folder (a link planted under its name is removed, not followed)."""
        with on_disk(self.root):
            return self._own_staged()

    def _own_staged(self) -> Path:
        own = self.staged / owner_tag()
        if own.is_symlink():
            own.unlink()
        own.mkdir(parents=True, exist_ok=True)
        HEARTBEATS.own(own)
        return own

    def any_staged(self, identity: str, name: str) -> bool:
        """Is a staged copy of this content there, whoever staged it?"""
        return self.staged.is_dir() and any(self.staged.glob(f"*/{self.staged_path(identity, name).name}"))

    # -- publishing ----------------------------------------------------------------------------------------
    def publish(self, manifest: Manifest, paths: dict[str, Path], old: Manifest | None) -> None:
        """Move the verified files into dino_root together; the manifest says 'incomplete' until all are there.

        Removed afterwards: only what we put there (the old manifest's files, and those it replaced if it is
        the incomplete one of a publish that stopped half-way). After such a stop, also the standard weight
        names transformers would load in place of ours; without any manifest, nothing (a user's file under
        a name we publish was refused or adopted before: ``Run.check_foreign``).

        Crash-consistent (a power loss, not only a killed process): the incomplete manifest is on the disk
        before a file moves; every file's bytes are before its name is published; the folders' entries (the
        published names, the staged folders they left, the removed files) are before the manifest that says
        complete, which is itself synced with its folder. Synced as the disk is: a disk that loses what it
        acknowledged (a write cache without power-loss protection) is beyond any of this.
        """
        from .._layout import check_filename, is_standard_weight

        manifest.complete = False
        manifest.damaged = []
        manifest.previous = sorted((set(old.files) | set(old.previous)) - set(paths)) if old else []
        with on_disk(self.root):
            self.write_manifest(manifest)
            for src in paths.values():
                sync_file(src)
            for name, src in paths.items():
                if src != self.root / name:
                    os.replace(src, self.root / name)
        stale = set(old.files) | set(old.previous) if old else set()
        if old is not None and not old.complete:
            with on_disk(self.root):
                stale |= {p.name for p in self.root.iterdir() if is_standard_weight(p.name)}
        for name in stale - set(paths):
            with contextlib.suppress(OSError, ValueError):
                (self.root / check_filename(name)).unlink()
        manifest.complete = True
        manifest.previous = []
        with on_disk(self.root):
            for folder in {self.root, *(src.parent for src in paths.values())}:
                sync_dir(folder)
            self.write_manifest(manifest)

    def check_foreign(self, names: Collection[str], listed: Mapping[str, FileRecord],
                      manifests: Iterable[Manifest | None], adopted: dict[str, str]) -> None:
        """Refuse to replace or delete a file this tool did not put in dino_root (e.g. ``dino_root: "."`` next to
        the pipeline's own config.json and README.md), whoever is about to publish: a fetch, or a node receiving
        the broadcast.

        ``names`` are the files the publish would write, ``listed`` what each should hold (size, and sha256 or
        git blob id; sha256 "" when only the git id is known), ``manifests`` ours (the one read under the lock,
        the current one). A name in dino_root that no manifest records is adopted (into ``adopted``: name ->
        sha256) if its bytes are exactly the listed file, else it is a conflict; so is, without any manifest, a
        standard weight name the publish would remove.

        Raises:
            ConfigError: the conflicting files, and what to do.
        """
        from .._layout import is_standard_weight

        ours: set[str] = set()
        known = False
        for m in manifests:
            if m is not None:
                known = True
                ours |= set(m.files) | set(m.previous)
        conflicts = []
        with on_disk(self.root):
            for name in names:
                p = self.root / name
                if name in ours or name in adopted or not os.path.lexists(p):
                    continue
                if (digest := same_bytes(p, listed.get(name))) is not None:
                    adopted[name] = digest
                else:
                    conflicts.append(name)
            if not known:  # nothing proves that a standard weight name is ours
                conflicts += sorted(p.name for p in self.root.iterdir() if is_standard_weight(p.name)
                                    and p.name not in names and p.name not in conflicts)
        if conflicts:
            raise ConfigError(
                f"{self.root} holds files this tool did not put there and would replace or remove: "
                f"{', '.join(sorted(conflicts))}",
                "point train.dino_root (--dino-root) at a folder of its own (e.g. \"dinov3\"), or move those "
                "files out of it")

    def leftovers(self) -> list[tuple[str, Path]]:
        """Every partial and staged folder that is not ours, as (kind, folder): what a fetch cleans up once their
        owners are gone, and what ``info`` counts until then."""
        mine = owner_tag()
        out: list[tuple[str, Path]] = []
        for kind, top in (("partial", self.partial), ("staged", self.staged)):
            with contextlib.suppress(OSError):
                out += [(kind, p) for p in sorted(top.iterdir()) if p.is_dir() and not p.is_symlink()
                        and not p.name.endswith(f".{mine}") and p.name != mine]
        return out

    def watch_leftovers(self) -> None:
        """Start watching the heartbeats of other hosts' partial and staged folders (whatever model they are
        of): a fetch does it as it begins, so that ``drop_stale`` at its end can tell those whose owner is gone
        without waiting the staleness time then (only what is left of it, for folders first seen late)."""
        with HEARTBEATS.one_pass():
            for kind, folder in self.leftovers():
                if other_host(folder.name if kind == "staged" else folder.name.partition(".")[2]):
                    HEARTBEATS.verdict(folder, kind)

    def drop_stale(self) -> None:
        """After a successful fetch: partial downloads nobody owns (changed files, other models), our staged
        folder, and what gone fetchers left (``drop_abandoned``). Never waits: another host's folder not yet
        proven abandoned is left for a later fetch. Never another live fetcher's files."""
        with on_disk(self.root), HEARTBEATS.one_pass():
            for p in self.partial.iterdir():
                identity = p.name.split(".", 1)[0]
                if p.is_symlink() or not p.is_dir():  # not ours: only the link (or stray file) goes
                    p.unlink(missing_ok=True)
                elif p.name == identity or self._left_by_gone("partial", p):
                    shutil.rmtree(p, ignore_errors=True)
            mine = self.staged / owner_tag()
            for p in self.staged.iterdir() if self.staged.is_dir() else ():
                if p.is_symlink() or not p.is_dir():
                    p.unlink(missing_ok=True)
                elif p == mine or self._left_by_gone("staged", p):
                    HEARTBEATS.disown(p)
                    shutil.rmtree(p, ignore_errors=True)

    def drop_abandoned(self) -> None:
        """A warm fetch's share of the cleanup (it found its checkpoint complete): remove what killed fetchers
        left, whatever model it was of, once their owners are provably gone: a dead process of this host, or
        another host's heartbeat watched still for the staleness time (by this host's fetches together, warm
        ones included: ``owners``). Costs two folder listings when nothing is left over; never waits, never
        asks the network, never touches a live fetcher's folders or a resumable download nobody owns; skipped
        while another fetcher holds the lock (it cleans up as it ends) or where the lock cannot be taken."""
        found = self.leftovers()
        if not found:
            return
        try:
            with self.locked_if_free() as free, HEARTBEATS.one_pass():
                for kind, p in found if free else ():
                    if self._left_by_gone(kind, p):
                        shutil.rmtree(p, ignore_errors=True)
        except OSError:
            return  # a warm fetch stays a success: a later fetch cleans up

    def _left_by_gone(self, kind: str, p: Path) -> bool:
        """Is ``p``, a partial or staged folder not ours, what a fetcher now gone left? Its claim or staged folder
        (``owner_gone``), a copy (see claim) whose maker on this host died before finishing it, a trash folder (a
        SIGKILL stopped its removal in claim)."""
        if kind == "staged":
            return owner_gone(p.name, p, "staged")
        identity = p.name.split(".", 1)[0]
        if _TRASH.search(p.name):
            return True
        if p.name.endswith(".copy"):
            tag = p.name[len(identity) + 1:-len(".copy")]
            return not other_host(tag) and owner_gone(tag, p, "partial")
        return p.name != identity and self._abandoned(p, identity)


def same_bytes(path: Path, rec: FileRecord | None) -> str | None:
    """The sha256 of ``path`` if it is a regular file with exactly the bytes ``rec`` lists (its size, and its
    sha256 or else its git blob id), else None."""
    from .._hashing import git_blob_hasher, hash_file

    if rec is None or path.is_symlink() or not path.is_file() or path.stat().st_size != rec.size:
        return None
    sha = hashlib.sha256()
    git = git_blob_hasher(rec.size) if not rec.sha256 and rec.git_oid else None  # both from one read
    hash_file(path, [sha] if git is None else [sha, git])
    digest = sha.hexdigest()
    if rec.sha256:
        return digest if digest == rec.sha256 else None
    if git is not None and git.hexdigest() == rec.git_oid:
        return digest
    return None


def record_for(old: Manifest | None, name: str, size: int, sha256: str | None,
               git_oid: str | None) -> FileRecord | None:
    """The old manifest's record of ``name`` if it describes the same content, else None.

    By sha256 when the listing gives one (every manifest records each file's sha256, whichever source it came
    from, so a file fetched from the Hub is recognised on ModelScope and back); by the git blob id otherwise
    (the Hub's regular files, listed with a git id only).
    """
    rec = old.files.get(name) if old else None
    if rec is None or rec.size != size:
        return None
    if sha256:
        return rec if rec.sha256 == sha256 else None
    return rec if git_oid is not None and rec.git_oid == git_oid else None


def _acquire(lock: FileLock, timeout: float) -> bool:
    """Acquire ``lock`` within ``timeout`` seconds: False when another holder kept it; OSError when the lock file
    cannot be opened."""
    from filelock import Timeout

    try:
        lock.acquire(timeout=timeout, poll_interval=0.2)
    except Timeout:
        return False
    return True
