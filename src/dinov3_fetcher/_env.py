"""Environment settings read at call time (huggingface_hub reads its own only at import)."""

from __future__ import annotations

import contextlib
import math
import os
import re
from pathlib import Path
from urllib.parse import urlsplit

from ._errors import ConfigError

__all__ = ["DEFAULT_ENDPOINT", "display_endpoint", "display_origin", "endpoint", "is_offline", "lock_disabled",
           "lock_timeout", "number"]

DEFAULT_ENDPOINT = "https://huggingface.co"
_TRUE = {"1", "ON", "YES", "TRUE"}


def _true(name: str) -> bool:
    return (os.environ.get(name) or "").strip().upper() in _TRUE


def number(name: str, default: float) -> float:
    """The environment variable ``name`` as a finite number; ``default`` when unset, empty or not one."""
    try:
        value = float(os.environ.get(name) or default)
    except ValueError:
        return default
    return value if math.isfinite(value) else default


def endpoint() -> str:
    """HF_ENDPOINT, without a trailing slash. Raises ConfigError unless it is an http(s) URL with a host."""
    url = (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).strip().rstrip("/")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number or out of range
    except ValueError:  # also "http://[::1"
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        shown = re.sub(r"//[^/@]*@", "//***@", url)  # never print a password
        raise ConfigError(f"HF_ENDPOINT={shown!r} is not an http(s) URL",
                          "set HF_ENDPOINT to e.g. https://huggingface.co or unset it")
    return url


def display_origin(url: str, *, scheme: bool = True) -> str:
    """``scheme://host:port`` of ``url`` without any user:password part, for messages."""
    parts = urlsplit(url)
    host = f"[{parts.hostname}]" if parts.hostname and ":" in parts.hostname else f"{parts.hostname}"
    return (f"{parts.scheme}://" if scheme else "") + host + (f":{parts.port}" if parts.port else "")


def display_endpoint(url: str | None = None) -> str:
    """The endpoint without any user:password part, for messages."""
    return display_origin(url or endpoint())


def is_offline() -> bool:
    """HF_HUB_OFFLINE=1 (or TRANSFORMERS_OFFLINE=1): no network at all."""
    return _true("HF_HUB_OFFLINE") or _true("TRANSFORMERS_OFFLINE")


def token_file() -> Path:
    """Where ``hf auth login`` keeps the token: HF_TOKEN_PATH, else $HF_HOME/token (huggingface_hub's rule)."""
    if path := os.environ.get("HF_TOKEN_PATH"):
        return Path(os.path.expandvars(path)).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path("~/.cache").expanduser())
    home = os.environ.get("HF_HOME") or str(Path(cache) / "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "token"


def known_secrets() -> list[str]:
    """Every token this process could send (HF_TOKEN and the stored one, MODELSCOPE_API_TOKEN and the saved
    ModelScope login), to scrub from anything printed."""
    found = [os.environ.get("HF_TOKEN") or "", os.environ.get("HUGGING_FACE_HUB_TOKEN") or "",
             os.environ.get("MODELSCOPE_API_TOKEN") or ""]
    with contextlib.suppress(OSError):
        found.append(token_file().read_text(encoding="utf-8", errors="replace"))
    with contextlib.suppress(Exception):  # ModelScope's saved login; no home folder is no login
        from ._sources.modelscope import saved_token

        found.append(saved_token() or "")
    return [t.strip() for t in found if len(t.strip()) >= 4]


def lock_timeout(default: float = 3600.0) -> float:
    """DINOV3_FETCHER_LOCK_TIMEOUT: seconds to wait for another fetcher on the same dino_root."""
    return number("DINOV3_FETCHER_LOCK_TIMEOUT", default)


def lock_disabled() -> bool:
    """DINOV3_FETCHER_NO_LOCK=1: skip the inter-process lock (what a filesystem with broken locks does anyway)."""
    return _true("DINOV3_FETCHER_NO_LOCK")
