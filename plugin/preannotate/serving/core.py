"""The serving core: which model a function serves, kept current, and the routes every door shares.

The Nuclio handler, the local HTTP server and scripts all call ``App.handle(Request) -> Reply``; they only
translate their own request and response objects.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from preannotate import devices
from preannotate.cvat import lambda_spec
from preannotate.models import (
    Manifest,
    ModelNotFound,
    ModelReference,
    ModelStore,
    PretrainedWeightsUnavailable,
    default_store,
    detect_served,
    load_model,
    runtime,
)
from preannotate.serving import contract, following, tracker
from preannotate.suggest import did_you_mean

log = logging.getLogger(__name__)


class ModelUnavailable(Exception):
    """No model can be served yet (answered 503 with the reason)."""


@dataclass
class Request:
    method: str
    path: str
    body: Any = None                       # dict/list when the door already decoded JSON, else bytes
    headers: dict[str, str] = field(default_factory=dict)
    query: dict[str, str] = field(default_factory=dict)
    raw: bytes | None = None               # the body's bytes when the door still has them (webhook signatures)
    from_platform_cron: bool = False       # a Nuclio cron event: the platform, not a client, is asking


@dataclass
class Reply:
    status: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)


class ModelProvider:
    """The model named by ``reference`` (``models.reference``: an artifact directory, ``NAME``, ``NAME@VERSION`` or
    an architecture), loaded once and swapped for the newly served version when the store's changes.

    A name with no version yet is served once trained: ``how_to_train`` says how in the 503 until then. With
    ``how_to_train=None`` nothing trains it, and such a name is a mistake: ``ModelNotFound`` names the store's
    models."""

    def __init__(self, reference: str | ModelReference, store: ModelStore, device: str | None = None,
                 how_to_train: str | None = "POST /train or `preannotate train`"):
        self.reference = reference if isinstance(reference, ModelReference) else ModelReference.parse(reference)
        self.store = store
        self.device = device
        self.how_to_train = how_to_train  # said in the 503 before the first version
        self._detector = None
        self._loaded_version: int | None = None
        self._load_lock = threading.Lock()
        if self.untrained():
            if how_to_train is None:
                name, names = self.reference.name, store.names()
                raise ModelNotFound(f"no model named {name!r} in {store.root}{did_you_mean(name, names)}; models "
                                    f"there: {', '.join(names) or 'none'} (train it first: `preannotate train "
                                    f"--model ARCHITECTURE --name {name} ...`, or set PREANNOTATE_TRAIN_PROJECT=P "
                                    "to serve it once the finished jobs of CVAT project P train it)")
            log.warning("model %r is not trained yet (nothing published in %s): %s", self.reference.text,
                        store.root, how_to_train)

    def current(self):
        """The detector to use for this request (loads or swaps when needed)."""
        wanted = self.reference.wanted_version(self.store)
        if self._detector is not None and wanted == self._loaded_version:
            return self._detector
        if self._detector is None:
            with self._load_lock:  # first load: everyone waits for it
                if self._detector is None or wanted != self._loaded_version:
                    self._load(wanted)
        elif self._load_lock.acquire(blocking=False):  # a newer version: one request loads it, others go on
            try:
                if wanted != self._loaded_version:
                    self._load(wanted)
            finally:
                self._load_lock.release()
        return self._detector

    def untrained(self) -> bool:
        """A name in the store with no version yet (a function deployed for a project before its first training)."""
        return (self.reference.path is None and not self.reference.architecture and self.reference.version is None
                and not self.store.versions(self.reference.name))

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"reference": self.reference.text, "store": str(self.store.root)}
        if self._detector is not None:
            manifest: Manifest = self._detector.manifest
            info.update(name=manifest.name or self.reference.name, version=manifest.version,
                        architecture=manifest.architecture, runtime=manifest.runtime,
                        labels=[label.to_dict() for label in manifest.labels],
                        thresholds=manifest.served_thresholds(), metrics=manifest.metrics)
        return info

    def served_labels(self) -> list:
        """The labels of the version served now (loaded or not yet), [] when there is none."""
        if self._detector is not None:
            return list(self._detector.manifest.labels)
        try:
            return list(Manifest.read(self.reference.directory(self.store)).labels)
        except (LookupError, OSError, ValueError):
            return []

    def _load(self, version: int | None) -> None:
        started = time.perf_counter()
        try:
            detector = load_model(self.reference, self.store, self.device, version)
        except ModelNotFound as error:
            if self.untrained():
                raise ModelUnavailable(f"not trained yet: {self.how_to_train}") from None  # 503
            raise ModelUnavailable(f"{error}; train one ({self.how_to_train}) or publish one with "
                                   "`preannotate models create`") from None
        except PretrainedWeightsUnavailable as error:  # not baked into the image
            raise ModelUnavailable(f"model {self.reference.name!r} has no published version in {self.store.root} "
                                   f"and its pretrained weights cannot be loaded: {error}") from None
        self._detector, self._loaded_version = detector, version
        log.info("serving %s (version %s) after %.1fs", self.reference.text, version, time.perf_counter() - started)


def how_to_train(environ: dict[str, str], store: ModelStore, reference: str) -> str | None:
    """What trains a model that has no version yet, as its 503 says: the CVAT project or tasks the function learns
    from, or a training job recorded for it in the store; None when nothing does."""
    project, tasks = environ.get("PREANNOTATE_TRAIN_PROJECT"), environ.get("PREANNOTATE_TRAIN_TASKS")
    if project:
        return f"finish a job in CVAT project {project} (its webhook starts training) or POST /train"
    if tasks:
        return f"finish a job of CVAT task(s) {tasks} (its webhook starts training) or POST /train"
    from preannotate.training.jobs import FINISHED, JobStore

    name = ModelReference.parse(reference).name
    for job in JobStore(store.root).all():
        if job.request.get("name") == name and job.state not in FINISHED:
            return f"its training job {job.id} runs (GET /jobs/{job.id})"
    return None


def spec_fix(name: str, dropped: list[str], project: str | None = None) -> str:
    """The one command that brings a deployed function's CVAT spec in step with the model it serves."""
    command = f"preannotate deploy --model {name}" + (f" --train-project {project}" if project else "")
    return (f"CVAT drops the shapes of {', '.join(dropped)}: the function's spec lacks them; run `{command}` "
            "(or set PREANNOTATE_NUCLIO_DASHBOARD, and training updates the function itself)")


Handler = Callable[[Request, re.Match], Reply]


FUNCTION_KINDS = ("detector", "tracker", "reid")  # what ``POST /`` answers: CVAT gives a function one kind


class App:
    """The routes of a function: ``POST /`` (CVAT's call of a function of ``kind``: detector, tracker or reid),
    ``GET /health``, ``GET /models``; later features add theirs with ``route``."""

    def __init__(self, provider: ModelProvider, cvat_labels: list[str] | None = None, project: str | None = None,
                 kind: str = "detector"):
        if kind not in FUNCTION_KINDS:
            raise ValueError(f"PREANNOTATE_FUNCTION_KIND is {kind!r}: use one of {', '.join(FUNCTION_KINDS)}")
        self.kind = kind
        self.provider = provider
        self.cvat_labels = cvat_labels  # the label names of the function's deployed CVAT spec, when it says
        self.project = project          # the CVAT project it trains on (for the fixing command)
        # One forward pass at a time: torch already spreads one over every core. Concurrent requests (the local
        # server's threads) then finish one after another, instead of all of them together at the very end.
        self._inference = threading.Lock()
        self._routes: list[tuple[str, re.Pattern, Handler, str]] = []  # method, pattern, handler, path as written
        self.status: dict[str, Any] = {}  # what features add to GET /health (how the training routes are guarded)
        self.route("POST", "/", {"detector": self.detect, "tracker": self.track, "reid": self.reid}[kind])
        self.route("GET", "/health", self.health)
        self.route("GET", "/models", self.models)

    @classmethod
    def from_environment(cls, environ: dict[str, str] | None = None) -> App:
        """The app of a function (or of ``preannotate serve``) as its environment configures it."""
        env = os.environ if environ is None else environ
        store = ModelStore(env.get("PREANNOTATE_MODEL_STORE") or default_store())
        reference = env.get("PREANNOTATE_MODEL")
        if not reference:
            raise RuntimeError("PREANNOTATE_MODEL is not set: name a model in the store, an architecture, "
                               "or an artifact directory")
        device = devices.from_environment(env)
        runtime.requested(env)  # a misspelt PREANNOTATE_RUNTIME stops the start, not the first request
        project = env.get("PREANNOTATE_TRAIN_PROJECT")
        return cls(ModelProvider(reference, store, device, how_to_train(env, store, reference)),
                   lambda_spec.spec_names(env), project, env.get("PREANNOTATE_FUNCTION_KIND") or "detector")

    def route(self, method: str, path: str, handler: Handler) -> None:
        """Answer ``method path`` with ``handler``; a ``<name>`` part of the path (``/jobs/<id>``) matches one path
        segment of letters, digits, ``_``, ``.`` and ``-``, handed to the handler as a group of its match."""
        parts = re.split(r"(<\w+>)", path.rstrip("/"))
        pattern = "".join(r"([\w.-]+)" if part.startswith("<") else re.escape(part) for part in parts)
        self._routes.append((method.upper(), re.compile(pattern + "/?$"), handler, path))

    def handle(self, request: Request) -> Reply:
        path = "/" + (request.path or "/").split("?", 1)[0].strip("/")
        method = (request.method or "POST").upper()
        allowed = []
        for route_method, pattern, handler, _ in self._routes:
            match = pattern.match(path)
            if not match:
                continue
            if route_method != method:
                allowed.append(route_method)
                continue
            try:
                return handler(request, match)
            except contract.ContractError as error:
                return Reply(error.status, {"error": str(error)})
            except ModelUnavailable as error:
                return Reply(503, {"error": str(error)})
            except Exception:  # a bug must not take the function down: answer 500 and keep serving
                return self.internal_error(method, path)
        if allowed:
            return Reply(405, {"error": f"{method} is not allowed on {path}; use {', '.join(sorted(set(allowed)))}"},
                         {"Allow": ", ".join(sorted(set(allowed)))})
        routes = ", ".join(f"{route_method} {written}" for route_method, _, _, written in self._routes)
        return Reply(404, {"error": f"no route for {method} {path}; routes: {routes}"})

    @staticmethod
    def internal_error(method: str, path: str) -> Reply:
        """The answer to a bug, called while its exception is handled: the traceback goes to the log, the client gets
        a sentence without Python's names for things (every door answers its own failures with it too)."""
        log.error("%s %s failed:\n%s", method, path, traceback.format_exc())
        return Reply(500, {"error": "internal error: the function could not answer this request (its log has the "
                                    "details)"})

    def detect(self, request: Request, _: re.Match) -> Reply:
        detect_request = contract.parse_detect_request(request.body)
        detector = self.provider.current()
        with self._inference:  # a threshold CVAT's menu sends replaces the served ones (README: Serving)
            shapes = detect_served(detector, [detect_request.image], detect_request.threshold)[0]
        return Reply(200, contract.shapes_to_response(shapes))

    def track(self, request: Request, _: re.Match) -> Reply:
        """CVAT's tracker call: each shape continued by the detection that best continues it (``following``)."""
        detector = self.provider.current()
        track_request = tracker.parse_track_request(request.body, [label.name for label in detector.labels])
        with self._inference:
            boxes, states = following.follow(detector, track_request, detector.manifest.score_threshold)
        return Reply(200, tracker.track_response(boxes, states))

    def reid(self, request: Request, _: re.Match) -> Reply:
        """CVAT's reid call: which boxes of two frames are the same objects (``following``)."""
        reid_request = tracker.parse_reid_request(request.body)
        detector = self.provider.current()
        with self._inference:
            return Reply(200, following.reid(detector, reid_request))

    def health(self, request: Request, _: re.Match) -> Reply:
        return Reply(200, {"status": "ok", "kind": self.kind, "model": self.serving(), **self.status})

    def models(self, request: Request, _: re.Match) -> Reply:
        name = self.provider.reference.name
        try:
            versions = [row for row in self.provider.store.describe() if row["name"] == name]
        except ModelNotFound:
            versions = []
        return Reply(200, {"serving": self.serving(), "versions": versions})

    def serving(self) -> dict[str, Any]:
        """What is served, and what of it CVAT cannot see: labels the deployed spec lacks (with the fix)."""
        info = self.provider.describe()
        if self.provider.untrained():
            info["state"] = f"not trained yet: {self.provider.how_to_train}"
        dropped = lambda_spec.unmapped(self.cvat_labels, self.provider.served_labels()) \
            if self.cvat_labels is not None else []
        if dropped:
            info["cvat_unmapped"] = dropped
            info["fix"] = spec_fix(self.provider.reference.name, dropped, self.project)
        return info
