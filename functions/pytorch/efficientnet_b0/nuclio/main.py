"""Nuclio entry of efficientnet_b0; its model is PREANNOTATE_MODEL in function.yaml."""

from preannotate.serving.nuclio import handler, init_context  # noqa: F401
