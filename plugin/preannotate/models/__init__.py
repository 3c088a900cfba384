"""Models: the registry, the families that build and run them, and published artifacts.

Everything else speaks to models through three calls: ``create_detector`` (a new model for some labels),
``save_artifact`` (weights + manifest into a directory) and ``load_detector`` (an artifact back, nothing else
needed). A detector has ``labels``, ``manifest`` and ``detect(images, threshold) -> list[list[Shape]]``.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from preannotate.models.artifact import Manifest, ModelNotFound, ModelStore, library_versions, now_iso
from preannotate.models.registry import ARCHITECTURES, Architecture, default_hyperparameters, get_architecture
from preannotate.shapes import Label, Shape

__all__ = ["ARCHITECTURES", "Architecture", "Detector", "Manifest", "ModelNotFound", "ModelStore",
           "create_detector", "default_hyperparameters", "get_architecture", "load_detector", "publish_detector",
           "save_artifact"]


class Detector(Protocol):
    labels: list[Label]
    manifest: Manifest

    def detect(self, images: Sequence[Any], threshold: float) -> list[list[Shape]]: ...


def _family(arch: Architecture):
    return importlib.import_module(f"preannotate.models.{arch.family}_family")


def create_detector(architecture: str, labels: Sequence[Label] | None = None, init: str = "random",
                    hyperparameters: dict[str, Any] | None = None, previous: Path | None = None,
                    device: str | None = None) -> Detector:
    """A new detector of ``architecture`` for ``labels`` (COCO's when pretrained and none given).

    ``init``: ``random``, ``pretrained`` (the registry's torchvision weights) or ``previous`` (the weights of the
    artifact at ``previous``; heads for a changed label set start fresh)."""
    arch = get_architecture(architecture)
    family = _family(arch)
    hp = default_hyperparameters(architecture).updated(hyperparameters or {})
    if labels is None:
        if init != "pretrained":
            raise ValueError("labels are needed unless the model starts from COCO-pretrained weights")
        labels = family.coco_labels(arch)
    labels = [label if label.id is not None else Label(label.name, label.type, label.attributes, i)
              for i, label in enumerate(labels, start=1)]
    state = None
    if init == "previous":
        if previous is None:
            raise ValueError("init=previous needs the previous model (--from-model NAME[@VERSION])")
        previous_manifest = Manifest.read(previous)
        state = family.read_weights(Path(previous) / previous_manifest.weights)
    detector = family.create(arch, labels, init=init, image_size=hp.image_size, max_image_size=hp.max_image_size,
                             state=state, device=device, letterbox=hp.letterbox)
    detector.manifest = Manifest(
        architecture=arch.name, labels=list(labels), framework=arch.family,
        input_size={"image_size": hp.image_size, "max_image_size": hp.max_image_size, "letterbox": hp.letterbox},
        hyperparameters=hp.to_dict(), score_threshold=hp.score_threshold,
        provenance={"init": init, **({"previous": str(previous)} if previous else {})},
        libraries=library_versions())
    return detector


def save_artifact(detector: Detector, directory: Path) -> Manifest:
    """Write the detector's weights and manifest into ``directory``; return the manifest written."""
    family = _family(get_architecture(detector.manifest.architecture))
    family.write_weights(detector, Path(directory) / detector.manifest.weights)
    detector.manifest.created = detector.manifest.created or now_iso()
    detector.manifest.write(Path(directory))
    return detector.manifest


def publish_detector(detector: Detector, store: ModelStore, name: str, promote: bool = True) -> int:
    """Publish the detector as the next version of ``name`` in ``store``; returns the version number. With
    ``promote=False`` it is kept without replacing the version being served."""
    return store.publish(name, lambda directory: save_artifact(detector, directory), promote=promote)


def load_detector(directory: str | Path, device: str | None = None) -> Detector:
    """Load a published artifact: only its directory is needed."""
    manifest = Manifest.read(Path(directory))
    arch = get_architecture(manifest.architecture)
    detector = _family(arch).load(arch, manifest.labels, Path(directory) / manifest.weights,
                                  image_size=manifest.input_size.get("image_size"),
                                  max_image_size=manifest.input_size.get("max_image_size"), device=device,
                                  letterbox=bool(manifest.input_size.get("letterbox")))
    detector.manifest = manifest
    return detector
