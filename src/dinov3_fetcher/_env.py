"""Settings from the environment, read at call time and only here (nothing is read or changed at import).

The transfer's knobs, offline mode, the lock, the default source, the registry override, the host name the
state folder uses; and how an endpoint variable is checked and shown. A source's own variables (HF_ENDPOINT and
the Hub's token, MODELSCOPE_*) are read by that source, and the network policy's (proxies, CAs) by ``_net``.
"""

from __future__ import annotations

import math
import os
import socket

# Light at import (``re``, ``urllib.parse`` and ``_errors`` are imported where used): the command's first
# connections (``_dial``) ask it whether the network may be used before anything heavier is imported.

__all__ = ["DEFAULT_TIMEOUT", "default_source", "display_origin", "endpoint_url", "hide_password", "host_name",
           "is_offline", "lock_disabled", "lock_timeout", "number", "registry_file", "stale_after", "timeout"]

DEFAULT_TIMEOUT = 30.0  # seconds without a byte before a request is given up
_TRUE = {"1", "ON", "YES", "TRUE"}
# Knobs that must be > 0 (a socket timeout of 0 is non-blocking, a negative one is refused by the socket).
_POSITIVE = {"DINOV3_FETCHER_TIMEOUT", "HF_HUB_DOWNLOAD_TIMEOUT"}


def _true(name: str) -> bool:
    return (os.environ.get(name) or "").strip().upper() in _TRUE


def number(name: str, default: float) -> float:
    """The environment variable ``name`` as a finite number; ``default`` when unset, empty or not one.

    Raises ConfigError for a negative value (every knob is a count, a size or a duration), and for a timeout
    (DINOV3_FETCHER_TIMEOUT, HF_HUB_DOWNLOAD_TIMEOUT) that is not above 0.
    """
    raw = os.environ.get(name)
    try:
        value = float(raw or default)
    except ValueError:
        return default
    if not math.isfinite(value):
        return default
    if value < 0 or (name in _POSITIVE and value <= 0):
        from ._errors import ConfigError

        least = "above 0" if name in _POSITIVE else "0 or more"
        raise ConfigError(f"{name}={(raw or '').strip()} is not a valid setting: it must be {least}",
                          f"set {name} to a number {least} (seconds, counts) or unset it")
    return value


def timeout() -> float:
    """Seconds without a byte before a request is given up: DINOV3_FETCHER_TIMEOUT, else its alias
    HF_HUB_DOWNLOAD_TIMEOUT (fractions allowed in both), else DEFAULT_TIMEOUT. Raises ConfigError when <= 0."""
    return number("DINOV3_FETCHER_TIMEOUT", number("HF_HUB_DOWNLOAD_TIMEOUT", DEFAULT_TIMEOUT))


def is_offline() -> bool:
    """HF_HUB_OFFLINE=1 (or TRANSFORMERS_OFFLINE=1): no network at all."""
    return _true("HF_HUB_OFFLINE") or _true("TRANSFORMERS_OFFLINE")


def lock_timeout(default: float = 3600.0) -> float:
    """DINOV3_FETCHER_LOCK_TIMEOUT: seconds to wait for another fetcher on the same dino_root."""
    return number("DINOV3_FETCHER_LOCK_TIMEOUT", default)


def lock_disabled() -> bool:
    """DINOV3_FETCHER_NO_LOCK=1: skip the inter-process lock (what a filesystem with broken locks does anyway)."""
    return _true("DINOV3_FETCHER_NO_LOCK")


def default_source() -> str:
    """DINOV3_FETCHER_SOURCE, else "hf": the source when neither a flag nor the pipeline config names one."""
    return os.environ.get("DINOV3_FETCHER_SOURCE", "").strip() or "hf"


def registry_file() -> str:
    """DINOV3_FETCHER_REGISTRY: a JSON file of pins that replace or extend the built-in ones ("" when unset)."""
    return os.environ.get("DINOV3_FETCHER_REGISTRY", "").strip()


def host_name() -> str:
    """This host as the state folder's claims name it: DINOV3_FETCHER_HOSTNAME, else the host name."""
    return os.environ.get("DINOV3_FETCHER_HOSTNAME") or socket.gethostname()


def stale_after(default: float) -> float:
    """DINOV3_FETCHER_STALE_AFTER: seconds another host's silent heartbeat is watched before its folder counts
    as abandoned; ``default`` when unset or not a number >= 0."""
    try:
        value = float(os.environ.get("DINOV3_FETCHER_STALE_AFTER", ""))
    except ValueError:
        return default
    return value if value >= 0 and math.isfinite(value) else default


def hide_password(url: str) -> str:
    """``url`` with any ``user:password@`` shown as ``***@``, for messages."""
    import re

    return re.sub(r"//[^/@]*@", "//***@", url)


def endpoint_url(name: str, url: str, *, example: str, token: str) -> str:
    """``url``, the value of the endpoint variable ``name``, once checked: an http(s) URL with a host and a
    valid port, and no query, fragment, space or credentials.

    Raises ConfigError naming ``name`` (the password hidden): with the hint ``example`` when it is not such a
    URL; with ``token`` (where the credential goes instead) when it carries a user name or password.
    """
    from urllib.parse import urlsplit

    from ._errors import ConfigError

    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number or out of range
        ok = (parts.scheme in ("http", "https") and bool(parts.hostname) and not parts.query
              and not parts.fragment and " " not in url)
        userinfo = parts.username is not None or parts.password is not None
    except ValueError:  # also "http://[::1"
        ok, userinfo = False, False
    if not ok:
        raise ConfigError(f"{name}={hide_password(url)!r} is not an http(s) URL", example)
    if userinfo:
        raise ConfigError(f"{name}={hide_password(url)!r} carries a user name or password, which downloads cannot "
                          f"use", f"remove 'user:password@' from {name}: {token}, a proxy's credentials in "
                          "HTTPS_PROXY")
    return url


def display_origin(url: str, *, scheme: bool = True) -> str:
    """``scheme://host:port`` of ``url`` without any user:password part, for messages."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host = f"[{parts.hostname}]" if parts.hostname and ":" in parts.hostname else f"{parts.hostname}"
    return (f"{parts.scheme}://" if scheme else "") + host + (f":{parts.port}" if parts.port else "")
