"""The fetcher end to end behind every network a user sits behind: a TLS Hub with a private CA, a
forward proxy, the Hub's Xet bridge, an olah mirror. In process (``dinov3_fetcher.fetch.fetch``), real
huggingface_hub, real proxy.py / olah subprocesses."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from huggingface_hub.utils import close_session

from checkpoints import vit_repo_files
from conftest import GRANTED, TINY, checkpoint_tree
from dinov3_fetcher._errors import NetworkError
from helpers import fetch
from hub_server import HubServer
from modelscope_server import ModelScopeServer
from net_fixtures import ForwardProxy, Olah, TlsHub

FILES = vit_repo_files()
WEIGHTS = FILES["model.safetensors"]


@pytest.fixture(autouse=True)
def fresh_session(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """huggingface_hub builds its client (CAs, proxies) once per process: rebuild it around each test."""
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    close_session()
    yield
    close_session()


def assert_fetched(root: Path) -> None:
    assert (root / "model.safetensors").read_bytes() == WEIGHTS
    assert (root / "config.json").read_bytes() == FILES["config.json"]
    assert checkpoint_tree(root)


# ---------- a private CA ----------

def test_tls_hub_with_ssl_cert_file(tls_hub: TlsHub, dino_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub = tls_hub.hub
    hub.add_repo(TINY, FILES)
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_hub.ca_pem))
    fetch(dino_root, TINY)
    assert_fetched(dino_root)
    assert any(r.path.startswith(f"/api/models/{TINY}") for r in hub.requests)  # metadata over TLS
    assert hub.bytes_served("model.safetensors") == len(WEIGHTS)  # bytes over TLS, from the CDN host
    # resolved on the Hub (the head start's HEAD, whose Location its GETs reuse), the bytes from the CDN host
    assert {r.host for r in list(hub.requests) if r.path.partition("?")[0].endswith("model.safetensors")
            and r.status in (200, 206, 302)} == {"hub", "cdn"}


def test_tls_hub_untrusted_says_certificate(tls_hub: TlsHub, dino_root: Path) -> None:
    tls_hub.hub.add_repo(TINY, FILES)
    with pytest.raises(NetworkError) as e:
        fetch(dino_root, TINY)
    assert "certificate" in e.value.message and "SSL_CERT_FILE" in e.value.hint  # needs hub.py -> _net.network_error


@pytest.mark.parametrize("kind", ["missing", "not-pem", "fifo"])
def test_an_unusable_ssl_cert_file_is_named_and_an_http_endpoint_is_not_concerned(
        tls_hub: TlsHub, hub: HubServer, tmp_path: Path, run_cli: Any, kind: str) -> None:
    bundle = tmp_path / "bundle.pem"
    if kind == "not-pem":
        bundle.write_text("not a certificate\n")
    elif kind == "fifo":
        os.mkfifo(bundle)
    tls_hub.hub.add_repo(TINY, FILES)
    r = run_cli("--dino-root", str(tmp_path / "a"), "--model", TINY, HF_ENDPOINT=tls_hub.hub.endpoint,
                SSL_CERT_FILE=str(bundle), timeout=60)
    assert r.returncode == 3, r.stderr
    why = {"missing": "does not exist", "not-pem": "holds no CA certificate in PEM form",
           "fifo": "is a FIFO (named pipe), not a regular file"}[kind]
    assert r.stderr.startswith(f"dinov3-fetcher: error: SSL_CERT_FILE={bundle} {why}"), r.stderr
    assert tls_hub.hub.requests == []
    hub.add_repo(TINY, FILES)  # the same variable does not concern a plain-http endpoint at all
    r = run_cli("--dino-root", str(tmp_path / "b"), "--model", TINY, HF_ENDPOINT=hub.endpoint,
                SSL_CERT_FILE=str(bundle), timeout=60)
    assert r.returncode == 0, r.stderr
    assert_fetched(tmp_path / "b")


# ---------- a forward proxy ----------

def test_a_socks_proxy_that_no_proxy_exempts_the_endpoint_from_is_not_looked_at(
        hub: HubServer, dino_root: Path, run_cli: Any) -> None:
    hub.add_repo(TINY, FILES)
    r = run_cli("--dino-root", str(dino_root), "--model", TINY, ALL_PROXY="socks5://127.0.0.1:9",
                NO_PROXY="127.0.0.1,127.0.0.2")
    assert r.returncode == 0, r.stderr
    assert_fetched(dino_root)


def test_fetch_through_proxy_py(hub: HubServer, forward_proxy: ForwardProxy, dino_root: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    hub.add_repo(TINY, FILES)
    monkeypatch.delenv("NO_PROXY")
    monkeypatch.setenv("HTTP_PROXY", forward_proxy.url)
    fetch(dino_root, TINY)
    assert_fetched(dino_root)
    recs = forward_proxy.records()
    hub_port = int(hub.endpoint.rsplit(":", 1)[1])
    assert any((r["host"], r["port"]) == ("127.0.0.1", hub_port) and r["path"].startswith("/api/models/")
               for r in recs)  # the metadata (huggingface_hub's client) went through it
    assert any(r["host"] == "127.0.0.2" and r["method"] == "GET" for r in recs)  # the bytes went through it too


def test_fetch_through_proxy_py_over_tls_keeps_the_token_in_the_tunnel(
        tls_hub: TlsHub, forward_proxy: ForwardProxy, dino_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub = tls_hub.hub
    hub.add_repo(TINY, FILES, gated=True)
    hub.grant(TINY, GRANTED)
    monkeypatch.delenv("NO_PROXY")
    monkeypatch.setenv("HTTPS_PROXY", forward_proxy.url)
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_hub.ca_pem))
    monkeypatch.setenv("HF_TOKEN", GRANTED)
    fetch(dino_root, TINY)
    assert_fetched(dino_root)
    recs = forward_proxy.records()
    assert {r["method"] for r in recs} == {"CONNECT"} and {r["host"] for r in recs} == {"127.0.0.1", "127.0.0.2"}
    assert GRANTED not in forward_proxy.record_file.read_text() and GRANTED not in forward_proxy.log.read_text()
    assert all("authorization" not in r.headers for r in hub.requests if r.host == "cdn")


@pytest.mark.parametrize("source", ["hf", "modelscope"])
def test_a_plain_http_proxy_refusing_with_407_is_named_as_the_proxy(hub: HubServer, ms: ModelScopeServer,
                                                                     tmp_path: Path, dino_root: Path, run_cli: Any,
                                                                     source: str) -> None:
    """Over plain HTTP the proxy's 407 comes back as an answer to the request itself (no CONNECT): it is the
    proxy's refusal, named with the proxy's address and variable, not the source's answer (huggingface_hub's
    client asks the Hub's listing, ours ModelScope's)."""
    from net_fixtures import ForwardProxy

    hub.add_repo(TINY, FILES)
    ms.add_repo(TINY, FILES)
    proxy = ForwardProxy(tmp_path / "proxy", basic_auth="alice:secret")
    try:
        r = run_cli("--dino-root", str(dino_root), "--model", TINY, "--source", source, NO_PROXY=None,
                    HTTP_PROXY=proxy.url)
        assert r.returncode == 10, r.stderr
        assert f"the proxy 127.0.0.1:{proxy.port} (HTTP_PROXY) refused to carry the request" in r.stderr, r.stderr
        assert "407" in r.stderr and " answered HTTP 407" not in r.stderr
        assert hub.requests == [] and ms.requests == []  # nothing reached the source
        authed = proxy.url.replace("http://", "http://alice:secret@")
        r = run_cli("--dino-root", str(dino_root), "--model", TINY, "--source", source, NO_PROXY=None,
                    HTTP_PROXY=authed)
        assert r.returncode == 0, r.stderr
        assert_fetched(dino_root)
        assert "secret" not in r.stderr
    finally:
        proxy.close()


# ---------- the Xet bridge ----------

@pytest.fixture
def xet_hub(hub: HubServer) -> HubServer:
    hub.add_repo(TINY, FILES, xet=True)
    return hub


def test_xet_bridge_plain(xet_hub: HubServer, dino_root: Path) -> None:
    """The bridge's ETag is its Xet hash, not the sha256: the fetcher must treat it as opaque."""
    fetch(dino_root, TINY)
    assert_fetched(dino_root)


def test_xet_bridge_cut_and_signature_bound_to_range(xet_hub: HubServer, dino_root: Path) -> None:
    """A resume after a cut must re-resolve: the first signed URL is valid for the request it answered only.
    Ours runs several connections per file, so ranged requests come even without the cut."""
    xet_hub.xet_bridge.sign_range = True
    xet_hub.faults.add(cut_after=50_000, path_suffix="model.safetensors", host="cdn", times=1)
    fetch(dino_root, TINY)
    assert_fetched(dino_root)
    # re-resolving per range never meets a 403; re-resolving after one is allowed, once per refused URL
    gets = xet_hub.file_gets("model.safetensors")
    assert len([r for r in gets if r.status == 403]) <= len([r for r in gets if r.host == "hub"])


def test_xet_bridge_signed_per_range_keeps_every_stream(hub: HubServer, dino_root: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Several streams start on the location the head start's HEAD remembered, which the bridge signed for a
    request without a Range: every ranged GET there is refused. Each stream must take that as a stale URL and
    resolve its own piece anew; none may conclude that the CDN refuses ranges (one connection for the whole
    file: 153 s instead of 14 s for 1.2 GB on the bench's far link, where 32 streams met the refusal at once)."""
    big = vit_repo_files(hidden=512, intermediate=2048, layers=8)  # ~100 MB: several 16 MiB pieces
    hub.add_repo(TINY, big, xet=True)
    hub.xet_bridge.sign_range = True
    monkeypatch.setenv("DINOV3_FETCHER_CONNECTIONS", "4")
    fetch(dino_root, TINY)
    assert (dino_root / "model.safetensors").read_bytes() == big["model.safetensors"]
    cdn = [r for r in hub.file_gets("model.safetensors") if r.host == "cdn"]
    assert [r for r in cdn if r.status == 200] == []  # never the whole file on one connection
    # the pieces, each on its own signature, more than one stream's (how many depends on the rate the streams
    # see: a file known to need a signature per range takes longer pieces)
    assert len([r for r in cdn if r.status == 206]) >= 2


def test_xet_bridge_signed_per_range_resolves_few_times(hub: HubServer, dino_root: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """With signatures bound to one range, every piece is a resolve, which the Hub counts per address (3,000 in 5
    minutes without a token, 5,000 with): once a file is known to need them, its pieces are 8 times longer,
    so that 8 nodes fetching a 7B at once behind one address stay within the limit."""
    from dataclasses import replace

    from dinov3_fetcher._transfer import Settings

    big = vit_repo_files(hidden=512, intermediate=2048, layers=8)  # ~100 MB: 100 pieces of 1 MiB
    hub.add_repo(TINY, big, xet=True)
    hub.xet_bridge.sign_range = True
    monkeypatch.setenv("DINOV3_FETCHER_CONNECTIONS", "4")
    real = Settings.from_env
    monkeypatch.setattr(Settings, "from_env", classmethod(lambda cls: replace(real(), min_split=1024 * 1024)))
    fetch(dino_root, TINY)
    assert (dino_root / "model.safetensors").read_bytes() == big["model.safetensors"]
    resolves = [r for r in hub.requests if r.host == "hub" and r.path.partition("?")[0].endswith(
        "/resolve/" + hub.repos[TINY].refs["main"] + "/model.safetensors")]
    pieces = len(big["model.safetensors"]) // (1024 * 1024)
    # 4 first pieces on the HEAD's location (refused), then pieces of 8 MiB, and the file's end shared out
    assert len(resolves) <= pieces // 3, len(resolves)  # (98 when every piece was 1 MiB)


def test_xet_bridge_signature_expires(xet_hub: HubServer, dino_root: Path) -> None:
    xet_hub.xet_bridge.expire_after = 1
    xet_hub.faults.add(cut_after=50_000, path_suffix="model.safetensors", host="cdn", times=1)
    fetch(dino_root, TINY)
    assert_fetched(dino_root)


@pytest.mark.parametrize("code", [416, 403])
def test_xet_bridge_refusing_ranges_falls_back_to_one_connection(xet_hub: HubServer, dino_root: Path,
                                                                   code: int) -> None:
    xet_hub.xet_bridge.refuse_ranges = code
    xet_hub.faults.add(cut_after=50_000, path_suffix="model.safetensors", host="cdn", times=1)
    fetch(dino_root, TINY)
    assert_fetched(dino_root)


@pytest.mark.parametrize("storage", ["xet-bridge-expired", "cdn-refusing"])
def test_storage_refusing_the_signed_link_is_a_network_error_naming_it(hub: HubServer, dino_root: Path,
                                                                      run_cli: Any, storage: str) -> None:
    """The token never goes to the storage host, so its 403 is the storage's refusal (an expired signature, a
    firewall in front of it): exit 10 naming that host, not an access problem of the token."""
    hub.add_repo(TINY, FILES, gated=True, xet=storage.startswith("xet"))
    hub.grant(TINY, GRANTED)
    if storage.startswith("xet"):
        hub.xet_bridge.expire_after = 0  # every signature is refused from its first use
    else:
        hub.faults.add(path_suffix="model.safetensors", host="cdn", status=403)
    r = run_cli("--dino-root", str(dino_root), "--model", TINY, "--json", HF_TOKEN=GRANTED)
    assert r.returncode == 10, r.stderr
    error = json.loads(r.stdout)["error"]
    cdn = hub.cdn_endpoint.removeprefix("http://")
    assert error["type"] == "NetworkError"
    assert error["message"].startswith(f"the storage host {cdn} refused model.safetensors (HTTP 403"), error
    assert "Request has expired" in error["message"] if storage.startswith("xet") else True
    assert "the token is not the cause" in error["hint"] and "token may read" not in r.stderr
    assert not (dino_root / "model.safetensors").exists()


# ---------- mirrors ----------

def test_a_mirror_whose_tree_pagination_points_back_ends_naming_it(hub: HubServer, dino_root: Path,
                                                                   run_cli: Any) -> None:
    """A mirror without sizes in model_info (as olah) is read from its tree API; one whose next page is the page
    itself ends at once, exit 8, naming the mirror (it would otherwise be asked for pages forever)."""
    hub.add_repo(TINY, FILES)
    hub.drop_blobs = True
    r = run_cli("--dino-root", str(dino_root), "--model", TINY, "-q")
    assert r.returncode == 0, r.stderr  # the tree's sizes and hashes
    hub.tree_loop = True
    hub.clear()
    r = run_cli("--dino-root", str(dino_root), "--model", TINY, "--update", timeout=120)
    assert r.returncode == 8, r.stderr
    assert f"{hub.endpoint} (HF_ENDPOINT): its tree listing of {TINY} points its next page back " in r.stderr, \
        r.stderr
    assert "its pagination loops" in r.stderr
    assert len([q for q in hub.requests if "/tree/" in q.path]) == 1  # the page, never asked again
    assert_fetched(dino_root)  # the checkpoint there stays


def _empty_pages_forever(cursor: int, page: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int | str | None]:
    return [], cursor + 1  # each page empty, each pointing at a new cursor


def _cursors_that_repeat(cursor: int, page: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int | str | None]:
    return [], 2 if cursor == 1 else 1  # 0 -> 1 -> 2 -> 1 -> ...: empty pages, a cursor asked again


def _entries_without_end(cursor: int, page: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int | str | None]:
    return [{"type": "file", "path": f"shard-{cursor}.bin", "size": 1, "oid": "0" * 40}], cursor + 1


def _next_page_elsewhere(cursor: int, page: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int | str | None]:
    return page, "http://127.0.0.1:9/api/models/elsewhere/tree/main?cursor=1"  # the token would go with it


@pytest.mark.parametrize(("pages", "says", "asked"), [
    (_empty_pages_forever, "did not end after 100 pages (0 entries)", 100),
    (_cursors_that_repeat, "points its next page back at a page it gave (3 asked)", 3),
    (_entries_without_end, "did not end after 100 pages (100 entries)", 100),
    (_next_page_elsewhere, "sends its next page to another host (http://127.0.0.1:9)", 1),
])
def test_a_mirror_whose_tree_pagination_never_ends_is_bounded_by_pages_and_named(
        hub: HubServer, dino_root: Path, run_cli: Any, pages: Any, says: str, asked: int) -> None:
    """Whatever a mirror's tree pages hold (nothing, a cursor seen before, new entries forever, a next page on
    another host), the listing stops after a bounded number of requests: exit 8, one line naming the mirror and
    what to do, the checkpoint already in dino_root kept."""
    hub.add_repo(TINY, FILES)
    hub.drop_blobs = True
    assert run_cli("--dino-root", str(dino_root), "--model", TINY, "-q").returncode == 0
    hub.tree_pages = pages
    hub.clear()
    r = run_cli("--dino-root", str(dino_root), "--model", TINY, "--update", timeout=120)
    assert r.returncode == 8, r.stderr
    (line,) = r.stderr.splitlines()
    assert line.startswith(f"dinov3-fetcher: error: {hub.endpoint} (HF_ENDPOINT): its tree listing of {TINY} "
                           f"{says}: its pagination loops or never ends"), line
    assert "-> set HF_ENDPOINT to a mirror that works" in line
    assert len([q for q in hub.requests if "/tree/" in q.path]) == asked
    assert_fetched(dino_root)


# ---------- olah ----------

@pytest.mark.slow  # olah takes 10-15 s to start
def test_olah_cold_then_served_from_its_cache(hub: HubServer, olah: Olah, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    hub.add_repo(TINY, FILES)
    monkeypatch.setenv("HF_ENDPOINT", olah.endpoint)
    for root in (tmp_path / "a" / "dinov3", tmp_path / "b" / "dinov3"):
        fetch(root, TINY)
        assert_fetched(root)
        assert hashlib.sha256((root / "model.safetensors").read_bytes()).hexdigest() == \
            hashlib.sha256(WEIGHTS).hexdigest()
    assert hub.bytes_served("model.safetensors") == len(WEIGHTS)  # the weights left the hub once


def test_unreachable_proxy_is_reported_as_the_proxy(hub: HubServer, dino_root: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from net_fixtures import free_port

    hub.add_repo(TINY, FILES)
    port = free_port()
    monkeypatch.delenv("NO_PROXY")
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{port}")
    with pytest.raises(NetworkError) as e:
        fetch(dino_root, TINY)
    assert f"proxy 127.0.0.1:{port} (HTTP_PROXY)" in e.value.message and "HTTP_PROXY" in e.value.hint
    assert not hub.requests


def test_https_proxy_is_a_config_error(tls_hub: TlsHub, dino_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dinov3_fetcher._errors import ConfigError

    tls_hub.hub.add_repo(TINY, FILES)
    monkeypatch.delenv("NO_PROXY")
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_hub.ca_pem))
    monkeypatch.setenv("HTTPS_PROXY", "https://127.0.0.1:9")
    with pytest.raises(ConfigError, match="HTTPS_PROXY"):
        fetch(dino_root, TINY)
