"""Environment settings read at call time (huggingface_hub reads its own only at import)."""

from __future__ import annotations

import os
from urllib.parse import urlsplit

__all__ = ["DEFAULT_ENDPOINT", "display_endpoint", "endpoint", "is_offline", "lock_disabled", "lock_timeout"]

DEFAULT_ENDPOINT = "https://huggingface.co"
_TRUE = {"1", "ON", "YES", "TRUE"}


def _true(name: str) -> bool:
    return (os.environ.get(name) or "").strip().upper() in _TRUE


def endpoint() -> str:
    """HF_ENDPOINT, without a trailing slash."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def display_endpoint(url: str | None = None) -> str:
    """The endpoint without any user:password part, for messages."""
    parts = urlsplit(url or endpoint())
    return f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")


def is_offline() -> bool:
    """HF_HUB_OFFLINE=1 (or TRANSFORMERS_OFFLINE=1): no network at all."""
    return _true("HF_HUB_OFFLINE") or _true("TRANSFORMERS_OFFLINE")


def lock_timeout(default: float = 3600.0) -> float:
    try:
        return float(os.environ.get("DINOV3_FETCHER_LOCK_TIMEOUT", default))
    except ValueError:
        return default


def lock_disabled() -> bool:
    """DINOV3_FETCHER_NO_LOCK=1: skip the inter-process lock (what a filesystem with broken locks does anyway)."""
    return _true("DINOV3_FETCHER_NO_LOCK")
