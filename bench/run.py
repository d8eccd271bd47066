"""Benchmark dinov3-fetcher against curl, openssl and `hf download` on a local Hub (issue 4).

    uv run python bench/run.py                 # full run: 1.2 GB ViT-L/16-shaped checkpoint, 5 rounds
    uv run python bench/run.py --quick         # smoke run: 1 round, smaller checkpoint (8 layers, ~0.4 GB)
    uv run python bench/run.py --only cold,warm --rounds 3 --cdn emulator

Every figure is a ratio against a public tool timed in the same run on the same server, runs alternating
(the order rotates each round), each preceded by an untimed ``sync`` so that no run pays for the previous
one's dirty pages. Scenarios: cold, warm, resume, sharded, throttled, rehash, startup (see ``--help``).
The checkpoints and downloads live in a temp folder under bench/results/ (gitignored) that is deleted at the
end; the results go to bench/results/latest.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
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
SCENARIOS = ("cold", "warm", "resume", "sharded", "throttled", "rehash", "startup")


@dataclass
class Proc:
    seconds: float
    rss_mb: float  # peak resident set of the process (wait4's ru_maxrss)
    rc: int
    requests: int = 0  # requests the Hub emulator saw during the run


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

    # ---------- running things ----------
    def env(self, hf_home: Path | None = None, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("DINOV3_FETCHER_", "HF_")) and k.lower() not in
               ("http_proxy", "https_proxy", "all_proxy")}
        env.update(HF_ENDPOINT=self.hub.endpoint, HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1",
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
        return Proc(dt, ru.ru_maxrss / 1024, p.returncode, len(self.hub.requests) - n0)

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
        return f"{self.hub.endpoint}/{repo}/resolve/main/{name}"

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


def versions(cdn: str) -> dict[str, str]:
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
        "openssl": first(["openssl", "version"]), "cdn": cdn, "bytecode": ensure_bytecode(),
    }
    if cdn == "nginx":
        out["nginx"] = first([find_nginx() or "nginx", "-v"])
    return out


def ensure_bytecode() -> str:
    """Byte-compile the venv and this project once, as `pip install` does, if nothing has.

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
    ap.add_argument("--serve", action="store_true", help="only start the servers and print the environment to "
                    "use them (for profiling by hand); Ctrl-C stops")
    ap.add_argument("--data", type=Path, help="keep the generated checkpoints here between runs (default: "
                    "a temp folder that is deleted)")
    args = ap.parse_args()
    args.rounds = args.rounds or (1 if args.quick else 5)
    args.layers = args.layers or (8 if args.quick else 24)
    global REPO, SHARDED_REPO
    if args.layers != 24:  # not a real ViT-L any more: an unofficial id skips the registry's architecture check
        REPO, SHARDED_REPO = "bench-org/dinov3-vit-small", "bench-org/dinov3-vit-small-sharded"
    only = [s.strip() for s in (args.only or ",".join(SCENARIOS)).split(",") if s.strip()]
    if bad := [s for s in only if s not in SCENARIOS]:
        ap.error(f"unknown scenario(s) {bad}; choose from {SCENARIOS}")
    for tool in ("curl", "openssl"):
        if shutil.which(tool) is None:
            ap.error(f"{tool} is not installed (apt-get install {tool})")
    nginx = find_nginx()
    if args.cdn == "nginx" and nginx is None:
        ap.error("nginx is not installed: apt-get install nginx-light, or use --cdn emulator")
    cdn = "nginx" if nginx and args.cdn != "emulator" else "emulator"

    RESULTS.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="work-", dir=RESULTS))
    data = args.data or work / "data"
    nginx_cdn: NginxCdn | None = None
    hub = HubServer()
    try:
        print(f"generating checkpoints in {data} ...", file=sys.stderr, flush=True)
        single = make_repo(data / f"single-{args.layers}", 1, args.layers)
        hub.add_repo(REPO, repo_files(single))
        needs_shards = "sharded" in only
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
        if args.serve:
            print(f"export HF_ENDPOINT={hub.endpoint} HF_HUB_DISABLE_XET=1 HF_HUB_DISABLE_TELEMETRY=1 "
                  f"NO_PROXY=127.0.0.1,127.0.0.2  # repos: {REPO}, {SHARDED_REPO}; cdn: {hub.cdn_endpoint}",
                  flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
                while True:
                    time.sleep(3600)
            return 0
        info = versions(cdn)
        print("  ".join(f"{k}: {v}" for k, v in info.items()), flush=True)
        print(f"checkpoint: {b.size / 1e9:.2f} GB ({args.layers} layers); shards: {len(b.shard_names)} x "
              f"~{(b.shard_size / max(1, len(b.shard_names))) / 1e6:.0f} MB; rounds: {args.rounds}", flush=True)
        for s in only:
            t0 = time.monotonic()
            print(f"[{s}] ...", file=sys.stderr, flush=True)
            getattr(b, s)()
            print(f"[{s}] done in {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
        rows, table = report(b)
        print()
        print(table)
        out = {"versions": info, "size": b.size, "layers": args.layers, "rounds": args.rounds, "times": b.times,
               "facts": b.facts, "rows": rows, "when": time.strftime("%Y-%m-%d %H:%M:%S")}
        (RESULTS / "latest.json").write_text(json.dumps(out, indent=2) + "\n")
        (RESULTS / "latest.md").write_text("  ".join(f"{k}: {v}" for k, v in info.items()) + "\n\n" + table + "\n")
        print(f"\nwritten: {RESULTS / 'latest.json'}, {RESULTS / 'latest.md'}", file=sys.stderr)
        return 0 if all(r["met"] is not False for r in rows) else 1
    finally:
        if nginx_cdn is not None:
            nginx_cdn.close()
        hub.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
