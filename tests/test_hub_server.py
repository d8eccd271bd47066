"""The Hub emulator (tests/hub_server.py) against the real huggingface_hub client and plain HTTP."""

from __future__ import annotations

import hashlib
import http.client
import json
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import huggingface_hub
import pytest
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from checkpoints import (
    big_vit_repo_dir,
    convnext_repo_files,
    convnext_tensors,
    read_safetensors_header,
    safetensors_bytes,
    shard_files,
    vit_repo_files,
    vit_tensors,
    write_safetensors,
)
from conftest import cli_env, point_hub_client
from hub_server import Fault, HubServer

REPO = "facebook/dinov3-test"
GRANTED, NOTGRANTED = "hf_valid_granted", "hf_valid_notgranted"
BLOB = bytes(range(256)) * 1024  # 256 KiB, served as an LFS file straight from the hub


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    with HubServer() as server:
        point_hub_client(monkeypatch, server.endpoint)  # the rest of the sandbox: conftest.isolated
        server.add_repo(REPO, vit_repo_files())
        server.add_repo("facebook/direct", {"blob.bin": BLOB, "a.txt": b"hello"}, lfs_redirect=False)
        yield server


def dl(hub: HubServer, tmp_path: Path, filename: str, repo: str = REPO, **kw: Any) -> bytes:
    kw.setdefault("token", False)
    path = hf_hub_download(repo, filename, endpoint=hub.endpoint, cache_dir=tmp_path / "cache", **kw)
    return Path(path).read_bytes()


def get(url: str, headers: dict[str, str] | None = None, redirects: int = 3) -> http.client.HTTPResponse:
    """A plain GET with http.client that follows redirects; the caller reads the body."""
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.request("GET", u.path + (f"?{u.query}" if u.query else ""), headers=headers or {})
    resp = conn.getresponse()
    if resp.status in (301, 302, 307) and redirects:
        resp.read()
        return get(resp.headers["Location"], headers, redirects - 1)
    return resp


def blob_url(hub: HubServer) -> str:
    return f"{hub.endpoint}/facebook/direct/resolve/main/blob.bin"


# ---------- checkpoints.py ----------

def check_safetensors(data: bytes) -> dict[str, Any]:
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    assert n % 8 == 0 and header["__metadata__"]["format"] == "pt"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    assert 8 + n + max(ends) == len(data)
    return header


def tensor_bytes(data: bytes, name: str) -> bytes:
    n, header = read_safetensors_header(data)
    b, e = header[name]["data_offsets"]
    return data[8 + n + b : 8 + n + e]


def test_checkpoints_are_valid_safetensors(tmp_path: Path) -> None:
    assert len(vit_tensors()) == 41  # 5 embeddings + 2 final norm + 17 per layer
    assert len(vit_tensors(hidden=384, intermediate=1536, layers=12)) == 211  # S, B
    assert len(vit_tensors(layers=12, gated_mlp=True)) == 235  # S+
    assert len(vit_tensors(layers=24)) == 415  # L
    assert len(vit_tensors(layers=32, gated_mlp=True)) == 615  # H+
    assert len(vit_tensors(layers=40, gated_mlp=True, qv_bias=False)) == 687  # 7B
    files = vit_repo_files()
    header = check_safetensors(files["model.safetensors"])
    assert header["embeddings.patch_embeddings.weight"]["shape"] == [32, 3, 16, 16]
    assert json.loads(files["config.json"])["model_type"] == "dinov3_vit"
    assert files["model.safetensors"] == vit_repo_files()["model.safetensors"]  # deterministic
    assert files["model.safetensors"] != vit_repo_files(seed=1)["model.safetensors"]
    check_safetensors(convnext_repo_files()["model.safetensors"])
    assert "stages.3.layers.0.gamma" in convnext_tensors()
    check_safetensors(safetensors_bytes({"x": ("BF16", (3,))}, metadata={"k": "v"}))
    # shards hold the same tensor bytes and the index names every tensor
    sharded = shard_files(files, 3)
    assert "model.safetensors" not in sharded
    index = json.loads(sharded["model.safetensors.index.json"])
    assert set(index["weight_map"]) == set(vit_tensors())
    shards = [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    assert sorted(set(index["weight_map"].values())) == shards
    total = 0
    for k in (1, 2, 3):
        h = check_safetensors(sharded[f"model-0000{k}-of-00003.safetensors"])
        total += max(v["data_offsets"][1] for n, v in h.items() if n != "__metadata__")
    assert total == index["metadata"]["total_size"]
    # on disk: streamed, deterministic per tensor whatever the sharding
    one = big_vit_repo_dir(tmp_path / "one", hidden=64, intermediate=128, layers=2)
    two = big_vit_repo_dir(tmp_path / "two", hidden=64, intermediate=128, layers=2, n_shards=2)
    data = (one / "model.safetensors").read_bytes()
    check_safetensors(data)
    shard = (two / "model-00002-of-00002.safetensors").read_bytes()
    name = next(n for n in check_safetensors(shard) if n != "__metadata__")
    assert tensor_bytes(shard, name) == tensor_bytes(data, name)
    write_safetensors(tmp_path / "s.safetensors", vit_tensors())
    check_safetensors((tmp_path / "s.safetensors").read_bytes())


# ---------- serve.py: the emulator run by hand ----------

def test_serve_py_prints_the_export_line_and_its_repos_and_serves_them(tmp_path: Path, run_cli: Any) -> None:
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("serve.py"))], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=cli_env())
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        while not any("Ctrl-C" in ln for ln in lines):  # what it prints before it serves, the way to stop it last
            line = proc.stdout.readline()
            assert line, f"serve.py ended before saying how to stop it: {lines} {proc.communicate()}"
            lines.append(line)
        text = "".join(lines)
        for name in ("tiny-org/dinov3-vit-tiny", "tiny-org/dinov3-vit-gated", "tiny-org/dinov3-convnext-sharded",
                     GRANTED):
            assert name in text, text
        export = next(ln for ln in lines if ln.startswith("export HF_ENDPOINT=http://127.0.0.1:"))
        r = run_cli("--dino-root", str(tmp_path / "d"), "--model", "tiny-org/dinov3-vit-gated",
                    HF_ENDPOINT=export.strip().split("=", 1)[1], HF_TOKEN=GRANTED)
        assert r.returncode == 0, r.stderr
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate()
    assert proc.returncode == 0


# ---------- the real client ----------

def test_model_info_and_tree(hub: HubServer) -> None:
    api = HfApi(endpoint=hub.endpoint, token=False)
    info = api.model_info(REPO, files_metadata=True)
    assert info.sha is not None and len(info.sha) == 40 and info.gated is False
    sib = {s.rfilename: s for s in info.siblings or []}
    data = vit_repo_files()["model.safetensors"]
    lfs = sib["model.safetensors"].lfs
    assert lfs is not None and lfs.sha256 == hashlib.sha256(data).hexdigest() and lfs.size == len(data)
    assert sib["config.json"].lfs is None and sib["config.json"].size == len(vit_repo_files()["config.json"])
    files = {f.path: f for f in api.list_repo_tree(REPO, recursive=True)}
    assert set(files) == set(vit_repo_files())
    # pagination (50 per page) and folders
    many = {f"sub/f{i:03d}.txt": b"x%d" % i for i in range(120)} | {"top.txt": b"t"}
    hub.add_repo("o/many", many)
    entries = list(api.list_repo_tree("o/many", recursive=True))
    assert {e.path for e in entries} == set(many) | {"sub"}
    assert sum("cursor=" in r.path for r in hub.requests) == 2
    assert {e.path for e in api.list_repo_tree("o/many")} == {"sub", "top.txt"}
    infos = api.get_paths_info(REPO, ["model.safetensors", "nope", "config.json"])
    assert sorted(i.path for i in infos) == ["config.json", "model.safetensors"]


def test_download_matches_source_and_cdn_never_sees_token(hub: HubServer, tmp_path: Path) -> None:
    src = vit_repo_files()
    assert dl(hub, tmp_path, "config.json", token=GRANTED) == src["config.json"]
    assert dl(hub, tmp_path, "model.safetensors", token=GRANTED) == src["model.safetensors"]
    # the client HEADs the hub (302, not followed), then GETs the CDN URL from Location without the token
    head = [r for r in hub.requests if r.method == "HEAD" and r.path.endswith("model.safetensors")]
    assert head and head[0].status == 302 and head[0].host == "hub"
    assert head[0].headers["authorization"] == f"Bearer {GRANTED}"
    cdn_gets = [r for r in hub.file_gets("model.safetensors") if r.host == "cdn"]
    assert cdn_gets and all("authorization" not in r.headers for r in cdn_gets)
    assert hub.bytes_served("model.safetensors") == len(src["model.safetensors"])
    # a plain downloader following the redirect: hub GET 302 -> CDN 200
    hub.clear()
    assert get(f"{hub.endpoint}/{REPO}/resolve/main/model.safetensors").read() == src["model.safetensors"]
    assert [(r.host, r.status) for r in hub.file_gets()] == [("hub", 302), ("cdn", 200)]


def test_commits_tags_and_files_from_disk(hub: HubServer, tmp_path: Path) -> None:
    first = hub.add_repo("o/r", {"config.json": b"v1", "model.safetensors": b"w1"})
    hub.add_tag("o/r", "v1.0", first)
    disk = tmp_path / "w2.safetensors"
    disk.write_bytes(b"w2" * 100_000)
    second = hub.add_commit("o/r", {"model.safetensors": disk})
    assert first != second
    assert dl(hub, tmp_path, "model.safetensors", "o/r") == disk.read_bytes()
    assert dl(hub, tmp_path, "config.json", "o/r") == b"v1"  # kept from the parent commit
    assert dl(hub, tmp_path, "model.safetensors", "o/r", revision=first) == b"w1"
    assert dl(hub, tmp_path, "model.safetensors", "o/r", revision="v1.0") == b"w1"
    assert HfApi(endpoint=hub.endpoint).model_info("o/r").sha == second


def test_gated_repo(hub: HubServer, tmp_path: Path) -> None:
    hub.add_repo("facebook/gated", vit_repo_files(), gated=True)
    hub.grant("facebook/gated", GRANTED)
    assert HfApi(endpoint=hub.endpoint, token=False).model_info("facebook/gated").gated == "manual"
    with pytest.raises(GatedRepoError) as e:
        dl(hub, tmp_path, "config.json", "facebook/gated")
    assert e.value.response is not None and e.value.response.status_code == 401
    with pytest.raises(GatedRepoError) as e:
        dl(hub, tmp_path, "config.json", "facebook/gated", token=NOTGRANTED)
    assert e.value.response is not None and e.value.response.status_code == 403
    assert dl(hub, tmp_path, "model.safetensors", "facebook/gated", token=GRANTED) == \
        vit_repo_files()["model.safetensors"]


def test_missing_things_and_bad_token(hub: HubServer, tmp_path: Path) -> None:
    api = HfApi(endpoint=hub.endpoint, token=False)
    with pytest.raises(RepositoryNotFoundError) as e:
        api.model_info("facebook/nope")
    assert e.value.response is not None and e.value.response.status_code == 401
    with pytest.raises(RepositoryNotFoundError) as e:
        dl(hub, tmp_path, "config.json", "facebook/nope", token=GRANTED)
    assert e.value.response is not None and e.value.response.status_code == 404
    hub.add_repo("o/private", {"a.txt": b"a"}, private=True)
    with pytest.raises(RepositoryNotFoundError):
        dl(hub, tmp_path, "a.txt", "o/private", token=NOTGRANTED)
    hub.grant("o/private", GRANTED)
    assert dl(hub, tmp_path, "a.txt", "o/private", token=GRANTED) == b"a"
    with pytest.raises(RevisionNotFoundError):
        dl(hub, tmp_path, "config.json", revision="nobranch")
    with pytest.raises(RevisionNotFoundError):
        api.model_info(REPO, revision="nobranch")
    with pytest.raises(RemoteEntryNotFoundError):
        dl(hub, tmp_path, "missing.json")
    with pytest.raises(HfHubHTTPError) as e:
        HfApi(endpoint=hub.endpoint, token="hf_bogus").model_info(REPO)
    assert e.value.response is not None and e.value.response.status_code == 401
    assert e.value.response.headers["x-error-message"] == "Invalid credentials in Authorization header"
    assert "x-error-code" not in e.value.response.headers


# ---------- plain HTTP ----------

def test_range_requests(hub: HubServer) -> None:
    req = urllib.request.Request(blob_url(hub), headers={"Range": "bytes=1000-1999"})
    with urllib.request.urlopen(req) as r:
        assert r.status == 206 and r.headers["Content-Range"] == f"bytes 1000-1999/{len(BLOB)}"
        assert r.read() == BLOB[1000:2000]
    data = vit_repo_files()["model.safetensors"]
    url = f"{hub.endpoint}/{REPO}/resolve/main/model.safetensors"  # via the CDN
    with urllib.request.urlopen(urllib.request.Request(url, headers={"Range": "bytes=100-"})) as r:
        assert r.status == 206 and r.read() == data[100:]
        assert r.headers["ETag"] == f'"{hashlib.sha256(data).hexdigest()}"'
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(urllib.request.Request(url, headers={"Range": f"bytes={len(data)}-"}))
    assert e.value.code == 416


def test_concurrent_clients(hub: HubServer) -> None:
    def fetch(i: int) -> bytes:
        req = urllib.request.Request(blob_url(hub), headers={"Range": f"bytes={i}-"})
        with urllib.request.urlopen(req) as r:
            return bytes(r.read())

    with ThreadPoolExecutor(16) as pool:
        assert list(pool.map(fetch, range(32))) == [BLOB[i:] for i in range(32)]


def test_fault_cut_after_then_recovers(hub: HubServer) -> None:
    hub.faults.add(Fault(cut_after=1000, path_suffix="blob.bin", times=1))
    r = get(blob_url(hub))
    assert r.headers["Content-Length"] == str(len(BLOB))
    with pytest.raises(http.client.IncompleteRead) as e:
        r.read()
    assert len(e.value.partial) == 1000
    assert get(blob_url(hub)).read() == BLOB  # times=1: spent
    assert [r.body_bytes for r in hub.file_gets("blob.bin")] == [1000, len(BLOB)]


def test_fault_reset(hub: HubServer) -> None:
    hub.faults.add(reset=True, cut_after=0, path_suffix="blob.bin")
    u = urlsplit(blob_url(hub))
    s = socket.create_connection((u.hostname, u.port))
    s.sendall(f"GET {u.path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    with pytest.raises(ConnectionResetError):
        while s.recv(65536):
            pass
    s.close()


def test_fault_on_cdn_only(hub: HubServer) -> None:
    hub.faults.add(cut_after=10, host="cdn", path_suffix="model.safetensors")
    r = get(f"{hub.endpoint}/{REPO}/resolve/main/model.safetensors")
    with pytest.raises(http.client.IncompleteRead):
        r.read()
    assert get(blob_url(hub)).read() == BLOB


def test_fault_ignore_range(hub: HubServer) -> None:
    hub.faults.add(ignore_range=True)
    r = get(blob_url(hub), {"Range": "bytes=10-"})
    assert r.status == 200 and r.getheader("Content-Range") is None and r.read() == BLOB


def test_fault_corrupt_at(hub: HubServer) -> None:
    hub.faults.add(corrupt_at=5000)
    r = get(blob_url(hub), {"Range": "bytes=4096-"})
    body = r.read()
    assert len(body) == len(BLOB) - 4096 and body != BLOB[4096:]
    assert body[904] == BLOB[5000] ^ 0xFF and body[:904] + body[905:] == BLOB[4096:5000] + BLOB[5001:]


def test_fault_stall(hub: HubServer) -> None:
    hub.faults.add(stall_after=100, stall_seconds=0.5)
    t = time.monotonic()
    r = get(blob_url(hub))
    assert r.read(100) == BLOB[:100] and r.read() == BLOB[100:]
    assert time.monotonic() - t >= 0.49  # the body took the stall, at least


def test_fault_pause_at_holds_the_body_until_resumed(hub: HubServer) -> None:
    hub.faults.add(pause_at=6000, stall_after=0, stall_seconds=0.01)  # a pause and a stall at the start
    r = get(blob_url(hub), {"Range": "bytes=4096-"})
    assert r.read(1904) == BLOB[4096:6000]  # up to the pause offset (absolute in the file)
    assert hub.paused.wait(5) and hub.bytes_served() == 1904
    hub.resume.set()
    assert r.read() == BLOB[6000:] and hub.bytes_served() == len(BLOB) - 4096


def test_fault_status(hub: HubServer, tmp_path: Path) -> None:
    hub.faults.add(status=503, retry_after="7", times=1)
    r = get(blob_url(hub))
    assert r.status == 503 and r.headers["Retry-After"] == "7" and r.headers["X-Error-Message"]
    assert json.loads(r.read())["error"]
    assert get(blob_url(hub)).status == 200
    hub.faults.add(status=500, path_suffix="model.safetensors", times=1)  # hits the hub's redirecting GET
    assert get(f"{hub.endpoint}/{REPO}/resolve/main/model.safetensors").status == 500


def test_fault_no_content_length_and_chunked(hub: HubServer) -> None:
    hub.faults.add(no_content_length=True, times=1)
    r = get(blob_url(hub))
    assert r.getheader("Content-Length") is None and r.read() == BLOB
    hub.faults.add(chunked=True, times=1)
    r = get(blob_url(hub))
    assert r.getheader("Transfer-Encoding") == "chunked" and r.read() == BLOB
    assert hub.bytes_served("blob.bin") == 2 * len(BLOB)


def test_fault_throttle(hub: HubServer) -> None:
    hub.faults.add(throttle_bps=len(BLOB) * 2)  # ~0.5 s for the whole blob
    t = time.monotonic()
    assert get(blob_url(hub)).read() == BLOB
    assert time.monotonic() - t >= 0.49  # no faster than the rate allows


def test_client_retries_through_a_cut(hub: HubServer, tmp_path: Path) -> None:
    hub.faults.add(cut_after=50_000, path_suffix="model.safetensors", times=1)
    assert dl(hub, tmp_path, "model.safetensors") == vit_repo_files()["model.safetensors"]
    cdn = [r for r in hub.file_gets("model.safetensors") if r.host == "cdn"]
    # it resumes from what it flushed (10 MiB blocks): nothing here, so the retry asks from byte 0
    assert len(cdn) == 2 and cdn[0].body_bytes == 50_000 and cdn[1].range in (None, "bytes=0-")
    assert huggingface_hub.__version__.startswith("2.4")
