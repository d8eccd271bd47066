"""The byte client's rules: who gets the token, proxies (port defaults, credentials), timeouts, and HF_ENDPOINT
checks."""

from __future__ import annotations

import base64
import http.client
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from conftest import GRANTED, TINY
from dinov3_fetcher import _env as env
from dinov3_fetcher._errors import ConfigError
from dinov3_fetcher._http import Auth, HttpPool, RequestError
from dinov3_fetcher._sources import hf
from helpers import error_line
from hub_server import HubServer

TOKEN = "hf_secret_token_for_tests"


def _bearer(origin: str, token: str = "hf_secret_token_for_tests") -> Auth:
    return Auth(origin, {"Authorization": f"Bearer {token}"})


def _auth(pool: HttpPool, url: str) -> str | None:
    return pool.headers_for(url, {}).get("Authorization")


def test_token_goes_to_the_endpoints_origin_only() -> None:
    pool = HttpPool(5, "ua", _bearer("https://hub.example", TOKEN))
    for url in ("https://hub.example/x", "https://HUB.example:443/a/b?c=d"):
        assert _auth(pool, url) == f"Bearer {TOKEN}", url
    for url in ("http://hub.example/x",  # a downgrade on the same host
                "https://hub.example:8443/x", "https://cdn.example/x", "https://hub.example.evil/x",
                "https://evil@hub.example.evil/x"):
        assert _auth(pool, url) is None, url
    assert _auth(HttpPool(5, "ua", None), "https://hub.example/x") is None
    assert _auth(HttpPool(5, "ua", _bearer("https://other.example")), "https://hub.example/x") is None


def test_display_hides_credentials_and_brackets_ipv6() -> None:
    assert env.display_origin("https://user:pw@Hub.example/") == "https://hub.example"
    assert HttpPool(5, "ua").display_host("http://[::1]:8080/x") == "[::1]:8080"
    assert HttpPool(5, "ua").display_host("https://u:p@cdn.example/x") == "cdn.example"


@pytest.mark.parametrize("value", ["5", " 2.5"])
def test_env_number(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("DINOV3_FETCHER_LOCK_TIMEOUT", value)
    assert env.lock_timeout() == float(value)


@pytest.mark.parametrize("value", ["", "abc", "nan", "inf"])
def test_env_number_falls_back(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("X_NUM", value)
    assert env.number("X_NUM", 7.0) == 7.0


@pytest.mark.parametrize("value", ["-1", "0"])
def test_a_timeout_that_is_not_positive_is_a_config_error(
        hub: HubServer, tiny: dict[str, bytes], dino_root: Path, run_cli: Any, value: str) -> None:
    r = run_cli("--dino-root", str(dino_root), "--model", TINY, DINOV3_FETCHER_TIMEOUT=value)
    assert r.returncode == 3, r.stderr
    assert "DINOV3_FETCHER_TIMEOUT" in error_line(r.stderr)
    assert not hub.requests


def test_hf_hub_download_timeout_with_a_fraction_is_accepted(
        hub: HubServer, tiny: dict[str, bytes], dino_root: Path, run_cli: Any) -> None:
    r = run_cli("--dino-root", str(dino_root), "--model", TINY, HF_HUB_DOWNLOAD_TIMEOUT="1.5",
                DINOV3_FETCHER_TIMEOUT=None)
    assert r.returncode == 0, r.stderr


# -- HF_ENDPOINT ---------------------------------------------------------------------------------------------

BAD_ENDPOINTS = ["http://[::1", "ftp://x", "not a url", "https://", "http://host:notaport", "http://host:99999",
                 "https://user:hunter2@[::1"]


@pytest.mark.parametrize("value", BAD_ENDPOINTS)
def test_malformed_endpoint_is_a_config_error(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("HF_ENDPOINT", value)
    with pytest.raises(ConfigError, match="is not an http\\(s\\) URL") as info:
        hf.endpoint()
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize("dry_run", [False, True])
@pytest.mark.parametrize("value", ["http://[::1", "ftp://x", "not a url", "https://user:hunter2@[::1"])
def test_malformed_endpoint_cli(value: str, dry_run: bool, tmp_path: Path, run_cli: Any) -> None:
    args = ["--dino-root", str(tmp_path / "dinov3"), "--model", TINY] + (["--dry-run"] if dry_run else [])
    proc = run_cli(*args, HF_ENDPOINT=value, timeout=60)
    assert proc.returncode == 3, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "is not an http(s) URL" in lines[0], proc.stderr
    assert "hunter2" not in proc.stderr + proc.stdout


def test_an_endpoint_with_credentials_is_refused_before_any_request(
        hub: HubServer, tiny: dict[str, bytes], dino_root: Path, run_cli: Any) -> None:
    url = hub.endpoint.replace("http://", "http://user:s3cretpw@")
    r = run_cli("--dino-root", str(dino_root), "--model", TINY, "--json", HF_ENDPOINT=url)
    assert r.returncode == 3, r.stderr
    assert "HF_ENDPOINT" in error_line(r.stderr)
    assert "s3cretpw" not in r.stderr + r.stdout
    assert not hub.requests


# -- proxies -------------------------------------------------------------------------------------------------

class _Proxy(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.seen: list[tuple[str, str, dict[str, str]]] = []  # (method, request target, headers)
        self.port = self.server_address[1]


class _ProxyHandler(BaseHTTPRequestHandler):
    """A forwarding HTTP proxy (absolute-form GETs) that refuses CONNECT with 407 after noting the request."""

    protocol_version = "HTTP/1.1"
    server: _Proxy

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_CONNECT(self) -> None:
        self.server.seen.append(("CONNECT", self.path, dict(self.headers)))
        self.send_response(407)
        self.send_header("Content-Length", "0")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

    def do_GET(self) -> None:
        self.server.seen.append(("GET", self.path, dict(self.headers)))
        target = urlsplit(self.path)
        upstream = http.client.HTTPConnection(target.netloc, timeout=5)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("proxy-authorization", "connection")}
        upstream.request("GET", target.path + (f"?{target.query}" if target.query else ""), headers=headers)
        resp = upstream.getresponse()
        body = resp.read()
        upstream.close()
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("content-length", "connection", "transfer-encoding", "date", "server"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def proxy(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Proxy]:
    server = _Proxy()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.005}, daemon=True)
    thread.start()
    monkeypatch.setenv("NO_PROXY", "")
    monkeypatch.delenv("no_proxy", raising=False)
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_plain_http_proxy_with_credentials(proxy: _Proxy, hub: HubServer, tiny: dict[str, bytes],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTP_PROXY", f"http://proxy%20user:p%40ss@127.0.0.1:{proxy.port}")
    pool = HttpPool(5, "ua", _bearer(hub.endpoint, GRANTED))
    try:
        for name in ("config.json", "model.safetensors"):  # the weights: a 302 from the hub to the CDN
            answer = pool.get(f"{hub.endpoint}/{TINY}/resolve/main/{name}", {})
            assert answer.resp.status == 200 and answer.read() == tiny[name]
            pool.finish(answer)
    finally:
        pool.close()
    gets = [(target, headers) for method, target, headers in proxy.seen if method == "GET"]
    assert [urlsplit(t).netloc for t, _ in gets] == [urlsplit(hub.endpoint).netloc] * 2 + \
        [urlsplit(hub.cdn_endpoint).netloc]
    for target, headers in gets:
        assert target.startswith("http://")  # absolute-form request line
        assert headers.get("Proxy-Authorization") == _basic("proxy user", "p@ss")
        on_hub = target.startswith(hub.endpoint)
        assert (headers.get("Authorization") == f"Bearer {GRANTED}") is on_hub, target


def test_connect_tunnel_sends_proxy_credentials(proxy: _Proxy, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", f"http://u:pw@127.0.0.1:{proxy.port}")
    pool = HttpPool(5, "ua", _bearer("https://hub.invalid", TOKEN))
    with pytest.raises(OSError, match="407"):
        pool.get("https://hub.invalid/x", {})
    [(method, target, headers)] = proxy.seen
    assert (method, target) == ("CONNECT", "hub.invalid:443")
    assert headers.get("Proxy-Authorization") == _basic("u", "pw")
    assert "Authorization" not in headers  # the token only ever travels inside the tunnel


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_proxy_without_a_port_uses_the_proxy_schemes_default(scheme: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_PROXY", "")
    monkeypatch.setenv(f"{scheme.upper()}_PROXY", "http://proxy.invalid")
    conn = HttpPool(5, "ua").acquire(f"{scheme}://hub.invalid/x")  # not connected yet
    assert (conn.host, conn.port) == ("proxy.invalid", 80)


def _idle(pool: HttpPool) -> int:
    return sum(len(conns) for conns in pool._idle.values())


def test_a_connection_is_pooled_only_after_a_body_read_to_its_end(hub: HubServer) -> None:
    body = b"x" * 4096
    hub.add_repo(TINY, {"config.json": body})
    url = f"{hub.endpoint}/{TINY}/resolve/main/config.json"
    pool = HttpPool(10, "test")
    try:
        answer = pool.get(url, {})
        assert answer.read() == body
        pool.finish(answer)
        assert _idle(pool) == 1  # read to its end: kept for the next request

        answer = pool.get(url, {})
        assert answer.read() == body
        answer.cut()  # a stopping download's cut that came after the last byte: the socket's data flow is shut
        pool.finish(answer)
        assert _idle(pool) == 0

        # a chunked body whose server closed between two chunks: http.client closes the response before it
        # raises, so that it looks read to its end; the failed read says otherwise
        hub.faults.add(path_suffix="config.json", chunked=True, cut_after=1024, times=1)
        answer = pool.get(url, {})
        with pytest.raises(RequestError):
            answer.read()
        pool.finish(answer)
        assert _idle(pool) == 0
    finally:
        pool.close()


def test_a_location_refused_at_its_first_reuse_makes_every_files_requests_resolved_afresh() -> None:
    # Storage that signs each location for one request (or one range: the Xet bridge) refuses every file's
    # remembered location alike: once one is refused at its first reuse, the others are not tried again either.
    from dinov3_fetcher._http import Redirects

    one_use = Redirects()
    one_use.remember("https://hub.example/a", "https://cdn.example/a?sig=1")
    one_use.remember("https://hub.example/b", "https://cdn.example/b?sig=2")
    assert one_use.forget("https://hub.example/a")
    assert one_use.per_request("https://hub.example/b") and one_use._locations.get("https://hub.example/b") is None
    one_use.remember("https://hub.example/c", "https://cdn.example/c?sig=3")
    assert one_use._locations.get("https://hub.example/c") is None

    expired = Redirects()  # a location that served answers before it was refused had expired: that file alone
    expired.remember("https://hub.example/a", "https://cdn.example/a?sig=1")
    expired.remember("https://hub.example/b", "https://cdn.example/b?sig=2")
    expired._served["https://hub.example/a"] = 20
    assert expired.forget("https://hub.example/a")
    assert expired.per_request("https://hub.example/a") and not expired.per_request("https://hub.example/b")
    assert expired._locations.get("https://hub.example/b") == "https://cdn.example/b?sig=2"
