"""One network policy for both HTTP clients: the same proxies and the same trusted CAs as huggingface_hub.

The metadata goes through huggingface_hub 2.4's client (httpx2 / httpcore2, ``trust_env=True``), the bytes
through our own (``http.py``). Both must route and trust alike, or a site behind a TLS-inspecting proxy sees
the metadata work and the download fail. What huggingface_hub 2.4's client does, read from its sources:

Proxies: which one a URL takes, as huggingface_hub's client picks it (``proxies.py``).

CAs: ``httpcore2.default_ssl_context()`` itself (what httpx2 builds for huggingface_hub's client): ``SSL_CERT_FILE``,
  else ``SSL_CERT_DIR``, else on macOS and Windows the OS store through ``truststore``, else OpenSSL's compiled-in
  paths (or the first existing common bundle file). certifi is not used, and neither are ``REQUESTS_CA_BUNDLE``
  or ``CURL_CA_BUNDLE``. The variables are checked first (a regular file holding PEM certificates, a folder):
  a problem is a ConfigError naming the variable.

Where huggingface_hub's own client cannot start in this environment (it reads SSL_CERT_FILE and every proxy
variable when it is built, whatever the endpoint), ``hub_client`` builds it from this policy instead.
"""

from __future__ import annotations

import os
import re
import socket
import ssl
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .._errors import ConfigError, NetworkError
from .._secrets import without_url_secrets
from .proxies import Proxy, proxy_for, proxy_rules

__all__ = [
    "Proxy",
    "ca_problem",
    "certificate_error",
    "hub_client",
    "network_error",
    "origin_key",
    "proxy_for",
    "refusal",
    "ssl_context",
    "tls_error_hint",
]


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
    import httpcore2

    ca_problem(cafile, capath, raise_it=True)
    try:
        return httpcore2.default_ssl_context()  # what huggingface_hub's client builds (httpx2 with trust_env)
    except (OSError, ssl.SSLError) as exc:
        name, value = ("SSL_CERT_FILE", cafile) if cafile else ("SSL_CERT_DIR", capath)
        raise ConfigError(f"{name}={value} is not usable: {exc}", f"point {name} at CA certificates in PEM form, or "
                          "unset it") from None


def ca_problem(cafile: str | None, capath: str | None, *, raise_it: bool = False) -> str | None:
    """Why SSL_CERT_FILE (``cafile``) or else SSL_CERT_DIR (``capath``) cannot be used, or None. Read with the one
    reader of user files (a FIFO there would hang OpenSSL's read) and parsed as PEM; ``raise_it``: ConfigError."""
    from .._userfile import PEM_LIMIT, Refused, read_regular

    why, name, value = None, "SSL_CERT_FILE", cafile
    if cafile:
        try:
            ssl.create_default_context(cadata=read_regular(cafile, PEM_LIMIT).decode("utf-8", "replace"))
        except Refused as exc:
            why = exc.reason
        except (ssl.SSLError, ValueError) as exc:
            why = f"holds no CA certificate in PEM form ({exc})"
    elif capath and not Path(capath).is_dir():
        why, name, value = "is not a folder", "SSL_CERT_DIR", capath
    if why is not None and raise_it:
        raise ConfigError(f"{name}={value} {why}", f"point {name} at CA certificates in PEM form (a bundle file for "
                          "SSL_CERT_FILE, a hashed folder for SSL_CERT_DIR), or unset it")
    return f"{name}={value} {why}" if why is not None else None


def hub_client() -> Any:
    """An httpx2 client for huggingface_hub built from this policy, for a process where huggingface_hub's own
    cannot start: it reads SSL_CERT_FILE and builds every proxy variable's transport when it starts, so an
    unusable CA bundle or a socks5:// proxy (socksio is not installed) breaks it even for an endpoint that
    neither concerns. This one leaves each problem to the request it concerns: with an unusable CA bundle it
    trusts no certificate (an https request fails as a certificate error naming the variable), and a proxy it
    cannot build refuses what it would carry (the error names the variable)."""
    import httpx2

    class Refusing(httpx2.BaseTransport):  # a proxy that cannot be built: what it would carry fails naming it
        def __init__(self, why: str) -> None:
            self.why = why

        def handle_request(self, request: httpx2.Request) -> httpx2.Response:
            raise httpx2.ProxyError(self.why, request=request)

    try:
        ctx = ssl_context()
    except ConfigError:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # trusts nothing: https fails, http is not concerned
    mounts: dict[str, httpx2.BaseTransport | None] = {}
    for pattern, target in proxy_rules():
        if target is None:
            mounts[pattern] = None
            continue
        try:
            mounts[pattern] = httpx2.HTTPTransport(proxy=target[0], verify=ctx)
        except Exception as exc:  # a socks proxy without socksio, a proxy URL httpx2 refuses
            mounts[pattern] = Refusing(f"{target[1]} names a proxy that cannot be used here ({exc})")
    return httpx2.Client(follow_redirects=True, timeout=None, verify=ctx, trust_env=False, mounts=mounts)


def tls_error_hint() -> str:
    """What to do about a certificate that is not trusted, for the current environment."""
    cafile = os.environ.get("SSL_CERT_FILE") or None
    if (why := ca_problem(cafile, os.environ.get("SSL_CERT_DIR") or None)) is not None:
        return f"{why}: point it at CA certificates in PEM form, or unset it"
    if cafile:
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
    where = _where(url)
    if (cert := certificate_error(exc, where)) is not None:
        return cert
    try:
        proxy = via or proxy_for(url)
    except ConfigError as config:
        return config
    if proxy is None:
        return None
    chain = _chain(exc)
    text = without_url_secrets(" ".join(str(e) for e in chain), url)
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
    where = _where(url)
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
            f"a signed link {_where(asked)} redirected to",
            f"the token is not the cause (it never goes there): let {where} through your proxy or firewall and check "
            "this machine's clock (signed links expire), then run again: it resumes")
    return None


def origin_key(url: str) -> tuple[str, str | None, int | None]:
    """(scheme, host, port) with the scheme's default port filled in: what decides who gets the token."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, parts.hostname, parts.port or {"http": 80, "https": 443}.get(scheme)


def _where(url: str) -> str:
    """The host[:port] ``url`` names, as written and without any user:password part, for messages; "the server"
    when it names none."""
    return urlsplit(url).netloc.rpartition("@")[2] or "the server"


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
