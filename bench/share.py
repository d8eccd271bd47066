"""fetch_once(share="broadcast") against a plain fetch, in one run, on this host (the Hub emulator, gloo on lo).

    uv run python bench/share.py [--layers 6] [--nodes 3] [--link pipe]

1. plain: ``fetch_dinov3`` from the emulator into an empty folder (what every node does without sharing);
2. broadcast, cold: ``--nodes`` "nodes" (separate processes, their own dino_roots, tests/test_share.py's
   launcher); rank 0 fetches from the emulator, the others receive;
3. broadcast, rank 0 warm: the receivers' folders emptied, rank 0's kept: the transfer alone.
Prints the bytes the emulator served, wall seconds (workers' start-up included), the job's seconds (the longest
``fetch_once`` call of all ranks), and per receiving node MB/s (its bytes / its seconds). ``--link`` puts the
Hub and its CDN behind bench/link.py's emulated link (``pipe``: 50 MB/s shared, 80 ms; ``none``: direct).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import test_share as ts
from dinov3_fetcher import fetch_dinov3
from dinov3_fetcher._broadcast.wire import CHUNK
from link import PROFILES, LinkProxy
from servers import HubServer, make_repo, repo_files


@contextlib.contextmanager
def linked(hub: HubServer, name: str) -> Iterator[str]:
    """The endpoint to use: the Hub's own, or a proxy in front of it and its CDN shaped as ``PROFILES[name]``."""
    if name == "none":
        yield hub.endpoint
        return
    saved = hub.cdn_endpoint
    host, port = saved.removeprefix("http://").rsplit(":", 1)
    h, p = hub.endpoint.removeprefix("http://").rsplit(":", 1)
    with LinkProxy((host, int(port)), "127.0.0.2", PROFILES[name]) as cdn, \
            LinkProxy((h, int(p)), "127.0.0.1", PROFILES[name], shaped=False) as api:
        hub.cdn_endpoint = cdn.endpoint
        try:
            yield api.endpoint
        finally:
            hub.cdn_endpoint = saved


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--repo", default="/tmp/dinov3-bench-share-repo")
    ap.add_argument("--link", default="none", choices=sorted(PROFILES))
    args = ap.parse_args()
    src = make_repo(Path(args.repo) / f"L{args.layers}", 1, args.layers)
    with HubServer() as hub, tempfile.TemporaryDirectory(dir="/tmp") as tmp, linked(hub, args.link) as endpoint:
        os.environ["HF_ENDPOINT"] = endpoint
        hub.add_repo(ts.MODEL, repo_files(src))
        size = (src / "model.safetensors").stat().st_size
        print(f"checkpoint: {size / 1e6:.0f} MB of weights; {args.nodes} nodes; chunk {CHUNK >> 20} MiB; "
              f"link {PROFILES[args.link].describe()}; load avg {os.getloadavg()[0]:.1f}")
        print("| scenario | served by the emulator (MB) | wall s | job s | per receiving node MB/s |")
        print("|---|---|---|---|---|")
        t0 = time.monotonic()
        fetch_dinov3(Path(tmp) / "plain", ts.MODEL)
        wall = time.monotonic() - t0
        print(f"| plain fetch, 1 node | {hub.bytes_served() / 1e6:.0f} | {wall:.2f} | {wall:.2f} | "
              f"{size / 1e6 / wall:.0f} (fetch) |")
        shutil.rmtree(Path(tmp) / "plain")
        (Path(tmp) / "job").mkdir()
        job = ts.Job(Path(tmp) / "job", nodes=args.nodes, chunk=CHUNK)
        for label in ("broadcast, cold", "broadcast, rank 0 warm"):
            served = hub.bytes_served()
            t0 = time.monotonic()
            procs, results = job.run(timeout=900)
            wall = time.monotonic() - t0
            if not all(r.get("ok") for r in results.values()) or len(results) != args.nodes:
                print("failed", results, [p.stderr[-2000:] for p in procs])
                return
            nodes = results[0]["nodes"]
            rates = [s["bytes"] / 1e6 / s["seconds"] for r, s in sorted(nodes.items()) if s["role"] == "receiver"]
            job_s = max(r["seconds"] for r in results.values())
            print(f"| {label} | {(hub.bytes_served() - served) / 1e6:.0f} | {wall:.2f} | {job_s:.2f} | "
                  f"{', '.join(f'{x:.0f}' for x in rates)} |", flush=True)
            for n in range(1, args.nodes):
                shutil.rmtree(job.root(n))


if __name__ == "__main__":
    main()
