"""End to end, as in a deployed function: a signed CVAT webhook delivery (job 7 of project 6 completed) reaches the
Nuclio handler, a training job reads the project from the CVAT test double, trains in its own process, publishes,
and the next detection request is answered by the new version — without the function restarting."""

from __future__ import annotations

import json
import os

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
