"""A stand-in for the Nuclio dashboard's function API: a real HTTP server on 127.0.0.1, functions held in memory.

Modelled on Nuclio 1.14.1 (mirror of github.com/nuclio/nuclio; CVAT 2.42's compose runs dashboard 1.13.0, whose
routes and update path are the same):

* Routes and status codes, ``pkg/restful/resource.go``: ``GET /api/functions`` (200, a JSON map name -> config,
  resource.go:403-418), ``GET /api/functions/<name>`` (200 config; 404 when not found, 420-445), ``PUT
  /api/functions/<name>`` (``handleUpdate``, 466-486: 202 with no body and ``Content-Type: application/json``, the
  encoder being made first). Errors are ``{"error": <root cause>, "errorStackTrace": ...}`` as JSON (664-731).
  Unknown paths get chi's ``404 page not found`` as text, a known path with another method 405.
* What the handlers do, ``pkg/dashboard/resource/function.go``: the namespace is the ``x-nuclio-function-namespace``
  header or the dashboard's default (610-614), ``x-nuclio-project-name`` filters by the label
  ``nuclio.io/project-name`` (686-691); a missing function is ``Function not found`` (654-666). Update (165-184)
  takes the name and namespace from the body, not the path or header (695-740: the body's namespace or the
  default; the project header overrides the label; a name is required), keeps only metadata and spec (299-305),
  answers once the function is "building" (324-339) and, with ``x-nuclio-wait-function-action: true``, after the
  deploy.
* The deploy, ``pkg/platform/abstract/platform.go`` and ``pkg/platform/local/platform.go`` (the platform of CVAT's
  compose): a stale ``metadata.resourceVersion`` is a 409 (404-428; kept only when seeded with one: the local
  platform has none); ``neverBuild`` for a function that does not exist is refused (364-366); the build decision
  of ``functionBuildRequired`` (1367-1395) and the ``skip-build`` annotation (161), the mode cleared (169), the
  image kept from the existing function when none is sent (223-225), a runtime required without a build
  (218-220); "building" stored before the answer (local 270-274), then "ready" with the previous port, the
  ``skip-build``/``skip-deploy`` annotations removed (local 294-319).
* nuctl deploy puts the function in its ``--namespace`` (``pkg/nuctl/command/deploy.go:384-385``, default
  ``nuclio``): ``add_function`` does the same.

Not modelled: builds themselves (one is recorded in ``builds`` and names the image as the builder would,
``pkg/processor/build/builder.go:570-600``), Go's encoding of every empty field, authentication, invocations,
logs, replicas, POST/DELETE/PATCH; a deploy failing after the answer only as ``fail_next_deploy`` says (state
``error``, local platform.go:236-257).
"""

from __future__ import annotations

import copy
import json
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest

DEFAULT_NAMESPACE = "nuclio"
PROJECT_LABEL = "nuclio.io/project-name"
_QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")  # k8s IsQualifiedName, without prefix


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]  # names in lower case
    body: Any  # the parsed JSON body, None when there was none


class _Answer(Exception):
    def __init__(self, status: int, error: str):
        super().__init__(error)
        self.status, self.error = status, error


class NuclioDashboardDouble:
    def __init__(self, *, deploy_seconds: float = 0.05, default_namespace: str = DEFAULT_NAMESPACE):
        self.deploy_seconds = deploy_seconds  # between the 202 and "ready"
        self.default_namespace = default_namespace
        self.requests: list[Request] = []
        self.builds: list[str] = []  # the functions an update built again
        self.deploys: list[str] = []  # the functions an update redeployed
        self.fail_next_deploy: str | None = None  # the message of the next redeploy, ending in state "error"
        self._functions: dict[tuple[str, str], dict] = {}  # (namespace, name) -> {metadata, spec, status}
        self._lock = threading.Lock()
        self._timers: list[threading.Timer] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- life cycle ---------------------------------------------------------------------------------------------

    def start(self) -> NuclioDashboardDouble:
        double = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # noqa: N802
                double._handle(self)

            def do_PUT(self):  # noqa: N802
                double._handle(self)

            def do_POST(self):  # noqa: N802
                double._handle(self)

            def do_DELETE(self):  # noqa: N802
                double._handle(self)

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),  # a quick shutdown
                                        name="nuclio-dashboard-double", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._lock:
            timers, self._timers = self._timers, []
        for timer in timers:
            timer.cancel()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def url(self) -> str:
        assert self._server is not None, "start() first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # -- state --------------------------------------------------------------------------------------------------

    def add_function(self, config: dict, *, namespace: str = DEFAULT_NAMESPACE, project: str = "cvat",
                     state: str = "ready", http_port: int = 32768) -> dict:
        """Seed a deployed function from ``config`` as a function.yaml holds it: in ``namespace`` (nuctl's
        ``--namespace`` overrides the file's), labelled with ``project`` (nuctl's ``--project-name``), with the
        image a build gave it (``spec.build.image``, else ``nuclio/processor-<name>:latest``) and ``status``."""
        stored = copy.deepcopy(config)
        metadata, spec = stored.setdefault("metadata", {}), stored.setdefault("spec", {})
        metadata["namespace"] = namespace
        metadata.setdefault("labels", {})[PROJECT_LABEL] = project
        build = spec.setdefault("build", {})
        spec.setdefault("image", build.get("image") or f"nuclio/processor-{metadata['name']}:latest")
        build.setdefault("timestamp", int(time.time()))
        stored["status"] = {"state": state, "httpPort": http_port, **(config.get("status") or {})}
        with self._lock:
            self._functions[(namespace, metadata["name"])] = stored
        return copy.deepcopy(stored)

    def function(self, name: str, namespace: str = DEFAULT_NAMESPACE) -> dict:
        """The stored config of function ``name`` (a copy)."""
        with self._lock:
            return copy.deepcopy(self._functions[(namespace, name)])

    def settle(self, timeout: float = 5.0) -> None:
        """Wait until every redeploy in progress has reached its final state."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                pending = [timer for timer in self._timers if timer.is_alive()]
            if not pending:
                return
            pending[0].join(max(0.0, deadline - time.monotonic()))
            if time.monotonic() > deadline:
                raise TimeoutError("redeploys still in progress")

    # -- HTTP ---------------------------------------------------------------------------------------------------

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        path = urlsplit(handler.path).path
        headers = {key.lower(): value for key, value in handler.headers.items()}
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode("utf-8", "replace")
        with self._lock:
            self.requests.append(Request(handler.command, path, headers, copy.deepcopy(body)))

        match = re.fullmatch(r"/api/functions/?([^/]*)", path)
        if match is None:
            return self._send(handler, 404, b"404 page not found\n", "text/plain; charset=utf-8")
        name = unquote(match.group(1))
        route = (handler.command, bool(name))
        if route not in (("GET", False), ("GET", True), ("PUT", True)):
            return self._send(handler, 405, b"", None)  # chi: the path exists, not for this method
        namespace = headers.get("x-nuclio-function-namespace") or self.default_namespace
        project = headers.get("x-nuclio-project-name") or ""
        try:
            if route == ("GET", False):
                with self._lock:
                    found = {key[1]: copy.deepcopy(config) for key, config in self._functions.items()
                             if key[0] == namespace and self._in_project(config, project)}
                return self._send_json(handler, 200, found)
            if route == ("GET", True):
                with self._lock:
                    config = copy.deepcopy(self._functions.get((namespace, name)))
                if config is None or not self._in_project(config, project):
                    raise _Answer(404, "Function not found")
                return self._send_json(handler, 200, config)
            if not isinstance(body, dict):
                raise _Answer(400, "Failed to parse JSON body")
            wait = headers.get("x-nuclio-wait-function-action", "").lower() == "true"
            self._update(body, project, wait)
            return self._send(handler, 202, b"", "application/json")
        except _Answer as answer:
            error = {"error": answer.error, "errorStackTrace": f"\n{answer.error}\n    .../nuclio/pkg/..."}
            return self._send_json(handler, answer.status, error)

    def _update(self, body: dict, project: str, wait: bool) -> None:
        metadata = copy.deepcopy(body.get("metadata") or {})
        spec = copy.deepcopy(body.get("spec") or {})  # status is parsed and dropped: only meta and spec deploy
        metadata["namespace"] = metadata.get("namespace") or self.default_namespace
        if project:
            metadata.setdefault("labels", {})[PROJECT_LABEL] = project
        name = metadata.get("name") or ""
        if not name:
            raise _Answer(400, "Function name must be provided in metadata")
        if not _QUALIFIED_NAME.match(name) or len(name) > 63:
            raise _Answer(400, "Function name doesn't conform to k8s naming convention")
        build = spec.setdefault("build", {})
        key = (metadata["namespace"], name)
        with self._lock:
            existing = self._functions.get(key)
            if existing is None and build.get("mode") == "neverBuild":
                raise _Answer(500, "Non existing function cannot be created with neverBuild mode")
            if existing is not None:
                stored_version = existing["metadata"].get("resourceVersion", "")
                sent_version = metadata.get("resourceVersion", "")
                if sent_version and sent_version != stored_version:
                    raise _Answer(409, "Function resource version is stale")
            annotations = metadata.get("annotations") or {}
            if str(annotations.get("skip-build", "")).lower() in ("true", "1", "t"):
                build_required = False
            else:
                build_required = self._build_required(spec)
            build.pop("mode", None)
            if build_required:
                self.builds.append(name)
                spec["image"] = build.get("image") or f"nuclio/processor-{name}:latest"
                build["timestamp"] = int(time.time())
            else:
                if not spec.get("runtime"):
                    raise _Answer(500, "If image is passed, runtime must be specified")
                if existing is not None and not spec.get("image"):
                    spec["image"] = existing["spec"].get("image")
            if existing is not None and "resourceVersion" in existing["metadata"]:
                metadata["resourceVersion"] = str(int(existing["metadata"]["resourceVersion"] or 0) + 1)
            port = (existing or {}).get("status", {}).get("httpPort")
            self._functions[key] = {"metadata": metadata, "spec": spec, "status": {"state": "building"}}
            self.deploys.append(name)
            failure, self.fail_next_deploy = self.fail_next_deploy, None
            timer = threading.Timer(0 if wait else self.deploy_seconds, self._deployed, (key, port, failure))
            self._timers.append(timer)
            timer.start()
        if wait:
            timer.join()

    @staticmethod
    def _build_required(spec: dict) -> bool:
        build = spec.get("build") or {}
        if build.get("mode") == "neverBuild":
            return False
        if build.get("functionSourceCode") or build.get("path") or build.get("image"):
            return True
        if build.get("codeEntryType") == "s3":
            return True
        if spec.get("image"):
            return False
        raise _Answer(500, "Function must have either spec.build.path,spec.build.functionSourceCode, "
                           "spec.build.image or spec.image set in order to create")

    def _deployed(self, key: tuple[str, str], port: int | None, failure: str | None) -> None:
        with self._lock:
            config = self._functions.get(key)
            if config is None or config["status"].get("state") != "building":
                return
            if failure is not None:  # local platform reportCreationError: state error, the error stack as message
                config["status"] = {"state": "error", "message": f"Error - {failure}\n    .../nuclio/pkg/..."}
                return
            annotations = config["metadata"].get("annotations")
            if annotations:
                annotations.pop("skip-build", None)
                annotations.pop("skip-deploy", None)
            config["status"] = {"state": "ready", **({"httpPort": port} if port else {})}

    @staticmethod
    def _in_project(config: dict, project: str) -> bool:
        return not project or (config["metadata"].get("labels") or {}).get(PROJECT_LABEL) == project

    @staticmethod
    def _send(handler: BaseHTTPRequestHandler, status: int, data: bytes, content_type: str | None) -> None:
        handler.send_response(status)
        if content_type:
            handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def _send_json(self, handler: BaseHTTPRequestHandler, status: int, value: Any) -> None:
        self._send(handler, status, (json.dumps(value) + "\n").encode(), "application/json")  # Go's Encode: + \n


@pytest.fixture
def nuclio_dashboard() -> Iterator[NuclioDashboardDouble]:
    """A started stand-in Nuclio dashboard, stopped after the test."""
    double = NuclioDashboardDouble().start()
    try:
        yield double
    finally:
        double.stop()
