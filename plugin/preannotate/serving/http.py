"""The local HTTP door (``preannotate serve``): the same routes as the Nuclio function, for use without Nuclio."""

from __future__ import annotations

import json
import logging
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

from preannotate.serving.contract import MAX_BODY_BYTES
from preannotate.serving.core import App, Reply, Request

log = logging.getLogger(__name__)


def make_server(app: App | None, host: str = "127.0.0.1", port: int = 8765) -> ThreadingHTTPServer:
    """A server bound to ``host:port`` (an ``OSError`` at once when the port is taken) answering with ``app``; it
    may be set later (``server.app``), so that a busy port fails before a model is loaded."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            url = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY_BYTES:
                self._discard(length)  # read it, so the client gets to see the answer
                self._send(Reply(413, {"error": f"request body of {length} bytes is over the "
                                                f"{MAX_BODY_BYTES}-byte limit"}), close=True)
                return
            body = raw = self.rfile.read(length) if length else b""
            # As Nuclio does: JSON is decoded only when the content type says exactly application/json.
            if self.headers.get("Content-Type", "").split(";")[0].strip() == "application/json":
                try:
                    body = json.loads(body)
                except (UnicodeDecodeError, json.JSONDecodeError):
                    pass  # left as bytes: the contract reports what is wrong with it
            self._send(self.server.app.handle(Request(method=self.command, path=url.path, body=body, raw=raw,
                                          headers=dict(self.headers.items()), query=dict(parse_qsl(url.query)))))

        def _discard(self, length: int) -> None:
            while length > 0 and (chunk := self.rfile.read(min(length, 1 << 20))):
                length -= len(chunk)

        def _send(self, reply: Reply, close: bool = False) -> None:
            payload = json.dumps(reply.body).encode()
            self.send_response(reply.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            for key, value in reply.headers.items():
                self.send_header(key, str(value))
            if close:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = do_PUT = do_DELETE = _serve

        def log_message(self, format: str, *args) -> None:
            log.info("%s - %s", self.address_string(), format % args)

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 256  # the listen backlog: CVAT's workers and users may connect hundreds at once

    server = Server((host, port), Handler)
    server.app = app
    return server
