"""The one secret scrubber, applied to every error as it is built (``FetcherError``) and to everything the CLI
prints: no code path puts a credential in a message, and this makes sure none slips through.

What it hides: every token this process could send (``_sources.known_secrets``: each source's, from the
environment and the saved logins, which are read without ever waiting on a FIFO or a device); the query string
of any URL (a signed location's query is a credential: X-Amz-Signature, X-Amz-Credential, Signature,
Expires...), also where the URL is broken up by a space; signed-URL parameters wherever they appear;
``user:password@`` in URLs; Bearer/Basic credentials.
"""

from __future__ import annotations

import re
import threading

__all__ = ["scrub"]

_SIGNED = (r"x-amz-[a-z0-9-]+|x-goog-[a-z0-9-]+|x-oss-[a-z0-9-]+|signature|expires|ossaccesskeyid|key-pair-id|"
           r"policy|googleaccessid|security-token|access_token|token|sig|se|sp|sv|sr|st|skoid|sktid|skt|ske|sks|skv")
_STOP = r"\s'\"<>"  # what ends a URL (or a query) in a message, a repr or JSON
_TAIL = rf"[^{_STOP}]*?(?=[).,;\]]*(?:[{_STOP}]|$))"  # the rest of a query, less the punctuation closing a phrase
_RULES = (
    # user:password@ in a URL
    (re.compile(rf"(?i)\b([a-z][a-z0-9+.-]*://)[^/{_STOP}@]*@"), r"\1***@"),
    # the query string of an http(s) URL
    (re.compile(rf"(?i)(\bhttps?://[^?#{_STOP}]+)\?{_TAIL}"), r"\1?<query hidden>"),
    # a query string wherever it is (a URL cut by a space, a bare path) once it carries a signed parameter
    (re.compile(rf"(?i)\?(?=(?:[^{_STOP}]*[&?])?(?:{_SIGNED})=){_TAIL}"), "?<query hidden>"),
    # any signed parameter left (a query with spaces in it, a header dump)
    (re.compile(rf"(?i)(?<![a-z0-9_-])({_SIGNED})=[^&#;{_STOP}]*"), r"\1=<hidden>"),
    (re.compile(r"(?i)\b(bearer|basic)\s+[a-z0-9._~+/=-]{4,}"), r"\1 <redacted>"),
    (re.compile(rf"(?i)\b(m_session_id=)[^;&{_STOP}]+"), r"\1<redacted>"),
)


_INSIDE = threading.local()  # scrub() running in this thread: reading a login must not build an error that scrubs


def scrub(text: str) -> str:
    """``text`` with every known token replaced by ``<redacted>`` and URL credentials hidden (see above)."""
    if not getattr(_INSIDE, "active", False):
        _INSIDE.active = True
        try:
            from ._sources import known_secrets

            for token in known_secrets():
                text = text.replace(token, "<redacted>")
        finally:
            _INSIDE.active = False
    for pattern, replacement in _RULES:
        text = pattern.sub(replacement, text)
    return text
