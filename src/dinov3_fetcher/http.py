"""A small HTTP/1.1 client for the bytes: pooled keep-alive connections, manual redirects, proxies.

Why not huggingface_hub's httpx2 client here: the transfer loop reads straight into a reusable buffer
(``readinto``), which is what lets a verified fetch keep up with curl. Redirects are followed by hand so
that the token is sent to the endpoint's host only, never to a CDN or any other host.
"""

from __future__ import annotations

import http.client
import ssl
import threading
import urllib.request
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

__all__ = ["Connection", "HttpPool", "Response"]

Response = http.client.HTTPResponse
Connection = http.client.HTTPConnection

_REDIRECTS = (301, 302, 303, 307, 308)


@dataclass
class HttpPool:
    """Idle connections by origin, shared by the worker threads of one fetch."""

    timeout: float
    user_agent: str
    token: str | None = None
    auth_host: str | None = None  # the only "host:port" that ever gets the token
    _idle: dict[tuple[str, str], list[Connection]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _ssl: ssl.SSLContext | None = None

    def _origin(self, url: str) -> tuple[str, str]:
        parts = urlsplit(url)
        return parts.scheme, parts.netloc

    def _new(self, scheme: str, netloc: str) -> Connection:
        proxy = _proxy_for(scheme, netloc)
        if scheme == "https":
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            if proxy:
                p = urlsplit(proxy)
                conn: Connection = http.client.HTTPSConnection(p.hostname or "", p.port, timeout=self.timeout,
                                                               context=self._ssl)
                host, _, port = netloc.rpartition(":") if ":" in netloc else (netloc, "", "")
                conn.set_tunnel(host or netloc, int(port) if port else 443)
                return conn
            return http.client.HTTPSConnection(netloc, timeout=self.timeout, context=self._ssl)
        if scheme != "http":
            raise ValueError(f"unsupported URL scheme {scheme!r}")
        if proxy:
            p = urlsplit(proxy)
            return _ProxiedHTTPConnection(p.hostname or "", p.port, timeout=self.timeout)
        return http.client.HTTPConnection(netloc, timeout=self.timeout)

    def acquire(self, url: str) -> Connection:
        origin = self._origin(url)
        with self._lock:
            idle = self._idle.get(origin)
            if idle:
                return idle.pop()
        return self._new(*origin)

    def release(self, url: str, conn: Connection) -> None:
        with self._lock:
            self._idle.setdefault(self._origin(url), []).append(conn)

    def close(self) -> None:
        with self._lock:
            for conns in self._idle.values():
                for c in conns:
                    c.close()
            self._idle.clear()

    def display_host(self, url: str) -> str:
        parts = urlsplit(url)
        return f"{parts.hostname}" + (f":{parts.port}" if parts.port else "")

    def headers_for(self, url: str, extra: dict[str, str]) -> dict[str, str]:
        headers = {"User-Agent": self.user_agent, "Accept-Encoding": "identity", **extra}
        if self.token and self.auth_host is not None and urlsplit(url).netloc == self.auth_host:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    def get(self, url: str, headers: dict[str, str]) -> tuple[str, Connection, Response]:
        """GET ``url`` following redirects; returns the final URL, its connection and the response (unread)."""
        for _ in range(10):
            conn = self.acquire(url)
            target = url if isinstance(conn, _ProxiedHTTPConnection) else _path(url)
            try:
                conn.request("GET", target, headers=self.headers_for(url, headers))
                resp = conn.getresponse()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                # A kept-alive connection the server had closed: one fresh try.
                conn.close()
                conn = self._new(*self._origin(url))
                conn.request("GET", target, headers=self.headers_for(url, headers))
                resp = conn.getresponse()
            except BaseException:
                conn.close()
                raise
            if resp.status in _REDIRECTS and resp.getheader("Location"):
                location = urljoin(url, resp.getheader("Location") or "")
                resp.read()
                self.finish(url, conn, resp)
                url = location
                continue
            return url, conn, resp
        raise http.client.HTTPException(f"too many redirects for {url}")

    def finish(self, url: str, conn: Connection, resp: Response) -> None:
        """Return the connection to the pool if its response was read to the end, else close it."""
        if resp.isclosed() and not resp.will_close:
            self.release(url, conn)
        else:
            conn.close()


class _ProxiedHTTPConnection(http.client.HTTPConnection):
    """Plain-HTTP through a proxy: same wire format, absolute URLs in the request line."""


def _path(url: str) -> str:
    parts = urlsplit(url)
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


def _proxy_for(scheme: str, netloc: str) -> str | None:
    host = netloc.rsplit(":", 1)[0] if not netloc.endswith("]") else netloc
    if urllib.request.proxy_bypass(host):
        return None
    return urllib.request.getproxies().get(scheme)
