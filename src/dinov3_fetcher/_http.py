"""A small HTTP/1.1 client for the bytes: pooled keep-alive connections, manual redirects, proxies.

Why not huggingface_hub's httpx2 client here: the transfer loop reads straight into a reusable buffer
(``readinto``), which is what lets a verified fetch keep up with curl. Redirects are followed by hand so
that the token is sent to the endpoint's host only, never to a CDN or any other host.

Proxies and trusted CAs follow huggingface_hub's client exactly (``_net.py``): the metadata and the bytes
take the same route and trust the same certificates. A certificate failure, or a proxy that cannot be reached,
is raised as a NetworkError that says so (not retried: the next try would fail the same way); any other failure
on the way is a ``RequestError``, which the caller may retry. An answer comes back as an ``Answer``.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import BinaryIO, NoReturn
from urllib.parse import urljoin, urlsplit

from . import _dial
from ._env import display_origin
from ._errors import HubResponseError
from ._net import Proxy, network_error, origin_key, proxy_for, ssl_context
from ._secrets import without_url_secrets

__all__ = ["Answer", "Auth", "Connection", "HttpPool", "Redirects", "RequestError", "Response", "etag_value",
           "is_part", "redirect_target"]

Response = http.client.HTTPResponse
Connection = http.client.HTTPConnection

_REDIRECTS = (301, 302, 303, 307, 308)


@dataclass(frozen=True)
class Auth:
    """Headers that carry a credential, and the only origin (scheme, host, port) they may be sent to."""

    origin: str  # scheme://host[:port] of the endpoint
    headers: Mapping[str, str]


class RequestError(Exception):
    """A request that got no usable answer (refused, reset, timed out, a TLS or protocol error): another try may
    get one. Its text is the cause's type and message, and where it happened when known; never a credential:
    the query, fragment and user:password of ``url`` (the request's), and any other query in the cause's text,
    are cut out of it (``_secrets.without_url_secrets``: http.client's InvalidURL quotes the whole request)."""

    def __init__(self, cause: BaseException, where: str = "", *, url: str = "") -> None:
        self.kind = type(cause).__name__
        text = f"{self.kind}: {cause}" + (f" ({where})" if where else "")
        super().__init__(without_url_secrets(text, *([url, _path(url)] if url else [])))


@dataclass(eq=False)  # one answer is one connection: compared (and hashed) by identity
class Answer:
    """An HTTP answer: its response (the body still to read, unless it came from ``HttpPool.head``), the URL
    that gave it (after redirects), the connection it holds until ``HttpPool.finish``, and its timing.

    ``round_trips`` is how many round trips it took at least: 1 on a kept-alive connection, 2 on a new one
    (TCP's handshake), 3 over a new TLS connection (TLS 1.3's; older TLS takes more, so the time per round trip
    derived from it errs long), summed over the redirects followed."""

    url: str
    resp: Response
    conn: Connection | None  # None once given back to the pool (or closed)
    round_trips: int
    asked_at: float  # monotonic time the first request went out (once it had a connection)
    remembered: bool = False  # it went to a location remembered from an earlier redirect (``Redirects``)
    # The connection's socket as the request went out (http.client drops it from the connection of an answer
    # that closes the connection, ``Connection: close``), for ``cut``; and, for such an answer, a file on it that
    # keeps its descriptor open until ``HttpPool.finish``, so that ``cut`` never reaches a descriptor reused since.
    sock: socket.socket | None = None
    hold: BinaryIO | None = None
    dead: bool = False  # a read failed, or ``cut`` ended the reads: ``finish`` closes the connection, never pools it

    def seconds_per_trip(self) -> float:
        """From the request (not the wait for a connection ``warm`` was opening) to the answer's headers, per
        round trip it took: one round trip, at best."""
        return (time.monotonic() - self.asked_at) / self.round_trips

    def receive_queue(self) -> int:
        """The bytes of the answer's connection that arrived and wait in its socket for us to read (FIONREAD);
        0 when unknown."""
        import fcntl  # where used: a fetch's first connection does not wait for these
        import struct
        import termios

        if self.sock is None or self.conn is None:  # no request socket, or finished
            return 0
        try:
            return int(struct.unpack("i", fcntl.ioctl(self.sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0])
        except OSError:
            return 0

    def cut(self) -> None:
        """End a read of this answer under way in another thread at once (it sees the connection closed): a
        download that is stopping waits for no stalled read. Only the socket's data flow is shut, not the socket
        (whose owner closes it, once)."""
        self.dead = True
        if self.sock is not None:
            with contextlib.suppress(OSError):  # already closed
                socket.socket.shutdown(self.sock, socket.SHUT_RDWR)  # the TCP socket's: a TLS socket's drops its state

    def read(self, amt: int | None = None) -> bytes:
        """Up to ``amt`` bytes of the body (all of it when None); RequestError if the connection fails (the
        answer is dead: ``finish`` closes its connection)."""
        try:
            return self.resp.read(amt)
        except (OSError, http.client.HTTPException) as exc:
            failure = exc
        self.dead = True
        raise RequestError(failure, url=self.url)  # out of the handler: nothing chained to it

    def readinto(self, buf: memoryview) -> int:
        """``read`` into ``buf``: how many bytes (0 at the body's end)."""
        try:
            return self.resp.readinto(buf)
        except (OSError, http.client.HTTPException) as exc:
            failure = exc
        self.dead = True
        raise RequestError(failure, url=self.url)


@dataclass
class HttpPool:
    """Idle connections by origin, shared by the worker threads of one fetch."""

    timeout: float
    user_agent: str
    auth: Auth | None = None  # the credential headers, sent only to auth.origin's scheme, host and port
    _idle: dict[tuple[str, str], list[Connection]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _auth_key: tuple[str, str | None, int | None] | None = None
    _proxies: dict[tuple[str, str], Proxy | None] = field(default_factory=dict)
    _warming: dict[tuple[str, str], int] = field(default_factory=dict)  # connections being opened by warm()
    _waiting: dict[tuple[str, str], int] = field(default_factory=dict)  # requests waiting for one of them
    _warmed: threading.Condition = field(init=False)
    _closed: bool = False

    def __post_init__(self) -> None:
        self._warmed = threading.Condition(self._lock)
        self.set_auth(self.auth)

    def set_auth(self, auth: Auth | None) -> None:
        """The credential headers from now on, sent only to ``auth.origin``'s scheme, host and port."""
        self.auth = auth
        self._auth_key = origin_key(auth.origin) if auth is not None else None

    def warm(self, url: str, n: int) -> None:
        """Open ``n`` connections to ``url``'s origin in the background (TCP, TLS, a proxy's tunnel: the round
        trips a first request would wait for), into the idle pool; a request for that origin meanwhile waits
        for one of them rather than open another. A failure is silent: a request then opens its own connection
        and reports what goes wrong."""
        origin = self._origin(url)

        def one() -> None:
            conn: Connection | None = None
            try:
                conn = self._new(*origin)
                self._connect(conn)
            except Exception:
                conn = None
            with self._lock:
                self._warming[origin] -= 1
                if conn is not None and not self._closed:
                    self._idle.setdefault(origin, []).append(conn)
                elif conn is not None:
                    conn.close()
                self._warmed.notify_all()

        with self._lock:
            self._warming[origin] = self._warming.get(origin, 0) + n
        for _ in range(n):
            threading.Thread(target=one, daemon=True, name="http-warm").start()

    def _connect(self, conn: Connection) -> None:
        """Open ``conn``: on the connection the command opened to its host and port as it started (``_dial``) if
        there is one (a direct one: a proxy's is never taken), else as ``connect`` opens it."""
        sock = _dial.take(conn.host, conn.port, self.timeout) if type(conn) in _DIRECT else None
        if sock is None:
            conn.connect()
        elif isinstance(conn, _TLSConnection):
            conn.sock = ssl_context().wrap_socket(sock, server_hostname=conn.tls_host)
        else:
            conn.sock = sock

    def _origin(self, url: str) -> tuple[str, str]:
        parts = urlsplit(url)
        return parts.scheme, parts.netloc

    def _new(self, scheme: str, netloc: str) -> Connection:
        if scheme not in ("http", "https"):
            raise ValueError(f"unsupported URL scheme {scheme!r}")
        if (scheme, netloc) not in self._proxies:  # the environment's proxy rules, parsed once per origin
            self._proxies[scheme, netloc] = proxy_for(f"{scheme}://{netloc}/")  # ConfigError: one we cannot speak
        proxy = self._proxies[scheme, netloc]
        if scheme == "https":
            if proxy:
                tunnel = _TunnelConnection(proxy.host, proxy.port, timeout=self.timeout)
                tunnel.proxy = proxy
                target = urlsplit(f"https://{netloc}")
                tunnel.tls_host = target.hostname or netloc
                tunnel.set_tunnel(tunnel.tls_host, target.port or 443, headers=proxy.headers)
                return tunnel
            return _TLSConnection(netloc, timeout=self.timeout)
        if proxy:
            plain = _ProxiedHTTPConnection(proxy.host, proxy.port, timeout=self.timeout)
            plain.proxy = proxy
            plain.proxy_headers = proxy.headers
            return plain
        return http.client.HTTPConnection(netloc, timeout=self.timeout)

    def acquire(self, url: str) -> Connection:
        """An idle connection to the URL's origin, or a new one (proxy and TLS as the network policy says)."""
        origin = self._origin(url)
        with self._lock:
            while True:
                if idle := self._idle.get(origin):
                    return idle.pop()
                if self._warming.get(origin, 0) <= self._waiting.get(origin, 0):
                    break  # none being opened, or each has a request waiting for it already: a new one
                self._waiting[origin] = self._waiting.get(origin, 0) + 1
                try:
                    self._warmed.wait()  # a connection warm() is opening: sooner than a new one
                finally:
                    self._waiting[origin] -= 1
        return self._new(*origin)

    def release(self, url: str, conn: Connection) -> None:
        """Give a connection whose response was read to the end back to the pool (closed, once the pool is)."""
        with self._lock:
            if self._closed:
                conn.close()
                return
            self._idle.setdefault(self._origin(url), []).append(conn)

    def close(self) -> None:
        """Close every idle connection (and those warm() still opens, once they are open)."""
        with self._lock:
            self._closed = True
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

    def get(self, url: str, headers: dict[str, str]) -> Answer:
        """GET ``url`` following redirects: the answer with its body unread (``finish`` it).

        Raises RequestError (another try may work), NetworkError (a certificate or proxy failure), ConfigError
        (a proxy setting our client cannot use) or HubResponseError (a redirect to a URL that is not http(s))."""
        trips, asked = 0, None
        for _ in range(10):
            conn, resp, sock, n, at = self._send("GET", url, headers)
            trips += n
            asked = at if asked is None else asked
            answer = Answer(url, resp, conn, trips, asked, sock=sock,
                            hold=sock.makefile("rb") if sock is not None and resp.will_close else None)
            if resp.status in _REDIRECTS and resp.getheader("Location"):
                try:
                    answer.read()
                finally:
                    self.finish(answer)
                url = redirect_target(url, resp.getheader("Location") or "")
                continue
            return answer
        raise RequestError(http.client.HTTPException(f"too many redirects (the last to {self.display_host(url)})"),
                           url=url)

    def head(self, url: str) -> Answer:
        """HEAD ``url`` without following a redirect (its headers are the answer), as huggingface_hub does; its
        connection is back in the pool already. Raises what ``get`` raises."""
        conn, resp, _, trips, asked = self._send("HEAD", url, {})
        answer = Answer(url, resp, conn, trips, asked)
        try:
            answer.read()
        finally:
            self.finish(answer)
        return answer

    def _send(self, method: str, url: str,
              headers: dict[str, str]) -> tuple[Connection, Response, socket.socket | None, int, float]:
        """The request on a pooled (or new) connection: the connection, the response, the socket the request went
        out on, its round trips, when."""
        conn = self.acquire(url)
        for last in (False, True):
            try:
                return conn, *self._exchange(conn, method, url, headers)
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                failure = exc
            except BaseException:
                conn.close()
                raise
            if last or not isinstance(failure, http.client.RemoteDisconnected | BrokenPipeError | ConnectionResetError):
                self._fail(failure, conn, url)  # raised out of the handler: nothing chained to it quotes the request
            conn = self._new(*self._origin(url))  # a kept-alive connection the server had closed: one fresh try
        raise AssertionError("unreachable")

    def _exchange(self, conn: Connection, method: str, url: str,
                  headers: dict[str, str]) -> tuple[Response, socket.socket | None, int, float]:
        """Send the request on ``conn`` and read the answer's headers (the system calls and nothing else)."""
        trips, asked = _trips(conn), time.monotonic()
        target = url if isinstance(conn, _ProxiedHTTPConnection) else _path(url)
        conn.request(method, target, headers=self._request_headers(conn, url, headers))
        sock = conn.sock  # before getresponse, which drops it from the connection of a Connection: close answer
        return conn.getresponse(), sock, trips, asked

    def _fail(self, exc: OSError | http.client.HTTPException, conn: Connection, url: str) -> NoReturn:
        """Raise what a failed request means: a NetworkError naming the real cause (certificate, proxy), else a
        RequestError that says which host (and proxy) it was."""
        via = conn.proxy if isinstance(conn, _ProxiedHTTPConnection | _TunnelConnection) else None
        if (err := network_error(exc, url, via)) is not None:
            raise err from None
        where = f" through the proxy {via.display}" if via is not None else ""
        raise RequestError(exc, f"while connecting to {self.display_host(url)}{where}", url=url)

    def _request_headers(self, conn: Connection, url: str, extra: dict[str, str]) -> dict[str, str]:
        headers = self.headers_for(url, extra)
        if isinstance(conn, _ProxiedHTTPConnection):
            headers.update(conn.proxy_headers)
        return headers

    def finish(self, answer: Answer) -> None:
        """Give the answer's connection back to the pool if its body was read to the end, else close it (once).
        A body that ended early (the server closed, a failed read, or ``cut``) leaves its connection dead: closed,
        not pooled."""
        conn, answer.conn = answer.conn, None
        hold, answer.hold = answer.hold, None
        answer.sock = None  # a later ``cut`` must not reach a connection another request owns by then
        if hold is not None:
            hold.close()
        if conn is None:
            return
        resp = answer.resp
        if resp.isclosed() and not resp.will_close and not resp.length and not answer.dead:
            self.release(answer.url, conn)
        else:
            conn.close()
            resp.close()  # an answer that closes the connection holds the socket itself


class Redirects:
    """Where each file's URL last redirected: its later requests go straight there (a round trip less), until a
    location is refused (expired, or signed for one request or range); that file is then resolved afresh for
    every request."""

    def __init__(self) -> None:
        self._locations: dict[str, str] = {}
        self._per_request: set[str] = set()  # URLs whose locations serve one request only
        self._all = False  # a location was refused at its first reuse: the storage signs each one for one request
        self._served: dict[str, int] = {}  # answers each URL's remembered location gave

    def remember(self, url: str, location: str) -> None:
        """Where ``url`` redirects (a HEAD's Location), unless locations were refused before."""
        if not self.per_request(url):
            self._locations.setdefault(url, location)

    def get(self, pool: HttpPool, url: str, headers: dict[str, str]) -> Answer:
        """GET ``url``, or the location it last redirected to (``Answer.remembered``); raises what
        ``HttpPool.get`` raises."""
        asked = self._locations.get(url, url)
        answer = pool.get(asked, headers)
        answer.remembered = asked != url
        if answer.remembered and answer.resp.status < 400:
            self._served[url] = self._served.get(url, 0) + 1
        if answer.url != asked and not self.per_request(url):
            self._locations[url] = answer.url
        return answer

    def per_request(self, url: str) -> bool:
        """Is every request of ``url`` resolved afresh (a location was refused when used again: this file's, or
        another's of the same fetch, since one storage signs them all alike)? Each such request is one more
        ``resolve`` that the Hub counts against the address's rate limit."""
        return self._all or url in self._per_request

    def forget(self, url: str) -> bool:
        """A remembered location of ``url`` was refused: resolve it afresh from now on, for every request. Where it
        was refused at its first reuse (signed for one request, or one range: the Xet bridge), so is every other
        file's, whose remembered locations are dropped too: each of their requests is resolved from the start,
        not refused once first. True if there was one."""
        if self._locations.pop(url, None) is None:
            return False
        self._per_request.add(url)
        if self._served.get(url, 0) <= 1:  # the HEAD's location served one answer (or none) before it was refused
            self._all = True
            self._locations.clear()
        return True


def redirect_target(url: str, location: str) -> str:
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


def _trips(conn: Connection) -> int:
    if conn.sock is not None:
        return 1
    return 3 if isinstance(conn, _TLSConnection) else 2


def is_part(resp: Response, size: int) -> bool:
    """Is this answer a part of the file (206, or 200 with a Content-Range: ModelScope's storage), not all of it?
    A Content-Range that covers every byte is the whole body, labelled or not (storage that ignores Range)."""
    cr = (resp.getheader("Content-Range") or "").strip()
    if cr == f"bytes 0-{size - 1}/{size}":
        return False
    return resp.status == 206 or (resp.status == 200 and cr.startswith("bytes "))


def etag_value(header: str | None) -> str:
    """An ETag header's value as huggingface_hub reads it: weak marker and quotes stripped."""
    return (header or "").strip().removeprefix("W/").strip('"')


class _ProxiedHTTPConnection(http.client.HTTPConnection):
    """Plain-HTTP through a proxy: same wire format, absolute URLs in the request line."""

    proxy: Proxy | None = None
    proxy_headers: dict[str, str] = {}  # noqa: RUF012 - replaced per connection, never mutated


class _TLSConnection(http.client.HTTPConnection):
    """HTTPS (http.client's HTTPSConnection, but for when its context is made): the TLS context (``ssl_context``,
    huggingface_hub's client's: CA certificates loaded) is taken once the TCP connection is open, not before, so
    that building the first one (tens of milliseconds) overlaps the TCP handshake's round trip instead of
    delaying the connection."""

    default_port = http.client.HTTPS_PORT

    def __init__(self, host: str, port: int | None = None, *, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self.tls_host = self.host  # the name the certificate must carry (a tunnel's target, through a proxy)

    def connect(self) -> None:
        super().connect()  # TCP (and a proxy's CONNECT tunnel)
        self.sock = ssl_context().wrap_socket(self.sock, server_hostname=self.tls_host)


class _TunnelConnection(_TLSConnection):
    """HTTPS through a proxy's CONNECT tunnel: the proxy sees the target's host:port, then only TLS."""

    proxy: Proxy | None = None


_DIRECT = (http.client.HTTPConnection, _TLSConnection)  # the connections without a proxy


def _path(url: str) -> str:
    parts = urlsplit(url)
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
