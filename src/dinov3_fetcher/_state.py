"""dino_root's state folder, and every rule about what may be in it.

    dino_root/.dinov3-fetcher/
      manifest.json   what dino_root holds (see _manifest)
      lock            the inter-process lock (advisory: correctness never depends on it)
      partial/        resumable downloads, one folder per file content: ``data`` + ``progress.json``
      staged/         verified files waiting to be published together, one folder per fetcher

A fetcher owns a partial folder by renaming it to ``<content>.<host>.<pid>`` (a claim) and stages into
``staged/<host>.<pid>/``, so two fetchers never write into the same file even where the lock silently
fails. A claim or staged folder whose owner is gone is adopted by the next fetcher (``STALE_AFTER``).

Whose owner is gone: on this host, a dead pid. On another host (a shared filesystem whose clocks and locks
cannot be trusted), never a file time: each owner rewrites a counter in its folders' ``heartbeat`` file every
``HEARTBEAT_EVERY`` seconds from a thread of its own (whatever its downloads do), and another host calls a
folder abandoned only once it has itself watched that counter stay unchanged for ``STALE_AFTER`` seconds of
its own monotonic clock. Adopting another host's claim copies its done ranges into a fresh folder of our own
(the other one is then removed): its owner may still hold its data file open, and must never write into a
file that we publish. ``DINOV3_FETCHER_HOSTNAME`` overrides the host name in these tags (tests simulate a
second host with it); ``DINOV3_FETCHER_STALE_AFTER`` overrides the watch time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from ._errors import ConfigError, LockTimeoutError
from ._manifest import FileRecord, Manifest
from ._progress import Progress

__all__ = ["HEARTBEAT_EVERY", "HOST", "PROGRESS_PAGE", "SPACE_MARGIN", "STALE_AFTER", "StateDir", "atomic_write_bytes",
           "encode_progress", "host", "owner_gone", "owner_tag", "read_progress", "stale_after", "write_new"]

STATE_DIRNAME = ".dinov3-fetcher"
SPACE_MARGIN = 16 * 1024 * 1024  # free space left over after a download, on top of what it needs
PROGRESS_PAGE = 4096  # progress.json is padded to one page, so that it can be rewritten in place


def host() -> str:
    """This host as the claim and staged folders name it (``DINOV3_FETCHER_HOSTNAME``, else the host name), with
    no dots: the folders are named ``<...>.<host>.<pid>``."""
    return (os.environ.get("DINOV3_FETCHER_HOSTNAME") or socket.gethostname()).replace(".", "_")


HOST = host()  # as at import; owner_tag() reads the variable at call time
HEARTBEAT_EVERY = 1.0  # seconds between two beats of a live fetcher's heartbeat files
# Seconds that this process must itself have watched the heartbeat of a folder owned by a fetcher on ANOTHER
# host stay unchanged before that folder counts as abandoned (on this host a dead pid decides). The owner beats
# every HEARTBEAT_EVERY seconds from its own thread, while it downloads, retries or waits alike, so this is
# many missed beats; DINOV3_FETCHER_STALE_AFTER overrides it.
STALE_AFTER = {"partial": 10.0, "staged": 10.0}


def stale_after(kind: str) -> float:
    """``STALE_AFTER[kind]``, or DINOV3_FETCHER_STALE_AFTER (seconds) when it is set to a number >= 0."""
    try:
        value = float(os.environ.get("DINOV3_FETCHER_STALE_AFTER", ""))
    except ValueError:
        return STALE_AFTER[kind]
    return value if value >= 0 and value == value and value != float("inf") else STALE_AFTER[kind]


def owner_tag() -> str:
    """This process as it names the partial and staged folders it owns: ``<host>.<pid>``."""
    return f"{host()}.{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def other_host(tag: str) -> bool:
    """Is ``tag`` (``<host>.<pid>``) a fetcher on another host?"""
    name, _, pid = tag.rpartition(".")
    return pid.isdigit() and name != host()


def owner_gone(tag: str, folder: Path, kind: str) -> bool:
    """Is the fetcher named by ``tag`` (``<host>.<pid>``), owner of ``folder``, gone? On this host: its pid is
    dead. On another host: this process watched the folder's heartbeat stay unchanged for ``stale_after(kind)``
    seconds (never a file time: clocks differ between hosts). Never blocks: see ``watch``."""
    name, _, pid = tag.rpartition(".")
    if not pid.isdigit() or "." in name:
        return False
    if name == host():
        return not _pid_alive(int(pid))
    return _BEATS.verdict(folder, kind) == "gone"


class _Heartbeats:
    """This process's heartbeats (the folders it owns) and what it saw of other hosts' (the folders it watches)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.owned: set[Path] = set()
        self.count = 0
        self.thread: threading.Thread | None = None
        self.seen: dict[Path, tuple[bytes | None, float, bool]] = {}  # folder -> (beat, since, it changed)

    # -- the owner's side ----------------------------------------------------------------------------------
    def own(self, folder: Path) -> None:
        """Beat ``folder`` from now on (at once, then every HEARTBEAT_EVERY seconds) until ``disown``."""
        with self.lock:
            self.owned.add(folder)
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._run, daemon=True, name="dinov3-fetcher-heartbeat")
                self.thread.start()
            self.count += 1
            count = self.count
        _beat(folder, count)

    def disown(self, folder: Path) -> None:
        """Stop beating ``folder`` (released, published or removed)."""
        with self.lock:
            self.owned.discard(folder)

    def _run(self) -> None:
        while True:
            time.sleep(HEARTBEAT_EVERY)
            with self.lock:
                self.count += 1
                count, folders = self.count, list(self.owned)
            for folder in folders:
                _beat(folder, count)

    # -- the watcher's side --------------------------------------------------------------------------------
    def verdict(self, folder: Path, kind: str) -> str:
        """``alive`` (its beat changed while watched), ``gone`` (unchanged for stale_after(kind) as watched
        here, or the folder is gone), or ``watching`` (seen unchanged, not long enough yet, or seen first now)."""
        try:
            beat: bytes | None = (folder / "heartbeat").read_bytes()
        except FileNotFoundError:
            if not folder.is_dir():
                return "gone"
            beat = None
        except OSError:
            beat = None
        now = time.monotonic()
        with self.lock:
            prev = self.seen.get(folder)
            if prev is None or prev[0] != beat:
                self.seen[folder] = (beat, now, prev is not None)
                return "alive" if prev is not None else "watching"
            if now - prev[1] >= stale_after(kind):
                return "gone"
            return "alive" if prev[2] else "watching"

    def watch(self, folders: list[Path], kind: str) -> None:
        """Watch other hosts' folders until each has a verdict (at most stale_after(kind) plus one beat)."""
        deadline = time.monotonic() + stale_after(kind) + HEARTBEAT_EVERY
        while folders and time.monotonic() < deadline:
            folders = [f for f in folders if self.verdict(f, kind) == "watching"]
            if folders:
                time.sleep(min(0.2, HEARTBEAT_EVERY / 4))


def _beat(folder: Path, count: int) -> None:
    """Write the counter into ``folder/heartbeat`` (in place: a fixed-width page, never through a link)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder / "heartbeat", os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0),
                     0o666)
        try:
            os.pwrite(fd, f"{os.getpid()} {count:>20}\n".encode(), 0)
        finally:
            os.close(fd)


_BEATS = _Heartbeats()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old content or the new one, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not mkstemp: its 0600 would ignore the umask (a trainer running as another user could not read the file).
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_new(path: Path, data: bytes) -> None:
    """Write ``path`` as a new file of ours (mode per the umask): whatever was there, a planted link included,
    is unlinked first, never written through."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o666)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


# -- the partial-download format -------------------------------------------------------------------------------
def encode_progress(identity: str, size: int, remaining: list[list[int]]) -> bytes:
    """A progress record: the byte ranges still missing, as one page of JSON padded with spaces (or longer)."""
    return json.dumps({"identity": identity, "size": size, "remaining": remaining}).encode().ljust(PROGRESS_PAGE)


def read_progress(folder: Path, identity: str, size: int) -> list[tuple[int, int]] | None:
    """The ranges a partial folder still misses, or None when it cannot be resumed: no or another record,
    ranges out of bounds, or a data file shorter than the bytes its record calls done (truncated)."""
    try:
        data = json.loads((folder / "progress.json").read_bytes())
        if data.get("identity") != identity or data.get("size") != size:
            return None
        ranges = sorted((int(s), int(e)) for s, e in data["remaining"])
        if any(not 0 <= s < e <= size for s, e in ranges):
            return None
        if (folder / "data").stat().st_size < _done_end(ranges, size):
            return None
        return ranges
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _copy_partial(src: Path, dst: Path, identity: str, size: int) -> bool:
    """Copy another host's partial download (the ranges its record calls done) into a fresh folder ``dst``;
    False if it cannot be resumed. Its record is read before its data: what it calls done is on disk."""
    ranges = read_progress(src, identity, size)
    if ranges is None:
        return False
    tmp = dst.with_name(f"{dst.name}.copy")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        fd = os.open(src / "data", os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
        with os.fdopen(fd, "rb") as fin, open(tmp / "data", "xb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
        write_new(tmp / "progress.json", encode_progress(identity, size, [list(r) for r in ranges]))
        os.rename(tmp, dst)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    return True


def _own_entries(folder: Path) -> Path:
    """A claimed partial folder whose files are ours: a link planted in it is removed (never written
    through), and with a linked data file its progress record is dropped too (it no longer describes it)."""
    if (folder / "heartbeat").is_symlink():
        (folder / "heartbeat").unlink()
    if (folder / "data").is_symlink():
        (folder / "data").unlink()
        (folder / "progress.json").unlink(missing_ok=True)
    for name in ("progress.json", "progress.json.tmp"):
        if (folder / name).is_symlink():
            (folder / name).unlink()
    return folder


def _done_end(remaining: list[tuple[int, int]], size: int) -> int:
    """Where the last byte a progress record calls done ends: the data file must be at least this long."""
    end = size
    for s, e in sorted(remaining, reverse=True):
        if e < end:
            break  # a done gap between this range and the ones after it
        end = min(end, s)
    return end


def _missing(folder: Path, identity: str, size: int) -> int:
    ranges = read_progress(folder, identity, size)
    return size if ranges is None else sum(e - s for s, e in ranges)


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
        try:
            return Manifest.from_json(self.manifest_path.read_bytes())
        except (OSError, ValueError, KeyError, TypeError, AttributeError, OverflowError, RecursionError):
            return None

    def write_manifest(self, manifest: Manifest) -> None:
        """Replace manifest.json atomically."""
        atomic_write_bytes(self.manifest_path, manifest.to_json())

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
        for p in (self.partial, self.staged):
            p.mkdir(parents=True, exist_ok=True)

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
    def locked(self, timeout: float, progress: Progress, disabled: bool = False) -> Iterator[None]:
        """Hold dino_root's lock; LockTimeoutError after ``timeout`` seconds of waiting for another fetcher."""
        if disabled:
            yield
            return
        from filelock import FileLock, Timeout

        if self.lock_path.is_symlink():  # the lock file is opened for writing: never through a link
            raise ConfigError(f"{self.lock_path} is a symbolic link", "remove it; the next fetch creates the lock file")
        lock = FileLock(self.lock_path)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            progress.message(f"waiting for another fetcher to finish with {self.root} (up to {timeout:.0f} s)")
            try:
                lock.acquire(timeout=timeout, poll_interval=0.2)
            except Timeout:
                raise LockTimeoutError(
                    f"another fetcher held the lock on {self.root} for more than {timeout:.0f} s",
                    "wait for it, raise --lock-timeout (DINOV3_FETCHER_LOCK_TIMEOUT), or stop it; "
                    "a killed fetcher's lock is released by the OS") from None
        try:
            yield
        finally:
            lock.release()

    # -- partial downloads ---------------------------------------------------------------------------------
    def _abandoned(self, folder: Path, identity: str) -> bool:
        return owner_gone(folder.name[len(identity) + 1:], folder, "partial")

    def resumable(self, identity: str) -> list[Path]:
        """The partial folders of this content that a claim may take: ours, the public one, a gone fetcher's."""
        mine = f"{identity}.{owner_tag()}"
        return [p for p in (self.partial / identity, *self.partial.glob(f"{identity}.*"))
                if p.is_dir() and not p.is_symlink() and (p.name in (identity, mine) or self._abandoned(p, identity))]

    def partial_bytes(self, identity: str, size: int) -> int:
        """Bytes of this content already on disk in the best resumable partial folder (what a claim would take)."""
        return max([size - _missing(p, identity, size) for p in self.resumable(identity)] + [0])

    def claim(self, identity: str, size: int) -> Path:
        """Take the best resumable partial folder for this content, or start an empty one; ours beats from now on.

        A public folder or a dead fetcher's of this host is renamed to ours; another host's claim that this
        process watched go silent is copied (its done ranges) into a fresh folder of ours, then removed: its
        owner may be alive after all and still hold its data file open.
        """
        mine = self.partial / f"{identity}.{owner_tag()}"
        if mine.is_symlink():  # planted: never written through
            mine.unlink()
        if mine.is_dir():
            _BEATS.own(mine)
            return _own_entries(mine)
        others = [p for p in self.partial.glob(f"{identity}.*")
                  if p.is_dir() and not p.is_symlink() and other_host(p.name[len(identity) + 1:])]
        _BEATS.watch(others, "partial")  # a verdict on each other host's claim of this content (seconds at most)
        adopted = False
        for c in sorted(self.resumable(identity), key=lambda p: _missing(p, identity, size)):
            try:
                if not adopted and c in others:
                    adopted = _copy_partial(c, mine, identity, size)
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
        _BEATS.own(mine)
        return _own_entries(mine)

    def release(self, folder: Path, identity: str) -> None:
        """Hand a partial folder back under its public name so that any later run may resume it."""
        _BEATS.disown(folder)
        with contextlib.suppress(OSError):
            os.rename(folder, self.partial / identity)

    def discard(self, folder: Path) -> None:
        """Remove a claimed partial folder of ours (its file was verified and moved, or its bytes were wrong)."""
        _BEATS.disown(folder)
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
                _BEATS.watch([other.parent], "staged")
            if not owner_gone(other.parent.name, other.parent, "staged"):
                continue
            if not adopt:
                return other
            with contextlib.suppress(OSError):
                self.own_staged()
                os.rename(other, own)
                return own
        return None

    def own_staged(self) -> Path:
        """This process's staged folder, a real folder (a link planted under its name is removed, not followed)."""
        own = self.staged / owner_tag()
        if own.is_symlink():
            own.unlink()
        own.mkdir(parents=True, exist_ok=True)
        _BEATS.own(own)
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
        """
        from ._layout import check_filename, is_standard_weight

        manifest.complete = False
        manifest.damaged = []
        manifest.previous = sorted((set(old.files) | set(old.previous)) - set(paths)) if old else []
        self.write_manifest(manifest)
        for name, src in paths.items():
            if src != self.root / name:
                os.replace(src, self.root / name)
        stale = set(old.files) | set(old.previous) if old else set()
        if old is not None and not old.complete:
            stale |= {p.name for p in self.root.iterdir() if is_standard_weight(p.name)}
        for name in stale - set(paths):
            with contextlib.suppress(OSError, ValueError):
                (self.root / check_filename(name)).unlink()
        manifest.complete = True
        manifest.previous = []
        self.write_manifest(manifest)

    def drop_stale(self) -> None:
        """After a successful fetch: partial downloads nobody owns (changed files, other models), our staged
        folder, and those of gone fetchers. Never another live fetcher's files."""
        for p in self.partial.iterdir():
            identity = p.name.split(".", 1)[0]
            if p.is_symlink() or not p.is_dir():  # not ours: only the link (or stray file) goes
                p.unlink(missing_ok=True)
            elif p.name == identity or self._abandoned(p, identity):
                shutil.rmtree(p, ignore_errors=True)
            elif p.name.endswith(".copy") and not other_host(tag := p.name[len(identity) + 1:-len(".copy")]) \
                    and owner_gone(tag, p, "partial"):
                shutil.rmtree(p, ignore_errors=True)  # a copy (see claim) whose maker here died before finishing it
        mine = self.staged / owner_tag()
        for p in self.staged.iterdir() if self.staged.is_dir() else ():
            if p.is_symlink() or not p.is_dir():
                p.unlink(missing_ok=True)
            elif p == mine or owner_gone(p.name, p, "staged"):
                _BEATS.disown(p)
                shutil.rmtree(p, ignore_errors=True)


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
