"""HTTP backends for the least_request test: ``backends.py PORT:SECONDS ...`` serves each port,
answering every request after that many seconds (threads: any number at once)."""

from __future__ import annotations

import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def handler(delay: float) -> type[BaseHTTPRequestHandler]:
    class Slow(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            time.sleep(delay)
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Slow


def main() -> None:
    for spec in sys.argv[1:]:
        port, delay = spec.split(":")
        server = ThreadingHTTPServer(("127.0.0.1", int(port)), handler(float(delay)))
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
    print("ready", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
