"""Nuclio entry of keras_retinanet_resnet50_fpn; its model is PREANNOTATE_MODEL in function.yaml."""

from preannotate.serving.nuclio import handler, init_context  # noqa: F401
