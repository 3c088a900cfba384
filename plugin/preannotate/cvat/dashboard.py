"""Keeping a deployed CVAT function in step with its model, through the Nuclio dashboard's HTTP API.

The Nuclio dashboard (port 8070; CVAT's compose service is named ``nuclio``) is where CVAT's lambda manager learns
which functions exist: it lists ``GET /api/functions`` with ``x-nuclio-project-name: cvat`` and builds each
function's label mapping from ``metadata.annotations.spec`` of the answer, on every listing
(``cvat/apps/lambda_manager/views.py``, ``LambdaGateway._http`` and ``LambdaFunction``). So a new spec in the
dashboard is a new spec in CVAT, with no CVAT restart. nuctl and the dashboard's UI go through the same API.

Routes used (Nuclio 1.13-1.14, ``pkg/dashboard/resource/function.go``, ``pkg/restful/resource.go``):

* ``GET /api/functions/<name>``: the function's ``{metadata, spec, status}``; 404 ``{"error": "Function not
  found", ...}`` when the project (header) or namespace (header, else the dashboard's default) has no such function.
* ``PUT /api/functions/<name>``: ``Update`` reads ``{metadata, spec}`` from the body (the name comes from
  ``metadata.name``, not the path), stores it and redeploys the function: it is the same ``CreateFunction`` a
  first deploy runs (function.go:165-184, 299-305). It answers 202 with no body once the function is in its
  "building" state (function.go:324-339); with ``x-nuclio-wait-function-action: true`` only after the deploy ended,
  and even then a failed deploy is not in the answer: the function's ``status.state`` says ``error``.

Why no rebuild: ``CreateFunction`` builds the image again whenever ``spec.build`` holds a path, source code or an
image name (``pkg/platform/abstract/platform.go``, ``functionBuildRequired``, 1367-1395) — our functions name their
image in ``spec.build.image``, so a plain PUT would rebuild it (minutes, or a failure where the build's files are
not at hand). ``spec.build.mode: neverBuild`` skips the build and redeploys ``spec.image`` as it is
(platform.go:1369-1372, 212-225). The redeploy still replaces the function's container
(``pkg/platform/local/platform.go``, 305-319) or pod: a process of that function asking for it is stopped soon
after the 202, so it must have finished everything else first.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlsplit

import urllib3

DASHBOARD_ENV = "PREANNOTATE_NUCLIO_DASHBOARD"  # e.g. http://nuclio:8070
NAMESPACE_ENV = "PREANNOTATE_NUCLIO_NAMESPACE"  # optional: the dashboard's default namespace otherwise
# Set by Nuclio's processor for the runtime process of every function (pkg/processor/runtime/runtime.go:173-179,
# passed on by the Python runtime with the container's environment, python/runtime.go:89-91), and on Kubernetes
# in the container's environment too (pkg/platform/kube/functionres/lazy.go:1828).
NUCLIO_FUNCTION_NAME_ENV = "NUCLIO_FUNCTION_NAME"
FUNCTION_NAME_ENV = "PREANNOTATE_FUNCTION_NAME"  # for a process started outside Nuclio's processor
DEFAULT_PORT = 8070  # the dashboard's port, as CVAT's settings default (cvat/settings/base.py, NUCLIO["PORT"])
PROJECT_LABEL = "nuclio.io/project-name"  # pkg/common/consts.go:38
# Waiting for a redeploy: Nuclio alone may wait 120 s for the function's readiness (pkg/platformconfig/types.go:35),
# beyond a request's usual timeout.
DEPLOY_WAIT_SECONDS = 600.0
_FAILED_STATES = ("error", "unhealthy")
_HINT = f"is the dashboard running, and is {DASHBOARD_ENV} right (CVAT's compose serves it at http://nuclio:8070)?"


class DashboardError(RuntimeError):
    """A problem with the Nuclio dashboard or the function in it, in one sentence an operator can act on."""


class NuclioDashboard:
    """A client of the Nuclio dashboard at ``url`` for the functions of Nuclio project ``project`` (CVAT lists
    ``cvat``) in ``namespace`` (None: the dashboard's default, ``nuclio`` for CVAT's compose and nuctl's default)."""

    def __init__(self, url: str, project: str = "cvat", namespace: str | None = None, timeout: float = 10.0):
        self.url = _base_url(url)
        self.project = project
        self.namespace = namespace or None
        self.timeout = timeout
        # One retry of a refused connection (the dashboard restarting); never of a request that reached it: a PUT
        # that timed out may still have started a redeploy.
        self._pool = urllib3.PoolManager(retries=urllib3.Retry(total=1, connect=1, read=0, status=0, redirect=0,
                                                               backoff_factor=0.2))

    @classmethod
    def from_environment(cls, environ: Mapping[str, str]) -> NuclioDashboard | None:
        """The dashboard named by ``$PREANNOTATE_NUCLIO_DASHBOARD`` (and ``$PREANNOTATE_NUCLIO_NAMESPACE``), or None
        when it is not set: then nobody said where the dashboard is."""
        url = (environ.get(DASHBOARD_ENV) or "").strip()
        if not url:
            return None
        return cls(url, namespace=(environ.get(NAMESPACE_ENV) or "").strip() or None)

    def get_function(self, name: str) -> dict:
        """The function's configuration as the dashboard holds it: ``{"metadata", "spec", "status"}``."""
        config = self._request("GET", name)
        if not isinstance(config, dict) or not isinstance(config.get("metadata"), dict) \
                or not isinstance(config.get("spec"), dict):
            raise DashboardError(f"the Nuclio dashboard at {self.url} answered something that is not a function's "
                                 f"configuration for {name}; is {DASHBOARD_ENV} the dashboard's address (port 8070)?")
        return config

    def update_function(self, name: str, *, annotations: dict[str, str] | None = None,
                        env: dict[str, str] | None = None, wait: bool = False) -> dict:
        """Set the given ``metadata.annotations`` keys and ``spec.env`` entries of the deployed function (the others,
        and their order, kept; a new entry goes last) and redeploy it with its built image; returns the
        configuration sent. Nothing is sent when nothing would change (a PUT restarts the function). ``wait``: answer
        after the redeploy, and raise if it failed — not from inside the function being updated, whose process the
        redeploy stops."""
        current = self.get_function(name)
        body = {"metadata": copy.deepcopy(current["metadata"]), "spec": copy.deepcopy(current["spec"])}
        # status is read-only: the dashboard parses it and deploys only metadata and spec (function.go:48-52,
        # 302-305); it is left out so that nobody takes it for something sent.
        metadata, spec = body["metadata"], body["spec"]
        metadata["name"] = name  # Update takes the name from the body, not the path (function.go:695-723)
        # The dashboard sets the label from the project header anyway (function.go:707-714); it is in the body too
        # for a dashboard that does not.
        metadata["labels"] = {**(metadata.get("labels") or {}), PROJECT_LABEL: self.project}
        # metadata.resourceVersion stays as read: on Kubernetes a function changed since the GET is refused with 409
        # instead of being overwritten (platform.go:404-428); the local platform keeps none.

        new_annotations = dict(metadata.get("annotations") or {})
        for key, value in (annotations or {}).items():
            new_annotations[key] = _text(value, f"annotation {key}")  # a changed key keeps its place
        metadata["annotations"] = new_annotations

        entries = [dict(entry) for entry in spec.get("env") or []]
        for key, value in (env or {}).items():
            value = _text(value, f"environment variable {key}")
            entry = next((entry for entry in entries if entry.get("name") == key), None)
            if entry is None:
                entries.append({"name": key, "value": value})
            else:
                entry.pop("valueFrom", None)  # a literal value replaces a reference (Kubernetes EnvVar: one of both)
                entry["value"] = value
        if entries or "env" in spec:
            spec["env"] = entries

        if not spec.get("image"):
            raise DashboardError(f"function {name} in Nuclio project {self.project} has no built image (spec.image "
                                 f"is empty at {self.url}), so an update would rebuild it: deploy it with nuctl first")
        # Redeploy the image spec.image names instead of building it again (platform.go:1369-1372); Nuclio clears
        # the mode once it has decided (platform.go:169), so it is not left in the stored configuration.
        spec["build"] = {**(spec.get("build") or {}), "mode": "neverBuild"}

        unchanged = (new_annotations == (current["metadata"].get("annotations") or {})
                     and entries == list(current["spec"].get("env") or []))
        if unchanged:
            return body
        self._request("PUT", name, body=body, wait=wait)
        if wait:
            status = self.get_function(name).get("status") or {}
            if status.get("state") in _FAILED_STATES:
                # The local platform stores the error stack (platform.go:236-257): its first line says what failed.
                message = (str(status.get("message") or "").strip().splitlines() or ["no message"])[0]
                raise DashboardError(f"Nuclio could not redeploy function {name} (state {status['state']}: "
                                     f"{message[:300]}); see its logs in the dashboard at {self.url}")
        return body

    def _request(self, method: str, name: str, *, body: dict | None = None, wait: bool = False) -> Any:
        url = f"{self.url}/api/functions/{quote(name, safe='')}"
        # pkg/common/headers/headers.go:26-39; the project header filters by the function's project label
        # (function.go:686-691), as CVAT's listing does.
        headers = {"x-nuclio-project-name": self.project, "Accept": "application/json"}
        if self.namespace:
            headers["x-nuclio-function-namespace"] = self.namespace
        data = None
        if body is not None:
            headers["Content-Type"] = "application/json"
            data = json.dumps(body).encode()
        if wait:
            headers["x-nuclio-wait-function-action"] = "true"
        read = max(self.timeout, DEPLOY_WAIT_SECONDS) if wait else self.timeout
        try:
            response = self._pool.request(method, url, body=data, headers=headers, preload_content=True,
                                          timeout=urllib3.Timeout(connect=self.timeout, read=read))
        except urllib3.exceptions.MaxRetryError as error:
            raise _connection_error(error.reason or error, url, read) from None
        except urllib3.exceptions.HTTPError as error:
            raise _connection_error(error, url, read) from None
        if not 200 <= response.status < 300:
            raise DashboardError(self._status_message(method, name, url, response.status, response.data))
        if method == "PUT" or not response.data:  # Update answers 202 with an empty body (resource.go:466-486)
            return None
        try:
            return json.loads(response.data)
        except ValueError:
            return None  # get_function says what is wrong with it

    def _status_message(self, method: str, name: str, url: str, status: int, data: bytes) -> str:
        reason, from_dashboard = _reason(data)
        said = f" ({status}: {reason})" if reason else f" ({status})"
        if status == 404 and not from_dashboard:  # the dashboard's errors are JSON: this is some other server
            return (f"the server at {self.url} does not look like a Nuclio dashboard ({method} {url} answered "
                    f"404{': ' + reason if reason else ''}); is {DASHBOARD_ENV} the dashboard's address "
                    "(port 8070)?")
        if status == 404 and method == "GET":
            where = f"namespace {self.namespace}" if self.namespace else "the dashboard's default namespace"
            return (f"no function {name} in Nuclio project {self.project} ({where}, dashboard at {self.url}, 404); "
                    f"check the function's name ({FUNCTION_NAME_ENV}) and that it was deployed with "
                    f"--project-name {self.project}")
        if status == 409:
            return (f"function {name} was changed in Nuclio while it was being updated{said}; run the update "
                    "again")
        if status in (401, 403):
            return f"the Nuclio dashboard at {self.url} refused to {method} function {name}{said}; check its access"
        return f"the Nuclio dashboard answered {method} {url} with {status}{': ' + reason if reason else ''}"


def function_name_from_environment(environ: Mapping[str, str]) -> str | None:
    """The name Nuclio gives the running function (``$NUCLIO_FUNCTION_NAME``), else ``$PREANNOTATE_FUNCTION_NAME``,
    else None."""
    for key in (NUCLIO_FUNCTION_NAME_ENV, FUNCTION_NAME_ENV):
        value = (environ.get(key) or "").strip()
        if value:
            return value
    return None


def _base_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if "://" not in url:  # "nuclio" or "nuclio:8070": the dashboard over plain HTTP, on its port by default
        url = "http://" + url
        if urlsplit(url).port is None:
            url += f":{DEFAULT_PORT}"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise DashboardError(f"the Nuclio dashboard address {url!r} is not an http(s) URL; set {DASHBOARD_ENV} to "
                             "one such as http://nuclio:8070")
    return url


def _text(value: object, what: str) -> str:
    if not isinstance(value, str):  # Nuclio's annotations and env values are strings (map[string]string, EnvVar)
        raise TypeError(f"{what} must be a string, not {type(value).__name__}")
    return value


def _reason(data: bytes) -> tuple[str, bool]:
    """The one-line reason of an error answer, and whether it is the dashboard's own: ``error`` of a JSON body
    (resource.go:664-705), else the text."""
    text = data.decode("utf-8", "replace").strip()
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    ours = isinstance(parsed, dict) and "error" in parsed
    if ours:
        text = str(parsed["error"])
    lines = text.splitlines()
    return (lines[0][:300] if lines else ""), ours


def _connection_error(reason: BaseException, url: str, read_timeout: float) -> DashboardError:
    if isinstance(reason, urllib3.exceptions.NewConnectionError):
        return DashboardError(f"cannot connect to the Nuclio dashboard at {url} (connection refused or no such "
                              f"host); {_HINT}")
    if isinstance(reason, urllib3.exceptions.ConnectTimeoutError):
        return DashboardError(f"the Nuclio dashboard at {url} did not accept the connection in time; {_HINT}")
    if isinstance(reason, (urllib3.exceptions.ReadTimeoutError, TimeoutError)):
        return DashboardError(f"the Nuclio dashboard at {url} did not answer within {read_timeout:g} s; look at "
                              "the dashboard's log, and at the function's state there before trying again")
    text = str(reason).strip().splitlines()
    return DashboardError(f"lost the connection to the Nuclio dashboard at {url} "
                          f"({text[-1] if text else type(reason).__name__}); {_HINT}")
