"""The training routes of a function: ``POST /train``, ``GET /jobs``, ``GET /jobs/<id>``, ``POST /jobs/<id>/cancel``,
``POST /webhook`` (a signed CVAT delivery) and ``POST /cron`` (a Nuclio cron trigger).

Every route answers at once: it validates, records a job in the store and returns ``202 {"job": id}``; the
``JobRunner`` trains in a separate process. Settings come from the function's environment:

* ``PREANNOTATE_TRAIN_MODEL`` — the architecture to train (default: that of the served model);
* ``PREANNOTATE_TRAIN_HYPERPARAMETERS`` — hyperparameters for triggered training (``key=value; ...``);
* ``PREANNOTATE_TRAIN_PROJECT`` / ``PREANNOTATE_TRAIN_TASKS`` — what cron retrains on (a project id, or task ids);
* ``PREANNOTATE_API_TOKEN`` — when set, ``/train`` and ``/jobs…`` need ``Authorization: Bearer <token>``;
* ``PREANNOTATE_WEBHOOK_SECRET`` and the policy of ``preannotate.cvat.webhooks`` for ``/webhook``.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import re
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from preannotate.cvat import webhooks
from preannotate.files import write_atomically
from preannotate.models import ARCHITECTURES
from preannotate.serving.contract import ContractError, json_body
from preannotate.serving.core import App, Reply, Request
from preannotate.training.hyperparameters import HyperparameterError, Hyperparameters
from preannotate.training.jobs import Job, JobNotFound, JobRunner, JobStore, request_cancel

log = logging.getLogger(__name__)

PROMOTE_CHOICES = ("auto", "always", "never")


class TrainingRoutes:
    def __init__(self, app: App, jobs: JobStore, runner: JobRunner | None = None,
                 environ: Mapping[str, str] | None = None):
        self.app = app
        self.jobs = jobs
        self.runner = runner
        self.env = dict(os.environ if environ is None else environ)
        self.policy = webhooks.TrainingPolicy.from_environment(self.env)
        self._webhook_lock = threading.Lock()
        app.route("POST", "/train", self._guarded(self.train))
        app.route("GET", "/jobs", self._guarded(self.list_jobs))
        app.route("GET", r"/jobs/([\w.-]+)", self._guarded(self.get_job))
        app.route("POST", r"/jobs/([\w.-]+)/cancel", self._guarded(self.cancel_job))
        app.route("POST", "/webhook", self.webhook)  # guarded by its signature
        app.route("POST", "/cron", self.cron)

    @classmethod
    def attach(cls, app: App, environ: Mapping[str, str] | None = None, start_runner: bool = True) -> TrainingRoutes:
        jobs = JobStore(app.provider.store.root)
        runner = JobRunner(jobs).start() if start_runner else None
        return cls(app, jobs, runner, environ)

    # ---------------------------------------------------------------- what is trained by default

    def default_architecture(self) -> str:
        if self.env.get("PREANNOTATE_TRAIN_MODEL"):
            return self.env["PREANNOTATE_TRAIN_MODEL"]
        reference = self.app.provider.reference.partition("@")[0]
        if reference in ARCHITECTURES:
            return reference
        store = self.app.provider.store
        version = store.serving(reference)
        if version is not None:
            from preannotate.models.artifact import Manifest

            return Manifest.read(store.path(reference, version)).architecture
        raise ContractError("no architecture to train: set PREANNOTATE_TRAIN_MODEL or give 'model'")

    def default_name(self) -> str:
        reference = self.app.provider.reference
        return Path(reference).name if (Path(reference) / "manifest.json").is_file() else reference.partition("@")[0]

    # ---------------------------------------------------------------- routes

    def _guarded(self, handler):
        def guarded(request: Request, match: re.Match) -> Reply:
            token = self.env.get("PREANNOTATE_API_TOKEN")
            if token:
                given = next((v for k, v in request.headers.items() if k.lower() == "authorization"), "")
                scheme, _, value = given.partition(" ")
                if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
                    return Reply(401, {"error": "this route needs 'Authorization: Bearer <PREANNOTATE_API_TOKEN>'"},
                                 {"WWW-Authenticate": "Bearer"})
            return handler(request, match)
        return guarded

    def train(self, request: Request, _: re.Match) -> Reply:
        body = json_body(request.body) if request.body not in (None, b"", "") else {}
        if not isinstance(body, dict):
            raise ContractError("the body of POST /train must be a JSON object")
        job_request = self.training_request(body)
        job = self.jobs.create(job_request, trigger=str(body.get("trigger") or "http"))
        self._wake()
        return Reply(202, {"job": job.id, "state": job.state, "url": f"/jobs/{job.id}"})

    def training_request(self, body: dict[str, Any]) -> dict[str, Any]:
        """A validated job request; every mistake is a 400 naming the field."""
        unknown = sorted(set(body) - {"tasks", "task", "project", "model", "name", "hyperparameters", "from_model",
                                      "promote", "trigger"})
        if unknown:
            raise ContractError(f"unknown field(s) {', '.join(unknown)}; POST /train takes tasks, project, model, "
                                "name, hyperparameters, from_model, promote")
        tasks = body.get("tasks", [body["task"]] if "task" in body else [])
        if isinstance(tasks, int):
            tasks = [tasks]
        if not isinstance(tasks, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t > 0
                                                  for t in tasks):
            raise ContractError("'tasks' must be a list of CVAT task ids")
        project = body.get("project")
        if project is not None and (not isinstance(project, int) or isinstance(project, bool) or project <= 0):
            raise ContractError("'project' must be a CVAT project id")
        if not tasks and project is None:
            raise ContractError("say what to learn from: 'tasks' (CVAT task ids) or 'project' (a project id)")
        model = body.get("model") or self.default_architecture()
        if model not in ARCHITECTURES:
            raise ContractError(f"unknown model {model!r}; architectures: {', '.join(ARCHITECTURES)}")
        text = body.get("hyperparameters", self.env.get("PREANNOTATE_TRAIN_HYPERPARAMETERS", ""))
        if isinstance(text, dict):
            text = "; ".join(f"{k}={v}" for k, v in text.items())
        if not isinstance(text, str):
            raise ContractError("'hyperparameters' must be 'key=value; ...' text or an object")
        try:
            Hyperparameters().updated(text)
        except HyperparameterError as error:
            raise ContractError(f"hyperparameters: {error}") from None
        promote = body.get("promote", "auto")
        if promote not in PROMOTE_CHOICES:
            raise ContractError(f"'promote' must be one of {', '.join(PROMOTE_CHOICES)}")
        name = body.get("name") or self.default_name()
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise ContractError("'name' must be a model name (letters, digits, '_', '.', '-')")
        from_model = body.get("from_model")
        if from_model is not None and not isinstance(from_model, str):
            raise ContractError("'from_model' must be NAME[@VERSION]")
        return {"tasks": tasks, "project": project, "model": model, "name": name, "hyperparameters": text,
                "from_model": from_model, "promote": promote}

    def list_jobs(self, request: Request, _: re.Match) -> Reply:
        keys = ("id", "state", "trigger", "created", "started", "finished", "version", "error")
        return Reply(200, {"jobs": [{k: getattr(job, k) for k in keys} | _progress(self.jobs, job)
                                    for job in reversed(self.jobs.all())]})

    def get_job(self, request: Request, match: re.Match) -> Reply:
        try:
            return Reply(200, self.jobs.describe(self.jobs.get(match.group(1))))
        except JobNotFound as error:
            return Reply(404, {"error": str(error)})

    def cancel_job(self, request: Request, match: re.Match) -> Reply:
        try:
            job = self.jobs.update(match.group(1), request_cancel)  # whichever process trains it stops it
            self._wake()
            return Reply(200, self.jobs.describe(job))
        except JobNotFound as error:
            return Reply(404, {"error": str(error)})

    def webhook(self, request: Request, _: re.Match) -> Reply:
        try:
            payload = webhooks.verify(self.env.get("PREANNOTATE_WEBHOOK_SECRET", ""), request.body, request.headers,
                                      raw=request.raw)
        except webhooks.WebhookError as error:
            log.warning("webhook refused: %s", error)
            return Reply(error.status, {"error": str(error)})
        change = webhooks.qualifying_change(payload, self.policy)
        if change == "ping":
            return Reply(200, {"pong": True, "started": None})
        if isinstance(change, str):
            return Reply(200, {"started": None, "reason": change})
        with self._webhook_lock:
            return self._webhook_trigger(change)

    def _webhook_trigger(self, change: webhooks.Trigger) -> Reply:
        """Count the finished frames; record (or extend, while it waits out the debounce) a training job."""
        state_path = self.jobs.root / "webhook-state.json"
        scope = f"project:{change.project_id}" if change.project_id is not None else f"task:{change.task_id}"
        state = _read_json(state_path)
        pending = state.get(scope, {"frames": 0, "jobs": []})
        if change.job_id not in pending["jobs"]:  # the same job finished twice counts once
            pending = {"frames": pending["frames"] + change.frames, "jobs": pending["jobs"] + [change.job_id]}
        if pending["frames"] < self.policy.min_new_frames:
            state[scope] = pending
            _write_json(state_path, state)
            return Reply(200, {"started": None, "reason": f"{change.reason}: {pending['frames']} of "
                                                          f"{self.policy.min_new_frames} new frames so far"})
        state.pop(scope, None)
        _write_json(state_path, state)
        not_before = time.time() + self.policy.debounce_s
        waiting = [job for job in self.jobs.all() if job.state == "queued" and job.request.get("scope") == scope]
        if waiting:  # debounce: a job still waiting starts later, once
            job = self.jobs.update(waiting[-1].id, lambda j: setattr(j, "not_before", max(j.not_before, not_before)))
            return Reply(202, {"job": job.id, "state": job.state, "reason": f"{change.reason}: joined the "
                                                                            "waiting job"})
        target = {"project": change.project_id} if change.project_id is not None else {"tasks": [change.task_id]}
        job_request = {**self.training_request(target), "scope": scope}
        job = self.jobs.create(job_request, trigger=f"webhook: {change.reason}", not_before=not_before)
        self._wake()
        return Reply(202, {"job": job.id, "state": job.state, "reason": change.reason})

    def cron(self, request: Request, _: re.Match) -> Reply:
        """Retrain when the annotations changed since the served version learned them (else do nothing)."""
        target: dict[str, Any] = {}
        if self.env.get("PREANNOTATE_TRAIN_PROJECT"):
            target["project"] = int(self.env["PREANNOTATE_TRAIN_PROJECT"])
        if self.env.get("PREANNOTATE_TRAIN_TASKS"):
            target["tasks"] = [int(t) for t in re.split(r"[,; ]+", self.env["PREANNOTATE_TRAIN_TASKS"]) if t]
        if not target:
            return Reply(200, {"started": None, "reason": "cron: set PREANNOTATE_TRAIN_PROJECT or "
                                                          "PREANNOTATE_TRAIN_TASKS to retrain on a schedule"})
        if any(job.state in ("queued", "running") for job in self.jobs.all()):
            return Reply(200, {"started": None, "reason": "cron: a training job is already queued or running"})
        job_request = self.training_request(target)
        from preannotate.training.execute import annotations_changed

        changed, why = annotations_changed(job_request, self.app.provider.store)
        if not changed:
            return Reply(200, {"started": None, "reason": f"cron: {why}"})
        job = self.jobs.create(job_request, trigger=f"cron: {why}")
        self._wake()
        return Reply(202, {"job": job.id, "state": job.state, "reason": why})

    def _wake(self) -> None:
        if self.runner is not None:
            self.runner.wake()


def _progress(jobs: JobStore, job: Job) -> dict[str, Any]:
    progress = jobs.progress(job.id) if job.state == "running" else {}
    return {k: progress[k] for k in ("step", "total_steps", "eta_s") if k in progress}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, json.dumps(data))
