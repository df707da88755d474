"""A counting HTTP service that crash-test workers call for every step operation.

A real ``http.server.ThreadingHTTPServer`` on 127.0.0.1 (port 0), run in a thread of the
test process. ``POST /op/<name>`` with a JSON body counts one call of operation ``<name>``
and records its ``Idempotency-Key`` header. The response is a deterministic function of
the operation and the body (``"<op>:<digest of body>"``), so a re-run operation returns
what the first run returned and the workflow's result does not depend on how often an operation ran.

In dedup mode a request whose (operation, key) was seen before performs nothing and gets
the first response again, the way a paid API that honours ``Idempotency-Key`` behaves:
``calls`` still counts it, ``performed`` does not.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["CountingService"]

_PREFIX = "/op/"


class CountingService:
    """Counts requests per operation; ``start``/``stop`` or use it as a context manager.

    Args:
        dedup: whether a repeated idempotency key performs nothing.
    """

    def __init__(self, *, dedup: bool = False) -> None:
        self.dedup = dedup
        self._lock = threading.Lock()
        self._calls: Counter[str] = Counter()
        self._performed: Counter[str] = Counter()
        self._keys: dict[str, list[str | None]] = {}
        self._responses: dict[tuple[str, str], bytes] = {}
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> CountingService:
        """Bind 127.0.0.1 on a free port and serve in a daemon thread."""
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                if not self.path.startswith(_PREFIX):
                    self.send_error(404)
                    return
                op = self.path[len(_PREFIX) :]
                reply = service._handle(op, self.headers.get("Idempotency-Key"), body)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep the test output clean

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="counting-service",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)
        self._server = None
        self._thread = None

    def __enter__(self) -> CountingService:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        assert self._server is not None, "the service is not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # -- the counting -------------------------------------------------------------------

    def _handle(self, op: str, key: str | None, body: bytes) -> bytes:
        digest = hashlib.sha256(body).hexdigest()[:16]
        reply = json.dumps({"op": op, "value": f"{op}:{digest}"}).encode()
        with self._lock:
            self._calls[op] += 1
            self._keys.setdefault(op, []).append(key)
            if self.dedup and key is not None:
                seen = self._responses.get((op, key))
                if seen is not None:
                    return seen
                self._responses[(op, key)] = reply
            self._performed[op] += 1
        return reply

    def calls(self, op: str) -> int:
        """How many requests operation ``op`` received."""
        with self._lock:
            return self._calls[op]

    def performed(self, op: str) -> int:
        """How many of them took effect (all of them unless in dedup mode)."""
        with self._lock:
            return self._performed[op]

    def keys(self, op: str) -> list[str | None]:
        """The ``Idempotency-Key`` header of each request of ``op``, in arrival order."""
        with self._lock:
            return list(self._keys.get(op, []))

    def counts(self) -> dict[str, int]:
        """Calls per operation."""
        with self._lock:
            return dict(self._calls)

    def reset(self) -> None:
        """Forget every count, key and stored response."""
        with self._lock:
            self._calls.clear()
            self._performed.clear()
            self._keys.clear()
            self._responses.clear()
