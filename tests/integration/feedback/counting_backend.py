"""HTTP backends that count their requests: ``counting_backend.py PORT ...`` serves each port.

``GET /`` is a request: counted, answered 200, or 500 while the port is failing.
``GET /control/fail`` and ``/control/ok`` set that; ``GET /control/count`` answers the count.
Control requests are not counted.
"""

from __future__ import annotations

import sys
import threading
from http.server import BaseHTTPRequestHandler

from backends import serve  # the script's own folder is first on sys.path


def handler() -> type[BaseHTTPRequestHandler]:
    lock = threading.Lock()
    state = {"count": 0, "fail": False}

    class Counting(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status, body = 200, b"ok"
            if self.path == "/control/fail":
                state["fail"] = True
            elif self.path == "/control/ok":
                state["fail"] = False
            elif self.path == "/control/count":
                body = str(state["count"]).encode()
            else:
                with lock:
                    state["count"] += 1
                if state["fail"]:
                    status = 500
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Counting


def main() -> None:
    serve([(int(port), handler()) for port in sys.argv[1:]])


if __name__ == "__main__":
    main()
