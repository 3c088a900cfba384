"""Shape attributes learned from the shapes people made: a small classifier on each detected object's crop.

**What is learned.** For every label, its ``select``, ``radio`` and ``checkbox`` attributes (``LEARNED_TYPES``): each
is a *head* of one network, choosing among the attribute's values (a checkbox's are ``"false"`` and ``"true"``, as
CVAT writes them). ``number`` and ``text`` attributes are left to people: a number is a measurement (a count, an
angle) better read than guessed from a crop, and a text is free; neither is ever returned.

**Why a classifier on the crop, not a head on the detector's region features.** One mechanism serves every
detector family — torchvision's, the composed designer's and the Keras ones — with no change to any of them, since
it needs only the boxes a detector returns; it trains from the very frames the detector trains from, in seconds on
a CPU (a few thousand 48-pixel crops through a four-layer network), after the detector's run and in the same
publish; and a version stays one unit (``attributes.pt`` beside the detector's weights, its heads in the manifest's
``attributes``). A region-feature head would be cheaper at serve time (no second network), but it would be one per
family and framework, and it would share the detector's training and its loss balance. The project's classifier
family (``classifier_family``, torchvision's ImageNet networks) is not reused: at its resolution each crop would cost
tens of times more, and what attributes hold (a colour, a texture, a size) is local and small. The crop is the box
with ``CONTEXT`` of its size around it, squashed to a square; since a square crop loses the object's size, its
width and height in the frame (and their ratio) go in beside the pixels.

**Unsure is unset.** A value is returned only when its probability is at least ``MIN_CONFIDENCE`` (0.6) and the
head is *trusted*: on the validation frames it must have been right more often than always answering the value
most common in training (the majority-class peer) by more than chance would give (5 points, or two standard
errors of the peer's accuracy on that many shapes), or there was nothing to validate on. Otherwise the attribute is
left out of the detection, and CVAT shows the label's default value for it, as it does for a shape a person draws.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from preannotate.shapes import LEARNED_ATTRIBUTE_TYPES, TAG, AttributeSpec, Label, Shape

LEARNED_TYPES = LEARNED_ATTRIBUTE_TYPES
CHECKBOX_VALUES = ("false", "true")
MIN_CONFIDENCE = 0.6  # below this a value is left unset: a reviewer fixes a blank as fast as a wrong one, and a
# wrong one that looks right is missed
MARGIN = 0.05  # what a head must beat the majority-class peer by on the validation frames, at least, to be served
ATTRIBUTES_FILE = "attributes.pt"
CROP = 48        # the network's input side
STORED = 56      # crops are cut at this side: training takes random CROP windows of them (a shifted box), serving
#                  the middle one
BATCH = 256      # crops through the network at a time, when serving
CONTEXT = 0.15   # of the box's size on each side: what surrounds the object (a detector's box may be short of it)


def values_of(spec: AttributeSpec) -> tuple[str, ...]:
    """The values a head chooses among: a checkbox's false and true, a select's or radio's own."""
    return CHECKBOX_VALUES if spec.input_type == "checkbox" else tuple(spec.values)


def learnable(labels: Sequence[Label]) -> list[tuple[str, AttributeSpec]]:
    """``(label name, attribute)`` for each attribute a model learns (``LEARNED_TYPES`` with two values or more), in
    the labels' order."""
    return [(label.name, spec) for label in labels if label.type != TAG for spec in label.attributes
            if spec.input_type in LEARNED_TYPES and len(values_of(spec)) >= 2]


def left_to_people(labels: Sequence[Label]) -> list[tuple[str, AttributeSpec]]:
    """The attributes no model here fills (``number`` and ``text``, or a select of one value), for saying so."""
    learned = {(name, spec.name) for name, spec in learnable(labels)}
    return [(label.name, spec) for label in labels for spec in label.attributes
            if (label.name, spec.name) not in learned]


@dataclass
class Head:
    """One learned attribute of one label, and how it did on the validation frames (None: not validated)."""

    label: str
    name: str
    input_type: str
    values: list[str]
    accuracy: float | None = None   # right / true shapes of the label with a value, on validation crops of true boxes
    majority: float | None = None   # the same, always answering the value most common in training
    answered: float | None = None   # the share answered (probability >= MIN_CONFIDENCE)
    answered_accuracy: float | None = None  # right / answered
    shapes: int = 0                 # validation shapes it was judged on
    default: str = ""               # the value most common in training (the majority-class peer's answer)

    @property
    def key(self) -> str:
        return f"{self.label}/{self.name}"

    @property
    def trusted(self) -> bool:
        """Served: it beat the majority-class peer on the validation frames by more than chance would (``MARGIN``,
        or two standard errors of the peer's accuracy on that many shapes), or it had none to be judged on."""
        if self.accuracy is None:
            return True
        if self.majority is None:
            return False
        noise = 2 * math.sqrt(self.majority * (1 - self.majority) / max(self.shapes, 1))
        return self.accuracy >= self.majority + max(MARGIN, noise)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "trusted": self.trusted}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Head:
        return cls(**{key: data[key] for key in cls.__dataclass_fields__ if key in data})


class AttributeNet(torch.nn.Module):
    """Four convolutions over the crop, its box's geometry beside them, one linear head per attribute."""

    def __init__(self, head_sizes: Sequence[int], width: int = 16):
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> list[torch.nn.Module]:
            return [torch.nn.Conv2d(cin, cout, 3, stride, 1, bias=False), torch.nn.BatchNorm2d(cout),
                    torch.nn.ReLU(inplace=True)]

        self.trunk = torch.nn.Sequential(*block(3, width, 2), *block(width, 2 * width, 2),
                                         *block(2 * width, 4 * width, 2), *block(4 * width, 4 * width, 1),
                                         torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        self.scale = torch.nn.BatchNorm1d(GEOMETRY)  # shares of the frame and a log ratio, to the pixels' scale
        self.neck = torch.nn.Sequential(torch.nn.Linear(4 * width + GEOMETRY, 64), torch.nn.ReLU(inplace=True))
        self.heads = torch.nn.ModuleList(torch.nn.Linear(64, size) for size in head_sizes)

    def forward(self, crops: torch.Tensor, geometry: torch.Tensor) -> list[torch.Tensor]:
        """``crops``: ``N×3×CROP×CROP`` uint8 or float 0-255; ``geometry``: ``N×GEOMETRY`` → logits per head."""
        features = self.neck(torch.cat([self.trunk(crops.float() / 255.0 - 0.5), self.scale(geometry)], 1))
        return [head(features) for head in self.heads]


GEOMETRY = 4


def geometry(box: Sequence[float], width: int, height: int) -> list[float]:
    """What a square crop loses: the box's width and height in the frame, its area's root, its aspect (log)."""
    w, h = max(box[2] - box[0], 1.0), max(box[3] - box[1], 1.0)
    return [w / width, h / height, math.sqrt(w * h / (width * height)), math.log(w / h)]


def picture(image: Any) -> Image.Image:
    """An RGB image (PIL, or an ``HxWx3`` array) as the PIL image crops are cut from: converted once per frame."""
    return image.convert("RGB") if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))


def cut(image: Image.Image | np.ndarray, box: Sequence[float], side: int = STORED) -> np.ndarray:
    """The box with ``CONTEXT`` around it, squashed to ``side × side`` (outside the frame: black), ``3×side×side``."""
    image = image if isinstance(image, Image.Image) else picture(image)
    x1, y1, x2, y2 = box
    pad_x, pad_y = CONTEXT * max(x2 - x1, 1.0), CONTEXT * max(y2 - y1, 1.0)
    window = (x1 - pad_x, y1 - pad_y, x2 + pad_x, y2 + pad_y)
    inside = (max(0.0, window[0]), max(0.0, window[1]), min(float(image.width), window[2]),
              min(float(image.height), window[3]))
    out = np.zeros((side, side, 3), np.uint8)  # the window's part inside the frame, resized into its place
    scale_x, scale_y = side / (window[2] - window[0]), side / (window[3] - window[1])
    left, top = round((inside[0] - window[0]) * scale_x), round((inside[1] - window[1]) * scale_y)
    right, bottom = round((inside[2] - window[0]) * scale_x), round((inside[3] - window[1]) * scale_y)
    if right - left >= 1 and bottom - top >= 1 and inside[2] > inside[0] and inside[3] > inside[1]:
        out[top:bottom, left:right] = np.asarray(image.resize((right - left, bottom - top), Image.BILINEAR,
                                                              box=inside))
    return np.ascontiguousarray(out.transpose(2, 0, 1))


def middle(crops: torch.Tensor) -> torch.Tensor:
    """The ``CROP`` window in the middle of ``STORED`` crops (what serving and validation look at)."""
    start = (crops.shape[-1] - CROP) // 2
    return crops[..., start:start + CROP, start:start + CROP]


class AttributeModel:
    """The trained network and its heads: fills the attributes of detected shapes (``fill``)."""

    def __init__(self, net: AttributeNet, heads: Sequence[Head], min_confidence: float = MIN_CONFIDENCE):
        self.net, self.heads, self.min_confidence = net.eval(), list(heads), min_confidence
        self._heads_of: dict[str, list[int]] = {}
        for index, head in enumerate(self.heads):
            self._heads_of.setdefault(head.label, []).append(index)

    @property
    def metrics(self) -> dict[str, Any]:
        """What the manifest's metrics record: each head's validation figures (``label/name`` keys)."""
        return {head.key: head.to_dict() for head in self.heads}

    def probabilities(self, crops: torch.Tensor, geometries: torch.Tensor) -> list[np.ndarray]:
        """Per head, ``N × values`` probabilities of ``STORED`` crops."""
        chunks: list[list[np.ndarray]] = [[] for _ in self.heads]
        with torch.inference_mode():
            for start in range(0, len(crops), BATCH):  # a bounded batch: a frame may hold hundreds of detections
                logits = self.net(middle(crops[start:start + BATCH]), geometries[start:start + BATCH])
                for chunk, head_logits in zip(chunks, logits, strict=True):
                    chunk.append(head_logits.softmax(1).numpy())
        return [np.concatenate(chunk) if chunk else np.zeros((0, len(head.values)))
                for chunk, head in zip(chunks, self.heads, strict=True)]

    def fill(self, images: Sequence[Any], shapes: Sequence[list[Shape]]) -> None:
        """Set the learned attributes of every shape (of a label with heads) found on each image, in place: the
        values of trusted heads at ``min_confidence`` or more; the others are left unset."""
        wanted = [(i, shape) for i, found in enumerate(shapes) for shape in found
                  if shape.type != TAG and shape.label in self._heads_of]
        if not wanted:
            return
        pictures = {i: picture(images[i]) for i in {i for i, _ in wanted}}
        crops, geometries = [], []
        for i, shape in wanted:
            box = shape.bbox()
            crops.append(cut(pictures[i], box))
            geometries.append(geometry(box, *pictures[i].size))
        probabilities = self.probabilities(torch.from_numpy(np.stack(crops)),
                                           torch.tensor(geometries, dtype=torch.float32))
        for row, (_, shape) in enumerate(wanted):
            for index in self._heads_of[shape.label]:
                head = self.heads[index]
                best = int(probabilities[index][row].argmax())
                if head.trusted and probabilities[index][row][best] >= self.min_confidence:
                    shape.attributes[head.name] = head.values[best]

    def save(self, directory: Path) -> dict[str, Any]:
        """Write ``ATTRIBUTES_FILE`` into ``directory``; return what the manifest's ``attributes`` records."""
        torch.save(self.net.state_dict(), Path(directory) / ATTRIBUTES_FILE)
        return {"file": ATTRIBUTES_FILE, "mechanism": "crop classifier", "min_confidence": self.min_confidence,
                "heads": [head.to_dict() for head in self.heads]}

    @classmethod
    def load(cls, directory: Path, recorded: Mapping[str, Any]) -> AttributeModel:
        """The model a version's manifest records (``save``'s answer) from its directory."""
        heads = [Head.from_dict(head) for head in recorded["heads"]]
        net = AttributeNet([len(head.values) for head in heads])
        net.load_state_dict(torch.load(Path(directory) / recorded.get("file", ATTRIBUTES_FILE), map_location="cpu",
                                       weights_only=True))
        return cls(net, heads, float(recorded.get("min_confidence", MIN_CONFIDENCE)))


class AttributedDetector:
    """A ``Detector`` whose detections carry their learned attributes: every door (``detect``, ``detect_scored``)
    goes through ``fill``; everything else is the detector's own (read and set through to it)."""

    def __init__(self, detector: Any, attribute_model: AttributeModel):
        object.__setattr__(self, "detector", detector)
        object.__setattr__(self, "attribute_model", attribute_model)

    def __getattr__(self, name: str) -> Any:
        return getattr(object.__getattribute__(self, "detector"), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.detector, name, value)

    def detect(self, images: Sequence[Any], threshold: float) -> list[list[Shape]]:
        shapes = self.detector.detect(images, threshold)
        self.attribute_model.fill(images, shapes)
        return shapes

    def detect_scored(self, images: Sequence[Any], threshold: float) -> list[tuple[list[Shape], float]]:
        scored = self.detector.detect_scored(images, threshold)
        self.attribute_model.fill(images, [shapes for shapes, _ in scored])
        return scored
