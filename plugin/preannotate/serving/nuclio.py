"""The Nuclio door: one ``init_context``/``handler`` pair for every function; the model comes from the
environment (``PREANNOTATE_MODEL``, ``PREANNOTATE_MODEL_STORE``). A function's ``main.py`` only imports these."""

from __future__ import annotations

import json

from preannotate.serving.core import App, Request
from preannotate.serving.training import TrainingRoutes


def init_context(context) -> None:
    app = App.from_environment()
    # the training routes, and the runner that trains queued jobs in a process of their own: a detector's (a
    # tracker or reid function of the same model serves what that one trains)
    context.user_data.training = TrainingRoutes.attach(app) if app.kind == "detector" else None
    context.logger.info(f"preannotate serving {app.provider.reference.text} from {app.provider.store.root}")
    context.user_data.app = app


def _is_cron(event) -> bool:
    """Nuclio's own cron trigger. (A Kubernetes CronJob that Nuclio creates instead calls the HTTP trigger: anyone
    could send its header, so such a call goes to ``/cron`` as any client's, with the API token.)"""
    return getattr(event.trigger, "kind", "") == "cron"


def _body(event):
    """The body as the core takes it: an object or array Nuclio decoded as it is, anything else bytes. Nuclio decodes
    every JSON value of an ``application/json`` body, so a bare number, string or boolean goes back to the JSON it
    came as: the route then says what is wrong with it."""
    body = event.body
    if body is None or isinstance(body, (bytes, bytearray, dict, list)):
        return body
    if isinstance(body, str) and event.content_type != "application/json":
        return body.encode("utf-8", "surrogatepass")
    if isinstance(body, (str, int, float)):  # bool is an int
        return json.dumps(body).encode()
    return body


def handler(context, event):
    cron = _is_cron(event)
    headers = {str(k): str(v) for k, v in (event.headers or {}).items()}
    cron_over_http = {k.lower(): v for k, v in headers.items()}.get("x-nuclio-invoke-trigger") == "cron"
    method = "POST" if cron or cron_over_http else event.method or "POST"
    path = "/cron" if cron or cron_over_http else event.path or "/"
    try:
        reply = context.user_data.app.handle(Request(
            method=method, path=path, body=_body(event), headers=headers,
            query={str(k): str(v) for k, v in (event.fields or {}).items()}, from_platform_cron=cron))
        body = json.dumps(reply.body)
    except Exception:  # a bug must not reach Nuclio, which would answer with Python's text of it
        reply = App.internal_error(method, path)
        body = json.dumps(reply.body)
    return context.Response(body=body, headers={k: str(v) for k, v in reply.headers.items()},
                            content_type="application/json", status_code=reply.status)
