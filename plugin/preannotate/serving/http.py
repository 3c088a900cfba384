"""The local HTTP door (``preannotate serve``): the same routes as the Nuclio function, for use without Nuclio."""

from __future__ import annotations

import json
import logging
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

from preannotate.serving.contract import MAX_BODY_BYTES, ContractError, json_body
from preannotate.serving.core import App, Reply, Request

log = logging.getLogger(__name__)


def make_server(app: App | None, host: str = "127.0.0.1", port: int = 8765) -> ThreadingHTTPServer:
    """A server bound to ``host:port`` (an ``OSError`` at once when the port is taken) answering with ``app``; it
    may be set later (``server.app``), so that a busy port fails before a model is loaded."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = 60  # seconds a client may stall mid-request (or idle between requests) before it is let go
        disable_nagle_algorithm = True  # the headers and the body are two writes: the body must not wait for an ACK

        def _serve(self) -> None:
            try:
                reply, close = self._answer()
            except TimeoutError:  # the client stopped sending its body
                reply, close = Reply(408, {"error": f"the request body did not arrive within {self.timeout} s"}), True
            except ConnectionError:  # the client is gone: nobody to answer
                self.close_connection = True
                return
            except Exception:  # a bug here must not drop the connection either
                reply, close = App.internal_error(self.command, self.path), True
            try:
                self._send(reply, close)
            except OSError:  # the client is gone
                self.close_connection = True
            except Exception:  # an answer that cannot be encoded: nothing was written yet
                try:
                    self._send(App.internal_error(self.command, self.path), close=True)
                except OSError:
                    self.close_connection = True

        def _answer(self) -> tuple[Reply, bool]:
            """The reply, and whether the connection must close after it (the body was not read to its end)."""
            if self.headers.get("Transfer-Encoding"):
                return Reply(411, {"error": "send the request body with a Content-Length header: this server does "
                                            "not read chunked bodies"}), True
            text = (self.headers.get("Content-Length") or "0").strip()
            if not (text.isascii() and text.isdigit()):
                return Reply(400, {"error": "the Content-Length header must be a number of bytes"}), True
            if len(text) > 18 or int(text) > MAX_BODY_BYTES:
                size = ""
                if len(text) <= 18:
                    self._discard(int(text))  # read it, so the client gets to see the answer
                    size = f" of {int(text)} bytes"
                return Reply(413, {"error": f"request body{size} is over the {MAX_BODY_BYTES}-byte limit"}), True
            length = int(text)
            raw = self.rfile.read(length) if length else b""
            if len(raw) < length:
                return Reply(400, {"error": f"the request body ended after {len(raw)} of the {length} bytes its "
                                            "Content-Length announced"}), True
            try:
                url = urlsplit(self.path)
            except ValueError:
                return Reply(400, {"error": "the request path is not a valid URL path"}), False
            body = raw
            # As Nuclio does: JSON is decoded only when the content type says exactly application/json. What does
            # not decode to an object or array stays bytes: the route reports what is wrong with it.
            if raw and self.headers.get("Content-Type", "").split(";")[0].strip() == "application/json":
                try:
                    decoded = json_body(raw)
                except ContractError:
                    decoded = None
                if isinstance(decoded, (dict, list)):
                    body = decoded
            app = self.server.app
            if app is None:
                return Reply(503, {"error": "the function is still loading its model: try again in a moment"}), False
            return app.handle(Request(method=self.command, path=url.path, body=body, raw=raw,
                                      headers=dict(self.headers.items()), query=dict(parse_qsl(url.query)))), False

        def _discard(self, length: int) -> None:
            try:
                while length > 0 and (chunk := self.rfile.read(min(length, 1 << 20))):
                    length -= len(chunk)
            except OSError:  # a client that stalls or goes: the answer is sent (or not) all the same
                pass

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
            if self.command != "HEAD":
                self.wfile.write(payload)

        def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
            """http.server's own refusals (a malformed request line or headers) answered as JSON too."""
            self.log_error("code %d, message %s", code, message)
            if self.request_version == "HTTP/0.9":  # a request line too broken to say its version: answer HTTP/1.x
                self.request_version = "HTTP/1.1"
            sentence = {414: "the request line is too long", 431: "the request headers are too long or too many",
                        417: "the Expect header can only ask for 100-continue",
                        505: "this HTTP version is not supported: use HTTP/1.1"}.get(
                code, "the request is not valid HTTP: its request line or headers are malformed")
            self._send(Reply(code, {"error": sentence}), close=True)

        def __getattr__(self, name: str):
            if name.startswith("do_"):  # every method goes to the app, which answers 405 for those it has no route for
                return self._serve
            raise AttributeError(name)

        def log_message(self, format: str, *args) -> None:
            log.info("%s - %s", self.address_string(), format % args)

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 256  # the listen backlog: CVAT's workers and users may connect hundreds at once

    server = Server((host, port), Handler)
    server.app = app
    return server
