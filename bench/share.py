"""fetch_once(share="broadcast") on N emulated nodes, real kernel TCP between them, each node's egress capped.

    uv run --group bench python bench/share.py [--nodes 2,4,6,8] [--checkpoint vitb16] [--mbit 200]
        [--launcher torchrun|env] [--src DIR] [--label NAME] [--json OUT] [--compare RUN.json] [--png OUT]

As root. For each N: N network namespaces on a bridge (bench/netns.py's ``Fabric``: a veth pair each, addresses on
a private 10.214.x range), each node's egress shaped by ``tc qdisc ... tbf`` to ``--mbit``, a host name of its
own (``unshare -u``), ``GLOO_SOCKET_IFNAME`` on its interface, and ``torchrun`` per node (``--launcher env``: the
environment torchrun gives its worker, without the agent: half the processes on a small machine). The Hub
emulator listens on the bridge; rank 0 downloads from it, the other nodes receive over the job's network. Every
node starts cold.

The worker uses only the public API, ``fetch_once(root, model, share="broadcast", details=True)``, so the same
bench measures any version: ``--src`` puts the ``src`` of another checkout (an older commit, say) first on the
workers' PYTHONPATH, for a before/after table and figure (``--compare`` the other run's ``--json``).

Prints per N: the job's seconds (the longest ``fetch_once`` call, every rank starting after a barrier: what a job
waits for in ``fetch_once``; the workers' start, torch's import, about 0.9 CPU-seconds per process here, twice per
node under torchrun with its agent, and ``init_process_group`` come before it, their exit after it), the ratio
to the first N, the bytes the Hub served and each node's sent bytes from its interface counters, in units of the
checkpoint's size S, and the CPU-seconds each node's worker spent in ``fetch_once`` (all its threads; the
kernel's softirq work for the emulated network is the machine's, not any worker's). The namespaces and the
processes in them are removed at the end, on an error and on Ctrl-C; ``--clean`` removes what a killed run left.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from netns import Fabric, clean_all, kernel_link_available
from plot import draw_nodes
from servers import CHECKPOINTS, HubServer, make_repo, repo_files

WORKER = """\
import json, os, resource, socket, sys, time

import torch.distributed as dist

from dinov3_fetcher import FetcherError, fetch_once

out, root, model = sys.argv[1:4]
dist.init_process_group("gloo")
rank = dist.get_rank()
dist.barrier()  # every rank starts together: the job's seconds are the longest call


def cpu():  # this process's CPU-seconds, all its threads
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


t0, c0 = time.monotonic(), cpu()
try:
    res = fetch_once(root, model, share="broadcast", details=True)
    result = {"ok": True, **res.to_dict()}
except FetcherError as exc:
    result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
result.update(rank=rank, host=socket.gethostname(), seconds=time.monotonic() - t0, cpu=cpu() - c0)
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump(result, f)
dist.destroy_process_group()
"""


@contextlib.contextmanager
def started(cmds: list[tuple[list[str], dict[str, str]]], logs: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    """The node processes, their output in ``logs``/node<i>.log; killed (with their sessions) on the way out."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i, (cmd, env) in enumerate(cmds):
            with (logs / f"node{i}.log").open("wb") as log:
                procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                              start_new_session=True))
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def run_job(fabric: Fabric, work: Path, model: str, endpoint: str, args: argparse.Namespace) -> dict[str, Any]:
    """One cold job on ``fabric``: its seconds, each node's sent bytes, the host names the ranks saw."""
    out = work / "out"
    out.mkdir(parents=True)
    worker = work / "worker.py"
    worker.write_text(WORKER)
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(work / "hf"), HF_HUB_DISABLE_TELEMETRY="1", NO_PROXY="*",
               GLOO_SOCKET_IFNAME="eth0", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("HF_TOKEN", None)
    if args.src:
        env["PYTHONPATH"] = os.pathsep.join([str(Path(args.src).resolve()), *filter(None, [env.get("PYTHONPATH")])])
    port, n = 29500 + os.getpid() % 1000, fabric.nodes
    cmds = []
    for i in range(n):
        argv = [str(worker), str(out), str(work / f"node{i}" / "dinov3"), model]
        if args.launcher == "torchrun":
            cmds.append((fabric.wrap(i, [sys.executable, "-m", "torch.distributed.run", f"--nnodes={n}",
                                         f"--node-rank={i}", "--nproc-per-node=1", f"--master-addr={fabric.ip(0)}",
                                         f"--master-port={port}", *argv], f"node{i}"), env))
        else:
            cmds.append((fabric.wrap(i, [sys.executable, *argv], f"node{i}"),
                         {**env, "MASTER_ADDR": fabric.ip(0), "MASTER_PORT": str(port), "RANK": str(i),
                          "WORLD_SIZE": str(n), "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "GROUP_RANK": str(i)}))
    before = fabric.sent()
    with started(cmds, work) as procs:
        deadline = time.monotonic() + args.timeout
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.2)
    sent = [a - b for a, b in zip(fabric.sent(), before, strict=True)]
    results = [json.loads(f.read_text()) for f in sorted(out.glob("rank*.json"))]
    if len(results) != n or not all(r.get("ok") for r in results):
        tails = "\n".join(f"--- node{i}\n" + (work / f"node{i}.log").read_text(errors="replace")[-1500:]
                          for i in range(n))
        raise SystemExit(f"N={n}: the job failed or did not end in {args.timeout:.0f} s: "
                         f"{[r for r in results if not r.get('ok')]}\n{tails}")
    return {"nodes": n, "seconds": max(r["seconds"] for r in results), "sent": sent,
            "cpu": [r.get("cpu") for r in sorted(results, key=lambda r: r["rank"])],
            "hosts": sorted({r["host"] for r in results})}


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # Ctrl-C or SIGTERM: the same clean-up


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", default="2,4,6,8", help="node counts, comma-separated")
    ap.add_argument("--checkpoint", choices=sorted(CHECKPOINTS), default="vitb16")
    ap.add_argument("--layers", type=int, default=0, help="fewer layers than the checkpoint has (a smaller run)")
    ap.add_argument("--mbit", type=float, default=200, help="each node's egress, in Mbit/s")
    ap.add_argument("--launcher", choices=("torchrun", "env"), default="torchrun")
    ap.add_argument("--src", default="", help="a checkout's src folder to run instead of the installed package")
    ap.add_argument("--label", default="", help="this run's name in --json and on the figure")
    ap.add_argument("--repo", default="/tmp/dinov3-bench-share-repo", help="where the checkpoint is written once")
    ap.add_argument("--timeout", type=float, default=900, help="seconds one job may take")
    ap.add_argument("--json", default="", help="write the figures here")
    ap.add_argument("--compare", default="", help="another run's --json, drawn beside this one")
    ap.add_argument("--png", default="", help="draw the job's seconds against N here")
    ap.add_argument("--clean", action="store_true", help="remove what a killed run left, then exit")
    args = ap.parse_args()
    if (why := kernel_link_available()) is not None or shutil.which("unshare") is None:
        raise SystemExit(f"bench/share.py: {why or 'needs unshare (util-linux)'}")
    if args.clean:
        print("removed:", ", ".join(clean_all()) or "nothing")
        return
    for sig in (signal.SIGINT, signal.SIGTERM):  # (a shell may start a background job with SIGINT ignored)
        signal.signal(sig, _interrupt)
    ckpt = CHECKPOINTS[args.checkpoint]
    if args.layers and args.layers != ckpt.layers:
        ckpt = ckpt.smaller(args.layers)
    src = make_repo(Path(args.repo) / f"{ckpt.name}-L{ckpt.layers}", 1, ckpt)
    size = sum(p.stat().st_size for p in src.iterdir() if p.is_file() and not p.name.startswith("."))
    rate = args.mbit * 1e6 / 8
    label = args.label or (f"src {args.src}" if args.src else "this checkout")
    print(f"{ckpt.name}, {ckpt.layers} layers: S = {size / 1e6:.0f} MB; each node's egress {args.mbit:g} Mbit/s "
          f"(S / B = {size / rate:.1f} s); {args.launcher}; {label}; load average {os.getloadavg()[0]:.1f}",
          flush=True)
    rows: list[dict[str, Any]] = []
    try:
        for n in (int(x) for x in args.nodes.split(",")):
            with Fabric(n, rate) as fabric, HubServer(hosts=(fabric.host, fabric.host)) as hub, \
                    tempfile.TemporaryDirectory(dir="/var/tmp", prefix="dinov3-bench-share-") as tmp:
                hub.add_repo(ckpt.repo, repo_files(src))
                row = run_job(fabric, Path(tmp), ckpt.repo, hub.endpoint, args)
                row["hub"] = hub.bytes_served()
            rows.append(row)
            print(f"N={n}: {row['seconds']:.1f} s (hosts {', '.join(row['hosts'])}); CPU-seconds in fetch_once, "
                  f"rank 0 first: {', '.join(f'{c:.2f}' for c in row['cpu'])}; "
                  f"load average {os.getloadavg()[0]:.1f}", flush=True)
    except KeyboardInterrupt:
        raise SystemExit("interrupted: the namespaces and their processes are removed") from None
    first = rows[0]
    print(f"\n| nodes | job s | vs N={first['nodes']} | Hub served (S) | most one node sent (S) | "
          f"each node sent, rank 0 first (S) | CPU s per node in fetch_once, most |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['nodes']} | {r['seconds']:.1f} | {r['seconds'] / first['seconds']:.2f}x | {r['hub'] / size:.2f} | "
              f"{max(r['sent']) / size:.2f} | {', '.join(f'{b / size:.2f}' for b in r['sent'])} | "
              f"{max(r['cpu']):.2f} |")
    run = {"label": label, "checkpoint": ckpt.name, "layers": ckpt.layers, "size": size, "rate": rate,
           "launcher": args.launcher, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(run, indent=1) + "\n")
    if args.png:
        runs = ([json.loads(Path(args.compare).read_text())] if args.compare else []) + [run]
        print("figure:", draw_nodes(runs, Path(args.png)))


if __name__ == "__main__":
    main()
