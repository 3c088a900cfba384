"""The training routes of a function: ``POST /train``, ``GET /jobs``, ``GET /jobs/<id>``, ``POST /jobs/<id>/cancel``,
``POST /webhook`` (a signed CVAT delivery) and ``POST /cron`` (a Nuclio cron trigger).

Every route answers at once: it validates, records a job in the store (what counts is ``training.triggers``) and
returns ``202 {"job": id}``; the ``JobRunner`` trains in a separate process. Nothing that trains or changes state is
open to whoever can reach the function:

* ``/train``, ``/jobs…`` and ``/cron`` over HTTP need ``Authorization: Bearer <PREANNOTATE_API_TOKEN>``; without a
  token set they are closed, unless the operator opens them on purpose with ``PREANNOTATE_API_AUTH=none``
  (``GET /health`` says which mode is on);
* ``/webhook`` needs CVAT's signature with ``PREANNOTATE_WEBHOOK_SECRET``;
* a Nuclio cron event (its trigger's kind is ``cron``) reaches ``/cron`` without a token: it comes from the platform.

Settings come from the function's environment: ``PREANNOTATE_TRAIN_MODEL`` (the architecture to train; default:
that of the served model), ``PREANNOTATE_TRAIN_HYPERPARAMETERS`` (``key=value; ...``), ``PREANNOTATE_TRAIN_PROJECT`` /
``PREANNOTATE_TRAIN_TASKS`` (what cron retrains on) and the policy of ``training.triggers``.
"""

from __future__ import annotations

import hmac
import logging
import os
import re
from collections.abc import Mapping
from typing import Any

from preannotate.cvat import webhooks
from preannotate.hyperparameters import HyperparameterError
from preannotate.models import ARCHITECTURES, Manifest, hyperparameters_for
from preannotate.serving.contract import ContractError, json_body
from preannotate.serving.core import App, Reply, Request
from preannotate.training.jobs import Job, JobNotFound, JobRunner, JobStore, request_cancel
from preannotate.training.recipe import PROMOTE_CHOICES
from preannotate.training.triggers import Decision, NewTask, TrainingPolicy, Triggers, qualifying_change

log = logging.getLogger(__name__)

AUTH_MODES = ("token", "none")


class TrainingRoutes:
    def __init__(self, app: App, jobs: JobStore, runner: JobRunner | None = None,
                 environ: Mapping[str, str] | None = None):
        self.app = app
        self.jobs = jobs
        self.runner = runner
        self.env = dict(os.environ if environ is None else environ)
        self.auth = (self.env.get("PREANNOTATE_API_AUTH") or "token").strip().lower()
        if self.auth not in AUTH_MODES:
            raise ValueError(f"PREANNOTATE_API_AUTH is {self.auth!r}: use token (the default) or none")
        self.triggers = Triggers(jobs, TrainingPolicy.from_environment(self.env))
        app.route("POST", "/train", self._guarded(self.train))
        app.route("GET", "/jobs", self._guarded(self.list_jobs))
        app.route("GET", "/jobs/<id>", self._guarded(self.get_job))
        app.route("POST", "/jobs/<id>/cancel", self._guarded(self.cancel_job))
        app.route("POST", "/webhook", self.webhook)  # guarded by its signature
        app.route("POST", "/cron", self._guarded(self.cron, platform_cron=True))
        app.status["training_routes"] = self.mode()

    @classmethod
    def attach(cls, app: App, environ: Mapping[str, str] | None = None, start_runner: bool = True) -> TrainingRoutes:
        jobs = JobStore(app.provider.store.root)
        runner = JobRunner(jobs).start() if start_runner else None
        return cls(app, jobs, runner, environ)

    def mode(self) -> str:
        """How the training routes are guarded, as ``/health`` reports it."""
        if self.auth == "none":
            return "open: no credentials needed (PREANNOTATE_API_AUTH=none)"
        if self.env.get("PREANNOTATE_API_TOKEN"):
            return "token: Authorization: Bearer <PREANNOTATE_API_TOKEN>"
        return "closed: set PREANNOTATE_API_TOKEN to use them"

    # ---------------------------------------------------------------- what is trained by default

    def default_architecture(self) -> str:
        if self.env.get("PREANNOTATE_TRAIN_MODEL"):
            return self.env["PREANNOTATE_TRAIN_MODEL"]
        reference, store = self.app.provider.reference, self.app.provider.store
        if reference.architecture:
            return reference.architecture
        try:
            return Manifest.read(reference.directory(store)).architecture
        except LookupError:
            raise ContractError("no architecture to train: set PREANNOTATE_TRAIN_MODEL or give 'model'") from None

    def default_name(self) -> str:
        return self.app.provider.reference.name

    # ---------------------------------------------------------------- routes

    def _guarded(self, handler, platform_cron: bool = False):
        def guarded(request: Request, match: re.Match) -> Reply:
            if platform_cron and request.from_platform_cron:
                return handler(request, match)
            token = self.env.get("PREANNOTATE_API_TOKEN")
            if self.auth == "none":
                return handler(request, match)
            if not token:
                return Reply(403, {"error": "the training routes are closed: the operator sets PREANNOTATE_API_TOKEN "
                                            "(then send Authorization: Bearer <token>)"})
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
        if not isinstance(model, str) or model not in ARCHITECTURES:
            raise ContractError(f"unknown model {str(model)[:80]!r}; architectures: {', '.join(ARCHITECTURES)}")
        text = body.get("hyperparameters", self.env.get("PREANNOTATE_TRAIN_HYPERPARAMETERS", ""))
        if isinstance(text, dict):
            text = "; ".join(f"{k}={v}" for k, v in text.items())
        if not isinstance(text, str):
            raise ContractError("'hyperparameters' must be 'key=value; ...' text or an object")
        try:
            given = hyperparameters_for(model, text).given  # checked here; the job parses its copy in its process
        except HyperparameterError as error:
            raise ContractError(f"hyperparameters: {error}") from None
        if "train_on" not in given:  # it learns from the jobs whose finishing starts it (PREANNOTATE_TRAIN_ON)
            text = "; ".join(part for part in (text.strip(), f"train-on={','.join(self.triggers.policy.train_on)}")
                             if part)
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
        keys = ("id", "state", "trigger", "created", "started", "finished", "version", "skipped", "error")
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
        change = qualifying_change(payload, self.triggers.policy)
        if change == "ping":
            return Reply(200, {"pong": True, "started": None})
        if isinstance(change, str):
            return Reply(200, {"started": None, "reason": change})
        if isinstance(change, NewTask):
            if self.app.provider.untrained():
                return Reply(200, {"started": None, "reason": f"task {change.task_id}: not pre-annotated, the "
                                                              "model is not trained yet"})
            return self._answer(self.triggers.on_new_task(change, self.app.provider.reference.text))
        return self._answer(self.triggers.on_job_change(change, self.training_request))

    def cron(self, request: Request, _: re.Match) -> Reply:
        """Record a job that retrains if the annotations changed since the served version learned them."""
        target: dict[str, Any] = {}
        try:
            if self.env.get("PREANNOTATE_TRAIN_PROJECT"):
                target["project"] = int(self.env["PREANNOTATE_TRAIN_PROJECT"])
            if self.env.get("PREANNOTATE_TRAIN_TASKS"):
                target["tasks"] = [int(t) for t in re.split(r"[,; ]+", self.env["PREANNOTATE_TRAIN_TASKS"]) if t]
        except ValueError:
            raise ContractError("PREANNOTATE_TRAIN_PROJECT and PREANNOTATE_TRAIN_TASKS take CVAT ids") from None
        if not target:
            return Reply(200, {"started": None, "reason": "cron: set PREANNOTATE_TRAIN_PROJECT or "
                                                          "PREANNOTATE_TRAIN_TASKS to retrain on a schedule"})
        return self._answer(self.triggers.on_schedule(self.training_request(target)))

    def _answer(self, decision: Decision) -> Reply:
        if decision.job is None:
            return Reply(200, {"started": None, "reason": decision.reason})
        self._wake()
        return Reply(202, {"job": decision.job.id, "state": decision.job.state, "reason": decision.reason})

    def _wake(self) -> None:
        if self.runner is not None:
            self.runner.wake()


def _progress(jobs: JobStore, job: Job) -> dict[str, Any]:
    progress = jobs.progress(job.id) if job.state == "running" else {}
    return {k: progress[k] for k in ("step", "total_steps", "eta_s") if k in progress}
