"""A tiny HTTP server for the synthetic source's files, so that ingest's download stage is real.

Standard library only (`http.server.ThreadingHTTPServer`): it runs in a background thread of the
process that needs it (a test, the demo) or in the foreground for `ldm synth --serve`.
``GET /<id>.png`` answers the PNG file (image/png); when only ``<id>.png.html`` exists it answers that
body as text/html with status 200, the "not an image" fault of a real crawl; otherwise 404.
"""

from __future__ import annotations

import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from ldm.synth.source import NOT_IMAGE_SUFFIX


def _handler_for(root: Path) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        # Hand-written instead of SimpleHTTPRequestHandler: that one lists directories and guesses
        # types from extensions; we need exactly three answers (PNG, HTML fault, 404).
        server_version = "ldm-synth/1"

        def _resolve(self) -> tuple[Path, str] | None:
            name = unquote(urlsplit(self.path).path).lstrip("/")
            if not name or "/" in name or name.startswith("."):
                return None  # flat folder: no subfolders, no traversal, no hidden files
            candidate = root / name
            if candidate.is_file():
                return candidate, "image/png" if name.endswith(".png") else "application/octet-stream"
            html = root / (name + NOT_IMAGE_SUFFIX)
            if html.is_file():
                return html, "text/html; charset=utf-8"
            return None

        def _answer(self, with_body: bool) -> None:
            found = self._resolve()
            if found is None:
                self.send_error(HTTPStatus.NOT_FOUND)
                return
            path, content_type = found
            body = path.read_bytes()
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if with_body:
                self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 (the stdlib's naming)
            self._answer(with_body=True)

        def do_HEAD(self) -> None:  # noqa: N802
            self._answer(with_body=False)

        def log_message(self, format: str, *args) -> None:  # noqa: A002
            pass  # thousands of requests per ingest: keep the console quiet

    return Handler


class ImageServer:
    """Serve ``root`` over HTTP from a background thread; a context manager.

    ``port=0`` picks a free port; read it back from ``.port`` / ``.base_url``.
    """

    def __init__(self, root: str | Path, host: str = "127.0.0.1", port: int = 0):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root} is not a folder")
        self._httpd = ThreadingHTTPServer((host, port), _handler_for(self.root))
        self._httpd.daemon_threads = True
        self.host = host
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="ldm-synth-server", daemon=True
        )
        self._thread.start()

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def wait(self) -> None:
        """Block until the server stops (`ldm synth --serve`)."""
        while self._thread.is_alive():
            self._thread.join(timeout=0.5)  # a timeout keeps Ctrl-C responsive

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    def __enter__(self) -> ImageServer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()
