"""A static file server for pack tests, on 127.0.0.1 at a free port, that can misbehave.

It serves the files of one folder with Range support (206 and
Content-Range, as nginx and `python -m http.server`-alikes do), records every
request, and can be told, per path, to cut the connection after some bytes
(once), to answer 503 for a while, or to redirect:

    with PackServer(folder) as server:
        server.drop("/zh.cappack", after=1000)         # the next GET sends 1000 bytes, then closes
        server.unavailable("/zh.cappack", times=5)     # the next 5 GETs get 503 Service Unavailable
        server.redirect("/old.cappack", "ftp://127.0.0.1/zh.cappack")
        server.url("index.json"), server.requests        # [(path, Range header or None), ...]
"""

from __future__ import annotations

import re
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import unquote, urlsplit

from fake_http import QuietHTTPServer


class PackServer:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.requests: list[tuple[str, str | None]] = []
        self._drops: dict[str, int] = {}
        self._unavailable: dict[str, int] = {}
        self._redirects: dict[str, str] = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                path = unquote(urlsplit(self.path).path)
                server.requests.append((path, self.headers.get("Range")))
                if server._unavailable.get(path, 0) > 0:
                    server._unavailable[path] -= 1
                    self.send_error(503)
                    return
                if path in server._redirects:
                    self.send_response(302)
                    self.send_header("Location", server._redirects[path])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                file = (server.root / path.lstrip("/")).resolve()
                if server.root.resolve() not in file.parents or not file.is_file():
                    self.send_error(404)
                    return
                data = file.read_bytes()
                start, status = 0, 200
                m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                if m:
                    start, status = int(m.group(1)), 206
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                body = data[start:]
                self.send_response(status)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes")
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                cut = server._drops.pop(path, None)
                if cut is not None:  # half the body, then a dead connection
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self._httpd = QuietHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}"

    def drop(self, path: str, after: int) -> None:
        self._drops[path] = after

    def unavailable(self, path: str, times: int) -> None:
        self._unavailable[path] = times

    def redirect(self, path: str, location: str) -> None:
        self._redirects[path] = location

    def __enter__(self) -> "PackServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
