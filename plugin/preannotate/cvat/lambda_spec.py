"""The label spec of a CVAT detector function (``metadata.annotations.spec``): what CVAT's lambda manager can map.

CVAT builds its label mapping from the spec alone: a spec label maps to the task label of the same name when their
types are compatible (the same, either of them ``any`` unless the other is a skeleton, or mask with polygon —
``cvat/apps/lambda_manager/views.py``, ``labels_compatible``), and every returned shape whose label is not mapped is
dropped without a word (``if item_label not in mapping: continue``). So the spec must list the labels the model
returns, typed as it returns them, and a function knows its own spec (``FUNCTION_LABELS_ENV``) to say when a newly
trained version has labels the spec lacks.

A skeleton maps only to a skeleton, and its keypoints by name to the task skeleton's sublabels; a returned keypoint
whose sublabel is not mapped is dropped. So a skeleton label is listed with its ``sublabels`` (``{name, type:
"points", attributes}``) and its ``svg`` (both read by ``LambdaFunction.__init__``: a missing one hides every
function), as CVAT's own ``pth-mmpose-hrnet32`` lists its ``body``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence

from preannotate.shapes import LABEL_TYPES, Label

# The names in the deployed spec, as a JSON list, in the function's own environment: written by the renderer and
# by whoever updates the spec, so that the function can tell which of its labels CVAT would drop.
FUNCTION_LABELS_ENV = "PREANNOTATE_FUNCTION_LABELS"
_COMPATIBLE = ({"mask", "polygon"},)


def compatible(spec_type: str, task_type: str) -> bool:
    """Whether CVAT maps a spec label of ``spec_type`` to a task label of ``task_type`` (same name)."""
    return (spec_type == task_type or (task_type == "any" and spec_type != "skeleton")
            or (spec_type == "any" and task_type != "skeleton")
            or any({spec_type, task_type} <= group for group in _COMPATIBLE))


# The CVAT shape types a model returns, by its architecture's ``output`` (``models.registry.Architecture.output``),
# its main type first: the one place that says which labels a model can fill. A keypoint model returns skeletons,
# and a points label's point (learned as a skeleton of one keypoint, ``shapes.as_skeleton``) as a points shape.
FILLS: dict[str, tuple[str, ...]] = {
    "rectangle": ("rectangle",),
    # and polygons: CVAT turns a mask into one for a polygon label; rectangles (rotated too) and ellipses: its masks
    # fitted to the label's outline (``formats.masks.fit_outline``)
    "mask": ("mask", "rectangle", "ellipse"),
    "tag": ("tag",),
    "skeleton": ("skeleton", "points"),
}


def fills(output: str) -> tuple[str, ...]:
    """The CVAT shape types a model whose architecture's ``output`` is ``output`` returns, its main one first."""
    try:
        return FILLS[output]
    except KeyError:
        raise ValueError(f"no model returns {output!r} shapes: outputs are {', '.join(FILLS)}") from None


def label_types(output: str) -> tuple[str, ...]:
    """The CVAT label types a model of ``output`` fills: those it returns, and those CVAT maps its main type to."""
    types = fills(output)
    mapped = [t for t in LABEL_TYPES if t not in types and compatible(types[0], t)]
    return (*types, *sorted(mapped, key=lambda t: t == "any"))  # any last


def spec_labels(labels: Iterable[Label], output: str, outlines: Mapping[str, str] | None = None
                ) -> tuple[list[Label], list[Label]]:
    """``labels`` (a model's, a project's; by name, first wins) typed as a model of ``output`` (``fills``) returns
    them — its own type where the model returns that type (a skeleton with its sublabels and svg), else the model's
    main type where CVAT maps it — and the labels such a model can never fill (a ``points`` or a ``tag`` label for a
    box model, any label but a skeleton or a points one for a keypoint model, a skeleton whose parts are not known)
    — those are reported, not listed: CVAT would map them and get nothing.

    A mask model fits its masks to rectangle and ellipse labels (``shapes.served_outline``), so it lists those as
    ``rectangle`` and ``ellipse``; an ``any`` label as ``outlines`` (a manifest's, label → outline) says it is
    served, else as ``mask``. A box model returns upright rectangles only: an ellipse label is one it cannot fill."""
    types = fills(output)
    outlines = outlines or {}
    listed: dict[str, Label] = {}
    impossible: list[Label] = []
    for label in labels:
        if label.name in listed or any(label.name == other.name for other in impossible):
            continue
        main = types[0]
        if output == "mask":  # an `any` label: its masks fitted to the outline people drew it in
            fitted = outlines.get(label.name, "mask")
            main = "rectangle" if fitted == "rotated-rectangle" else fitted
        kind = label.type if label.type in types else main if compatible(main, label.type) else None
        if kind is None or (kind == "skeleton" and not label.sublabels):  # no part to map: every keypoint dropped
            impossible.append(label)
        elif kind == "skeleton":
            listed[label.name] = Label(label.name, kind, label.attributes, label.id,
                                       tuple(Label(part.name, "points", part.attributes) for part in label.sublabels),
                                       label.svg)
        else:
            listed[label.name] = Label(label.name, kind, label.attributes, label.id)
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
