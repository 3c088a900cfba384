"""Nuclio entry of fasterrcnn_mobilenet_v3_large_320_fpn; its model is PREANNOTATE_MODEL in function.yaml."""

from preannotate.serving.nuclio import handler, init_context  # noqa: F401
