"""CVAT webhooks: verifying a delivery and registering the webhook (what a delivery starts is
``preannotate.training.triggers``).

CVAT signs a delivery with ``X-Signature-256: sha256=<hex HMAC-SHA256 of the body, keyed by the secret>``; the body
is ``json.dumps(payload)`` with Python's defaults. Nuclio hands a function the *decoded* JSON when the content type
is ``application/json`` (CVAT's is), so when the raw bytes are gone we re-encode the payload the way CVAT did:
``json.loads`` keeps key order, so ``json.dumps`` gives back the very bytes that were signed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from typing import Any

SIGNATURE_HEADER = "X-Signature-256"
# What a registered webhook sends (training.triggers decides what counts): job updates retrain, task events
# pre-annotate new tasks.
JOB_EVENTS = ("update:job",)
TASK_EVENTS = ("create:task", "update:task")


def upload_finished(payload: Mapping[str, Any]) -> bool:
    """Whether an ``update:task`` delivery is the one that says the task's data has arrived.

    Uploading data (``POST /api/tasks/ID/data``) sends four ``update:task`` (recorded: all_deliveries.json 6, 7, 10,
    11): the data attached (``size`` still 0), the job counts, then — once CVAT's task-creation job has read the
    frames and made the segments and jobs (``_create_segments_and_jobs`` in cvat/apps/engine/task.py) — the task
    saved with its ``mode`` (``""`` until then, ``annotation`` or ``interpolation`` after), and a last save of
    ``updated_date`` only. Every later change of the task sends ``update:task`` too: an annotation save, by a person
    or by CVAT's lambda manager, only touches ``updated_date`` (``before_update`` = ``{"updated_date"}``); a person's
    edit names its field (``name``, ``assignee``...). The task's ``mode`` is set once, by the upload: that delivery
    is the one."""
    before, task = payload.get("before_update"), payload.get("task")
    return (payload.get("event") == "update:task" and isinstance(before, Mapping) and isinstance(task, Mapping)
            and before.get("mode") == "" and bool(task.get("mode")))


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
    except (ValueError, RecursionError):  # not UTF-8, not JSON, a 5,000-digit number, nested too deep
        raise WebhookError("the delivery's body is not JSON: not a CVAT webhook payload") from None
    if not isinstance(payload, dict) or "event" not in payload:
        raise WebhookError("delivery has no 'event': not a CVAT webhook payload")
    return payload


def register(client, *, url: str, secret: str, project_id: int | None = None, organization: str | None = None,
             verify_ssl: bool = True,
             description: str = "preannotate: retrain when jobs are finished, pre-annotate new tasks") -> dict:
    """Create the CVAT webhook that sends job updates and task events to a function's ``/webhook`` (a project
    webhook, or an organization one when no project is given). Returns the webhook as CVAT answered it."""
    from cvat_sdk.api_client import models

    if not secret:
        raise ValueError("a webhook secret is required: the function rejects unsigned deliveries")
    if project_id is None and not organization:
        raise ValueError("give a project id, or an organization for an organization-wide webhook")
    request = models.WebhookWriteRequest(
        target_url=url, description=description, type="project" if project_id is not None else "organization",
        content_type="application/json", secret=secret, is_active=True, enable_ssl=verify_ssl,
        events=[*JOB_EVENTS, *TASK_EVENTS], **({"project_id": project_id} if project_id is not None else {}))
    kwargs = {"org": organization} if organization else {}
    webhook, _ = client.api_client.webhooks_api.create(request, **kwargs)
    return webhook.to_dict()
