"""The written contracts of the models layer, where model code plugs in.

* ``ModelFamily`` — a module ``preannotate.models.<family>_family`` that builds, loads, saves and freezes the models of
  the registry's architectures naming it (``Architecture.family``). A module is the implementation (PEP 544: modules
  satisfy protocols); ``tests/test_models.py`` checks every registered family against this one, member by member.
* ``Detector`` — a loaded model: what serving, pre-annotation, evaluation, the report and training ask of it,
  whatever its framework and whatever it returns (boxes, masks, tags).
* ``ConvertibleFamily`` — what a family adds when its detectors can run their network's exported graph through
  another runtime (``models.runtime``: OpenVINO, ONNX Runtime); a family without it runs in its framework.

Adding a family is one module that provides every member of ``ModelFamily`` and one registry entry per architecture
(``models.registry.ARCHITECTURES``: its ``family``, ``framework`` and defaults); nothing else names families.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from preannotate.hyperparameters import Hyperparameters
from preannotate.shapes import Label, Shape

if TYPE_CHECKING:
    import numpy as np

    from preannotate.models.artifact import Manifest
    from preannotate.models.registry import Architecture


# A network's exported graph compiled by another runtime (``models.runtime``): images in (laid out as the graph
# takes them), its outputs by name out.
Graph = Callable[["np.ndarray"], dict[str, "np.ndarray"]]


@runtime_checkable
class Detector(Protocol):
    """A model ready to use. ``images`` are RGB ``HxWx3`` uint8 arrays (or PIL images); shapes come back in each
    image's own pixel coordinates, with ``score`` and ``source="auto"``."""

    labels: list[Label]          # what it predicts; ``Label.id`` is the model's class index
    manifest: Manifest           # what it is, was made with and learned from (set by ``create_detector``/``load``)
    model: Any                   # the framework's network: what the trainer steps and the family saves
    familiar: np.ndarray | None  # the appearance of a sample of its training frames (None: nothing to compare)

    def detect(self, images: Sequence[Any], threshold: float) -> list[list[Shape]]:
        """The shapes found on each image scoring at least ``threshold``."""

    def detect_scored(self, images: Sequence[Any], threshold: float) -> list[tuple[list[Shape], float]]:
        """``detect``, with how unfamiliar each image is beside the training frames (``uncertainty.novelty``: 0 is
        like them; always 0 for a model without ``familiar``): what ranks frames for review."""

    def appearance(self, images: Sequence[Any], depth: str | None = None) -> np.ndarray | None:
        """One vector per image: its depths (``early``, ``middle``, ``deep``) side by side, as ``familiar`` holds the
        training frames', or the one ``depth`` named; None for a model that has none."""


@runtime_checkable
class ModelFamily(Protocol):
    """What a family module provides. ``arch`` is the registry's entry; ``hp`` the parsed hyperparameters (input
    geometry, post-processing, network knobs, a designer's composition)."""

    WEIGHTS_FILE: str  # the file of a published version holding the weights (``model.pt``, ``model.keras``)

    def create(self, arch: Architecture, labels: Sequence[Label], hp: Hyperparameters, init: str = "random",
               state: Any = None, device: str | None = None) -> Detector:
        """A new model for ``labels``: ``init`` random, pretrained (the registry's weights; heads for other labels
        start fresh) or previous (``state``: what ``read_weights`` returned, matched where names and shapes
        agree)."""

    def load(self, arch: Architecture, labels: Sequence[Label], weights_path: Path, hp: Hyperparameters,
             device: str | None = None) -> Detector:
        """A published model from its weights file, nothing downloaded."""

    def read_weights(self, path: Path) -> Any:
        """A published model's weights as ``create(state=...)`` takes them."""

    def write_weights(self, detector: Detector, path: Path) -> None:
        """Save the detector's weights to ``path`` (``WEIGHTS_FILE`` of a version being published)."""

    def pretrained_labels(self, arch: Architecture) -> list[Label]:
        """The labels of the pretrained weights (COCO's for a detector, ImageNet's for a classifier);
        ``PretrainedWeightsUnavailable`` when the architecture has only a pretrained backbone."""

    def fetch_pretrained(self, arch: Architecture) -> Path:
        """Put the pretrained weights into the framework's cache (the build step of a function image) and return
        where they are; ``PretrainedWeightsUnavailable`` when they cannot be fetched."""

    def freeze_backbone(self, model: Any, trainable_layers: int | None, init: str) -> list[Any]:
        """Freeze all but the last ``trainable_layers`` backbone stages (None: the family's default for ``init``);
        returns the layers whose statistics must stay frozen (kept in inference mode while training)."""


@runtime_checkable
class ConvertibleFamily(Protocol):
    """A family whose detectors can run converted: ``export_graph`` writes the part of the network that runs on the
    prepared batch (what the framework would run eagerly) as a file another runtime reads, and the detector's
    ``run_converted`` (``ConvertedDetector``) runs that graph, compiled, in its place; everything around it (resize,
    anchors, decoding, NMS) stays the family's own code. ``models.runtime`` decides when, exports once per version
    and compiles."""

    GRAPH_FILE: str                # the exported graph's file beside a version's weights (``model.onnx``)
    CONVERTS_TO: tuple[str, ...]   # the runtimes that read it (``openvino``, ``onnxruntime``)

    def convertible(self, detector: Detector) -> bool:
        """Whether this detector's network can be exported (not every model of the family need be)."""

    def export_graph(self, detector: Detector, path: Path) -> None:
        """Write the exported graph to ``path`` (and any file it reads, beside it)."""


class ConvertedDetector(Detector, Protocol):
    """A detector of a ``ConvertibleFamily``: what ``models.runtime`` hands the compiled graph to."""

    def run_converted(self, graph: Graph) -> None:
        """Detect through ``graph`` (images in, the graph's outputs by name out) from now on; ``model`` stays the
        framework's whole network (what training steps and publishing saves)."""
