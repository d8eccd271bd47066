"""Throughput of the broadcast over gloo on localhost: node 0 streams N MB along a chain of cold receivers.

    uv run python bench/broadcast.py [--mb 300] [--pieces 1,2,4] [--receivers 1,2,3] [--torchrun]

Uses the test harness (tests/test_broadcast.py: separate processes per "node", each with its own folders;
receivers write a partial, hash it while it arrives, and publish it). Prints MB/s per receiver (bytes it
received / seconds of its receive call, start-up wait included), the sender's egress, what each node sent (the
chain: every link but the last carries the whole), and peak RSS per rank.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import test_broadcast as tb


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=300)
    ap.add_argument("--pieces", default="1,2,4")
    ap.add_argument("--receivers", default="1,2,3")
    ap.add_argument("--torchrun", action="store_true")
    ap.add_argument("--null-sink", action="store_true", help="receivers discard the bytes (transport only)")
    args = ap.parse_args()
    half = args.mb * 1_000_000 // 2
    files = {f"model-0000{i}-of-00002.safetensors": tb._blob(half, i) for i in (1, 2)}
    print("| receivers | piece | per receiver MB/s | sender egress MB/s | sent per node (MB) | peak RSS per rank MB |")
    print("|---|---|---|---|---|---|")
    for receivers in (int(r) for r in args.receivers.split(",")):
        for piece in (int(c) for c in args.pieces.split(",")):
            with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
                job = tb.Job(Path(tmp), files, nodes=receivers + 1)
                procs, results = job.run(torchrun=args.torchrun, piece=piece * tb.MiB,
                                         null_sink=args.null_sink)
                if not all(r.get("ok") for r in results.values()) or len(results) != receivers + 1:
                    print("failed", results, [p.stderr[-2000:] for p in procs])
                    continue
                nodes = results[0]["nodes"]
                rates = [nodes[str(r)]["bytes"] / 1e6 / results[r]["seconds"] for r in range(1, receivers + 1)]
                egress = nodes["0"]["bytes"] / 1e6 / results[0]["seconds"]
                rss = [round(results[r]["maxrss_mb"]) for r in sorted(results)]
                sent = [round(nodes[str(r)]["sent"] / 1e6) for r in sorted(results)]
                print(f"| {receivers} | {piece} MiB | {', '.join(f'{x:.0f}' for x in rates)} | {egress:.0f} | {sent} | "
                      f"{rss} |", flush=True)


if __name__ == "__main__":
    main()
