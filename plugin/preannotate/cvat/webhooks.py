"""CVAT webhooks: verifying a delivery, deciding whether it should start training, and registering the webhook.

CVAT signs a delivery with ``X-Signature-256: sha256=<hex HMAC-SHA256 of the body, keyed by the secret>``; the body
is ``json.dumps(payload)`` with Python's defaults. Nuclio hands a function the *decoded* JSON when the content type
is ``application/json`` (CVAT's is), so when the raw bytes are gone we re-encode the payload the way CVAT did:
``json.loads`` keeps key order, so ``json.dumps`` gives back the very bytes that were signed.

What starts training is a ``TrainingPolicy`` from the function's environment:

* ``PREANNOTATE_TRAIN_ON`` — job changes that count, comma-separated: ``state=completed`` and ``stage=acceptance``
  by default; ``any`` counts every ``update:job`` that changed the state or stage;
* ``PREANNOTATE_TRAIN_MIN_NEW_FRAMES`` — train only once jobs covering at least this many frames were finished
  since the last training run (default 0: the first qualifying job starts it);
* ``PREANNOTATE_TRAIN_DEBOUNCE`` — wait this long (``90s``, ``10m``, ``1h``) after the last qualifying event before
  training starts, so a reviewer closing ten jobs starts one run, not ten (default 0);
* ``PREANNOTATE_TRAIN_PROJECTS`` — only these project ids (default: any project the webhook reports).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from preannotate.functions import parse_duration

SIGNATURE_HEADER = "X-Signature-256"
DEFAULT_TRAIN_ON = ("state=completed", "stage=acceptance")
JOB_EVENTS = ("update:job",)


class WebhookError(Exception):
    """A delivery that cannot be accepted; ``status`` is the HTTP answer (401 for a bad signature)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def signed_body(body: Any, raw: bytes | None = None) -> bytes:
    """The bytes CVAT signed: the raw body when the door kept it, else the decoded payload encoded as CVAT does."""
    if raw is not None:
        return raw
    if isinstance(body, (bytes, bytearray)):
        return bytes(body)
    if isinstance(body, str):
        return body.encode()
    return json.dumps(body).encode()


def verify(secret: str, body: Any, headers: Mapping[str, str], raw: bytes | None = None) -> dict[str, Any]:
    """The delivery's payload if its signature is right; ``WebhookError(401)`` otherwise (nothing is started)."""
    if not secret:
        raise WebhookError("webhooks are not accepted: PREANNOTATE_WEBHOOK_SECRET is not set on this function", 403)
    header = next((v for k, v in headers.items() if k.lower() == SIGNATURE_HEADER.lower()), "")
    if not header:
        raise WebhookError(f"unsigned delivery: no {SIGNATURE_HEADER} header (set the webhook's secret in CVAT)", 401)
    data = signed_body(body, raw)
    if not hmac.compare_digest(header.strip().encode(), signature(secret, data).encode()):
        raise WebhookError(f"{SIGNATURE_HEADER} does not match the body: wrong secret, or the body was altered", 401)
    try:
        payload = body if isinstance(body, dict) else json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise WebhookError(f"delivery is not JSON: {error}") from None
    if not isinstance(payload, dict) or "event" not in payload:
        raise WebhookError("delivery has no 'event': not a CVAT webhook payload")
    return payload


@dataclass(frozen=True)
class TrainingPolicy:
    train_on: tuple[str, ...] = DEFAULT_TRAIN_ON
    min_new_frames: int = 0
    debounce_s: float = 0.0
    projects: frozenset[int] | None = None

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> TrainingPolicy:
        env = os.environ if environ is None else environ
        train_on = tuple(t.strip() for t in env.get("PREANNOTATE_TRAIN_ON", "").split(",") if t.strip())
        for item in train_on:
            key, _, value = item.partition("=")
            if item != "any" and (key not in ("state", "stage") or not value):
                raise ValueError(f"PREANNOTATE_TRAIN_ON: {item!r} is not state=VALUE, stage=VALUE or any")
        projects = env.get("PREANNOTATE_TRAIN_PROJECTS", "").replace(";", ",")
        return cls(
            train_on=train_on or DEFAULT_TRAIN_ON,
            min_new_frames=int(env.get("PREANNOTATE_TRAIN_MIN_NEW_FRAMES") or 0),
            debounce_s=parse_duration(env["PREANNOTATE_TRAIN_DEBOUNCE"]) if env.get("PREANNOTATE_TRAIN_DEBOUNCE")
            else 0.0,
            projects=frozenset(int(p) for p in projects.split(",") if p.strip()) or None)


@dataclass(frozen=True)
class Trigger:
    """A job change that counts toward training: what was finished and where."""

    project_id: int | None
    task_id: int
    job_id: int
    frames: int
    reason: str


def qualifying_change(payload: Mapping[str, Any], policy: TrainingPolicy) -> Trigger | str:
    """The ``Trigger`` this delivery represents, or why it does not count (a string, for the answer and the log)."""
    event = payload.get("event")
    if event == "ping":
        return "ping"
    if event not in JOB_EVENTS:
        return f"{event} does not start training (only job updates do)"
    job = payload.get("job") or {}
    before = payload.get("before_update") or {}
    changed = {key: job.get(key) for key in ("state", "stage") if key in before and before[key] != job.get(key)}
    if not changed:
        return f"job {job.get('id')}: neither state nor stage changed"
    matched = next((f"{k}={v}" for k, v in changed.items() if "any" in policy.train_on
                    or f"{k}={v}" in policy.train_on), None)
    if matched is None:
        now = ", ".join(f"{k}={v}" for k, v in changed.items())
        return f"job {job.get('id')}: {now} is not one of {', '.join(policy.train_on)}"
    project_id = job.get("project_id")
    if policy.projects is not None and project_id not in policy.projects:
        return f"job {job.get('id')}: project {project_id} is not one this function trains for"
    return Trigger(project_id=project_id, task_id=int(job["task_id"]), job_id=int(job["id"]),
                   frames=int(job.get("frame_count") or 0), reason=f"job {job['id']} {matched}")


def register(client, *, url: str, secret: str, project_id: int | None = None, organization: str | None = None,
             verify_ssl: bool = True, description: str = "preannotate: retrain when jobs are finished") -> dict:
    """Create the CVAT webhook that sends job updates to a function's ``/webhook`` (a project webhook, or an
    organization one when no project is given). Returns the webhook as CVAT answered it."""
    from cvat_sdk.api_client import models

    if not secret:
        raise ValueError("a webhook secret is required: the function rejects unsigned deliveries")
    if project_id is None and not organization:
        raise ValueError("give a project id, or an organization for an organization-wide webhook")
    request = models.WebhookWriteRequest(
        target_url=url, description=description, type="project" if project_id is not None else "organization",
        content_type="application/json", secret=secret, is_active=True, enable_ssl=verify_ssl,
        events=list(JOB_EVENTS), **({"project_id": project_id} if project_id is not None else {}))
    kwargs = {"org": organization} if organization else {}
    webhook, _ = client.api_client.webhooks_api.create(request, **kwargs)
    return webhook.to_dict()
