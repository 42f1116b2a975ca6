"""A local HTTP server whose content can change between requests: the internet of split-view poisoning.

:class:`ContentServer` serves an in-memory mapping path -> bytes on 127.0.0.1 (an ephemeral port by
default, never another interface unless asked) from a daemon thread. ``put`` changes what a URL serves
(the attacker who bought an expired domain), ``remove`` makes it 404 (link rot). Use it as a context
manager so the socket is always closed::

    with ContentServer() as srv:
        url = srv.put("img/0.png", b"...")
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from urllib.parse import quote, unquote, urlparse

from ...errors import ConfigError


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 (the http.server hook's name)
        path = unquote(urlparse(self.path).path).lstrip("/")
        with self.server.lock:
            body = self.server.content.get(path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the base class's name)
        pass  # quiet: tests and simulations make thousands of requests


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int]) -> None:
        super().__init__(address, _Handler)
        self.content: dict[str, bytes] = {}
        self.lock = threading.Lock()


class ContentServer:
    """HTTP server on ``host`` (127.0.0.1 by default) serving mutable in-memory content."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host, self.port = host, port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> ContentServer:
        if self._server is not None:
            return self
        self._server = _Server((self.host, self.port))
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="mlaudit-content-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server, self._thread = None, None

    def __enter__(self) -> ContentServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _live(self) -> _Server:
        if self._server is None:
            raise ConfigError("ContentServer is not running; use it as a context manager or call start()")
        return self._server

    def url(self, path: str) -> str:
        """The URL that serves ``path``."""
        return f"http://{self.host}:{self.port}/{quote(path.lstrip('/'))}"

    def put(self, path: str, body: bytes) -> str:
        """Serve ``body`` at ``path`` from now on; returns its URL."""
        srv = self._live()
        with srv.lock:
            srv.content[path.lstrip("/")] = bytes(body)
        return self.url(path)

    def remove(self, path: str) -> None:
        """Stop serving ``path`` (404 from now on)."""
        srv = self._live()
        with srv.lock:
            srv.content.pop(path.lstrip("/"), None)
