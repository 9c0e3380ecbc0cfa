"""A local web origin: a small HTTP server on its own loopback port, in a thread.

It serves the test page the way a merchant's site would, from an origin other than
flowray's, so the tracker's requests to flowray are cross-origin and CORS is exercised
for real. Pages are bytes in memory (the page's files, the tracker out of its verified
tarball, a config.js written by the test); every request is recorded. Given an
``events`` list, it also answers ``POST /api/event`` itself, as a stand-in endpoint
that records what the tracker sent (with CORS headers, so the tracker sees its answer).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import orjson

from tests.tracker_page import package

PAGE_DIR = Path(__file__).resolve().parent
BODY_BYTES_MAX = 64 * 1024
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8"}


@dataclass
class Origin:
    port: int
    pages: dict[str, tuple[str, bytes]]  # path -> (content type, body)
    events: list[dict[str, Any]] | None = None
    requests: list[tuple[str, str, str]] = field(default_factory=list)  # (method, host, path)
    lock: threading.Lock = field(default_factory=threading.Lock)


def site_pages(config: dict[str, Any], page_paths: tuple[str, ...]) -> dict[str, tuple[str, bytes]]:
    """The test site: index.html at each of ``page_paths``, page.js, go.html, the
    tracker as vendor/plausible.js, and ``config`` as the module config.js."""
    tracker = package.load()
    html = (PAGE_DIR / "index.html").read_bytes()
    pages = {path: (CONTENT_TYPES[".html"], html) for path in page_paths}
    pages["/page.js"] = (CONTENT_TYPES[".js"], (PAGE_DIR / "page.js").read_bytes())
    pages["/go.html"] = (CONTENT_TYPES[".html"], (PAGE_DIR / "go.html").read_bytes())
    pages["/vendor/plausible.js"] = (CONTENT_TYPES[".js"], tracker.script)
    module = b"export const config = " + orjson.dumps(config) + b";\n"
    pages["/config.js"] = (CONTENT_TYPES[".js"], module)
    return pages


class _Handler(BaseHTTPRequestHandler):
    origin: Origin  # set on the subclass made per server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        pass  # the requests are recorded, not printed

    def _record(self) -> str:
        path = self.path.partition("?")[0]
        with self.origin.lock:
            self.origin.requests.append((self.command, self.headers.get("Host", ""), path))
        return path

    def do_GET(self) -> None:  # noqa: N802 - the base class's name
        page = self.origin.pages.get(self._record())
        if page is None:
            self.send_error(404)
            return
        content_type, body = page
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:  # noqa: N802 - the base class's name
        path = self._record()
        length = int(self.headers.get("Content-Length") or 0)
        if path != "/api/event" or self.origin.events is None:
            self.send_error(404)
            return
        if length > BODY_BYTES_MAX:
            self.send_error(413)
            return
        event = orjson.loads(self.rfile.read(length))
        with self.origin.lock:
            self.origin.events.append({"body": event, "headers": dict(self.headers)})
        self.send_response(202)
        self.send_header("Access-Control-Allow-Origin", self.headers.get("Origin", "*"))
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")


@contextmanager
def serving(origin: Origin) -> Iterator[Origin]:
    """Serve ``origin`` on 127.0.0.1:origin.port until the block ends."""
    handler = type("Handler", (_Handler,), {"origin": origin})
    server = ThreadingHTTPServer(("127.0.0.1", origin.port), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield origin
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
