"""A small HTTP/1.1 client for the bytes: pooled keep-alive connections, manual redirects, proxies.

Why not huggingface_hub's httpx2 client here: the transfer loop reads straight into a reusable buffer
(``readinto``), which is what lets a verified fetch keep up with curl. Redirects are followed by hand so
that the token is sent to the endpoint's host only, never to a CDN or any other host.
"""

from __future__ import annotations

import base64
import http.client
import ssl
import threading
import urllib.request
from dataclasses import dataclass, field
from urllib.parse import unquote, urljoin, urlsplit

from ._env import display_origin
from ._errors import HubResponseError
from ._sources import Auth

__all__ = ["Connection", "HttpPool", "Response", "etag_value", "origin_key"]

Response = http.client.HTTPResponse
Connection = http.client.HTTPConnection

_REDIRECTS = (301, 302, 303, 307, 308)


@dataclass
class HttpPool:
    """Idle connections by origin, shared by the worker threads of one fetch."""

    timeout: float
    user_agent: str
    auth: Auth | None = None  # the credential headers, sent only to auth.origin's scheme, host and port
    _idle: dict[tuple[str, str], list[Connection]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _ssl: ssl.SSLContext | None = None
    _auth_key: tuple[str, str | None, int | None] | None = None

    def __post_init__(self) -> None:
        if self.auth is not None:
            self._auth_key = origin_key(self.auth.origin)

    def _origin(self, url: str) -> tuple[str, str]:
        parts = urlsplit(url)
        return parts.scheme, parts.netloc

    def _new(self, scheme: str, netloc: str) -> Connection:
        proxy = _proxy_for(scheme, netloc)
        if scheme == "https":
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            if proxy:
                host, port, auth = proxy
                conn: Connection = http.client.HTTPSConnection(host, port, timeout=self.timeout, context=self._ssl)
                target = urlsplit(f"https://{netloc}")
                conn.set_tunnel(target.hostname or netloc, target.port or 443, headers=auth)
                return conn
            return http.client.HTTPSConnection(netloc, timeout=self.timeout, context=self._ssl)
        if scheme != "http":
            raise ValueError(f"unsupported URL scheme {scheme!r}")
        if proxy:
            host, port, auth = proxy
            plain = _ProxiedHTTPConnection(host, port, timeout=self.timeout)
            plain.proxy_headers = auth
            return plain
        return http.client.HTTPConnection(netloc, timeout=self.timeout)

    def acquire(self, url: str) -> Connection:
        """An idle connection to the URL's origin, or a new one (proxy and TLS as the network policy says)."""
        origin = self._origin(url)
        with self._lock:
            idle = self._idle.get(origin)
            if idle:
                return idle.pop()
        return self._new(*origin)

    def release(self, url: str, conn: Connection) -> None:
        """Give a connection whose response was read to the end back to the pool."""
        with self._lock:
            self._idle.setdefault(self._origin(url), []).append(conn)

    def close(self) -> None:
        """Close every idle connection."""
        with self._lock:
            for conns in self._idle.values():
                for c in conns:
                    c.close()
            self._idle.clear()

    def display_host(self, url: str) -> str:
        """The URL's host[:port] for messages, without credentials or query string."""
        return display_origin(url, scheme=False)

    def headers_for(self, url: str, extra: dict[str, str]) -> dict[str, str]:
        """The request headers for ``url``; the credential only for the endpoint's own scheme, host and port."""
        headers = {"User-Agent": self.user_agent, "Accept-Encoding": "identity", **extra}
        if self.auth is not None and origin_key(url) == self._auth_key:
            headers.update(self.auth.headers)
        return headers

    def get(self, url: str, headers: dict[str, str]) -> tuple[str, Connection, Response]:
        """GET ``url`` following redirects; returns the final URL, its connection and the response (unread)."""
        for _ in range(10):
            conn, resp = self._send("GET", url, headers)
            if resp.status in _REDIRECTS and resp.getheader("Location"):
                resp.read()
                self.finish(url, conn, resp)
                url = _redirect_target(url, resp.getheader("Location") or "")
                continue
            return url, conn, resp
        raise http.client.HTTPException(f"too many redirects for {url}")

    def head(self, url: str) -> Response:
        """HEAD ``url`` without following a redirect (its headers are the answer), as huggingface_hub does."""
        conn, resp = self._send("HEAD", url, {})
        resp.read()
        self.finish(url, conn, resp)
        return resp

    def _send(self, method: str, url: str, headers: dict[str, str]) -> tuple[Connection, Response]:
        conn = self.acquire(url)
        target = url if isinstance(conn, _ProxiedHTTPConnection) else _path(url)
        try:
            conn.request(method, target, headers=self._request_headers(conn, url, headers))
            return conn, conn.getresponse()
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
            # A kept-alive connection the server had closed: one fresh try.
            conn.close()
            conn = self._new(*self._origin(url))
            try:
                conn.request(method, target, headers=self._request_headers(conn, url, headers))
                return conn, conn.getresponse()
            except BaseException:
                conn.close()
                raise
        except BaseException as exc:
            conn.close()
            if isinstance(exc, OSError | http.client.HTTPException):
                exc.add_note(f"while connecting to {self.display_host(url)}")
            raise

    def _request_headers(self, conn: Connection, url: str, extra: dict[str, str]) -> dict[str, str]:
        headers = self.headers_for(url, extra)
        if isinstance(conn, _ProxiedHTTPConnection):
            headers.update(conn.proxy_headers)
        return headers

    def finish(self, url: str, conn: Connection, resp: Response) -> None:
        """Return the connection to the pool if its response was read to the end, else close it."""
        if resp.isclosed() and not resp.will_close:
            self.release(url, conn)
        else:
            conn.close()


def _redirect_target(url: str, location: str) -> str:
    """Where a redirect leads; HubResponseError for a Location that is malformed or not http(s)."""
    try:
        target = urljoin(url, location.strip())
        parts = urlsplit(target)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        scheme = f"{parts.scheme}:" if parts is not None and parts.scheme else "a malformed"
        raise HubResponseError(f"{display_origin(url, scheme=False)} redirected to {scheme} URL, not http(s)",
                               "the endpoint (or the CDN behind it) is misconfigured; retry later or use "
                               "another endpoint")
    return target


def etag_value(header: str | None) -> str:
    """An ETag header's value as huggingface_hub reads it: weak marker and quotes stripped."""
    return (header or "").strip().removeprefix("W/").strip('"')


class _ProxiedHTTPConnection(http.client.HTTPConnection):
    """Plain-HTTP through a proxy: same wire format, absolute URLs in the request line."""

    proxy_headers: dict[str, str] = {}  # noqa: RUF012 - replaced per connection, never mutated


def _path(url: str) -> str:
    parts = urlsplit(url)
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


def origin_key(url: str) -> tuple[str, str | None, int | None]:
    """(scheme, host, port) with the scheme's default port filled in: what decides who gets the token."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, parts.hostname, parts.port or {"http": 80, "https": 443}.get(scheme)


def _proxy_for(scheme: str, netloc: str) -> tuple[str, int, dict[str, str]] | None:
    """The proxy for ``scheme://netloc`` as (host, port, headers for it), or None to connect directly."""
    host = netloc.rsplit(":", 1)[0] if not netloc.endswith("]") else netloc
    if urllib.request.proxy_bypass(host):
        return None
    proxy = urllib.request.getproxies().get(scheme)
    if not proxy:
        return None
    p = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    auth: dict[str, str] = {}
    if p.username is not None:
        creds = f"{unquote(p.username)}:{unquote(p.password or '')}".encode()
        auth["Proxy-Authorization"] = "Basic " + base64.b64encode(creds).decode("ascii")
    return p.hostname or "", p.port or (443 if p.scheme == "https" else 80), auth
