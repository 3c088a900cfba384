"""End to end, as in a deployed function: a signed CVAT webhook delivery (job 7 of project 6 completed) reaches the
Nuclio handler, a training job reads the project from the CVAT test double, trains in its own process, publishes,
and the next detection request is answered by the new version — without the function restarting."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from nuclio_sdk import Event
from nuclio_sdk.test import Platform
from preannotate.models import ModelStore
from preannotate.serving import nuclio
from preannotate.training.jobs import FINISHED, JobStore

from tests.conftest import FIXTURES, b64, encode, job_activity, photo, wait_while_advancing

TINY = ("init=random; num-steps=2; batch-size=2; image-size=64; max-image-size=96; num-validations=1; "
        "val-fraction=0.3")


@pytest.fixture(params=["fasterrcnn_mobilenet_v3_large_320_fpn",  # in make test: the function's whole loop, briefly
                        pytest.param("keras_ssd_mobilenet_v2_fpnlite_320", marks=pytest.mark.slow)])
def function(cvat_double, monkeypatch, tmp_path, request):
    """A function's environment as function.yaml and the deploy script set it, and its Nuclio context: a torch
    model's function and a TensorFlow one's."""
    env = {
        "PREANNOTATE_MODEL": "shapes", "PREANNOTATE_MODEL_STORE": str(tmp_path / "store"),
        "PREANNOTATE_TRAIN_PROJECT": "6",
        "PREANNOTATE_DEVICE": "cpu", "PREANNOTATE_TRAIN_MODEL": request.param,
        "PREANNOTATE_TRAIN_HYPERPARAMETERS": TINY, "PREANNOTATE_WEBHOOK_SECRET": "s3cret",
        "PREANNOTATE_API_TOKEN": "t0ken",
        "CVAT_URL": cvat_double.base_url, "CVAT_USERNAME": cvat_double.credentials[0],
        "CVAT_PASSWORD": cvat_double.credentials[1],
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    platform = Platform()
    contexts = []
    platform.call_handler_with_context_mutation(nuclio.handler, Event(method="GET", path="/health"),
                                                lambda c: contexts.append(c) or c)
    context = contexts[0]
    yield platform, context
    context.user_data.training.runner.stop()


def call(platform, method, path, body=None, headers=None):
    event = Event(body=body, content_type="application/json", method=method, path=path, headers=headers or {})
    response = platform.call_handler(nuclio.handler, event)
    return response.status_code, json.loads(response.body)


def test_a_completed_job_retrains_the_function_and_the_next_detection_uses_the_new_version(function, tmp_path):
    platform, context = function
    image = {"image": b64(encode(photo(96, 64))), "threshold": 0.0}
    status, body = call(platform, "POST", "/", image)
    assert status == 503 and body["error"].startswith("not trained yet: ")  # nothing trained yet: a clear 503
    assert call(platform, "GET", "/health")[0] == 200

    delivery = json.loads((FIXTURES / "webhooks" / "update_job.state_completed.json").read_text())
    status, body = call(platform, "POST", "/webhook", json.loads(delivery["body_raw"]), delivery["headers"])
    job_id, jobs = body["job"], JobStore(tmp_path / "store")
    assert status == 202 and jobs.get(job_id).state not in FINISHED  # answered at once; training runs elsewhere

    def finished():
        status, job = call(platform, "GET", f"/jobs/{job_id}", headers={"Authorization": "Bearer t0ken"})
        return job["state"] in FINISHED and job

    job = wait_while_advancing(finished, job_activity(jobs, job_id), "the training job")
    assert job["state"] == "succeeded", job
    assert job["version"] == 1 and job["trigger"] == "webhook: job 7 state=completed"

    manifest = ModelStore(tmp_path / "store").resolve("shapes") / "manifest.json"
    provenance = json.loads(manifest.read_text())["provenance"]
    assert "7" in provenance["cvat"]["tasks"] and provenance["job"] == job_id

    status, shapes = call(platform, "POST", "/", image)
    assert status == 200 and isinstance(shapes, list)
    _, health = call(platform, "GET", "/health")
    assert health["model"]["version"] == 1 and health["model"]["architecture"] == \
        os.environ["PREANNOTATE_TRAIN_MODEL"]
    names = {label["name"] for label in health["model"]["labels"]}
    assert {shape["label"] for shape in shapes} <= names and "car" in names  # the CVAT project's labels


# ------------------------------------------------------------------------------------------ preannotate serve


@contextlib.contextmanager
def _serving(env: dict[str, str], store):
    """`preannotate serve` for the project's model, as a person starts it in a terminal (Ctrl-C stops it, even
    when these tests run in the background, whose processes inherit SIGINT ignored): the process and its URL once
    it listens; killed when the block ends, if still there."""
    server = subprocess.Popen([sys.executable, "-m", "preannotate.cli", "serve", "--model", "shapes", "--store",
                               str(store), "--port", "0"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        lines = []
        while not lines or not lines[-1].startswith("serving"):
            lines.append(server.stdout.readline())
            assert lines[-1] or server.poll() is None, "".join(lines) + server.stderr.read()
        yield server, re.search(r"on (http://\S+/)", lines[-1]).group(1)
    finally:
        server.kill()
        server.wait()


def _get_job(url: str, job_id: str) -> dict:
    with urllib.request.urlopen(urllib.request.Request(f"{url}jobs/{job_id}", headers=AUTH)) as reply:
        return json.loads(reply.read())


def _training(url: str, job_id: str, store: Path, past_step: int = 0) -> dict:
    """The job once it trains beyond ``past_step``: waited for as long as it is starting or training."""
    def settled():
        job = _get_job(url, job_id)
        return job if job["state"] not in ("queued", "running") or job.get("step", 0) > past_step else None

    job = wait_while_advancing(settled, job_activity(JobStore(store), job_id), f"job {job_id} to train")
    assert job["state"] == "running" and job["step"] > past_step, job
    return job


def _stopped(server: subprocess.Popen, store: Path, job_id: str) -> int:
    """The server's exit status, waited for while its job checkpoints and stops (bounded by the job's activity);
    AssertionError as soon as the job trains on instead (it stops at its next step; steps are logged every 50)."""
    jobs = JobStore(store)
    told_at = jobs.progress(job_id).get("step", 0)

    def exited() -> bool:
        step = jobs.progress(job_id).get("step", 0)
        assert step <= told_at + 100, f"job {job_id} trains on after its server was told to stop ({told_at} → {step})"
        return server.poll() is not None

    wait_while_advancing(exited, job_activity(jobs, job_id), f"the server to stop job {job_id}")
    return server.returncode


def _processes_of(job_id: str) -> list[int]:
    """The processes running the job (`python -m preannotate.worker run STORE JOB`)."""
    found = []
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            words = (proc / "cmdline").read_bytes().split(b"\0")
            if b"preannotate.worker" in words and job_id.encode() in words:
                found.append(int(proc.name))
    return found


AUTH = {"Authorization": "Bearer t0ken"}


@pytest.mark.slow
def test_a_local_server_stopped_by_sigterm_stops_its_training_job_which_the_next_server_resumes(cvat_double,
                                                                                                   tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    env = {**os.environ, "PREANNOTATE_TRAIN_PROJECT": "6", "PREANNOTATE_API_TOKEN": "t0ken",
           "PREANNOTATE_TRAIN_MODEL": "fasterrcnn_mobilenet_v3_large_320_fpn", "PREANNOTATE_DEVICE": "cpu",
           "PREANNOTATE_TRAIN_HYPERPARAMETERS": TINY.replace("num-steps=2", "num-steps=100000"),
           "CVAT_URL": cvat_double.base_url, "CVAT_USERNAME": cvat_double.credentials[0],
           "CVAT_PASSWORD": cvat_double.credentials[1], "PYTHONUNBUFFERED": "1"}
    job_id = "none yet"
    try:
        with _serving(env, store) as (server, url):
            train = urllib.request.Request(url + "train", data=json.dumps({"project": 6}).encode(), method="POST",
                                           headers={**AUTH, "Content-Type": "application/json"})
            with urllib.request.urlopen(train) as reply:
                job_id = json.loads(reply.read())["job"]
            _training(url, job_id, store)
            assert _processes_of(job_id)
            server.send_signal(signal.SIGTERM)
            assert _stopped(server, store, job_id) == 0  # it waited for its job to checkpoint and stop
            said = server.stderr.read()
            assert f"stopping job {job_id}: it saves a checkpoint, and the next `preannotate serve`" in said, said
        assert _processes_of(job_id) == []  # gone with the server
        stopped = json.loads((store / ".jobs" / job_id / "job.json").read_text())
        assert stopped["state"] == "running" and stopped["attempts"] == 1  # to be resumed, not failed
        metrics = (store / ".jobs" / job_id / "work" / "run" / "metrics.jsonl").read_text().splitlines()
        last_step = max(json.loads(line).get("step", 0) for line in metrics)

        with _serving(env, store) as (server, url):  # the next server resumes it
            assert _training(url, job_id, store, past_step=last_step)["attempts"] == 2
            server.send_signal(signal.SIGINT)  # Ctrl-C stops it the same way
            assert _stopped(server, store, job_id) == 0
        assert _processes_of(job_id) == []
    finally:  # what a failure would leave behind
        for pid in _processes_of(job_id):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
