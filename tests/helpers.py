"""Small shortcuts the tests share: a fetch with its detailed result, the dry run by arguments, and waiting for
a group of processes (the torchrun "nodes") with one deadline."""

from __future__ import annotations

import os
import subprocess
import time
from typing import Any

from dinov3_fetcher import FetchResult, fetch_dinov3
from dinov3_fetcher._config import make_request
from dinov3_fetcher._plan import DryRun, dry_run


def fetch(dino_root: str | os.PathLike[str], model: str, **kwargs: Any) -> FetchResult:
    return fetch_dinov3(dino_root, model, details=True, **kwargs)


def plan(dino_root: str | os.PathLike[str], model: str, revision: str | None = None) -> DryRun:
    return dry_run(make_request(dino_root, model, revision))


def wait_all(procs: list[subprocess.Popen[str]], timeout: float) -> list[subprocess.CompletedProcess[str]]:
    """Each process's output and exit status, all within ``timeout`` seconds together; any still running then
    (or when something fails) is killed."""
    t0, done = time.monotonic(), []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=max(1.0, timeout - (time.monotonic() - t0)))
            done.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return done
