"""The servers a benchmark talks to: the local Hub emulator (tests/hub_server.py), optionally with nginx as its CDN.

The emulator answers the metadata calls and the ``resolve`` GET (a 302 to the CDN, as the real Hub does for
LFS files). Its own CDN is a Python ThreadingHTTPServer; ``NginxCdn`` puts a static nginx behind the same
redirect (``/lfs/<sha256>/<name>``, symlinks to the checkpoint files) so that the server is not what limits a
fast client. nginx is optional: ``find_nginx`` returns None when it is not installed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import hub_server  # noqa: E402
from checkpoints import big_vit_repo_dir  # noqa: E402
from hub_server import HubServer  # noqa: E402

__all__ = ["CHECKPOINTS", "Checkpoint", "HubServer", "NginxCdn", "find_nginx", "make_repo", "repo_files"]


@dataclass(frozen=True)
class Checkpoint:
    """A bench workload: a DINOv3 ViT's real tensor names and shapes, as a single file and/or shards."""

    name: str
    repo: str  # the single-file repo id (an official id, so the registry's architecture check runs)
    sharded_repo: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    gated_mlp: bool = False
    qv_bias: bool = True
    kinds: tuple[str, ...] = ("single", "sharded")  # the layouts the bench serves

    def smaller(self, layers: int) -> Checkpoint:
        """Fewer layers: no longer the real architecture, so unofficial ids (no registry check)."""
        return replace(self, repo=f"bench-org/{self.name}-small", sharded_repo=f"bench-org/{self.name}-small-sharded",
                       layers=layers)


CHECKPOINTS = {
    # ViT-B/16, 343 MB, single file (the multi-node bench's workload)
    "vitb16": Checkpoint("vitb16", "facebook/dinov3-vitb16-pretrain-lvd1689m", "bench-org/dinov3-vitb16-sharded",
                         768, 3072, 12, 12, kinds=("single",)),
    # ViT-L/16, 1.21 GB; the shards under the satellite id (same architecture, so the registry check passes)
    "vitl16": Checkpoint("vitl16", "facebook/dinov3-vitl16-pretrain-lvd1689m",
                         "facebook/dinov3-vitl16-pretrain-sat493m", 1024, 4096, 24, 16),
    # ViT-7B/16, 26.9 GB in an index + 6 shards, as on the Hub (no single-file layout)
    "vit7b16": Checkpoint("vit7b16", "facebook/dinov3-vit7b16-pretrain-sat493m",
                          "facebook/dinov3-vit7b16-pretrain-lvd1689m", 4096, 8192, 40, 32, gated_mlp=True,
                          qv_bias=False, kinds=("sharded",)),
}


def make_repo(dest: Path, n_shards: int, ckpt: Checkpoint) -> Path:
    """``ckpt``'s repo written once into ``dest`` (streamed: never held in memory), reused by later runs. Each
    weight file's sha256 is computed while it is written and kept beside it, so the Hub emulator does not read
    26.9 GB back to hash them."""
    done = dest / ".complete"
    if not done.exists():
        shutil.rmtree(dest, ignore_errors=True)
        hashes: dict[str, str] = {}
        big_vit_repo_dir(dest, hidden=ckpt.hidden, intermediate=ckpt.intermediate, layers=ckpt.layers,
                         heads=ckpt.heads, gated_mlp=ckpt.gated_mlp, qv_bias=ckpt.qv_bias, n_shards=n_shards,
                         sha256s=hashes)
        (dest / ".sha256.json").write_text(json.dumps(hashes, indent=1) + "\n")
        done.write_text("ok\n")
    with contextlib.suppress(OSError, ValueError):
        for name, sha in json.loads((dest / ".sha256.json").read_text()).items():
            st = (dest / name).stat()
            hub_server._HASH_CACHE[(str((dest / name).resolve()), st.st_size, st.st_mtime_ns)] = sha
    return dest


def repo_files(src: Path) -> dict[str, bytes | Path]:
    """The repo's files for ``HubServer.add_repo``: big LFS files by path, small ones by content."""
    out: dict[str, bytes | Path] = {}
    for p in sorted(src.iterdir()):
        if p.name.startswith(".") and p.name != ".gitattributes":
            continue
        out[p.name] = p if p.suffix == ".safetensors" else p.read_bytes()
    return out


def find_nginx() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx")
                                          if Path(p).exists()), None)


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class NginxCdn:
    """A static nginx on 127.0.0.2 serving the emulator's LFS blobs under the same paths as its CDN."""

    def __init__(self, binary: str, workdir: Path, blobs: dict[str, Any], host: str = "127.0.0.2") -> None:
        self.dir = workdir / "nginx"
        root = self.dir / "root"
        for sha, blob in blobs.items():
            if blob.disk is None:
                continue
            d = root / "lfs" / sha
            d.mkdir(parents=True, exist_ok=True)
            # The emulator redirects to /lfs/<sha>/<repo path>; one name per blob is enough here.
            link = d / blob.disk.name
            if not link.exists():
                link.symlink_to(blob.disk.resolve())
        (self.dir / "tmp").mkdir(parents=True, exist_ok=True)
        self.port = _free_port(host)
        self.endpoint = f"http://{host}:{self.port}"
        conf = self.dir / "nginx.conf"
        user = "user root;\n" if os.geteuid() == 0 else ""  # the workers must read files under a 0700 temp dir
        conf.write_text(f"""{user}worker_processes 2;
pid {self.dir}/nginx.pid;
error_log {self.dir}/error.log;
events {{ worker_connections 512; }}
http {{
  access_log off;
  client_body_temp_path {self.dir}/tmp;
  proxy_temp_path {self.dir}/tmp;
  fastcgi_temp_path {self.dir}/tmp;
  uwsgi_temp_path {self.dir}/tmp;
  scgi_temp_path {self.dir}/tmp;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 10000;
  default_type application/octet-stream;
  server {{
    listen {host}:{self.port};
    root {root};
    location /lfs/ {{ disable_symlinks off; }}
  }}
}}
""")
        self.proc = subprocess.Popen([binary, "-c", str(conf), "-p", str(self.dir), "-g", "daemon off;"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = (self.proc.stderr.read() if self.proc.stderr else b"").decode(errors="replace")
                raise RuntimeError(f"nginx did not start: {err.strip()}")
            try:
                socket.create_connection((host, self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        self.close()
        raise RuntimeError("nginx did not listen within 10 s")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
