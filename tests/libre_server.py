"""A LibreTranslate look-alike for tests, on 127.0.0.1 at a free port.

It answers what deep-translator's `LibreTranslator` sends: ``POST /translate``
with q, source, target, format and api_key in the query string (form and JSON
bodies are read too, as other clients send them), replying
``{"translatedText": ...}``; and ``GET /languages``. It translates word by word
from WORDS, line by line, counts requests, and can be told to misbehave:

    with LibreServer() as server:
        server.fail("429", times=2)   # also "500", "hang", "drop", "lines"; times=None: for ever
        ...
        server.requests, server.received   # requests seen; q of each request
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, urlsplit

from fake_http import QuietHTTPServer

LANGUAGES = ("en", "es", "fr", "de", "zh")
WORDS = {  # en -> es; "um" translates to nothing and "ok" to itself, for the quality report
    "a": "un", "the": "el", "dog": "perro", "cat": "gato", "man": "hombre", "woman": "mujer",
    "child": "niño", "runs": "corre", "sits": "se sienta", "jumps": "salta", "on": "en", "in": "en",
    "grass": "hierba", "beach": "playa", "street": "calle", "red": "rojo", "black": "negro",
    "white": "blanco", "ball": "pelota", "with": "con", "and": "y", "is": "está", ".": ".",
    "um": "", "ok": "ok", "hippopotamuses": "h",
}
FAULTS = ("429", "500", "hang", "drop", "lines")


def translate_line(line: str) -> str:
    """The server's translation of one line: known words from WORDS, others upper-cased."""
    return " ".join(w for w in (WORDS.get(word.lower(), word.upper()) for word in line.split()) if w)


def translate_text(text: str) -> str:
    return "\n".join(translate_line(line) for line in text.split("\n"))


class LibreServer:
    def __init__(self, api_key: str | None = None, delay: float = 0.0, hang_seconds: float = 10.0):
        self.api_key = api_key  # required from clients when set
        self.delay = delay  # seconds each translation takes, to make concurrency visible
        self.hang_seconds = hang_seconds
        self.requests = 0  # POST /translate seen, faulty answers included
        self.received: list[str] = []  # q of every POST /translate
        self.inflight = self.max_inflight = 0
        self._faults: list[str] = []
        self._forever: str | None = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd = QuietHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.owner = self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/"

    def fail(self, kind: str, times: int | None = 1) -> None:
        """Misbehave on the next `times` translate requests (None: until `heal`)."""
        assert kind in FAULTS, kind
        with self._lock:
            if times is None:
                self._forever = kind
            else:
                self._faults.extend([kind] * times)

    def heal(self) -> None:
        with self._lock:
            self._faults.clear()
            self._forever = None

    def _next_fault(self) -> str | None:
        with self._lock:
            return self._faults.pop(0) if self._faults else self._forever

    def __enter__(self) -> LibreServer:
        threading.Thread(target=self._httpd.serve_forever, args=(0.02,), daemon=True).start()  # quick shutdown
        return self

    def __exit__(self, *exc) -> None:
        self._stopping.set()  # releases hanging handlers
        self._httpd.shutdown()
        self._httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def _reply(self, status: int, body) -> None:
        self._leave()  # the client may send its next request the moment it reads this one's answer
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if urlsplit(self.path).path.rstrip("/") != "/languages":
            return self._reply(404, {"error": "Not Found"})
        self._reply(200, [{"code": c, "name": c, "targets": [t for t in LANGUAGES if t != c]} for c in LANGUAGES])

    def do_POST(self) -> None:
        server: LibreServer = self.server.owner
        url = urlsplit(self.path)
        params = {k: v[0] for k, v in parse_qs(url.query).items()}
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode("utf-8")
        if body and "json" in (self.headers.get("Content-Type") or ""):
            params.update(json.loads(body))
        elif body:
            params.update({k: v[0] for k, v in parse_qs(body).items()})
        if url.path.rstrip("/") != "/translate":
            return self._reply(404, {"error": "Not Found"})
        with server._lock:
            server.requests += 1
            server.received.append(params.get("q", ""))
            server.inflight += 1
            server.max_inflight = max(server.max_inflight, server.inflight)
        self._inflight = True
        try:
            self._translate(server, params)
        finally:
            self._leave()

    def _leave(self) -> None:
        """A translate request stops counting as in flight once its answer starts (or it is dropped)."""
        if getattr(self, "_inflight", False):
            self._inflight = False
            with self.server.owner._lock:
                self.server.owner.inflight -= 1

    def _translate(self, server: LibreServer, params: dict) -> None:
        fault = server._next_fault()
        if fault == "drop":  # close the socket without a word
            self.close_connection = True
            return
        if fault == "hang":  # until well past any client time-out
            server._stopping.wait(server.hang_seconds)
            self.close_connection = True
            return
        if fault in ("429", "500"):
            return self._reply(int(fault), {"error": "Slowdown: too many requests" if fault == "429" else "boom"})
        if server.api_key and params.get("api_key") != server.api_key:
            return self._reply(403, {"error": "Invalid API key"})
        if "q" not in params:
            return self._reply(400, {"error": "Invalid request: missing q parameter"})
        if params.get("source") not in LANGUAGES or params.get("target") not in LANGUAGES:
            return self._reply(400, {"error": f"{params.get('source')}->{params.get('target')} is not supported"})
        time.sleep(server.delay)
        out = translate_text(params["q"])
        if fault == "lines" and "\n" in out:  # two lines come back as one
            out = out.replace("\n", " ", 1)
        self._reply(200, {"translatedText": out})
