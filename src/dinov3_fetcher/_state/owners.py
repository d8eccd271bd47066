"""Who owns a claim or staged folder, and when its owner counts as gone.

Whose owner is gone: on this host, a dead pid. On another host (a shared filesystem whose clocks and locks
cannot be trusted), never a file time: each owner rewrites a counter in its folders' ``heartbeat`` file every
``HEARTBEAT_EVERY`` seconds from a thread of its own (whatever its downloads do), and another host calls a
folder abandoned only once it has itself watched that counter stay unchanged for ``STALE_AFTER`` seconds of
its own monotonic clock. Adopting another host's claim copies its done ranges into a fresh folder of our own
(the other one is then removed): its owner may still hold its data file open, and must never write into a
file that we publish. ``DINOV3_FETCHER_HOSTNAME`` overrides the host name in these tags (tests simulate a
second host with it); ``DINOV3_FETCHER_STALE_AFTER`` overrides the watch time.

The watch goes on across this host's processes: each notes what it saw first (the beat, and when by the host's
monotonic clock, which all its processes share until it reboots) in ``watched.<host>.json`` of the state folder,
so that many short fetches (warm runs that take milliseconds) together watch as long as one long one would. A
note is trusted only on the boot that wrote it; a beat that changed since means the owner is alive.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from .. import _env as env
from .files import atomic_write_bytes


def host() -> str:
    """This host as the claim and staged folders name it (``DINOV3_FETCHER_HOSTNAME``, else the host name), with
    no dots: the folders are named ``<...>.<host>.<pid>``."""
    return env.host_name().replace(".", "_")


HEARTBEAT_EVERY = 1.0  # seconds between two beats of a live fetcher's heartbeat files
# Seconds that this process must itself have watched the heartbeat of a folder owned by a fetcher on ANOTHER
# host stay unchanged before that folder counts as abandoned (on this host a dead pid decides). The owner beats
# every HEARTBEAT_EVERY seconds from its own thread, while it downloads, retries or waits alike, so this is
# many missed beats; DINOV3_FETCHER_STALE_AFTER overrides it.
STALE_AFTER = {"partial": 10.0, "staged": 10.0}


def stale_after(kind: str) -> float:
    """``STALE_AFTER[kind]``, or DINOV3_FETCHER_STALE_AFTER (seconds) when it is set to a number >= 0."""
    return env.stale_after(STALE_AFTER[kind])


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
    return HEARTBEATS.verdict(folder, kind) == "gone"


def _boot_id() -> str | None:
    """This boot of this host (Linux's boot id): monotonic times noted on another boot mean nothing here."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


class _Notebook:
    """What this host's processes saw first of other hosts' heartbeats in one state folder: folder (``kind/name``)
    -> (beat, monotonic time first seen). Read once per process, written (atomically, never synced: a lost note
    only restarts a watch) once a folder was seen for the first time: at the end of the pass that saw it
    (``_Heartbeats.one_pass``), once however many folders the pass noted."""

    def __init__(self, state: Path, boot: str) -> None:
        self.path = state / f"watched.{host()}.json"
        self.boot = boot
        self.notes: dict[str, tuple[bytes | None, float]] = {}
        self.dirty = False  # notes not written yet
        from .._userfile import read_regular

        with contextlib.suppress(OSError, ValueError, TypeError, AttributeError, KeyError, IndexError):
            raw = json.loads(read_regular(self.path, 1 << 20))  # (a FIFO planted there is never waited on)
            if raw.get("boot") == boot:
                self.notes = {str(k): (bytes.fromhex(v[0]) if v[0] is not None else None, float(v[1]))
                              for k, v in raw["seen"].items()}

    def note(self, key: str, beat: bytes | None, now: float) -> None:
        """Note what was seen of a folder; ``flush`` writes it."""
        self.notes[key] = (beat, now)
        self.dirty = True

    def flush(self) -> None:
        """Write the notes, if any changed since they were last written."""
        if self.dirty:
            self.dirty = False
            self.write()

    def write(self) -> None:
        state = self.path.parent
        self.notes = {k: v for k, v in self.notes.items() if (state / k).is_dir()}  # forget removed folders
        data = json.dumps({"boot": self.boot, "seen": {k: [b.hex() if b is not None else None, t]
                                                      for k, (b, t) in sorted(self.notes.items())}})
        with contextlib.suppress(OSError):  # a note not written only restarts a watch
            atomic_write_bytes(self.path, data.encode(), sync=False)


class _Heartbeats:
    """This process's heartbeats (the folders it owns) and what it saw of other hosts' (the folders it watches).

    The watcher's side reads ``clock`` and waits with ``sleep`` (time.monotonic and time.sleep): a test that
    drives both judges a heartbeat stale without waiting the seconds that takes."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.lock = threading.Lock()
        self.owned: set[Path] = set()
        self.count = 0
        self.thread: threading.Thread | None = None
        self.seen: dict[Path, tuple[bytes | None, float, bool]] = {}  # folder -> (beat, since, it changed)
        self.clock = clock
        self.sleep = sleep
        self.books: dict[Path, _Notebook | None] = {}  # state folder -> its notebook (None: not kept)
        self.passes = 0  # ``one_pass`` blocks under way: the notebooks are written as the last one ends

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
        now = self.clock()
        with self.lock:
            prev = self.seen.get(folder)
            book = self._book(folder.parent.parent) if prev is None else None
            key = f"{folder.parent.name}/{folder.name}"
            if book is not None and (noted := book.notes.get(key)) is not None and noted[1] <= now:
                prev = (noted[0], noted[1], False)  # seen by an earlier process of this host, on this boot
            if prev is None or prev[0] != beat:
                self.seen[folder] = (beat, now, prev is not None)
                if book is not None:
                    book.note(key, beat, now)
                    if not self.passes:
                        book.flush()
                return "alive" if prev is not None else "watching"
            self.seen[folder] = prev
            if now - prev[1] >= stale_after(kind):
                return "gone"
            return "alive" if prev[2] else "watching"

    @contextlib.contextmanager
    def one_pass(self) -> Iterator[None]:
        """Judge several folders in one pass: what it notes is written to each notebook once, as it ends, rather
        than once per folder (each write also checks every noted folder still exists)."""
        with self.lock:
            self.passes += 1
        try:
            yield
        finally:
            with self.lock:
                self.passes -= 1
                if not self.passes:
                    for book in self.books.values():
                        if book is not None:
                            book.flush()

    def _book(self, state: Path) -> _Notebook | None:
        """The notebook of ``state`` (read once per process); None where notes cannot be trusted: no boot id,
        or a clock other than the host's monotonic one (a test drives its own)."""
        if state not in self.books:
            boot = _boot_id() if self.clock is time.monotonic else None
            self.books[state] = _Notebook(state, boot) if boot is not None else None
        return self.books[state]

    def watch(self, folders: list[Path], kind: str) -> None:
        """Watch other hosts' folders until each has a verdict (at most stale_after(kind) plus one beat)."""
        deadline = self.clock() + stale_after(kind) + HEARTBEAT_EVERY
        while folders and self.clock() < deadline:
            with self.one_pass():
                folders = [f for f in folders if self.verdict(f, kind) == "watching"]
            if folders:
                self.sleep(min(0.2, HEARTBEAT_EVERY / 4))


_LIFE: tuple[int, str] = (0, "")  # (pid, a token drawn once by that process)


def _life() -> str:
    """A token of this process's life, drawn at its first beat (again in a forked child): its beats never equal
    those of an earlier process that had the same pid and host (a container's fetcher is often pid 7 each run),
    which a watcher's note of a beat it saw long ago could take for a still heartbeat."""
    global _LIFE
    if _LIFE[0] != os.getpid():
        _LIFE = (os.getpid(), os.urandom(6).hex())
    return _LIFE[1]


def _beat(folder: Path, count: int) -> None:
    """Write the counter into ``folder/heartbeat`` (in place: a fixed-width page, never through a link)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder / "heartbeat", os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0),
                     0o666)
        try:
            os.pwrite(fd, f"{os.getpid()} {_life()} {count:>20}\n".encode(), 0)
        finally:
            os.close(fd)


HEARTBEATS = _Heartbeats()
