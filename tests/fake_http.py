"""The test servers' shared base: `ThreadingHTTPServer` that keeps a client's dropped connection out of the output.

A client that gives up on a connection (a retry after a timeout, a download told to stop) resets it under the
handler thread, and socketserver prints that as a traceback in the middle of pytest's output though every test
passes. Only those resets are quiet here; any other error in a handler still prints.
"""

from __future__ import annotations

import sys
from http.server import ThreadingHTTPServer


class QuietHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    dropped = 0  # connections the client reset, counted instead of printed

    def handle_error(self, request, client_address) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):  # reset, aborted, broken pipe: the client left
            self.dropped += 1
            return
        super().handle_error(request, client_address)
