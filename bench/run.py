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
from servers import HubServer, NginxCdn, find_nginx, make_repo, repo_files

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
BIN = Path(sys.executable).parent
FETCHER = str(BIN / "dinov3-fetcher")
HF = str(BIN / "hf")
REPO = "facebook/dinov3-vitl16-pretrain-lvd1689m"
SHARDED_REPO = "facebook/dinov3-vitl16-pretrain-sat493m"  # same architecture, so the registry check passes
MODEL = "model.safetensors"
MiB = 1 << 20
SCENARIOS = ("cold", "warm", "resume", "sharded", "throttled", "rehash", "startup", "link")
LINK_TOOLS = ("dinov3-fetcher", "aria2c + sha256", "curl + sha256", "hf download")
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

    # ---------- running things ----------
    def env(self, hf_home: Path | None = None, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("DINOV3_FETCHER_", "HF_")) and k.lower() not in
               ("http_proxy", "https_proxy", "all_proxy")}
        env.update(HF_ENDPOINT=self.endpoint or self.hub.endpoint, HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1",
                   HF_HUB_DISABLE_PROGRESS_BARS="1", NO_PROXY="127.0.0.1,127.0.0.2,localhost",
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
            p = subprocess.Popen(argv, env=env or self.env(), stdout=subprocess.DEVNULL, stderr=ef)
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
        return Proc(dt, ru.ru_maxrss / 1024, p.returncode, len(self.hub.requests) - n0, t0m)

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
        """SIGKILL each tool once half the file has been served, run it again, count the bytes served again."""
        half = self.size // 2
        self.facts["resume"] = res = {}

        def served() -> int:
            return self.hub.bytes_served(MODEL)

        def one(tool: str, argv: list[str], env: dict[str, str], on_disk: Callable[[], int]) -> None:
            self.hub.clear()
            first = self.run(argv, env, kill_when=lambda: served() >= half, check=False)
            time.sleep(0.3)  # let the server threads notice the dead connections
            served1, have = served(), on_disk()
            self.hub.clear()
            self.run(argv, env)
            served2 = served()
            missing = self.size - have
            r = res.setdefault(tool, [])
            r.append({"killed_rc": first.rc, "served_before_kill": served1, "on_disk_after_kill": have,
                      "missing": missing, "served_on_resume": served2, "excess": served2 - missing})
            self.record("resume", tool, (served2 - missing) / MiB)

        ours, hf, out = self.work / "ours_resume", self.work / "hf_resume", self.work / "curl_resume.bin"

        def ours_disk() -> int:
            return sum(_data_bytes(p) for p in (ours / ".dinov3-fetcher" / "partial").glob("*/data"))

        def hf_disk() -> int:
            return sum(_data_bytes(p) for p in hf.rglob("*.incomplete"))

        def run_ours() -> None:
            self.fresh(ours)
            one("dinov3-fetcher", [FETCHER, "--dino-root", str(ours), "--model", REPO, "-q"], self.env(), ours_disk)

        def run_hf() -> None:
            self.fresh(hf, self.work / "hf_home_resume")
            one("hf download", [HF, "download", REPO, "--local-dir", str(hf)], self.env(self.work / "hf_home_resume"),
                hf_disk)

        def run_curl() -> None:
            self.fresh(out)
            one("curl -C -", ["curl", "-sSfL", "-C", "-", "-o", str(out), self.url(REPO, MODEL)], self.env(),
                lambda: _data_bytes(out))

        with self.emulator_cdn_only():
            self.rounds({"dinov3-fetcher": run_ours, "hf download": run_hf, "curl -C -": run_curl},
                        min(self.args.rounds, 2))
        self.fresh(ours, hf, out)

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
        """Each --link profile: the four tools through the emulated link (bench/link.py), per checkpoint."""
        for spec in self.args.link_specs:
            prof, kind = PROFILES[spec[0]], spec[1]
            print(f"[link {prof.name} {kind}] ...", file=sys.stderr, flush=True)
            with self.linked(prof) as (hub_link, cdn_link):
                self.link_one(prof, kind, hub_link, cdn_link)

    @contextlib.contextmanager
    def linked(self, prof: Profile) -> Iterator[tuple[LinkProxy | None, LinkProxy | None]]:
        """Put the Hub and the CDN behind ``prof`` (the CDN on 127.0.0.2); 'none' talks to them directly."""
        if prof.name == "none":
            yield None, None
            return
        saved = self.hub.cdn_endpoint
        host, port = saved.removeprefix("http://").rsplit(":", 1)
        cdn_link = LinkProxy((host, int(port)), "127.0.0.2", prof)
        h, p = self.hub.endpoint.removeprefix("http://").rsplit(":", 1)
        hub_link = LinkProxy((h, int(p)), "127.0.0.1", prof, shaped=False)
        self.hub.cdn_endpoint, self.endpoint = cdn_link.endpoint, hub_link.endpoint
        try:
            yield hub_link, cdn_link
        finally:
            self.hub.cdn_endpoint, self.endpoint = saved, None
            hub_link.close()
            cdn_link.close()

    def link_one(self, prof: Profile, kind: str, hub_link: LinkProxy | None, cdn_link: LinkProxy | None) -> None:
        repo = REPO if kind == "single" else SHARDED_REPO
        names = [MODEL] if kind == "single" else self.shard_names
        key = f"link {prof.name} {kind}"
        facts = self.facts.setdefault("link", {}).setdefault(key, {})
        d = {t: self.work / f"link_{i}" for i, t in enumerate(LINK_TOOLS)}
        sha = self.args.sha256_tool

        def measure(tool: str, argv: list[str], env: dict[str, str] | None = None) -> None:
            self.fresh(d[tool], self.work / "hf_home_link")
            d[tool].mkdir()
            if hub_link is not None and cdn_link is not None:
                hub_link.clear()
                cdn_link.clear()
            n302 = len(self.hub.requests)
            p = self.run(argv, env)
            time.sleep(0.05)  # let the proxy see the connections close
            self.record(key, tool, p.seconds)
            self.record(key + " rss", tool, p.rss_mb)
            with self.hub._lock:
                reqs = self.hub.requests[n302:]
            f: dict[str, Any] = {"redirects": sum(r.status == 302 for r in reqs),
                                 "hub_requests": sum(r.host == "hub" for r in reqs)}
            if hub_link is not None and cdn_link is not None:
                f.update(_link_counts(p.t0, hub_link.snapshot(), cdn_link.snapshot()))
                if f.get("first_weight_byte") is not None:
                    self.record(key + " first byte", tool, f["first_weight_byte"])
            facts.setdefault(tool, []).append(f)

        def sha_pass(files: list[Path]) -> str:
            paths = " ".join(f"'{x}'" for x in files)
            return f"openssl dgst -sha256 {paths}" if sha == "openssl" else f"sha256sum {paths}"

        def run_ours() -> None:
            extra = dict(kv.split("=", 1) for kv in self.args.fetcher_env)
            measure("dinov3-fetcher", [FETCHER, "--dino-root", str(d["dinov3-fetcher"]), "--model", repo, "-q"],
                    self.env(**extra) if extra else None)

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

        all_tools = {"dinov3-fetcher": run_ours, "aria2c + sha256": run_aria2c, "curl + sha256": run_curl,
                     "hf download": run_hf}
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
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return 0
    try:
        end, pos, total = os.fstat(fd).st_size, 0, 0
        while pos < end:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            stop = os.lseek(fd, start, os.SEEK_HOLE)
            total += stop - start
            pos = stop
        return total
    finally:
        os.close(fd)


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
            "cdn_heads": sum(sum(m == "HEAD" for _, m, _ in c.requests) for c in cdn),
            "max_open_cdn_connections": peak, "hub_connections": sum(bool(c.requests) for c in hub_conns),
            "cdn_rerequests": sum(len(c.gaps) for c in cdn),
            "client_gap_median": statistics.median(g) if (g := [x for c in cdn for x in c.gaps]) else None,
            "first_weight_byte": None if first is None else first - t0}


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
        o = t["resume"].get("dinov3-fetcher", [])
        worst = max(o) if o else None
        det = b.facts.get("resume", {})
        hf = det.get("hf download", [{}])[-1]
        row("resume", "dinov3-fetcher", "hf download", "MiB", None, "excess <= 16 MiB",
            worst is not None and worst <= 16,
            f"excess = bytes served on resume - bytes missing on disk after SIGKILL at 50%; "
            f"hf download re-fetched {hf.get('served_on_resume', 0) / MiB:.0f} MiB of {b.size / MiB:.0f} MiB")
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


def link_report(b: Bench) -> str:
    """The links table: one row per link and checkpoint, medians (min-max), ratios, first weight byte."""
    t = b.times
    keys = [k for k in t if k.startswith("link ") and not k.endswith((" rss", " first byte"))]
    if not keys:
        return ""
    tools = list(b.args.link_tools)
    out = ["| link (per connection / shared / RTT), checkpoint | " + " | ".join(tools) + " | fetcher / aria2c "
           "| fetcher / curl |", "|---" * (len(tools) + 3) + "|"]
    fb = ["| link, checkpoint | " + " | ".join(tools) + " |", "|---" * (len(tools) + 1) + "|"]
    cnt = ["| link, checkpoint | tool | TCP connections to the CDN | max open at once | GETs on the CDN | "
           "GETs on a used connection (each waits gap + 1 RTT) | median client gap | 302s from the Hub | "
           "Hub connections |", "|---" * 9 + "|"]

    def cell(xs: list[float] | None) -> str:
        if not xs:
            return "-"
        s = _fmt(xs, "s")
        return s if len(xs) >= b.args.rounds else f"{s}, {len(xs)} round{'s' if len(xs) > 1 else ''}"

    def ratio(a: str, c: str, key: str) -> str:
        xa, xc = t[key].get(a), t[key].get(c)
        if not xa or not xc:
            return "-"
        return f"{statistics.median(xa) / statistics.median(xc):.2f}x (min/min {min(xa) / min(xc):.2f}x)"

    for key in keys:
        _, prof, kind = key.split()
        label = f"{prof} ({PROFILES[prof].describe()}), {'1.2 GB' if b.args.layers == 24 else 'small'} " \
                f"{'single file' if kind == 'single' else f'{len(b.shard_names)} shards'}"
        out.append(f"| {label} | " + " | ".join(cell(t[key].get(x)) for x in tools)
                   + f" | {ratio('dinov3-fetcher', 'aria2c + sha256', key)} | "
                   f"{ratio('dinov3-fetcher', 'curl + sha256', key)} |")
        first = t.get(key + " first byte", {})
        if first:
            fb.append(f"| {prof}, {kind} | " + " | ".join(cell(first.get(x)) for x in tools) + " |")
        for tool in tools:
            runs = b.facts.get("link", {}).get(key, {}).get(tool, [])
            if runs and "cdn_connections" in runs[-1]:
                f = runs[-1]
                gap = "-" if f.get("client_gap_median") is None else f"{f['client_gap_median'] * 1000:.1f} ms"
                cnt.append(f"| {prof}, {kind} | {tool} | {f['cdn_connections']} | {f['max_open_cdn_connections']} | "
                           f"{f['cdn_gets']} | {f.get('cdn_rerequests', '-')} | {gap} | {f['redirects']} | "
                           f"{f['hub_connections']} |")
    text = "\n".join(out)
    if b.args.fetcher_env:
        text = f"dinov3-fetcher run with {' '.join(b.args.fetcher_env)}\n\n{text}"
    if len(fb) > 2:
        text += "\n\nFirst weight byte (first byte of a CDN GET answer sent by the link proxy, from the start of " \
                "the process):\n\n" + "\n".join(fb)
    if len(cnt) > 2:
        text += "\n\nWhat each tool opened (last round, counted at the link proxies and the Hub emulator):\n\n" \
                + "\n".join(cnt)
    return text


def exit_status(rows: list[dict[str, Any]], strict: bool) -> int:
    """0 when every tool ran: a target missed on timing is reported, not a failure (timing depends on the
    machine's load), unless ``strict``. A tool that failed never gets here (``main`` returns 1)."""
    missed = [r["scenario"] for r in rows if r["met"] is False]
    if missed:
        print(f"targets not met: {', '.join(missed)}" + ("" if strict else " (timing: reported, not a failure; "
              "--strict makes it one)"), file=sys.stderr)
    return 1 if missed and strict else 0

def versions(cdn: str, as_installed: bool = False) -> dict[str, str]:
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
        "openssl": first(["openssl", "version"]), "cdn": cdn, "bytecode": ensure_bytecode(as_installed),
    }
    if cdn == "nginx":
        out["nginx"] = first([find_nginx() or "nginx", "-v"])
    return out


def ensure_bytecode(as_installed: bool = False) -> str:
    """Byte-compile the venv and this project once, as `pip install` does, if nothing has (``as_installed``:
    leave the venv as the install made it, and say what it holds).

    uv does not compile at install, and with PYTHONDONTWRITEBYTECODE=1 (this machine, many training images)
    Python never caches bytecode either: every run of this tool and of `hf` would compile huggingface_hub
    from source (~0.25 s), which is an installation artefact, not what either tool costs.
    """
    import importlib.util

    import huggingface_hub.hf_api

    env = ", PYTHONDONTWRITEBYTECODE=1" if os.environ.get("PYTHONDONTWRITEBYTECODE") else ""
    pyc = Path(importlib.util.cache_from_source(huggingface_hub.hf_api.__file__))
    if pyc.is_file():
        return "compiled" + env
    if as_installed:
        return "none (as installed)" + env
    site = Path(huggingface_hub.__file__).resolve().parent.parent
    # Not check=True: a few packages ship files that do not compile (test data); compileall then exits 1.
    subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", "0", str(site), str(BENCH.parent / "src")],
                   capture_output=True, env={**os.environ, "PYTHONDONTWRITEBYTECODE": ""})
    if not pyc.is_file():
        raise SystemExit(f"bench: could not byte-compile {site}")
    return "compiled by the bench (python -m compileall, as pip install does)" + env


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 round, 8-layer checkpoint (~0.4 GB): a smoke run")
    ap.add_argument("--rounds", type=int, help="rounds per scenario (default 5; resume <= 2, throttled <= 3)")
    ap.add_argument("--layers", type=int, help="ViT-L layers (default 24 = 1.2 GB)")
    ap.add_argument("--only", help=f"comma-separated scenarios out of {','.join(SCENARIOS)}")
    ap.add_argument("--cdn", choices=("auto", "nginx", "emulator"), default="auto",
                    help="what serves the bytes behind the LFS redirect (auto: nginx when installed)")
    ap.add_argument("--throttle-mbps", type=float, default=40.0, help="per-connection limit for 'throttled'")
    ap.add_argument("--link", help="emulated links (bench/link.py) out of " + ",".join(PROFILES) + "; each "
                    "runs the single file and the 6 shards, or one of them with PROFILE:single / PROFILE:sharded "
                    "(e.g. --link far,cdn:single,none:sharded); implies --only link unless --only is given")
    ap.add_argument("--link-tools", default=",".join(LINK_TOOLS), help="tools for --link (default: all)")
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
    args.layers = args.layers or (8 if args.quick else 24)
    global REPO, SHARDED_REPO
    if args.layers != 24:  # not a real ViT-L any more: an unofficial id skips the registry's architecture check
        REPO, SHARDED_REPO = "bench-org/dinov3-vit-small", "bench-org/dinov3-vit-small-sharded"
    default_only = "link" if args.link else ",".join(s for s in SCENARIOS if s != "link")
    only = [s.strip() for s in (args.only or default_only).split(",") if s.strip()]
    args.link_specs = []
    for spec in (args.link or ",".join(PROFILES)).split(","):
        prof, _, kind = spec.strip().partition(":")
        if prof not in PROFILES or kind not in ("", "single", "sharded"):
            ap.error(f"--link: unknown {spec!r}; profiles {','.join(PROFILES)}, optionally :single or :sharded")
        args.link_specs += [(prof, k) for k in ([kind] if kind else ["single", "sharded"])]
    args.link_tools = [x.strip() for x in args.link_tools.split(",") if x.strip()]
    if bad_tools := [x for x in args.link_tools if x not in LINK_TOOLS]:
        ap.error(f"--link-tools: unknown {bad_tools}; choose from {LINK_TOOLS}")
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
    hub.xet_bridge.sign_range = args.xet == "signed-range"
    hub.xet_bridge.expire_after = args.xet_expire_after
    try:
        print(f"generating checkpoints in {data} ...", file=sys.stderr, flush=True)
        single = make_repo(data / f"single-{args.layers}", 1, args.layers)
        hub.add_repo(REPO, repo_files(single))
        needs_shards = "sharded" in only or ("link" in only and any(k == "sharded" for _, k in args.link_specs))
        if needs_shards:
            sharded = make_repo(data / f"sharded-{args.layers}", 6, args.layers)
            hub.add_repo(SHARDED_REPO, repo_files(sharded))
        b = Bench(args, work, hub, cdn, hub.cdn_endpoint)
        b.size = (single / MODEL).stat().st_size
        if needs_shards:
            b.shard_names = sorted(p.name for p in sharded.glob("model-*.safetensors"))
            b.shard_size = sum((sharded / n).stat().st_size for n in b.shard_names)
        if cdn == "nginx":
            assert nginx is not None
            nginx_cdn = NginxCdn(nginx, work, hub.lfs_blobs)
            hub.cdn_endpoint = nginx_cdn.endpoint
        if args.serve:  # with --link PROFILE: behind that emulated link
            prof = PROFILES[args.link_specs[0][0]] if args.link else PROFILES["none"]
            with b.linked(prof) as (hub_link, _):
                endpoint = hub_link.endpoint if hub_link is not None else hub.endpoint
                print(f"export HF_ENDPOINT={endpoint} HF_HUB_DISABLE_XET=1 HF_HUB_DISABLE_TELEMETRY=1 "
                      f"NO_PROXY=127.0.0.1,127.0.0.2  # repos: {REPO}, {SHARDED_REPO}; cdn: {hub.cdn_endpoint}; "
                      f"link: {prof.name}", flush=True)
                with contextlib.suppress(KeyboardInterrupt):
                    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
                    while True:
                        time.sleep(3600)
            return 0
        info = versions(cdn, args.as_installed)
        if args.xet != "off":
            info["xet bridge"] = args.xet + (f", expire after {args.xet_expire_after} uses"
                                             if args.xet_expire_after is not None else "")
        print("  ".join(f"{k}: {v}" for k, v in info.items()), flush=True)
        print(f"checkpoint: {b.size / 1e9:.2f} GB ({args.layers} layers); shards: {len(b.shard_names)} x "
              f"~{(b.shard_size / max(1, len(b.shard_names))) / 1e6:.0f} MB; rounds: {args.rounds}", flush=True)
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
        out = {"versions": info, "size": b.size, "layers": args.layers, "rounds": args.rounds, "times": b.times,
               "facts": b.facts, "rows": rows, "when": time.strftime("%Y-%m-%d %H:%M:%S")}
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
