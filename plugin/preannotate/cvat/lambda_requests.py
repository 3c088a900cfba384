"""The requests of CVAT's lambda manager (its *Automatic annotation* menu), as ``GET /api/lambda/requests`` lists them.

CVAT 2.42 (``cvat/apps/lambda_manager/views.py``, ``RequestViewSet.list``) answers a plain JSON list, not a page:
one ``FunctionCallSerializer`` per request of its auto-annotation queue that the user may see, whatever its state
but failed (finished ones stay listed for 30 minutes)::

    {"id": "action=autoannotate&target=task&target_id=7", "function": {"id": "pth-...", "task": 7, "job"?: 9,
     "threshold": 0.5}, "status": "queued" | "started" | "finished", "progress": 40, "enqueued": "...Z",
     "started": "...Z" | null, "ended": "...Z" | null, "exc_info": null}

A request writes the task's annotations (``source: auto``) while it is queued or started, and CVAT refuses a second
one on the same task (409) so that two of them never write at once; our own pre-annotation keeps that rule too
(``active_on``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from cvat_sdk import Client

from preannotate.cvat.client import CvatError, cvat_errors

# rq's states of a job that is still to write: scheduled and deferred are listed as queued by CVAT, kept for safety.
ACTIVE = ("queued", "started", "scheduled", "deferred")


@dataclass(frozen=True)
class LambdaRequest:
    id: str
    function: str
    task: int | None
    job: int | None
    status: str
    progress: int
    enqueued: str | None

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    @property
    def name(self) -> str:
        where = f"job {self.job}" if self.job is not None else f"task {self.task}"
        return f"request {self.id} of function {self.function} on {where}"

    def describe(self) -> str:
        return f"{self.name}: {self.status}, {self.progress}%"

    @classmethod
    def from_json(cls, item: Any) -> LambdaRequest:
        if not isinstance(item, dict) or not isinstance(item.get("function"), dict):
            raise ValueError(f"not a lambda request: {str(item)[:200]}")
        function = item["function"]
        return cls(id=str(item.get("id")), function=str(function.get("id")), task=function.get("task"),
                   job=function.get("job"), status=str(item.get("status") or ""),
                   progress=int(item.get("progress") or 0), enqueued=item.get("enqueued"))


class LambdaBusy(CvatError):
    """CVAT's lambda manager has a request queued or running on the task: another writer is at work there."""

    def __init__(self, task_id: int, requests: list[LambdaRequest]):
        self.task_id, self.requests = task_id, requests
        super().__init__(f"task {task_id}: CVAT's lambda manager has "
                         + "; ".join(request.describe() for request in requests))


def requests_on(client: Client, task_id: int) -> list[LambdaRequest]:
    """The lambda manager's listed requests on ``task_id`` (a job's request counts for its task), any state."""
    with cvat_errors(client, "the lambda requests"):
        _, response = client.api_client.lambda_api.list_requests(_parse_response=False)
    try:
        listed = json.loads(response.data)
        if not isinstance(listed, list):
            raise ValueError("not a list")
        found = [LambdaRequest.from_json(item) for item in listed]
    except ValueError as error:
        raise CvatError(f"CVAT's answer to GET /api/lambda/requests is not a list of requests: {error}") from None
    return [request for request in found if request.task == task_id]


def active_on(client: Client, task_id: int) -> list[LambdaRequest]:
    """The requests queued or running on ``task_id``: while there is one, no one else writes the task."""
    return [request for request in requests_on(client, task_id) if request.active]


def check_idle(client: Client, task_id: int) -> None:
    """``LambdaBusy`` while CVAT's lambda manager has a request queued or running on the task."""
    busy = active_on(client, task_id)
    if busy:
        raise LambdaBusy(task_id, busy)
