"""Nuclio entry of mobilenet_v3_small; its model is PREANNOTATE_MODEL in function.yaml."""

from preannotate.serving.nuclio import handler, init_context  # noqa: F401
