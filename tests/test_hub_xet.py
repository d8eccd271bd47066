"""The Hub emulator's Xet bridge (tests/hub_server.py) against the real huggingface_hub client and plain HTTP."""

from __future__ import annotations

import hashlib
import http.client
import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urljoin, urlsplit

import pytest
from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url

from checkpoints import vit_repo_files
from conftest import point_hub_client
from hub_server import HubServer, xet_hash

REPO = "facebook/dinov3-xet"
FILES = vit_repo_files()
WEIGHTS = FILES["model.safetensors"]
SHA = hashlib.sha256(WEIGHTS).hexdigest()


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    # hf_xet is installed: without this the client would switch to the Xet protocol on X-Xet-Hash + xet-auth.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    with HubServer(xet=True) as server:
        point_hub_client(monkeypatch, server.endpoint)  # the rest of the sandbox: conftest.isolated
        server.add_repo(REPO, FILES)
        yield server


def request(url: str, method: str = "GET", headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One plain request, no redirect followed: (status, lower-cased headers, body)."""
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    try:
        conn.request(method, u.path + (f"?{u.query}" if u.query else ""), headers=headers or {})
        resp = conn.getresponse()
        try:
            body = resp.read()
        except http.client.IncompleteRead as e:  # a cut body: what arrived
            body = e.partial
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body
    finally:
        conn.close()


def resolve(hub: HubServer, headers: dict[str, str] | None = None, method: str = "GET") -> dict[str, str]:
    status, h, _ = request(f"{hub.endpoint}/{REPO}/resolve/main/model.safetensors", method, headers)
    assert status == 302
    return h


def test_resolve_answers_like_the_xet_bridge(hub: HubServer) -> None:
    h = resolve(hub, method="HEAD")
    commit = hub.repos[REPO].refs["main"]
    xh = h["x-xet-hash"]
    assert re.fullmatch(r"[0-9a-f]{64}", xh) and xh != SHA and xh == xet_hash(SHA)
    assert h["x-linked-etag"] == f'"{SHA}"' and h["x-linked-size"] == str(len(WEIGHTS))
    assert h["x-repo-commit"] == commit
    assert f'<{hub.endpoint}/api/models/{REPO}/xet-read-token/{commit}>; rel="xet-auth"' in h["link"]
    assert 'rel="xet-reconstruction-info"' in h["link"]
    loc = urlsplit(h["location"])
    assert f"{loc.scheme}://{loc.netloc}" == hub.cdn_endpoint
    assert re.fullmatch(rf"/xet-bridge-us/[0-9a-f]{{24}}/{xh}", loc.path)
    q = parse_qs(loc.query)
    assert q["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"] and q["X-Amz-Expires"] == ["3600"]
    assert re.fullmatch(r"\d{8}T\d{6}Z", q["X-Amz-Date"][0]) and len(q["X-Amz-Signature"][0]) == 64
    # every 302 mints a fresh signature
    assert parse_qs(urlsplit(resolve(hub)["location"]).query)["X-Amz-Signature"] != q["X-Amz-Signature"]
    # the bridge's answer: the bytes, its ETag is the Xet hash, no Hub metadata
    status, cdn, body = request(h["location"])
    assert status == 200 and body == WEIGHTS
    assert cdn["etag"] == f'"{xh}"' and cdn["accept-ranges"] == "bytes"
    assert not {"x-repo-commit", "x-linked-etag", "x-linked-size"} & set(cdn)
    # non-LFS files and repos without xet are untouched
    status, plain, body = request(f"{hub.endpoint}/{REPO}/resolve/main/config.json")
    assert status == 200 and body == FILES["config.json"] and "x-xet-hash" not in plain
    hub.add_repo("facebook/plain", FILES, xet=False)
    status, plain, _ = request(f"{hub.endpoint}/facebook/plain/resolve/main/model.safetensors", "HEAD")
    assert status == 302 and "x-xet-hash" not in plain and "/lfs/" in plain["location"]


def test_huggingface_hub_downloads_through_the_bridge(hub: HubServer, tmp_path: Path) -> None:
    url = hf_hub_url(REPO, "model.safetensors", endpoint=hub.endpoint)
    meta = get_hf_file_metadata(url, token=False)
    assert meta.etag == SHA and meta.size == len(WEIGHTS) and "/xet-bridge-us/" in meta.location
    assert meta.xet_file_data is not None and meta.xet_file_data.file_hash == xet_hash(SHA)
    hub.clear()
    path = hf_hub_download(REPO, "model.safetensors", endpoint=hub.endpoint, cache_dir=tmp_path / "c",
                           token="hf_valid_granted")
    assert Path(path).read_bytes() == WEIGHTS
    gets = hub.file_gets("model.safetensors")
    # With X-Xet-Hash on the HEAD, huggingface_hub (Xet disabled) GETs the resolve URL again, not the HEAD's
    # Location: every GET gets a fresh 302 and a fresh signature (file_download._get_metadata_or_catch_error).
    assert [(r.host, r.status) for r in gets] == [("hub", 302), ("cdn", 200)]
    assert gets[1].file == "model.safetensors" and hub.bytes_served("model.safetensors") == len(WEIGHTS)
    assert all("authorization" not in r.headers for r in hub.requests if r.host == "cdn")


def test_cut_mid_body_then_range_resume(hub: HubServer, tmp_path: Path) -> None:
    hub.faults.add(cut_after=1000, path_suffix="model.safetensors", host="cdn", times=1)
    path = hf_hub_download(REPO, "model.safetensors", endpoint=hub.endpoint, cache_dir=tmp_path / "c", token=False)
    assert Path(path).read_bytes() == WEIGHTS
    # the retry goes through the resolve URL again (a fresh 302); it asks no Range here because the cut came
    # before huggingface_hub's first 10 MiB block was written
    assert [(r.host, r.status) for r in hub.file_gets("model.safetensors")] == [
        ("hub", 302), ("cdn", 200), ("hub", 302), ("cdn", 200)]


def test_sign_range_binds_the_redirected_range(hub: HubServer, tmp_path: Path) -> None:
    hub.xet_bridge.sign_range = True
    loc = resolve(hub, {"Range": "bytes=10-"})["location"]
    status, h, body = request(loc, headers={"Range": "bytes=10-"})
    assert status == 206 and body == WEIGHTS[10:]
    assert h["content-range"] == f"bytes 10-{len(WEIGHTS) - 1}/{len(WEIGHTS)}"
    for other in ({"Range": "bytes=20-"}, {}):
        status, h, body = request(loc, headers=other)
        assert status == 403 and b"Auth failed: invalid range" in body
    # a location minted without a Range serves whole-file GETs only
    loc = resolve(hub)["location"]
    assert request(loc)[0] == 200 and request(loc, headers={"Range": "bytes=0-"})[0] == 403
    # huggingface_hub resumes a cut transfer through the resolve URL: a fresh 302 signed for its Range
    hub.faults.add(cut_after=1000, path_suffix="model.safetensors", host="cdn", times=1)
    path = hf_hub_download(REPO, "model.safetensors", endpoint=hub.endpoint, cache_dir=tmp_path / "c", token=False)
    assert Path(path).read_bytes() == WEIGHTS
    # a client that reuses the first signed URL for its resume is refused
    hub.clear()
    hub.faults.add(cut_after=1000, path_suffix="model.safetensors", host="cdn", times=1)
    loc = resolve(hub)["location"]
    status, _, body = request(loc)
    assert status == 200 and len(body) == 1000
    assert request(loc, headers={"Range": "bytes=1000-"})[0] == 403


def test_expire_after_counts_uses(hub: HubServer) -> None:
    hub.xet_bridge.expire_after = 2
    loc = resolve(hub)["location"]
    assert request(loc)[0] == 200
    assert request(loc, headers={"Range": "bytes=5-"})[0] == 206
    status, _, body = request(loc)
    assert status == 403 and b"Request has expired" in body
    assert request(resolve(hub)["location"])[0] == 200  # a fresh 302, a fresh signature
    # a signature for another file, or a forged one, is refused
    other = resolve(hub)["location"].replace("X-Amz-Signature=", "X-Amz-Signature=0")
    assert request(other)[0] == 403


@pytest.mark.parametrize("code", [416, 403])
def test_refuse_ranges(hub: HubServer, tmp_path: Path, code: int) -> None:
    hub.xet_bridge.refuse_ranges = code
    loc = resolve(hub)["location"]
    assert request(loc, headers={"Range": "bytes=0-99"})[0] == code
    status, _, body = request(loc)
    assert status == 200 and body == WEIGHTS
    # huggingface_hub without a cut never sends a Range: it downloads fine
    path = hf_hub_download(REPO, "model.safetensors", endpoint=hub.endpoint, cache_dir=tmp_path / "c", token=False)
    assert Path(path).read_bytes() == WEIGHTS


def test_redirect_followed_by_hand(hub: HubServer) -> None:
    """What a client that follows the hub's 302 itself sees (as our HttpPool does)."""
    url = f"{hub.endpoint}/{REPO}/resolve/main/model.safetensors"
    h = resolve(hub, {"Range": "bytes=100-199"})
    status, cdn, body = request(urljoin(url, h["location"]), headers={"Range": "bytes=100-199"})
    assert status == 206 and body == WEIGHTS[100:200] and cdn["etag"].strip('"') != SHA
