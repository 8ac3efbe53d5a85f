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


def serve(servers: list[tuple[int, type[BaseHTTPRequestHandler]]]) -> None:
    """Serve each (port, handler) on loopback in threads, say ``ready``, and run until killed
    (shared by the backend scripts of this folder)."""
    for port, cls in servers:
        server = ThreadingHTTPServer(("127.0.0.1", port), cls)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
    print("ready", flush=True)
    threading.Event().wait()


def main() -> None:
    specs = [spec.split(":") for spec in sys.argv[1:]]
    serve([(int(port), handler(float(delay))) for port, delay in specs])


if __name__ == "__main__":
    main()
