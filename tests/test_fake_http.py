"""The test servers' base stays quiet when a client resets its connection, and only then."""

from __future__ import annotations

import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler

from fake_http import QuietHTTPServer


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        raise ValueError("a handler's own bug")


def _serve():
    httpd = QuietHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=httpd.serve_forever, args=(0.02,), daemon=True).start()
    return httpd


def _reset(port: int) -> None:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with RST, not FIN
    sock.close()


def test_a_reset_connection_prints_nothing_but_a_handler_error_still_prints(capfd):
    httpd = _serve()
    port = httpd.server_address[1]
    try:
        for _ in range(5):
            _reset(port)
        time.sleep(0.3)
        assert httpd.dropped >= 1  # the resets reached a handler (on Linux, all five), and none of them printed
        assert capfd.readouterr().err == ""

        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
            sock.recv(1024)
        time.sleep(0.3)
        assert "ValueError: a handler's own bug" in capfd.readouterr().err
    finally:
        httpd.shutdown()
        httpd.server_close()
