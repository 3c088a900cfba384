"""The process a recorded job runs in (``python -m preannotate.worker run STORE JOB_ID``): the function's
``JobRunner`` starts one per job, and a Kubernetes Job runs the same command.

Two kinds of job:

* **train** (the default): the recipe (``training.execute``). When its version is promoted, the function is brought
  in step with it — its CVAT spec updated through the Nuclio dashboard when labels CVAT cannot map were learned
  (``PREANNOTATE_NUCLIO_DASHBOARD``; without it the log says which labels and the fixing command) — and, with
  ``PREANNOTATE_REANNOTATE=unreviewed``, the project's tasks no one has started are queued for pre-annotation again.
* **annotate**: one CVAT task pre-annotated by the served version (``annotate.annotate_task``: chunked frames,
  batched, resumable, ``source=auto``, manual shapes untouched, a confidence tag per frame; a video task gets
  tracks, an image task shapes, unless ``PREANNOTATE_ANNOTATE_AS`` says ``tracks`` or ``shapes``). A task whose data is
  still uploading (CVAT sends ``create:task`` before the upload) ends with ``TRY_LATER``: the runner queues it again.
  So does a task on which CVAT's lambda manager (the *Automatic annotation* menu) has a request queued or running:
  one writer per task, as CVAT keeps it between its own requests (409). The job looks before it starts and before
  every batch it writes, and once more at the end; after such a wait it writes every frame again, from a fresh read
  of the task, replacing the ``auto`` shapes there (the menu's included), so the task holds one set.

The outcome is recorded before anything that may restart the function (a dashboard update redeploys it).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from preannotate import devices, uncertainty
from preannotate.cvat import lambda_spec
from preannotate.shapes import Label
from preannotate.training.jobs import TRY_LATER, Job, JobStore
from preannotate.training.triggers import REANNOTATE, queue_annotation

if TYPE_CHECKING:
    from preannotate.cvat.lambda_requests import LambdaBusy  # cvat-sdk: imported in a job's process only

log = logging.getLogger(__name__)

UPLOAD_WAIT_S = 3600  # how long a new task's upload may take before its pre-annotation job gives up
LAMBDA_WAIT_S = 6 * 3600  # how long it waits for CVAT's lambda manager to end its requests on the task


class NotReady(Exception):
    """The task cannot be written yet (its data is uploading, another writer is at work): try again later.
    ``waited_for`` names that writer's requests, for the job's record."""

    def __init__(self, message: str, waited_for: list[str] | None = None):
        super().__init__(message)
        self.waited_for = waited_for or []


def run(store_root: Path, job_id: str, environ: dict[str, str] | None = None) -> int:
    """Run the job, record its outcome; the exit code tells the runner how it ended."""
    env = dict(os.environ if environ is None else environ)
    jobs = JobStore(store_root)
    job = jobs.get(job_id)
    try:
        if job.request.get("kind") == "annotate":  # SIGTERM ends it at once: its uploads are journaled, it resumes
            outcome = annotate_job(job, store_root, env)
        else:
            from preannotate.training.execute import execute_job

            stop = threading.Event()  # SIGTERM: the trainer checkpoints and stops
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
            outcome = execute_job(job, jobs.work_dir(job_id), store_root, stop)
    except NotReady as waiting:
        log.info("%s", waiting)
        jobs.update(job_id, partial(_waits, waiting=waiting))
        return TRY_LATER
    except Exception as error:
        log.exception("job %s failed", job_id)
        message = str(error) or type(error).__name__
        jobs.update(job_id, lambda j: setattr(j, "error", message))
        return 1
    if outcome is None:  # stopped by a signal: the checkpoint is kept, the runner records the end
        return 143
    jobs.update(job_id, lambda j: _record(j, outcome))
    if outcome.get("promoted"):
        after_promotion(jobs, job, outcome, env)
    return 0


def _waits(job: Job, waiting: NotReady) -> None:
    """Say in the job's record why it waits (``skipped`` until it runs) and, for another writer, since when and
    for which of its requests."""
    job.skipped = str(waiting)
    if waiting.waited_for:
        job.outcome.setdefault("waiting_since", time.time())
        job.outcome["waited_for"] = list(dict.fromkeys([*job.outcome.get("waited_for", []), *waiting.waited_for]))


def _record(job: Job, outcome: dict[str, Any]) -> None:
    if "skipped" in outcome:
        job.skipped = outcome["skipped"]
        return
    job.skipped = None
    job.version, job.promoted = outcome["version"], outcome.get("promoted")
    job.metrics, job.promotion = outcome.get("metrics") or {}, outcome.get("promotion")
    job.outcome = {k: v for k, v in outcome.items() if k not in ("version", "promoted", "metrics", "promotion")}


# ---------------------------------------------------------------------------------------------- annotate jobs

def annotate_job(job: Job, store_root: Path, env: dict[str, str]) -> dict[str, Any]:
    """Pre-annotate ``job.request["task"]`` with the served version of ``job.request["model"]``, never while CVAT's
    lambda manager has a request queued or running on the task (see the module docstring)."""
    from preannotate.annotate import annotate_task, parse_annotate_as
    from preannotate.cvat import lambda_requests
    from preannotate.cvat.client import connect, cvat_errors
    from preannotate.cvat.reader import job_untouched
    from preannotate.models import load_model

    task_id = int(job.request["task"])
    journal = JobStore(store_root).directory(job.id) / "journal"  # this job's: a wait for another writer drops it
    with connect() as client:
        with cvat_errors(client, f"task {task_id}"):
            task = client.tasks.retrieve(task_id)
            size = getattr(task, "size", None)  # absent until the upload is attached
            jobs = task.get_jobs() if size else []
        if not size or not jobs:
            patience = float(env.get("PREANNOTATE_UPLOAD_WAIT_S") or UPLOAD_WAIT_S)
            if time.time() - job.created > patience:
                raise RuntimeError(f"task {task_id} still has no data after {patience / 60:.0f} minutes: its upload "
                                   "failed or was never made")
            raise NotReady(f"task {task_id}: its data is still uploading; pre-annotated once it is there")
        started = [j.id for j in jobs if not job_untouched(j)]
        if started and not job.request.get("force"):
            return {"skipped": f"task {task_id}: people already work on job(s) "
                               f"{', '.join(map(str, started))}; it is left to them"}
        listed = lambda_requests.requests_on(client, task_id)
        busy = [request for request in listed if request.active]
        if busy:
            patience = float(env.get("PREANNOTATE_LAMBDA_WAIT_S") or LAMBDA_WAIT_S)
            if time.time() - job.outcome.get("waiting_since", time.time()) > patience:
                return {"skipped": f"{lambda_requests.LambdaBusy(task_id, busy)}, for more than "
                                   f"{patience / 60:.0f} minutes: the task is left to it"}
            raise _wait_for(lambda_requests.LambdaBusy(task_id, busy), journal)
        as_tracks = parse_annotate_as(env.get("PREANNOTATE_ANNOTATE_AS"), "PREANNOTATE_ANNOTATE_AS")
        detector = load_model(job.request["model"], store_root, devices.from_environment(env))
        try:
            report = annotate_task(client, task_id, detector=detector, only_unannotated=True, progress=False,
                                   as_tracks=as_tracks,
                                   state_dir=journal, cache_dir=store_root / ".jobs" / job.id / "chunks",
                                   before_write=lambda: lambda_requests.check_idle(client, task_id))
        except lambda_requests.LambdaBusy as busy_now:
            raise _wait_for(busy_now, journal) from None
        seen = {(request.id, request.enqueued) for request in listed}
        meanwhile = [r for r in lambda_requests.requests_on(client, task_id) if (r.id, r.enqueued) not in seen]
        if meanwhile:  # a menu request began after the last look: its shapes may sit beside ours
            raise _wait_for(lambda_requests.LambdaBusy(task_id, meanwhile), journal, "came while this job wrote")
    least = uncertainty.ranking(report.confidence)[:10]
    log.info("task %d pre-annotated by %s: %d frames (%d resumed), %d shapes; least confident frames: %s", task_id,
             report.model, report.annotated, report.resumed, report.created,
             ", ".join(f"{frame} ({value:.2f})" for frame, value in least) or "none")
    return {"version": detector.manifest.version, "promoted": None, "task": task_id, "model": report.model,
            "frames": report.annotated + report.resumed, "shapes": report.created, "tracks": report.tracks,
            "skipped_annotated": report.skipped_annotated, "least_confident": [f for f, _ in least],
            "unmapped": dict(report.unmapped),
            **({"waited_for": job.outcome["waited_for"]} if "waited_for" in job.outcome else {})}


def _wait_for(busy: LambdaBusy, journal: Path, when: str = "") -> NotReady:
    """Wait for CVAT's lambda manager, then write every frame again: its shapes may stand on frames this job
    wrote, and only a fresh run (the journal dropped) replaces them."""
    shutil.rmtree(journal, ignore_errors=True)
    said = f" ({when})" if when else ""
    return NotReady(f"{busy}{said}: this pre-annotation writes once it has ended, every frame again, in place of "
                    "the auto shapes there (one writer per task)", [request.name for request in busy.requests])


# ---------------------------------------------------------------------------------------------- after promotion

def after_promotion(jobs: JobStore, job: Job, outcome: dict[str, Any], env: dict[str, str]) -> None:
    """A new version is served: queue the re-annotation it asks for, then bring the function's spec in step."""
    name = job.request["name"]
    if env.get("PREANNOTATE_REANNOTATE") == "unreviewed" and job.request.get("project") is not None:
        for task_id in unreviewed_tasks(int(job.request["project"])):
            queued = queue_annotation(jobs, task_id, name, f"{REANNOTATE}: {name}@{outcome['version']} promoted",
                                      version=outcome["version"])
            log.info("task %d: %s", task_id, queued.reason)
    # what CVAT would drop is said in the job's record too, before the update may restart the function
    sync_function_spec(jobs.root.parent, name, env, before_update=lambda missing, fix: jobs.update(
        job.id, lambda j: j.outcome.update(cvat_unmapped=missing, fix=fix)))


def unreviewed_tasks(project_id: int) -> list[int]:
    """The project's tasks with data where no one has started a job (every job new, in annotation)."""
    from preannotate.cvat.client import connect, cvat_errors
    from preannotate.cvat.reader import job_untouched

    found = []
    with connect() as client:
        with cvat_errors(client, f"project {project_id}"):
            for task in client.projects.retrieve(project_id).get_tasks():
                jobs = task.get_jobs() if getattr(task, "size", None) else []
                if jobs and all(job_untouched(j) for j in jobs):
                    found.append(task.id)
    return sorted(found)


def sync_function_spec(store_root: Path, name: str, env: dict[str, str],
                       before_update: Callable[[list[str], str], None] | None = None) -> list[str]:
    """Labels of the served version that the function's CVAT spec lacks, made known to CVAT: the spec updated
    through the Nuclio dashboard (a redeploy of the function, which restarts this process too: everything else is
    done first, ``before_update(missing, fix)`` included), or, without one, the log says which labels CVAT drops and
    the command that fixes it. Returns the labels that were missing."""
    from preannotate.cvat.dashboard import DashboardError, NuclioDashboard, function_name_from_environment
    from preannotate.models import Manifest, ModelStore, architecture_of
    from preannotate.serving.core import spec_fix

    deployed = lambda_spec.spec_names(env)
    if deployed is None:
        return []  # not a deployed function (a local `preannotate serve`): no spec to follow
    store = ModelStore(store_root)
    manifest = Manifest.read(store.resolve(name))
    missing = lambda_spec.unmapped(deployed, manifest.labels)
    if not missing:
        return []
    fix = spec_fix(name, missing, env.get("PREANNOTATE_TRAIN_PROJECT"))
    if before_update is not None:
        before_update(missing, fix)
    output = architecture_of(manifest).output
    # The spec keeps what CVAT maps now (the project's labels not learned yet stay listed) and gains the new ones.
    kept = [Label(label, output) for label in deployed]
    labels, _ = lambda_spec.spec_labels([*manifest.labels, *kept], output, manifest.outlines)
    function = function_name_from_environment(env)
    try:
        dashboard = NuclioDashboard.from_environment(env)
        if dashboard is None or function is None:
            log.warning("%s", fix)
            return missing
        dashboard.update_function(function, annotations={"spec": lambda_spec.spec_text(labels)},
                                  env={lambda_spec.FUNCTION_LABELS_ENV: json.dumps([label.name for label in labels])})
    except DashboardError as error:
        log.warning("could not update the function's CVAT spec (%s): %s", error, fix)
        return missing
    log.info("function %s: CVAT spec updated through the Nuclio dashboard with %s (it redeploys now)", function,
             ", ".join(missing))
    return missing


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3 or args[0] != "run":
        print("usage: python -m preannotate.worker run STORE JOB_ID", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(Path(args[1]), args[2])


if __name__ == "__main__":
    sys.exit(main())
