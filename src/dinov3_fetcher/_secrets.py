"""The one secret scrubber, applied to every error as it is built (``FetcherError``) and to everything the CLI
prints: no code path puts a credential in a message, and this makes sure none slips through.

What it hides: every token this process could send (each source registers where its tokens are, from the
environment and the saved logins, which are read without ever waiting on a FIFO or a device: ``register``;
this module imports nothing of the package, so that every error can scrub itself); the query string
of any URL (a signed location's query is a credential: X-Amz-Signature, X-Amz-Credential, Signature,
Expires...), also where the URL is broken up by a space; signed-URL parameters wherever they appear;
``user:password@`` in URLs; Bearer/Basic credentials.

The HTTP layer does not rely on it: the text of each of its errors is built with ``without_url_secrets``, which
cuts out the query, fragment and user:password of the URL it was for, whatever the parameters are called; this
scrubber is the second line.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Callable

__all__ = ["register", "scrub", "without_url_secrets"]

_SIGNED = (r"x-amz-[a-z0-9-]+|x-goog-[a-z0-9-]+|x-oss-[a-z0-9-]+|signature|expires|ossaccesskeyid|key-pair-id|"
           r"policy|googleaccessid|security-token|access_token|token|sig|se|sp|sv|sr|st|skoid|sktid|skt|ske|sks|skv")
_STOP = r"\s'\"<>"  # what ends a URL (or a query) in a message, a repr or JSON
_TAIL = rf"[^{_STOP}]*?(?=[).,;\]]*(?:[{_STOP}]|$))"  # the rest of a query, less the punctuation closing a phrase
# Compiled at their first use (re's cache keeps them), not at import: every command imports this module.
_RULES = (
    # user:password@ in a URL
    (rf"(?i)\b([a-z][a-z0-9+.-]*://)[^/{_STOP}@]*@", r"\1***@"),
    # the query string of an http(s) URL
    (rf"(?i)(\bhttps?://[^?#{_STOP}]+)\?{_TAIL}", r"\1?<query hidden>"),
    # a query string wherever it is (a URL cut by a space, a bare path) once it carries a signed parameter
    (rf"(?i)\?(?=(?:[^{_STOP}]*[&?])?(?:{_SIGNED})=){_TAIL}", "?<query hidden>"),
    # any signed parameter left (a query with spaces in it, a header dump)
    (rf"(?i)(?<![a-z0-9_-])({_SIGNED})=[^&#;{_STOP}]*", r"\1=<hidden>"),
    (r"(?i)\b(bearer|basic)\s+[a-z0-9._~+/=-]{4,}", r"\1 <redacted>"),
    (rf"(?i)\b(m_session_id=)[^;&{_STOP}]+", r"\1<redacted>"),
)


_INSIDE = threading.local()  # scrub() running in this thread: reading a login must not build an error that scrubs
_PROVIDERS: list[Callable[[], list[str]]] = []


def register(provider: Callable[[], list[str]]) -> None:
    """Hide from now on every token ``provider()`` lists (a source's tokens: it registers when it is imported,
    before any of its code can have read one). ``provider`` must never block; what it raises is ignored."""
    if provider not in _PROVIDERS:
        _PROVIDERS.append(provider)


def _tokens() -> list[str]:
    found: list[str] = []
    for provider in list(_PROVIDERS):
        with contextlib.suppress(Exception):
            found += [t.strip() for t in provider() if len(t.strip()) >= 4]
    return sorted(set(found), key=len, reverse=True)  # a token that holds another one goes first


def scrub(text: str) -> str:
    """``text`` with every known token replaced by ``<redacted>`` and URL credentials hidden (see above)."""
    if not getattr(_INSIDE, "active", False):
        _INSIDE.active = True
        try:
            for token in _tokens():
                text = text.replace(token, "<redacted>")
        finally:
            _INSIDE.active = False
    for pattern, replacement in _RULES:
        text = re.sub(pattern, replacement, text)
    return text


_ANY_QUERY = rf"\?(?!<query hidden>)[^{_STOP}]+"  # (compiled at first use, as _RULES)


def without_url_secrets(text: str, *urls: str) -> str:
    """``text`` (an error's, from the HTTP layer) with every part of ``urls`` that can carry a credential cut out,
    whatever its parameters are called: the query and the fragment (``?<query hidden>``) and user:password
    (``***``), in each form a message shows them (as sent, as a repr escapes them, percent-encoded or decoded);
    then whatever follows a ``?`` anywhere else in it, up to a space or a quote. Not a list of parameter names:
    a signing scheme never seen before is cut out as well."""
    from urllib.parse import quote, unquote

    cuts: list[tuple[str, str]] = []
    for url in urls:  # split by hand: urlsplit drops tabs and line breaks, which a message may show escaped
        head, _, fragment = url.partition("#")
        head, _, query = head.partition("?")
        userinfo = head.partition("://")[2].partition("/")[0].rpartition("@")[0]
        cuts += [("?" + query, "?<query hidden>"), ("#" + fragment, "#<hidden>"), (userinfo, "***"),
                 (userinfo.partition(":")[2], "***")]
    forms = sorted({(form, hidden) for secret, hidden in cuts if len(secret) > 1
                    for form in (secret, repr(secret)[1:-1], unquote(secret), quote(secret, safe="?#=&/:@"))},
                   key=lambda c: len(c[0]), reverse=True)  # a longer form that holds a shorter one goes first
    for form, hidden in forms:
        text = text.replace(form, hidden)
    return re.sub(_ANY_QUERY, "?<query hidden>", text)
