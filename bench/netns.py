"""Links shaped by the kernel: tools run in network namespaces joined to the servers by veth pairs.

    with KernelLink(100e6, queue=0.150) as k:      # needs root, `ip` and `tc` (iproute2)
        subprocess.run(k.wrap(["curl", f"http://{k.host}:8080/x"]))

    with Fabric(8, 25e6) as f:                      # 8 "nodes" on a bridge, each sending at most 25 MB/s
        subprocess.Popen(f.wrap(3, ["python", "worker.py"]))   # node 3 reaches f.host and f.ip(0..7)

What the kernel does here, and what stays the emulator's (bench/link.py):

- **the shared cap** is a ``tc tbf`` on the host side of the veth (the download direction), so the flows meet
  a real bottleneck: a queue of ``queue`` seconds at the rate (tbf's ``latency``), tail drops when it is full,
  and each TCP connection's own congestion control reacting to them (the userspace proxy's shared pacer is
  off in this mode: it never drops and never queues);
- **the per-connection cap** is ``SO_MAX_PACING_RATE`` on each client connection's socket at the proxy: the
  kernel's TCP pacing (internal pacing: this kernel has no ``fq``), not a userspace clock;
- **latency** stays the proxy's (one RTT per request, one more per new connection): this kernel has no
  ``netem``, so TCP itself sees the veth's ~0.1 ms round trip, and slow start ramps in microseconds where a
  real 150 ms link takes ~1 s (see BENCHMARKS.md, "Where the emulation differs").

The namespace and the veth pair are named after this process and removed on ``close`` (also after a failed
start), so two benches never share one.

``Fabric`` is a cluster instead: N namespaces ("nodes") on a bridge, each node's *egress* shaped by a tbf on its
own end of its veth (what the node sends, to the other nodes and to the servers on the bridge), so N nodes
each sending at most B meet the same limits as on a real network, with real kernel TCP between them. Its tbf's
bucket holds a whole GSO packet (``GSO_BUCKET``), so the packets cross the bridge as a real NIC's offloads
deliver them (cut into frames on the wire by the sender's NIC, merged again by the receiver's), not cut into
1500-byte frames by the kernel in software: cut, they cost each emulated node 1.2-2.2 CPU-seconds more per
343 MB in its own process (its receiving thread woke every frame or two) and the machine 1.5-2 more in softirq
(8 nodes: about 44 CPU-seconds instead of 12, more than 2 cores have in the job's time). ``KernelLink`` keeps
the 64 KiB bucket its figures in BENCHMARKS.md were measured with.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from pathlib import Path

__all__ = ["Fabric", "KernelLink", "clean_all", "kernel_link_available"]


def _ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout


# The smallest tbf bucket that passes a GSO packet whole: tbf weighs a 64 KiB packet with the headers of each of its
# ~45 frames (~68 KiB), and cuts one larger than its bucket into frames, in software, before it queues them.
GSO_BUCKET = 128 * 1024


def _shape(dev: str, rate: float, queue: float, ns: str | None = None, bucket: int = 64 * 1024) -> None:
    """A tbf of ``rate`` bytes/s with a ``queue``-second buffer on ``dev``'s egress (in namespace ``ns``), its
    bucket ``bucket`` bytes at least, else 2 ms at the rate."""
    burst = max(bucket, int(rate * 0.002))
    where = ["ip", "netns", "exec", ns] if ns else []
    subprocess.run([*where, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{int(rate * 8)}bit",
                    "burst", str(burst), "latency", f"{queue * 1000:g}ms"], check=True, capture_output=True,
                   text=True)


def kernel_link_available() -> str | None:
    """None when a KernelLink can be made here, else why not."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, tc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install iproute2)"
    return None


class KernelLink:
    """A namespace whose traffic from the host passes a tbf of ``rate`` bytes/s with a ``queue``-second buffer.

    ``host`` is the address servers listen on (the host side of the veth); ``wrap(argv)`` runs a command in
    the namespace, where ``host`` is reachable and nothing else is (no route out, loopback only)."""

    def __init__(self, rate: float | None, queue: float = 0.150, subnet: int | None = None) -> None:
        why = kernel_link_available()
        if why is not None:
            raise RuntimeError(f"kernel link: {why}")
        pid = os.getpid()
        self.ns = f"dv3f-bench-{pid}"
        self.host_if, self.ns_if = f"dv3fh{pid % 100000}", f"dv3fn{pid % 100000}"
        k = subnet if subnet is not None else 1 + pid % 250
        self.host, self.peer = f"10.213.{k}.1", f"10.213.{k}.2"
        self.rate, self.queue = rate, queue
        try:
            _ip("netns", "add", self.ns)
            _ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
            _ip("link", "set", self.ns_if, "netns", self.ns)
            _ip("addr", "add", f"{self.host}/24", "dev", self.host_if)
            _ip("link", "set", self.host_if, "up")
            _ip("-n", self.ns, "addr", "add", f"{self.peer}/24", "dev", self.ns_if)
            _ip("-n", self.ns, "link", "set", self.ns_if, "up")
            _ip("-n", self.ns, "link", "set", "lo", "up")
            if rate is not None:
                _shape(self.host_if, rate, queue)
        except BaseException:
            self.close()
            raise

    def wrap(self, argv: list[str]) -> list[str]:
        """``argv`` run inside the namespace (``ip netns exec`` execs it: wait4 sees the command itself)."""
        return ["ip", "netns", "exec", self.ns, *argv]

    def qdisc_stats(self) -> dict[str, int]:
        """The tbf's counters so far: bytes and packets sent, packets dropped (a full queue), overlimits."""
        out = subprocess.run(["tc", "-s", "qdisc", "show", "dev", self.host_if], capture_output=True,
                             text=True).stdout.split()
        stats: dict[str, int] = {}
        for key, field in (("Sent", "bytes"), ("dropped", "dropped"), ("overlimits", "overlimits")):
            if key in out:
                stats[field] = int(out[out.index(key) + 1].rstrip(","))
        return stats

    def close(self) -> None:
        """Remove the namespace (its end of the veth goes with it, and the pair with that end)."""
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True)

    def __enter__(self) -> KernelLink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Fabric:
    """``nodes`` namespaces on a bridge: node i is namespace ``dv3f-node<i>-<pid>`` with ``eth0`` at ``ip(i)``,
    its egress shaped to ``rate`` bytes/s; the bridge, in this namespace, is at ``host`` (servers listen there).
    ``close`` kills every process left in the namespaces (a launcher's children too) and removes them."""

    def __init__(self, nodes: int, rate: float, queue: float = 0.150) -> None:
        why = kernel_link_available()
        if why is not None:
            raise RuntimeError(f"fabric: {why}")
        pid = os.getpid()
        self.nodes, self.tag = nodes, f"{pid % 100000}"
        self.bridge = f"dv3f{self.tag}br"
        self.net = f"10.214.{1 + pid % 250}"
        self.host = f"{self.net}.1"
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.host}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for i in range(nodes):
                ns, peer = self.ns(i), f"dv3f{self.tag}p{i}"
                _ip("netns", "add", ns)
                _ip("link", "add", self.veth(i), "type", "veth", "peer", "name", peer)
                _ip("link", "set", peer, "netns", ns)
                _ip("-n", ns, "link", "set", peer, "name", "eth0")
                _ip("link", "set", self.veth(i), "master", self.bridge, "up")
                _ip("-n", ns, "addr", "add", f"{self.ip(i)}/24", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
                _ip("-n", ns, "link", "set", "lo", "up")
                _shape("eth0", rate, queue, ns, GSO_BUCKET)
        except BaseException:
            self.close()
            raise

    def ns(self, i: int) -> str:
        return f"dv3f-node{i}-{os.getpid()}"

    def ip(self, i: int) -> str:
        return f"{self.net}.{10 + i}"

    def veth(self, i: int) -> str:
        return f"dv3f{self.tag}v{i}"  # the bridge's end; the node's end is eth0 in its namespace

    def wrap(self, i: int, argv: list[str], hostname: str | None = None) -> list[str]:
        """``argv`` run in node ``i``'s namespace, with ``hostname`` as its host name (a UTS namespace of its
        own) when given."""
        named = ["unshare", "-u", "sh", "-c", f'hostname {hostname} && exec "$@"', "sh"] if hostname else []
        return ["ip", "netns", "exec", self.ns(i), *named, *argv]

    def sent(self) -> list[int]:
        """The bytes each node has sent so far: what the bridge's end of its veth received."""
        return [int(Path(f"/sys/class/net/{self.veth(i)}/statistics/rx_bytes").read_text())
                for i in range(self.nodes)]

    def close(self) -> None:
        for i in range(self.nodes):
            clean_namespace(self.ns(i))
            subprocess.run(["ip", "link", "del", self.veth(i)], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)

    def __enter__(self) -> Fabric:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def clean_namespace(ns: str) -> None:
    """Kill every process in namespace ``ns``, then remove it (nothing happens if it does not exist)."""
    with contextlib.suppress(subprocess.CalledProcessError):
        for pid in _ip("netns", "pids", ns).split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
    subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def clean_all() -> list[str]:
    """Remove what killed benches left: each ``dv3f-`` namespace whose bench process is gone (its processes are
    killed; its veth pairs go with it), then each bench bridge left without a port."""
    gone = []
    for line in _ip("netns", "list").splitlines():
        name = line.split()[0] if line.split() else ""
        owner = name.rpartition("-")[2]
        if name.startswith("dv3f-") and owner.isdigit() and not Path(f"/proc/{owner}").exists():
            clean_namespace(name)
            gone.append(name)
    for bridge in Path("/sys/class/net").glob("dv3f*br"):
        if not any((bridge / "brif").iterdir()):
            subprocess.run(["ip", "link", "del", bridge.name], capture_output=True)
            gone.append(bridge.name)
    return gone
