"""Link emulation for the bench: a pacing TCP proxy in front of the Hub emulator and the CDN.

    uv run python bench/link.py --selftest            # counts what the emulation does (figures, no asserts)

Why a userspace proxy and not the kernel: this VM's kernel (6.18, Firecracker config, no modules) has htb,
tbf and u32 but neither ``netem`` nor ``fq`` (``CONFIG_NET_SCH_NETEM``/``CONFIG_NET_SCH_FQ`` not set), so
a network namespace can cap rates but cannot add delay or cap each flow. The proxy does all three:

- **latency per request**: every byte a client sends (request line, headers, body) reaches the server one
  RTT after it arrived at the proxy (the whole round trip charged on the way up, as a one-way ``netem delay``
  on the uplink would), so each response's first byte leaves one RTT after its request was sent;
- **latency per new connection**: the first byte of a new connection waits one more RTT (the handshake);
  the client's ``connect()`` itself returns at once, so the time is charged on the first request instead;
- **per-connection cap**: each connection's downlink is paced (a virtual clock per connection);
- **shared cap**: one pacer over all connections of a link (a virtual clock shared by all of them, FIFO
  in the order the chunks become ready), so N connections share the rate as flows share a bottleneck.

The bytes go through ``os.splice`` (socket -> pipe -> socket) without entering Python; only the uplink
(requests, a few hundred bytes) is read by Python, to time-stamp it and count requests.

What it is not: TCP between the client and the proxy is loopback TCP, so there is no slow start, no
congestion window growth per RTT, no loss and no queue building up at a bottleneck (bufferbloat). A new
connection gets the full per-connection rate after its handshake RTT, where a real one needs several RTTs
of slow start to get there; see BENCHMARKS.md ("Where the emulation differs from a real link") for what
that means for an adaptive rule.

Use (bench/run.py does this)::

    hub_link = LinkProxy(("127.0.0.1", hub_port), "127.0.0.1", PROFILES["far"], shaped=False)
    cdn_link = LinkProxy(("127.0.0.2", cdn_port), "127.0.0.2", PROFILES["far"])
    hub.cdn_endpoint = cdn_link.endpoint   # the Hub's 302 Location points at the proxied CDN
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import os
import re
import socket
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field

__all__ = ["PROFILES", "ConnStats", "LinkProxy", "Profile", "Shaper"]

MB = 1_000_000
CHUNK = 64 * 1024  # pacing granularity: at 8 MB/s one chunk is 8 ms of link time
_REQUEST = re.compile(rb"(GET|HEAD|POST|PUT|DELETE|OPTIONS) (\S+) HTTP/1\.[01]\r\n")


@dataclass(frozen=True)
class Profile:
    name: str
    per_conn_bps: float | None  # bytes/s per TCP connection (None: no cap)
    shared_bps: float | None  # bytes/s over all connections of the link (None: no cap)
    rtt: float  # seconds, charged once per request and once more per new connection

    def describe(self) -> str:
        def rate(x: float | None) -> str:
            return "-" if x is None else f"{x / MB:g} MB/s"
        if self.name == "none":
            return "no limit"
        return f"{rate(self.per_conn_bps)} / {rate(self.shared_bps)} / {self.rtt * 1000:g} ms"


PROFILES = {
    "cdn": Profile("cdn", 40 * MB, 250 * MB, 0.030),
    "far": Profile("far", 8 * MB, 100 * MB, 0.150),
    "pipe": Profile("pipe", None, 50 * MB, 0.080),
    "none": Profile("none", None, None, 0.0),
}


class Shaper:
    """The shared pacer of one link: a virtual clock that every chunk of every connection reserves time on."""

    def __init__(self, bps: float | None) -> None:
        self.bps = bps
        self._next = 0.0
        self._lock = threading.Lock()

    def reserve(self, n: int, ready: float) -> float:
        """The time at which n bytes ready at ``ready`` may start to leave."""
        if self.bps is None:
            return ready
        with self._lock:
            start = max(ready, self._next)
            self._next = start + n / self.bps
        return start


@dataclass
class ConnStats:
    """What the proxy saw on one client connection (monotonic times)."""

    opened: float
    closed: float | None = None
    requests: list[tuple[float, str, str]] = field(default_factory=list)  # (arrival, method, path)
    down_bytes: int = 0
    first_down: float | None = None  # when the first response byte left for the client
    windows: dict[int, int] = field(default_factory=dict)  # downlink bytes per window (see LinkProxy.window)
    last_down: float | None = None  # when the last downlink byte so far left
    # for each request after the first answer began: seconds since the last downlink byte (the client's own
    # gap; the connection then idles this gap + one RTT before the next answer's first byte arrives)
    gaps: list[float] = field(default_factory=list)


def _sleep_until(t: float) -> None:
    while (d := t - time.monotonic()) > 0:
        time.sleep(d)


class _DelayLine:
    """One thread that releases every connection's uplink bytes at their due time."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, socket.socket, bytes | None]] = []
        self._seq = 0
        self._cv = threading.Condition()
        self._stop = False
        threading.Thread(target=self._loop, daemon=True, name="link-delay").start()

    def put(self, due: float, sock: socket.socket, data: bytes | None) -> None:
        with self._cv:
            self._seq += 1
            heapq.heappush(self._heap, (due, self._seq, sock, data))
            self._cv.notify()

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and (not self._heap or self._heap[0][0] > time.monotonic()):
                    self._cv.wait(None if not self._heap else max(0.0, self._heap[0][0] - time.monotonic()))
                if self._stop:
                    return
                _, _, sock, data = heapq.heappop(self._heap)
            try:
                if data is None:
                    sock.shutdown(socket.SHUT_WR)
                else:
                    sock.sendall(data)
            except OSError:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


class LinkProxy:
    """Listens on ``listen_host`` (a free port) and forwards to ``upstream`` through an emulated link.

    ``shaped=False`` keeps the latency but no rate caps (the Hub's API link: small answers).
    ``kernel=True`` leaves the rates to the kernel: each client connection's socket gets the per-connection cap
    as ``SO_MAX_PACING_RATE`` (TCP's own pacing), and the shared cap is left to a ``tc tbf`` in front of the
    clients (bench/netns.py); the proxy then only delays.
    ``conns`` lists every connection's ``ConnStats``; ``clear()`` forgets them. ``window`` (seconds) sets the
    width of the per-connection byte-count windows in ``ConnStats.windows`` (the self-test; the bench's
    streams-over-time).
    """

    def __init__(self, upstream: tuple[str, int], listen_host: str, profile: Profile, *, shaped: bool = True,
                 window: float = 0.0, kernel: bool = False) -> None:
        self.upstream = upstream
        self.profile = profile
        self.pacing = int(profile.per_conn_bps) if shaped and kernel and profile.per_conn_bps else 0
        self.per_conn = profile.per_conn_bps if shaped and not kernel else None
        self.shared = Shaper(profile.shared_bps if shaped and not kernel else None)
        self.window = window
        self.t0 = time.monotonic()
        self.conns: list[ConnStats] = []
        self._lock = threading.Lock()
        self._delay = _DelayLine()
        self._lsock = socket.socket()
        self._lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._lsock.bind((listen_host, 0))
        self._lsock.listen(256)
        self.endpoint = f"http://{listen_host}:{self._lsock.getsockname()[1]}"
        self._closed = False
        threading.Thread(target=self._accept_loop, daemon=True, name="link-accept").start()

    # ---------- bookkeeping ----------
    def clear(self) -> None:
        with self._lock:
            self.conns = [c for c in self.conns if c.closed is None]
            for c in self.conns:
                c.requests.clear()
                c.gaps.clear()

    def snapshot(self) -> list[ConnStats]:
        with self._lock:
            return list(self.conns)

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._lsock.shutdown(socket.SHUT_RDWR)
        self._lsock.close()
        self._delay.close()

    def __enter__(self) -> LinkProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------- plumbing ----------
    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._lsock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True, name="link-conn").start()

    def _serve(self, client: socket.socket) -> None:
        st = ConnStats(time.monotonic())
        with self._lock:
            self.conns.append(st)
        try:
            upstream = socket.create_connection(self.upstream)
        except OSError:
            client.close()
            st.closed = time.monotonic()
            return
        for s in (client, upstream):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.pacing:
            client.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_MAX_PACING_RATE", 47), self.pacing)
        down = threading.Thread(target=self._downlink, args=(upstream, client, st), daemon=True, name="link-down")
        down.start()
        self._uplink(client, upstream, st)
        down.join()
        for s in (client, upstream):
            s.close()
        st.closed = time.monotonic()

    def _uplink(self, client: socket.socket, upstream: socket.socket, st: ConnStats) -> None:
        rtt = self.profile.rtt
        ready = st.opened + rtt  # the handshake: nothing reaches the server before one RTT has passed
        pending = b""
        while True:
            try:
                data = client.recv(65536)
            except OSError:
                data = b""
            now = time.monotonic()
            if not data:
                self._delay.put(max(now, ready) + rtt, upstream, None)
                return
            pending = (pending + data)[-4096:]
            for m in _REQUEST.finditer(pending):
                st.requests.append((now, m[1].decode(), m[2].decode(errors="replace")))
                if st.last_down is not None:
                    st.gaps.append(now - st.last_down)
            if _REQUEST.search(pending):
                pending = pending[pending.rfind(b"\r\n") + 2:]
            self._delay.put(max(now, ready) + rtt, upstream, data)

    def _downlink(self, upstream: socket.socket, client: socket.socket, st: ConnStats) -> None:
        r, w = os.pipe()
        with contextlib.suppress(OSError):
            import fcntl
            fcntl.fcntl(w, 1031, 1 << 20)  # F_SETPIPE_SZ
        nxt = 0.0  # this connection's own virtual clock
        try:
            while True:
                try:
                    n = os.splice(upstream.fileno(), w, CHUNK)
                except OSError:
                    n = 0
                if n == 0:
                    break
                now = time.monotonic()
                start = now
                if self.per_conn is not None:
                    start = max(now, nxt)
                    nxt = start + n / self.per_conn
                start = self.shared.reserve(n, start)
                _sleep_until(start)
                if st.first_down is None:
                    st.first_down = time.monotonic()
                # counted before they leave: a client that has read them all (and returned) finds them counted
                st.down_bytes += n
                left = n
                while left:
                    left -= os.splice(r, client.fileno(), left)
                st.last_down = time.monotonic()
                if self.window:
                    k = int((time.monotonic() - self.t0) / self.window)
                    st.windows[k] = st.windows.get(k, 0) + n
        except OSError:
            with contextlib.suppress(OSError):
                upstream.shutdown(socket.SHUT_RDWR)
        finally:
            os.close(r)
            os.close(w)
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_WR)


# ---------- self-test ----------
def _selftest(profiles: list[str], seconds: float, n_conns: int) -> int:
    """Counts what each profile does to a plain TCP byte source: rate per connection per window, first byte."""
    print(f"self-test: 4 and {n_conns} connections, {seconds:g} s each profile; a local server sends bytes as fast "
          "as it can after each request line", flush=True)
    src = socket.socket()
    src.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    src.bind(("127.0.0.2", 0))
    src.listen(64)
    blob = b"x" * (1 << 20)

    def serve(c: socket.socket) -> None:
        with contextlib.suppress(OSError), c:
            while True:
                line = c.recv(4096)
                if not line:
                    return
                if line.startswith(b"GET /big"):
                    end = time.monotonic() + seconds + 5
                    c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 999999999999\r\n\r\n")
                    while time.monotonic() < end:
                        c.sendall(blob)
                    return
                c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    def accept() -> None:
        while True:
            try:
                c, _ = src.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(c,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    for name in profiles:
        prof = PROFILES[name]
        with LinkProxy(src.getsockname(), "127.0.0.2", prof, window=0.25) as link:
            host, port = link.endpoint.removeprefix("http://").split(":")
            # latency: a new connection's first answer, then a second request on the same connection
            first, again = [], []
            for _ in range(5):
                t = time.monotonic()
                with socket.create_connection((host, int(port))) as s:
                    s.sendall(b"GET /small HTTP/1.1\r\n\r\n")
                    s.recv(100)
                    first.append(time.monotonic() - t)
                    t = time.monotonic()
                    s.sendall(b"GET /small HTTP/1.1\r\n\r\n")
                    s.recv(100)
                    again.append(time.monotonic() - t)
            print(f"\n[{name}] {prof.describe()} (per connection / shared / RTT)")
            print(f"  first answer on a new connection: median {statistics.median(first) * 1000:.1f} ms "
                  f"(expected {2 * prof.rtt * 1000:g} ms: handshake + request)")
            print(f"  next answer on the same connection: median {statistics.median(again) * 1000:.1f} ms "
                  f"(expected {prof.rtt * 1000:g} ms)")
            for conns in sorted({4, n_conns}):
                link.clear()
                # rates: `conns` connections pulling bytes for `seconds`
                got = [0] * conns
                stop = time.monotonic() + seconds

                def pull(i: int, addr: tuple[str, int], stop: float, got: list[int]) -> None:
                    with socket.create_connection(addr) as s:
                        s.sendall(b"GET /big HTTP/1.1\r\n\r\n")
                        buf = bytearray(1 << 20)
                        while time.monotonic() < stop:
                            n = s.recv_into(buf)
                            if not n:
                                return
                            got[i] += n

                t = time.monotonic()
                ts = [threading.Thread(target=pull, args=(i, (host, int(port)), stop, got)) for i in range(conns)]
                for th in ts:
                    th.start()
                for th in ts:
                    th.join()
                dt = time.monotonic() - t
                big = [c for c in link.snapshot() if c.opened >= t and c.down_bytes > 1 << 20]
                per_window = sorted(v / 0.25 / MB for c in big for k, v in c.windows.items()
                                    if k not in (min(c.windows), max(c.windows)))
                shared = [sum(c.windows.get(k, 0) for c in big) / 0.25 / MB
                          for k in sorted({k for c in big for k in c.windows})[1:-1]]
                print(f"  {conns} connections for {dt:.1f} s: total {sum(got) / dt / MB:.1f} MB/s, per connection "
                      f"{min(got) / dt / MB:.1f}-{max(got) / dt / MB:.1f} MB/s")
                if per_window:
                    print(f"  bytes per connection per 0.25 s window: median "
                          f"{statistics.median(per_window):.1f} MB/s, min {per_window[0]:.1f}, "
                          f"max {per_window[-1]:.1f} (cap "
                          f"{'-' if prof.per_conn_bps is None else f'{prof.per_conn_bps / MB:g}'})")
                if shared:
                    print(f"  all connections per 0.25 s window: median {statistics.median(shared):.1f} MB/s, "
                          f"min {min(shared):.1f}, max {max(shared):.1f} (cap "
                          f"{'-' if prof.shared_bps is None else f'{prof.shared_bps / MB:g}'})")
    src.close()
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--selftest", action="store_true", help="measure each profile against a local byte source")
    ap.add_argument("--profiles", default="cdn,far,pipe", help="profiles for the self-test")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--conns", type=int, default=16)
    args = ap.parse_args()
    if not args.selftest:
        ap.print_help()
        return 2
    return _selftest([p.strip() for p in args.profiles.split(",")], args.seconds, args.conns)


if __name__ == "__main__":
    sys.exit(main())
