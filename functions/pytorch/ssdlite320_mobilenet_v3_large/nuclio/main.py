"""Nuclio entry of pth-preannotate-ssdlite320-mobilenet-v3-large: the model is named by PREANNOTATE_MODEL in function.yaml; the code is shared."""

from preannotate.serving.nuclio import handler, init_context  # noqa: F401
