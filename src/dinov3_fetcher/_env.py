"""Environment settings read at call time (huggingface_hub reads its own only at import)."""

from __future__ import annotations

import contextlib
import math
import os
import re
from pathlib import Path
from urllib.parse import urlsplit

from ._errors import ConfigError

__all__ = ["DEFAULT_ENDPOINT", "display_endpoint", "display_origin", "endpoint", "hf_import_compat", "is_offline",
           "lock_disabled", "lock_timeout", "number", "retry_after", "timeout"]

DEFAULT_ENDPOINT = "https://huggingface.co"
_TRUE = {"1", "ON", "YES", "TRUE"}
# Knobs that must be > 0 (a socket timeout of 0 is non-blocking, a negative one is refused by the socket).
_POSITIVE = {"DINOV3_FETCHER_TIMEOUT", "HF_HUB_DOWNLOAD_TIMEOUT"}
# HF_HUB_DOWNLOAD_TIMEOUT as the user set it, before hf_import_compat() rounded it for huggingface_hub.
_ORIGINAL: dict[str, tuple[str, str | None]] = {}  # name -> (as set, what huggingface_hub was shown)


def _true(name: str) -> bool:
    return (os.environ.get(name) or "").strip().upper() in _TRUE


def _raw(name: str) -> str | None:
    """The variable as the user set it (what hf_import_compat() rewrote counts as the original value)."""
    current = os.environ.get(name)
    if name in _ORIGINAL and _ORIGINAL[name][1] == current:
        return _ORIGINAL[name][0]
    return current


def number(name: str, default: float) -> float:
    """The environment variable ``name`` as a finite number; ``default`` when unset, empty or not one.

    Raises ConfigError for a negative value (every knob is a count, a size or a duration), and for a timeout
    (DINOV3_FETCHER_TIMEOUT, HF_HUB_DOWNLOAD_TIMEOUT) that is not above 0.
    """
    raw = _raw(name)
    try:
        value = float(raw or default)
    except ValueError:
        return default
    if not math.isfinite(value):
        return default
    if value < 0 or (name in _POSITIVE and value <= 0):
        least = "above 0" if name in _POSITIVE else "0 or more"
        raise ConfigError(f"{name}={(raw or '').strip()} is not a valid setting: it must be {least}",
                          f"set {name} to a number {least} (seconds, counts) or unset it")
    return value


def timeout(default: float) -> float:
    """Seconds without a byte before a request is given up: DINOV3_FETCHER_TIMEOUT, else its alias
    HF_HUB_DOWNLOAD_TIMEOUT (fractions allowed in both), else ``default``. Raises ConfigError when <= 0."""
    return number("DINOV3_FETCHER_TIMEOUT", number("HF_HUB_DOWNLOAD_TIMEOUT", default))


def retry_after(value: str | None, cap: float = 120.0) -> float | None:
    """A Retry-After header in seconds, clamped to [0, cap]; None when absent or not a finite number
    ("nan", "inf", an HTTP date): the caller's own backoff applies then."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return min(max(seconds, 0.0), cap) if math.isfinite(seconds) else None


def hf_import_compat() -> None:
    """Make the environment readable by huggingface_hub before it is imported.

    huggingface_hub parses HF_HUB_DOWNLOAD_TIMEOUT with int() at import, so a documented value like ``1.5``
    crashed the import. The value is kept here for ``timeout()`` and huggingface_hub sees it rounded up.
    Idempotent; runs when this module is imported (before any import of huggingface_hub by this package).
    """
    raw = os.environ.get("HF_HUB_DOWNLOAD_TIMEOUT")
    if raw is None or raw.strip().lstrip("-").isdigit():
        return
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    shown = str(math.ceil(value)) if math.isfinite(value) and value > 0 else None
    _ORIGINAL["HF_HUB_DOWNLOAD_TIMEOUT"] = (raw, shown)
    if shown is not None:
        os.environ["HF_HUB_DOWNLOAD_TIMEOUT"] = shown
    else:  # not a usable number: huggingface_hub uses its default, timeout() reports or ignores it
        del os.environ["HF_HUB_DOWNLOAD_TIMEOUT"]


def endpoint() -> str:
    """HF_ENDPOINT, without a trailing slash. Raises ConfigError unless it is an http(s) URL with a host."""
    url = (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).strip().rstrip("/")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number or out of range
    except ValueError:  # also "http://[::1"
        parts = None
    shown = re.sub(r"//[^/@]*@", "//***@", url)  # never print a password
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"HF_ENDPOINT={shown!r} is not an http(s) URL",
                          "set HF_ENDPOINT to e.g. https://huggingface.co or unset it")
    if parts.username is not None or parts.password is not None:
        raise ConfigError(f"HF_ENDPOINT={shown!r} carries a user name or password, which downloads cannot use",
                          "remove 'user:password@' from HF_ENDPOINT: the Hub token goes in HF_TOKEN, a proxy's "
                          "credentials in HTTPS_PROXY")
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


hf_import_compat()
