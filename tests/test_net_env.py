"""The network test components (tests/net_fixtures.py) with the real huggingface_hub client: a TLS Hub whose
CA only SSL_CERT_FILE trusts, and a real forward proxy (proxy.py) that records what it carried."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import constants, hf_hub_download
from huggingface_hub.utils import close_session, get_session

from checkpoints import vit_repo_files
from hub_server import HubServer
from net_fixtures import ForwardProxy, Olah, TlsHub

REPO = "facebook/dinov3-net"
FILES = vit_repo_files()
TOKEN = "hf_valid_granted"


@pytest.fixture(autouse=True)
def fresh_session(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """huggingface_hub builds its httpx2 client (CAs, proxies) once per process: rebuild it around each test."""
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    close_session()
    yield
    close_session()


def download(hub: HubServer, tmp_path: Path, name: str = "model.safetensors", token: str | bool = TOKEN) -> bytes:
    path = hf_hub_download(REPO, name, endpoint=hub.endpoint, cache_dir=tmp_path / "cache", token=token)
    return Path(path).read_bytes()


def test_tls_hub_needs_its_ca(tls_hub: TlsHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub = tls_hub.hub
    assert hub.endpoint.startswith("https://127.0.0.1:") and hub.cdn_endpoint.startswith("https://127.0.0.2:")
    hub.add_repo(REPO, FILES)
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    # one request through huggingface_hub's own client (hf_hub_download would retry with backoff for seconds)
    with pytest.raises(httpx2.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        get_session().head(f"{hub.endpoint}/{REPO}/resolve/main/config.json")
    assert not hub.requests  # the handshake failed: no request reached the hub
    close_session()
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_hub.ca_pem))
    assert download(hub, tmp_path) == FILES["model.safetensors"]
    assert download(hub, tmp_path, "config.json") == FILES["config.json"]
    assert {r.host for r in hub.file_gets()} == {"hub", "cdn"}  # both hosts over TLS
    assert all("authorization" not in r.headers for r in hub.requests if r.host == "cdn")


def test_tls_xet_bridge(tls_hub: TlsHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub = tls_hub.hub
    hub.add_repo(REPO, FILES, xet=True)
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_hub.ca_pem))
    assert download(hub, tmp_path) == FILES["model.safetensors"]
    assert [r.status for r in hub.file_gets("model.safetensors")] == [302, 200]


def test_plain_http_through_the_proxy(hub: HubServer, forward_proxy: ForwardProxy, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    hub.add_repo(REPO, FILES)
    monkeypatch.delenv("NO_PROXY")
    monkeypatch.setenv("HTTP_PROXY", forward_proxy.url)
    assert download(hub, tmp_path, token=False) == FILES["model.safetensors"]
    recs = forward_proxy.records()
    hub_port, cdn_port = (int(e.rsplit(":", 1)[1]) for e in (hub.endpoint, hub.cdn_endpoint))
    assert {(r["host"], r["port"]) for r in recs} == {("127.0.0.1", hub_port), ("127.0.0.2", cdn_port)}
    assert any(r["method"] == "HEAD" and "/resolve/main/model.safetensors" in r["path"] for r in recs)
    assert any(r["method"] == "GET" and r["host"] == "127.0.0.2" for r in recs)
    # every file request the hub saw was carried by the proxy
    assert len([r for r in recs if r["method"] == "GET" and "/resolve/" in r["path"]]) == \
        len([r for r in hub.file_gets() if r.host == "hub"])


def test_no_proxy_bypasses_it(hub: HubServer, forward_proxy: ForwardProxy, tmp_path: Path,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    hub.add_repo(REPO, FILES)
    monkeypatch.setenv("HTTP_PROXY", forward_proxy.url)  # NO_PROXY=127.0.0.1,127.0.0.2,localhost (conftest)
    assert download(hub, tmp_path, token=False) == FILES["model.safetensors"]
    assert forward_proxy.records() == []


def test_tls_through_the_proxy_is_a_tunnel(tls_hub: TlsHub, forward_proxy: ForwardProxy, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    hub = tls_hub.hub
    hub.add_repo(REPO, FILES, gated=True)
    hub.grant(REPO, TOKEN)
    monkeypatch.delenv("NO_PROXY")
    monkeypatch.setenv("HTTPS_PROXY", forward_proxy.url)
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_hub.ca_pem))
    data = download(hub, tmp_path)
    assert hashlib.sha256(data).digest() == hashlib.sha256(FILES["model.safetensors"]).digest()
    recs = forward_proxy.records()
    assert recs and {r["method"] for r in recs} == {"CONNECT"}
    assert {r["host"] for r in recs} == {"127.0.0.1", "127.0.0.2"}
    assert TOKEN not in forward_proxy.record_file.read_text()
    assert TOKEN not in forward_proxy.log.read_text()
    assert any(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in hub.requests if r.host == "hub")


@pytest.mark.slow  # olah takes 10-15 s to start on a loaded 2-core machine
def test_olah_in_front_of_the_hub(hub: HubServer, olah: Olah, tmp_path: Path) -> None:
    import json
    import urllib.request

    hub.add_repo(REPO, FILES)
    weights = FILES["model.safetensors"]

    def api(path: str) -> object:
        with urllib.request.urlopen(f"{olah.endpoint}{path}", timeout=60) as r:
            return json.loads(r.read())

    # the revision API loses ?blobs=true: siblings carry only rfilename (what the fetcher must cope with)
    info = api(f"/api/models/{REPO}/revision/main?blobs=true")
    assert isinstance(info, dict) and info["sha"] == hub.repos[REPO].refs["main"]
    assert info["siblings"] and all(set(s) == {"rfilename"} for s in info["siblings"])
    assert any(r.path.endswith(f"/api/models/{REPO}/revision/main") for r in hub.requests)  # no query
    # the tree API keeps lfs sha256s
    tree = api(f"/api/models/{REPO}/tree/main?recursive=true&expand=true")
    assert isinstance(tree, list)
    lfs = {e["path"]: e["lfs"]["oid"] for e in tree if e.get("lfs")}
    assert lfs["model.safetensors"] == hashlib.sha256(weights).hexdigest()
    # huggingface_hub downloads through it; a second client is served from olah's cache
    for cache in ("c1", "c2"):
        path = hf_hub_download(REPO, "model.safetensors", endpoint=olah.endpoint, cache_dir=tmp_path / cache,
                               token=False)
        assert Path(path).read_bytes() == weights
    assert hub.bytes_served("model.safetensors") == len(weights)  # the weights left the hub once
    assert any(olah.repos_path.rglob("*"))
