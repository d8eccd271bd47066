"""The bench's link emulation (bench/link.py) and its exit status.

Counts only: what the proxies carried and saw, never how long it took (bench/link.py --selftest reports
the timing figures)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from hub_server import HubServer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from link import LinkProxy, Profile, Shaper
from netns import KernelLink, kernel_link_available
from plot import link_series
from run import exit_status

MB = 1_000_000


def test_a_download_goes_through_both_links_and_the_redirect_points_at_the_proxied_cdn(
        hub: HubServer) -> None:
    data = bytes(range(256)) * 12_000  # 3 MB
    hub.add_repo("org/m", {"config.json": b"{}", "model.safetensors": data})
    prof = Profile("test", 50 * MB, 200 * MB, 0.002)
    h = hub.endpoint.removeprefix("http://").rsplit(":", 1)
    c = hub.cdn_endpoint.removeprefix("http://").rsplit(":", 1)
    with LinkProxy((h[0], int(h[1])), "127.0.0.1", prof, shaped=False) as hub_link, \
            LinkProxy((c[0], int(c[1])), "127.0.0.2", prof) as cdn_link:
        hub.cdn_endpoint = cdn_link.endpoint
        # a client that follows the Hub's 302, as curl -L and aria2c do
        with urllib.request.urlopen(f"{hub_link.endpoint}/org/m/resolve/main/model.safetensors") as r:
            got = r.read()
        assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
        hub_reqs = [r for c in hub_link.snapshot() for r in c.requests]
        cdn_conns = [c for c in cdn_link.snapshot() if c.requests]
    assert any("/resolve/main/model.safetensors" in p for _, _, p in hub_reqs)
    gets = [(m, p) for c in cdn_conns for _, m, p in c.requests if m == "GET"]
    assert len(gets) == 1 and gets[0][1].startswith("/lfs/")
    # every body byte the CDN sent went through the proxy (plus the answer's headers)
    assert hub.bytes_served("model.safetensors") == len(data)
    assert len(data) < sum(c.down_bytes for c in cdn_conns) < len(data) + 2000
    assert all(c.first_down is not None for c in cdn_conns)


@pytest.mark.skipif(kernel_link_available() is not None, reason=str(kernel_link_available()))
def test_a_kernel_shaped_link_carries_a_download_from_its_namespace_through_the_tbf(
        hub: HubServer, tmp_path: Path) -> None:
    data = bytes(range(256)) * 20_000  # 5 MB
    hub.add_repo("org/m", {"config.json": b"{}", "model.safetensors": data})
    prof = Profile("test", 40 * MB, 200 * MB, 0.002)
    h = hub.endpoint.removeprefix("http://").rsplit(":", 1)
    c = hub.cdn_endpoint.removeprefix("http://").rsplit(":", 1)
    with KernelLink(prof.shared_bps, queue=0.05) as k, \
            LinkProxy((h[0], int(h[1])), k.host, prof, shaped=False) as hub_link, \
            LinkProxy((c[0], int(c[1])), k.host, prof, kernel=True) as cdn_link:
        hub.cdn_endpoint = cdn_link.endpoint
        out = tmp_path / "got"
        before = k.qdisc_stats()
        # curl runs in the namespace: the proxies are reachable there only through the veth (and its tbf)
        subprocess.run(k.wrap(["curl", "-sSfL", "--noproxy", "*", "-o", str(out),
                               f"{hub_link.endpoint}/org/m/resolve/main/model.safetensors"]), check=True)
        sent = k.qdisc_stats()["bytes"] - before["bytes"]
        cdn_conns = [c for c in cdn_link.snapshot() if c.requests]
        with pytest.raises(subprocess.CalledProcessError):  # nothing outside the namespace is reachable
            subprocess.run(k.wrap(["curl", "-sSf", "--noproxy", "*", "-m", "5", hub.endpoint]), check=True,
                           capture_output=True)
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(data).digest()
    assert sent >= len(data)  # every byte of the answer passed the tbf (plus headers and TCP/IP overhead)
    assert len(cdn_conns) == 1 and cdn_conns[0].down_bytes > len(data)
    assert hub.bytes_served("model.safetensors") == len(data)
    assert not Path(f"/run/netns/{k.ns}").exists()  # removed on exit


def test_the_shared_pacer_hands_out_link_time_in_order() -> None:
    s = Shaper(100.0)  # 100 bytes/s
    assert s.reserve(50, 0.0) == 0.0
    assert s.reserve(50, 0.0) == 0.5  # queued behind the first chunk
    assert s.reserve(100, 0.2) == 1.0
    assert s.reserve(10, 5.0) == 5.0  # an idle link does not bank time
    assert Shaper(None).reserve(10**9, 3.0) == 3.0


@pytest.mark.parametrize(("met", "strict", "code"), [(True, False, 0), (False, False, 0), (False, True, 1),
                                                    (None, True, 0)])
def test_a_missed_timing_target_is_reported_not_a_failure(met: bool | None, strict: bool, code: int,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert exit_status([{"scenario": "cold", "met": True}, {"scenario": "sharded", "met": met}], strict) == code
    assert ("targets not met: sharded" in capsys.readouterr().err) == (met is False)


def test_the_links_figure_draws_each_tools_median_and_range_from_the_results_run_py_wrote() -> None:
    times = {"link far single": {"dinov3-fetcher": [14.2, 14.0, 14.9], "aria2c + sha256": [15.6, 15.5, 16.0],
                                 "curl + sha256": [154.0]},
             "link far single first byte": {"dinov3-fetcher": [0.8, 0.7, 0.9]},
             "link none sharded": {"dinov3-fetcher": [2.3, 2.4, 2.9], "hf download": [3.7, 3.8]}}
    groups, series = link_series({"times": times})
    assert groups == ["far, single file", "none, shards"]
    assert list(series) == ["dinov3-fetcher", "aria2c + sha256", "curl + sha256", "hf download"]
    assert series["dinov3-fetcher"] == [(14.2, 14.0, 14.9), (2.4, 2.3, 2.9)]
    assert series["aria2c + sha256"] == [(15.6, 15.5, 16.0), None]
    assert series["hf download"] == [None, (3.75, 3.7, 3.8)]
