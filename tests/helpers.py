"""Small shortcuts the tests share: a fetch with its detailed result, the dry run by arguments, the CLI in this
process (where a subprocess would only pay the imports again), waiting for a group of processes (the torchrun
"nodes") to end, digests and trees of what is on disk, the CLI's one error line, and a pid that no
process has."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from dinov3_fetcher import FetchResult, _cli, fetch_dinov3
from dinov3_fetcher._config import make_request
from dinov3_fetcher._plan import DryRun, dry_run


def fetch(dino_root: str | os.PathLike[str], model: str, **kwargs: Any) -> FetchResult:
    return fetch_dinov3(dino_root, model, details=True, **kwargs)


def plan(dino_root: str | os.PathLike[str], model: str, revision: str | None = None) -> DryRun:
    return dry_run(make_request(dino_root, model, revision))


class _MainThread(io.StringIO):
    """A stream that keeps what the main thread (the command) writes and passes the emulator's threads' writes
    (their tracebacks of connections the client closed) on to ``other``."""

    def __init__(self, other: Any) -> None:
        super().__init__()
        self.other = other

    def write(self, text: str) -> int:
        if threading.current_thread() is threading.main_thread():
            return super().write(text)
        return int(self.other.write(text))

    def isatty(self) -> bool:
        return False


def run_cli_here(args: list[str]) -> tuple[int, str, str]:
    """``dinov3-fetcher ARGS`` in this process: exit code, stdout, stderr."""
    out, err = _MainThread(sys.stdout), _MainThread(sys.stderr)
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = _cli.main(args)
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    return code, out.getvalue(), err.getvalue()


def wait_all(procs: list[Any]) -> list[subprocess.CompletedProcess[str]]:
    """Each process's output and exit status (``subprocess.Popen`` or ``launch.Forked``), once every one has
    ended on its own (a job that hangs ends at pytest's timeout); any still running when something fails is
    killed."""
    done = []
    try:
        for p in procs:
            stdout, stderr = p.communicate()
            done.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return done


def partial_progress(dino_root: Path) -> dict[str, int]:
    """The partial downloads in dino_root: folder name -> bytes on disk as its progress record says (a record
    caught while the fetcher rewrites it counts as none)."""
    out = {}
    for pj in (dino_root / ".dinov3-fetcher" / "partial").glob("*/progress.json"):
        try:
            data = json.loads(pj.read_bytes())
        except (OSError, ValueError):
            continue
        out[pj.parent.name] = data["size"] - sum(e - s for s, e in data["remaining"])
    return out


def socket_queues(port: int) -> int:
    """Bytes queued in the kernel (send + receive queues) on every TCP socket with ``port`` at either end."""
    total = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, queues = fields[1], fields[2], fields[4]
        if int(local.split(":")[1], 16) == port or int(remote.split(":")[1], 16) == port:
            tx, rx = queues.split(":")
            total += int(tx, 16) + int(rx, 16)
    return total


def freeze(gate: threading.Event, endpoint: str, proc: subprocess.Popen[Any]) -> None:
    """Stop the server sending (clear its ``gate``) and wait until the fetcher has read every byte the kernel
    holds for it on ``endpoint`` (the host that serves the bytes). What the server counts as sent is then what
    the fetcher received: a kill right after costs what the design bounds, whatever the machine's load, instead
    of what sat in socket buffers. The caller sets the gate again."""
    gate.clear()
    port = int(endpoint.rsplit(":", 1)[1])
    while socket_queues(port) and proc.poll() is None:  # a fetcher that stopped reading ends at the timeout
        time.sleep(0.005)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tree(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (relative path): files by sha256, links by target, folders as ``dir``."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            out[rel] = "-> " + str(p.readlink())
        elif p.is_file():
            out[rel] = sha256(p.read_bytes())
        else:
            out[rel] = "dir"
    return out


def error_line(stderr: str) -> str:
    """The CLI's error: one line, the last and the only one that speaks of an error, with a fix after ' -> ',
    and no traceback (fails otherwise)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    assert errors == lines[-1:], stderr
    assert "Traceback" not in stderr
    assert lines[-1].startswith("dinov3-fetcher: error: ") and " -> " in lines[-1], stderr
    return lines[-1]


def dead_pid() -> int:
    """A pid no process has here (for a folder that looks left behind by a fetcher killed on this host)."""
    pid = 999_999
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid += 1
