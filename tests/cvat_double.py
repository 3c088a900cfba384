"""A CVAT 2.42 test double: a real HTTP server on 127.0.0.1 that answers like the recordings in
``tests/fixtures/cvat-2.42`` (see the README of the shared fixtures for what was observed).

State lives in memory and is seeded from the recordings: project 6 with labels 18-22, task 7
"fixtures-images" (6 JPEG frames, jobs 7 and 8, the final annotations) and task 8 "fixtures-standalone"
(3 PNG frames, job 9). ``add_task`` adds synthetic tasks (e.g. 300 frames for a benchmark), image or video (MP4
chunks encoded with PyAV; not recorded from a server). ``fail_next`` injects errors and cut connections.

Not modelled: organizations, webhooks, exports/imports, task creation over HTTP, and the server-side cutting of
tracks at job boundaries (tracks are stored as sent, in the job holding their first frame; task-level views add
the closing ``outside`` shape the server adds when a track ends inside a job that is not the last one).
"""

from __future__ import annotations

import base64
import copy
import gzip
import io
import json
import math
import mimetypes
import re
import secrets
import threading
import uuid
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
from PIL import Image

FIXTURES = Path(__file__).parent / "fixtures" / "cvat-2.42"
RECORDED_BASE = "http://127.0.0.1:8080"  # the base URL inside the recorded bodies; replaced on the way out
JSON_TYPE = "application/vnd.cvat+json"
USERNAME = "admin"
CUT = 0  # fail_next status: drop the connection halfway through the answer
PASSWORD = "double-password"

FrameSpec = tuple[str, bytes, int, int]  # (name, file bytes, width, height)

_COMMON_HEADERS = {
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "strict-origin-when-cross-origin",
    "cross-origin-opener-policy": "same-origin",
}
_SERVER_ERROR_HTML = (
    '<!doctype html>\n<html lang="en">\n<head>\n  <title>Server Error (500)</title>\n</head>\n<body>\n'
    "  <h1>Server Error (500)</h1><p></p>\n</body>\n</html>\n"
)
_SHAPE_TYPES = ("rectangle", "polygon", "polyline", "points", "ellipse", "cuboid", "mask", "skeleton")
_JOB_CHOICES = {"state": ("new", "in progress", "rejected", "completed"),
                "stage": ("annotation", "validation", "acceptance")}
_KINDS = ("tags", "shapes", "tracks")
_ID_COUNTER = {"tags": "tag", "shapes": "shape", "tracks": "track"}
# Key orders as the server emits them: GET (stored) vs. write responses (PATCH/PUT echo the request serializer).
_STORED_ORDER = {
    "tags": ("id", "label_id", "frame", "group", "source", "attributes"),
    "shapes": ("id", "label_id", "type", "frame", "group", "source", "occluded", "outside", "z_order", "rotation",
               "points", "attributes", "elements"),
    "tracks": ("id", "label_id", "frame", "group", "source", "shapes", "attributes", "elements"),
    "track_shapes": ("id", "type", "frame", "occluded", "outside", "z_order", "rotation", "points", "attributes"),
}
_WRITE_ORDER = {
    "tags": ("id", "frame", "label_id", "group", "source", "attributes"),
    "shapes": ("type", "occluded", "outside", "z_order", "rotation", "points", "id", "frame", "label_id", "group",
               "source", "attributes", "elements"),
    "tracks": ("id", "frame", "label_id", "group", "source", "attributes", "shapes", "elements"),
    "track_shapes": ("type", "occluded", "outside", "z_order", "rotation", "points", "id", "frame", "attributes"),
}
_WRITE_DEFAULTS = {
    "tags": {"group": 0, "source": "manual", "attributes": []},
    "shapes": {"occluded": False, "outside": False, "z_order": 0, "rotation": 0, "group": 0, "source": "manual",
               "attributes": [], "elements": []},
    "tracks": {"group": 0, "source": "manual", "attributes": [], "elements": []},
    "track_shapes": {"occluded": False, "outside": False, "z_order": 0, "rotation": 0, "attributes": []},
}
_PALETTE = ("#33ddff", "#fa3253", "#34d1b7", "#ff007c", "#ddff33", "#24b353", "#b83df5", "#66ff66")


def load_fixture(relative: str) -> Any:
    """A recorded JSON body from tests/fixtures/cvat-2.42."""
    return json.loads((FIXTURES / relative).read_text())


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _ordered(obj: dict, order: Sequence[str]) -> dict:
    return {key: obj[key] for key in order if key in obj}


def _zip_entries(relative: str) -> list[bytes]:
    with zipfile.ZipFile(FIXTURES / relative) as archive:
        return [archive.read(name) for name in archive.namelist()]


@dataclass
class Frame:
    name: str
    data: bytes  # the uploaded file: what quality=original serves
    width: int
    height: int
    compressed: bytes | None = None  # JPEG at the task's image_quality; made on first use for synthetic frames


@dataclass
class Job:
    id: int
    task_id: int
    start: int
    stop: int
    record: dict  # GET /api/jobs/ID body; status is derived on output
    chunks_updated_date: str  # per job: recorded job 7 and job 8 differ, the task shows the latest


@dataclass
class Task:
    id: int
    record: dict  # GET /api/tasks/ID body; status and jobs summary are derived on output
    frames: list[Frame]
    job_ids: list[int]
    chunk_size: int
    image_quality: int
    chunks_updated_date: str
    annotations: dict[str, list[dict]] = field(default_factory=lambda: {kind: [] for kind in _KINDS})
    video: str | None = None  # the video's file name for a video task: its chunks are MP4s
    deleted_frames: list[int] = field(default_factory=list)  # as PATCH data/meta would mark them


@dataclass
class Fault:
    pattern: re.Pattern[str]
    method: str | None
    status: int
    times: int
    body: Any
    after: int = 0  # matching requests answered normally before the fault starts


@dataclass(frozen=True)
class RequestRecord:
    method: str
    path: str
    query: dict[str, str]
    status: int

    @property
    def target(self) -> str:
        return self.path + ("?" + urlencode(self.query) if self.query else "")


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str | None = JSON_TYPE
    headers: list[tuple[str, str]] = field(default_factory=list)
    cut: bool = False  # the connection drops halfway through the body (a reset mid-download)


class HttpError(Exception):
    """Ends a request with a JSON error body (the recorded error bodies are lists, strings or dicts)."""

    def __init__(self, status: int, payload: Any, headers: list[tuple[str, str]] | None = None) -> None:
        super().__init__(status, payload)
        self.status, self.payload, self.headers = status, payload, headers or []


@dataclass
class _Request:
    method: str
    path: str
    query: dict[str, str]
    raw_query: str
    headers: Any  # email.message.Message from http.server
    body: bytes
    base: str  # scheme://host as the client addressed us: absolute URLs are built from it, like DRF does

    def json(self) -> Any:
        try:
            return json.loads(self.body or b"{}")
        except ValueError as error:
            raise HttpError(400, {"detail": f"JSON parse error - {error}"}) from None

    def int_param(self, name: str) -> int | None:
        value = self.query.get(name)
        return int(value) if value is not None and value.lstrip("-").isdigit() else None


# (path regex, Allow header as recorded, {method: handler name}, needs authentication)
_VIEWS: list[tuple[re.Pattern[str], str, dict[str, str], bool]] = [
    (re.compile(p), allow, methods, auth)
    for p, allow, methods, auth in [
        (r"/api/server/about", "GET, HEAD, OPTIONS", {"GET": "_about"}, False),
        (r"/api/auth/login", "POST, OPTIONS", {"POST": "_login"}, False),
        (r"/api/auth/logout", "POST, OPTIONS", {"POST": "_logout"}, False),
        (r"/api/users/self", "GET, HEAD, OPTIONS", {"GET": "_user_self"}, True),
        (r"/api/projects", "GET, POST, HEAD, OPTIONS", {"GET": "_project_list"}, True),
        (r"/api/projects/(\d+)", "GET, PATCH, DELETE, HEAD, OPTIONS", {"GET": "_project"}, True),
        (r"/api/tasks", "GET, POST, HEAD, OPTIONS", {"GET": "_task_list"}, True),
        (r"/api/tasks/(\d+)", "GET, PATCH, DELETE, HEAD, OPTIONS", {"GET": "_task", "DELETE": "_task_delete"}, True),
        (r"/api/tasks/(\d+)/data/meta", "GET, PATCH, HEAD, OPTIONS", {"GET": "_task_meta"}, True),
        (r"/api/tasks/(\d+)/data", "GET, POST, HEAD, OPTIONS", {"GET": "_task_data"}, True),
        (r"/api/tasks/(\d+)/annotations", "GET, POST, PUT, PATCH, DELETE, HEAD, OPTIONS",
         {m: "_task_annotations" for m in ("GET", "PUT", "PATCH", "DELETE")}, True),
        (r"/api/jobs", "GET, POST, HEAD, OPTIONS", {"GET": "_job_list"}, True),
        (r"/api/jobs/(\d+)", "GET, PATCH, DELETE, HEAD, OPTIONS", {"GET": "_job", "PATCH": "_job_patch"}, True),
        (r"/api/jobs/(\d+)/data/meta", "GET, PATCH, HEAD, OPTIONS", {"GET": "_job_meta"}, True),
        (r"/api/jobs/(\d+)/data", "GET, HEAD, OPTIONS", {"GET": "_job_data"}, True),
        (r"/api/jobs/(\d+)/annotations", "GET, POST, PUT, PATCH, DELETE, HEAD, OPTIONS",
         {m: "_job_annotations" for m in ("GET", "PUT", "PATCH", "DELETE")}, True),
        (r"/api/labels", "GET, HEAD, OPTIONS", {"GET": "_label_list"}, True),
        (r"/api/labels/(\d+)", "GET, PATCH, DELETE, HEAD, OPTIONS", {"GET": "_label"}, True),
        (r"/api/webhooks", "GET, POST, HEAD, OPTIONS", {"GET": "_webhook_list", "POST": "_webhook_create"}, True),
    ]
]


class CvatDouble:
    """In-memory CVAT 2.42 served over HTTP. Use as a context manager (or the ``cvat_double`` fixture)::

        with CvatDouble() as cvat:
            client = make_client(cvat.base_url, credentials=cvat.credentials)
    """

    def __init__(self, *, password: str = PASSWORD, gzip_responses: bool = True) -> None:
        self.username, self.password = USERNAME, password
        self.gzip_responses = gzip_responses  # like the recordings: bodies >= 200 bytes gzipped when it helps
        self.requests: list[RequestRecord] = []
        self.faults: list[Fault] = []
        self.errors: list[Exception] = []  # unexpected exceptions raised while answering (each answered with 500)
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._tokens: dict[str, str] = {}  # Token key -> username
        self._sessions: dict[str, str] = {}  # sessionid -> username
        self._chunk_cache: dict[tuple, bytes] = {}
        self._current_base = RECORDED_BASE  # scheme://host of the request being answered (set under the lock)
        self.users = {USERNAME: load_fixture("api/GET_api_users_self.json")}
        self._about_body = load_fixture("api/GET_api_server_about.json")
        self.projects: dict[int, dict] = {}
        self.labels: dict[int, dict] = {}
        self.tasks: dict[int, Task] = {}
        self.jobs: dict[int, Job] = {}
        self.webhooks: dict[int, dict] = {}  # as created, secret included (CVAT never returns it)
        # Next ids: after the recorded objects (task 9 / job 10 / shape 99 were created and deleted).
        self._next = {"task": 10, "job": 11, "data": 10, "label": 25, "attribute": 3,
                      "shape": 100, "tag": 9, "track": 7, "track_shape": 15}
        self._seed()

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> CvatDouble:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.double = self  # type: ignore[attr-defined]
        # A short poll interval keeps stop() (and so every test using the fixture) fast.
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,), name="cvat-double",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> CvatDouble:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        assert self._server is not None, "start() the double first"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def credentials(self) -> tuple[str, str]:
        return (self.username, self.password)

    # ----------------------------------------------------------------- test helpers

    def fail_next(self, path_regex: str, status: int = 500, times: int = 1, *, method: str | None = None,
                  body: Any = None, after: int = 0) -> None:
        """Answer the next ``times`` requests whose ``path?query`` matches ``path_regex`` with ``status`` (after
        letting ``after`` of them through).
        The default 500 body is Django's HTML error page; otherwise ``body`` (JSON) or ``{"detail": ...}``.
        ``status=CUT`` sends the real answer but drops the connection halfway through the body (logged as 0)."""
        with self._lock:
            self.faults.append(Fault(re.compile(path_regex), method, status, times, body, after))

    def count(self, path_regex: str = "", method: str | None = None) -> int:
        """How many logged requests match ``path_regex`` (searched in ``path?query``) and ``method``."""
        pattern = re.compile(path_regex)
        with self._lock:
            return sum(1 for r in self.requests
                       if (method is None or r.method == method) and pattern.search(r.target))

    def clear_requests(self) -> None:
        with self._lock:
            self.requests.clear()

    def annotations(self, task_id: int) -> dict[str, list[dict]]:
        """The stored annotations of a task (a copy, GET key order)."""
        with self._lock:
            return copy.deepcopy(self.tasks[task_id].annotations)

    def label_id(self, task_id: int, name: str) -> int:
        return next(label["id"] for label in self._task_labels(self.tasks[task_id]) if label["name"] == name)

    def add_task(self, name: str, frames: Sequence[FrameSpec], labels: Sequence[dict] | None = None, *,
                 project_id: int | None = None, segment_size: int | None = None, chunk_size: int = 72,
                 image_quality: int = 70, annotations: dict | None = None, video: str | None = None) -> int:
        """Add a task and return its id. ``labels``: ``[{"name", "type"?, "color"?, "attributes"?: [{"name",
        "input_type", "values", "default_value"?, "mutable"?}]}]`` for a standalone task; with ``project_id`` the
        project's labels are used. ``segment_size`` None = one job. ``annotations`` (request format) are stored
        as a PATCH ``action=create`` would. ``video`` (a file name, e.g. ``"clip.mp4"``) makes it a video task: the
        frames (same size, even width and height) are served as H.264 MP4 chunks and the meta lists one entry."""
        with self._lock:
            if project_id is not None and project_id not in self.projects:
                raise KeyError(f"no project {project_id}")
            if project_id is not None and labels:
                raise ValueError("tasks in a project use the project's labels")
            if not frames:
                raise ValueError("a task needs at least one frame")
            task_id, now = self._new_id("task"), _now()
            size = len(frames)
            segment = segment_size or size
            template = copy.deepcopy(self._task_template[project_id is not None])
            template.update({
                "url": f"{RECORDED_BASE}/api/tasks/{task_id}", "id": task_id, "name": name, "project_id": project_id,
                "created_date": now, "updated_date": now, "overlap": 0, "segment_size": segment,
                "data_chunk_size": chunk_size, "size": size, "image_quality": image_quality,
                "data": self._new_id("data"),
            })
            template["jobs"]["url"] = f"{RECORDED_BASE}/api/jobs?task_id={task_id}"
            template["labels"]["url"] = f"{RECORDED_BASE}/api/labels?task_id={task_id}"
            task = Task(task_id, template, [Frame(*spec) for spec in frames], [], chunk_size, image_quality, now,
                        video=video)
            if video:
                template.update({"mode": "interpolation", "data_original_chunk_type": "video",
                                 "data_compressed_chunk_type": "video"})
            self.tasks[task_id] = task
            for spec in labels or []:
                self._add_label(spec, task_id=task_id)
            for start in range(0, size, segment):
                self._add_job(task, start, min(start + segment, size) - 1, now)
            if annotations:
                try:
                    self._write(task, None, "create", annotations)
                except HttpError as error:
                    self._drop_task(task_id)
                    raise ValueError(f"invalid annotations: {error.payload}") from None
            return task_id

    # ----------------------------------------------------------------- seeding from the recordings

    def _seed(self) -> None:
        project = load_fixture("api/GET_api_projects_ID.json")
        self.projects[project["id"]] = project
        for label in (load_fixture("api/GET_api_labels__project_id=ID.json")["results"]
                      + load_fixture("api/GET_api_labels__task_id=ID.standalone.json")["results"]):
            self.labels[label["id"]] = label
        jobs = (load_fixture("api/GET_api_jobs__task_id=ID.json")["results"]
                + load_fixture("api/GET_api_jobs__task_id=ID.standalone.json")["results"])
        job_dates = {job_id: load_fixture(f"api/GET_api_jobs_ID_data_meta.job{n}.json")["chunks_updated_date"]
                     for n, job_id in ((1, 7), (2, 8))}
        seeds = [("api/GET_api_tasks_ID.json", "api/GET_api_tasks_ID_data_meta.json", "",
                  ["api/GET_api_jobs_ID_annotations.job1.json", "api/GET_api_jobs_ID_annotations.job2.json"]),
                 ("api/GET_api_tasks_ID.standalone.json", "api/GET_api_tasks_ID_data_meta.standalone.json",
                  ".standalone", ["api/GET_api_tasks_ID_annotations.standalone.json"])]
        for record_file, meta_file, suffix, annotation_files in seeds:
            record, meta = load_fixture(record_file), load_fixture(meta_file)
            chunk = "data/GET_api_tasks_ID_data__type=chunk,number=0,quality={}" + suffix + ".zip"
            originals, compressed = _zip_entries(chunk.format("original")), _zip_entries(chunk.format("compressed"))
            frames = [Frame(f["name"], data, f["width"], f["height"], small)
                      for f, data, small in zip(meta["frames"], originals, compressed, strict=True)]
            task = Task(record["id"], record, frames, [], meta["chunk_size"], meta["image_quality"],
                        meta["chunks_updated_date"])
            for job in sorted((j for j in jobs if j["task_id"] == task.id), key=lambda j: j["id"]):
                dated = job_dates.get(job["id"], task.chunks_updated_date)
                self.jobs[job["id"]] = Job(job["id"], task.id, job["start_frame"], job["stop_frame"], job, dated)
                task.job_ids.append(job["id"])
            # Stored state = the job views concatenated (the task view is rebuilt from them, as the server does).
            for path in annotation_files:
                for kind in _KINDS:
                    task.annotations[kind].extend(load_fixture(path)[kind])
            self.tasks[task.id] = task
        self._task_template = {True: copy.deepcopy(self.tasks[7].record), False: copy.deepcopy(self.tasks[8].record)}
        self._job_template = {True: copy.deepcopy(self.jobs[7].record), False: copy.deepcopy(self.jobs[9].record)}

    def _new_id(self, kind: str) -> int:
        value = self._next[kind]
        self._next[kind] += 1
        return value

    def _add_label(self, spec: dict, *, task_id: int) -> None:
        label_id = self._new_id("label")
        attributes = [{
            "id": self._new_id("attribute"), "name": a["name"], "mutable": a.get("mutable", False),
            "input_type": a.get("input_type", "text"),
            "default_value": a.get("default_value", (a.get("values") or [""])[0]), "values": list(a.get("values", [])),
        } for a in spec.get("attributes", [])]
        self.labels[label_id] = {
            "id": label_id, "name": spec["name"], "color": spec.get("color", _PALETTE[label_id % len(_PALETTE)]),
            "attributes": attributes, "type": spec.get("type", "any"), "sublabels": [], "task_id": task_id,
            "parent_id": None, "has_parent": False,
        }

    def _add_job(self, task: Task, start: int, stop: int, now: str) -> None:
        job_id = self._new_id("job")
        record = copy.deepcopy(self._job_template[task.record["project_id"] is not None])
        record.update({
            "url": f"{RECORDED_BASE}/api/jobs/{job_id}", "id": job_id, "task_id": task.id,
            "project_id": task.record["project_id"], "state": "new", "stage": "annotation",
            "frame_count": stop - start + 1, "start_frame": start, "stop_frame": stop,
            "data_chunk_size": task.chunk_size, "created_date": now, "updated_date": now,
            "issues": {"url": f"{RECORDED_BASE}/api/issues?job_id={job_id}", "count": 0},
            "labels": {"url": f"{RECORDED_BASE}/api/labels?job_id={job_id}"},
        })
        self.jobs[job_id] = Job(job_id, task.id, start, stop, record, now)
        task.job_ids.append(job_id)

    # ----------------------------------------------------------------- HTTP plumbing

    def _dispatch(self, method: str, target: str, headers: Any, body: bytes) -> Response:
        parts = urlsplit(target)
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        request = _Request(method, parts.path.rstrip("/") or "/", query, parts.query, headers, body,
                           "http://" + (headers.get("Host") or "127.0.0.1"))
        with self._lock:
            self._current_base = request.base
            try:
                response = self._fault(request) or self._route(request)
            except HttpError as error:
                response = self._json(error.payload, error.status, error.headers)
            except Exception as error:  # a bug in the double: answer like Django would, keep it for the test to see
                self.errors.append(error)
                response = Response(500, _SERVER_ERROR_HTML.encode(), "text/html; charset=utf-8")
            self.requests.append(RequestRecord(method, request.path, query, CUT if response.cut else response.status))
        return response

    def _fault(self, request: _Request) -> Response | None:
        target = request.path + ("?" + request.raw_query if request.raw_query else "")
        for fault in self.faults:
            if fault.times > 0 and (fault.method in (None, request.method)) and fault.pattern.search(target):
                if fault.after > 0:
                    fault.after -= 1
                    continue
                fault.times -= 1
                if fault.status == CUT:
                    response = self._route(request)
                    response.cut = True
                    return response
                if fault.body is None and fault.status == 500:
                    return Response(500, _SERVER_ERROR_HTML.encode(), "text/html; charset=utf-8")
                return self._json(fault.body if fault.body is not None else {"detail": "Injected failure."},
                                  fault.status)
        return None

    def _route(self, request: _Request) -> Response:
        for pattern, allow, methods, needs_auth in _VIEWS:
            match = pattern.fullmatch(request.path)
            if match is None:
                continue
            self._negotiate(request)
            self._authenticate(request, required=needs_auth)
            handler = methods.get("GET" if request.method == "HEAD" else request.method)
            if handler is None:
                raise HttpError(405, {"detail": f'Method "{request.method}" not allowed.'})
            response: Response = getattr(self, handler)(request, *map(int, match.groups()))
            response.headers.append(("allow", allow))
            return response
        return Response(404, b"<h1>Not Found</h1><p>The requested resource was not found on this server.</p>",
                        "text/html; charset=utf-8")

    @staticmethod
    def _negotiate(request: _Request) -> None:
        accept = request.headers.get("Accept")
        if accept is None:
            return
        ranges = {item.split(";")[0].strip().lower() for item in accept.split(",")}
        if not ranges & {"*/*", "application/*", JSON_TYPE}:
            raise HttpError(406, {"detail": "Could not satisfy the request Accept header."})

    def _authenticate(self, request: _Request, *, required: bool) -> None:
        """DRF order as in CVAT: Token, then session (CSRF on unsafe methods), then Basic."""
        challenge = [("www-authenticate", "Token")]
        scheme, _, value = (request.headers.get("Authorization") or "").partition(" ")
        if scheme.lower() == "token":
            if value.strip() not in self._tokens:
                raise HttpError(401, {"detail": "Invalid token."}, challenge)
            return
        cookies = _cookies(request.headers.get("Cookie"))
        if cookies.get("sessionid") in self._sessions:
            # Django's check (messages not recorded): the X-CSRFToken header must equal the csrftoken cookie.
            if request.method not in ("GET", "HEAD", "OPTIONS") and request.path != "/api/auth/login":
                header, cookie = request.headers.get("X-CSRFToken"), cookies.get("csrftoken")
                reason = ("CSRF cookie not set." if not cookie else "CSRF token missing." if not header
                          else "CSRF token incorrect." if header != cookie else None)
                if reason:
                    raise HttpError(403, {"detail": f"CSRF Failed: {reason}"})
            return
        if scheme.lower() == "basic":
            try:
                user, _, password = base64.b64decode(value).decode().partition(":")
            except ValueError:
                user = password = ""
            if (user, password) != self.credentials:
                raise HttpError(401, {"detail": "Invalid username/password."}, challenge)
            return
        if required:
            raise HttpError(401, {"detail": "Authentication credentials were not provided."}, challenge)

    def _json(self, payload: Any, status: int = 200, headers: list[tuple[str, str]] | None = None) -> Response:
        # Compact like DRF's renderer; recorded absolute URLs are rebased onto this server.
        text = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
        return Response(status, text.replace(RECORDED_BASE, self._current_base).encode(), JSON_TYPE, headers or [])

    def _page(self, request: _Request, items: list) -> Response:
        """DRF PageNumberPagination: default page_size 10, links re-emit the query sorted by name."""
        page_size = request.int_param("page_size") or 10
        page = request.int_param("page") if "page" in request.query else 1
        pages = max(1, math.ceil(len(items) / page_size))
        if page is None or not 1 <= page <= pages:
            raise HttpError(404, {"detail": "Invalid page."})
        params = parse_qs(request.raw_query, keep_blank_values=True)

        def link(number: int) -> str:
            linked = {k: v for k, v in params.items() if k != "page"}
            if number > 1:
                linked["page"] = [str(number)]
            return f"{request.base}{request.path}?{urlencode(sorted(linked.items()), doseq=True)}".rstrip("?")

        return self._json({
            "count": len(items),
            "next": link(page + 1) if page < pages else None,
            "previous": link(page - 1) if page > 1 else None,
            "results": items[(page - 1) * page_size: page * page_size],
        })

    # ----------------------------------------------------------------- lookups and derived fields

    def _get_task(self, task_id: int) -> Task:
        if task_id not in self.tasks:
            raise HttpError(404, {"detail": "No Task matches the given query."})
        return self.tasks[task_id]

    def _get_job(self, job_id: int) -> Job:
        if job_id not in self.jobs:
            raise HttpError(404, {"detail": "No Job matches the given query."})
        return self.jobs[job_id]

    def _task_labels(self, task: Task) -> list[dict]:
        project_id = task.record["project_id"]
        key, value = ("project_id", project_id) if project_id is not None else ("task_id", task.id)
        return sorted((label for label in self.labels.values() if label.get(key) == value), key=lambda x: x["id"])

    @staticmethod
    def _job_status(job: Job) -> str:
        # README: stage annotation -> annotation; acceptance + completed -> completed; anything else -> validation.
        stage, state = job.record["stage"], job.record["state"]
        if stage == "annotation":
            return "annotation"
        return "completed" if stage == "acceptance" and state == "completed" else "validation"

    def _job_json(self, job: Job) -> dict:
        return {**job.record, "status": self._job_status(job)}

    def _task_json(self, task: Task) -> dict:
        jobs = [self.jobs[j] for j in task.job_ids]
        statuses = {self._job_status(j) for j in jobs}
        status = next((s for s in ("annotation", "validation") if s in statuses), "completed")
        summary = {
            "count": len(jobs),
            "completed": sum(j.record["stage"] == "acceptance" and j.record["state"] == "completed" for j in jobs),
            "validation": sum(j.record["stage"] == "validation" for j in jobs),
            "url": task.record["jobs"]["url"],
        }
        return {**task.record, "status": status, "jobs": summary}

    def _touch(self, task: Task, jobs: Sequence[Job]) -> None:
        now = _now()
        for job in jobs:
            job.record["updated_date"] = now
        task.record["updated_date"] = now
        if task.record["project_id"] in self.projects:
            self.projects[task.record["project_id"]]["updated_date"] = now

    # ----------------------------------------------------------------- handlers: server, auth, users

    def _about(self, request: _Request) -> Response:
        return self._json(self._about_body)

    def _login(self, request: _Request) -> Response:
        body = request.json()
        if (body.get("username"), body.get("password")) != self.credentials:
            raise HttpError(400, {"non_field_errors": ["Unable to log in with provided credentials."]})
        key, session, csrf = secrets.token_hex(20), secrets.token_hex(16), secrets.token_hex(16)
        self._tokens[key] = self._sessions[session] = self.username
        cookie = "; expires=Sat, 20 Nov 2027 21:12:11 GMT; Max-Age=31449600; Path=/; SameSite=Lax"
        return self._json({"key": key}, headers=[
            ("set-cookie", f"csrftoken={csrf}{cookie}"),
            ("set-cookie", "sessionfresh=1; expires=Sun, 22 Nov 2026 21:12:11 GMT; HttpOnly; Max-Age=86400; Path=/; "
                           "SameSite=Lax"),
            ("set-cookie", f"sessionid={session}; expires=Sat, 05 Dec 2026 21:12:11 GMT; HttpOnly; Max-Age=1209600; "
                           "Path=/; SameSite=Lax"),
        ])

    def _logout(self, request: _Request) -> Response:
        self._sessions.pop(_cookies(request.headers.get("Cookie")).get("sessionid", ""), None)
        scheme, _, value = (request.headers.get("Authorization") or "").partition(" ")
        if scheme.lower() == "token":
            self._tokens.pop(value.strip(), None)
        return self._json({"detail": "Successfully logged out."}, headers=[
            ("set-cookie", 'sessionid=""; expires=Thu, 01 Jan 1970 00:00:00 GMT; Max-Age=0; Path=/; SameSite=Lax')])

    def _user_self(self, request: _Request) -> Response:
        return self._json(self.users[self.username])

    # ----------------------------------------------------------------- handlers: webhooks

    def _webhook_create(self, request: _Request) -> Response:
        body = request.json()
        errors = {k: ["This field is required."] for k in ("target_url", "type", "events") if not body.get(k)}
        if body.get("type") == "project" and body.get("project_id") not in self.projects:
            errors["project_id"] = [f'Invalid pk "{body.get("project_id")}" - object does not exist.']
        if errors:
            raise HttpError(400, errors)
        webhook_id = len(self.webhooks) + 1
        now = _now()
        record = load_fixture("webhooks/api/POST_api_webhooks.project.json")
        record.update({
            "id": webhook_id, "url": f"{self._current_base}/api/webhooks/{webhook_id}",
            "target_url": body["target_url"], "description": body.get("description", ""), "type": body["type"],
            "content_type": body.get("content_type", "application/json"), "is_active": body.get("is_active", True),
            "enable_ssl": body.get("enable_ssl", True), "created_date": now, "updated_date": now,
            "project_id": body.get("project_id"), "organization": None, "events": sorted(body["events"])})
        self.webhooks[webhook_id] = {**record, "secret": body.get("secret", "")}
        return self._json(record, 201)

    def _webhook_list(self, request: _Request) -> Response:
        project_id = request.int_param("project_id")
        return self._page(request, [{k: v for k, v in w.items() if k != "secret"}
                                    for _, w in sorted(self.webhooks.items(), reverse=True)
                                    if project_id is None or w["project_id"] == project_id])

    # ----------------------------------------------------------------- handlers: projects, tasks, jobs, labels

    def _project_json(self, project: dict) -> dict:
        count = sum(t.record["project_id"] == project["id"] for t in self.tasks.values())
        return {**project, "tasks": {**project["tasks"], "count": count}}

    def _project_list(self, request: _Request) -> Response:
        return self._page(request, [self._project_json(p) for _, p in sorted(self.projects.items(), reverse=True)])

    def _project(self, request: _Request, project_id: int) -> Response:
        if project_id not in self.projects:
            raise HttpError(404, {"detail": "No Project matches the given query."})
        return self._json(self._project_json(self.projects[project_id]))

    def _task_list(self, request: _Request) -> Response:
        tasks = sorted(self.tasks.values(), key=lambda t: -t.id)  # newest first
        if "project_id" in request.query:
            tasks = [t for t in tasks if str(t.record["project_id"]) == request.query["project_id"]]
        return self._page(request, [self._task_json(t) for t in tasks])

    def _task(self, request: _Request, task_id: int) -> Response:
        return self._json(self._task_json(self._get_task(task_id)))

    def _task_delete(self, request: _Request, task_id: int) -> Response:
        self._drop_task(self._get_task(task_id).id)
        return Response(204, content_type=None)

    def _drop_task(self, task_id: int) -> None:
        for job_id in self.tasks.pop(task_id).job_ids:
            del self.jobs[job_id]
        for label_id in [i for i, label in self.labels.items() if label.get("task_id") == task_id]:
            del self.labels[label_id]

    def _job_list(self, request: _Request) -> Response:
        jobs = sorted(self.jobs.values(), key=lambda j: -j.id)  # newest first, as recorded
        if "task_id" in request.query:
            jobs = [j for j in jobs if str(j.task_id) == request.query["task_id"]]
        return self._page(request, [self._job_json(j) for j in jobs])

    def _job(self, request: _Request, job_id: int) -> Response:
        return self._json(self._job_json(self._get_job(job_id)))

    def _job_patch(self, request: _Request, job_id: int) -> Response:
        job, body = self._get_job(job_id), request.json()
        errors = {key: [f'"{body[key]}" is not a valid choice.'] for key, choices in _JOB_CHOICES.items()
                  if key in body and body[key] not in choices}
        if errors:
            raise HttpError(400, errors)
        job.record.update({key: body[key] for key in _JOB_CHOICES if key in body})
        self._touch(self.tasks[job.task_id], [job])
        return self._json(self._job_json(job))

    def _label_list(self, request: _Request) -> Response:
        if "job_id" in request.query:
            job = self.jobs.get(request.int_param("job_id") or -1)
            labels = self._task_labels(self.tasks[job.task_id]) if job else []
        elif "task_id" in request.query:
            task = self.tasks.get(request.int_param("task_id") or -1)
            labels = self._task_labels(task) if task else []
        else:
            labels = sorted(self.labels.values(), key=lambda x: x["id"])
            if "project_id" in request.query:
                labels = [x for x in labels if str(x.get("project_id")) == request.query["project_id"]]
        return self._page(request, labels)

    def _label(self, request: _Request, label_id: int) -> Response:
        if label_id not in self.labels:
            raise HttpError(404, {"detail": "No Label matches the given query."})
        return self._json(self.labels[label_id])

    # ----------------------------------------------------------------- handlers: media

    def _meta(self, task: Task, first: int, last: int, updated: str) -> dict:
        described = task.frames[first:first + 1] if task.video else task.frames[first:last + 1]  # a video: one entry
        frames = [{"width": f.width, "height": f.height, "name": task.video or f.name, "related_files": 0,
                   "has_related_context": False} for f in described]
        deleted = [n for n in task.deleted_frames if first <= n <= last]
        return {"chunks_updated_date": updated, "chunk_size": task.chunk_size, "size": last - first + 1,
                "image_quality": task.image_quality, "start_frame": first, "stop_frame": last, "frame_filter": "",
                "frames": frames, "deleted_frames": deleted, "included_frames": None}

    def _task_meta(self, request: _Request, task_id: int) -> Response:
        task = self._get_task(task_id)
        return self._json(self._meta(task, 0, len(task.frames) - 1, task.chunks_updated_date))

    def _job_meta(self, request: _Request, job_id: int) -> Response:
        job = self._get_job(job_id)
        return self._json(self._meta(self.tasks[job.task_id], job.start, job.stop, job.chunks_updated_date))

    def _task_data(self, request: _Request, task_id: int) -> Response:
        task = self._get_task(task_id)
        return self._data(request, task, 0, len(task.frames) - 1, task.chunks_updated_date, chunk_param="number")

    def _job_data(self, request: _Request, job_id: int) -> Response:
        job = self._get_job(job_id)
        return self._data(request, self.tasks[job.task_id], job.start, job.stop, job.chunks_updated_date,
                          chunk_param="index" if "index" in request.query else "number")

    def _data(self, request: _Request, task: Task, first: int, last: int, updated: str, *,
              chunk_param: str) -> Response:
        kind, quality = request.query.get("type"), request.query.get("quality", "compressed")
        if kind not in ("chunk", "frame"):
            raise HttpError(400, ["Data type not specified or has wrong value"])
        if quality not in ("compressed", "original"):
            raise HttpError(400, ["Wrong quality value"])  # not recorded
        raw = request.query.get(chunk_param if kind == "chunk" else "number")
        number = request.int_param(chunk_param if kind == "chunk" else "number")
        if kind == "frame":
            if number is None or not first <= number <= last:
                # Recorded: the printed upper bound is the frame count, one past the last valid frame.
                raise HttpError(400, f"Invalid frame '{raw}'. The frame number should be in the "
                                     f"[{first}, {last + 1}] range")
            frame = task.frames[number]
            if quality == "original":
                return Response(200, frame.data, mimetypes.guess_type(frame.name)[0] or "application/octet-stream")
            return Response(200, self._compressed(task, frame), "image/jpeg")
        if chunk_param == "index":  # job chunks: 0-based within the job
            positions = range(first, last + 1)
        else:  # task chunk numbers (for a job: the part of that task chunk inside the job)
            positions = range(0, len(task.frames))
        chunks = max(1, math.ceil(len(positions) / task.chunk_size))
        if number is None or not 0 <= number < chunks:
            raise HttpError(400, f"Invalid chunk number '{raw}'. The chunk number should be in the "
                                 f"[0, {chunks - 1}] range")
        frames = [i for i in positions[number * task.chunk_size:(number + 1) * task.chunk_size] if first <= i <= last]
        body = self._chunk(task, frames, quality)
        return Response(200, body, "video/mp4" if task.video else "application/zip",
                        [("x-checksum", str(zlib.crc32(body))), ("x-updated-date", updated)])

    def _compressed(self, task: Task, frame: Frame) -> bytes:
        if frame.compressed is None:
            buffer = io.BytesIO()
            Image.open(io.BytesIO(frame.data)).convert("RGB").save(buffer, "JPEG", quality=task.image_quality)
            frame.compressed = buffer.getvalue()
        return frame.compressed

    def _chunk(self, task: Task, frame_numbers: list[int], quality: str) -> bytes:
        """A zip (stored, not deflated) whose entries are named by position in the chunk, 6 digits, with the
        uploaded file's extension for original quality and ``.jpeg`` for compressed; an MP4 for a video task."""
        key = (task.id, quality, tuple(frame_numbers))
        if key not in self._chunk_cache and task.video:
            self._chunk_cache[key] = _mp4([task.frames[n] for n in frame_numbers],
                                          0 if quality == "original" else round(51 * (100 - task.image_quality) / 99))
        if key not in self._chunk_cache:
            buffer = io.BytesIO()
            with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
                for position, number in enumerate(frame_numbers):
                    frame = task.frames[number]
                    if quality == "original":
                        name, data = f"{position:06d}{Path(frame.name).suffix}", frame.data
                    else:
                        name, data = f"{position:06d}.jpeg", self._compressed(task, frame)
                    archive.writestr(zipfile.ZipInfo(name, date_time=(2026, 11, 21, 21, 9, 50)), data)
            self._chunk_cache[key] = buffer.getvalue()
        return self._chunk_cache[key]

    # ----------------------------------------------------------------- handlers: annotations

    def _task_annotations(self, request: _Request, task_id: int) -> Response:
        return self._annotations(request, self._get_task(task_id), None)

    def _job_annotations(self, request: _Request, job_id: int) -> Response:
        job = self._get_job(job_id)
        return self._annotations(request, self.tasks[job.task_id], job)

    def _annotations(self, request: _Request, task: Task, job: Job | None) -> Response:
        if request.method == "GET":
            return self._json(self._view(task, job, task.annotations))
        if request.method == "DELETE":
            self._remove_scope(task, job)
            self._touch(task, self._scope_jobs(task, job))
            return Response(204, content_type=None)
        action = "put" if request.method == "PUT" else request.query.get("action")
        if action not in ("put", "create", "update", "delete"):
            raise HttpError(400, ["Please specify a correct 'action' for the request"])
        body = request.json()
        if not isinstance(body, dict):
            raise HttpError(400, {"non_field_errors": ["Invalid data. Expected a dictionary, but got list."]})
        return self._json(self._write(task, job, action, body))

    def _scope_jobs(self, task: Task, job: Job | None) -> list[Job]:
        return [job] if job else [self.jobs[j] for j in task.job_ids]

    def _job_of(self, task: Task, frame: int) -> Job | None:
        return next((self.jobs[j] for j in task.job_ids if self.jobs[j].start <= frame <= self.jobs[j].stop), None)

    def _view(self, task: Task, job: Job | None, objects: dict[str, list[dict]], write: bool = False) -> dict:
        """Objects grouped job by job (the task view is the jobs' views merged, as on the server). A track that
        ends inside a job which is not the task's last gets an ``outside`` copy of its last shape on the next
        job's first frame (same id, not stored). GET lists each job's objects by frame, ties in save order
        (recorded: after updating shape 89 the job lists 88, 90, 89, 91); write responses keep request order."""
        jobs = self._scope_jobs(task, job)
        last_job = self.jobs[task.job_ids[-1]]
        result: dict[str, Any] = {"version": 0}
        order = _WRITE_ORDER if write else _STORED_ORDER
        for kind in _KINDS:
            items = []
            listed = objects[kind] if write else sorted(objects[kind], key=lambda o: o["frame"])
            for scope in jobs:
                for obj in listed:
                    if not scope.start <= obj["frame"] <= scope.stop:
                        continue
                    obj = copy.deepcopy(obj)
                    if kind == "tracks":
                        shapes = obj["shapes"]
                        if (job is None and scope is not last_job and shapes and not shapes[-1]["outside"]
                                and shapes[-1]["frame"] <= scope.stop):
                            shapes.append({**shapes[-1], "frame": scope.stop + 1, "outside": True})
                        obj["shapes"] = [_ordered(s, order["track_shapes"]) for s in shapes]
                    items.append(_ordered(obj, order[kind]))
            result[kind] = items
        return result

    def _remove_scope(self, task: Task, job: Job | None) -> None:
        for kind in _KINDS:
            task.annotations[kind] = [o for o in task.annotations[kind]
                                      if job is not None and not job.start <= o["frame"] <= job.stop]

    def _write(self, task: Task, job: Job | None, action: str, body: dict) -> dict:
        data = {kind: body.get(kind) or [] for kind in _KINDS}
        scope = self._scope_jobs(task, job)
        if action in ("put", "create", "update"):
            self._validate(task, data)
        if action == "put":
            self._remove_scope(task, job)
        stored = task.annotations
        if action in ("put", "create"):
            echoed: dict[str, list[dict]] = {kind: [] for kind in _KINDS}
            for scope_job in scope:  # ids are handed out job by job, like the server
                for kind in _KINDS:
                    for sent in data[kind]:
                        if self._job_of(task, sent["frame"]) is not scope_job:
                            continue
                        stored[kind].append(self._normalize(kind, sent, self._new_id(_ID_COUNTER[kind])))
                        echoed[kind].append(_echo(kind, sent, stored[kind][-1]))
            result = self._view(task, job, echoed, write=True)
        else:
            touched: dict[str, list[dict]] = {kind: [] for kind in _KINDS}
            for kind in _KINDS:
                for sent in data[kind]:
                    index = next((i for i, o in enumerate(stored[kind]) if o["id"] == sent.get("id")), None)
                    if index is None:
                        continue  # unknown ids are skipped
                    old = stored[kind].pop(index)
                    if action == "update":  # an updated object moves to the end, as the recorded job GET shows
                        stored[kind].append(self._normalize(kind, sent, old["id"], update=True))
                        touched[kind].append(stored[kind][-1])
                    else:
                        touched[kind].append(old)
            result = self._view(task, job, touched, write=True)
        self._touch(task, scope)
        return result

    def _validate(self, task: Task, data: dict[str, list]) -> None:
        errors: dict[str, list[dict]] = {}
        for kind in _KINDS:
            items = [self._field_errors(kind, obj) for obj in data[kind]]
            if any(items):
                errors[kind] = items
        if errors:
            raise HttpError(400, errors)
        labels = {label["id"]: label for label in self._task_labels(task)}
        for kind in _KINDS:
            for obj in data[kind]:
                label = labels.get(obj["label_id"])
                if label is None:
                    raise HttpError(400, [f"label_id `{obj['label_id']}` is invalid"])
                specs = {a["id"] for a in label["attributes"]}
                values = obj.get("attributes") or []
                for shape in obj.get("shapes") or []:
                    values = values + (shape.get("attributes") or [])
                for value in values:
                    if value.get("spec_id") not in specs:
                        raise HttpError(400, [f"spec_id `{value.get('spec_id')}` is invalid"])

    @staticmethod
    def _field_errors(kind: str, obj: Any) -> dict:
        """DRF serializer errors of one object ({} when valid)."""
        if not isinstance(obj, dict):
            return {"non_field_errors": [f"Invalid data. Expected a dictionary, but got {type(obj).__name__}."]}
        required = ("frame", "label_id", "type") if kind == "shapes" else ("frame", "label_id")
        errors = _required_errors(obj, required)
        if kind == "tracks":
            shape_errors = [_shape_errors(s, ("frame", "type")) for s in obj.get("shapes") or []]
            if any(shape_errors):
                errors["shapes"] = shape_errors
        elif kind == "shapes" and "type" not in errors:
            errors.update(_shape_errors(obj, ()))
        return errors

    def _normalize(self, kind: str, sent: dict, obj_id: int, *, update: bool = False) -> dict:
        """What the server stores and GET returns: floats, defaults, default attribute values filled in.
        Track shapes keep their ids on update only."""
        label = self.labels[sent["label_id"]]
        mutable = [a for a in label["attributes"] if a["mutable"]]
        immutable = [a for a in label["attributes"] if not a["mutable"]]
        common = {"id": obj_id, "label_id": sent["label_id"], "frame": sent["frame"], "group": sent.get("group", 0),
                  "source": sent.get("source", "manual")}
        if kind == "tags":
            return _ordered({**common, "attributes": _fill(sent.get("attributes"), label["attributes"])},
                            _STORED_ORDER["tags"])
        if kind == "shapes":
            return _ordered({**common, **_geometry(sent), "type": sent["type"],
                             "attributes": _fill(sent.get("attributes"), label["attributes"]),
                             "elements": copy.deepcopy(sent.get("elements") or [])}, _STORED_ORDER["shapes"])
        shapes = [_ordered({**_geometry(s), "id": (update and s.get("id")) or self._new_id("track_shape"),
                            "type": s["type"],
                            "frame": s["frame"], "attributes": _fill(s.get("attributes"), mutable)},
                           _STORED_ORDER["track_shapes"]) for s in sent.get("shapes") or []]
        return _ordered({**common, "shapes": shapes, "attributes": _fill(sent.get("attributes"), immutable),
                         "elements": copy.deepcopy(sent.get("elements") or [])}, _STORED_ORDER["tracks"])


def _mp4(frames: Sequence[Frame], crf: int) -> bytes:
    """A video chunk as CVAT writes one: H.264 in MP4, lossless-ish for original quality (crf 0), crf from the
    task's image quality for compressed."""
    import av  # only video tasks need it

    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=25, options={"crf": str(crf)})
        stream.width, stream.height, stream.pix_fmt = frames[0].width, frames[0].height, "yuv420p"
        for frame in frames:
            image = Image.open(io.BytesIO(frame.data)).convert("RGB")
            container.mux(stream.encode(av.VideoFrame.from_image(image)))
        container.mux(stream.encode())
    return buffer.getvalue()


def _echo(kind: str, sent: dict, stored: dict) -> dict:
    """Create/PUT responses echo the request (ints stay ints, no default attribute values) plus defaults and the
    new ids."""
    obj = {**copy.deepcopy(_WRITE_DEFAULTS[kind]), **copy.deepcopy(sent), "id": stored["id"]}
    if kind == "tracks":
        obj["shapes"] = [{**copy.deepcopy(_WRITE_DEFAULTS["track_shapes"]), **shape, "id": saved["id"]}
                         for shape, saved in zip(obj.get("shapes") or [], stored["shapes"], strict=True)]
    return obj


def _shape_errors(shape: Any, required: Sequence[str]) -> dict:
    if not isinstance(shape, dict):
        return {"non_field_errors": [f"Invalid data. Expected a dictionary, but got {type(shape).__name__}."]}
    errors = _required_errors(shape, required)
    kind, points = shape.get("type"), shape.get("points", [])
    if kind is not None and kind not in _SHAPE_TYPES:
        errors["type"] = [f'"{kind}" is not a valid choice.']
    elif isinstance(points, (str, list)):
        bad = {str(i): "[ErrorDetail(string='Value must be a float or an integer', code='invalid')]"
               for i, p in enumerate(points) if isinstance(p, (str, bool)) or not isinstance(p, (int, float))}
        if bad:  # recorded: a string is checked character by character
            errors["points"] = bad
        elif kind is not None and not _valid_point_count(kind, len(points)):
            errors["points"] = [f"invalid length for shape type '{kind}'"]
    else:
        errors["points"] = [f'Expected a list of items but got type "{type(points).__name__}".']
    return errors


def _required_errors(obj: dict, required: Sequence[str]) -> dict[str, Any]:
    errors: dict[str, Any] = {}
    for key in required:
        value = obj.get(key)
        if value is None:
            errors[key] = ["This field is required."]
        elif key in ("frame", "label_id") and (isinstance(value, bool) or not isinstance(value, int)):
            errors[key] = ["A valid integer is required."]
        elif key == "frame" and value < 0:
            errors[key] = ["Ensure this value is greater than or equal to 0."]
    return errors


def _valid_point_count(kind: str, n: int) -> bool:
    """README: rectangle/ellipse exactly 4, polygon >= 6 even, polyline >= 4 even, points >= 2 even, mask >= 5."""
    minimum = {"polygon": 6, "polyline": 4, "points": 2}
    if kind in ("rectangle", "ellipse"):
        return n == 4
    if kind == "cuboid":
        return n == 16
    if kind in minimum:
        return n >= minimum[kind] and n % 2 == 0
    if kind == "mask":
        return n >= 5
    return True  # skeleton: the points live in the elements


def _geometry(sent: dict) -> dict:
    return {"occluded": bool(sent.get("occluded", False)), "outside": bool(sent.get("outside", False)),
            "z_order": int(sent.get("z_order", 0)), "rotation": float(sent.get("rotation", 0)),
            "points": [float(p) for p in sent.get("points") or []]}


def _fill(values: list[dict] | None, specs: list[dict]) -> list[dict]:
    """Missing attribute values are stored with the spec's default (recorded for rectangle 88)."""
    result = [{"spec_id": v["spec_id"], "value": v["value"]} for v in values or []]
    given = {v["spec_id"] for v in result}
    return result + [{"spec_id": s["id"], "value": s["default_value"]} for s in specs if s["id"] not in given]


def _cookies(header: str | None) -> dict[str, str]:
    pairs = (item.strip().partition("=") for item in (header or "").split(";"))
    return {name: value for name, _, value in pairs if name}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the SDK's connection pool expects
    disable_nagle_algorithm = True  # headers and body go out in separate writes: avoid 40 ms delayed-ACK stalls

    def _handle(self) -> None:
        double: CvatDouble = self.server.double  # type: ignore[attr-defined]
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        response = double._dispatch(self.command, self.path, self.headers, body)
        payload, encoding = response.body, None
        accepts_gzip = "gzip" in (self.headers.get("Accept-Encoding") or "")
        if double.gzip_responses and accepts_gzip and len(payload) >= 200:
            packed = gzip.compress(payload, compresslevel=6, mtime=0)
            if len(packed) < len(payload):
                payload, encoding = packed, "gzip"
        self.send_response(response.status)
        # Django's GZipMiddleware adds Accept-Encoding to Vary for every body of 200 bytes or more.
        self.send_header("vary", "Accept, Accept-Encoding, Origin, Cookie" if len(response.body) >= 200
                         else "Accept, Origin, Cookie")
        if response.content_type:
            self.send_header("content-type", response.content_type)
        for name, value in [*_COMMON_HEADERS.items(), ("x-request-id", str(uuid.uuid4())), *response.headers]:
            self.send_header(name, value)
        if encoding:
            self.send_header("content-encoding", encoding)
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        if response.cut:
            self.wfile.write(payload[:len(payload) // 2])
            self.close_connection = True  # the client sees the connection end before content-length bytes
        elif self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _handle

    def log_message(self, format: str, *args: Any) -> None:  # quiet test output
        pass


@pytest.fixture
def cvat_double() -> Iterator[CvatDouble]:
    """A started double with the recorded state; fresh for every test."""
    with CvatDouble() as double:
        yield double


__all__ = ["CUT", "FIXTURES", "PASSWORD", "CvatDouble", "Frame", "RequestRecord", "cvat_double", "load_fixture"]
