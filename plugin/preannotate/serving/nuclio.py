"""The Nuclio door: one ``init_context``/``handler`` pair for every function; the model comes from the
environment (``PREANNOTATE_MODEL``, ``PREANNOTATE_MODEL_STORE``). A function's ``main.py`` only imports these."""

from __future__ import annotations

import json

from preannotate.serving.core import App, Request


def init_context(context) -> None:
    app = App.from_environment()
    context.logger.info(f"preannotate serving {app.provider.reference} from {app.provider.store.root}")
    context.user_data.app = app


def handler(context, event):
    reply = context.user_data.app.handle(Request(
        method=event.method or "POST", path=event.path or "/", body=event.body,
        headers={str(k): str(v) for k, v in (event.headers or {}).items()},
        query={str(k): str(v) for k, v in (event.fields or {}).items()}))
    return context.Response(body=json.dumps(reply.body), headers={k: str(v) for k, v in reply.headers.items()},
                            content_type="application/json", status_code=reply.status)
