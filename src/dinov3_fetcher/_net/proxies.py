"""Which proxy a URL takes: the rules of huggingface_hub 2.4's client, read from its sources.

Proxies (``httpx2._utils.get_environment_proxies`` + ``URLPattern``, ``httpx2.Client._transport_for_url``):
  ``urllib.request.getproxies()`` (the environment; on macOS / Windows also the system settings) gives
  ``http``, ``https`` and ``all`` (ALL_PROXY) proxies, mounted as ``http://``, ``https://``, ``all://``; a proxy
  without a scheme is ``http://``. NO_PROXY entries: ``*`` disables every proxy; an entry with ``://`` is a URL
  pattern; an IPv4 or IPv6 address (brackets optional, ``/prefix`` = CIDR) matches that address or network;
  ``localhost`` matches localhost; ``*.x`` matches subdomains of x only; any other name without ``/`` matches
  the name and its subdomains (``x`` -> ``x``, ``a.x``); ``host:port`` adds a port (a URL's port is None when it
  is its scheme's default). The most specific pattern wins: with a port first, then exact hosts, then smaller
  networks, then longer hosts, then longer schemes. Proxy schemes: http, https (TLS to the proxy), socks5(h).

Our client supports http proxies (plain requests with absolute URLs, CONNECT tunnels for https) and refuses
https and socks proxies with a ConfigError naming the variable (they need TLS inside TLS, or SOCKS).
"""

from __future__ import annotations

import base64
import ipaddress
import os
import re
import urllib.request
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from .._errors import ConfigError

__all__ = ["Proxy", "proxy_for", "proxy_rules"]

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443, "ftp": 21}


@dataclass(frozen=True)
class Proxy:
    """A forward proxy for one URL: where to connect, what to send it, and where it was configured."""

    scheme: str  # "http" (the only one our client speaks)
    host: str
    port: int
    variable: str  # the environment variable that set it ("HTTPS_PROXY", "all_proxy", ...) or "system settings"
    headers: dict[str, str] = field(default_factory=dict, repr=False)  # Proxy-Authorization, if it has credentials

    @property
    def display(self) -> str:
        """``host:port (VARIABLE)``, no credentials: how messages name it."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port} ({self.variable})"


# ---------- proxies ----------

@dataclass(frozen=True)
class _Pattern:
    """httpx2's URLPattern, for the patterns get_environment_proxies builds."""

    pattern: str
    scheme: str  # "" for all://
    host: str  # "" for any
    port: int | None
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None
    host_regex: re.Pattern[str] | None

    @classmethod
    def parse(cls, pattern: str) -> _Pattern:
        """Raises ValueError where httpx2 raises InvalidURL (the entry is then ignored, as httpx2 does)."""
        scheme, sep, rest = pattern.partition("://")
        if not sep:
            raise ValueError(pattern)
        scheme = scheme.lower()
        netloc, slash, path = rest.partition("/")
        if "@" in netloc:
            raise ValueError(pattern)
        host, port = _split_host_port(netloc)
        if port is not None and port == _DEFAULT_PORTS.get(scheme):
            port = None
        network = None
        prefix = path.rstrip("/") if slash else ""
        if prefix and (_is_ip(host, 4) or _is_ip(host, 6)):
            bracketed = f"[{host}]" if ":" in host else host
            if "%" in pattern or not prefix.isdigit() or not pattern.endswith(f"{bracketed}/{prefix}"):
                raise ValueError(pattern)
            network = ipaddress.ip_network(f"{host}/{prefix}", strict=False)
        regex = None
        if network is None and host and host != "*":
            if host.startswith("*."):
                regex = re.compile(f"^.+\\.{re.escape(host[2:])}$")
            elif host.startswith("*"):
                regex = re.compile(f"^(.+\\.)?{re.escape(host[1:])}$")
            else:
                regex = re.compile(f"^{re.escape(host)}$")
        return cls(pattern, "" if scheme == "all" else scheme, "" if host == "*" else host, port, network, regex)

    def matches(self, scheme: str, host: str, port: int | None) -> bool:
        if self.scheme and self.scheme != scheme:
            return False
        if self.network is not None:
            try:
                if ipaddress.ip_address(host) not in self.network:
                    return False
            except ValueError:
                return False
        elif self.host and self.host_regex is not None and not self.host_regex.match(host):
            return False
        return not (self.port is not None and self.port != port)

    @property
    def priority(self) -> tuple[int, int, int, int, int]:
        return (0 if self.port is not None else 1,
                1 if self.network is not None else 0 if self.host else 2,
                self.network.num_addresses if self.network is not None else 0,
                -len(self.host) if self.network is None else 0,
                -len(self.scheme))


def _split_host_port(netloc: str) -> tuple[str, int | None]:
    if netloc.startswith("["):
        host, closed, rest = netloc[1:].partition("]")
        if not closed or not _is_ip(host, 6):
            raise ValueError(netloc)
        port_s = rest[1:] if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise ValueError(netloc)
    elif netloc.count(":") == 1:
        host, port_s = netloc.split(":")
    else:
        host, port_s = netloc, ""
    if port_s and not port_s.isdigit():
        raise ValueError(netloc)
    port = int(port_s) if port_s else None
    if port is not None and port > 65535:
        raise ValueError(netloc)
    if any(c.isspace() for c in host) or any(c in host for c in "/?#\\"):
        raise ValueError(netloc)
    return host.lower(), port


def _is_ip(host: str, version: int) -> bool:
    try:
        (ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address)(host.split("/")[0])
    except ValueError:
        return False
    return True


def _no_proxy_pattern(entry: str) -> str | None:
    """httpx2's translation of one NO_PROXY entry into a URL pattern (None: ignored)."""
    if "://" in entry:
        return entry
    if _is_ip(entry, 4):
        return f"all://{entry}"
    if _is_ip(entry, 6):
        if "/" in entry:
            addr, _, subnet = entry.partition("/")
            return f"all://[{addr}]/{subnet}"
        return f"all://[{entry}]"
    if entry.lower() == "localhost" or entry.startswith("[") or (entry.startswith("*.") and "/" not in entry):
        return f"all://{entry}"
    if "/" not in entry:
        return f"all://*{entry}"
    return None


def _variable(key: str) -> str:
    """The environment variable that getproxies() took ``key`` ("http", "https", "all") from."""
    for name in (f"{key}_proxy", f"{key.upper()}_PROXY"):  # getproxies prefers the lower-case one
        if os.environ.get(name):
            return name
    return "system proxy settings"


def _mounts() -> list[tuple[_Pattern, tuple[str, str] | None]]:
    """The client's mounts, most specific first: (pattern, (proxy URL, its variable) or None for direct)."""
    info = urllib.request.getproxies()
    mounts: dict[str, tuple[str, str] | None] = {}
    for key in ("http", "https", "all"):
        if info.get(key):
            url = info[key]
            mounts[f"{key}://"] = (url if "://" in url else f"http://{url}", _variable(key))
    for entry in (h.strip() for h in info.get("no", "").split(",")):
        if entry == "*":
            return []
        if entry and (pattern := _no_proxy_pattern(entry)) is not None:
            mounts[pattern] = None
    parsed: list[tuple[_Pattern, tuple[str, str] | None]] = []
    for pattern, target in mounts.items():
        try:
            parsed.append((_Pattern.parse(pattern), target))
        except ValueError:
            continue  # like httpx2 (and curl, Go): an entry that cannot be parsed is ignored
    parsed.sort(key=lambda item: item[0].priority)
    return parsed


def proxy_for(url: str) -> Proxy | None:
    """The proxy huggingface_hub's client would use for ``url``, or None to connect directly.

    Raises ConfigError for a proxy our client cannot speak (https://, socks5://) or cannot parse."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    port = parts.port
    if port is not None and port == _DEFAULT_PORTS.get(scheme):
        port = None
    for pattern, target in _mounts():
        if pattern.matches(scheme, host, port):
            return None if target is None else _parse_proxy(*target)
    return None


def _parse_proxy(url: str, variable: str) -> Proxy:
    p = urlsplit(url)
    scheme = p.scheme.lower()
    try:
        host, port = p.hostname, p.port
    except ValueError:
        host, port = None, None
    if not host:
        raise ConfigError(f"{variable} is not a proxy URL", f"set {variable} to http://HOST:PORT")
    shown = f"[{host}]" if ":" in host else host
    if scheme != "http":
        raise ConfigError(
            f"{variable} names a {scheme}:// proxy ({shown}"
            f"{f':{port}' if port else ''}); dinov3-fetcher speaks only to http:// proxies",
            f"set {variable}=http://{shown}:{port or 3128} if the proxy also accepts plain HTTP (https:// "
            "downloads still go through an end-to-end encrypted CONNECT tunnel), or unset it",
        )
    headers: dict[str, str] = {}
    if p.username is not None:
        creds = f"{unquote(p.username)}:{unquote(p.password or '')}".encode()
        headers["Proxy-Authorization"] = "Basic " + base64.b64encode(creds).decode("ascii")
    return Proxy("http", host, port or 80, variable, headers)


def proxy_rules() -> list[tuple[str, tuple[str, str] | None]]:
    """The client's mounts as httpx2 patterns, most specific first: (pattern, (proxy URL, its variable) or None
    for a direct connection)."""
    return [(pattern.pattern, target) for pattern, target in _mounts()]
