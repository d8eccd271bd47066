"""A local ModelScope emulator for tests (stdlib only), good enough for modelscope_hub 0.5.1.

Two ThreadingHTTPServers (HTTP/1.1, keep-alive): the API on 127.0.0.1 and a "storage" host (the OSS/CDN that
LFS downloads are redirected to) on 127.0.0.3, which serves ``/lfs/{sha256}/{name}?Expires=..&Signature=..``,
as the real client (modelscope_hub 0.5.1) expects them (tests/test_modelscope_server.py checks it).

    with ModelScopeServer() as ms:
        ms.add_repo("facebook/x", {"config.json": b"{}", "model.safetensors": Path(...)}, private=True)
        ms.grant("facebook/x", "ms-valid-granted")
        ms.faults.add(cut_after=1000, path_suffix="model.safetensors", times=1)

Routes (all under ``/api/v1``): ``GET models/{o}/{n}/repo/files?Revision=&Recursive=[&Root=]`` (the listing,
envelope ``{Code, Data: {Files}, Message, RequestId, Success}``; an unknown revision answers 200 with
``Files: null``, as the real site does), ``GET|HEAD models/{o}/{n}/repo?Revision=&FilePath=`` (LFS: 302 to
storage; git-stored files answered directly, Range always ignored), ``GET models/{o}/{n}/revisions``,
``GET models/{o}/{n}`` (repo info), ``GET repos/internalAccelerationInfo``. Anything else: 404.

Auth: a token comes as ``Authorization: Bearer <t>`` or cookie ``m_session_id=<t>``; an unknown token counts as
anonymous (as on the real site). Private repos (``private=True``; ``gated=True`` is private + granted on request)
answer only tokens given to ``grant``: anonymous gets ``deny_status_anonymous`` (401), a token without access
``deny_status_token`` (403); ``hide_private=True`` answers 404 instead, like a missing repo.

Faults reuse hub_server's ``Fault``/``Faults`` (see its docstring), ``pause_at`` included (with ``ms.paused`` and
``ms.resume``), and ``ms.gate`` as ``hub.gate``. The key a rule's ``path_suffix`` is matched
against: the URL path for the listing (``.../repo/files``) and the storage host (``.../{name}``), and
``.../repo/{FilePath}`` for file GETs on the API host, so ``path_suffix="model.safetensors"`` matches the
file on both hosts. ``host`` is "api" or "storage". Status rules also apply to the listing (its key ends with
``repo/files``) and to the API's 302.
Quirks: ``range_as_200=True`` answers an honoured Range with 200 + Content-Range (as some ModelScope storage answers);
``linked_etag=True`` adds ``X-Linked-ETag: <sha256>`` to storage answers; ``label_whole_body=True`` labels a
whole-file 200 (a Range ignored) with ``Content-Range: bytes 0-(N-1)/N``.
Log: ``requests`` (``hub_server.Request`` with ``host`` "api"/"storage" and lower-cased headers),
``bytes_served(path_suffix, host)``, ``file_gets(...)``, ``listing_gets(repo_id)``.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.cookies import CookieError, SimpleCookie
from http.server import ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, quote, unquote

from hub_server import Fault, Faults, Request, _Blob, _Handler, _make_blob, _parse_range

__all__ = ["CODE_NOT_FOUND", "Fault", "Faults", "ModelScopeServer", "Request"]

CODE_NOT_FOUND = 10990101007  # file or revision missing on /repo (3rd party capture)
_EPOCH = 1754006400  # 2025-08-01, CommittedDate of the first commit


@dataclass
class _Commit:
    sha: str
    tree: dict[str, _Blob]
    changed: dict[str, str]  # path -> sha of the commit that last changed it
    date: int
    message: str


@dataclass
class _MsRepo:
    repo_id: str
    private: bool
    gated: bool
    commits: dict[str, _Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    granted: set[str] = field(default_factory=set)


class _MsHandler(_Handler):
    server: _MsServer  # type: ignore[assignment]

    def _begin(self) -> None:
        super()._begin()
        self.ms: ModelScopeServer = self.server.hub  # type: ignore[assignment]
        cookie_token = None
        if raw := self.rec.headers.get("cookie"):
            try:
                jar = SimpleCookie(raw)
            except CookieError:
                jar = SimpleCookie()
            if "m_session_id" in jar:
                cookie_token = jar["m_session_id"].value
        self.token = self.token or cookie_token
        if self.token is not None and self.token not in self.ms.valid_tokens:
            self.token = None  # an unknown token counts as anonymous

    def _dispatch(self) -> None:
        self._begin()
        try:
            if self.server.kind == "storage":
                self._storage()
            else:
                self._api()
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True

    # ---------- envelope ----------
    def _envelope(self, status: int, data: Any, code: int | None = None, message: str = "success",
                  headers: dict[str, str] | None = None) -> None:
        ok = status < 400
        body = {"Code": code if code is not None else (200 if ok else status), "Data": data,
                "Message": message, "RequestId": str(uuid.uuid4()), "Success": ok}
        self._send(status, json.dumps(body).encode(), headers)

    def _error(self, status: int, code: Any, message: str, headers: dict[str, str] | None = None) -> None:
        self._envelope(status, None, code if isinstance(code, int) else None, message, headers)

    def _q(self, name: str, default: str = "") -> str:
        return self.query.get(name, [default])[0]

    # ---------- api ----------
    def _api(self) -> None:
        segs = [unquote(s) for s in self.url_path.split("/")[1:]]
        if segs[:2] != ["api", "v1"] or self.command not in ("GET", "HEAD"):
            return self._error(404, None, f"not found: {self.url_path}")
        segs = segs[2:]
        if segs == ["repos", "internalAccelerationInfo"]:
            return self._envelope(200, {"InternalRegionQueryAddress": ""})
        if len(segs) >= 3 and segs[0] == "models":
            repo_id, rest = f"{segs[1]}/{segs[2]}", segs[3:]
            if rest == ["repo", "files"]:
                return self._listing(repo_id)
            if rest == ["repo"]:
                return self._file(repo_id)
            if rest == ["revisions"]:
                return self._revisions(repo_id)
            if not rest:
                return self._info(repo_id)
        self._error(404, None, f"not found: {self.url_path}")

    def _repo(self, repo_id: str) -> _MsRepo | None:
        repo = self.ms.repos.get(repo_id)
        if repo is None:
            self._error(404, None, f"model {repo_id} does not exist")
            return None
        if repo.private and self.token not in repo.granted:
            if self.ms.hide_private:
                self._error(404, None, f"model {repo_id} does not exist")
            elif self.token is None:
                self._error(self.ms.deny_status_anonymous, None, "please login first")
            else:
                self._error(self.ms.deny_status_token, None, f"no permission to access model {repo_id}")
            return None
        return repo

    def _status_fault(self, key: str) -> bool:
        if self.command != "GET":
            return False
        fault = self.ms.faults.take("api", key, body=False)
        if fault.status is None:
            return False
        self._fault_status(fault)
        return True

    def _listing(self, repo_id: str) -> None:
        if self._status_fault(self.url_path) or (repo := self._repo(repo_id)) is None:
            return
        self.ms.listing_hook(self)
        commit = self.ms.resolve(repo, self._q("Revision", "master"))
        if commit is None:
            return self._envelope(200, {"Files": None})
        recursive = self._q("Recursive", "False").lower() == "true"
        root = self._q("Root").strip("/")
        base = root + "/" if root else ""
        out: dict[str, dict[str, Any]] = {}
        for path, blob in sorted(commit.tree.items()):
            if not path.startswith(base):
                continue
            parts = path[len(base) :].split("/")
            for i in range(1, len(parts) if recursive else min(2, len(parts))):
                d = base + "/".join(parts[:i])
                out.setdefault(d, self._entry(d, None, commit))
            if recursive or len(parts) == 1:
                out[path] = self._entry(path, blob, commit)
        files = list(out.values())[: self.ms.listing_limit]
        self._envelope(200, {"Files": files})

    def _entry(self, path: str, blob: _Blob | None, commit: _Commit) -> dict[str, Any]:
        repo_commit = self.ms.commit_index[commit.changed.get(path, commit.sha)]
        e: dict[str, Any] = {
            "CommitId": "", "CommitMessage": repo_commit.message, "CommittedDate": repo_commit.date,
            "CommitterEmail": "dev@example.com", "CommitterName": "dev", "InCheck": False,
            "IsLFS": bool(blob and blob.lfs), "Mode": "33188" if blob else "16384",
            "Name": path.rsplit("/", 1)[-1], "Path": path, "Revision": repo_commit.sha,
            "Sha256": blob.sha256 if blob else "", "Size": blob.size if blob else 0,
            "Type": "blob" if blob else "tree", "Id": blob.oid if blob else hashlib.sha1(path.encode()).hexdigest(),
        }
        override = self.ms.entry_overrides.get(path)
        if blob is not None and override:
            e.update(override)
        return e

    def _file(self, repo_id: str) -> None:
        path = self._q("FilePath").lstrip("/")
        key = f"{self.url_path}/{path}"
        if self._status_fault(key) or (repo := self._repo(repo_id)) is None:
            return
        commit = self.ms.resolve(repo, self._q("Revision", "master"))
        blob = commit.tree.get(path) if commit is not None else None
        if blob is None:
            return self._error(404, CODE_NOT_FOUND, f"file {path} does not exist")
        if not blob.lfs:  # git-stored: answered here, Range ignored (no redirect on the real site)
            return self._serve_blob(blob, key, honour_range=False)
        expires = int(time.time()) + 3600
        sig = hashlib.sha256(f"{blob.sha256}{path}{expires}".encode()).hexdigest()[:28]
        location = (f"{self.ms.storage_endpoint}/lfs/{blob.sha256}/{quote(path)}"
                    f"?Expires={expires}&OSSAccessKeyId=LTAIexample&Signature={sig}")
        self._send(302, b"", {"Location": location})

    def _revisions(self, repo_id: str) -> None:
        if (repo := self._repo(repo_id)) is None:
            return
        def items(refs: dict[str, str]) -> list[dict[str, Any]]:
            return [{"Revision": name, "CreatedAt": self.ms.commit_index[sha].date, "CommitId": sha}
                    for name, sha in sorted(refs.items())]
        self._envelope(200, {"RevisionMap": {"Branches": items(repo.branches), "Tags": items(repo.tags)}})

    def _info(self, repo_id: str) -> None:
        if (repo := self._repo(repo_id)) is None:
            return
        owner, name = repo_id.split("/", 1)
        self._envelope(200, {"Id": abs(hash(repo_id)) % 10**6, "Name": name, "Path": owner,
                             "ChineseName": "", "Visibility": 1 if repo.private else 5,
                             "IsPrivate": repo.private, "Gated": repo.gated})

    # ---------- storage ----------
    def _storage(self) -> None:
        segs = self.url_path.split("/")
        blob = self.ms.lfs_blobs.get(segs[2]) if len(segs) >= 4 and segs[1] == "lfs" else None
        if blob is None or self.command not in ("GET", "HEAD") or "Signature" not in self.query:
            body = b"<?xml version='1.0'?><Error><Code>NoSuchKey</Code></Error>"
            return self._send(404, body, ctype="application/xml")
        extra = {"X-Linked-ETag": blob.sha256} if self.ms.linked_etag else {}
        self._serve_blob(blob, self.url_path, honour_range=True, extra=extra)

    # ---------- bytes ----------
    def _serve_blob(self, blob: _Blob, key: str, *, honour_range: bool,
                    extra: dict[str, str] | None = None) -> None:
        head = self.command == "HEAD"
        fault = Fault() if head else self.ms.faults.take(self.server.kind, key, body=True)
        if fault.status is not None:
            return self._fault_status(fault)
        rng = None
        if honour_range and not fault.ignore_range and not head:
            rng = _parse_range(self.rec.range, blob.size)
        if rng == "416":
            return self._error(416, None, "Requested range not satisfiable",
                               {"Content-Range": f"bytes */{blob.size}"})
        start, end = rng if isinstance(rng, tuple) else (0, blob.size)
        self.send_response(200 if (not rng or self.ms.range_as_200) else 206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("ETag", f'"{blob.oid if not blob.lfs else blob.sha256[:32].upper()}"')
        if honour_range:
            self.send_header("Accept-Ranges", "bytes")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{blob.size}")
        elif self.ms.label_whole_body and not head:
            self.send_header("Content-Range", f"bytes 0-{blob.size - 1}/{blob.size}")
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


class _MsServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128
    allow_reuse_address = True

    def __init__(self, host: str, ms: ModelScopeServer, kind: str) -> None:
        super().__init__((host, 0), _MsHandler)
        self.hub = ms
        self.kind = kind


class ModelScopeServer:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: list[Request] = []
        self.faults = Faults()
        self.gate = threading.Event()  # hub_server's body writer pauses while it is clear (set: never)
        self.gate.set()
        self.paused = threading.Event()  # a body reached a fault's pause_at
        self.resume = threading.Event()  # set by the test: paused bodies go on
        self.repos: dict[str, _MsRepo] = {}
        self.commit_index: dict[str, _Commit] = {}
        self.lfs_blobs: dict[str, _Blob] = {}
        self.valid_tokens: set[str] = {"ms-valid-granted", "ms-valid-notgranted"}
        self.hide_private = False
        self.deny_status_anonymous = 401
        self.deny_status_token = 403
        self.range_as_200 = False
        self.linked_etag = False
        self.label_whole_body = False
        self.listing_limit = 3000  # REPO_FILES_TRUNCATION_LIMIT: the real site cuts the listing there
        self.entry_overrides: dict[str, dict[str, Any]] = {}  # path -> listing fields to replace (hostile site)
        self.listing_hook: Any = lambda handler: None  # runs before each listing answer is built
        self._counter = 0
        self._servers = [_MsServer("127.0.0.1", self, "api"), _MsServer("127.0.0.3", self, "storage")]
        self.endpoint = f"http://127.0.0.1:{self._servers[0].server_address[1]}"
        self.storage_endpoint = f"http://127.0.0.3:{self._servers[1].server_address[1]}"
        for s in self._servers:
            threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.005}, daemon=True).start()

    # ---------- content ----------
    def add_repo(self, repo_id: str, files: Mapping[str, bytes | Path], revision: str = "master", *,
                 private: bool = False, gated: bool = False) -> str:
        """Create (or replace) a repo whose branch ``revision`` holds exactly ``files``; returns the commit sha."""
        self.repos[repo_id] = _MsRepo(repo_id, private or gated, gated)
        return self._store(repo_id, None, files, revision)

    def add_commit(self, repo_id: str, files: Mapping[str, bytes | Path | None], branch: str = "master") -> str:
        """Commit on top of ``branch`` (created from master if new): given files replace (None deletes)."""
        repo = self.repos[repo_id]
        parent = self.commit_index[repo.branches.get(branch) or repo.branches["master"]]
        return self._store(repo_id, parent, files, branch)

    def _store(self, repo_id: str, parent: _Commit | None, files: Mapping[str, Any], branch: str) -> str:
        repo = self.repos[repo_id]
        tree = dict(parent.tree) if parent else {}
        changed = dict(parent.changed) if parent else {}
        touched = []
        for name, content in files.items():
            if content is None:
                tree.pop(name, None)
                changed.pop(name, None)
                continue
            tree[name] = blob = _make_blob(name, content)
            touched.append(name)
            if blob.lfs:
                self.lfs_blobs[blob.sha256] = blob
        self._counter += 1
        seed = f"{repo_id}\n{branch}\n{self._counter}\n" + "".join(f"{p}:{b.oid}\n" for p, b in sorted(tree.items()))
        sha = hashlib.sha1(seed.encode()).hexdigest()
        for name in touched:
            changed[name] = sha
        commit = _Commit(sha, tree, changed, _EPOCH + 3600 * self._counter, f"commit {self._counter}")
        self.commit_index[sha] = commit
        repo.commits[sha] = commit
        repo.branches[branch] = sha
        return sha

    def add_tag(self, repo_id: str, tag: str, ref: str) -> None:
        repo = self.repos[repo_id]
        repo.tags[tag] = repo.branches.get(ref) or repo.tags.get(ref) or ref

    def grant(self, repo_id: str, token: str) -> None:
        self.repos[repo_id].granted.add(token)

    def resolve(self, repo: _MsRepo, rev: str) -> _Commit | None:
        """A branch, a tag or a full commit sha of ``repo``; None when it names nothing."""
        sha = repo.branches.get(rev) or repo.tags.get(rev) or (rev if rev in repo.commits else None)
        return repo.commits[sha] if sha else None

    # ---------- log ----------
    def file_gets(self, path_suffix: str | None = None, host: str | None = None) -> list[Request]:
        with self._lock:
            reqs = list(self.requests)
        out = []
        for r in reqs:
            path, _, query = r.path.partition("?")
            if r.method != "GET" or host not in (None, r.host):
                continue
            if r.host == "api":
                if not path.endswith("/repo"):
                    continue
                path = path + "/" + parse_qs(query).get("FilePath", [""])[0]
            if path_suffix is None or path.endswith(path_suffix):
                out.append(r)
        return out

    def listing_gets(self, repo_id: str | None = None) -> list[Request]:
        with self._lock:
            reqs = list(self.requests)
        return [r for r in reqs if r.method == "GET" and r.path.partition("?")[0].endswith("/repo/files")
                and (repo_id is None or f"/models/{repo_id}/" in r.path)]

    def bytes_served(self, path_suffix: str | None = None, host: str | None = None) -> int:
        return sum(r.body_bytes for r in self.file_gets(path_suffix, host))

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()

    def close(self) -> None:
        self.gate.set()  # a body the test held back ends with the server
        self.resume.set()
        for s in self._servers:
            s.shutdown()
            s.server_close()

    def __enter__(self) -> ModelScopeServer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
