"""The ranks of a torch.distributed job on this host, its "nodes" told apart as torchrun tells them: under real
``torchrun`` (an agent per node, which starts the node's workers), or forked (``forked``).

Forked ranks are real, separate processes with gloo over TCP, signals and files of their own, run from their
worker script as ``python worker.py ARGS`` runs it, with the environment torchrun gives its workers; they are
forked by a server (``fork_server.py``, one per test process) that imported torch and the fetcher once, so a
rank starts in milliseconds of CPU instead of the second a torch import costs. Fault injection in the worker
script (patching a class before the job runs) works the same.
"""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from conftest import cli_env
from net_fixtures import free_port


def job_env(**extra: str) -> dict[str, str]:
    """The sandboxed environment (``cli_env``) of a job's processes: gloo on the loopback, one thread for torch."""
    return cli_env(GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)


def torchrun(worker: Path, args: Sequence[str], *, nodes: int = 1, nproc: int = 1,
             env: dict[str, str] | None = None) -> list[subprocess.Popen[str]]:
    """``torchrun`` for each of ``nodes`` nodes (``--standalone`` for one), ``nproc`` workers each, running
    ``worker ARGS``; the agents' processes, node 0 first."""
    if nodes == 1:
        where = [["--standalone"]]
    else:
        port = free_port()
        where = [[f"--nnodes={nodes}", f"--node-rank={n}", "--master-addr=127.0.0.1", f"--master-port={port}"]
                 for n in range(nodes)]
    return [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *w, f"--nproc-per-node={nproc}",
                              str(worker), *args], env=env or job_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for w in where]


def forked(worker: Path, args: Sequence[str], logs: Path, *, nodes: int = 1, nproc: int = 1,
           env: dict[str, str] | None = None, rank_of: Callable[[int, int], int] | None = None) -> list[Forked]:
    """Every rank of ``nodes`` x ``nproc`` forked, running ``worker ARGS`` with the environment torchrun gives
    its workers (node N: ``GROUP_RANK`` N and the host name ``nodeN``); ``rank_of(node, local_rank)`` numbers
    the ranks (torchrun's order by default). Their stdout and stderr go to files in ``logs``. The ranks, in
    the order of (node, local rank)."""
    base = env or job_env()
    port, world = free_port(), nodes * nproc
    out = []
    for n in range(nodes):
        for lr in range(nproc):
            rank = rank_of(n, lr) if rank_of else n * nproc + lr
            rank_env = {**base, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
                        "RANK": str(rank), "LOCAL_RANK": str(lr), "LOCAL_WORLD_SIZE": str(nproc),
                        "GROUP_RANK": str(n), "GROUP_WORLD_SIZE": str(nodes), "ROLE_RANK": str(rank),
                        "ROLE_WORLD_SIZE": str(world), "DINOV3_FETCHER_HOSTNAME": f"node{n}"}
            out.append(_server().start([str(worker), *args], rank_env, logs / f"node{n}.{lr}"))
    return out


class Forked:
    """A forked rank, as much of ``subprocess.Popen`` as the tests use (its output is text, read at the end)."""

    def __init__(self, server: _Server, args: list[str], logs: Path) -> None:
        self.server, self.args, self.logs = server, args, logs
        self.rid = -1  # the server's number for it
        self.pid = 0
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        with self.server.cond:
            if not self.server.cond.wait_for(lambda: self.returncode is not None or self.server.gone, timeout):
                raise subprocess.TimeoutExpired(self.args, timeout or 0)
        if self.returncode is None:
            raise RuntimeError(f"the fork server ended: {self.server.log()}")
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        return (Path(f"{self.logs}.out").read_text(errors="replace"),
                Path(f"{self.logs}.err").read_text(errors="replace"))

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            self.server.signal(self, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class _Server:
    """One fork server for this process; its answers read in a thread."""

    def __init__(self, kind: str) -> None:
        self.errors: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115  (closed by shutdown)
        flags = ["--cli"] if kind == "cli" else []
        # What the interpreter reads as it starts (buffering, encoding, hash seed, warnings) is the server's: the
        # command line's runs get the environment a fresh ``python -m dinov3_fetcher`` of the suite would have.
        self.env = cli_env() if kind == "cli" else job_env()
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("fork_server.py")), *flags],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.errors,
                                     env=self.env, start_new_session=True)
        self.cond = threading.Condition()
        self.ids = itertools.count()
        self.asked: dict[int, Forked] = {}  # by request id, until its pid is known
        self.live: dict[int, Forked] = {}  # by pid, until it ends
        self.gone = False
        threading.Thread(target=self._read, name="fork-server-answers", daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            msg = json.loads(line)
            with self.cond:
                if "id" in msg:  # in order: a pid's end comes before its reuse by a later rank
                    forked = self.asked.pop(msg["id"])
                    forked.pid = msg["pid"]
                    self.live[forked.pid] = forked
                else:
                    self.live.pop(msg["pid"]).returncode = msg["returncode"]
                self.cond.notify_all()
        with self.cond:
            self.gone = True
            self.cond.notify_all()

    def _send(self, msg: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(msg).encode() + b"\n")
        self.proc.stdin.flush()

    def start(self, argv: list[str], env: dict[str, str], logs: Path, cwd: Path | None = None,
              stdin: Path | None = None) -> Forked:
        forked = Forked(self, argv, logs)
        with self.cond:
            if self.gone:
                raise RuntimeError(f"the fork server ended: {self.log()}")
            forked.rid = next(self.ids)
            self.asked[forked.rid] = forked
            self._send({"id": forked.rid, "argv": argv, "env": env, "cwd": str(cwd or Path.cwd()),
                        "stdout": f"{logs}.out", "stderr": f"{logs}.err", "stdin": str(stdin) if stdin else None})
            self.cond.wait_for(lambda: forked.pid or self.gone)
        if not forked.pid:
            raise RuntimeError(f"the fork server ended: {self.log()}")
        return forked

    def signal(self, forked: Forked, sig: int) -> None:
        with self.cond:  # through the server's pidfd of this very process (never a later one with its pid)
            if forked.returncode is None and not self.gone:
                self._send({"signal": int(sig), "id": forked.rid})

    def log(self) -> str:
        self.errors.seek(0)
        return self.errors.read().decode(errors="replace")[-3000:]


_lock = threading.Lock()
_servers: dict[str, _Server] = {}


def _server(kind: str = "ranks") -> _Server:
    with _lock:
        if kind not in _servers or _servers[kind].gone:
            _servers[kind] = _Server(kind)
        return _servers[kind]


def cli(args: Sequence[str], env: dict[str, str], *, cwd: Path | None = None, timeout: float = 120,
        input: str | None = None, fresh: bool = False) -> subprocess.CompletedProcess[str]:
    """``python -m dinov3_fetcher ARGS`` as ``subprocess.run(..., capture_output=True, text=True)`` runs it, in a
    process forked by the command line's fork server (the interpreter's start-up and the imports are shared, as
    a ``python -m`` of the installed package would do them): its own environment, working folder, stdin, output,
    exit status and signals. TimeoutExpired (the run killed) after ``timeout`` seconds. ``fresh``, or an
    environment that sets what an interpreter reads as it starts (``PYTHON*``, ``LANG``, ``LC_*``) otherwise than
    the server's: in a new interpreter."""
    argv = ["-m", "dinov3_fetcher", *args]
    server = _server("cli")
    if fresh or any(env.get(k) != server.env.get(k) for k in env.keys() | server.env.keys()
                    if k.startswith(("PYTHON", "LC_")) or k == "LANG"):
        return subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout, input=input)
    with tempfile.TemporaryDirectory(prefix="cli-") as tmp:
        stdin = None
        if input is not None:
            stdin = Path(tmp) / "stdin"
            stdin.write_text(input)
        run = server.start(argv, env, Path(tmp) / "run", cwd=cwd, stdin=stdin)
        try:
            out, err = run.communicate(timeout)
        except BaseException:  # its timeout, pytest's, a Ctrl-C: the run does not outlive its test
            run.kill()
            run.wait()
            raise
    return subprocess.CompletedProcess([sys.executable, *argv], int(run.returncode or 0), out, err)


def shutdown() -> None:
    """End this process's fork servers (their children still running are killed) and wait for them, so that their
    CPU time and their children's count in this process's (``RUSAGE_CHILDREN``, ``time``)."""
    with _lock:
        for server in _servers.values():
            assert server.proc.stdin is not None
            server.proc.stdin.close()
            server.proc.wait()
            server.errors.close()
        _servers.clear()
