"""The Hugging Face Hub (or a mirror of it at HF_ENDPOINT) as a source, through huggingface_hub.

huggingface_hub decides everything about the Hub: endpoint, token, metadata and what an error means. The
bytes go through our own transfer (huggingface_hub 2.x neither resumes across runs nor checks sha256).
huggingface_hub is imported only when a request is about to be made: a warm run never imports it, and a cold
one makes its first requests while it imports (where the environment alone decides the token, it is read
here as huggingface_hub reads it: ``get_token``).
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import importlib
import math
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar
from urllib.parse import quote, urljoin, urlsplit

from .. import _env as env
from .._errors import (
    AuthenticationError,
    ConfigError,
    FetcherError,
    HubResponseError,
    LocalEntryNotFoundError,
    NetworkError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from .._http import Auth
from .._ids import is_commit, is_sha256
from .._version import __version__

if TYPE_CHECKING:
    import threading

    from .._headstart import HeadStart
    from .._manifest import Manifest
    from .._transfer import Transfer
    from .source import Snapshot

__all__ = ["DEFAULT_ENDPOINT", "HfSource", "display_endpoint", "endpoint", "environment_token", "import_hub",
           "known_tokens", "raise_for_file_status", "user_agent"]

DEFAULT_ENDPOINT = "https://huggingface.co"
_T = TypeVar("_T")
TREE_LIMIT = 10_000  # entries of a mirror's tree listing (a checkpoint repo has a few dozen): more means it loops
TREE_PAGES = 100  # pages of it (the Hub gives 1,000 entries a page, a mirror tens): more means it never ends


def endpoint() -> str:
    """HF_ENDPOINT, without a trailing slash. Raises ConfigError unless it is an http(s) URL with a host."""
    url = (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).strip().rstrip("/")
    return env.endpoint_url("HF_ENDPOINT", url, example="set HF_ENDPOINT to e.g. https://huggingface.co or unset it",
                            token="the Hub token goes in HF_TOKEN")


def display_endpoint(url: str | None = None) -> str:
    """The endpoint without any user:password part, for messages."""
    return env.display_origin(url or endpoint())


def import_hub() -> ModuleType:
    """huggingface_hub, imported (by this or by transformers) only through here: its constants read
    HF_HUB_DOWNLOAD_TIMEOUT once, with int(), so a documented value like ``1.5`` would crash the import. While
    they are read, the variable shows the timeout rounded up to whole seconds; it is the user's again right after."""
    raw = os.environ.get("HF_HUB_DOWNLOAD_TIMEOUT")
    if "huggingface_hub.constants" not in sys.modules and raw is not None and not raw.strip().lstrip("-").isdigit():
        os.environ["HF_HUB_DOWNLOAD_TIMEOUT"] = str(math.ceil(env.timeout()))  # ConfigError for a value <= 0
        try:
            importlib.import_module("huggingface_hub.constants")
        finally:
            os.environ["HF_HUB_DOWNLOAD_TIMEOUT"] = raw
    return importlib.import_module("huggingface_hub")


def token_file() -> Path:
    """Where ``hf auth login`` keeps the token: huggingface_hub's own ``HF_TOKEN_PATH`` (its constants, a
    millisecond to import, not its client)."""
    import_hub()
    from huggingface_hub import constants

    return Path(constants.HF_TOKEN_PATH)


def known_tokens() -> list[str]:
    """Every Hub token this process could send: HF_TOKEN, HUGGING_FACE_HUB_TOKEN and the stored one (read with
    the one reader of user files: a FIFO or a device in its place is skipped, never waited on)."""
    from .._userfile import TOKEN_LIMIT, read_regular

    found = [os.environ.get("HF_TOKEN") or "", os.environ.get("HUGGING_FACE_HUB_TOKEN") or ""]
    with contextlib.suppress(Exception):
        found.append(read_regular(token_file(), TOKEN_LIMIT).decode("utf-8", "replace"))
    return found


def environment_token() -> str | None:
    """The token huggingface_hub's ``get_token`` returns when the environment decides it, read without importing
    huggingface_hub's client (a tenth of a second before a cold fetch's first request): HF_TOKEN, else
    HUGGING_FACE_HUB_TOKEN, cleaned as it cleans them, unless HF_OIDC_RESOURCE asks for an exchanged token
    (which comes first). None where huggingface_hub must answer: no such variable, an OIDC exchange, a token
    stored by ``hf auth login`` (which it may refresh), a notebook's secrets."""
    if os.environ.get("HF_OIDC_RESOURCE"):
        return None
    raw = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    return (raw or "").replace("\r", "").replace("\n", "").strip() or None


def get_token() -> str | None:
    """HF_TOKEN, else the token stored by ``hf auth login``; None when there is none (huggingface_hub's rules).
    huggingface_hub is asked unless its answer is known without it: ``environment_token``, or no token anywhere.

    Raises ConfigError for a malformed HF_ENDPOINT, which would otherwise break huggingface_hub's own import, and
    for a token file that is not a regular file (a FIFO there would make huggingface_hub's read wait forever).
    """
    from .._userfile import TOKEN_LIMIT, Refused, read_regular

    endpoint()
    if (known := environment_token()) is not None:
        return known
    if not (os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")):
        try:
            read_regular(token_file(), TOKEN_LIMIT)
        except Refused as exc:
            if not exc.missing:
                raise ConfigError(f"the token file {exc.path} (where 'hf auth login' keeps the token) {exc.reason}",
                                  "remove it and run 'hf auth login' again, or set HF_TOKEN") from None
            if not (os.environ.get("HF_OIDC_RESOURCE") or "huggingface_hub.utils" in sys.modules
                    or hasattr(builtins, "get_ipython") or hasattr(builtins, "__IPYTHON__")):
                return None  # no token anywhere, and no notebook whose secrets huggingface_hub would ask: its answer
    token: str | None = import_hub().get_token()
    return token


def load_api() -> None:
    """Import huggingface_hub's HfApi now, while the head start's requests are under way."""
    import_hub()
    from huggingface_hub import HfApi  # noqa: F401


def user_agent() -> str:
    """The User-Agent of our requests to the Hub (ours and huggingface_hub's versions)."""
    return f"dinov3-fetcher/{__version__}; hf_hub/{hf_version()}"


def hf_version() -> str:
    """huggingface_hub's version."""
    return str(import_hub().__version__)


class HfSource:
    """The Hub at HF_ENDPOINT; the token is read once (HF_TOKEN, else the one ``hf auth login`` stored)."""

    name = "hf"
    endpoint_var = "HF_ENDPOINT"

    def __init__(self) -> None:
        self.endpoint = endpoint()
        self.token = get_token()
        self.timeout = env.timeout()  # the same timeout and retries as the bytes
        from .._retry import RetryPolicy  # here: a fetch imports this module for endpoint() before it connects

        self.retry = RetryPolicy.from_env()

    def user_agent(self) -> str:
        return user_agent()

    def early(self, transfer: Transfer, old: Manifest | None, repo_id: str, revision: str,
              cancel: threading.Event) -> HeadStart:
        """Start the weights while ``snapshot`` (huggingface_hub's model_info) answers: see _headstart."""
        from .._headstart import HeadStart

        head = HeadStart(transfer, old, repo_id, revision, self.endpoint, cancel)
        head.start()  # its requests (and on a long round trip the weights' streams) go on while HfApi imports
        try:
            load_api()
        except BaseException:  # Ctrl-C (or a broken install) in the import: nothing may go on downloading
            head.stop()
            raise
        finally:
            head.streams_may_start.set()
        return head

    def auth(self) -> Auth | None:
        return Auth(self.endpoint, {"Authorization": f"Bearer {self.token}"}) if self.token else None

    def file_url(self, snap: Snapshot, name: str) -> str:
        return f"{self.endpoint}/{snap.repo_id}/resolve/{snap.commit}/{quote(name)}"

    def snapshot(self, repo_id: str, revision: str) -> Snapshot:
        """Resolve ``revision`` to a commit and list the repo's files with sizes and hashes (one request).

        Raises:
            AuthenticationError, RepositoryNotFoundError, RevisionNotFoundError, NetworkError, HubResponseError.
        """
        from .._net import proxy_for, ssl_context

        hub = import_hub()
        from huggingface_hub import HfApi

        proxy_for(self.endpoint)  # a proxy setting our downloads cannot use: ConfigError (exit 3) before any request
        if urlsplit(self.endpoint).scheme == "https":
            ssl_context()  # an unusable SSL_CERT_FILE / SSL_CERT_DIR: ConfigError naming it (an http:// one never asks)
        _client_that_starts(hub)
        api = HfApi(endpoint=self.endpoint, token=self.token or False, library_name="dinov3-fetcher",
                    library_version=__version__)
        info = self._asked(lambda: api.model_info(repo_id, revision=revision, files_metadata=True,
                                                  timeout=self.timeout), repo_id, revision)
        commit = info.sha or ""
        siblings = [(s.rfilename, s.size, s.blob_id, s.lfs.sha256 if s.lfs else None) for s in info.siblings or []]
        if not is_commit(commit):
            raise HubResponseError(f"{display_endpoint(self.endpoint)} answered a malformed commit for "
                                   f"{repo_id}@{revision}", _FAITHFUL)
        if any(size is None or blob_id is None for _, size, blob_id, _ in siblings):
            siblings = self._tree(hub, repo_id, revision, commit)
        from .source import RemoteFile, Snapshot  # here: see __init__

        files: dict[str, RemoteFile] = {}
        for name, size, blob_id, sha256 in siblings:
            if size is None or blob_id is None or not isinstance(size, int) or size < 0:
                raise HubResponseError(f"the Hub's listing of {repo_id} lacks sizes or ids for {name!r}", _FAITHFUL)
            if sha256 is not None and not (isinstance(sha256, str) and is_sha256(sha256)):
                raise HubResponseError(f"the Hub gave a malformed sha256 for {name!r}", _FAITHFUL)
            files[name] = RemoteFile(name, size, sha256, blob_id)
        return Snapshot(self.name, self.endpoint, repo_id, revision, commit, files)

    def _asked(self, request: Callable[[], _T], repo_id: str, revision: str) -> _T:
        """``request()``, tried again as the retry policy says while it fails in a way another try can fix;
        otherwise (or once the retries ran out) the error that says what its failure means."""
        tries = self.retry.tries()
        while True:
            try:
                return request()
            except Exception as exc:
                if not _retryable(exc) or not tries.failed(wait=self.retry.retry_after(_retry_after(exc))):
                    raise_mapped(exc, repo_id, revision)

    def _tree(self, hub: ModuleType, repo_id: str, revision: str, commit: str) -> list[tuple[str, Any, Any, Any]]:
        """The files with sizes and ids from the tree API, for a mirror whose model_info lacks them: olah drops
        ``?blobs=true`` but keeps the tree's sizes, blob ids and LFS sha256s (huggingface_hub reads the same).

        Its pages are followed here, one request each (huggingface_hub's ``list_repo_tree`` would follow them
        without end, empty pages unseen): at most ``TREE_PAGES`` pages and ``TREE_LIMIT`` entries, never a page
        asked twice, never to another host (the token goes with each page). A mirror that breaks one of these
        rules: HubResponseError naming it, before anything is downloaded."""
        from huggingface_hub import hf_raise_for_status
        from huggingface_hub.hf_api import RepoFile
        from huggingface_hub.utils import build_hf_headers  # type: ignore[attr-defined]

        from .._net import origin_key

        url: str | None = f"{self.endpoint}/api/models/{repo_id}/tree/{quote(commit, safe='')}?recursive=true"
        headers = build_hf_headers(token=self.token or False, library_name="dinov3-fetcher",
                                   library_version=__version__)
        session = hub.get_session()
        asked: set[str] = set()
        seen: set[str] = set()
        tree: list[Any] = []
        entry: Any = RepoFile  # (its constructor is untyped)
        broken = ""
        while url is not None and not broken:
            if len(asked) >= TREE_PAGES:
                broken = f"did not end after {TREE_PAGES} pages ({len(seen)} entries)"
                break
            asked.add(url)
            page = self._asked(functools.partial(_tree_page, session, url, headers, self.timeout,
                                                 hf_raise_for_status), repo_id, revision)
            try:
                for info in page.entries:
                    path = info["path"]
                    if path in seen or len(seen) >= TREE_LIMIT:
                        broken = f"gives {path!r} twice" if path in seen else f"did not end after {TREE_LIMIT} entries"
                        break
                    seen.add(path)
                    if info["type"] == "file":
                        tree.append(entry(**info))
            except Exception as exc:  # not a list of entries as the Hub's: an answer we cannot read
                raise_mapped(exc, repo_id, revision)
            url = urljoin(url, page.next) if page.next is not None else None
            if url is not None and url in asked:
                broken = f"points its next page back at a page it gave ({len(asked)} asked)"
            elif url is not None and origin_key(url) != origin_key(self.endpoint):
                broken = f"sends its next page to another host ({env.display_origin(url)})"
        if broken:
            raise HubResponseError(f"{display_endpoint(self.endpoint)} (HF_ENDPOINT): its tree listing of {repo_id} "
                                   f"{broken}: its pagination loops or never ends, so the mirror cannot say which "
                                   "files the checkpoint has",
                                   "set HF_ENDPOINT to a mirror that works (or unset it for https://huggingface.co) "
                                   "and run again; what dino_root holds is kept")
        return [(e.path, e.size, e.blob_id, e.lfs.sha256 if e.lfs else None) for e in tree]

    def raise_for_status(self, status: int, headers: Mapping[str, str], body: bytes, url: str,
                         repo_id: str, revision: str) -> NoReturn:
        raise_for_file_status(status, dict(headers), body, url, repo_id, revision)


_FAITHFUL = "check that HF_ENDPOINT points at a Hugging Face Hub or a faithful mirror"


def _client_that_starts(hub: ModuleType) -> None:
    """huggingface_hub's own client when it can start here; otherwise (an unusable SSL_CERT_FILE, a socks5://
    proxy variable without socksio: every request of the process would fail, also to an endpoint neither
    concerns) one built from the same network policy, which leaves each problem to the request it concerns
    (``_net.hub_client``). huggingface_hub keeps it for the process, as it keeps its own."""
    from .._net import ca_problem, hub_client

    if ca_problem(os.environ.get("SSL_CERT_FILE") or None, os.environ.get("SSL_CERT_DIR") or None) is None:
        try:
            hub.get_session()
            return
        except Exception:  # whatever its client's construction raised
            pass
    hub.set_client_factory(hub_client)  # (its read of a FIFO as SSL_CERT_FILE would never end: not even tried)


@dataclass(frozen=True)
class _TreePage:
    """One page of a tree listing: its entries (as the JSON gave them) and the URL of the next page, if any."""

    entries: list[Any]
    next: str | None


def _tree_page(session: Any, url: str, headers: dict[str, str], timeout: float,
               raise_for_status: Callable[[Any], None]) -> _TreePage:
    """GET one page of a tree listing through huggingface_hub's client; huggingface_hub's error for a failed
    answer (401, 404...), ValueError for a body that is not a JSON list."""
    r = session.get(url, headers=headers, timeout=timeout)
    raise_for_status(r)
    entries = r.json()
    if not isinstance(entries, list):
        raise ValueError("a tree page that is not a list")
    return _TreePage(entries, r.links.get("next", {}).get("url"))


def _retryable(exc: BaseException) -> bool:
    """Can another try of the metadata request fix ``exc``: a 408, 429 or 5xx, a timeout, a reset, a refused
    connection; not a 401, a 404 or a malformed answer."""
    import httpx2

    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status is not None:
        return status in (408, 429) or status >= 500
    return isinstance(exc, httpx2.TransportError | OSError)


def _retry_after(exc: BaseException) -> str | None:
    """The Retry-After header of the answer ``exc`` carries, if any."""
    response = getattr(exc, "response", None)
    return None if response is None else response.headers.get("Retry-After")


def raise_for_file_status(status: int, headers: dict[str, str], body: bytes, url: str,
                          repo_id: str, revision: str) -> NoReturn:
    """Turn a failed file download (status + X-Error-Code) into our error, via huggingface_hub's reading of it."""
    import httpx2

    import_hub()
    from huggingface_hub import hf_raise_for_status

    response = httpx2.Response(status, headers=headers, content=body, request=httpx2.Request("GET", url))
    try:
        hf_raise_for_status(response)
    except Exception as exc:
        raise_mapped(exc, repo_id, revision)
    name = urlsplit(url).path.rsplit("/", 1)[-1]  # never the query: a signed URL's query is a credential
    raise NetworkError(f"{env.display_origin(url)} answered HTTP {status} for {name}",
                       "retry later; the next run resumes where this one stopped")


def _page(repo_id: str) -> str:
    return f"https://huggingface.co/{repo_id}"


def _mirror_note() -> str:
    ep = endpoint()
    if ep == DEFAULT_ENDPOINT:
        return ""
    return f" (HF_ENDPOINT is {display_endpoint(ep)}: a mirror must pass the token on)"


def raise_mapped(exc: BaseException, repo_id: str, revision: str) -> NoReturn:
    """Raise the dinov3-fetcher error that says what ``exc`` (from huggingface_hub or httpx2) means for the user."""
    raise map_error(exc, repo_id, revision) from exc


def map_error(exc: BaseException, repo_id: str, revision: str) -> FetcherError:
    """The FetcherError that says what a huggingface_hub or httpx2 exception means for the user."""
    import httpx2

    import_hub()
    from huggingface_hub import errors as hf_errors

    status = getattr(getattr(exc, "response", None), "status_code", None)
    ep = display_endpoint()
    if isinstance(exc, hf_errors.GatedRepoError):
        if status == 403:
            return AuthenticationError(
                f"{repo_id} is gated and your token has not been granted access yet (403)",
                f"request access at {_page(repo_id)} and wait for the approval e-mail; fine-grained tokens also "
                f"need 'read access to public gated repos'{_mirror_note()}", status=403)
        return AuthenticationError(
            f"{repo_id} is gated and no token was sent (401)",
            f"request access at {_page(repo_id)}, then set HF_TOKEN to a read token "
            f"(https://huggingface.co/settings/tokens) or run 'hf auth login'{_mirror_note()}", status=401)
    if isinstance(exc, hf_errors.RevisionNotFoundError):
        return RevisionNotFoundError(f"revision {revision!r} does not exist in {repo_id}",
                                     "pass a branch, tag or commit that exists (the default is main)")
    if isinstance(exc, hf_errors.RepositoryNotFoundError):
        return RepositoryNotFoundError(
            f"repo {repo_id} was not found on {ep}",
            "check the id ('dinov3-fetcher list' shows the official ones); a private repo also needs HF_TOKEN")
    if isinstance(exc, hf_errors.RemoteEntryNotFoundError):
        return HubResponseError(f"{repo_id}@{revision} lists a file that {ep} cannot serve",
                                "retry later; if it persists the repo or mirror is inconsistent")
    if isinstance(exc, hf_errors.HfHubHTTPError) and status == 407:
        from .._net import refusal

        if (refused := refusal(407, endpoint(), endpoint())) is not None:  # a plain-HTTP proxy's answer
            return refused
    if isinstance(exc, hf_errors.HfHubHTTPError) and status == 401:
        return AuthenticationError(
            f"{ep} rejected the token (401 invalid credentials)",
            "set HF_TOKEN to a valid token from https://huggingface.co/settings/tokens, or run 'hf auth login'",
            status=401)
    if isinstance(exc, hf_errors.HfHubHTTPError) and status == 403:
        return AuthenticationError(f"{ep} refused access to {repo_id} (403)",
                                   f"check that your token may read {_page(repo_id)}{_mirror_note()}", status=403)
    if isinstance(exc, hf_errors.HfHubHTTPError) and status is not None and (status == 429 or status >= 500):
        return NetworkError(f"{ep} answered HTTP {status} for {repo_id} (overloaded or failing)",
                            "retry later; the next run resumes where this one stopped")
    if isinstance(exc, hf_errors.HfHubHTTPError):
        return NetworkError(f"{ep} answered HTTP {status} for {repo_id} without a Hub error code",
                            "check that HF_ENDPOINT points at the Hugging Face Hub or a mirror of it")
    if isinstance(exc, hf_errors.OfflineModeIsEnabled):
        return LocalEntryNotFoundError("HF_HUB_OFFLINE is set and the checkpoint is not complete on disk",
                                       "unset HF_HUB_OFFLINE to download it")
    if isinstance(exc, httpx2.HTTPError | OSError):
        from .._net import network_error

        if (explained := network_error(exc, endpoint())) is not None:  # a certificate, a proxy
            return explained
        if isinstance(exc, httpx2.TimeoutException):
            return NetworkError(f"{ep} (HF_ENDPOINT) did not answer in time ({type(exc).__name__})",
                                "check the network, raise DINOV3_FETCHER_TIMEOUT, or set HF_ENDPOINT to a "
                                "reachable mirror; HF_HUB_OFFLINE=1 uses what is on disk")
        return NetworkError(f"cannot reach {ep} (HF_ENDPOINT): {type(exc).__name__}",
                            "check the network, or set HF_ENDPOINT to a reachable mirror; "
                            "HF_HUB_OFFLINE=1 uses what is on disk")
    # Anything else (e.g. a mirror's model_info that is not JSON): an answer we cannot read, not a bug of ours.
    return HubResponseError(f"{ep} gave an answer for {repo_id}@{revision} that huggingface_hub could not read "
                            f"({type(exc).__name__})", _FAITHFUL)
