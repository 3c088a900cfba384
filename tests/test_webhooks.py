"""CVAT webhook deliveries as recorded from CVAT 2.42: signatures, what starts training, registration."""

from __future__ import annotations

import json

import pytest
from cvat_sdk import make_client
from preannotate.cvat import webhooks
from preannotate.cvat.webhooks import WebhookError
from preannotate.models import hyperparameters_for
from preannotate.models.registry import DEFAULT_ARCHITECTURE
from preannotate.training import triggers
from preannotate.training.triggers import TrainingPolicy, Trigger

from tests.conftest import FIXTURES

DELIVERIES = sorted(p for p in (FIXTURES / "webhooks").glob("*.json") if p.name != "all_deliveries.json")
SECRET = "s3cret"  # the secret the recorded webhooks were created with


def delivery(name: str) -> dict:
    return json.loads((FIXTURES / "webhooks" / f"{name}.json").read_text())


@pytest.mark.parametrize("path", DELIVERIES, ids=lambda p: p.stem)
def test_every_recorded_delivery_verifies_raw_and_as_nuclio_decodes_it(path):
    recorded = json.loads(path.read_text())
    raw = recorded["body_raw"].encode()
    assert webhooks.verify(SECRET, raw, recorded["headers"])["event"] == recorded["body_json"]["event"]
    # Nuclio hands the function the decoded dict (content type application/json): re-encoding gives the signed bytes
    decoded = json.loads(raw)
    assert webhooks.verify(SECRET, decoded, recorded["headers"]) == decoded


@pytest.mark.parametrize("change", [
    lambda d: ("wrong-secret", d["body_raw"].encode(), d["headers"]),
    lambda d: (SECRET, d["body_raw"].replace('"completed"', '"rejected"').encode(), d["headers"]),
    lambda d: (SECRET, d["body_raw"].encode(), {k: v for k, v in d["headers"].items() if k != "X-Signature-256"}),
    lambda d: (SECRET, d["body_raw"].encode(), {**d["headers"], "X-Signature-256": "sha256=" + "0" * 64}),
], ids=["wrong-secret", "tampered-body", "unsigned", "forged"])
def test_a_bad_or_missing_signature_is_refused_with_401(change):
    secret, body, headers = change(delivery("update_job.state_completed"))
    with pytest.raises(WebhookError) as raised:
        webhooks.verify(secret, body, headers)
    assert raised.value.status == 401


def test_a_function_without_a_secret_accepts_no_delivery():
    recorded = delivery("ping.project_webhook")
    with pytest.raises(WebhookError, match="PREANNOTATE_WEBHOOK_SECRET") as raised:
        webhooks.verify("", recorded["body_raw"].encode(), recorded["headers"])
    assert raised.value.status == 403


def test_header_name_is_matched_without_regard_to_case():
    recorded = delivery("ping.project_webhook")
    headers = {k.lower(): v for k, v in recorded["headers"].items()}
    assert webhooks.verify(SECRET, recorded["body_raw"].encode(), headers)["event"] == "ping"


def test_completed_job_and_acceptance_stage_start_training_by_default():
    policy = TrainingPolicy()
    completed = triggers.qualifying_change(delivery("update_job.state_completed")["body_json"], policy)
    assert completed == Trigger(project_id=6, task_id=7, job_id=7, frames=3, reason="job 7 state=completed")
    accepted = triggers.qualifying_change(delivery("update_job.stage_acceptance")["body_json"], policy)
    assert isinstance(accepted, Trigger) and accepted.job_id == 8 and accepted.reason == "job 8 stage=acceptance"


@pytest.mark.parametrize("name, why", [
    ("ping.project_webhook", "ping"),
    ("update_job.annotation_save_on_job", "neither state nor stage changed"),
    ("create_job", "create:job does not start training"),
    ("update_task.annotation_save_on_job", "update:task: new tasks are not pre-annotated (set "
                                           "PREANNOTATE_ANNOTATE_ON=task)"),
    ("delete_task", "delete:task does not start training"),
])
def test_other_deliveries_start_nothing_and_say_why(name, why):
    answer = triggers.qualifying_change(delivery(name)["body_json"], TrainingPolicy())
    assert isinstance(answer, str) and why in answer


def test_policy_from_environment_narrows_what_counts():
    policy = TrainingPolicy.from_environment({
        "PREANNOTATE_TRAIN_ON": "completed", "PREANNOTATE_TRAIN_MIN_NEW_FRAMES": "500",
        "PREANNOTATE_TRAIN_DEBOUNCE": "10m", "PREANNOTATE_TRAIN_PROJECTS": "6;9"})
    assert policy == TrainingPolicy(("completed",), 500, 600.0, frozenset({6, 9}))
    acceptance = triggers.qualifying_change(delivery("update_job.stage_acceptance")["body_json"], policy)
    assert acceptance == "job 8: stage=acceptance is not one of completed"
    # the earlier spellings read the same, and the key's grammar is the hyperparameter's (one grammar, one default)
    old_spelling = TrainingPolicy.from_environment({"PREANNOTATE_TRAIN_ON": "state=completed"})
    assert old_spelling == TrainingPolicy(("completed",))
    assert TrainingPolicy.from_environment({"PREANNOTATE_TRAIN_ON": "any"}).train_on == ("all",)
    assert TrainingPolicy().train_on == hyperparameters_for(DEFAULT_ARCHITECTURE).sources.train_on
    everything = TrainingPolicy(("all",))
    assert isinstance(triggers.qualifying_change(delivery("update_job.stage_acceptance")["body_json"], everything),
                      Trigger)
    other_project = TrainingPolicy(projects=frozenset({1}))
    assert "project 6" in triggers.qualifying_change(delivery("update_job.state_completed")["body_json"],
                                                     other_project)
    assert TrainingPolicy.from_environment({}) == TrainingPolicy()


def test_a_bad_policy_is_an_error_naming_the_setting():
    with pytest.raises(ValueError, match="PREANNOTATE_TRAIN_ON"):
        TrainingPolicy.from_environment({"PREANNOTATE_TRAIN_ON": "finished"})


def test_register_creates_a_signed_project_webhook_for_job_updates(cvat_double):
    project_id = next(iter(cvat_double.projects))
    with make_client(cvat_double.base_url, credentials=cvat_double.credentials) as client:
        created = webhooks.register(client, url="http://preannotate:8080/webhook", secret="s3", project_id=project_id)
    assert (created["type"], created["project_id"], sorted(created["events"])) == \
        ("project", project_id, ["create:task", "update:job", "update:task"])
    assert "secret" not in created
    assert cvat_double.webhooks[created["id"]]["secret"] == "s3"
    assert cvat_double.webhooks[created["id"]]["target_url"] == "http://preannotate:8080/webhook"


def test_register_refuses_an_unsigned_webhook():
    with pytest.raises(ValueError, match="secret"):
        webhooks.register(None, url="http://x/webhook", secret="", project_id=1)


@pytest.mark.parametrize("payload", [
    {"event": "update:job", "job": [1]},
    {"event": "update:job", "job": {"id": 7, "state": "completed"}, "before_update": ["state"]},
    {"event": "update:job", "job": {"id": 7, "task_id": 7, "state": "completed", "project_id": [6]},
     "before_update": {"state": "new"}},
    {"event": "update:job", "job": {"id": 7, "state": "completed"}, "before_update": {"state": "new"}},
])
def test_a_signed_delivery_that_is_not_cvats_says_why_and_starts_nothing(payload):
    answer = triggers.qualifying_change(payload, TrainingPolicy(projects=frozenset({6})))
    assert isinstance(answer, str)


def test_a_signed_body_with_a_huge_number_is_refused_as_not_json():
    body = b'{"event": "ping", "n": ' + b"9" * 5000 + b"}"
    with pytest.raises(WebhookError, match="not JSON"):
        webhooks.verify(SECRET, body, {"X-Signature-256": webhooks.signature(SECRET, body)})
