"""dinov3_fetcher._net + http.py: one network policy for both clients, against real components (a trustme TLS
Hub, a real proxy.py) and, for the rules themselves, against huggingface_hub's own client code (httpx2)."""

from __future__ import annotations

import hashlib
import ssl
from collections.abc import Iterator
from pathlib import Path

import httpcore2
import httpx2
import pytest
from httpx2._utils import URLPattern, get_environment_proxies
from huggingface_hub.utils import close_session, get_session

from checkpoints import vit_repo_files
from dinov3_fetcher._errors import ConfigError, NetworkError
from dinov3_fetcher._http import Auth, HttpPool
from dinov3_fetcher._net import network_error, proxy_for, ssl_context
from hub_server import HubServer
from net_fixtures import ForwardProxy, TlsHub, free_port, make_ca

REPO = "facebook/dinov3-net"
FILES = vit_repo_files()
TOKEN = "hf_valid_granted"
_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy",
         "no_proxy", "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUEST_METHOD")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in _VARS:
        monkeypatch.delenv(name, raising=False)
    close_session()
    yield
    close_session()


def fetch_all(pool: HttpPool, hub: HubServer, names: tuple[str, ...] = ("config.json", "model.safetensors")) -> None:
    try:
        for name in names:
            answer = pool.get(f"{hub.endpoint}/{REPO}/resolve/main/{name}", {})
            assert answer.resp.status == 200 and answer.read() == FILES[name]
            pool.finish(answer)
    finally:
        pool.close()


# ---------- the rules, compared with huggingface_hub's client ----------

def httpx2_proxy(url: str) -> str | None:
    """The proxy httpx2.Client(trust_env=True) mounts for ``url`` (Client.__init__ + _transport_for_url)."""
    mounts = sorted((URLPattern(k), v) for k, v in get_environment_proxies().items())
    for pattern, proxy in mounts:
        if pattern.matches(httpx2.URL(url)):
            return proxy
    return None


def ours(url: str) -> str | None:
    p = proxy_for(url)
    return None if p is None else f"{p.host}:{p.port}"


def theirs(url: str) -> str | None:
    p = httpx2_proxy(url)
    if p is None:
        return None
    u = httpx2.URL(p)
    return f"{u.host}:{u.port or 80}"


ENVS = [
    {"HTTP_PROXY": "http://hp:1", "HTTPS_PROXY": "http://sp:2"},
    {"ALL_PROXY": "http://ap:3"},
    {"all_proxy": "ap:3", "HTTPS_PROXY": "sp:2"},
    {"ALL_PROXY": "http://ap:3", "NO_PROXY": "localhost:8080,::1,10.0.0.0/8,fd00::/8,.corp.example,*.b.example"},
    {"HTTPS_PROXY": "http://sp:2", "NO_PROXY": "127.0.0.1:9000, example.com ,[::2]:443,192.168.1.7"},
    {"ALL_PROXY": "http://ap:3", "NO_PROXY": "*"},
    {"ALL_PROXY": "http://ap:3", "NO_PROXY": "http://plain.example,bad host,foo/bar,[::1"},
    {"HTTP_PROXY": "http://hp:1", "https_proxy": "http://lower:4", "HTTPS_PROXY": "http://upper:5"},
]
URLS = ["http://localhost:8080/x", "http://localhost:8081/x", "https://localhost/x", "http://[::1]:5000/",
        "https://[::2]/", "https://[::2]:8443/", "http://10.1.2.3/", "http://11.1.2.3/", "https://[fd00::5]/",
        "https://a.corp.example/", "https://corp.example/", "https://x.b.example/", "https://b.example/",
        "http://127.0.0.1:9000/", "http://127.0.0.1:9001/", "https://example.com/", "https://www.example.com/",
        "https://notexample.com/", "http://192.168.1.7:81/", "http://plain.example/", "https://plain.example/",
        "https://huggingface.co/x", "https://HuggingFace.CO:443/x", "http://huggingface.co:80/x"]


@pytest.mark.parametrize("env", ENVS, ids=range(len(ENVS)))
def test_proxy_choice_is_huggingface_hubs(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    choices = {url: ours(url) for url in URLS}
    assert choices == {url: theirs(url) for url in URLS}
    assert any(choices.values()) or env.get("NO_PROXY") == "*"


def test_proxy_choice_details(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALL_PROXY", "http://ap:3")
    monkeypatch.setenv("NO_PROXY", "localhost:8080,::1,10.0.0.0/8")
    assert ours("http://localhost:8080/") is None and ours("http://localhost:8081/") == "ap:3"
    assert ours("http://[::1]:1/") is None and ours("http://[::2]:1/") == "ap:3"
    assert ours("http://10.9.9.9/") is None and ours("http://11.9.9.9/") == "ap:3"
    p = proxy_for("https://huggingface.co/")
    assert p is not None and p.variable == "ALL_PROXY" and p.display == "ap:3 (ALL_PROXY)"
    monkeypatch.setenv("https_proxy", "http://user:pw@sp")
    p = proxy_for("https://huggingface.co/")
    assert p is not None and (p.variable, p.port) == ("https_proxy", 80) and "pw" not in p.display
    assert p.headers["Proxy-Authorization"].startswith("Basic ")


@pytest.mark.parametrize("proxy", ["https://secure-proxy:3129", "socks5://127.0.0.1:1080"])
def test_a_proxy_we_cannot_speak_is_a_config_error(proxy: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", proxy)
    with pytest.raises(ConfigError, match="HTTPS_PROXY") as e:
        HttpPool(5, "ua").acquire("https://huggingface.co/x")
    assert e.value.exit_code == 3
    assert proxy_for("http://huggingface.co/x") is None  # HTTP_PROXY unset: plain http is not concerned


def test_ssl_context_trusts_what_huggingface_hubs_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ref = httpcore2.default_ssl_context()
    ctx = ssl_context()
    assert ctx.cert_store_stats() == ref.cert_store_stats()
    assert (ctx.verify_mode, ctx.check_hostname) == (ssl.CERT_REQUIRED, True)
    _, ca_pem, _, _ = make_ca(tmp_path / "ca")
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_pem))
    ctx, ref = ssl_context(), httpcore2.default_ssl_context()
    assert ctx.get_ca_certs() == ref.get_ca_certs() and len(ctx.get_ca_certs()) == 1
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "missing.pem"))
    with pytest.raises(ConfigError, match="SSL_CERT_FILE"):
        ssl_context()


# ---------- our client through real components ----------

def test_pool_through_proxy_py(hub: HubServer, forward_proxy: ForwardProxy, monkeypatch: pytest.MonkeyPatch) -> None:
    hub.add_repo(REPO, FILES)
    monkeypatch.setenv("HTTP_PROXY", forward_proxy.url)
    fetch_all(HttpPool(5, "ua", Auth(hub.endpoint, {"Authorization": f"Bearer {TOKEN}"})), hub)
    recs = forward_proxy.records()
    assert [r["host"] for r in recs if r["method"] == "GET"] == ["127.0.0.1", "127.0.0.1", "127.0.0.2"]
    # plain http: the proxy sees the token on the endpoint's requests (as with any http client), never on the CDN's
    assert [r["headers"].get("authorization") for r in recs] == [f"Bearer {TOKEN}"] * 2 + [None]
    assert all("authorization" not in r.headers for r in hub.requests if r.host == "cdn")


def test_tls_through_proxy_py_is_a_tunnel(tls_hub: TlsHub, forward_proxy: ForwardProxy,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    hub = tls_hub.hub
    hub.add_repo(REPO, FILES, gated=True)
    hub.grant(REPO, TOKEN)
    monkeypatch.setenv("HTTPS_PROXY", forward_proxy.url)
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_hub.ca_pem))
    fetch_all(HttpPool(5, "ua", Auth(hub.endpoint, {"Authorization": f"Bearer {TOKEN}"})), hub)
    recs = forward_proxy.records()
    assert {r["method"] for r in recs} == {"CONNECT"} and {r["host"] for r in recs} == {"127.0.0.1", "127.0.0.2"}
    assert TOKEN not in forward_proxy.record_file.read_text() and TOKEN not in forward_proxy.log.read_text()
    auth = [(r.host, r.headers.get("authorization")) for r in hub.requests]
    assert ("hub", f"Bearer {TOKEN}") in auth and all(a is None for h, a in auth if h == "cdn")


@pytest.mark.parametrize("no_proxy", ["127.0.0.1:{hub_port},127.0.0.2:{cdn_port}", "127.0.0.0/8", "*"])
def test_no_proxy_with_ports_and_cidr(no_proxy: str, hub: HubServer, forward_proxy: ForwardProxy,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    hub.add_repo(REPO, FILES)
    hub_port, cdn_port = (e.rsplit(":", 1)[1] for e in (hub.endpoint, hub.cdn_endpoint))
    monkeypatch.setenv("ALL_PROXY", forward_proxy.url)
    monkeypatch.setenv("NO_PROXY", no_proxy.format(hub_port=hub_port, cdn_port=cdn_port))
    fetch_all(HttpPool(5, "ua", Auth(hub.endpoint, {"Authorization": f"Bearer {TOKEN}"})), hub)
    assert forward_proxy.records() == []
    # another port of the same host is not exempt
    monkeypatch.setenv("NO_PROXY", f"127.0.0.1:{hub_port},127.0.0.2:{int(cdn_port) + 1}")
    fetch_all(HttpPool(5, "ua", Auth(hub.endpoint, {"Authorization": f"Bearer {TOKEN}"})), hub)
    assert [r["host"] for r in forward_proxy.records()] == ["127.0.0.2"]


# ---------- errors that name the cause ----------

def test_untrusted_certificate_says_so(tls_hub: TlsHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub = tls_hub.hub
    hub.add_repo(REPO, FILES)
    url = f"{hub.endpoint}/{REPO}/resolve/main/config.json"
    with pytest.raises(NetworkError, match=r"certificate .*127\.0\.0\.1:\d+.*|127\.0\.0\.1:\d+.*certificate") as e:
        HttpPool(5, "ua").get(url, {})
    assert "SSL_CERT_FILE" in e.value.hint and "REQUESTS_CA_BUNDLE is not read" in e.value.hint
    _, other_ca, _, _ = make_ca(tmp_path / "other")
    monkeypatch.setenv("SSL_CERT_FILE", str(other_ca))
    with pytest.raises(NetworkError, match="certificate") as e:
        HttpPool(5, "ua").get(url, {})
    assert f"SSL_CERT_FILE={other_ca} does not hold the CA" in e.value.hint
    # huggingface_hub's client fails the same way: network_error() explains its exception alike
    with pytest.raises(httpx2.ConnectError) as he:
        get_session().get(url)
    explained = network_error(he.value, url)
    assert explained is not None and "certificate" in explained.message and "SSL_CERT_FILE=" in explained.hint
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_hub.ca_pem))
    fetch_all(HttpPool(5, "ua", Auth(hub.endpoint, {"Authorization": f"Bearer {TOKEN}"})), hub)


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_unreachable_proxy_is_named(scheme: str, hub: HubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    hub.add_repo(REPO, FILES)
    port = free_port()
    variable = f"{scheme}_proxy"
    monkeypatch.setenv(variable, f"http://127.0.0.1:{port}")
    url = f"{scheme}://127.0.0.1:{hub.endpoint.rsplit(':', 1)[1]}/{REPO}/resolve/main/config.json"
    with pytest.raises(NetworkError) as e:
        HttpPool(5, "ua").get(url, {})
    assert e.value.message.startswith(f"cannot reach the proxy 127.0.0.1:{port} ({variable})")
    assert variable in e.value.hint and not hub.requests
    with pytest.raises(httpx2.HTTPError) as he:
        get_session().get(url)
    explained = network_error(he.value, url)
    assert explained is not None and f"127.0.0.1:{port} ({variable})" in explained.message


def test_sha_of_weights_through_tunnel_unchanged(tls_hub: TlsHub, monkeypatch: pytest.MonkeyPatch) -> None:
    """SSL_CERT_DIR is honoured too (a hashed directory, as `openssl rehash` makes)."""
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not installed")
    d = tls_hub.ca_pem.parent / "capath"
    d.mkdir()
    h = subprocess.run(["openssl", "x509", "-hash", "-noout", "-in", str(tls_hub.ca_pem)], capture_output=True,
                       text=True, check=True).stdout.strip()
    shutil.copy(tls_hub.ca_pem, d / f"{h}.0")
    monkeypatch.setenv("SSL_CERT_DIR", str(d))
    hub = tls_hub.hub
    hub.add_repo(REPO, FILES)
    pool = HttpPool(5, "ua")
    answer = pool.get(f"{hub.endpoint}/{REPO}/resolve/main/model.safetensors", {})
    assert hashlib.sha256(answer.read()).digest() == hashlib.sha256(FILES["model.safetensors"]).digest()
    pool.finish(answer)
    pool.close()
