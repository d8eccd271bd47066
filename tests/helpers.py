"""Small shortcuts the tests share: a fetch with its detailed result, and the dry run, by arguments."""

from __future__ import annotations

import os
from typing import Any

from dinov3_fetcher import FetchResult, fetch_dinov3
from dinov3_fetcher._config import make_request
from dinov3_fetcher._plan import DryRun, dry_run


def fetch(dino_root: str | os.PathLike[str], model: str, **kwargs: Any) -> FetchResult:
    return fetch_dinov3(dino_root, model, details=True, **kwargs)


def plan(dino_root: str | os.PathLike[str], model: str, revision: str | None = None) -> DryRun:
    return dry_run(make_request(dino_root, model, revision))
