"""Real network components for tests: a TLS Hub with a throwaway CA, a forward proxy, olah.

Imported by conftest.py, so the fixtures are available everywhere:

- ``tls_hub``: a HubServer over https (hub 127.0.0.1 + CDN 127.0.0.2) whose certificate a trustme CA
  signed; yields ``TlsHub(hub, ca_pem)``. HF_ENDPOINT points at it; SSL_CERT_FILE is left to the test.
- ``forward_proxy``: a real proxy.py (PyPI ``proxy.py``) in a subprocess on 127.0.0.1; yields a
  ``ForwardProxy`` whose ``records()`` lists what it parsed (tests/proxy_plugin.py): a CONNECT line per
  tunnel, or the method, absolute URL and headers of each plain-HTTP request it forwarded.
- ``olah``: a real olah (PyPI ``olah``, ``olah-cli``) in a subprocess in front of the ``hub`` fixture;
  yields an ``Olah`` with ``endpoint`` (point HF_ENDPOINT at it) and ``repos_path`` (its cache).

Subprocesses are started with the test's environment minus proxies, waited for (bounded, by polling a port
or a port file), and stopped by their pid at teardown.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from hub_server import HubServer, tls_context

TESTS = Path(__file__).resolve().parent
_PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy",
               "NO_PROXY", "no_proxy")


# ---------- TLS ----------

@dataclass
class TlsHub:
    hub: HubServer
    ca_pem: Path  # the throwaway CA's certificate: what SSL_CERT_FILE must name to trust the hub


def make_ca(directory: Path) -> tuple[Any, Path, Path, Path]:
    """A trustme CA and a server certificate for 127.0.0.1, 127.0.0.2, localhost and ::1 (PEM files)."""
    import trustme

    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "127.0.0.2", "localhost", "::1")
    directory.mkdir(parents=True, exist_ok=True)
    ca_pem, cert_pem, key_pem = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    ca.cert_pem.write_to_path(str(ca_pem))
    leaf.private_key_pem.write_to_path(str(key_pem))
    with open(cert_pem, "wb") as f:
        for blob in leaf.cert_chain_pems:
            f.write(blob.bytes())
    return ca, ca_pem, cert_pem, key_pem


@pytest.fixture
def tls_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TlsHub]:
    _, ca_pem, cert_pem, key_pem = make_ca(tmp_path / "tls")
    with HubServer(tls=tls_context(cert_pem, key_pem)) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        yield TlsHub(server, ca_pem)


# ---------- subprocess helpers ----------

def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _PROXY_VARS}
    env.update(extra)
    return env


def _stop(proc: subprocess.Popen[bytes], graceful: bool = True) -> None:
    """Stop a server started with ``start_new_session=True``: its whole process group (proxy.py forks its
    workers, which a kill of the parent alone would leave running), by the group id = its pid."""
    try:
        if graceful and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        os.killpg(proc.pid, signal.SIGKILL)  # the group's leftovers, if any
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


def _wait_port(host: str, port: int, proc: subprocess.Popen[bytes], log: Path, tries: int = 600) -> None:
    for _ in range(tries):  # tries x 50 ms (plus refused connects) at most
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{proc.args!r} never listened on {host}:{port}:\n{log.read_text(errors='replace')}")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


# ---------- proxy.py ----------

class ForwardProxy:
    """A real forward proxy (proxy.py) on 127.0.0.1 in a subprocess; ``url`` is ``http://127.0.0.1:PORT``.
    ``basic_auth="user:password"``: it answers 407 to a request without those credentials."""

    def __init__(self, directory: Path, basic_auth: str | None = None) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.record_file = directory / "proxy-records.jsonl"
        self.record_file.touch()
        self.log = directory / "proxy.log"
        port_file = directory / "proxy.port"
        cmd = [sys.executable, "-m", "proxy", "--hostname", "127.0.0.1", "--port", "0",
               "--port-file", str(port_file), "--num-acceptors", "1", "--num-workers", "1", "--threaded",
               "--plugins", "proxy_plugin.Recorder", "--log-level", "INFO", "--log-file", str(self.log)]
        cmd += ["--basic-auth", basic_auth] if basic_auth else []
        env = _clean_env(PROXY_RECORD_FILE=str(self.record_file),
                         PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        try:
            for _ in range(600):
                text = port_file.read_text() if port_file.exists() else ""
                if text.strip():
                    break
                if self.proc.poll() is not None:
                    raise RuntimeError(f"proxy.py exited with {self.proc.returncode}: {self.log.read_text()}")
                time.sleep(0.05)
            else:
                raise RuntimeError("proxy.py never wrote its port file")
            self.port = int(text.split()[0])
            _wait_port("127.0.0.1", self.port, self.proc, self.log)
        except BaseException:
            _stop(self.proc)
            raise
        self.url = f"http://127.0.0.1:{self.port}"

    def records(self) -> list[dict[str, Any]]:
        """Every request the proxy parsed so far, in order (CONNECT records for tunnels)."""
        return [json.loads(line) for line in self.record_file.read_text().splitlines() if line.strip()]

    def clear(self) -> None:
        self.record_file.write_text("")

    def close(self) -> None:  # it keeps no state: no need for its graceful (1 s) shutdown
        _stop(self.proc, graceful=False)


@pytest.fixture
def forward_proxy(tmp_path: Path) -> Iterator[ForwardProxy]:
    p = ForwardProxy(tmp_path / "proxy")
    try:
        yield p
    finally:
        p.close()


# ---------- olah ----------

class Olah:
    """A real olah mirror (``olah-cli``) on 127.0.0.1 in front of a HubServer (plain http), in a subprocess."""

    def __init__(self, hub: HubServer, directory: Path) -> None:
        if not hub.endpoint.startswith("http://"):
            raise ValueError("olah is started in front of a plain-http hub")
        directory.mkdir(parents=True, exist_ok=True)
        self.repos_path = directory / "repos"
        self.log = directory / "olah.log"
        self.port = free_port()
        netloc = f"127.0.0.1:{self.port}"
        hub_netloc = hub.endpoint.removeprefix("http://")
        cdn_netloc = hub.cdn_endpoint.removeprefix("http://")
        olah_cli = Path(sys.executable).with_name("olah-cli")
        cmd = [str(olah_cli), "--host", "127.0.0.1", "--port", str(self.port),
               "--hf-scheme", "http", "--hf-netloc", hub_netloc, "--hf-lfs-netloc", cdn_netloc,
               "--mirror-scheme", "http", "--mirror-netloc", netloc, "--mirror-lfs-netloc", netloc,
               "--repos-path", str(self.repos_path), "--log-path", str(directory / "logs")]
        # olah's own httpx client must reach the emulator directly, whatever proxy the test configures
        env = _clean_env(NO_PROXY="127.0.0.1,127.0.0.2,localhost", HF_HUB_DISABLE_TELEMETRY="1")
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=directory,
                                         start_new_session=True)
        try:
            _wait_port("127.0.0.1", self.port, self.proc, self.log, tries=2400)  # its imports: 5-15 s here
        except BaseException:
            _stop(self.proc)
            raise
        self.endpoint = f"http://{netloc}"

    def close(self) -> None:
        _stop(self.proc)


@pytest.fixture
def olah(hub: HubServer, tmp_path: Path) -> Iterator[Olah]:
    o = Olah(hub, tmp_path / "olah")
    try:
        yield o
    finally:
        o.close()
