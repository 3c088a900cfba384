"""The label spec of a CVAT detector function (``metadata.annotations.spec``): what CVAT's lambda manager can map.

CVAT builds its label mapping from the spec alone: a spec label maps to the task label of the same name when their
types are compatible (the same, either of them ``any``, or mask with polygon —
``cvat/apps/lambda_manager/views.py``, ``labels_compatible``), and every returned shape whose label is not mapped is
dropped without a word (``if item_label not in mapping: continue``). So the spec must list the labels the model
returns, typed as it returns them, and a function knows its own spec (``FUNCTION_LABELS_ENV``) to say when a newly
trained version has labels the spec lacks.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence

from preannotate.shapes import Label

# The names in the deployed spec, as a JSON list, in the function's own environment: written by the renderer and
# by whoever updates the spec, so that the function can tell which of its labels CVAT would drop.
FUNCTION_LABELS_ENV = "PREANNOTATE_FUNCTION_LABELS"
_COMPATIBLE = ({"mask", "polygon"},)
FITTED_TYPES = ("rectangle", "ellipse")  # label types a mask model serves by fitting its masks


def compatible(spec_type: str, task_type: str) -> bool:
    """Whether CVAT maps a spec label of ``spec_type`` to a task label of ``task_type`` (same name)."""
    return (spec_type == task_type or (task_type == "any" and spec_type != "skeleton")
            or (spec_type == "any" and task_type != "skeleton")
            or any({spec_type, task_type} <= group for group in _COMPATIBLE))


def spec_labels(labels: Iterable[Label], output: str, outlines: Mapping[str, str] | None = None
                ) -> tuple[list[Label], list[Label]]:
    """``labels`` (a model's, a project's; by name, first wins) typed as a model returning ``output`` shapes
    (``rectangle`` or ``mask``) returns them, and the labels such a model can never fill (a ``points`` or a ``tag``
    label for a box model) — those are reported, not listed: CVAT would map them and get nothing.

    A mask model fits its masks to rectangle and ellipse labels (``shapes.served_outline``), so it lists those as
    ``rectangle`` and ``ellipse``; an ``any`` label as ``outlines`` (a manifest's, label → outline) says it is
    served, else as ``mask``. A box model returns upright rectangles only: an ellipse label is one it cannot fill."""
    outlines = outlines or {}
    listed: dict[str, Label] = {}
    impossible: list[Label] = []
    for label in labels:
        if label.name in listed or any(label.name == other.name for other in impossible):
            continue
        served = output
        if output == "mask":
            fitted = label.type if label.type in FITTED_TYPES else outlines.get(label.name, "mask")
            served = "rectangle" if fitted == "rotated-rectangle" else fitted
        if compatible(served, label.type):
            listed[label.name] = Label(label.name, served, label.attributes, label.id)
        else:
            impossible.append(label)
    return list(listed.values()), impossible


def cannot_fill(label: Label) -> str:
    """Why ``spec_labels`` left ``label`` out, in one sentence for the operator (only a box model leaves an ellipse
    label out)."""
    if label.type == "ellipse":
        return (f"{label.name} ({label.type}): a box model returns upright rectangles, not ellipses; a mask model "
                "(maskrcnn_resnet50_fpn, or custom with head=mask-rcnn) fills ellipse and rotated-rectangle labels")
    return (f"{label.name} ({label.type}): the model cannot return {label.type} shapes, so CVAT could map nothing "
            "to it")


def spec_text(labels: Sequence[Label]) -> str:
    """The spec as CVAT's own functions write it: a JSON list, one label per line."""
    return "[\n" + ",\n".join("  " + json.dumps(label.to_dict()) for label in labels) + "\n]\n"


def spec_names(environ: Mapping[str, str]) -> list[str] | None:
    """The label names of the deployed spec, from the function's environment (None when it does not say)."""
    text = environ.get(FUNCTION_LABELS_ENV)
    if not text:
        return None
    try:
        names = json.loads(text)
    except json.JSONDecodeError:
        return None
    return [str(name) for name in names] if isinstance(names, list) else None


def unmapped(spec: Iterable[str], labels: Iterable[Label]) -> list[str]:
    """The names of ``labels`` (a model version's) that the spec lacks: CVAT drops their shapes."""
    names = set(spec)
    return [label.name for label in labels if label.name not in names]
