"""A link shaped by the kernel: the tools run in a network namespace joined to the servers by a veth pair.

    with KernelLink(100e6, queue=0.150) as k:      # needs root, `ip` and `tc` (iproute2)
        subprocess.run(k.wrap(["curl", f"http://{k.host}:8080/x"]))

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
"""

from __future__ import annotations

import os
import shutil
import subprocess

__all__ = ["KernelLink", "kernel_link_available"]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


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
                # burst: 64 KiB at least (a GSO packet), else 2 ms at the rate; latency: the queue's length
                burst = max(64 * 1024, int(rate * 0.002))
                subprocess.run(["tc", "qdisc", "add", "dev", self.host_if, "root", "tbf", "rate",
                                f"{int(rate * 8)}bit", "burst", str(burst), "latency", f"{queue * 1000:g}ms"],
                               check=True, capture_output=True, text=True)
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
