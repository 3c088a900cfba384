"""A CVAT 2.42 test double: a real HTTP server on 127.0.0.1 that answers like the recordings in
``tests/fixtures/cvat-2.42`` (see the README of the shared fixtures for what was observed).

State lives in memory and is seeded from the recordings: project 6 with labels 18-22, task 7
"fixtures-images" (6 JPEG frames, jobs 7 and 8, the final annotations) and task 8 "fixtures-standalone"
(3 PNG frames, job 9). ``add_task`` adds synthetic tasks (e.g. 300 frames for a benchmark), image or video (MP4
chunks encoded with PyAV; not recorded from a server). ``fail_next`` injects errors and cut connections.

Also modelled, from CVAT's source where nothing was recorded:

* projects: ``add_project``; ``PATCH /api/projects/ID`` with ``labels`` as ``ProjectWriteSerializer.update`` and
  ``LabelSerializer.update_label`` do (``cvat/apps/engine/serializers.py``);
* tasks whose data is not uploaded yet (``add_task(pending_upload=True)``, then ``finish_upload``), answering the
  media and annotation calls the way ``cvat/apps/engine/views.py`` does for a task without ``data``;
* webhook deliveries (``add_webhook`` or ``POST /api/webhooks``): the events CVAT's pre/post-save signals send
  (``cvat/apps/webhooks/signals.py``), with the payloads recorded in ``webhooks/*.json``, delivered from a
  background thread like the RQ webhooks worker and kept in ``deliveries`` (``wait_for_deliveries``);
* the lambda manager's requests, the *Automatic annotation* menu (``cvat/apps/lambda_manager/views.py``): the
  functions it can call (``add_lambda_function``: an id, the URL the function answers on, its spec's labels),
  ``POST /api/lambda/requests`` (one request per task: 409 while one is queued or started),
  ``GET /api/lambda/requests`` (a plain list, failed ones left out) and ``GET``/``DELETE .../requests/ID``. A request
  stays queued until the test runs it (``run_lambda_request``, the auto-annotation RQ worker, all of it or a few
  frames at a time): the function is POSTed each frame (``{"image", "threshold"?}``), its answer mapped to the task's
  labels by name (``make_default_mapping``) and converted (``DetectionResultConverter``: ``source: auto``), and the
  shapes saved with ``PATCH action=create`` every 100 frames and at the end (``DetectionResultCollector``), each save
  with the deliveries an annotation save sends, as from an RQ worker (relative URLs, the user as a dict).

* tracks cut at job boundaries: a task-level write stores one piece of a track in each job it reaches, as
  ``AnnotationIR.slice`` cuts it (``cvat/apps/dataset_manager/annotation.py``: ``_is_track_inside``,
  ``_slice_track``; the interpolation is ours, ``preannotate.cvat.annotations``, checked against CVAT's exports), and
  task-level views close a piece that ends visible inside a job that is not the last with an ``outside`` shape on the
  next job's first frame (``TrackManager._modify_unmatched_object``); a job-level write stores tracks as sent.

Not modelled: organizations (organization webhooks never fire), exports/imports, task creation over HTTP,
ping/redelivery, and of the lambda manager: ``/api/lambda/functions``, online calls, label
``mapping`` in a request, masks in a function's answer, and functions other than detectors.
"""

from __future__ import annotations

import base64
import copy
import gzip
import hashlib
import hmac
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
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

import pytest
import urllib3
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
# TaskReadSerializer's field order; the data fields are absent while a task has no data (DRF skips a dotted
# source whose ``data`` is None; recorded: POST_api_tasks.*.json and the create:task delivery).
_TASK_FIELDS = ("url", "id", "name", "project_id", "mode", "owner", "assignee", "bug_tracker", "created_date",
                "updated_date", "overlap", "segment_size", "status", "data_chunk_size", "data_compressed_chunk_type",
                "guide_id", "data_original_chunk_type", "size", "image_quality", "data", "dimension", "subset",
                "organization", "target_storage", "source_storage", "jobs", "labels", "assignee_updated_date",
                "validation_mode", "consensus_enabled")
_DATA_FIELDS = ("data_chunk_size", "data_compressed_chunk_type", "data_original_chunk_type", "size", "image_quality",
                "data")
_LABEL_TYPES = ("any", "cuboid", "ellipse", "mask", "points", "polygon", "polyline", "rectangle", "skeleton", "tag")
# LabelSerializer's field order (``svg`` only on a skeleton: to_representation adds it).
_LABEL_ORDER = ("id", "name", "color", "attributes", "type", "svg", "sublabels", "project_id", "task_id", "parent_id",
                "has_parent")
_ATTRIBUTE_TYPES = ("checkbox", "radio", "number", "text", "select")
# cvat/apps/webhooks/event_type.py as GET /api/webhooks/events?type=project answers (recorded).
_PROJECT_EVENTS = ("create:comment", "create:issue", "create:job", "create:task", "delete:comment", "delete:issue",
                   "delete:job", "delete:project", "delete:task", "update:comment", "update:issue", "update:job",
                   "update:project", "update:task")
_ORGANIZATION_ONLY_EVENTS = ("create:invitation", "create:membership", "create:project", "delete:invitation",
                             "delete:membership", "delete:organization", "update:membership", "update:organization")
# cvat/apps/webhooks/signals.py: send_webhook()
WEBHOOK_TIMEOUT = 10
RESPONSE_SIZE_LIMIT = 1024 * 1024
# The headers of a recorded delivery, in order (http.client puts Host first; Content-Length is added per body).
_DELIVERY_HEADERS = {"User-Agent": "CVAT/2.42.0 python-requests/2.32.4", "Accept-Encoding": "gzip, deflate, zstd",
                     "Accept": "*/*", "Connection": "keep-alive"}


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
    pending: bool = False  # created, its data not uploaded yet: ``data`` is None on the server, no jobs


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
class LambdaFunction:
    """A function CVAT's lambda manager can call (``LambdaFunction`` in cvat/apps/lambda_manager/views.py, as the
    Nuclio dashboard lists it): its id, the URL it answers on, and the labels of its spec (``[{"name", "type"?,
    "attributes"?: [{"name"}]}]``, what the function's ``spec`` annotation holds)."""

    id: str
    url: str
    labels: list[dict]


@dataclass
class LambdaRequest:
    """One request of the auto-annotation queue (``LambdaQueue.enqueue``: an RQ job whose id names its task)."""

    id: str
    function: LambdaFunction
    task_id: int
    job_id: int | None
    threshold: float | None
    cleanup: bool
    status: str = "queued"
    progress: int = 0
    enqueued: str = field(default_factory=lambda: _now())
    started: str | None = None
    ended: str | None = None
    exc_info: str | None = None
    done: int = 0  # frames of its frame set processed so far
    collected: dict = field(default_factory=lambda: {"tags": [], "shapes": []})  # not yet submitted


@dataclass(frozen=True)
class Delivery:
    """One webhook delivery, as CVAT's ``WebhookDelivery`` row keeps it (cvat/apps/webhooks/signals.py).

    ``status_code`` is the receiver's answer, 502 when it could not be reached (504 when it did not answer in
    10 s); ``error`` then says why. ``response`` is the receiver's body (at most 1 MiB, else "")."""

    id: int
    webhook_id: int
    event: str
    target: str
    status_code: int | None
    response: str
    error: str | None
    changed_fields: str  # the keys of before_update, comma-joined
    payload: dict
    body: bytes  # what was POSTed: json.dumps(payload), signed with the webhook's secret


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str | None = JSON_TYPE
    headers: list[tuple[str, str]] = field(default_factory=list)
    cut: bool = False  # the connection drops halfway through the body (a reset mid-download)


class ServerCrash(Exception):
    """Ends a request the way CVAT ends it where an unhandled exception escapes its view (e.g. an
    AttributeError on a task without data): Django's 500 page. Not a bug of the double: not kept in ``errors``."""


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
        (r"/api/projects/(\d+)", "GET, PATCH, DELETE, HEAD, OPTIONS", {"GET": "_project", "PATCH": "_project_patch"},
         True),
        (r"/api/tasks", "GET, POST, HEAD, OPTIONS", {"GET": "_task_list"}, True),
        (r"/api/tasks/(\d+)", "GET, PATCH, DELETE, HEAD, OPTIONS",
         {"GET": "_task", "PATCH": "_task_patch", "DELETE": "_task_delete"}, True),
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
        (r"/api/lambda/requests", "GET, POST, HEAD, OPTIONS",
         {"GET": "_lambda_request_list", "POST": "_lambda_request_create"}, True),
        (r"/api/lambda/requests/([^/]+)", "GET, DELETE, HEAD, OPTIONS",
         {"GET": "_lambda_request", "DELETE": "_lambda_request_delete"}, True),
    ]
]


class CvatDouble:
    """In-memory CVAT 2.42 served over HTTP. Use as a context manager (or the ``cvat_double`` fixture)::

        with CvatDouble() as cvat:
            client = make_client(cvat.base_url, credentials=cvat.credentials)

    Helpers: ``add_project``, ``add_task`` (``pending_upload``) and ``finish_upload``, ``add_webhook``; webhook
    deliveries land in ``deliveries`` (``wait_for_deliveries`` waits for the queue to empty).
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
        self.deliveries: list[Delivery] = []  # webhook deliveries made, in the order they were sent
        self.lambda_functions: dict[str, LambdaFunction] = {}
        self.lambda_requests: dict[str, LambdaRequest] = {}  # by id; a new request on a task replaces its old one
        # Events of the request being answered: queued when it succeeds (CVAT's transaction.on_commit).
        self._outbox: list[tuple[dict, dict]] = []
        self._queue: deque[tuple[dict, dict]] = deque()
        self._queue_cond = threading.Condition()
        self._unsent = 0  # queued or being sent
        self._delivery_id = 0  # counted under _queue_cond, by the delivering thread
        self._courier: threading.Thread | None = None
        self._closing = False
        # Next ids: after the recorded objects (task 9 / job 10 / shape 99 were created and deleted; projects 7
        # and 8 too).
        self._next = {"task": 10, "job": 11, "data": 10, "label": 25, "attribute": 3,
                      "shape": 100, "tag": 9, "track": 7, "track_shape": 15, "project": 9, "webhook": 1}
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
        with self._queue_cond:  # deliveries not sent yet are dropped; one being sent ends on its own
            self._closing = True
            self._unsent -= len(self._queue)
            self._queue.clear()
            self._queue_cond.notify_all()

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
        """The stored annotations of a task (a copy, GET key order), with the default values of attributes not
        given filled in, as GET shows them."""
        with self._lock:
            stored = self.tasks[task_id].annotations
            return {kind: [self._with_defaults(kind, obj) for obj in stored[kind]] for kind in _KINDS}

    def label_id(self, task_id: int, name: str) -> int:
        return next(label["id"] for label in self._task_labels(self.tasks[task_id]) if label["name"] == name)

    def add_project(self, name: str, labels: Sequence[dict] = ()) -> int:
        """Add a project with its own ``labels`` (the spec of ``add_task``) and return its id: what
        ``POST /api/projects`` creates (ProjectWriteSerializer.create in cvat/apps/engine/serializers.py). The
        record is shaped like the recorded project 6 (POST_api_projects.json: no tasks yet, so ``dimension`` is
        null; GET_api_projects_ID.json once it has tasks). Its labels are listed by ``/api/labels?project_id=``
        and are the labels of every task added to it."""
        names = [spec["name"] for spec in labels]
        if len(set(names)) != len(names):
            raise ValueError("All label names must be unique")
        with self._lock:
            project_id, now = self._new_id("project"), _now()
            record = copy.deepcopy(self._project_template)
            record.update({"url": f"{RECORDED_BASE}/api/projects/{project_id}", "id": project_id, "name": name,
                           "created_date": now, "updated_date": now})
            record["tasks"]["url"] = f"{RECORDED_BASE}/api/tasks?project_id={project_id}"
            record["labels"]["url"] = f"{RECORDED_BASE}/api/labels?project_id={project_id}"
            self.projects[project_id] = record
            for spec in labels:
                self._add_label(spec, project_id=project_id)
            return project_id

    def add_task(self, name: str, frames: Sequence[FrameSpec], labels: Sequence[dict] | None = None, *,
                 project_id: int | None = None, segment_size: int | None = None, chunk_size: int = 72,
                 image_quality: int = 70, annotations: dict | None = None, video: str | None = None,
                 pending_upload: bool = False) -> int:
        """Add a task and return its id. ``labels``: ``[{"name", "type"?, "color"?, "attributes"?: [{"name",
        "input_type", "values", "default_value"?, "mutable"?}]}]`` for a standalone task; with ``project_id`` the
        project's labels are used. ``segment_size`` None = one job. ``annotations`` (request format) are stored
        as a PATCH ``action=create`` would (webhooks included). ``video`` (a file name, e.g. ``"clip.mp4"``) makes
        it a video task: the frames (same size, even width and height) are served as H.264 MP4 chunks and the meta
        lists one entry.

        ``pending_upload=True`` stops where ``POST /api/tasks`` leaves a task: no data (``size``, ``data`` and the
        chunk fields absent, ``mode`` "", ``overlap`` null), no jobs; ``finish_upload`` then attaches ``frames``
        as the data upload does. Without it both steps run at once. Webhooks of the project get what CVAT sends
        for these steps (see ``_created_task`` and ``_attach_data``)."""
        if pending_upload and annotations:
            raise ValueError("a task without data cannot hold annotations: add them after finish_upload")
        with self._lock:
            if project_id is not None and project_id not in self.projects:
                raise KeyError(f"no project {project_id}")
            if project_id is not None and labels:
                raise ValueError("tasks in a project use the project's labels")
            if not frames:
                raise ValueError("a task needs at least one frame")
            task_id, now = self._new_id("task"), _now()
            record = copy.deepcopy(self._task_template[project_id is not None])
            for key in _DATA_FIELDS:
                del record[key]
            record.update({
                "url": f"{RECORDED_BASE}/api/tasks/{task_id}", "id": task_id, "name": name, "project_id": project_id,
                "mode": "", "created_date": now, "updated_date": now, "overlap": None,
                "segment_size": segment_size or 0, "status": "annotation",
            })
            record["jobs"]["url"] = f"{RECORDED_BASE}/api/jobs?task_id={task_id}"
            record["labels"]["url"] = f"{RECORDED_BASE}/api/labels?task_id={task_id}"
            task = Task(task_id, record, [Frame(*spec) for spec in frames], [], chunk_size, image_quality, now,
                        video=video, pending=True)
            self._current_base = self._helper_base()
            try:
                self.tasks[task_id] = task
                for spec in labels or []:
                    self._add_label(spec, task_id=task_id)
                self._created_task(task)
                if not pending_upload:
                    self._attach_data(task)
                if annotations:
                    try:
                        self._write(task, None, "create", annotations)
                    except HttpError as error:
                        self._drop_task(task_id)
                        raise ValueError(f"invalid annotations: {error.payload}") from None
            except BaseException:
                self._outbox.clear()
                raise
            self._flush()
            return task_id

    def finish_upload(self, task_id: int) -> None:
        """Attach the frames given to ``add_task(..., pending_upload=True)`` and create the jobs: what
        ``POST /api/tasks/ID/data`` and the task-creation job do once they complete (with their webhooks)."""
        with self._lock:
            task = self.tasks[task_id]
            if not task.pending:
                raise ValueError(f"task {task_id} already has its data")  # CVAT: "Adding more data is not supported"
            self._current_base = self._helper_base()
            try:
                self._attach_data(task)
            except BaseException:
                self._outbox.clear()
                raise
            self._flush()

    def add_webhook(self, target_url: str, secret: str, events: Sequence[str], project_id: int, *,
                    is_active: bool = True, enable_ssl: bool = True) -> int:
        """Add a project webhook as ``POST /api/webhooks`` does (same validation) and return its id; the record is
        kept, secret included, in ``webhooks``. ``secret`` "" = unsigned deliveries. Its deliveries are sent as
        CVAT's webhooks worker sends them (``_send``) and kept in ``deliveries``."""
        with self._lock:
            record = self._new_webhook({"target_url": target_url, "secret": secret, "events": list(events),
                                        "type": "project", "project_id": project_id, "is_active": is_active,
                                        "enable_ssl": enable_ssl}, self._helper_base())
            return record["id"]

    def add_lambda_function(self, function_id: str, url: str, labels: Sequence[dict]) -> None:
        """Make a detector function known to the lambda manager (as deploying it to Nuclio does): ``url`` is where
        it answers CVAT's detector call, ``labels`` its spec's labels (``[{"name", "type"?}]``)."""
        with self._lock:
            self.lambda_functions[function_id] = LambdaFunction(function_id, url, [dict(label) for label in labels])

    def run_lambda_request(self, request_id: str, frames: int | None = None) -> dict:
        """Run a queued (or started) lambda request as CVAT's auto-annotation worker does (``LambdaJob.__call__``
        and ``_call_detector``): ``cleanup`` first, then frame by frame the function is called, its answer mapped and
        converted, and the shapes saved every 100 frames and at the end. ``frames``: stop after that many frames,
        the request left ``started`` (call again to go on). Returns the request as ``GET`` shows it; a function that
        fails (an HTTP error) fails the request, which is then no longer listed."""
        with self._lock:
            request = self.lambda_requests[request_id]
            if request.status not in ("queued", "started"):
                raise ValueError(f"lambda request {request_id} is {request.status}")
            task = self.tasks[request.task_id]
            job = self.jobs[request.job_id] if request.job_id is not None else None
            frame_set = list(range(job.start, job.stop + 1)) if job else list(range(len(task.frames)))
            if request.status == "queued":
                request.status, request.started = "started", _now()
                if request.cleanup:  # dm.task.delete_job_data / delete_task_data
                    touched = [j for j in self._scope_jobs(task, job) if self._holds_any(task, j)]
                    self._remove_scope(task, job)
                    for saved in touched:
                        self._annotation_saved(task, saved, worker=True)
                    self._flush()
            mapping = self._lambda_mapping(request.function, task)
        pool = urllib3.PoolManager()
        try:
            for frame in frame_set[request.done:request.done + frames if frames is not None else None]:
                with self._lock:
                    if self.lambda_requests.get(request_id) is not request:  # deleted: the worker stops
                        return self._lambda_request_json(request)
                    skip = frame in task.deleted_frames
                    image = base64.b64encode(task.frames[frame].data).decode()
                if not skip:
                    payload = {"image": image, **({"threshold": request.threshold} if request.threshold else {})}
                    try:
                        answer = pool.request("POST", request.function.url, body=json.dumps(payload).encode(),
                                              headers={"Content-Type": "application/json"}, timeout=120.0,
                                              retries=False)
                        if answer.status >= 400:
                            raise urllib3.exceptions.HTTPError(f"{answer.status} Error for url: {request.function.url}")
                        items = json.loads(answer.data)
                    except (urllib3.exceptions.HTTPError, ValueError) as error:
                        with self._lock:
                            request.status, request.ended, request.exc_info = "failed", _now(), str(error)
                        return self._lambda_request_json(request)
                with self._lock:
                    if not skip:
                        converted = self._lambda_convert(task, mapping, frame, items)
                        request.collected["tags"] += converted["tags"]
                        request.collected["shapes"] += converted["shapes"]
                    request.progress = int((frame + 1) / len(task.frames) * 100)
                    request.done += 1
                    if frame and frame % 100 == 0:
                        self._lambda_submit(request, task, job)
            with self._lock:
                if request.done == len(frame_set):
                    self._lambda_submit(request, task, job)
                    request.status, request.ended = "finished", _now()
                return self._lambda_request_json(request)
        finally:
            pool.clear()

    def wait_for_deliveries(self, timeout: float | None = None) -> list[Delivery]:
        """Wait until every queued webhook delivery has been sent (or failed) and return ``deliveries`` (a copy).
        ``TimeoutError`` if some are still unsent after ``timeout`` seconds. Without a timeout it waits as long as
        they keep going out: each ends within its own HTTP timeouts (``WEBHOOK_TIMEOUT`` to connect, and again to
        answer, as CVAT's worker sends), so only a stuck courier times out, however slow the machine."""
        with self._queue_cond:
            if timeout is not None and not self._queue_cond.wait_for(lambda: self._unsent <= 0, timeout):
                raise TimeoutError(f"{self._unsent} webhook deliveries still unsent after {timeout} s")
            while self._unsent > 0:
                sent, stuck_after = len(self.deliveries), 3 * WEBHOOK_TIMEOUT
                if not self._queue_cond.wait_for(lambda sent=sent: len(self.deliveries) > sent or self._unsent <= 0,
                                                 stuck_after):
                    raise TimeoutError(f"{self._unsent} webhook deliveries still unsent: none went out in "
                                       f"{stuck_after} s")
            return list(self.deliveries)

    # ----------------------------------------------------------------- seeding from the recordings

    def _seed(self) -> None:
        project = load_fixture("api/GET_api_projects_ID.json")
        self.projects[project["id"]] = project
        self._project_template = copy.deepcopy(project)
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

    def _add_label(self, spec: dict, *, task_id: int | None = None, project_id: int | None = None,
                   parent_id: int | None = None) -> dict:
        """A label as LabelSerializer.create_labels stores it; the record as GET /api/labels shows it (``task_id``
        or ``project_id``, whichever it belongs to). Colors come from a fixed palette, not CVAT's name hash.
        A skeleton's ``sublabels`` (``[{"name", "type"?, "attributes"?}]``) are labels of their own with its
        ``parent_id`` (GET /api/labels lists only top-level labels; the skeleton nests its parts as
        SublabelSerializer shows them), and its ``svg`` is stored with each ``data-label-name="NAME"`` replaced by
        ``data-label-id="ID"``, as ``create_labels`` stores it."""
        label_id = self._new_id("label")
        attributes = [{
            "id": self._new_id("attribute"), "name": a["name"], "mutable": a.get("mutable", False),
            "input_type": a.get("input_type", "text"),
            "default_value": a.get("default_value", (a.get("values") or [""])[0]), "values": list(a.get("values", [])),
        } for a in spec.get("attributes", [])]
        owner = {"task_id": task_id} if project_id is None else {"project_id": project_id}
        label_type = spec.get("type") or "any"
        record = {
            "id": label_id, "name": spec["name"], "color": spec.get("color") or _PALETTE[label_id % len(_PALETTE)],
            "attributes": attributes, "type": label_type, "sublabels": [], **owner,
            "parent_id": parent_id, "has_parent": parent_id is not None,
        }
        self.labels[label_id] = record
        if label_type == "skeleton":
            parts = [self._add_label({"type": "points", **part}, task_id=task_id, project_id=project_id,
                                     parent_id=label_id) for part in spec.get("sublabels") or []]
            svg = spec.get("svg") or ""
            for part in parts:
                svg = svg.replace(f'data-label-name="{part["name"]}"', f'data-label-id="{part["id"]}"')
            record["sublabels"] = [{key: part[key] for key in ("id", "name", "color", "attributes", "type",
                                                               "has_parent")} for part in parts]
            self.labels[label_id] = _ordered({**record, "svg": svg}, _LABEL_ORDER)
        return self.labels[label_id]

    def _add_job(self, task: Task, start: int, stop: int, now: str) -> Job:
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
        return self.jobs[job_id]

    # ----------------------------------------------------------------- webhook events (cvat/apps/webhooks/signals.py)

    def _helper_base(self) -> str:
        """The base URL of objects made by a test helper (as if the double had been called over HTTP)."""
        return self.base_url if self._server is not None else RECORDED_BASE

    def _sender(self, worker: bool) -> dict:
        """``get_sender``: BasicUserSerializer of the request's user; in the task-creation RQ job, where there is no
        request, the user dict the job carries (recorded: create_job.json, update_task.mode_overlap_set.json)."""
        user = self.users[self.username]
        if worker:
            return {"id": user["id"], "username": user["username"], "email": user["email"]}
        return {key: user[key] for key in ("url", "id", "username", "first_name", "last_name")}

    def _task_payload(self, task: Task, *, jobs: tuple[int, int | None, int | None] = (0, None, None),
                      worker: bool = False) -> dict:
        """The task as a webhook payload carries it: the GET body, except the ``jobs`` summary. The signals
        serialize the saved instance, which lacks the counts the list/retrieve queryset annotates, so CVAT sends
        ``count`` 0 and ``completed``/``validation`` null (recorded in every update:task) unless the instance is
        the view's annotated object (``jobs`` = its counts: 0, 0, 0 in update_task.jobs_created). From the RQ
        worker (``worker``) URLs are relative, ``jobs.url`` and ``labels`` null (update_task.mode_overlap_set)."""
        obj = self._task_json(task)
        obj["jobs"] = {"count": jobs[0], "completed": jobs[1], "validation": jobs[2],
                       "url": None if worker else obj["jobs"]["url"]}
        if worker:
            obj["labels"] = None
        return obj

    def _job_payload(self, job: Job, *, worker: bool = False) -> dict:
        """The job as GET /api/jobs/ID shows it; from the RQ worker with relative URLs and ``issues``/``labels``
        null (recorded: create_job.json)."""
        obj = self._job_json(job)
        if worker:
            obj["issues"] = obj["labels"] = None
        return obj

    def _emit(self, event: str, obj: dict, project_id: int | None, before: dict | None = None, *,
              worker: bool = False) -> None:
        """post_save/post_delete_resource_event + select_webhooks: one payload per active project webhook of the
        object's project subscribed to ``event`` (tasks in no project reach none: organizations are not
        modelled). Payload keys in the recorded order: event, the object, sender, before_update (only when
        something changed), webhook_id. Queued when the request (or helper) succeeds: transaction.on_commit."""
        hooks = [hook for hook in self.webhooks.values()
                 if hook["is_active"] and hook["type"] == "project" and hook["project_id"] == project_id
                 and project_id is not None and event in hook["events"]]
        if not hooks:
            return
        resource = event.partition(":")[2]
        data: dict[str, Any] = {"event": event, resource: obj, "sender": self._sender(worker)}
        if before:
            data["before_update"] = before
        text = json.dumps(data).replace(RECORDED_BASE, "" if worker else self._current_base)
        for hook in hooks:
            self._outbox.append(({key: hook[key] for key in ("id", "target_url", "secret", "enable_ssl")},
                                 {**json.loads(text), "webhook_id": hook["id"]}))

    def _emit_update(self, event: str, old: dict, new: dict, project_id: int | None, *,
                     worker: bool = False) -> None:
        self._emit(event, new, project_id, _diff(old, new), worker=worker)

    def _created_task(self, task: Task) -> None:
        """``POST /api/tasks``: create:task (no data yet: recorded create_task.json), and the project's
        updated_date touched: update:project with only updated_date (update_project.touch_on_task_create.json)."""
        project_id = task.record["project_id"]
        self._emit("create:task", self._task_payload(task), project_id)
        self._touch_project(project_id)

    def _touch_project(self, project_id: int | None, *, worker: bool = False) -> None:
        project = self.projects.get(project_id) if project_id is not None else None
        if project is not None:
            old = self._project_json(project)
            project["updated_date"] = _now()
            self._emit_update("update:project", old, self._project_json(project), project_id, worker=worker)

    def _attach_data(self, task: Task) -> None:
        """What ``POST /api/tasks/ID/data`` (TaskViewSet.data/upload_data, cvat/apps/engine/views.py) and then the
        task-creation RQ job (cvat/apps/engine/task.py) do, with the update:task/create:job deliveries recorded for
        them (all_deliveries.json 6-11, 31-35), the ``before_update`` of each as recorded."""
        record, project_id = task.record, task.record["project_id"]
        chunk_type = "video" if task.video else "imageset"
        # 1. The view attaches a new Data object (image_quality: the model default, 50) and saves the task.
        old = self._task_payload(task)
        record.update({"data_chunk_size": None, "data_compressed_chunk_type": chunk_type,
                       "data_original_chunk_type": chunk_type, "size": 0, "image_quality": 50,
                       "data": self._new_id("data"), "updated_date": _now()})
        task.record = record = _ordered(record, _TASK_FIELDS)
        self._emit_update("update:task", old, self._task_payload(task), project_id)  # update_task.data_attached
        # 2. upload_data saves the view's object, whose job counts were annotated (0, 0, 0) when the request began.
        before = {"updated_date": record["updated_date"], "jobs": self._task_payload(task)["jobs"]}
        record.update({"image_quality": task.image_quality, "updated_date": _now()})
        self._emit("update:task", self._task_payload(task, jobs=(0, 0, 0)), project_id, before)  # .jobs_created
        # 3. The RQ job creates the segments and their jobs (create:job from the worker) ...
        size, now = len(task.frames), _now()
        segment = record["segment_size"] or size
        for start in range(0, size, segment):
            job = self._add_job(task, start, min(start + segment, size) - 1, now)
            self._emit("create:job", self._job_payload(job, worker=True), project_id, worker=True)
        # 4. ... saves the task with its mode, overlap and segment size (the size lives on Data: not in the diff) ...
        before = {"mode": record["mode"], "updated_date": record["updated_date"], "overlap": record["overlap"]}
        if record["segment_size"] != segment:
            before["segment_size"] = record["segment_size"]
        record.update({"mode": "interpolation" if task.video else "annotation", "overlap": 0, "segment_size": segment,
                       "size": size, "data_chunk_size": task.chunk_size, "updated_date": _now()})
        self._emit("update:task", self._task_payload(task, worker=True), project_id, before, worker=True)
        # 5. ... and once more at the end (updated_date only).
        before = {"updated_date": record["updated_date"]}
        record["updated_date"] = task.chunks_updated_date = _now()
        self._emit("update:task", self._task_payload(task, worker=True), project_id, before, worker=True)
        task.pending = False

    def _annotation_saved(self, task: Task, job: Job, *, worker: bool = False) -> None:
        """JobAnnotation._set_updated_date (cvat/apps/dataset_manager/task.py): a save that changed something in
        a job touches the job, its task and its project: update:job, update:task, update:project, each with
        ``before_update`` = {updated_date} (recorded: *.annotation_save_on_job.json; a task-level save does this
        for every job it changed, in job order). ``worker``: saved by an RQ job (the lambda manager's), whose
        payloads are serialized without a request (see ``_task_payload``)."""
        project_id = task.record["project_id"]
        old = self._job_payload(job, worker=worker)
        job.record["updated_date"] = _now()
        self._emit_update("update:job", old, self._job_payload(job, worker=worker), project_id, worker=worker)
        old = self._task_payload(task, worker=worker)
        task.record["updated_date"] = _now()
        self._emit_update("update:task", old, self._task_payload(task, worker=worker), project_id, worker=worker)
        self._touch_project(project_id, worker=worker)

    def _flush(self) -> None:
        """Queue the events of the request (or helper) that just succeeded."""
        if not self._outbox:
            return
        with self._queue_cond:
            if not self._closing:
                self._queue.extend(self._outbox)
                self._unsent += len(self._outbox)
                if self._courier is None:
                    self._courier = threading.Thread(target=self._deliver_forever, name="cvat-double-webhooks",
                                                     daemon=True)
                    self._courier.start()
                self._queue_cond.notify_all()
        self._outbox = []

    def _deliver_forever(self) -> None:
        """The webhooks RQ worker: one delivery at a time, in the order queued, no retries."""
        pools = {True: urllib3.PoolManager(), False: urllib3.PoolManager(cert_reqs="CERT_NONE")}
        while True:
            with self._queue_cond:
                self._queue_cond.wait_for(lambda: self._queue or self._closing)
                if self._closing:
                    for pool in pools.values():
                        pool.clear()
                    return
                hook, payload = self._queue.popleft()
            delivery = _send(pools[bool(hook["enable_ssl"])], hook, payload)
            with self._queue_cond:
                self._delivery_id += 1
                self.deliveries.append(Delivery(self._delivery_id, hook["id"], payload["event"],
                                                hook["target_url"], body=json.dumps(payload).encode(),
                                                payload=payload, **delivery))
                self._unsent -= 1
                self._queue_cond.notify_all()

    def _new_webhook(self, body: dict, base: str) -> dict:
        """WebhookWriteSerializer: validate, store (secret kept), return the read record (no secret)."""
        errors = {k: ["This field is required."] for k in ("target_url", "type", "events") if not body.get(k)}
        if body.get("type") not in (None, "project", "organization"):
            errors["type"] = [f'"{body["type"]}" is not a valid choice.']
        events = body.get("events") or []
        unknown = [e for e in events if e not in _PROJECT_EVENTS + _ORGANIZATION_ONLY_EVENTS]
        if unknown:
            errors["events"] = [f'"{unknown[0]}" is not a valid choice.']
        if body.get("type") == "project" and body.get("project_id") not in self.projects:
            errors["project_id"] = [f'Invalid pk "{body.get("project_id")}" - object does not exist.']
        if errors:
            raise HttpError(400, errors)
        if body["type"] == "project" and not set(events) <= set(_PROJECT_EVENTS):  # EventTypeValidator
            raise HttpError(400, {"non_field_errors": ["Invalid events list for project webhook"]})
        webhook_id, now = self._new_id("webhook"), _now()
        record = load_fixture("webhooks/api/POST_api_webhooks.project.json")
        record.update({
            "id": webhook_id, "url": f"{base}/api/webhooks/{webhook_id}",
            "target_url": body["target_url"], "description": body.get("description", ""), "type": body["type"],
            "content_type": body.get("content_type", "application/json"), "is_active": body.get("is_active", True),
            "enable_ssl": body.get("enable_ssl", True), "created_date": now, "updated_date": now,
            "project_id": body.get("project_id"), "organization": None, "events": sorted(set(events))})
        record["owner"] = json.loads(json.dumps(record["owner"]).replace(RECORDED_BASE, base))
        self.webhooks[webhook_id] = {**record, "secret": body.get("secret") or ""}
        return record

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
            except ServerCrash:
                response = Response(500, _SERVER_ERROR_HTML.encode(), "text/html; charset=utf-8")
            except Exception as error:  # a bug in the double: answer like Django would, keep it for the test to see
                self.errors.append(error)
                response = Response(500, _SERVER_ERROR_HTML.encode(), "text/html; charset=utf-8")
            if response.status < 400:
                self._flush()  # the request's webhook events (CVAT: transaction.on_commit)
            else:
                self._outbox.clear()  # rolled back: nothing is sent
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
            ids = (int(g) if g.isdigit() else unquote(g) for g in match.groups())  # a lambda request's id is text
            response: Response = getattr(self, handler)(request, *ids)
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
        return sorted((label for label in self.labels.values() if label.get(key) == value
                       and label.get("parent_id") is None), key=lambda x: x["id"])

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
        if not jobs:  # a task without data keeps the model's default status
            status = task.record["status"]
        summary = {
            "count": len(jobs),
            "completed": sum(j.record["stage"] == "acceptance" and j.record["state"] == "completed" for j in jobs),
            "validation": sum(j.record["stage"] == "validation" for j in jobs),
            "url": task.record["jobs"]["url"],
        }
        return {**task.record, "status": status, "jobs": summary}

    def _with_defaults(self, kind: str, obj: dict) -> dict:
        """An annotation as GET returns it: attribute values not stored get their spec's default, at read time
        (JobAnnotation._extend_attributes), so an attribute added to a label later shows on older annotations.
        Tags and shapes take all the label's attributes, a track the immutable ones, its shapes the mutable ones."""
        obj = copy.deepcopy(obj)
        label = self.labels.get(obj["label_id"])
        if label is None:
            return obj
        specs = label["attributes"]
        if kind == "tracks":
            obj["attributes"] = _fill(obj.get("attributes"), [a for a in specs if not a["mutable"]])
            for shape in obj.get("shapes") or []:
                shape["attributes"] = _fill(shape.get("attributes"), [a for a in specs if a["mutable"]])
        else:
            obj["attributes"] = _fill(obj.get("attributes"), specs)
        return obj

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
        if not isinstance(body, dict):
            raise HttpError(400, {"non_field_errors": ["Invalid data. Expected a dictionary, but got list."]})
        return self._json(self._new_webhook(body, self._current_base), 201)

    def _webhook_list(self, request: _Request) -> Response:
        project_id = request.int_param("project_id")
        return self._page(request, [{k: v for k, v in w.items() if k != "secret"}
                                    for _, w in sorted(self.webhooks.items(), reverse=True)
                                    if project_id is None or w["project_id"] == project_id])

    # ----------------------------------------------------------------- handlers: the lambda manager's requests

    @staticmethod
    def _lambda_request_json(request: LambdaRequest) -> dict:
        """FunctionCallSerializer of ``LambdaJob.to_dict()``: the function's parameters, rq's status (deferred
        shown as queued), the progress in percent (an int), rq's dates."""
        params = {"id": request.function.id, "task": request.task_id,
                  **({"job": request.job_id} if request.job_id else {}), "threshold": request.threshold}
        return {"id": request.id, "function": params, "status": request.status, "progress": request.progress,
                "enqueued": request.enqueued, "started": request.started, "ended": request.ended,
                "exc_info": request.exc_info}

    def _lambda_request_list(self, request: _Request) -> Response:
        """RequestViewSet.list: every request of the queue but the failed ones, not paginated."""
        listed = sorted((r for r in self.lambda_requests.values() if r.status != "failed"), key=lambda r: r.enqueued)
        return self._json([self._lambda_request_json(r) for r in listed])

    def _lambda_request_create(self, request: _Request) -> Response:
        """RequestViewSet.create: FunctionCallRequestSerializer, the function fetched from Nuclio (unknown: the
        dashboard's 404 passed on as text), then LambdaQueue.enqueue: 409 while the task's request (its id names the
        task) is neither finished nor failed; the task or job must exist (ObjectDoesNotExist: 400)."""
        body = request.json()
        errors = {key: ["This field is required."] for key in ("function", "task") if body.get(key) is None}
        if errors:
            raise HttpError(400, errors)
        if body.get("mapping"):
            raise NotImplementedError("the double does not model a label mapping in a lambda request")
        function = self.lambda_functions.get(str(body["function"]))
        if function is None:
            raise HttpError(404, f"404 Client Error: Not Found for url: http://nuclio:8070/api/functions/"
                                 f"{body['function']}")
        task_id = body["task"]
        rq_id = f"action=autoannotate&target=task&target_id={task_id}"
        old = self.lambda_requests.get(rq_id)
        if old is not None and old.status not in ("failed", "finished"):
            raise HttpError(409, f"Only one running request is allowed for the same task #{task_id}")
        job_id = body.get("job")
        if (job_id is not None and job_id not in self.jobs) or (job_id is None and task_id not in self.tasks):
            raise HttpError(400, f"{'Job' if job_id is not None else 'Task'} matching query does not exist.")
        made = LambdaRequest(rq_id, function, task_id, job_id, body.get("threshold"), bool(body.get("cleanup")))
        self.lambda_requests.pop(rq_id, None)  # rq_job.delete(): the finished one makes way
        self.lambda_requests[rq_id] = made
        return self._json(self._lambda_request_json(made))

    def _lambda_request(self, request: _Request, request_id: str) -> Response:
        if request_id not in self.lambda_requests:
            raise HttpError(404, f"{request_id} lambda job is not found")
        return self._json(self._lambda_request_json(self.lambda_requests[request_id]))

    def _lambda_request_delete(self, request: _Request, request_id: str) -> Response:
        """Cancel: the RQ job is deleted (a running one stops at its next progress update)."""
        if self.lambda_requests.pop(request_id, None) is None:
            raise HttpError(404, f"{request_id} lambda job is not found")
        return Response(204, content_type=None)

    def _lambda_mapping(self, function: LambdaFunction, task: Task) -> dict[str, dict]:
        """make_default_mapping: each function label to the task label of the same name whose type is compatible
        (equal, either ``any``, or mask with polygon), with the attributes of the same names."""
        mapping = {}
        for model_label in function.labels:
            model_type = model_label.get("type") or "any"
            for task_label in self._task_labels(task):
                types = {model_type, task_label["type"]}
                compatible = (model_type == task_label["type"] or ("any" in types and "skeleton" not in types)
                              or types == {"mask", "polygon"})
                if task_label["name"] == model_label["name"] and compatible:
                    names = {a["name"] for a in task_label["attributes"]}
                    mapping[model_label["name"]] = {"label": task_label, "attributes": {
                        a["name"]: a["name"] for a in model_label.get("attributes") or [] if a["name"] in names}}
                    if model_type == "skeleton":  # its parts by name (all of type points)
                        parts = {part["name"]: part for part in task_label["sublabels"]}
                        mapping[model_label["name"]]["sublabels"] = {
                            part["name"]: parts[part["name"]] for part in model_label.get("sublabels") or []
                            if part["name"] in parts}
        return mapping

    @staticmethod
    def _lambda_convert(task: Task, mapping: dict[str, dict], frame: int, items: list) -> dict[str, list]:
        """LambdaFunction.invoke's filtering (labels not mapped are dropped, attributes kept when mapped and valid
        for a text, checkbox, select or radio spec) and DetectionResultConverter: tags and shapes, ``source: auto``."""
        converted: dict[str, list] = {"tags": [], "shapes": []}
        for item in items:
            mapped = mapping.get(item.get("label"))
            if mapped is None:
                continue
            label = mapped["label"]
            specs = {a["name"]: a for a in label["attributes"]}
            attributes = []
            for attribute in item.get("attributes") or []:
                spec = specs.get(mapped["attributes"].get(attribute.get("name")))
                value = str(attribute.get("value"))
                input_type = spec["input_type"] if spec is not None else None  # check_attr_value (not numbers)
                valid = input_type == "text" or (input_type == "checkbox" and value in ("true", "false")) \
                    or (input_type in ("select", "radio") and value in spec["values"])
                if valid:
                    attributes.append({"spec_id": spec["id"], "value": value})
            kind = str(item.get("type", "")).lower()
            if kind == "tag":
                converted["tags"].append({"frame": frame, "label_id": label["id"], "source": "auto",
                                          "attributes": attributes, "group": None})
                continue
            if kind == "mask":
                raise NotImplementedError("the double does not convert masks from a function")
            shape = {"frame": frame, "label_id": label["id"], "source": "auto", "attributes": attributes,
                     "group": item.get("group_id"), "type": kind, "occluded": False,
                     "outside": item.get("outside", False), "points": item.get("points", []), "z_order": 0}
            if kind in ("rectangle", "ellipse"):
                shape["rotation"] = item.get("rotation", 0)
            if kind == "skeleton":  # elements of mapped parts; every other part outside at their centroid
                parts = mapped.get("sublabels") or {}
                given = {e["label"]: e for e in item.get("elements") or [] if e.get("label") in parts}
                points = [e["points"] for e in given.values()]
                count = len(points) or 1
                centre = [sum(p[0] for p in points) / count, sum(p[1] for p in points) / count]
                shape["elements"] = [
                    {"frame": frame, "label_id": part["id"], "source": "auto", "attributes": [], "group": None,
                     "type": "points", "occluded": False, "z_order": 0,
                     "points": given[part["name"]]["points"] if part["name"] in given else centre,
                     "outside": bool(given[part["name"]].get("outside", False)) if part["name"] in given else True}
                    for part in label["sublabels"]]
                if all(e["outside"] for e in shape["elements"]):
                    continue
            converted["shapes"].append(shape)
        return converted

    def _lambda_submit(self, request: LambdaRequest, task: Task, job: Job | None) -> None:
        """DetectionResultCollector.submit: PATCH ``action=create`` of what was collected (nothing: no save)."""
        if request.collected["tags"] or request.collected["shapes"]:
            self._write(task, job, "create", request.collected, worker=True)
            self._flush()
        request.collected = {"tags": [], "shapes": []}

    # ----------------------------------------------------------------- handlers: projects, tasks, jobs, labels

    def _project_json(self, project: dict) -> dict:
        """ProjectReadSerializer: ``tasks.count``, ``dimension`` (of its first task with one; null without
        tasks, as POST_api_projects.json shows) and ``task_subsets`` (the tasks' non-empty subsets)."""
        tasks = [t for t in self.tasks.values() if t.record["project_id"] == project["id"]]
        return {**project, "dimension": next((t.record["dimension"] for t in tasks if t.record["dimension"]), None),
                "tasks": {**project["tasks"], "count": len(tasks)},
                "task_subsets": sorted({t.record["subset"] for t in tasks if t.record["subset"]})}

    def _get_project(self, project_id: int) -> dict:
        if project_id not in self.projects:
            raise HttpError(404, {"detail": "No Project matches the given query."})
        return self.projects[project_id]

    def _project_list(self, request: _Request) -> Response:
        return self._page(request, [self._project_json(p) for _, p in sorted(self.projects.items(), reverse=True)])

    def _project(self, request: _Request, project_id: int) -> Response:
        return self._json(self._project_json(self._get_project(project_id)))

    def _project_patch(self, request: _Request, project_id: int) -> Response:
        """ProjectWriteSerializer (partial) then ProjectWriteSerializer.update (cvat/apps/engine/serializers.py):
        ``name``/``bug_tracker`` replaced; each of ``labels`` goes through LabelSerializer.update_label in order,
        all in one transaction; the project saved (update:project). The answer is the project as
        ProjectReadSerializer shows it."""
        project, body = self._get_project(project_id), request.json()
        labels = self._checked_write(body, ("name", "bug_tracker"))
        removed = self._update_labels(labels, {"project_id": project_id})
        old = self._project_json(project)
        project.update({key: body[key] for key in ("name", "bug_tracker") if key in body})
        project["updated_date"] = _now()
        for task in (t for t in self.tasks.values() if t.record["project_id"] == project_id):
            self._drop_label_annotations(task, removed)
            if "labels" in body:  # update_child_objects_on_labels_update: a queryset update, no signals
                for job_id in task.job_ids:
                    self.jobs[job_id].record["updated_date"] = project["updated_date"]
                task.record["updated_date"] = project["updated_date"]
        new = self._project_json(project)
        self._emit_update("update:project", old, new, project_id)
        return self._json(new)

    def _task_patch(self, request: _Request, task_id: int) -> Response:
        """TaskWriteSerializer (partial) then TaskWriteSerializer.update: ``name``/``bug_tracker``/``subset``
        replaced; ``labels`` updated as for a project, but only for a task in no project (a project's task takes
        its labels from the project: ignored). The task is saved: update:task (the view's object, so its job counts
        are annotated and ``jobs`` shows in before_update, as in update_task.jobs_created), then
        TaskViewSet.perform_update touches the project. The answer is the task record. Moving a task to another
        project is not modelled."""
        task, body = self._get_task(task_id), request.json()
        labels = self._checked_write(body, ("name", "bug_tracker", "subset"))
        if "project_id" in body and body["project_id"] != task.record["project_id"]:
            raise NotImplementedError("the double does not move tasks between projects")
        project_id = task.record["project_id"]
        removed = self._update_labels(labels, {"task_id": task_id}) if project_id is None else []
        old = self._task_payload(task)
        task.record.update({key: body[key] for key in ("name", "bug_tracker", "subset") if key in body})
        task.record["updated_date"] = _now()
        self._drop_label_annotations(task, removed)
        if "labels" in body and project_id is None:
            for job_id in task.job_ids:
                self.jobs[job_id].record["updated_date"] = task.record["updated_date"]
        self._emit_update("update:task", old, self._task_json(task), project_id)
        self._touch_project(project_id)
        return self._json(self._task_json(task))

    def _checked_write(self, body: Any, fields: Sequence[str]) -> list:
        """The DRF validation of a project/task PATCH body: its plain fields and its ``labels``."""
        if not isinstance(body, dict):
            raise HttpError(400, {"non_field_errors": [
                f"Invalid data. Expected a dictionary, but got {type(body).__name__}."]})
        errors: dict[str, Any] = {}
        for key in fields:
            if key in body and (problem := _char_error(body[key], blank=key != "name")):
                errors[key] = [problem]
        labels = body.get("labels", [])
        if not isinstance(labels, list):
            errors["labels"] = {"non_field_errors": [
                f'Expected a list of items but got type "{type(labels).__name__}".']}
        elif any(label_errors := [_label_errors(spec) for spec in labels]):
            errors["labels"] = label_errors
        if errors:
            raise HttpError(400, errors)
        return labels

    def _update_labels(self, labels: list[dict], owner: dict) -> list[int]:
        """LabelSerializer.update_labels, in one transaction (an error leaves the labels as they were); returns the
        ids of the labels deleted."""
        saved = copy.deepcopy(self.labels)  # ids handed out stay used, as database sequences do
        try:
            return [label_id for spec in labels if (label_id := self._update_label(spec, owner)) is not None]
        except HttpError:
            self.labels.clear()
            self.labels.update(saved)
            raise

    @staticmethod
    def _drop_label_annotations(task: Task, removed: Sequence[int]) -> None:
        for kind in _KINDS:  # Label.delete() cascades to the annotations of that label
            task.annotations[kind] = [o for o in task.annotations[kind] if o["label_id"] not in removed]

    def _update_label(self, spec: dict, owner: dict) -> int | None:
        """LabelSerializer.update_label for a label of ``owner`` ({"project_id": N} or {"task_id": N}); returns the
        id of a label it deleted. A new skeleton gets its sublabels and svg (``_add_label``). Not modelled: changing
        a skeleton's sublabels, and the color CVAT derives from the name when none is given (a palette color)."""
        (owner_key, owner_id), = owner.items()
        attributes = spec.get("attributes") or []
        seen: set[str] = set()
        for attribute in attributes:  # check_attribute_names_unique
            if attribute.get("name") in seen:
                raise HttpError(400, [f"Duplicate attribute with name '{attribute.get('name')}' exists"])
            seen.add(attribute.get("name"))
        if spec.get("id") is not None:
            label = self.labels.get(spec["id"])
            if label is None or label.get(owner_key) != owner_id:
                raise HttpError(404, {"detail": f"Not found label with id #{spec['id']} to change"})
            new_type = spec.get("type") or label["type"]
            if "skeleton" not in (label["type"], new_type):  # changing from or to skeleton is ignored
                label["type"] = new_type
            label["name"] = spec.get("name") or label["name"]
        else:
            if spec.get("name") in (None, ""):  # Label.create: the NOT NULL IntegrityError becomes InvalidLabel
                raise HttpError(400, ["All label names must be unique"])
            label = self._add_label({"name": spec["name"], "type": spec.get("type"), "color": spec.get("color"),
                                     "sublabels": spec.get("sublabels") or [], "svg": spec.get("svg") or ""},
                                    **owner)
        if spec.get("deleted"):
            del self.labels[label["id"]]
            return label["id"]
        if spec.get("color"):
            label["color"] = spec["color"]
        if any(other["name"] == label["name"] for other in self.labels.values()
               if other.get(owner_key) == owner_id and other["id"] != label["id"]):
            raise HttpError(400, ["All label names must be unique"])  # unique (project, name) / (task, name)
        for attribute in attributes:
            if attribute.get("id") is not None:
                stored = next((a for a in label["attributes"] if a["id"] == attribute["id"]), None)
                if stored is None:
                    raise HttpError(404, {"detail": f"Attribute with id #{attribute['id']} does not exist"})
            else:  # AttributeSpec.objects.get_or_create(label=..., name=..., defaults=attr)
                stored = next((a for a in label["attributes"] if a["name"] == attribute.get("name")), None)
                if stored is None:
                    label["attributes"].append({
                        "id": self._new_id("attribute"), "name": attribute.get("name"),
                        "mutable": attribute.get("mutable", False), "input_type": attribute.get("input_type", ""),
                        "default_value": attribute.get("default_value", ""),
                        "values": list(attribute.get("values", [""]))})  # the model's "" reads back as [""]
                    continue
            stored.update({key: attribute[key] for key in ("name", "default_value", "mutable", "input_type",
                                                            "values") if key in attribute})
        return None

    def _task_list(self, request: _Request) -> Response:
        tasks = sorted(self.tasks.values(), key=lambda t: -t.id)  # newest first
        if "project_id" in request.query:
            tasks = [t for t in tasks if str(t.record["project_id"]) == request.query["project_id"]]
        return self._page(request, [self._task_json(t) for t in tasks])

    def _task(self, request: _Request, task_id: int) -> Response:
        return self._json(self._task_json(self._get_task(task_id)))

    def _task_delete(self, request: _Request, task_id: int) -> Response:
        """Deleting a task: delete:job for each job, the project touched (update:project), delete:task with the
        view's object, job counts annotated (recorded: all_deliveries.json 36-38)."""
        task = self._get_task(task_id)
        project_id, payload = task.record["project_id"], self._task_json(task)
        for job_id in task.job_ids:
            self._emit("delete:job", self._job_payload(self.jobs[job_id]), project_id)
        self._drop_task(task.id)
        self._touch_project(project_id)
        self._emit("delete:task", payload, project_id)
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
        """JobWriteSerializer.update saves the job (update:job, before_update = what changed, e.g.
        {state, updated_date} or {status, stage, updated_date} as recorded); engine/signals.py
        __save_job_handler saves the task only when its status changes (update:task {updated_date, status})."""
        job, body = self._get_job(job_id), request.json()
        errors = {key: [f'"{body[key]}" is not a valid choice.'] for key, choices in _JOB_CHOICES.items()
                  if key in body and body[key] not in choices}
        if errors:
            raise HttpError(400, errors)
        task = self.tasks[job.task_id]
        old_job, old_task = self._job_payload(job), self._task_payload(task)
        job.record.update({key: body[key] for key in _JOB_CHOICES if key in body})
        job.record["updated_date"] = _now()
        self._emit_update("update:job", old_job, self._job_payload(job), task.record["project_id"])
        if self._task_json(task)["status"] != old_task["status"]:
            task.record["updated_date"] = _now()
            self._emit_update("update:task", old_task, self._task_payload(task), task.record["project_id"])
        return self._json(self._job_json(job))

    def _label_list(self, request: _Request) -> Response:
        if "job_id" in request.query:
            job = self.jobs.get(request.int_param("job_id") or -1)
            labels = self._task_labels(self.tasks[job.task_id]) if job else []
        elif "task_id" in request.query:
            task = self.tasks.get(request.int_param("task_id") or -1)
            labels = self._task_labels(task) if task else []
        else:  # only first-level labels (a skeleton's parts are nested in it)
            labels = sorted((x for x in self.labels.values() if x.get("parent_id") is None), key=lambda x: x["id"])
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
        if task.pending:  # TaskViewSet.metadata reads db_task.data.images with data None: AttributeError, 500
            raise ServerCrash("'NoneType' object has no attribute 'images'")
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
        if task.pending:  # _DataGetter checks the parameters, then TaskFrameProvider reads data.size: 500
            if raw is None:
                raise HttpError(400, ["Number is not specified"])
            raise ServerCrash("'NoneType' object has no attribute 'size'")
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
        if task.pending:
            return self._annotations_without_data(request, task)
        if request.method == "GET":
            return self._json(self._view(task, job, task.annotations))
        if request.method == "DELETE":  # JobAnnotation.delete(): the jobs that held something are touched
            touched = [j for j in self._scope_jobs(task, job) if self._holds_any(task, j)]
            self._remove_scope(task, job)
            for saved in touched:
                self._annotation_saved(task, saved)
            return Response(204, content_type=None)
        action, body = self._annotation_request(request)
        return self._json(self._write(task, job, action, body))

    @staticmethod
    def _annotation_request(request: _Request) -> tuple[str, dict]:
        """The action and body of an annotation write, refused as the server refuses them."""
        action = "put" if request.method == "PUT" else request.query.get("action")
        if action not in ("put", "create", "update", "delete") or (action == "put") != (request.method == "PUT"):
            raise HttpError(400, ["Please specify a correct 'action' for the request"])
        body = request.json()
        if not isinstance(body, dict):
            raise HttpError(400, {"non_field_errors": ["Invalid data. Expected a dictionary, but got list."]})
        return action, body

    def _annotations_without_data(self, request: _Request, task: Task) -> Response:
        """TaskViewSet.annotations for a task whose ``data`` is None (cvat/apps/engine/views.py): GET answers 400
        text/html; PATCH validates the body, then TaskAnnotation reads ``data.validation_mode`` and the
        AttributeError is answered as a 400 JSON string; PUT and DELETE let it escape (500)."""
        if request.method == "GET":
            return Response(400, b"Exporting annotations from a task without data is not allowed",
                            "text/html; charset=utf-8")
        if request.method == "DELETE":
            raise ServerCrash("'NoneType' object has no attribute 'validation_mode'")
        action, body = self._annotation_request(request)
        self._validate_fields({kind: body.get(kind) or [] for kind in _KINDS})
        if action == "put":
            raise ServerCrash("'NoneType' object has no attribute 'validation_mode'")
        raise HttpError(400, "'NoneType' object has no attribute 'validation_mode'")

    def _scope_jobs(self, task: Task, job: Job | None) -> list[Job]:
        return [job] if job else [self.jobs[j] for j in task.job_ids]

    def _job_of(self, task: Task, frame: int) -> Job | None:
        return next((self.jobs[j] for j in task.job_ids if self.jobs[j].start <= frame <= self.jobs[j].stop), None)

    @staticmethod
    def _within(kind: str, obj: dict, job: Job) -> bool:
        """Whether ``obj`` falls in the job's frames (AnnotationIR.slice: a track as ``_track_inside`` says)."""
        if kind == "tracks":
            return _track_inside(obj, job.start, job.stop)
        return isinstance(obj.get("frame"), int) and job.start <= obj["frame"] <= job.stop

    def _holds_any(self, task: Task, job: Job) -> bool:
        return any(job.start <= o["frame"] <= job.stop for kind in _KINDS for o in task.annotations[kind])

    def _view(self, task: Task, job: Job | None, objects: dict[str, list[dict]], write: bool = False) -> dict:
        """Objects grouped job by job (the task view is the jobs' views merged, as on the server). A track that
        ends inside a job which is not the task's last gets an ``outside`` copy of its last shape on the next
        job's first frame (same id, not stored). GET lists each job's objects by frame, ties in save order
        (recorded: after updating shape 89 the job lists 88, 90, 89, 91), attribute defaults filled in; write
        responses keep request order and echo what was sent."""
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
                    obj = copy.deepcopy(obj) if write else self._with_defaults(kind, obj)
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

    def _write(self, task: Task, job: Job | None, action: str, body: dict, *, worker: bool = False) -> dict:
        """PATCH create/update/delete and PUT (dm.task / JobAnnotation in cvat/apps/dataset_manager/task.py): the
        body is validated as a whole, then saved job by job; each job whose part of the request is not empty
        (for PUT: or that held annotations) is touched, with its webhooks (``_annotation_saved``)."""
        data = {kind: body.get(kind) or [] for kind in _KINDS}
        scope = self._scope_jobs(task, job)
        if action in ("put", "create", "update"):
            self._validate(task, data)
        changed = [j for j in scope if any(self._within(kind, obj, j) for kind in _KINDS for obj in data[kind])
                   or (action == "put" and self._holds_any(task, j))]
        if action == "put":
            self._remove_scope(task, job)
        stored = task.annotations
        if action in ("put", "create"):
            echoed: dict[str, list[dict]] = {kind: [] for kind in _KINDS}
            for scope_job in scope:  # ids are handed out job by job, like the server
                for kind in _KINDS:
                    for sent in data[kind]:
                        if kind == "tracks" and job is None:  # a task-level write: one piece per job reached
                            if not _track_inside(sent, scope_job.start, scope_job.stop):
                                continue
                            sent = _slice_track(sent, scope_job.start, scope_job.stop)
                            if not sent["shapes"]:
                                continue
                        elif self._job_of(task, sent["frame"]) is not scope_job:
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
                        touched[kind].append(_echo(kind, sent, stored[kind][-1]))
                    else:
                        touched[kind].append(old)
            result = self._view(task, job, touched, write=True)
        for saved in changed:
            self._annotation_saved(task, saved, worker=worker)
        return result

    def _validate_fields(self, data: dict[str, list]) -> None:
        """LabeledDataSerializer: DRF field errors of every object, one entry per object ({} when valid)."""
        errors: dict[str, list[dict]] = {}
        for kind in _KINDS:
            items = [self._field_errors(kind, obj) for obj in data[kind]]
            if any(items):
                errors[kind] = items
        if errors:
            raise HttpError(400, errors)

    def _validate(self, task: Task, data: dict[str, list]) -> None:
        """The serializer, then what JobAnnotation checks while saving: the label must be the task's
        (``label_id `N` is invalid``) and every attribute spec must belong to that label: any of its attributes
        for tags and shapes, an immutable one on a track, a mutable one on a track's shapes
        (``_validate_attribute_for_existence``: ``spec_id `N` is invalid``)."""
        self._validate_fields(data)
        labels = {label["id"]: label for label in self._task_labels(task)}
        labels.update({part["id"]: self.labels[part["id"]] for label in list(labels.values())
                       for part in label["sublabels"]})  # label_set.all(): a skeleton's parts too
        for kind in _KINDS:
            for obj in [*data[kind], *(e for o in data[kind] for e in o.get("elements") or [])]:
                label = labels.get(obj["label_id"])
                if label is None:
                    raise HttpError(400, [f"label_id `{obj['label_id']}` is invalid"])
                specs = label["attributes"]
                if kind == "tracks":
                    checks = [(obj.get("attributes"), {a["id"] for a in specs if not a["mutable"]})]
                    checks += [(s.get("attributes"), {a["id"] for a in specs if a["mutable"]})
                               for s in obj.get("shapes") or []]
                else:
                    checks = [(obj.get("attributes"), {a["id"] for a in specs})]
                for values, allowed in checks:
                    for value in values or []:
                        if value["spec_id"] not in allowed:
                            raise HttpError(400, [f"spec_id `{value['spec_id']}` is invalid"])

    @staticmethod
    def _field_errors(kind: str, obj: Any) -> dict:
        """DRF serializer errors of one object ({} when valid)."""
        if not isinstance(obj, dict):
            return {"non_field_errors": [f"Invalid data. Expected a dictionary, but got {type(obj).__name__}."]}
        required = ("frame", "label_id", "type") if kind == "shapes" else ("frame", "label_id")
        errors = _required_errors(obj, required)
        if attribute_errors := _attribute_errors(obj.get("attributes", [])):
            errors["attributes"] = attribute_errors
        if kind == "tracks":
            shape_errors = [_shape_errors(s, ("frame", "type")) for s in obj.get("shapes") or []]
            for shape, problems in zip(obj.get("shapes") or [], shape_errors, strict=True):
                if isinstance(shape, dict) and (attribute_errors := _attribute_errors(shape.get("attributes", []))):
                    problems["attributes"] = attribute_errors
            if any(shape_errors):
                errors["shapes"] = shape_errors
        elif kind == "shapes" and "type" not in errors:
            errors.update(_shape_errors(obj, ()))
            elements = obj.get("elements") or []
            element_errors = [_required_errors(e, ("frame", "label_id", "type")) or _shape_errors(e, ())
                              if isinstance(e, dict) else _shape_errors(e, ()) for e in elements]
            if any(element_errors):
                errors["elements"] = element_errors
            elif obj.get("type") == "skeleton" and not elements:  # LabeledShapeSerializer.validate
                errors["elements"] = ["at least one required for skeleton shape"]
            elif obj.get("type") != "skeleton" and elements:
                errors["elements"] = ["not allowed for non-skeleton shape"]
        return errors

    def _normalize(self, kind: str, sent: dict, obj_id: int, *, update: bool = False) -> dict:
        """What the server stores: floats, defaults, attribute values as strings (defaults for attributes not
        given are added when read, see ``_with_defaults``). Track shapes keep their ids on update only."""
        common = {"id": obj_id, "label_id": sent["label_id"], "frame": sent["frame"], "group": sent.get("group", 0),
                  "source": sent.get("source", "manual")}
        if kind == "tags":
            return _ordered({**common, "attributes": _attrs(sent.get("attributes"))}, _STORED_ORDER["tags"])
        if kind == "shapes":  # a skeleton's parts are shapes with ids of their own, and no elements
            elements = [{key: value for key, value in self._normalize("shapes", element, self._new_id("shape")).items()
                         if key != "elements"} for element in sent.get("elements") or []]
            return _ordered({**common, **_geometry(sent), "type": sent["type"],
                             "attributes": _attrs(sent.get("attributes")), "elements": elements},
                            _STORED_ORDER["shapes"])
        shapes = [_ordered({**_geometry(s), "id": (update and s.get("id")) or self._new_id("track_shape"),
                            "type": s["type"], "frame": s["frame"], "attributes": _attrs(s.get("attributes"))},
                           _STORED_ORDER["track_shapes"]) for s in sent.get("shapes") or []]
        return _ordered({**common, "shapes": shapes, "attributes": _attrs(sent.get("attributes")),
                         "elements": copy.deepcopy(sent.get("elements") or [])}, _STORED_ORDER["tracks"])


def _track_inside(track: dict, start: int, stop: int) -> bool:
    """``AnnotationIR._is_track_inside``: whether a track is visible somewhere in ``[start, stop]`` (a lone outside
    shape on ``start`` does not count). Skeleton elements are not modelled."""
    previous = None
    for shape in track.get("shapes") or []:
        if shape["frame"] == start and shape.get("outside"):
            previous = shape
            continue
        if previous and not previous.get("outside") and min(shape["frame"], stop) - max(previous["frame"], start) >= 0:
            return True
        previous = shape
    return previous is not None and not previous.get("outside") and previous["frame"] <= stop


def _slice_track(track: dict, start: int, stop: int) -> dict:
    """``AnnotationIR._slice_track``: the piece of ``track`` a job of ``[start, stop]`` stores. Its keyframes in the
    range (leading outside ones dropped); when the track has keyframes beyond the range, the interpolated shape on
    ``start`` where it is visible there without a keyframe, and on ``stop`` where the track goes on past it and the
    shape there differs from the piece's last (or the outside keyframe that ends it inside the range). CVAT's last
    branch (an outside shape at ``stop + 1`` of the interpolated list) never holds: that list ends at ``stop``."""
    from preannotate.cvat.annotations import track_frames

    def scoped(shapes: list[dict]) -> list[dict]:
        shapes = [s for s in shapes if start <= s["frame"] <= stop]
        while shapes and shapes[0].get("outside"):
            shapes.pop(0)
        return shapes

    track = copy.deepcopy(track)
    shapes = track.get("shapes") or []
    segment = scoped(shapes)
    if len(segment) < len(shapes):
        keyed = {s["frame"]: s for s in shapes}
        visible = {frame: (left, points, rotation) for frame, left, points, rotation, _ in
                   track_frames(track, start, stop + 1)}
        interpolated = []  # (shape, is a keyframe) on every frame of the range the track is visible or ends on
        for frame in range(start, stop + 1):
            if frame in visible:
                left, points, rotation = visible[frame]
                shape = {**copy.deepcopy(dict(left)), "frame": frame, "points": points, "rotation": rotation,
                         "outside": False}
                shape.pop("id", None)
                interpolated.append((shape, frame in keyed))
            elif frame in keyed and keyed[frame].get("outside"):
                interpolated.append((keyed[frame], True))
        while interpolated and interpolated[0][0].get("outside"):
            interpolated.pop(0)
        if interpolated:
            last_key = max(s["frame"] for s in shapes)
            (first, first_is_key), (last, last_is_key) = interpolated[0], interpolated[-1]
            if not first_is_key:
                segment.insert(0, first)
            if last_key >= stop and [float(p) for p in last["points"]] != [float(p) for p in segment[-1]["points"]]:
                segment.append(last)
            elif last_is_key and last.get("outside") and (not segment or last["frame"] > segment[-1]["frame"]):
                segment.append(last)
    track["shapes"] = segment
    if segment:
        track["frame"] = segment[0]["frame"]
    return track


def _char_error(value: Any, *, blank: bool = False, max_length: int | None = None) -> str | None:
    """DRF CharField: the first error message, None when valid."""
    if value is None:
        return "This field may not be null."
    if isinstance(value, (bool, dict, list)):
        return "Not a valid string."
    if not blank and str(value).strip() == "":
        return "This field may not be blank."
    if max_length is not None and len(str(value)) > max_length:
        return f"Ensure this field has no more than {max_length} characters."
    return None


def _field_checks(obj: dict, checks: dict[str, Any]) -> dict[str, list]:
    """DRF field errors of ``obj`` (partial: missing fields are skipped). ``checks``: name -> "int", "bool",
    ("char", blank, max_length) or a tuple of choices."""
    errors: dict[str, list] = {}
    for key, check in checks.items():
        if key not in obj:
            continue
        value = obj[key]
        if check == "int":
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                errors[key] = ["A valid integer is required."]
        elif check == "bool":
            if not isinstance(value, bool) and value not in ("true", "false", "True", "False", 0, 1):
                errors[key] = ["Must be a valid boolean."]
        elif check[0] == "char":
            if problem := _char_error(value, blank=check[1], max_length=check[2]):
                errors[key] = [problem]
        elif value not in check:
            errors[key] = [f'"{value}" is not a valid choice.']
    return errors


def _label_errors(spec: Any) -> dict:
    """LabelSerializer (partial, as inside a PATCH of its project): field errors, then validate()."""
    if not isinstance(spec, dict):
        return {"non_field_errors": [f"Invalid data. Expected a dictionary, but got {type(spec).__name__}."]}
    errors: dict[str, Any] = _field_checks(spec, {"id": "int", "name": ("char", False, 64),
                                                  "color": ("char", True, None), "deleted": "bool",
                                                  "type": _LABEL_TYPES})
    attributes = spec.get("attributes", [])
    if not isinstance(attributes, list):
        errors["attributes"] = {"non_field_errors": [
            f'Expected a list of items but got type "{type(attributes).__name__}".']}
    else:
        items = []
        for attribute in attributes:
            if not isinstance(attribute, dict):
                items.append({"non_field_errors": [
                    f"Invalid data. Expected a dictionary, but got {type(attribute).__name__}."]})
                continue
            item = _field_checks(attribute, {"id": "int", "name": ("char", False, 64), "mutable": "bool",
                                             "input_type": _ATTRIBUTE_TYPES,
                                             "default_value": ("char", True, 128)})
            values = attribute.get("values", [])
            if not isinstance(values, list):
                item["values"] = [f'Expected a list of items but got type "{type(values).__name__}".']
            elif bad := {str(i): [problem] for i, v in enumerate(values)
                         if (problem := _char_error(v, blank=True, max_length=200))}:
                item["values"] = bad
            items.append(item)
        if any(items):
            errors["attributes"] = items
    if not errors and spec.get("deleted") and spec.get("id") is None:
        errors["non_field_errors"] = ["Deleted label must have an ID"]
    return errors


def _attribute_errors(values: Any) -> Any:
    """AttributeValSerializer(many=True) errors of an annotation's ``attributes`` (falsy when valid). Its
    to_internal_value runs ``data["value"] = str(data["value"])`` first: an item that is not a dict or has no
    ``value`` makes CVAT answer 500, and so does the double (``ServerCrash``)."""
    if values is None:
        return ["This field may not be null."]
    if not isinstance(values, list):
        return {"non_field_errors": [f'Expected a list of items but got type "{type(values).__name__}".']}
    items = []
    for value in values:
        if not isinstance(value, dict) or "value" not in value:
            raise ServerCrash("AttributeValSerializer.to_internal_value: data['value']")
        item = {}
        if value.get("spec_id") is None:
            item["spec_id"] = ["This field is required."]
        elif isinstance(value["spec_id"], bool) or not isinstance(value["spec_id"], int):
            item["spec_id"] = ["A valid integer is required."]
        if len(str(value["value"])) > 4096:
            item["value"] = ["Ensure this field has no more than 4096 characters."]
        items.append(item)
    return items if any(items) else None


def _attrs(values: list[dict] | None) -> list[dict]:
    """Attribute values as stored: {spec_id, value}, the value a string (AttributeValSerializer: str(value))."""
    return [{"spec_id": v["spec_id"], "value": str(v["value"])} for v in values or []]


def _diff(old: dict, new: dict) -> dict:
    """get_instance_diff (cvat/apps/events/handlers.py): the fields whose value changed, with the old value, in
    the new object's key order; ``labels`` ignored."""
    return {key: old.get(key) for key, value in new.items() if key != "labels" and old.get(key) != value}


def _send(pool: urllib3.PoolManager, hook: dict, payload: dict) -> dict:
    """send_webhook (cvat/apps/webhooks/signals.py), done with urllib3 the way its ``requests.post(target_url,
    json=payload, headers=..., timeout=10)`` goes out: body ``json.dumps(payload)``, the recorded headers in their
    order, ``X-Signature-256: sha256=<HMAC-SHA256 of the body keyed by the secret>`` when there is a secret, no
    retries. Unreachable (refused, reset, connect timeout): 502; no answer within 10 s: 504 (requests maps
    ConnectTimeout to ConnectionError, ReadTimeout to Timeout). CVAT delivers through its egress proxy
    (smokescreen, which refuses loopback targets by default); the double connects directly."""
    body = json.dumps(payload).encode("utf-8")
    headers = dict(_DELIVERY_HEADERS)
    if hook["secret"]:
        digest = hmac.new(hook["secret"].encode("utf-8"), body, digestmod=hashlib.sha256).hexdigest()
        headers["X-Signature-256"] = "sha256=" + digest
    headers.update({"Content-Length": str(len(body)), "Content-Type": "application/json"})
    status, raw, error = None, None, None
    try:
        response = pool.request("POST", hook["target_url"], body=body, headers=headers, retries=False,
                                redirect=False, preload_content=False,
                                timeout=urllib3.Timeout(connect=WEBHOOK_TIMEOUT, read=WEBHOOK_TIMEOUT))
        try:
            status = response.status
            raw = response.read(RESPONSE_SIZE_LIMIT + 1, decode_content=True)
        finally:
            response.release_conn()
    except urllib3.exceptions.ReadTimeoutError as exc:
        status, error = 504, f"{type(exc).__name__}: {exc}"
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        status, error = 502, f"{type(exc).__name__}: {exc}"
    text = raw.decode("utf-8", "replace") if raw is not None and len(raw) <= RESPONSE_SIZE_LIMIT else ""
    return {"status_code": status, "response": text, "error": error,
            "changed_fields": ",".join(payload.get("before_update", {}))}


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
    """Create/PUT/update responses echo the request (ints stay ints, no default attribute values; attribute
    values as strings, as AttributeValSerializer made them) plus defaults and the ids."""
    obj = {**copy.deepcopy(_WRITE_DEFAULTS[kind]), **copy.deepcopy(sent), "id": stored["id"]}
    obj["attributes"] = _attrs(obj.get("attributes"))
    if kind == "shapes":  # a skeleton's parts come back with their ids
        obj["elements"] = [{**copy.deepcopy(_WRITE_DEFAULTS["shapes"]), **element, "id": saved["id"],
                            "attributes": _attrs(element.get("attributes"))}
                           for element, saved in zip(obj.get("elements") or [], stored.get("elements") or [],
                                                     strict=True)]
        for element in obj["elements"]:
            element.pop("elements")
    if kind == "tracks":
        obj["shapes"] = [{**copy.deepcopy(_WRITE_DEFAULTS["track_shapes"]), **shape, "id": saved["id"],
                          "attributes": _attrs(shape.get("attributes"))}
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


__all__ = ["CUT", "FIXTURES", "PASSWORD", "CvatDouble", "Delivery", "Frame", "LambdaFunction", "LambdaRequest",
           "RequestRecord", "ServerCrash", "cvat_double", "load_fixture"]
