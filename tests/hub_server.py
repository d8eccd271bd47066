"""A local Hugging Face Hub emulator for tests (stdlib only), good enough for huggingface_hub 2.4.

Two ThreadingHTTPServers (HTTP/1.1, keep-alive, daemon threads): the hub on 127.0.0.1 and a "CDN" on
127.0.0.2 that serves LFS bytes after the hub's 302 (``{cdn}/lfs/{sha256}/{filename}?X-Amz-...``, so a
path suffix like ``"model.safetensors"`` matches file GETs on both hosts). See HUB_PROTOCOL.md.

    with HubServer() as hub:
        sha = hub.add_repo("facebook/x", {"config.json": b"{}", "model.safetensors": Path(...)}, gated=True)
        hub.grant("facebook/x", "hf_valid_granted")
        hub.faults.add(cut_after=1000, path_suffix="model.safetensors", times=1)

Routes: ``GET /api/agent-harnesses``, ``GET /api/whoami-v2``, ``GET /api/models/{id}[/revision/{rev}]``
(``?blobs=true``), ``GET /api/models/{id}/tree/{rev}[/{dir}]`` (``recursive``, ``cursor``, 50 per page,
``Link: rel="next"``), ``POST /api/models/{id}/paths-info/{rev}``, ``HEAD|GET /{id}/resolve/{rev}/{file}``,
``HEAD|GET /lfs/...`` on the CDN. Repo ids must be ``namespace/name``. model_info also answers HEAD, and
``/datasets/Salesforce/wikitext/resolve/main/.gitattributes`` answers 200: olah probes both.

Faults: ``server.faults`` holds a list of ``Fault`` rules; ``faults.add(Fault(...))`` or
``faults.add(**knobs)`` appends one (and returns it), ``faults.clear()`` removes all. A rule applies to
file GETs (never HEAD) whose URL path (without query) ends with ``path_suffix`` (None: all), on ``host``
"hub"/"cdn" (None: both), for its first ``times`` uses (None: forever). Body knobs only apply to answers
that carry file bytes (not to the hub's 302); a ``status`` rule applies to the first matching GET, the
redirecting hub GET included. All matching rules are consumed and merged (first set value wins).
Knobs: ``cut_after`` (body bytes, then clean close; with ``reset``: TCP RST), ``ignore_range``,
``corrupt_at`` (absolute file offset, byte XOR 0xFF), ``stall_after`` + ``stall_seconds`` (sleep once,
then continue), ``status`` + ``retry_after``, ``no_content_length`` (Connection: close), ``chunked``,
``throttle_bps`` (per connection), ``pause_at`` (absolute file offset: the body stops there, sets
``hub.paused`` and waits for ``hub.resume``, which nothing sets but the test).
``after=N`` lets the first N matching GETs pass before a rule applies
(to sequence faults: a cut, then 503s). ``head=True`` makes a ``status`` rule answer the hub's HEAD of an LFS
file's resolve instead (and only that). Each ``Request`` records its arrival time ``t`` (monotonic).
``hub.model_info_hook`` (a callable) runs before each model_info answer is built: to hold the answer back,
or to move a branch while a client waits for it. If it returns ``(status, headers)`` that error is answered
instead, and ``"reset"`` closes the connection with a TCP RST (a metadata request that fails).
``hub.gate`` (a threading.Event, set by default): clear it and every file body stops before its next chunk (the
chunk is counted only once it passes), to freeze what the server has sent at a known count.
``hub.redirect_location`` (a callable, None by default) rewrites the Location of the hub's 302 to the CDN
(a redirect to another scheme, a malformed URL).
A mirror: ``hub.drop_blobs`` makes model_info ignore ``?blobs=true`` (as olah does), ``hub.tree_loop`` makes every
tree page's ``Link: rel="next"`` point at itself; ``hub.tree_pages`` (a callable) answers each tree page as a broken
mirror would (empty pages, cursors that repeat, pages without end, a next page on another host).
A hostile Hub: ``hub.listed_sizes["repo/file"] = n`` makes model_info claim size n for that file; file
names (``../x``, ``/abs``, ``a\\b``) and file contents (index.json, safetensors headers) are whatever
``add_repo`` is given.

The Xet bridge (HUB_PROTOCOL.md, "The Xet bridge"): ``HubServer(xet=True)`` (every repo) or
``add_repo(..., xet=True)`` makes ``resolve`` of an LFS file answer 302 with ``X-Repo-Commit``,
``X-Linked-Etag`` (sha256), ``X-Linked-Size``, ``X-Xet-Hash`` (64 hex, not the sha256), a ``Link`` with
rel="xet-auth" and rel="xet-reconstruction-info", and ``Location: {cdn}/xet-bridge-us/{id}/{xethash}?X-Amz-...``
carrying a fresh signature per 302. The CDN answers with ``ETag: "{xethash}"`` and none of X-Repo-Commit /
X-Linked-*. Knobs on ``hub.xet_bridge`` (counts, not clocks): ``sign_range`` (a signature binds the Range header
of the request that was redirected: another Range gets 403 "Auth failed: invalid range"), ``expire_after=N`` (a
signature is refused with 403 "Request has expired" from its N+1-th use on), ``refuse_ranges=416|403`` (any
ranged request is refused). Faults' ``path_suffix`` also matches the repo file a bridge URL serves, so
``path_suffix="model.safetensors"`` still hits it; ``Request.file`` names that file.

TLS: ``HubServer(tls=ctx)`` serves hub and CDN over https with a server-side ``ssl.SSLContext`` (see
``tls_context`` below and the ``tls_hub`` fixture in conftest.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import socket
import ssl
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlencode

LFS_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt", ".h5", ".onnx", ".msgpack")
MIB = 1 << 20
_HASH_CACHE: dict[tuple[str, int, int], str] = {}


@dataclass
class Request:
    method: str
    host: str  # "hub" or "cdn"
    path: str  # URL path incl. query
    headers: dict[str, str]  # lower-cased names
    status: int = 0
    range: str | None = None
    body_bytes: int = 0
    file: str | None = None  # the repo file a Xet-bridge CDN URL serves (its URL path ends in the Xet hash)
    t: float = field(default_factory=time.monotonic)  # when the request arrived (monotonic clock)
    done: float | None = None  # when its answer ended (its body sent, cut or failed; or before any body)
    peer: int = 0  # the client's port: requests with the same peer came on the same connection


@dataclass
class Fault:
    path_suffix: str | None = None
    times: int | None = None
    host: str | None = None
    after: int = 0  # let this many matching GETs pass untouched before the rule applies
    head: bool = False  # a status rule for the hub's HEAD of a resolve (its GETs untouched)
    cut_after: int | None = None
    reset: bool = False
    ignore_range: bool = False
    corrupt_at: int | None = None
    stall_after: int | None = None
    stall_seconds: float = 0.0
    status: int | None = None
    retry_after: str | None = None
    no_content_length: bool = False
    chunked: bool = False
    throttle_bps: int | None = None
    pause_at: int | None = None


_KNOBS = [f.name for f in dataclasses.fields(Fault) if f.name not in ("path_suffix", "times", "host", "after", "head")]
_DEFAULT = {k: getattr(Fault(), k) for k in _KNOBS}


class Faults:
    def __init__(self) -> None:
        self.rules: list[Fault] = []
        self._lock = threading.Lock()

    def add(self, fault: Fault | None = None, **knobs: Any) -> Fault:
        rule = fault if fault is not None else Fault(**knobs)
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()

    def take(self, host: str, path: str, body: bool, alias: str | None = None, head: bool = False) -> Fault:
        """Consume the rules matching this GET (or, with ``head``, this resolve's HEAD: rules made with ``head``
        only) by its URL path, or ``alias``, and return them merged."""
        merged = Fault()
        with self._lock:
            for r in self.rules:
                if (r.times is not None and r.times <= 0) or (r.host not in (None, host)) or r.head != head:
                    continue
                if r.path_suffix and not (path.endswith(r.path_suffix)
                                          or (alias is not None and alias.endswith(r.path_suffix))):
                    continue
                if not body and r.status is None:
                    continue
                if r.after > 0:
                    r.after -= 1
                    continue
                if r.times is not None:
                    r.times -= 1
                for k in _KNOBS:
                    if getattr(merged, k) == _DEFAULT[k] and getattr(r, k) != _DEFAULT[k]:
                        setattr(merged, k, getattr(r, k))
        return merged


@dataclass
class XetBridge:
    """How the Xet bridge's signed URLs behave (``hub.xet_bridge``); deterministic: counts, not clocks."""

    sign_range: bool = False  # a signature is valid only for the Range header of the request that was redirected
    expire_after: int | None = None  # a signature is refused (403, as if expired) after this many uses
    refuse_ranges: int | None = None  # 416 or 403: the bridge refuses every request that carries a Range


@dataclass
class _Signed:
    xet_hash: str
    path: str  # the repo file it serves
    range: str | None  # the Range of the request it answered
    uses: int = 0


def xet_hash(sha256: str) -> str:
    """The emulator's Xet hash of a file: 64 hex, deterministic, never its sha256."""
    return hashlib.sha256(b"xet-merkle:" + bytes.fromhex(sha256)).hexdigest()


def tls_context(cert_pem: str | Path, key_pem: str | Path) -> ssl.SSLContext:
    """A server-side SSL context from a certificate chain and key (PEM files)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert_pem), str(key_pem))
    return ctx


@dataclass
class _Blob:
    size: int
    sha256: str
    oid: str  # git blob sha1 (of the pointer text for LFS files)
    lfs: bool
    pointer_size: int = 0
    data: bytes | None = None
    disk: Path | None = None

    def chunks(self, start: int, end: int, step: int) -> Iterator[bytes | memoryview]:
        if self.data is not None:
            view = memoryview(self.data)
            for pos in range(start, end, step):
                yield view[pos : min(end, pos + step)]
            return
        assert self.disk is not None
        with open(self.disk, "rb") as f:
            f.seek(start)
            pos = start
            while pos < end:
                chunk = f.read(min(step, end - pos))
                if not chunk:
                    raise OSError(f"{self.disk} shrank")
                pos += len(chunk)
                yield chunk


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _make_blob(name: str, content: bytes | Path) -> _Blob:
    lfs = name.endswith(LFS_SUFFIXES)
    if isinstance(content, Path):
        st = content.stat()
        key = (str(content.resolve()), st.st_size, st.st_mtime_ns)
        if key not in _HASH_CACHE:
            h = hashlib.sha256()
            with open(content, "rb") as f:
                while block := f.read(8 * MIB):
                    h.update(block)
            _HASH_CACHE[key] = h.hexdigest()
        size, sha = st.st_size, _HASH_CACHE[key]
        data, disk = (None, content) if lfs else (content.read_bytes(), None)
    else:
        size, sha, data, disk = len(content), hashlib.sha256(content).hexdigest(), content, None
    if not lfs:
        assert data is not None
        return _Blob(size, sha, _git_oid(data), False, data=data)
    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {size}\n".encode()
    return _Blob(size, sha, _git_oid(pointer), True, len(pointer), data, disk)


@dataclass
class _Repo:
    repo_id: str
    gated: bool
    private: bool
    lfs_redirect: bool
    xet: bool = False
    commits: dict[str, dict[str, _Blob]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    granted: set[str] = field(default_factory=set)
    last_modified: str = "2025-08-14T00:00:00.000Z"


def _entry(path: str, b: _Blob) -> dict[str, Any]:
    e: dict[str, Any] = {"type": "file", "oid": b.oid, "size": b.size, "path": path}
    if b.lfs:
        e["lfs"] = {"oid": b.sha256, "size": b.size, "pointerSize": b.pointer_size}
    return e


def _dir_entry(path: str) -> dict[str, Any]:
    return {"type": "directory", "oid": hashlib.sha1(path.encode()).hexdigest(), "size": 0, "path": path}


def _parse_range(value: str | None, size: int) -> tuple[int, int] | str | None:
    """(start, end-exclusive), None to ignore the header, or "416"."""
    m = re.fullmatch(r"bytes=(\d*)-(\d*)", (value or "").strip())
    if not m or m[1] == m[2] == "":
        return None
    if m[1] == "":
        n = int(m[2])
        return (max(0, size - n), size) if n > 0 and size > 0 else "416"
    start = int(m[1])
    if m[2] and int(m[2]) < start:
        return None
    if start >= size:
        return "416"
    return start, min(size, int(m[2]) + 1) if m[2] else size


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 120
    # Headers and body go out in two writes; with Nagle on, each small file waits for a 40 ms delayed ACK
    # that real Hub and CDN servers do not charge.
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    # ---------- plumbing ----------
    def _begin(self) -> None:
        hdrs = {k.lower(): v for k, v in self.headers.items()}
        self.rec = Request(self.command, self.server.kind, self.path, hdrs, range=hdrs.get("range"),
                           peer=self.client_address[1])
        self.hub = self.server.hub
        with self.hub._lock:
            self.hub.requests.append(self.rec)
        self.url_path, _, query = self.path.partition("?")
        self.query = parse_qs(query)
        auth = hdrs.get("authorization", "")
        self.token: str | None = auth[7:].strip() if auth.lower().startswith("bearer ") else None
        if (n := int(hdrs.get("content-length") or 0)) > 0:
            self.body = self.rfile.read(n)
        else:
            self.body = b""

    def send_response(self, code: int, message: str | None = None) -> None:
        self.rec.status = code
        super().send_response(code, message)

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None,
              ctype: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, obj: Any, headers: dict[str, str] | None = None) -> None:
        self._send(200, json.dumps(obj).encode(), headers)

    def _error(self, status: int, code: str | None, message: str,
               headers: dict[str, str] | None = None) -> None:
        h = {"X-Error-Message": message, **(headers or {})}
        if code:
            h["X-Error-Code"] = code
        self._send(status, json.dumps({"error": message}).encode(), h)

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        self._begin()
        try:
            if self.server.kind == "cdn":
                self._cdn()
            else:
                self._hub()
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True
        finally:
            if self.rec.done is None:  # ended before its body (a client gone before the headers): ended all the same
                self.rec.done = time.monotonic()

    # ---------- hub ----------
    def _hub(self) -> None:
        if self.token is not None and self.token not in self.hub.valid_tokens:
            return self._error(401, None, "Invalid credentials in Authorization header")
        segs = [unquote(s) for s in self.url_path.split("/")[1:]]
        if segs[:2] == ["api", "agent-harnesses"]:
            return self._json({"standardEnvVars": [], "harnesses": {}})
        if segs[:2] == ["api", "whoami-v2"]:
            if self.token is None:
                return self._error(401, None, "Invalid username or password.")
            return self._json({"type": "user", "name": "test-user", "auth": {"type": "access_token",
                               "accessToken": {"displayName": "test", "role": "read"}}})
        if len(segs) >= 4 and segs[:2] == ["api", "models"]:
            repo_id, rest = f"{segs[2]}/{segs[3]}", segs[4:]
            if not rest and self.command in ("GET", "HEAD"):
                return self._model_info(repo_id, "main")
            if len(rest) == 2 and rest[0] == "revision" and self.command in ("GET", "HEAD"):
                return self._model_info(repo_id, rest[1])
            if len(rest) >= 2 and rest[0] == "tree" and self.command == "GET":
                return self._tree(repo_id, rest[1], "/".join(rest[2:]))
            if len(rest) == 2 and rest[0] == "paths-info" and self.command == "POST":
                return self._paths_info(repo_id, rest[1])
        if segs[:3] == ["datasets", "Salesforce", "wikitext"] and segs[-1] == ".gitattributes":
            # olah's "can I reach the Hub" probe (HEAD /datasets/Salesforce/wikitext/resolve/main/.gitattributes)
            return self._send(200, b"*.parquet filter=lfs diff=lfs merge=lfs -text\n", ctype="text/plain")
        if len(segs) >= 5 and segs[2] == "resolve" and self.command in ("GET", "HEAD"):
            return self._resolve(f"{segs[0]}/{segs[1]}", segs[3], "/".join(segs[4:]))
        self._error(404, "NotFound", f"Sorry, we can't find the page you are looking for: {self.url_path}")

    def _repo(self, repo_id: str, content: bool = False) -> _Repo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None or (repo.private and self.token not in repo.granted):
            msg = "Repository not found"
            self._error(401 if self.token is None else 404, "RepoNotFound", msg)
            return None
        if content and repo.gated and self.token not in repo.granted:
            if self.token is None:
                msg = f"Access to model {repo_id} is restricted. You must be authenticated to access it."
                self._error(401, "GatedRepo", msg)
            else:
                msg = f"Access to model {repo_id} is restricted and you are not in the authorized list."
                self._error(403, "GatedRepo", msg)
            return None
        return repo

    def _commit(self, repo: _Repo, rev: str) -> tuple[str, dict[str, _Blob]] | None:
        sha = repo.refs.get(rev) or (rev if rev in repo.commits else None)
        if sha is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return None
        return sha, repo.commits[sha]

    def _model_info(self, repo_id: str, rev: str) -> None:
        if self.hub.model_info_hook is not None:
            answer = self.hub.model_info_hook()
            if answer == "reset":
                self.close_connection = True
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
                return
            if isinstance(answer, tuple):
                status, headers = answer
                return self._error(status, None, f"Injected fault: HTTP {status}", headers)
        if (repo := self._repo(repo_id)) is None or (c := self._commit(repo, rev)) is None:
            return
        sha, files = c
        blobs = self.query.get("blobs", [""])[0].lower() == "true" and not self.hub.drop_blobs
        siblings = []
        for p, b in sorted(files.items()):
            s: dict[str, Any] = {"rfilename": p}
            if blobs:
                size = self.hub.listed_sizes.get(f"{repo_id}/{p}", b.size)  # a lying listing, if asked
                s.update(size=size, blobId=b.oid)
                if b.lfs:
                    s["lfs"] = {"sha256": b.sha256, "size": size, "pointerSize": b.pointer_size}
            siblings.append(s)
        self._json({
            "_id": hashlib.md5(repo_id.encode()).hexdigest()[:24], "id": repo_id, "modelId": repo_id,
            "author": repo_id.split("/")[0], "sha": sha, "lastModified": repo.last_modified,
            "createdAt": "2025-08-14T00:00:00.000Z", "private": repo.private,
            "gated": "manual" if repo.gated else False, "disabled": False, "downloads": 0, "likes": 0,
            "tags": ["transformers", "safetensors", "dinov3"], "library_name": "transformers",
            "pipeline_tag": "image-feature-extraction", "siblings": siblings,
        })

    @staticmethod
    def _listing(files: dict[str, _Blob], prefix: str, recursive: bool) -> list[dict[str, Any]] | None:
        base = prefix.strip("/") + "/" if prefix.strip("/") else ""
        out: dict[str, dict[str, Any]] = {}
        for p, b in files.items():
            if not p.startswith(base):
                continue
            parts = p[len(base) :].split("/")
            for i in range(1, len(parts) if recursive else min(2, len(parts))):
                d = base + "/".join(parts[:i])
                out[d] = _dir_entry(d)
            if recursive or len(parts) == 1:
                out[p] = _entry(p, b)
        if base and not out:
            return None
        return [out[k] for k in sorted(out)]

    def _tree(self, repo_id: str, rev: str, path: str) -> None:
        if (repo := self._repo(repo_id)) is None or (c := self._commit(repo, rev)) is None:
            return
        recursive = self.query.get("recursive", [""])[0].lower() in ("true", "1")
        entries = self._listing(c[1], path, recursive)
        if entries is None:
            return self._error(404, "EntryNotFound", f"{path} does not exist on {rev}")
        start = int(self.query.get("cursor", ["0"])[0])
        page = self.hub.page_size
        headers = {}
        if self.hub.tree_pages is not None:  # a broken mirror's pagination: the page and its next link it chooses
            shown, after = self.hub.tree_pages(start, entries[start : start + page])
            if after is not None:
                q = {k: v[0] for k, v in self.query.items()} | {"cursor": str(after)}
                link = after if isinstance(after, str) and "://" in after else \
                    f"{self.hub.endpoint}{self.url_path}?{urlencode(q)}"
                headers["Link"] = f'<{link}>; rel="next"'
            return self._json(shown, headers)
        if self.hub.tree_loop:  # a mirror whose next page is the page itself
            same = urlencode({k: v[0] for k, v in self.query.items()})
            headers["Link"] = f'<{self.hub.endpoint}{self.url_path}?{same}>; rel="next"'
        elif start + page < len(entries):
            q = {k: v[0] for k, v in self.query.items()} | {"cursor": str(start + page)}
            headers["Link"] = f'<{self.hub.endpoint}{self.url_path}?{urlencode(q)}>; rel="next"'
        self._json(entries[start : start + page], headers)

    def _paths_info(self, repo_id: str, rev: str) -> None:
        if (repo := self._repo(repo_id)) is None or (c := self._commit(repo, rev)) is None:
            return
        if self.headers.get("content-type", "").startswith("application/json"):
            paths = json.loads(self.body or b"{}").get("paths", [])
        else:
            paths = parse_qs(self.body.decode()).get("paths", [])
        files, out = c[1], []
        for p in paths:
            p = p.strip("/")
            if p in files:
                out.append(_entry(p, files[p]))
            elif any(f.startswith(p + "/") for f in files):
                out.append(_dir_entry(p))
        self._json(out)

    def _resolve(self, repo_id: str, rev: str, path: str) -> None:
        if (repo := self._repo(repo_id, content=True)) is None or (c := self._commit(repo, rev)) is None:
            return
        sha, files = c
        if (blob := files.get(path)) is None:
            msg = f'{path} does not exist on "{rev}"'
            return self._error(404, "EntryNotFound", msg, {"X-Repo-Commit": sha})
        if not (blob.lfs and repo.lfs_redirect):
            etag = blob.sha256 if blob.lfs else blob.oid
            return self._serve(blob, etag, {"X-Repo-Commit": sha})
        fault = self.hub.faults.take("hub", self.url_path, body=False, head=self.command == "HEAD")
        if fault.status is not None:
            return self._fault_status(fault)
        if repo.xet:
            return self._xet_redirect(repo, sha, path, blob)
        sig = hashlib.sha256(f"{blob.sha256}{path}".encode()).hexdigest()
        location = (f"{self.hub.cdn_endpoint}/lfs/{blob.sha256}/{quote(path)}"
                    f"?X-Amz-Expires=3600&X-Amz-Signature={sig}")
        if self.hub.redirect_location is not None:
            location = self.hub.redirect_location(location)
        self._send(302, b"", {"Location": location, "X-Linked-Etag": f'"{blob.sha256}"',
                              "X-Linked-Size": str(blob.size), "X-Repo-Commit": sha, "ETag": f'"{blob.oid}"'})

    def _xet_redirect(self, repo: _Repo, sha: str, path: str, blob: _Blob) -> None:
        """The Xet bridge's 302: metadata on the redirect only, a fresh signed URL per answer."""
        xh = xet_hash(blob.sha256)
        with self.hub._lock:
            self.hub._signed_count += 1
            n = self.hub._signed_count
            sig = hashlib.sha256(f"sig:{n}:{xh}:{self.rec.range}".encode()).hexdigest()
            self.hub.signatures[sig] = _Signed(xh, path, self.rec.range)
        self.hub.xet_blobs[xh] = blob
        repo_hex = hashlib.md5(repo.repo_id.encode()).hexdigest()[:24]
        query = urlencode({
            "X-Amz-Algorithm": "AWS4-HMAC-SHA256", "X-Amz-Content-Sha256": "UNSIGNED-PAYLOAD",
            "X-Amz-Credential": "cas/20251129/us-east-1/s3/aws4_request",
            "X-Amz-Date": f"20251129T{n // 3600 % 24:02d}{n // 60 % 60:02d}{n % 60:02d}Z",
            "X-Amz-Expires": "3600", "X-Amz-Signature": sig, "X-Amz-SignedHeaders": "host",
            "X-Xet-Cas-Uid": "public", "response-content-disposition": f'inline; filename="{path.rsplit("/", 1)[-1]}"',
            "x-id": "GetObject",
        })
        location = f"{self.hub.cdn_endpoint}/xet-bridge-us/{repo_hex}/{xh}?{query}"
        link = (f'<{self.hub.endpoint}/api/models/{repo.repo_id}/xet-read-token/{sha}>; rel="xet-auth", '
                f'<{self.hub.cdn_endpoint}/v1/reconstructions/{xh}>; rel="xet-reconstruction-info"')
        self._send(302, b"", {"Location": location, "X-Linked-Etag": f'"{blob.sha256}"',
                              "X-Linked-Size": str(blob.size), "X-Repo-Commit": sha, "ETag": f'"{blob.oid}"',
                              "X-Xet-Hash": xh, "Link": link}, ctype="text/plain; charset=utf-8")

    # ---------- cdn ----------
    def _cdn(self) -> None:
        segs = self.url_path.split("/")
        if len(segs) == 4 and segs[1] == "xet-bridge-us":
            return self._xet_bridge(segs[3])
        blob = self.hub.lfs_blobs.get(segs[2]) if len(segs) >= 3 and segs[1] == "lfs" else None
        if blob is None or self.command not in ("GET", "HEAD"):
            return self._error(404, "NotFound", "NoSuchKey: The specified key does not exist.")
        self._serve(blob, blob.sha256, {})

    def _xet_bridge(self, xh: str) -> None:
        blob = self.hub.xet_blobs.get(xh)
        if blob is None or self.command not in ("GET", "HEAD"):
            return self._error(404, None, "NoSuchKey: The specified key does not exist.")
        knobs = self.hub.xet_bridge
        sig = self.query.get("X-Amz-Signature", [""])[0]
        with self.hub._lock:
            signed = self.hub.signatures.get(sig)
            if signed is not None:
                signed.uses += 1
        if signed is None or signed.xet_hash != xh:
            return self._error(403, None, "Auth failed: invalid signature")
        self.rec.file = signed.path
        if knobs.expire_after is not None and signed.uses > knobs.expire_after:
            return self._error(403, None, "Request has expired")
        if knobs.sign_range and self.rec.range != signed.range:
            return self._error(403, None, "Auth failed: invalid range")
        if knobs.refuse_ranges is not None and self.rec.range is not None:
            if knobs.refuse_ranges == 416:
                return self._error(416, None, "Requested range not satisfiable",
                                   {"Content-Range": f"bytes */{blob.size}"})
            return self._error(knobs.refuse_ranges, None, "Auth failed: invalid range")
        self._serve(blob, xh, {}, alias=signed.path)

    # ---------- file bytes ----------
    def _fault_status(self, fault: Fault) -> None:
        assert fault.status is not None
        h = {"Retry-After": fault.retry_after} if fault.retry_after is not None else {}
        self._error(fault.status, None, f"Injected fault: HTTP {fault.status}", h)

    def _serve(self, blob: _Blob, etag: str, headers: dict[str, str], alias: str | None = None) -> None:
        head = self.command == "HEAD"
        fault = Fault() if head else self.hub.faults.take(self.server.kind, self.url_path, body=True, alias=alias)
        if fault.status is not None:
            return self._fault_status(fault)
        rng = None if fault.ignore_range or head else _parse_range(self.rec.range, blob.size)
        if rng == "416":
            return self._error(416, "RangeNotSatisfiable", "Requested range not satisfiable",
                               {"Content-Range": f"bytes */{blob.size}"})
        start, end = rng if isinstance(rng, tuple) else (0, blob.size)
        self.send_response(206 if rng else 200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{etag}"')
        for k, v in headers.items():
            self.send_header(k, v)
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{blob.size}")
        if fault.chunked and not head:
            self.send_header("Transfer-Encoding", "chunked")
        elif fault.no_content_length and not head:
            self.send_header("Connection", "close")
            self.close_connection = True
        else:
            self.send_header("Content-Length", str(end - start))
        self.end_headers()
        if not head:
            self._write_body(blob, start, end, fault)

    def _write_body(self, blob: _Blob, start: int, end: int, fault: Fault) -> None:
        try:
            self._write_body_(blob, start, end, fault)
        finally:
            self.rec.done = time.monotonic()

    def _write_body_(self, blob: _Blob, start: int, end: int, fault: Fault) -> None:
        limit = end if fault.cut_after is None else min(end, start + fault.cut_after)
        step = MIB if not fault.throttle_bps else max(1, min(MIB, fault.throttle_bps // 50))
        stall_at = None if fault.stall_after is None else start + fault.stall_after
        sent, t0, pos = 0, time.monotonic(), start
        cuts = sorted({c for c in (stall_at, fault.pause_at) if c is not None and start <= c < limit})
        pieces = list(zip([start, *cuts], [*cuts, limit], strict=True))
        for i, (a, b) in enumerate(pieces):
            if i and a == stall_at:
                time.sleep(fault.stall_seconds)
            if i and a == fault.pause_at:
                self.hub.paused.set()
                self.hub.resume.wait()
            for chunk in blob.chunks(a, b, step):
                self.hub.gate.wait()
                n = len(chunk)
                if fault.corrupt_at is not None and pos <= fault.corrupt_at < pos + n:
                    buf = bytearray(chunk)
                    buf[fault.corrupt_at - pos] ^= 0xFF
                    chunk = buf
                self.rec.body_bytes += n
                try:
                    if fault.chunked:
                        self.wfile.write(b"%x\r\n" % n)
                    self.wfile.write(chunk)
                    if fault.chunked:
                        self.wfile.write(b"\r\n")
                except OSError:
                    self.rec.body_bytes -= n
                    self.close_connection = True
                    return
                pos += n
                sent += n
                if fault.throttle_bps:
                    time.sleep(max(0.0, t0 + sent / fault.throttle_bps - time.monotonic()))
        if limit < end:  # cut
            self.close_connection = True
            if fault.reset:
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
        elif fault.chunked:
            self.wfile.write(b"0\r\n\r\n")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128
    allow_reuse_address = True

    def __init__(self, host: str, hub: HubServer, kind: str, tls: ssl.SSLContext | None = None) -> None:
        super().__init__((host, 0), _Handler)
        self.hub = hub
        self.kind = kind
        self.tls = tls

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = super().get_request()
        if self.tls is not None:  # the handshake runs in the handler's thread (finish_request), not here
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr

    def finish_request(self, request: Any, client_address: Any) -> None:
        if isinstance(request, ssl.SSLSocket):
            try:
                request.settimeout(30)
                request.do_handshake()
            except (OSError, ssl.SSLError):
                self.hub.tls_failures += 1
                return
        super().finish_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionResetError):
            return  # a client that exited with a kept-alive connection open: nothing to report
        super().handle_error(request, client_address)


class HubServer:
    def __init__(self, *, xet: bool = False, tls: ssl.SSLContext | None = None,
                 hosts: tuple[str, str] = ("127.0.0.1", "127.0.0.2")) -> None:
        """``hosts``: where the Hub and its CDN listen (the same address is fine: they differ by port)."""
        self._lock = threading.Lock()
        self.requests: list[Request] = []
        self.faults = Faults()
        self.repos: dict[str, _Repo] = {}
        self.lfs_blobs: dict[str, _Blob] = {}
        self.valid_tokens: set[str] = {"hf_valid_granted", "hf_valid_notgranted"}
        self.page_size = 50
        self.drop_blobs = False  # model_info ignores ?blobs=true (as olah does): no sizes, the tree API has them
        self.tree_loop = False  # the tree API's Link rel="next" points at the page it is on (a broken mirror)
        # A broken mirror's tree pagination: (cursor, the page's entries) -> (the entries it answers, the next
        # cursor, or an absolute URL, or None for the last page).
        self.tree_pages: Callable[[int, list[dict[str, Any]]],
                                  tuple[list[dict[str, Any]], int | str | None]] | None = None
        self.listed_sizes: dict[str, int] = {}  # "repo_id/path" -> size claimed by model_info (hostile Hub)
        self.model_info_hook: Callable[[], Any] | None = None  # runs before each model_info answer is built
        self.redirect_location: Callable[[str], str] | None = None  # rewrites the Location of LFS redirects
        self.gate = threading.Event()  # cleared: file bodies pause before their next chunk
        self.gate.set()
        self.paused = threading.Event()  # a body reached a fault's pause_at
        self.resume = threading.Event()  # set by the test: paused bodies go on
        self._counter = 0
        self.xet = xet  # the default of add_repo(xet=...)
        self.xet_bridge = XetBridge()
        self.xet_blobs: dict[str, _Blob] = {}
        self.signatures: dict[str, _Signed] = {}
        self._signed_count = 0
        self.tls_failures = 0  # TLS handshakes that failed (a client that did not trust the certificate)
        self._servers = [_Server(hosts[0], self, "hub", tls), _Server(hosts[1], self, "cdn", tls)]
        scheme = "https" if tls is not None else "http"
        self.endpoint = f"{scheme}://{hosts[0]}:{self._servers[0].server_address[1]}"
        self.cdn_endpoint = f"{scheme}://{hosts[1]}:{self._servers[1].server_address[1]}"
        for s in self._servers:
            threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.005}, daemon=True).start()

    def add_repo(self, repo_id: str, files: Mapping[str, bytes | Path], *, branch: str = "main",
                 gated: bool = False, private: bool = False, lfs_redirect: bool = True,
                 xet: bool | None = None) -> str:
        """Create (or replace) a repo whose branch head holds exactly ``files``; returns the commit sha.

        ``xet``: its LFS files go through the Xet bridge (None: the server's default)."""
        self.repos[repo_id] = _Repo(repo_id, gated, private, lfs_redirect, self.xet if xet is None else xet)
        return self._store(repo_id, {}, files, branch)

    def add_commit(self, repo_id: str, files: Mapping[str, bytes | Path | None], *,
                   branch: str = "main") -> str:
        """Commit on top of ``branch``: given files are added/replaced (None deletes), others kept."""
        repo = self.repos[repo_id]
        parent = repo.commits[repo.refs[branch]] if branch in repo.refs else {}
        return self._store(repo_id, parent, files, branch)

    def _store(self, repo_id: str, parent: dict[str, _Blob], files: Mapping[str, Any], branch: str) -> str:
        repo = self.repos[repo_id]
        tree = dict(parent)
        for name, content in files.items():
            if content is None:
                tree.pop(name, None)
                continue
            tree[name] = blob = _make_blob(name, content)
            if blob.lfs:
                self.lfs_blobs[blob.sha256] = blob
        self._counter += 1
        seed = f"{repo_id}\n{branch}\n{self._counter}\n"
        seed += "".join(f"{p}:{b.oid}\n" for p, b in sorted(tree.items()))
        sha = hashlib.sha1(seed.encode()).hexdigest()
        repo.commits[sha] = tree
        repo.refs[branch] = sha
        return sha

    def add_tag(self, repo_id: str, tag: str, commit: str) -> None:
        repo = self.repos[repo_id]
        repo.refs[tag] = repo.refs.get(commit, commit)

    def grant(self, repo_id: str, token: str) -> None:
        self.repos[repo_id].granted.add(token)

    def file_gets(self, path_suffix: str | None = None) -> list[Request]:
        with self._lock:
            reqs = list(self.requests)
        return [r for r in reqs if r.method == "GET" and (r.host == "cdn" or "/resolve/" in r.path)
                and (path_suffix is None or r.path.partition("?")[0].endswith(path_suffix)
                     or (r.file is not None and r.file.endswith(path_suffix)))]

    def ended_bodies(self, path_suffix: str | None = None) -> list[Request]:
        """The file GETs that sent a body (200/206), once each has ended (``done`` set): a client may read the last
        byte before the server's thread notes the end, so this waits for those notes, as long as it takes (a body
        that never ends is a hang, for pytest's timeout)."""
        while True:
            bodies = [r for r in self.file_gets(path_suffix) if r.status in (200, 206)]
            if all(r.done is not None for r in bodies):
                return bodies
            time.sleep(0.005)

    def bytes_served(self, path_suffix: str | None = None) -> int:
        return sum(r.body_bytes for r in self.file_gets(path_suffix))

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()

    def close(self) -> None:
        self.gate.set()  # a body the test held back ends with the server
        self.resume.set()
        for s in self._servers:
            s.shutdown()
            s.server_close()

    def __enter__(self) -> HubServer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
