"""Benchmark dinov3-fetcher against curl, openssl, aria2c and `hf download` on a local Hub.

    uv run python bench/run.py                 # full run: 1.2 GB ViT-L/16-shaped checkpoint, 5 rounds
    uv run python bench/run.py --quick         # smoke run: 1 round, smaller checkpoint (8 layers, ~0.4 GB)
    uv run python bench/run.py --only cold,warm --rounds 3 --cdn emulator
    uv run python bench/run.py --link far,cdn:single --rounds 3   # emulated links (bench/link.py), + aria2c
    uv run --group bench python bench/run.py --link far --plot bench/figures/links.png   # and the figure

Every figure is a ratio against a public tool timed in the same run on the same server, runs alternating
(the order rotates each round), each preceded by an untimed ``sync`` so that no run pays for the previous
one's dirty pages. Scenarios: cold, warm, resume, sharded, throttled, rehash, startup (see ``--help``), and
link (``--link``: the Hub and the CDN behind an emulated link, against aria2c, curl and hf download).
A timing target that is missed is reported, not a failure (exit 0; ``--strict`` for exit 1).
The checkpoints and downloads live in a temp folder under bench/results/ (gitignored) that is deleted at the
end; the results go to bench/results/latest.{json,md} (bench/plot.py draws the links figure from the JSON).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from link import PROFILES, ConnStats, LinkProxy, Profile
from netns import KernelLink, kernel_link_available
from servers import CHECKPOINTS, Checkpoint, HubServer, NginxCdn, find_nginx, make_repo, repo_files

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
BIN = Path(sys.executable).parent
FETCHER = str(BIN / "dinov3-fetcher")
HF = str(BIN / "hf")
REPO = "facebook/dinov3-vitl16-pretrain-lvd1689m"
SHARDED_REPO = "facebook/dinov3-vitl16-pretrain-sat493m"  # same architecture, so the registry check passes
MODEL = "model.safetensors"
MiB = 1 << 20
SCENARIOS = ("cold", "warm", "resume", "sharded", "throttled", "rehash", "startup", "link", "diskspace")
SINGLE_ONLY = ("cold", "warm", "throttled", "rehash")  # the scenarios that time the single-file layout
LINK_TOOLS = ("dinov3-fetcher", "aria2c + sha256", "curl + sha256", "hf download")
TOKEN = "hf_bench_reader"  # HF_TOKEN for the tools that read it: Meta's repos are gated, a real fetch has one
BEFORE = "dinov3-fetcher before"  # --before: another build of this tool, timed in the same rounds
TIMELINE = 0.25  # seconds per window of the CDN proxy's byte counts (streams and rate over time)
GiB = 1 << 30
# The flags of the popular hfd.sh script (aria2c -x16 -s16 -k1M -j5), with its --file-allocation=none.
ARIA2C = ["aria2c", "-x16", "-s16", "-k1M", "-j5", "--file-allocation=none", "--console-log-level=error",
          "--summary-interval=0", "--allow-overwrite=true", "--auto-file-renaming=false"]


@dataclass
class Proc:
    seconds: float
    rss_mb: float  # peak resident set of the process (wait4's ru_maxrss)
    rc: int
    requests: int = 0  # requests the Hub emulator saw during the run
    t0: float = 0.0  # time.monotonic() just before the process started
    cpu: float = 0.0  # user + system CPU seconds of the process and its children (wait4's rusage)


@dataclass
class Bench:
    args: argparse.Namespace
    work: Path
    hub: HubServer
    cdn: str  # "nginx" or "emulator"
    emulator_cdn: str
    size: int = 0
    shard_names: list[str] = field(default_factory=list)
    shard_size: int = 0
    times: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)
    endpoint: str | None = None  # HF_ENDPOINT for the tools when not the emulator's own (a link proxy's)
    sharded_dir: Path | None = None
    ckpt: Checkpoint = CHECKPOINTS["vitl16"]
    wrap: Callable[[list[str]], list[str]] | None = None  # runs a tool inside the kernel link's namespace
    no_proxy: str = "127.0.0.1,127.0.0.2,localhost"

    # ---------- running things ----------
    def env(self, hf_home: Path | None = None, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("DINOV3_FETCHER_", "HF_")) and k.lower() not in
               ("http_proxy", "https_proxy", "all_proxy")}
        env.update(HF_ENDPOINT=self.endpoint or self.hub.endpoint, HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1",
                   HF_HUB_DISABLE_PROGRESS_BARS="1", NO_PROXY=self.no_proxy, HF_TOKEN=TOKEN,
                   HF_HOME=str(hf_home or self.work / "hf_home"))
        env.update(extra)
        return env

    def run(self, argv: list[str], env: dict[str, str] | None = None, *, sync: bool = True,
            kill_when: Callable[[], bool] | None = None, check: bool = True) -> Proc:
        if sync:
            os.sync()
        err = self.work / "stderr.txt"
        n0 = len(self.hub.requests)
        with open(err, "wb") as ef:
            t0m = time.monotonic()
            t0 = time.perf_counter()
            p = subprocess.Popen(self.wrap(argv) if self.wrap else argv, env=env or self.env(),
                                 stdout=subprocess.DEVNULL, stderr=ef)
            while True:
                pid, status, ru = os.wait4(p.pid, os.WNOHANG if kill_when else 0)
                if pid:
                    break
                if kill_when is not None and kill_when():
                    os.kill(p.pid, signal.SIGKILL)
                    kill_when = None
                else:
                    time.sleep(0.002)
            dt = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        if check and p.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {p.returncode}: {err.read_text()[-2000:]}")
        return Proc(dt, ru.ru_maxrss / 1024, p.returncode, len(self.hub.requests) - n0, t0m,
                    ru.ru_utime + ru.ru_stime)

    def label(self, kind: str) -> str:
        """The checkpoint of a run in words: '1.21 GB vitl16, single file'."""
        if kind == "single":
            return f"{self.size / 1e9:.2f} GB {self.ckpt.name}, single file"
        return f"{self.shard_size / 1e9:.2f} GB {self.ckpt.name}, {len(self.shard_names)} shards"

    def record(self, scenario: str, tool: str, value: float) -> None:
        self.times.setdefault(scenario, {}).setdefault(tool, []).append(value)

    def rounds(self, tools: dict[str, Callable[[], None]], n: int | None = None) -> None:
        """Run each tool once per round, rotating the order every round."""
        names = list(tools)
        for r in range(n or self.args.rounds):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                tools[name]()

    def url(self, repo: str, name: str) -> str:
        return f"{self.endpoint or self.hub.endpoint}/{repo}/resolve/main/{name}"

    def fresh(self, *paths: Path) -> None:
        for p in paths:
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()

    # ---------- scenarios ----------
    def cold(self) -> None:
        ours, hf, out = self.work / "ours", self.work / "hf", self.work / "curl.bin"

        def run_ours() -> None:
            self.fresh(ours)
            p = self.run([FETCHER, "--dino-root", str(ours), "--model", REPO, "-q"])
            self.record("cold", "dinov3-fetcher", p.seconds)
            self.record("rss", "dinov3-fetcher", p.rss_mb)

        def run_curl() -> None:
            self.fresh(out)
            p = self.run(["curl", "-sSfL", "-o", str(out), self.url(REPO, MODEL)])
            self.record("cold", "curl", p.seconds)
            self.record("rss", "curl", p.rss_mb)

        def run_hf() -> None:
            self.fresh(hf, self.work / "hf_home_cold")
            p = self.run([HF, "download", REPO, "--local-dir", str(hf)], self.env(self.work / "hf_home_cold"))
            self.record("cold", "hf download", p.seconds)
            self.record("rss", "hf download", p.rss_mb)

        self.rounds({"dinov3-fetcher": run_ours, "curl": run_curl, "hf download": run_hf})
        self.fresh(out)

    def ensure_warm(self) -> tuple[Path, Path]:
        ours, hf = self.work / "ours", self.work / "hf"
        if not (ours / MODEL).exists():
            self.run([FETCHER, "--dino-root", str(ours), "--model", REPO, "-q"])
        if not (hf / MODEL).exists():
            self.run([HF, "download", REPO, "--local-dir", str(hf)], self.env(self.work / "hf_home_cold"))
        return ours, hf

    def warm(self) -> None:
        ours, hf = self.ensure_warm()
        reqs: dict[str, list[int]] = {"dinov3-fetcher": [], "hf download": []}

        def run_ours() -> None:
            p = self.run([FETCHER, "--dino-root", str(ours), "--model", REPO, "-q"], sync=False)
            self.record("warm", "dinov3-fetcher", p.seconds)
            reqs["dinov3-fetcher"].append(p.requests)

        def run_hf() -> None:
            p = self.run([HF, "download", REPO, "--local-dir", str(hf)], self.env(self.work / "hf_home_cold"),
                         sync=False)
            self.record("warm", "hf download", p.seconds)
            reqs["hf download"].append(p.requests)

        self.run([FETCHER, "--dino-root", str(ours), "--model", REPO, "-q"], sync=False)  # untimed: warm up
        self.rounds({"dinov3-fetcher": run_ours, "hf download": run_hf}, max(self.args.rounds, 5))
        self.facts["warm_requests"] = {k: max(v) for k, v in reqs.items()}
        it = subprocess.run([sys.executable, "-X", "importtime", "-m", "dinov3_fetcher", "--dino-root", str(ours),
                             "--model", REPO, "-q"], env=self.env(), capture_output=True, text=True, check=True)
        heavy = sorted({m for m in re.findall(r"\|\s+(\S+)\s*$", it.stderr, re.M)
                        if m.split(".")[0] in ("huggingface_hub", "httpx2", "httpx", "httpcore", "ssl", "filelock")})
        self.facts["warm_heavy_imports"] = heavy

    def resume(self) -> None:
        """SIGKILL each tool once half the weights have been served, run it again, count the bytes served again.

        The single file when the checkpoint has one, else its shards (the 7B: 13.4 GB served, then the kill).
        The emulator's CDN counts the bytes; the bound is the one the transfer documents (``resume_bound``)."""
        single = "single" in self.ckpt.kinds
        names, repo = ([MODEL], REPO) if single else (self.shard_names, SHARDED_REPO)
        total = self.size if single else self.shard_size
        half = total // 2
        self.facts["resume"] = res = {}
        self.facts["resume_bound"] = resume_bound()

        def served() -> int:
            return sum(self.hub.bytes_served(n) for n in names)

        def one(tool: str, argv: list[str], env: dict[str, str], on_disk: Callable[[], int],
                extents: Callable[[], dict[str, list[tuple[int, int]]]] | None = None) -> None:
            self.hub.clear()
            first = self.run(argv, env, kill_when=lambda: served() >= half, check=False)
            time.sleep(0.3)  # let the server threads notice the dead connections
            served1, have = served(), on_disk()
            held = extents() if extents is not None else None
            self.hub.clear()
            p = self.run(argv, env)
            served2 = served()
            missing = total - have
            r = res.setdefault(tool, [])
            r.append({"killed_rc": first.rc, "served_before_kill": served1, "on_disk_after_kill": have,
                      "missing": missing, "served_on_resume": served2, "excess": served2 - missing,
                      "rss_mb": max(first.rss_mb, p.rss_mb)})
            self.record("resume", tool, (served2 - missing) / MiB)
            self.record("resume rss", tool, max(first.rss_mb, p.rss_mb))
            if held is not None:
                # Bytes that were on disk after the kill and were served again: what the progress record had not
                # caught (the documented bound). The rest of the excess is bytes served but never used: reads cut
                # short when a stream was shed or a piece split, and what sat in socket buffers.
                again = sum(_overlap(held.get(n, []), *_sent(q)) for n in names for q in self.hub.file_gets(n))
                r[-1]["refetched"] = again
                self.record("resume refetched", tool, again / MiB)

        ours, hf, out = self.work / "ours_resume", self.work / "hf_resume", self.work / "curl_resume"

        def ours_disk() -> int:
            return sum(e - s for spans in ours_extents().values() for s, e in spans)

        by_sha = {sha: b.disk.name for sha, b in self.hub.lfs_blobs.items() if b.disk is not None}

        def ours_extents() -> dict[str, list[tuple[int, int]]]:
            """Each weight file's byte ranges on disk: a staged (complete) file whole, a partial one's extents."""
            state, out = ours / ".dinov3-fetcher", {}
            for p in (state / "staged").rglob("*"):  # staged as <identity>.<name>
                if p.is_file() and (name := p.name.partition(".")[2]) in names:
                    out[name] = [(0, p.stat().st_size)]
            for p in (state / "partial").glob("*/data"):
                if (name := by_sha.get(p.parent.name.split(".")[0])) in names:
                    out[name] = _extents(p)
            return out

        def hf_disk() -> int:
            return sum(_data_bytes(p) for p in hf.rglob("*.incomplete")) + sum(
                (hf / n).stat().st_size for n in names if (hf / n).is_file())

        def run_ours() -> None:
            self.fresh(ours)
            one("dinov3-fetcher", [FETCHER, "--dino-root", str(ours), "--model", repo, "-q"], self.env(), ours_disk,
                ours_extents)

        def run_hf() -> None:
            self.fresh(hf, self.work / "hf_home_resume")
            one("hf download", [HF, "download", repo, "--local-dir", str(hf)], self.env(self.work / "hf_home_resume"),
                hf_disk)

        def run_curl() -> None:
            self.fresh(out)
            out.mkdir()
            pairs = [x for n in names for x in ("-o", str(out / n), self.url(repo, n))]
            one("curl -C -", ["curl", "-sSfL", "-C", "-", *pairs], self.env(),
                lambda: sum(_data_bytes(out / n) for n in names))

        tools = {"dinov3-fetcher": run_ours, "hf download": run_hf, "curl -C -": run_curl}
        if self.shard_size > 4 * GiB:  # the 7B: this tool alone (each peer would take minutes per run)
            tools = {"dinov3-fetcher": run_ours}
        with self.emulator_cdn_only():
            self.rounds(tools, min(self.args.rounds, 2))
        self.fresh(ours, hf, out)

    def diskspace(self) -> None:
        """The weights need more space than dino_root's disk has (a tmpfs one shard bigger than nothing): the
        fetch must fail with the disk-space error before the first weight byte is served."""
        names, repo = (self.shard_names, SHARDED_REPO) if self.shard_names else ([MODEL], REPO)
        largest = max(((self.sharded_dir or Path()) / n).stat().st_size if self.shard_names else self.size
                      for n in names)
        mnt = self.work / "diskspace"
        mnt.mkdir(exist_ok=True)
        size = largest + 256 * MiB  # room for one shard (and more than any margin), not for the checkpoint
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], check=True)
        try:
            with self.emulator_cdn_only():
                self.hub.clear()
                p = self.run([FETCHER, "--dino-root", str(mnt / "dinov3"), "--model", repo, "-q"], check=False)
                time.sleep(0.3)
                served = sum(self.hub.bytes_served(n) for n in names)
            err = (self.work / "stderr.txt").read_text(errors="replace").strip().splitlines()
            self.facts["diskspace"] = {"disk_bytes": size, "exit_code": p.rc, "weight_bytes_served": served,
                                       "message": err[-1] if err else ""}
        finally:
            subprocess.run(["umount", str(mnt)], check=False)

    def sharded(self) -> None:
        ours, hf, outs = self.work / "ours_sharded", self.work / "hf_sharded", self.work / "curl_sharded"

        def run_ours() -> None:
            self.fresh(ours)
            p = self.run([FETCHER, "--dino-root", str(ours), "--model", SHARDED_REPO, "-q"])
            self.record("sharded", "dinov3-fetcher", p.seconds)

        def run_curl() -> None:
            self.fresh(outs)
            outs.mkdir()
            argv = ["curl", "-sSfL"]
            for n in self.shard_names:
                argv += ["-o", str(outs / n), self.url(SHARDED_REPO, n)]
            p = self.run(argv)
            self.record("sharded", "curl (one after another)", p.seconds)

        def run_hf() -> None:
            self.fresh(hf, self.work / "hf_home_sharded")
            p = self.run([HF, "download", SHARDED_REPO, "--local-dir", str(hf)],
                         self.env(self.work / "hf_home_sharded"))
            self.record("sharded", "hf download", p.seconds)

        self.rounds({"dinov3-fetcher": run_ours, "curl (one after another)": run_curl, "hf download": run_hf})
        self.fresh(ours, hf, outs)

    def throttled(self) -> None:
        bps = int(self.args.throttle_mbps * 1e6)
        ours, hf = self.work / "ours_thr", self.work / "hf_thr"

        def run_ours() -> None:
            self.fresh(ours)
            p = self.run([FETCHER, "--dino-root", str(ours), "--model", REPO, "-q"])
            self.record("throttled", "dinov3-fetcher", self.size / p.seconds / 1e6)

        def run_hf() -> None:
            self.fresh(hf, self.work / "hf_home_thr")
            p = self.run([HF, "download", REPO, "--local-dir", str(hf)], self.env(self.work / "hf_home_thr"))
            self.record("throttled", "hf download", self.size / p.seconds / 1e6)

        with self.emulator_cdn_only():
            self.hub.faults.add(throttle_bps=bps, host="cdn")
            try:
                self.rounds({"dinov3-fetcher": run_ours, "hf download": run_hf}, min(self.args.rounds, 3))
            finally:
                self.hub.faults.clear()
        self.fresh(ours, hf)

    def rehash(self) -> None:
        ours, _ = self.ensure_warm()
        model = ours / MODEL

        def run_ours() -> None:
            p = self.run([FETCHER, "verify", "--deep", "--dino-root", str(ours), "-q"], sync=False)
            self.record("rehash", "dinov3-fetcher verify --deep", p.seconds)

        def run_openssl() -> None:
            p = self.run(["openssl", "dgst", "-sha256", str(model)], sync=False)
            self.record("rehash", "openssl dgst -sha256", p.seconds)

        def run_sha256sum() -> None:
            p = self.run(["sha256sum", str(model)], sync=False)
            self.record("rehash", "sha256sum", p.seconds)

        self.run(["openssl", "dgst", "-sha256", str(model)], sync=False)  # untimed: the file into the page cache
        self.rounds({"dinov3-fetcher verify --deep": run_ours, "openssl dgst -sha256": run_openssl,
                     "sha256sum": run_sha256sum})

    def startup(self) -> None:
        def run_help() -> None:
            p = self.run([FETCHER, "--help"], sync=False)
            self.record("startup", "dinov3-fetcher --help", p.seconds)

        def run_hf_help() -> None:
            p = self.run([HF, "--help"], sync=False)
            self.record("startup", "hf --help", p.seconds)

        def run_python() -> None:
            p = self.run([sys.executable, "-c", "pass"], sync=False)
            self.record("startup", "python -c pass", p.seconds)

        run_help()
        self.times["startup"].clear()
        self.rounds({"dinov3-fetcher --help": run_help, "hf --help": run_hf_help, "python -c pass": run_python},
                    max(10, self.args.rounds))

    def link(self) -> None:
        """Each --link profile: the tools through the emulated link (bench/link.py), per checkpoint layout."""
        for prof_name, kind, kernel in self.args.link_specs:
            prof = PROFILES[prof_name]
            print(f"[link {link_label(prof_name, kernel)} {kind}] ...", file=sys.stderr, flush=True)
            with self.linked(prof, kernel) as (hub_link, cdn_link, klink):
                self.link_one(prof, kind, hub_link, cdn_link, klink)

    @contextlib.contextmanager
    def linked(self, prof: Profile, kernel: bool = False
               ) -> Iterator[tuple[LinkProxy | None, LinkProxy | None, KernelLink | None]]:
        """Put the Hub and the CDN behind ``prof`` (the CDN on 127.0.0.2); 'none' talks to them directly.

        ``kernel``: the tools run in a network namespace behind a ``tc tbf`` with the profile's shared rate
        (bench/netns.py); the proxies listen on the veth's host side, delay as always, and leave the rates to
        the kernel (the per-connection cap as each socket's pacing rate)."""
        if prof.name == "none" and not kernel:
            yield None, None, None
            return
        klink = KernelLink(prof.shared_bps, queue=max(prof.rtt, 0.02)) if kernel else None
        saved = self.hub.cdn_endpoint
        host, port = saved.removeprefix("http://").rsplit(":", 1)
        h, p = self.hub.endpoint.removeprefix("http://").rsplit(":", 1)
        try:
            cdn_link = LinkProxy((host, int(port)), klink.host if klink else "127.0.0.2", prof, window=TIMELINE,
                                 kernel=kernel)
            hub_link = LinkProxy((h, int(p)), klink.host if klink else "127.0.0.1", prof, shaped=False)
        except BaseException:
            if klink is not None:
                klink.close()
            raise
        self.hub.cdn_endpoint, self.endpoint = cdn_link.endpoint, hub_link.endpoint
        if klink is not None:
            self.wrap, self.no_proxy = klink.wrap, f"{klink.host},127.0.0.1,127.0.0.2,localhost"
        try:
            yield hub_link, cdn_link, klink
        finally:
            self.hub.cdn_endpoint, self.endpoint = saved, None
            self.wrap, self.no_proxy = None, "127.0.0.1,127.0.0.2,localhost"
            hub_link.close()
            cdn_link.close()
            if klink is not None:
                klink.close()

    def link_one(self, prof: Profile, kind: str, hub_link: LinkProxy | None, cdn_link: LinkProxy | None,
                 klink: KernelLink | None = None) -> None:
        repo = REPO if kind == "single" else SHARDED_REPO
        names = [MODEL] if kind == "single" else self.shard_names
        weight_bytes = self.size if kind == "single" else self.shard_size
        key = f"link {link_label(prof.name, klink is not None)} {kind}"
        facts = self.facts.setdefault("link", {}).setdefault(key, {})
        tools_all = [*LINK_TOOLS, BEFORE]
        d = {t: self.work / f"link_{i}" for i, t in enumerate(tools_all)}
        sha = self.args.sha256_tool

        def measure(tool: str, argv: list[str], env: dict[str, str] | None = None) -> None:
            self.fresh(d[tool], self.work / "hf_home_link")
            d[tool].mkdir()
            if hub_link is not None and cdn_link is not None:
                hub_link.clear()
                cdn_link.clear()
            n302 = len(self.hub.requests)
            q0 = klink.qdisc_stats() if klink is not None else {}
            p = self.run(argv, env)
            time.sleep(0.05)  # let the proxy see the connections close
            # what it wrote goes at once: a 7B run leaves 26.9 GB, and the disk holds the source plus one copy
            self.fresh(d[tool], self.work / "hf_home_link")
            self.record(key, tool, p.seconds)
            self.record(key + " rss", tool, p.rss_mb)
            self.record(key + " cpu", tool, p.cpu)
            with self.hub._lock:
                reqs = self.hub.requests[n302:]
            resolves = sum(r.host == "hub" and "/resolve/" in r.path for r in reqs)
            weight_resolves = sum(r.host == "hub" and "/resolve/" in r.path
                                  and r.path.partition("?")[0].rsplit("/", 1)[-1] in names for r in reqs)
            f: dict[str, Any] = {"seconds": p.seconds, "redirects": sum(r.status == 302 for r in reqs),
                                 "hub_requests": sum(r.host == "hub" for r in reqs), "resolves": resolves,
                                 "resolves_per_gib": resolves / (weight_bytes / GiB), "cpu": p.cpu,
                                 "weight_resolves": weight_resolves,
                                 "rss_mb": p.rss_mb}
            self.record(key + " resolves/GiB", tool, f["resolves_per_gib"])
            if hub_link is not None and cdn_link is not None:
                f.update(_link_counts(p.t0, hub_link.snapshot(), cdn_link.snapshot()))
                f["served_beyond"] = f["cdn_bytes"] - weight_bytes  # bytes the link carried twice, or never used
                self.record(key + " waste", tool, f["served_beyond"] / MiB)
                f["timeline"] = _timeline(p.t0, p.seconds, cdn_link)
                if f.get("first_weight_byte") is not None:
                    self.record(key + " first byte", tool, f["first_weight_byte"])
                if f["timeline"]:
                    self.record(key + " streams", tool, _settled(f["timeline"]))
            if klink is not None:
                q1 = klink.qdisc_stats()
                f["tbf"] = {k: q1.get(k, 0) - q0.get(k, 0) for k in q1}
            facts.setdefault(tool, []).append(f)

        def sha_pass(files: list[Path]) -> str:
            paths = " ".join(f"'{x}'" for x in files)
            return f"openssl dgst -sha256 {paths}" if sha == "openssl" else f"sha256sum {paths}"

        def fetcher(tool: str, binary: str) -> Callable[[], None]:
            def run_it() -> None:
                extra = dict(kv.split("=", 1) for kv in self.args.fetcher_env)
                measure(tool, [binary, "--dino-root", str(d[tool]), "--model", repo, "-q"],
                        self.env(**extra) if extra else None)
            return run_it

        def run_aria2c() -> None:
            out = d["aria2c + sha256"]
            lst = self.work / "aria2c.txt"
            lst.write_text("".join(f"{self.url(repo, n)}\n  out={n}\n" for n in names))
            aria = " ".join([*ARIA2C, "-d", f"'{out}'", "-i", f"'{lst}'"])
            measure("aria2c + sha256", ["sh", "-ec", f"{aria}\n{sha_pass([out / n for n in names])} >/dev/null"])

        def run_curl() -> None:
            out = d["curl + sha256"]
            pairs = " ".join(f"-o '{out / n}' '{self.url(repo, n)}'" for n in names)
            measure("curl + sha256", ["sh", "-ec", f"curl -sSfL {pairs}\n{sha_pass([out / n for n in names])} "
                                      ">/dev/null"])

        def run_hf() -> None:
            measure("hf download", [HF, "download", repo, "--local-dir", str(d["hf download"])],
                    self.env(self.work / "hf_home_link"))

        all_tools = {"dinov3-fetcher": fetcher("dinov3-fetcher", FETCHER), "aria2c + sha256": run_aria2c,
                     "curl + sha256": run_curl, "hf download": run_hf}
        if self.args.before:
            all_tools[BEFORE] = fetcher(BEFORE, self.args.before)
        tools = {t: all_tools[t] for t in self.args.link_tools}
        names_order = list(tools)
        for r in range(self.args.rounds):
            k = r % len(names_order)
            for name in names_order[k:] + names_order[:k]:
                done = self.times.get(key, {}).get(name, [])
                if done and r >= self.args.slow_rounds and min(done) > self.args.slow_after:
                    continue  # a slow tool (curl at 8 MB/s per connection): fewer rounds, said in the table
                tools[name]()
        for p in d.values():
            self.fresh(p)

    @contextlib.contextmanager
    def emulator_cdn_only(self) -> Iterator[None]:
        """Byte counts and the per-connection throttle are the emulator's: use its own CDN for a while."""
        saved = self.hub.cdn_endpoint
        self.hub.cdn_endpoint = self.emulator_cdn
        try:
            yield
        finally:
            self.hub.cdn_endpoint = saved


def _data_bytes(path: Path) -> int:
    """Bytes of a (possibly sparse) file that are really on disk: the sum of its data extents."""
    return sum(e - s for s, e in _extents(path))


def _extents(path: Path) -> list[tuple[int, int]]:
    """The byte ranges of a (possibly sparse) file that are really on disk (SEEK_DATA / SEEK_HOLE)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return []
    try:
        end, pos, out = os.fstat(fd).st_size, 0, []
        while pos < end:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            stop = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, stop))
            pos = stop
        return out
    finally:
        os.close(fd)


def _sent(req: Any) -> tuple[int, int]:
    """The byte range a server's answer to ``req`` carried: from its Range's start, as many as it sent."""
    m = re.match(r"bytes=(\d+)-", req.range or "")
    start = int(m[1]) if m else 0
    return start, start + req.body_bytes


def _overlap(spans: list[tuple[int, int]], a: int, b: int) -> int:
    """How many bytes of [a, b) lie in ``spans``."""
    return sum(max(0, min(b, e) - max(a, s)) for s, e in spans)


def _link_counts(t0: float, hub_conns: list[ConnStats], cdn_conns: list[ConnStats]) -> dict[str, Any]:
    """What the link proxies saw of one run: TCP connections, requests, concurrency, first weight byte."""
    cdn = [c for c in cdn_conns if c.requests]
    gets = [c for c in cdn if c.requests[0][1] == "GET"]
    first = min((c.first_down for c in gets if c.first_down is not None), default=None)
    events = sorted([(c.opened, 1) for c in cdn] + [(c.closed or time.monotonic(), -1) for c in cdn])
    live = peak = 0
    for _, e in events:
        live += e
        peak = max(peak, live)
    return {"cdn_connections": len(cdn), "cdn_gets": sum(sum(m == "GET" for _, m, _ in c.requests) for c in cdn),
            "cdn_bytes": sum(c.down_bytes for c in gets),  # answers' headers and bodies, cut ones included
            "cdn_heads": sum(sum(m == "HEAD" for _, m, _ in c.requests) for c in cdn),
            "max_open_cdn_connections": peak, "hub_connections": sum(bool(c.requests) for c in hub_conns),
            "cdn_rerequests": sum(len(c.gaps) for c in cdn),
            "client_gap_median": statistics.median(g) if (g := [x for c in cdn for x in c.gaps]) else None,
            "first_weight_byte": None if first is None else first - t0,
            # when the first requests reached the proxies (the tool's start-up, then the Hub's round trips)
            "first_hub_connection": min((c.opened - t0 for c in hub_conns if c.opened >= t0), default=None),
            "first_hub_request": min((r[0] - t0 for c in hub_conns for r in c.requests), default=None),
            "first_weight_request": min((r[0] - t0 for c in hub_conns for r in c.requests
                                         if r[2].partition("?")[0].endswith(".safetensors")), default=None),
            "first_cdn_request": min((r[0] - t0 for c in gets for r in c.requests), default=None)}


# ---------- report ----------
def _stats(xs: list[float]) -> tuple[float, float, float]:
    return statistics.median(xs), min(xs), max(xs)


def _fmt(xs: list[float] | None, unit: str) -> str:
    if not xs:
        return "-"
    med, lo, hi = _stats(xs)
    if unit == "s":
        return f"{med:.3f} s ({lo:.3f}-{hi:.3f})" if med < 1 else f"{med:.2f} s ({lo:.2f}-{hi:.2f})"
    if unit == "MiB":
        return f"{med:.1f} MiB ({lo:.1f}-{hi:.1f})"
    if unit == "MB/s":
        return f"{med:.0f} MB/s ({lo:.0f}-{hi:.0f})"
    return f"{med:.0f} {unit} ({lo:.0f}-{hi:.0f})"


def report(b: Bench) -> tuple[list[dict[str, Any]], str]:
    t, rows = b.times, []

    def med(s: str, tool: str) -> float | None:
        xs = t.get(s, {}).get(tool)
        return statistics.median(xs) if xs else None

    def row(scenario: str, ours: str, ref: str, unit: str, ratio: float | None, target: str, met: bool | None,
            note: str = "") -> None:
        rows.append({"scenario": scenario, "ours": ours, "ref": ref, "unit": unit, "ratio": ratio,
                     "target": target, "met": met, "note": note,
                     "ours_values": t.get(scenario.split()[0], {}).get(ours), "ref_values":
                     t.get(scenario.split()[0], {}).get(ref)})

    if "cold" in t:
        o, c, h = med("cold", "dinov3-fetcher"), med("cold", "curl"), med("cold", "hf download")
        row("cold", "dinov3-fetcher", "curl", "s", o / c if o and c else None, "<= 1.15x curl",
            (o / c <= 1.15) if o and c else None, f"hf download: {h / c:.2f}x curl" if h and c else "")
        rows.append({"scenario": "cold (vs hf)", "ours": "dinov3-fetcher", "ref": "hf download", "unit": "s",
                     "ratio": o / h if o and h else None, "target": "", "met": None, "note": "",
                     "ours_values": t["cold"].get("dinov3-fetcher"), "ref_values": t["cold"].get("hf download")})
    if "warm" in t:
        o, h = med("warm", "dinov3-fetcher"), med("warm", "hf download")
        reqs = b.facts.get("warm_requests", {})
        heavy = b.facts.get("warm_heavy_imports", [])
        row("warm", "dinov3-fetcher", "hf download", "s", o / h if o and h else None, "<= 0.15 s, 0 requests",
            (o is not None and o <= 0.15 and reqs.get("dinov3-fetcher", 1) == 0),
            f"requests: ours {reqs.get('dinov3-fetcher')}, hf {reqs.get('hf download')}; "
            f"heavy imports on the warm path: {', '.join(heavy) or 'none'}")
    if "resume" in t:
        det = b.facts.get("resume", {})
        hf = det.get("hf download", [{}])[-1]
        bound = b.facts.get("resume_bound", {}).get("bytes", 16 * MiB) / MiB
        again = t["resume refetched"].get("dinov3-fetcher") if "resume refetched" in t else None
        if again:  # the documented bound is on what was on disk and fetched again; the excess also counts waste
            rows.append({"scenario": "resume refetched", "ours": "dinov3-fetcher", "ref": "-", "unit": "MiB",
                         "ratio": None, "target": f"<= {bound:.0f} MiB (the bound)", "met": max(again) <= bound,
                         "note": "bytes on disk after the kill that the next run was served again", "ours_values":
                         again, "ref_values": None})
        row("resume", "dinov3-fetcher", "hf download", "MiB", None, "excess: served again beyond what was missing",
            None,
            f"excess = bytes served on resume - bytes missing on disk after SIGKILL at 50%; "
            f"hf download re-fetched {hf.get('served_on_resume', 0) / MiB:.0f} MiB" if hf else
            f"peak RSS {_fmt(t.get('resume rss', {}).get('dinov3-fetcher'), 'MB')}")
    if "diskspace" in b.facts:
        f = b.facts["diskspace"]
        rows.append({"scenario": "diskspace", "ours": "dinov3-fetcher", "ref": "-", "unit": "", "ratio": None,
                     "target": "exit 9, 0 weight bytes served", "met": f["exit_code"] == 9
                     and f["weight_bytes_served"] == 0, "note": f"disk {f['disk_bytes'] / 1e9:.2f} GB; exit "
                     f"{f['exit_code']}; {f['weight_bytes_served'] / 1e6:.1f} MB of weights served; "
                     f"{f['message'][:160]}", "ours_values": None, "ref_values": None})
    if "sharded" in t:
        o, c = med("sharded", "dinov3-fetcher"), med("sharded", "curl (one after another)")
        row("sharded", "dinov3-fetcher", "curl (one after another)", "s", o / c if o and c else None,
            "<= 1.2x curl", (o / c <= 1.2) if o and c else None)
    if "throttled" in t:
        o, h = med("throttled", "dinov3-fetcher"), med("throttled", "hf download")
        row("throttled", "dinov3-fetcher", "hf download", "MB/s", o / h if o and h else None,
            ">= 4x hf download", (o / h >= 4) if o and h else None,
            f"{b.args.throttle_mbps:g} MB/s per connection")
    if "rehash" in t:
        o, s = med("rehash", "dinov3-fetcher verify --deep"), med("rehash", "openssl dgst -sha256")
        row("rehash", "dinov3-fetcher verify --deep", "openssl dgst -sha256", "s", o / s if o and s else None,
            "<= 1.2x openssl", (o / s <= 1.2) if o and s else None,
            f"sha256sum: {_fmt(t['rehash'].get('sha256sum'), 's')}")
    if "startup" in t:
        o = med("startup", "dinov3-fetcher --help")
        row("startup", "dinov3-fetcher --help", "hf --help", "s", None, "<= 0.3 s", o is not None and o <= 0.3,
            f"python -c pass: {_fmt(t['startup'].get('python -c pass'), 's')}")
    if "rss" in t:
        o = t["rss"].get("dinov3-fetcher")
        rows.append({"scenario": "rss (cold fetch)", "ours": "dinov3-fetcher", "ref": "hf download", "unit": "MB",
                     "ratio": None, "target": "<= 150 MB", "met": bool(o) and max(o) <= 150,
                     "note": f"curl {_fmt(t['rss'].get('curl'), 'MB')}", "ours_values": o,
                     "ref_values": t["rss"].get("hf download")})

    lines = ["| scenario | this tool | reference | ratio | target | met | note |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] is not None else "-"
        met = {True: "yes", False: "**no**", None: "-"}[r["met"]]
        lines.append(f"| {r['scenario']} | {_fmt(r['ours_values'], r['unit'])} | {r['ref']}: "
                     f"{_fmt(r['ref_values'], r['unit'])} | {ratio} | {r['target']} | {met} | {r['note']} |")
    return rows, "\n".join(lines)


def link_label(prof: str, kernel: bool) -> str:
    """A link's name in keys and tables: the profile, ``+tbf`` when the kernel shapes it (bench/netns.py)."""
    return f"{prof}+tbf" if kernel else prof


_LINK_SUFFIXES = (" rss", " first byte", " cpu", " resolves/GiB", " streams", " waste")


def link_report(b: Bench) -> str:
    """The link tables: one row per link and checkpoint layout, medians (min-max), ratios; first weight byte;
    the streams, resolves, memory and CPU of each tool."""
    t = b.times
    keys = [k for k in t if k.startswith("link ") and not k.endswith(_LINK_SUFFIXES)]
    if not keys:
        return ""
    tools = list(b.args.link_tools)
    ref = "dinov3-fetcher"
    out = ["| link (per connection / shared / RTT), checkpoint | " + " | ".join(tools) + " | fetcher / aria2c "
           "| fetcher / curl |" + (" fetcher / before |" if BEFORE in tools else ""),
           "|---" * (len(tools) + 3 + (BEFORE in tools)) + "|"]
    fb = ["| link, checkpoint | " + " | ".join(tools) + " |", "|---" * (len(tools) + 1) + "|"]
    cnt = ["| link, checkpoint | tool | streams settled at (CDN connections moving bytes, mid-run median) | "
           "TCP connections to the CDN | max open at once | GETs on the CDN | served beyond the files | "
           "resolves: all (per GiB), of weight files | peak RSS | CPU s (user + sys) |", "|---" * 10 + "|"]

    def cell(xs: list[float] | None, unit: str = "s") -> str:
        if not xs:
            return "-"
        s = _fmt(xs, unit)
        return s if len(xs) >= b.args.rounds else f"{s}, {len(xs)} round{'s' if len(xs) > 1 else ''}"

    def ratio(a: str, c: str, key: str) -> str:
        xa, xc = t[key].get(a), t[key].get(c)
        if not xa or not xc:
            return "-"
        return f"{statistics.median(xa) / statistics.median(xc):.2f}x (min/min {min(xa) / min(xc):.2f}x)"

    for key in keys:
        _, prof, kind = key.split()
        base = prof.removesuffix("+tbf")
        how = ", kernel tbf + TCP pacing" if prof.endswith("+tbf") else ""
        label = f"{prof} ({PROFILES[base].describe()}{how}), {b.label(kind)}"
        out.append(f"| {label} | " + " | ".join(cell(t[key].get(x)) for x in tools)
                   + f" | {ratio(ref, 'aria2c + sha256', key)} | {ratio(ref, 'curl + sha256', key)} |"
                   + (f" {ratio(ref, BEFORE, key)} |" if BEFORE in tools else ""))
        first = t.get(key + " first byte", {})
        if first:
            fb.append(f"| {prof}, {kind} | " + " | ".join(cell(first.get(x)) for x in tools) + " |")
        for tool in tools:
            runs = b.facts.get("link", {}).get(key, {}).get(tool, [])
            if not runs:
                continue
            f = runs[-1]
            st = t.get(key + " streams", {}).get(tool)
            streams = f"{statistics.median(st):.0f} ({min(st):.0f}-{max(st):.0f})" if st else "-"
            res = t.get(key + " resolves/GiB", {}).get(tool) or [0.0]
            cnt.append(f"| {prof}, {kind} | {tool} | {streams} | {f.get('cdn_connections', '-')} | "
                       f"{f.get('max_open_cdn_connections', '-')} | {f.get('cdn_gets', '-')} | "
                       f"{_fmt(t.get(key + ' waste', {}).get(tool), 'MiB')} | "
                       f"{f['resolves']} ({max(res):.1f}), {f['weight_resolves']} | "
                       f"{_fmt(t.get(key + ' rss', {}).get(tool), 'MB')} | "
                       f"{_fmt(t.get(key + ' cpu', {}).get(tool), 's')} |")
    text = "\n".join(out)
    if b.args.fetcher_env:
        text = f"dinov3-fetcher run with {' '.join(b.args.fetcher_env)}\n\n{text}"
    if len(fb) > 2:
        text += "\n\nFirst weight byte (first byte of a CDN GET answer sent by the link proxy, from the start of " \
                "the process):\n\n" + "\n".join(fb)
    if len(cnt) > 2:
        text += "\n\nWhat each tool did (resolves: `/resolve/` requests the Hub saw, the most per GiB of any " \
                "round; connections: last round, at the link proxies):\n\n" + "\n".join(cnt)
    return text


def _timeline(t0: float, seconds: float, cdn: LinkProxy) -> list[tuple[float, int, float]]:
    """(seconds since the tool started, CDN connections that moved bytes, MB/s) per ``TIMELINE`` window."""
    first = int((t0 - cdn.t0) / TIMELINE)
    last = int((t0 + seconds - cdn.t0) / TIMELINE)
    conns = [c for c in cdn.snapshot() if c.windows]
    out = []
    for k in range(first, last + 1):
        moved = [c.windows[k] for c in conns if c.windows.get(k)]
        out.append((round(cdn.t0 + k * TIMELINE - t0, 3), len(moved), round(sum(moved) / TIMELINE / 1e6, 2)))
    return out


def _settled(timeline: list[tuple[float, int, float]]) -> float:
    """The streams a run settled at: the median count of connections moving bytes over the middle of the run
    (from 40% to 90% of the windows that moved any: past the ramp, before the files' tails)."""
    moving = [n for _, n, rate in timeline if rate > 0]
    mid = moving[int(len(moving) * 0.4):max(int(len(moving) * 0.9), int(len(moving) * 0.4) + 1)]
    return float(statistics.median(mid)) if mid else 0.0


def resume_bound() -> dict[str, int]:
    """What a SIGKILL may cost in bytes fetched again, from the transfer's own constants: each file in flight's
    unrecorded progress (``SAVE_EVERY``), the reads under way on all streams (``READ_AHEAD``) and one block."""
    from dinov3_fetcher._budget import READ_AHEAD
    from dinov3_fetcher._job import SAVE_EVERY
    from dinov3_fetcher._transfer import FILES_AT_ONCE

    return {"save_every": SAVE_EVERY, "files_at_once": FILES_AT_ONCE, "read_ahead": READ_AHEAD,
            "bytes": FILES_AT_ONCE * SAVE_EVERY + READ_AHEAD + MiB}


def exit_status(rows: list[dict[str, Any]], strict: bool) -> int:
    """0 when every tool ran: a target missed on timing is reported, not a failure (timing depends on the
    machine's load), unless ``strict``. A tool that failed never gets here (``main`` returns 1)."""
    missed = [r["scenario"] for r in rows if r["met"] is False]
    if missed:
        print(f"targets not met: {', '.join(missed)}" + ("" if strict else " (timing: reported, not a failure; "
              "--strict makes it one)"), file=sys.stderr)
    return 1 if missed and strict else 0

def versions(cdn: str, as_installed: bool = False, before: str | None = None) -> dict[str, str]:
    def first(argv: list[str]) -> str:
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=30)
            return (p.stdout or p.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            return "not found"

    import huggingface_hub

    from dinov3_fetcher import __version__

    out = {
        "cpus": str(os.cpu_count()), "machine": f"{platform.system()} {platform.release()} {platform.machine()}",
        "python": platform.python_version(), "dinov3-fetcher": __version__,
        "huggingface_hub": huggingface_hub.__version__, "curl": first(["curl", "--version"]).split(" (")[0],
        "openssl": first(["openssl", "version"]), "cdn": cdn, "bytecode": ensure_bytecode(as_installed, before),
    }
    if cdn == "nginx":
        out["nginx"] = first([find_nginx() or "nginx", "-v"])
    return out


def ensure_bytecode(as_installed: bool = False, before: str | None = None) -> str:
    """Byte-compile the venv and this project once, as `pip install` does, if nothing has (``as_installed``:
    leave them as the install made them, and say what they hold). ``before``: another build's executable
    (--before), whose project sources are compiled alike, so that the two are timed in the same state.

    uv compiles the venv at install (pyproject's ``compile-bytecode``) but not a project installed editable (its
    own sources, as `uv run` in a clone installs it), and with PYTHONDONTWRITEBYTECODE=1 (this machine, many
    training images) Python never caches bytecode either: every run would compile them from source (~0.25 s
    for huggingface_hub, ~0.05 s for this tool's modules), an installation artefact, not what a tool costs.
    """
    import importlib.util

    import huggingface_hub.hf_api

    import dinov3_fetcher

    env = ", PYTHONDONTWRITEBYTECODE=1" if os.environ.get("PYTHONDONTWRITEBYTECODE") else ""
    ours = Path(importlib.util.cache_from_source(dinov3_fetcher.__file__))
    pyc = Path(importlib.util.cache_from_source(huggingface_hub.hf_api.__file__))
    state = (f"venv {'compiled' if pyc.is_file() else 'not compiled'}, "
             f"this tool {'compiled' if ours.is_file() else 'not compiled'}")
    if as_installed or (pyc.is_file() and ours.is_file() and before is None):
        return state + (" (as installed)" if as_installed else "") + env
    site = Path(huggingface_hub.__file__).resolve().parent.parent
    trees = [str(site), str(Path(dinov3_fetcher.__file__).resolve().parent)]
    if before is not None:  # the other build's project sources (a checkout's src/, or its site-packages)
        found = subprocess.run([before, "--version"], capture_output=True)  # it runs: its venv exists
        other = Path(before).resolve().parent.parent  # .venv
        trees += [str(p) for p in (other.parent / "src",) if p.is_dir() and found.returncode == 0]
    # Not check=True: a few packages ship files that do not compile (test data); compileall then exits 1.
    subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", "0", *trees],
                   capture_output=True, env={**os.environ, "PYTHONDONTWRITEBYTECODE": ""})
    if not pyc.is_file() or not ours.is_file():
        raise SystemExit(f"bench: could not byte-compile {site} and this tool's sources")
    return f"{state}, then compiled by the bench (python -m compileall, as pip install does)" + env


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 round, 8-layer checkpoint (~0.4 GB): a smoke run")
    ap.add_argument("--rounds", type=int, help="rounds per scenario (default 5; resume <= 2, throttled <= 3)")
    ap.add_argument("--checkpoint", choices=sorted(CHECKPOINTS), default="vitl16",
                    help="the workload: vitl16 (ViT-L/16, 1.21 GB, single file and 6 shards) or vit7b16 (ViT-7B/16, "
                         "26.9 GB, index + 6 shards, generated once into --data: keep 2 x 27 GB free)")
    ap.add_argument("--layers", type=int, help="layers (default: the checkpoint's own; fewer make a small copy)")
    ap.add_argument("--only", help=f"comma-separated scenarios out of {','.join(SCENARIOS)}")
    ap.add_argument("--cdn", choices=("auto", "nginx", "emulator"), default="auto",
                    help="what serves the bytes behind the LFS redirect (auto: nginx when installed)")
    ap.add_argument("--throttle-mbps", type=float, default=40.0, help="per-connection limit for 'throttled'")
    ap.add_argument("--link", help="emulated links (bench/link.py) out of " + ",".join(PROFILES) + "; each "
                    "runs the single file and the 6 shards, or one of them with PROFILE:single / PROFILE:sharded "
                    "(e.g. --link far,cdn:single,none:sharded); implies --only link unless --only is given")
    ap.add_argument("--link-tools", default=None, help="tools for --link (default: all; with --before, "
                    f"'{BEFORE}' too)")
    ap.add_argument("--before", metavar="BIN", help="another build of this tool (e.g. a second checkout's "
                    ".venv/bin/dinov3-fetcher), timed in the same rounds as '" + BEFORE + "'")
    ap.add_argument("--fetcher-env", action="append", default=[], metavar="NAME=VALUE",
                    help="extra environment for dinov3-fetcher in --link runs (e.g. DINOV3_FETCHER_CONNECTIONS=16)")
    ap.add_argument("--sha256-tool", choices=("openssl", "sha256sum"), default="openssl",
                    help="the sha256 pass after curl and aria2c (openssl uses SHA-NI; coreutils sha256sum does "
                    "not and takes ~4x longer here)")
    ap.add_argument("--slow-after", type=float, default=60.0, help="with --slow-rounds: a tool whose runs all "
                    "took longer than this many seconds ...")
    ap.add_argument("--slow-rounds", type=int, help="... stops after this many rounds (default: --rounds)")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a target is not met (default: report "
                    "met / not met and exit 0; a tool that fails exits 1 either way)")
    ap.add_argument("--serve", action="store_true", help="only start the servers and print the environment to "
                    "use them (for profiling by hand); Ctrl-C stops")
    ap.add_argument("--xet", choices=("off", "on", "signed-range"), default="off",
                    help="the Hub's Xet bridge (tests/hub_server.py): every LFS resolve answers 302 to a freshly "
                         "signed URL on the emulator's CDN (signed-range: a signature binds the Range it was "
                         "redirected with, so every piece is resolved anew)")
    ap.add_argument("--xet-expire-after", type=int, default=None,
                    help="with --xet: a signature is refused (403, expired) after this many uses")
    ap.add_argument("--as-installed", action="store_true",
                    help="time the venv as the install left it (the README's `uv run`: bytecode compiled by uv at "
                         "install, see pyproject's [tool.uv]); by default the bench byte-compiles a venv that has "
                         "none")
    ap.add_argument("--data", type=Path, help="keep the generated checkpoints here between runs (default: "
                    "a temp folder that is deleted)")
    ap.add_argument("--plot", type=Path, metavar="PNG", help="with --link: also draw the seconds against link and "
                    "tool into this PNG (bench/plot.py; needs the bench group: uv run --group bench ...)")
    args = ap.parse_args()
    if args.plot is not None and importlib.util.find_spec("matplotlib") is None:
        ap.error("--plot needs matplotlib: uv run --group bench python bench/run.py ...")
    args.rounds = args.rounds or (1 if args.quick else 5)
    ckpt = CHECKPOINTS[args.checkpoint]
    args.layers = args.layers or (8 if args.quick else ckpt.layers)
    global REPO, SHARDED_REPO
    if args.layers != ckpt.layers:  # not the real architecture: unofficial ids skip the registry's check
        ckpt = ckpt.smaller(args.layers)
    REPO, SHARDED_REPO = ckpt.repo, ckpt.sharded_repo
    default_only = "link" if args.link else ",".join(s for s in SCENARIOS if s != "link")
    only = [s.strip() for s in (args.only or default_only).split(",") if s.strip()]
    if "single" not in ckpt.kinds and (bad := [s for s in only if s in SINGLE_ONLY]):
        ap.error(f"{ckpt.name} has no single-file layout: {', '.join(bad)} need one (use link, sharded, resume)")
    args.link_specs = []
    for spec in (args.link or ",".join(PROFILES)).split(","):
        name, _, kind = spec.strip().partition(":")
        prof, plus, variant = name.partition("+")
        if prof not in PROFILES or kind not in ("", *ckpt.kinds) or (plus and variant != "tbf"):
            ap.error(f"--link: unknown {spec!r}; profiles {','.join(PROFILES)}, each optionally +tbf (the kernel "
                     f"shapes it), then optionally {' or '.join(':' + k for k in ckpt.kinds)}")
        args.link_specs += [(prof, k, bool(plus)) for k in ([kind] if kind else list(ckpt.kinds))]
    if any(kernel for _, _, kernel in args.link_specs) and (why := kernel_link_available()):
        ap.error(f"--link PROFILE+tbf: {why}")
    all_link_tools = [*LINK_TOOLS, BEFORE] if args.before else list(LINK_TOOLS)
    args.link_tools = [x.strip() for x in (args.link_tools or ",".join(all_link_tools)).split(",") if x.strip()]
    if bad_tools := [x for x in args.link_tools if x not in all_link_tools]:
        ap.error(f"--link-tools: unknown {bad_tools}; choose from {all_link_tools}")
    args.slow_rounds = args.slow_rounds or args.rounds
    if "link" in only and "aria2c + sha256" in args.link_tools and shutil.which("aria2c") is None:
        ap.error("aria2c is not installed (apt-get install aria2), or leave it out with --link-tools")
    if bad := [s for s in only if s not in SCENARIOS]:
        ap.error(f"unknown scenario(s) {bad}; choose from {SCENARIOS}")
    for tool in ("curl", "openssl"):
        if shutil.which(tool) is None:
            ap.error(f"{tool} is not installed (apt-get install {tool})")
    nginx = find_nginx()
    if args.cdn == "nginx" and nginx is None:
        ap.error("nginx is not installed: apt-get install nginx-light, or use --cdn emulator")
    cdn = "nginx" if nginx and args.cdn != "emulator" and args.xet == "off" else "emulator"

    RESULTS.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="work-", dir=RESULTS))
    data = args.data or work / "data"
    nginx_cdn: NginxCdn | None = None
    hub = HubServer(xet=args.xet != "off")  # the Xet bridge's signed URLs are the emulator CDN's
    hub.valid_tokens.add(TOKEN)  # its repos are not gated: aria2c and curl need none
    hub.xet_bridge.sign_range = args.xet == "signed-range"
    hub.xet_bridge.expire_after = args.xet_expire_after
    try:
        print(f"generating checkpoints in {data} ...", file=sys.stderr, flush=True)
        b = Bench(args, work, hub, cdn, hub.cdn_endpoint, ckpt=ckpt)
        needs_single = any(s in SINGLE_ONLY for s in only) or ("resume" in only and "single" in ckpt.kinds) or (
            "link" in only and any(k == "single" for _, k, _ in args.link_specs))
        needs_shards = "sharded" in only or "diskspace" in only or "single" not in ckpt.kinds or (
            "link" in only and any(k == "sharded" for _, k, _ in args.link_specs))
        if needs_single:
            single = make_repo(data / f"{ckpt.name}-single-{args.layers}", 1, ckpt)
            hub.add_repo(REPO, repo_files(single))
            b.size = (single / MODEL).stat().st_size
        if needs_shards:
            sharded = make_repo(data / f"{ckpt.name}-sharded-{args.layers}", 6, ckpt)
            hub.add_repo(SHARDED_REPO, repo_files(sharded))
            b.sharded_dir = sharded
            b.shard_names = sorted(p.name for p in sharded.glob("model-*.safetensors"))
            b.shard_size = sum((sharded / n).stat().st_size for n in b.shard_names)
        if cdn == "nginx":
            assert nginx is not None
            nginx_cdn = NginxCdn(nginx, work, hub.lfs_blobs)
            hub.cdn_endpoint = nginx_cdn.endpoint
        if args.serve:  # with --link PROFILE: behind that emulated link
            prof = PROFILES[args.link_specs[0][0]] if args.link else PROFILES["none"]
            kernel = bool(args.link) and args.link_specs[0][2]
            with b.linked(prof, kernel) as (hub_link, _, klink):
                endpoint = hub_link.endpoint if hub_link is not None else hub.endpoint
                print(f"export HF_ENDPOINT={endpoint} HF_TOKEN={TOKEN} HF_HUB_DISABLE_XET=1 HF_HUB_DISABLE_TELEMETRY=1 "
                      f"NO_PROXY={b.no_proxy}  # repos: {REPO}, {SHARDED_REPO}; cdn: {hub.cdn_endpoint}; "
                      f"link: {link_label(prof.name, kernel)}"
                      + (f"; run the tools with: ip netns exec {klink.ns} ..." if klink else ""), flush=True)
                with contextlib.suppress(KeyboardInterrupt):
                    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
                    while True:
                        time.sleep(3600)
            return 0
        info = versions(cdn, args.as_installed, args.before)
        info["load average at start"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
        if args.xet != "off":
            info["xet bridge"] = args.xet + (f", expire after {args.xet_expire_after} uses"
                                             if args.xet_expire_after is not None else "")
        print("  ".join(f"{k}: {v}" for k, v in info.items()), flush=True)
        print(f"checkpoint: {ckpt.name} ({args.layers} layers): "
              + (f"single file {b.size / 1e9:.2f} GB; " if b.size else "")
              + (f"{len(b.shard_names)} shards, {b.shard_size / 1e9:.2f} GB; " if b.shard_names else "")
              + f"rounds: {args.rounds}", flush=True)
        for s in only:
            t0 = time.monotonic()
            print(f"[{s}] ...", file=sys.stderr, flush=True)
            getattr(b, s)()
            print(f"[{s}] done in {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
        rows, table = report(b)
        if links := link_report(b):
            table = f"{table}\n\n{links}" if rows else links
        print()
        print(table)
        out = {"versions": info, "checkpoint": ckpt.name, "size": b.size, "shard_size": b.shard_size,
               "layers": args.layers, "rounds": args.rounds, "times": b.times, "facts": b.facts, "rows": rows,
               "load_average": os.getloadavg(), "when": time.strftime("%Y-%m-%d %H:%M:%S")}
        (RESULTS / "latest.json").write_text(json.dumps(out, indent=2) + "\n")
        (RESULTS / "latest.md").write_text("  ".join(f"{k}: {v}" for k, v in info.items()) + "\n\n" + table + "\n")
        print(f"\nwritten: {RESULTS / 'latest.json'}, {RESULTS / 'latest.md'}", file=sys.stderr)
        if args.plot is not None and links:
            from plot import draw_links

            print(f"drawn: {draw_links(out, args.plot)}", file=sys.stderr)
        return exit_status(rows, args.strict)
    except RuntimeError as e:  # a tool failed (Bench.run): that is a failure, whatever the timing
        print(f"bench: {e}", file=sys.stderr)
        return 1
    finally:
        if nginx_cdn is not None:
            nginx_cdn.close()
        hub.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
