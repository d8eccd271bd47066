"""A proxy.py plugin for the tests: records every request the proxy parsed (one JSON line each).

Loaded by the proxy.py subprocess of the ``forward_proxy`` fixture (tests/net_fixtures.py) with
``--plugins proxy_plugin.Recorder``; the file is ``$PROXY_RECORD_FILE``. A CONNECT tunnel shows as one CONNECT
record: what goes through it is TLS the proxy cannot read, so it is never recorded. A plain-HTTP request
forwarded by the proxy is recorded with its headers (that is what the proxy sees in clear).
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any

from proxy.http.parser import HttpParser
from proxy.http.proxy import HttpProxyBasePlugin

_LOCK = threading.Lock()


class Recorder(HttpProxyBasePlugin):
    def handle_client_request(self, request: HttpParser) -> HttpParser | None:
        headers = {k.decode("latin-1").lower(): v[1].decode("latin-1")
                   for k, v in (request.headers or {}).items()}
        rec: dict[str, Any] = {
            "method": (request.method or b"").decode("latin-1"),
            "host": (request.host or b"").decode("latin-1"),
            "port": request.port,
            "path": (request.path or b"").decode("latin-1"),
            "headers": headers,
        }
        with _LOCK, open(os.environ["PROXY_RECORD_FILE"], "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
        return request
