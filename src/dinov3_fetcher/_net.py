"""One network policy for both HTTP clients: the same proxies and the same trusted CAs as huggingface_hub.

The metadata goes through huggingface_hub 2.4's client (httpx2 / httpcore2, ``trust_env=True``), the bytes
through our own (``http.py``). Both must route and trust alike, or a site behind a TLS-inspecting proxy sees
the metadata work and the download fail. What huggingface_hub 2.4's client does, read from its sources:

Proxies (``httpx2._utils.get_environment_proxies`` + ``URLPattern``, ``httpx2.Client._transport_for_url``):
  ``urllib.request.getproxies()`` (the environment; on macOS / Windows also the system settings) gives
  ``http``, ``https`` and ``all`` (ALL_PROXY) proxies, mounted as ``http://``, ``https://``, ``all://``; a proxy
  without a scheme is ``http://``. NO_PROXY entries: ``*`` disables every proxy; an entry with ``://`` is a URL
  pattern; an IPv4 or IPv6 address (brackets optional, ``/prefix`` = CIDR) matches that address or network;
  ``localhost`` matches localhost; ``*.x`` matches subdomains of x only; any other name without ``/`` matches
  the name and its subdomains (``x`` -> ``x``, ``a.x``); ``host:port`` adds a port (a URL's port is None when it
  is its scheme's default). The most specific pattern wins: with a port first, then exact hosts, then smaller
  networks, then longer hosts, then longer schemes. Proxy schemes: http, https (TLS to the proxy), socks5(h).

CAs (``httpcore2.default_ssl_context``): ``SSL_CERT_FILE``, else ``SSL_CERT_DIR``, else on macOS and Windows
  the OS store through ``truststore``, else OpenSSL's compiled-in paths (or the first existing common bundle
  file). certifi is not used, and neither are ``REQUESTS_CA_BUNDLE`` or ``CURL_CA_BUNDLE``.

Our client supports http proxies (plain requests with absolute URLs, CONNECT tunnels for https) and refuses
https and socks proxies with a ConfigError naming the variable (they need TLS inside TLS, or SOCKS).
"""

from __future__ import annotations

import base64
import ipaddress
import os
import platform
import re
import socket
import ssl
import threading
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

from ._errors import ConfigError, NetworkError

__all__ = ["Proxy", "certificate_error", "network_error", "origin_key", "proxy_for", "refusal", "ssl_context",
           "tls_error_hint"]

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443, "ftp": 21}
# httpcore2._ssl.CA_FILE_CANDIDATES (truststore's Linux fallbacks)
_CA_FILE_CANDIDATES = (
    "/etc/ssl/cert.pem",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
    "/etc/pki/tls/cert.pem",
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/ssl/ca-bundle.pem",
)


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


# ---------- CAs ----------

_SSL_LOCK = threading.Lock()
_SSL_CACHE: dict[tuple[str | None, str | None], ssl.SSLContext] = {}


def ssl_context() -> ssl.SSLContext:
    """The SSL context huggingface_hub's client verifies with (httpcore2.default_ssl_context), cached per
    SSL_CERT_FILE / SSL_CERT_DIR. Raises ConfigError when the variable names an unusable file or directory."""
    key = (os.environ.get("SSL_CERT_FILE") or None, os.environ.get("SSL_CERT_DIR") or None)
    with _SSL_LOCK:
        ctx = _SSL_CACHE.get(key)
        if ctx is None:
            ctx = _SSL_CACHE[key] = _build_ssl_context(*key)
        return ctx


def _build_ssl_context(cafile: str | None, capath: str | None) -> ssl.SSLContext:
    if cafile:
        try:
            return ssl.create_default_context(cafile=cafile)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"SSL_CERT_FILE={cafile} is not a readable PEM bundle ({exc})",
                              "point SSL_CERT_FILE at a PEM file of CA certificates, or unset it") from None
    if capath:
        try:
            return ssl.create_default_context(capath=capath)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"SSL_CERT_DIR={capath} is not usable ({exc})",
                              "point SSL_CERT_DIR at a directory of hashed CA certificates, or unset it") from None
    if platform.system() in ("Windows", "Darwin"):
        import truststore

        return truststore.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    paths = ssl.get_default_verify_paths()
    file = paths.openssl_cafile if Path(paths.openssl_cafile).is_file() else None
    path = paths.openssl_capath if Path(paths.openssl_capath).is_dir() else None
    if path and not file and not any(re.fullmatch(r"[0-9a-fA-F]{8}\.\d", f.name) for f in Path(path).iterdir()):
        path = None
    if not file and not path:
        file = next((c for c in _CA_FILE_CANDIDATES if Path(c).is_file()), None)
    if file or path:
        ctx.load_verify_locations(file, path)
    return ctx


def tls_error_hint() -> str:
    """What to do about a certificate that is not trusted, for the current environment."""
    if cafile := os.environ.get("SSL_CERT_FILE"):
        return (f"SSL_CERT_FILE={cafile} does not hold the CA that signed it: add that CA (a proxy that inspects "
                "TLS re-signs with its own) to the PEM bundle SSL_CERT_FILE names")
    if capath := os.environ.get("SSL_CERT_DIR"):
        return f"SSL_CERT_DIR={capath} does not hold the CA that signed it: add that CA, or set SSL_CERT_FILE"
    return ("if a proxy or your site re-signs TLS with its own CA, set SSL_CERT_FILE to a PEM bundle that holds it "
            "(huggingface_hub reads the same variable; REQUESTS_CA_BUNDLE is not read)")


def certificate_error(exc: BaseException, where: str) -> NetworkError | None:
    """A NetworkError that says "certificate" and which variable fixes it, if ``exc`` (or what caused it, as
    httpx2 wraps it) is a certificate verification failure; else None. ``where`` names the host."""
    for e in _chain(exc):
        if isinstance(e, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(e):
            reason = getattr(e, "verify_message", None) or str(e)
            return NetworkError(f"the TLS certificate of {where} is not trusted (certificate problem: {reason})",
                                tls_error_hint())
    return None


def network_error(exc: BaseException, url: str, via: Proxy | None = None) -> NetworkError | ConfigError | None:
    """The NetworkError to raise for a failure to connect to ``url`` when the cause is not the endpoint itself:
    an untrusted certificate, or a proxy that cannot be reached or refused the tunnel. None otherwise.

    For huggingface_hub's errors too (httpx2.ConnectError / ProxyError wrap the ssl or socket error), so the
    metadata path can report the same. ``via``: the proxy used, if known (else looked up for ``url``).
    A proxy variable our client cannot use (https://, socks5://) gives its ConfigError."""
    parts = urlsplit(url)
    where = parts.netloc or url
    if (cert := certificate_error(exc, where)) is not None:
        return cert
    try:
        proxy = via or proxy_for(url)
    except ConfigError as config:
        return config
    if proxy is None:
        return None
    chain = _chain(exc)
    text = " ".join(str(e) for e in chain)
    names = {type(e).__name__ for e in chain}
    if "ProxyError" in names or "Tunnel connection failed" in text:
        return NetworkError(f"the proxy {proxy.display} refused to carry the request to {where} ({text[:200]})",
                            f"check the proxy's access rules and credentials, or leave {where} out of it "
                            "with NO_PROXY")
    if any(isinstance(e, ConnectionRefusedError | TimeoutError | socket.gaierror) for e in chain) \
            or names & {"ConnectError", "ConnectTimeout"}:
        return NetworkError(f"cannot reach the proxy {proxy.display} (on the way to {where}): {type(exc).__name__}",
                            f"check that the proxy runs and that {proxy.variable} is right, or unset it")
    return None


def refusal(status: int, url: str, asked: str, body: bytes = b"", name: str = "") -> NetworkError | None:
    """The NetworkError for an answer to ``url`` that refuses a request for a reason that is not the endpoint's,
    or None. ``asked``: the endpoint's URL the request began at (redirects led to ``url``); ``name``: the file.

    - 407 from a plain-HTTP proxy: the proxy refused to carry the request (named with its address and variable).
    - 401/403 from a host other than the endpoint (the storage a download was redirected to: a signed CDN URL,
      the Xet bridge, ModelScope's OSS): the storage host refused the signed link (expired, a clock far off, a
      firewall in front of it). The token is not the cause: it never goes there.
    Asked before a source reads a status, which is about the endpoint's own answers.
    """
    where = urlsplit(url).netloc.rpartition("@")[2] or url
    if status == 407:
        proxy = proxy_for(url)
        if proxy is not None:
            return NetworkError(f"the proxy {proxy.display} refused to carry the request to {where} "
                                "(HTTP 407 Proxy Authentication Required)",
                                f"put the proxy's user name and password in {proxy.variable} "
                                "(http://user:password@host:port), or leave the host out of it with NO_PROXY")
    if status in (401, 403) and origin_key(url) != origin_key(asked):
        why = _reason(body)
        return NetworkError(
            f"the storage host {where} refused {name or 'a download'} (HTTP {status}{f': {why}' if why else ''}), "
            f"a signed link {urlsplit(asked).netloc.rpartition('@')[2]} redirected to",
            f"the token is not the cause (it never goes there): let {where} through your proxy or firewall and check "
            "this machine's clock (signed links expire), then run again: it resumes")
    return None


def origin_key(url: str) -> tuple[str, str | None, int | None]:
    """(scheme, host, port) with the scheme's default port filled in: what decides who gets the token."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, parts.hostname, parts.port or {"http": 80, "https": 443}.get(scheme)


def _reason(body: bytes) -> str:
    """A storage host's short reason from its error body (S3/OSS XML ``<Message>``, JSON ``error``/``message``,
    or a short text), printable, at most 80 characters; "" when there is none."""
    text = body[:4096].decode("utf-8", "replace")
    m = re.search(r"<Message>([^<]{1,200})</Message>", text) or re.search(r"<Code>([^<]{1,100})</Code>", text) or \
        re.search(r'"(?:error|message|Message)"\s*:\s*"([^"]{1,200})"', text)
    found = m.group(1) if m else (text if len(text) <= 80 and "<" not in text else "")
    return " ".join("".join(c for c in found if c.isprintable()).split())[:80]


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and e not in out:
        out.append(e)
        e = e.__cause__ or e.__context__
    return out
