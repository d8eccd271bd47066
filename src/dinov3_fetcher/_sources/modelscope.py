"""ModelScope (modelscope.cn and its mirrors) as a source: the listing, the file URLs, the credential, the errors.

What the real client (modelscope_hub 0.5.1) does, and so what this module does:

- Endpoint: ``MODELSCOPE_ENDPOINT``, else the deprecated ``MODELSCOPE_DOMAIN``, else https://modelscope.cn; a bare
  host gets ``https://``, a trailing ``/`` is dropped. Everything lives under ``{endpoint}/api/v1``.
- Token: ``MODELSCOPE_API_TOKEN`` (set but empty: anonymous), else the saved login, the cookie ``m_session_id`` in the
  pickled cookie jar ``$MODELSCOPE_HOME/credentials/cookies`` (default ``~/.modelscope``). It goes out both ways the
  client sends it, ``Authorization: Bearer`` and ``Cookie: m_session_id=``, and only to the endpoint's origin.
- Listing: ``GET /api/v1/models/{id}/repo/files?Revision=&Recursive=True`` answers every file with its ``Size`` and
  ``Sha256`` (git-stored files too); an unknown revision answers 200 with ``Files: null``.
- Bytes: ``GET /api/v1/models/{id}/repo?Revision=&FilePath=``; LFS files are redirected to a storage host (which must
  not see the token), git-stored ones are answered directly and ignore Range.

No huggingface_hub and no modelscope package here: the listing goes through our own HTTP client.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import os
import pickle
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn
from urllib.parse import quote, quote_plus, unquote_plus, urlsplit

from .. import _env as env
from .._errors import (
    AuthenticationError,
    ConfigError,
    HubResponseError,
    NetworkError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from .._http import Auth, HttpPool, RequestError
from .._ids import is_commit, is_repo_id, is_sha256
from .._net import refusal
from .._retry import RetryPolicy, TryAgain
from .._userfile import parse_json
from .._version import __version__
from .source import RemoteFile, Snapshot

if TYPE_CHECKING:
    import threading

    from .._manifest import Manifest
    from .._transfer import Transfer

__all__ = ["DEFAULT_ENDPOINT", "ModelScopeSource", "endpoint", "known_tokens", "saved_login", "saved_token", "token"]

NAME = "modelscope"
DEFAULT_ENDPOINT = "https://modelscope.cn"
LISTING_LIMIT = 3000  # the site cuts a listing at this many entries, silently (REPO_FILES_TRUNCATION_LIMIT)
_MAX_LISTING_BYTES = 64 << 20
_RETRY_AFTER_CAP = 60.0
_TOKEN_CHARS = re.compile(r"[\x21-\x7e]+")  # what a header and a cookie value can carry as is


# ---------------------------------------------------------------- environment

def endpoint() -> str:
    """MODELSCOPE_ENDPOINT, else MODELSCOPE_DOMAIN, else https://modelscope.cn, normalized as modelscope_hub does.

    Raises ConfigError (exit 3) for a value that is not an http(s) URL with a host.
    """
    name, raw = "MODELSCOPE_ENDPOINT", os.environ.get("MODELSCOPE_ENDPOINT") or ""
    if not raw:
        name, raw = "MODELSCOPE_DOMAIN", (os.environ.get("MODELSCOPE_DOMAIN") or "").strip()
    value = raw.strip() or DEFAULT_ENDPOINT
    if not value.lower().startswith(("http://", "https://")):
        value = f"https://{value}"
    return env.endpoint_url(name, value.rstrip("/"), token="the token goes in MODELSCOPE_API_TOKEN",
                            example=f"set {name} to e.g. https://modelscope.cn (or https://www.modelscope.ai), or "
                                    "unset it")


def credentials_file() -> Path:
    """Where ``modelscope login`` keeps the session: $MODELSCOPE_HOME/credentials/cookies (default ~/.modelscope)."""
    home = os.environ.get("MODELSCOPE_HOME") or str(Path.home() / ".modelscope")
    return Path(home).expanduser() / "credentials" / "cookies"


class _Stub:
    """Stands in for the cookie jar's classes while unpickling: holds their state, runs no code."""

    state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _CookieUnpickler(pickle.Unpickler):
    """Only the classes a requests/http.cookiejar cookie jar is made of, each replaced by an inert ``_Stub``.

    The file is written by the user's own client, but a pickle can run any callable it names; this one names
    nothing that can.
    """

    _ALLOWED = frozenset({("requests.cookies", "RequestsCookieJar"), ("http.cookiejar", "CookieJar"),
                          ("http.cookiejar", "DefaultCookiePolicy"), ("http.cookiejar", "Cookie"),
                          ("http.cookiejar", "FileCookieJar"), ("http.cookiejar", "MozillaCookieJar"),
                          ("http.cookiejar", "LWPCookieJar")})

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return type(name, (_Stub,), {})
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a cookie jar")


def _cookies(obj: Any) -> list[dict[str, Any]]:
    """Every cookie's attributes in an unpickled jar (``_cookies[domain][path][name]``)."""
    state = obj.state if isinstance(obj, _Stub) else None
    jar = state.get("_cookies") if isinstance(state, dict) else None
    found = []
    for paths in (jar or {}).values() if isinstance(jar, dict) else ():
        for names in paths.values() if isinstance(paths, dict) else ():
            for cookie in names.values() if isinstance(names, dict) else ():
                if isinstance(cookie, _Stub) and isinstance(cookie.state, dict):
                    found.append(cookie.state)
    return found


def saved_token(path: Path | None = None) -> str | None:
    """The ``m_session_id`` of the saved login, None if there is none, it expired, or the file is not a jar.

    Raises ConfigError (exit 3) when something is at that name but cannot be read as a file (a FIFO, a device, a
    folder, too large, no permission): a login that cannot be read would otherwise be silently dropped.
    """
    from .._userfile import Refused

    path = path or credentials_file()
    try:
        return saved_login(path)
    except Refused as exc:
        raise ConfigError(f"ModelScope's saved login {path} {exc.reason}",
                          "remove it and run 'modelscope login' again, or set MODELSCOPE_API_TOKEN (empty: "
                          "anonymous); MODELSCOPE_HOME moves that folder") from None


def saved_login(path: Path | None = None) -> str | None:
    """``saved_token`` without the error: Refused (a ValueError) for a file that cannot be read as one (what the
    scrubber needs: building a FetcherError scrubs, and must not come back here)."""
    from .._userfile import COOKIES_LIMIT, Refused, read_regular

    try:
        data = read_regular(path or credentials_file(), COOKIES_LIMIT)
    except Refused as exc:
        if exc.missing:
            return None
        raise
    try:
        jar = _CookieUnpickler(io.BytesIO(data)).load()
    except Exception:  # a damaged or foreign file is no login, whatever the unpickler raised
        return None
    for c in _cookies(jar):
        if c.get("name") == "m_session_id" and isinstance(c.get("value"), str):
            expires = c.get("expires")
            if isinstance(expires, int | float) and not isinstance(expires, bool) and expires <= time.time():
                return None  # the client drops an expired login too (HubConfig.load_cookies)
            return c["value"].strip() or None
    return None


def token() -> str | None:
    """MODELSCOPE_API_TOKEN (set but empty: none, as for the real client), else the saved login, else None."""
    if "MODELSCOPE_API_TOKEN" in os.environ:
        value = os.environ["MODELSCOPE_API_TOKEN"].strip()
        where = "MODELSCOPE_API_TOKEN"
    else:
        value = saved_token() or ""
        where = f"the saved login in {credentials_file()}"
    if value and (not _TOKEN_CHARS.fullmatch(value) or ";" in value):
        raise ConfigError(f"the ModelScope token from {where} contains characters a header cannot carry",
                          "set MODELSCOPE_API_TOKEN to the access token exactly as the site shows it")
    return value or None


def known_tokens() -> list[str]:
    """Every ModelScope token this process could send: MODELSCOPE_API_TOKEN and the saved login."""
    found = [os.environ.get("MODELSCOPE_API_TOKEN") or ""]
    with contextlib.suppress(Exception):  # no home folder, or a login that is no regular file: no login
        found.append(saved_login() or "")
    return found


# ---------------------------------------------------------------- the source

class ModelScopeSource:
    """The ``Source`` for ModelScope. ``ModelScopeSource.from_env()`` is what ``get_source("modelscope")`` returns.

    ``retry`` bounds the extra tries of the listing after a 429, a 5xx or a connection error; the wait is
    Retry-After when given (capped at 60 s here), else the policy's backoff.
    """

    name = NAME
    endpoint_var = "MODELSCOPE_ENDPOINT"

    def __init__(self, endpoint: str, token: str | None = None, *, timeout: float = env.DEFAULT_TIMEOUT,
                 retry: RetryPolicy | None = None) -> None:
        self.endpoint = endpoint.rstrip("/")
        self._token = token or None
        self.timeout = timeout
        self.retry = dataclasses.replace(retry or RetryPolicy(), retry_after_cap=_RETRY_AFTER_CAP)
        self._user_agent = f"dinov3-fetcher/{__version__}; source/modelscope"

    @classmethod
    def from_env(cls) -> ModelScopeSource:
        """The endpoint and token from the environment; the timeout, retries and backoff the bytes use."""
        return cls(endpoint(), token(), timeout=env.timeout(), retry=RetryPolicy.from_env())

    @property
    def _site(self) -> str:
        """The endpoint's scheme://host:port, for messages."""
        return env.display_origin(self.endpoint)

    def __repr__(self) -> str:  # never the token
        return f"ModelScopeSource({self.endpoint!r}, token={'set' if self._token else 'none'})"

    # ---- Source protocol ----
    def auth(self) -> Auth | None:
        if not self._token:
            return None
        return Auth(self._site,
                    {"Authorization": f"Bearer {self._token}", "Cookie": f"m_session_id={self._token}"})

    def user_agent(self) -> str:
        return self._user_agent

    def early(self, transfer: Transfer, old: Manifest | None, repo_id: str, revision: str,
              cancel: threading.Event) -> None:
        """No early bytes: ModelScope's listing is the only way to learn the files' hashes."""
        return None

    def pool(self) -> HttpPool:
        """A pool whose requests to the endpoint carry the credential, and to nowhere else."""
        return HttpPool(self.timeout, self._user_agent, self.auth())

    def file_url(self, snap: Snapshot, name: str) -> str:
        # The revision as requested: which revisions the site takes as a commit is not known, and a pinned id of
        # our own (Snapshot.commit) is no revision at all. A branch that moves mid-fetch is caught by the sha256.
        return (f"{snap.endpoint}/api/v1/models/{quote(snap.repo_id, safe='/')}/repo"
                f"?Revision={quote_plus(snap.revision)}&FilePath={quote_plus(name)}")

    def snapshot(self, repo_id: str, revision: str) -> Snapshot:
        if not is_repo_id(repo_id):
            raise ConfigError(f"{repo_id!r} is not a ModelScope model id",
                              "use owner/name, e.g. facebook/dinov3-vitl16-pretrain-lvd1689m")
        revision = revision or "master"
        url = (f"{self.endpoint}/api/v1/models/{quote(repo_id, safe='/')}/repo/files"
               f"?Revision={quote_plus(revision)}&Recursive=True")
        body = self._get_listing(url, repo_id, revision)
        files, newest = self._parse_listing(body, repo_id, revision)
        return Snapshot(NAME, self.endpoint, repo_id, revision, pinned_id(files), files,
                        site_revision=revision if is_commit(revision) else newest)

    def raise_for_status(self, status: int, headers: Mapping[str, str], body: bytes, url: str,
                         repo_id: str, revision: str) -> NoReturn:
        ep = self._site
        name = _file_name(url)
        if status in (401, 403):
            raise self._denied(status, repo_id)
        elif status == 404:
            raise HubResponseError(f"{repo_id}@{revision} lists {name} but {ep} cannot serve it (404)",
                                   "retry later; the revision may have moved while fetching")
        if status == 429 or status >= 500:
            raise NetworkError(f"{ep} answered HTTP {status} for {name} (overloaded or failing)",
                               "retry later; the next run resumes where this one stopped")
        raise NetworkError(f"{ep} answered HTTP {status} for {name}",
                           "check that MODELSCOPE_ENDPOINT points at ModelScope or a faithful mirror")

    # ---- listing ----
    def _get_listing(self, url: str, repo_id: str, revision: str) -> bytes:
        pool = self.pool()
        tries = self.retry.tries()
        try:
            while True:
                try:
                    return self._get_once(pool, url, repo_id)
                except TryAgain as r:
                    if not tries.failed(wait=r.wait):
                        raise NetworkError(
                            f"cannot list {repo_id} on {self._site} (MODELSCOPE_ENDPOINT): "
                            f"{r} after {tries.failures} tries",
                            "check the network or retry later; MODELSCOPE_ENDPOINT can point at a mirror") from None
        finally:
            pool.close()

    def _get_once(self, pool: HttpPool, url: str, repo_id: str) -> bytes:
        try:
            answer = pool.get(url, {"Accept": "application/json"})
            try:
                body = answer.read(_MAX_LISTING_BYTES + 1)
            finally:
                pool.finish(answer)
        except RequestError as exc:
            raise TryAgain(exc.kind) from None
        resp = answer.resp
        if resp.status == 429 or resp.status >= 500:
            raise TryAgain(f"HTTP {resp.status}", self.retry.retry_after(resp.getheader("Retry-After")))
        if (refused := refusal(resp.status, answer.url, url, body)) is not None:  # a proxy's 407
            raise refused
        if resp.status in (401, 403):
            raise self._denied(resp.status, repo_id)
        if resp.status == 404:
            hint = ("check the id ('dinov3-fetcher list' shows the official ones)" +
                    ("" if self._token else "; a private repo also needs MODELSCOPE_API_TOKEN"))
            raise RepositoryNotFoundError(f"repo {repo_id} was not found on {self._site}", hint)
        if resp.status != 200:
            raise NetworkError(f"{self._site} answered HTTP {resp.status} to the listing of "
                               f"{repo_id}", "check that MODELSCOPE_ENDPOINT points at ModelScope or a mirror of it")
        if len(body) > _MAX_LISTING_BYTES:
            raise self._malformed(repo_id, "a listing larger than 64 MiB")
        return body

    def _denied(self, status: int, repo_id: str) -> AuthenticationError:
        page = f"{self._site}/models/{repo_id}"
        if self._token is None:
            return AuthenticationError(
                f"{repo_id} is private or gated on {self._site} and no token was sent ({status})",
                f"request access at {page}, then set MODELSCOPE_API_TOKEN to an access token "
                f"({self._site}/my/myaccesstoken) or run 'modelscope login'", status=status)
        return AuthenticationError(
            f"your ModelScope token has no access to {repo_id} ({status})",
            f"request access at {page} and wait for approval, or set MODELSCOPE_API_TOKEN to a token that has it",
            status=status)

    def _malformed(self, repo_id: str, what: str) -> HubResponseError:
        return HubResponseError(f"{self._site} answered {what} for {repo_id}",
                                "check that MODELSCOPE_ENDPOINT points at ModelScope or a faithful mirror")

    def _parse_listing(self, body: bytes, repo_id: str, revision: str) -> tuple[dict[str, RemoteFile], str]:
        """The files, and the newest commit among their ``Revision``s ("" when the entries name none)."""
        try:
            doc = parse_json(body)
        except ValueError as exc:
            raise self._malformed(repo_id, f"a listing that {exc}") from None
        data = doc.get("Data") if isinstance(doc, dict) else None
        if data is not None and not isinstance(data, dict):
            raise self._malformed(repo_id, "a listing without Data.Files")
        entries = (data or {}).get("Files")
        if not entries:  # Files: null is how the site says "no such revision" (with 200)
            raise RevisionNotFoundError(f"revision {revision!r} of {repo_id} has no files on "
                                        f"{self._site} (the site's answer for an unknown revision)",
                                        "pass a branch, tag or commit that exists (ModelScope's default is master)")
        if not isinstance(entries, list):
            raise self._malformed(repo_id, "a listing whose Files is not a list")
        if len(entries) >= LISTING_LIMIT:
            raise self._malformed(repo_id, f"a listing cut at {LISTING_LIMIT} entries")
        files: dict[str, RemoteFile] = {}
        newest: tuple[int, str] = (-1, "")
        for e in entries:
            if not isinstance(e, dict):
                raise self._malformed(repo_id, "a listing entry that is not an object")
            if e.get("Type", "blob") == "tree":
                continue
            rev, when = e.get("Revision"), e.get("CommittedDate")
            if isinstance(rev, str) and is_commit(rev) and isinstance(when, int) and not isinstance(when, bool):
                newest = max(newest, (when, rev))
            path, size, sha = e.get("Path"), e.get("Size"), e.get("Sha256")
            if not isinstance(path, str) or not path:
                raise self._malformed(repo_id, "a listing entry without a Path")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise self._malformed(repo_id, f"no valid Size for {path!r}")
            if not isinstance(sha, str) or not is_sha256(sha.lower()):
                raise self._malformed(repo_id, f"no valid Sha256 for {path!r}")
            if path in files:
                raise self._malformed(repo_id, f"{path!r} twice in the listing")
            files[path] = RemoteFile(path, size, sha.lower())
        if not files:
            raise RevisionNotFoundError(f"revision {revision!r} of {repo_id} holds no files",
                                        "pass a branch, tag or commit that holds the checkpoint")
        return files, newest[1]


def pinned_id(files: Mapping[str, RemoteFile]) -> str:
    """What ``Snapshot.commit`` is for ModelScope: 40 hex digits of the sha256 of the sorted (path, sha256, size).

    The site names no snapshot commit. Each entry's ``Revision`` is the commit that last changed that file, so the
    newest of them misses a deletion (the remaining files keep their old Revisions) and says nothing when entries
    lack one; a digest of the listing itself changes exactly when a file is added, removed, renamed or changed,
    and never otherwise. 40 hex digits, like a commit id, so that code keyed on commits keeps working; it is not a
    revision the site knows (``file_url`` uses the requested revision).
    """
    h = hashlib.sha256()
    for name in sorted(files):
        f = files[name]
        h.update(f"{name}\0{f.sha256}\0{f.size}\n".encode())
    return h.hexdigest()[:40]


def _file_name(url: str) -> str:
    query = urlsplit(url).query
    m = re.search(r"(?:^|&)FilePath=([^&]*)", query)
    if m:
        return unquote_plus(m[1])
    return urlsplit(url).path.rsplit("/", 1)[-1] or url
