"""A cold fetch's first connections to the Hub, opened as the command starts.

The first request of a fetch waits for the connection it goes out on: a TCP handshake, one round trip (TLS
adds its own once the pool has the connection). The modules a fetch needs (the standard library's HTTP, ours,
then huggingface_hub's) take a tenth of a second to import, so a connection opened after them starts that
round trip late. ``start`` opens the pool's first connections before those imports, with the standard
library's sockets alone, when the command is a fetch from the Hub into a dino_root that holds no manifest yet
(a warm run, whose dino_root has one, opens none) and the environment names no proxy. The fetch's pool takes
them (``take``) in place of opening its own to the same host and port; any it does not take are closed with
the process. Nothing is sent on them here: what is sent, and where, is the fetch's to decide, as without them.

What this reads is a guess made early, not a decision: the command line is parsed again, the config read
again and the endpoint checked by the fetch itself, and a connection whose host and port the fetch does not
ask for is never used.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import sys
import threading
import time

from . import _env as env

__all__ = ["FIRST_CONNECTIONS", "start", "take"]

FIRST_CONNECTIONS = 3  # the pool's first connections: config.json and both layouts, asked at once (_headstart)
WAIT = 5.0  # seconds ``take`` waits for a handshake at most: then the pool connects as it would have (every
# address of the name, one after the other), as with a first address that does not answer
_STATE = ".dinov3-fetcher"  # dino_root's state folder (``_state``), where a fetch keeps its manifest
_VALUED = ("--model", "--revision", "--lock-timeout")  # the fetch's other flags that take a value
_SWITCHES = ("--require-official", "--repair", "-v", "--verbose", "--progress", "--json", "-q", "--quiet",
             "--debug")


class _Dial:
    """Connections to one host and port, opened in the background (name lookup, then non-blocking connects)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.socks: list[socket.socket] = []
        self.ready = threading.Event()  # the connects are under way (or it failed)
        self.lock = threading.Lock()

    def run(self) -> None:
        try:
            # the name as bytes: a str would be encoded with the "idna" codec, whose import costs milliseconds
            family, kind, proto, _, addr = socket.getaddrinfo(self.host.encode("ascii"), self.port,
                                                              type=socket.SOCK_STREAM)[0]
            for _ in range(FIRST_CONNECTIONS):
                sock = socket.socket(family, kind, proto)
                sock.setblocking(False)
                if sock.connect_ex(addr) not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
                    sock.close()  # refused at once: the fetch's own connection reports what is wrong
                    break
                with self.lock:
                    self.socks.append(sock)
        except (OSError, ValueError):  # no such name, not ASCII (then the fetch's own connection says so)
            pass
        finally:
            self.ready.set()

    def take(self, timeout: float) -> socket.socket | None:
        """One of the connections once its handshake is done (waiting ``WAIT`` seconds at most), in blocking mode
        with ``timeout``; None if none is left or it failed (the caller then connects as it would have)."""
        deadline = time.monotonic() + min(timeout, WAIT)
        self.ready.wait(min(timeout, WAIT))
        with self.lock:
            if not self.socks:
                return None
            sock = self.socks.pop(0)
        try:
            poller = select.poll()
            poller.register(sock, select.POLLOUT)
            if not poller.poll(max(0, round((deadline - time.monotonic()) * 1000))) \
                    or sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                raise OSError("not connected")
            sock.settimeout(timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, ValueError):
            sock.close()
            return None
        return sock


_dials: dict[tuple[str, int], _Dial] = {}


def take(host: str, port: int, timeout: float) -> socket.socket | None:
    """A connection to ``host``:``port`` that ``start`` opened, connected (blocking for at most ``timeout``);
    None when there is none (the caller connects as it would have)."""
    dial = _dials.get((host.lower(), port))
    return dial.take(timeout) if dial is not None else None


def start(argv: list[str]) -> None:
    """Open the first connections of a cold fetch from the Hub, in the background (see the module's docstring).
    Never raises, never blocks: whatever it cannot tell at a glance means no early connection. Linux only (where
    the environment alone names the proxies)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        target = _target(argv)
        if target is None:
            return
        dial = _Dial(*target)
        if _numeric(target[0]):
            dial.run()  # no name to look up: the connects are under way at once
        else:  # a name lookup may take a while: the imports go on meanwhile
            threading.Thread(target=dial.run, daemon=True, name="dial").start()
        _dials[target] = dial
    except Exception:  # a config it cannot read, no thread to be had: the fetch meets it, or connects itself
        return


def _numeric(host: str) -> bool:
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
            return True
        except OSError:
            continue
    return False


def _target(argv: list[str]) -> tuple[str, int] | None:
    """(host, port) of the Hub when ``argv`` is a fetch from it into a dino_root without a manifest, else None."""
    args = list(argv)
    if args and args[0] == "fetch":
        args = args[1:]
    flags: dict[str, str] = {}
    while args:
        word = args.pop(0)
        name, eq, value = word.partition("=")
        if name in ("--config", "--dino-root", "--source", *_VALUED):
            if not eq:
                if not args:
                    return None
                value = args.pop(0)
            flags[name] = value
        elif word in ("--update", "--dry-run"):
            flags[word] = ""
        elif word not in _SWITCHES:
            return None  # another command, --help, an abbreviation, a typo: argparse decides
    if "--dry-run" in flags or env.is_offline() or _proxied():
        return None
    train = _train(flags["--config"]) if "--config" in flags else {}
    if (flags.get("--source") or train.get("dino_source") or env.default_source()) != "hf":
        return None
    configured = train.get("dino_root")
    if "--dino-root" in flags:
        base, raw = os.getcwd(), flags["--dino-root"]
    elif isinstance(configured, str):
        base, raw = os.path.dirname(os.path.abspath(os.path.expanduser(flags["--config"]))), configured
    else:
        return None
    manifest = os.path.join(base, os.path.expanduser(raw), _STATE, "manifest.json")
    if not raw.strip() or ("--update" not in flags and os.path.lexists(manifest)):
        return None  # maybe warm: no connection unless the fetch finds it needs one
    return _origin((os.environ.get("HF_ENDPOINT") or "https://huggingface.co").strip())


def _origin(url: str) -> tuple[str, int] | None:
    """(host, port) of an http(s) URL, or None for anything else (urllib's parser costs the start a few ms)."""
    scheme, _, rest = url.partition("://")
    netloc = rest.split("/", 1)[0].split("?", 1)[0].split("#", 1)[0]
    if scheme.lower() not in ("http", "https") or "@" in netloc:
        return None
    host, port = netloc, ""
    if netloc.startswith("["):
        host, _, after = netloc[1:].partition("]")
        port = after.removeprefix(":") if after.startswith(":") else "" if not after else "x"
    elif ":" in netloc:
        host, _, port = netloc.partition(":")
    if not host or (port and not port.isdigit()) or (port and not 0 < int(port) < 65536):
        return None
    return host.lower(), int(port) if port else 443 if scheme.lower() == "https" else 80


def _train(config: str) -> dict[str, object]:
    from ._userfile import CONFIG_LIMIT, parse_json, read_regular

    data = parse_json(read_regular(os.path.expanduser(config), CONFIG_LIMIT))  # never blocks on a FIFO
    train = data.get("train") if isinstance(data, dict) else None
    return train if isinstance(train, dict) else {}


def _proxied() -> bool:
    """Any proxy variable (urllib's getproxies reads every ``*_proxy``): the pool's proxy rules decide."""
    return any(k.lower().endswith("_proxy") and k.lower() != "no_proxy" and v for k, v in os.environ.items())
