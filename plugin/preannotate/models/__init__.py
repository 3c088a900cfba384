"""Models: the registry, the families that build and run them, and published artifacts.

Everything else speaks to models through three calls: ``create_detector`` (a new model for some labels),
``save_artifact`` (weights + manifest into a directory) and ``load_detector`` (an artifact back, nothing else
needed); what they return is a ``Detector`` (``models.family``: ``detect``, ``detect_scored``, ``appearance``,
``labels``, ``manifest``). What a user names a model by, and the store's default, is ``reference``; what a model
family knows about its own internals (which layers to freeze when training) is asked through ``family_of``, whose
answer is a ``ModelFamily``.
"""

from __future__ import annotations

import dataclasses
import importlib
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from preannotate.hyperparameters import Hyperparameters
from preannotate.models import runtime as runtimes
from preannotate.models.artifact import Manifest, ModelNotFound, ModelStore, library_versions, now_iso
from preannotate.models.family import Detector, ModelFamily
from preannotate.models.reference import DEFAULT_STORE, ModelReference, default_store, open_store
from preannotate.models.registry import (
    ARCHITECTURES,
    Architecture,
    PretrainedWeightsUnavailable,
    default_hyperparameters,
    get_architecture,
    hyperparameters_for,
)
from preannotate.shapes import Label, Shape, parse_label_list, served_outlines
from preannotate.suggest import did_you_mean

__all__ = ["ARCHITECTURES", "DEFAULT_STORE", "Architecture", "Detector", "Manifest", "ModelFamily", "ModelNotFound",
           "ModelReference", "ModelStore", "PretrainedWeightsUnavailable", "UnsupportedLabels", "architecture_of",
           "check_label_types", "create_detector", "declared_labels", "default_hyperparameters", "default_store",
           "detect_served", "family_of", "get_architecture", "hyperparameters_for", "load_detector", "load_model",
           "manifest_hyperparameters", "open_store", "publish_detector", "save_artifact"]


class UnsupportedLabels(ValueError):
    """Labels of a type the model can never produce (points for a box detector, say)."""


def family_of(arch: Architecture) -> ModelFamily:
    """The module that builds, runs and trains models of ``arch`` (``preannotate.models.<family>_family``)."""
    return cast(ModelFamily, importlib.import_module(f"preannotate.models.{arch.family}_family"))


def declared_labels(arch: Architecture, text: str) -> list[Label]:
    """The labels a person declares for a model, ``"car,person"`` or ``"car:rectangle,person"``: an untyped one
    takes the type the model fills (its output: ``rectangle`` for boxes, ``mask``, ``tag`` for a classifier), as a
    project's labels do in a deployed function's spec; a type it can never fill is ``UnsupportedLabels``. ``arch``
    as the hyperparameters compose it (``Architecture.resolved``)."""
    labels = parse_label_list(text, default_type=arch.output)
    check_label_types(arch, labels)
    return labels


def check_label_types(arch: Architecture, labels: Sequence[Label]) -> None:
    """``UnsupportedLabels`` naming every label whose CVAT type the model's output can never fill (for labels a
    person declares; training learns boxes from any outline, so it does not ask). ``arch`` as the hyperparameters
    compose it (``Architecture.resolved``): a composed model with the Mask R-CNN head fills mask labels."""
    wrong = [label for label in labels if label.type not in arch.label_types]
    if wrong:
        listed = ", ".join(f"{label.name} ({label.type})" for label in wrong)
        output = {"rectangle": "boxes", "mask": "masks", "tag": "frame tags", "skeleton": "keypoints"}[arch.output]
        raise UnsupportedLabels(f"{arch.name} predicts {output}: it cannot fill {listed}; its labels may be "
                                f"{', '.join(arch.label_types)}")


def create_detector(architecture: str, labels: Sequence[Label] | None = None, init: str | None = None,
                    hyperparameters: Hyperparameters | dict[str, Any] | str | None = None,
                    previous: Path | None = None, device: str | None = None) -> Detector:
    """A new detector of ``architecture`` for ``labels`` (COCO's when pretrained and none given).

    ``init`` (default: the hyperparameters' ``init``, ``random`` when they do not give one): ``random``,
    ``pretrained`` (the registry's torchvision weights: COCO's, or ImageNet's for a classifier) or ``previous``
    (the weights of the artifact at ``previous``; heads for a changed label set start fresh). The manifest records
    the init used."""
    arch = get_architecture(architecture)
    family = family_of(arch)
    hp = hyperparameters_for(architecture, hyperparameters)
    init = init or (hp.recipe.init if "init" in hp.given else "random")
    if hp.recipe.init != init:
        hp = hp.updated({"init": init})
    if labels is None:
        if init != "pretrained":
            raise ValueError("labels are needed unless the model starts from pretrained weights (COCO's, ImageNet's)")
        labels = family.pretrained_labels(arch)
    labels = [label if label.id is not None else dataclasses.replace(label, id=i)
              for i, label in enumerate(labels, start=1)]
    state = None
    if init == "previous":
        if previous is None:
            raise ValueError("init=previous needs the model to start from: init-from=NAME[@VERSION] (or "
                             "--from-model NAME[@VERSION])")
        previous_manifest = Manifest.read(previous)
        state = family.read_weights(Path(previous) / previous_manifest.weights)
    detector = family.create(arch, labels, hp, init=init, state=state, device=device)
    detector.manifest = Manifest(
        architecture=arch.name, labels=list(labels), framework=arch.framework,
        weights=family.WEIGHTS_FILE,
        input_size={key: hp.value(key) for key in ("image_size", "max_image_size", "letterbox")},
        hyperparameters=hp.to_dict(), score_threshold=hp.post.score_threshold,
        provenance={"init": init, **({"previous": str(previous)} if previous else {})},
        libraries=library_versions(), runtime=runtimes.EAGER.get(arch.framework, arch.framework))
    if arch.resolved(hp).output == "mask":  # by the labels' types until training sees their shapes (training.runs)
        detector.manifest.outlines = served_outlines(labels, [])
    return detector


def manifest_hyperparameters(manifest: Manifest) -> Hyperparameters:
    """The hyperparameters a published model was made with, its input geometry as the manifest records it."""
    hp = Hyperparameters.from_dict(manifest.hyperparameters)
    size = manifest.input_size
    return hp.replaced(image_size=size.get("image_size"), max_image_size=size.get("max_image_size"),
                       letterbox=bool(size.get("letterbox")))


def architecture_of(manifest: Manifest) -> Architecture:
    """The architecture of a published model, as its hyperparameters compose it (what it returns)."""
    return get_architecture(manifest.architecture).resolved(Hyperparameters.from_dict(manifest.hyperparameters))


def save_artifact(detector: Detector, directory: Path, files: Sequence[Path] = ()) -> Manifest:
    """Write the detector's weights and manifest into ``directory``, with copies of ``files`` (its training
    report) that the manifest lists; return the manifest written."""
    family = family_of(get_architecture(detector.manifest.architecture))
    family.write_weights(detector, Path(directory) / detector.manifest.weights)
    attribute_model = getattr(detector, "attribute_model", None)  # models.attributes.AttributedDetector
    if attribute_model is not None:
        detector.manifest.attributes = attribute_model.save(Path(directory))
    for file in files:
        shutil.copyfile(file, Path(directory) / Path(file).name)
    detector.manifest.report = [Path(file).name for file in files]
    detector.manifest.created = detector.manifest.created or now_iso()
    detector.manifest.write(Path(directory))
    return detector.manifest


def publish_detector(detector: Detector, store: ModelStore, name: str, promote: bool = True,
                     files: Sequence[Path] = ()) -> int:
    """Publish the detector (with ``files``, see ``save_artifact``) as the next version of ``name`` in ``store``;
    returns the version number. With ``promote=False`` it is kept without replacing the version being served."""
    return store.publish(name, lambda directory: save_artifact(detector, directory, files), promote=promote)


def detect_served(detector: Detector, images: Sequence[Any], threshold: float | None = None) -> list[list[Shape]]:
    """What every door answers: the shapes on each image scoring ``threshold`` or more when someone asks for one
    (CVAT's menu, ``--threshold``, ``--conf-threshold``: it replaces the served ones, for every label), else each
    label's served threshold (``Manifest.threshold_of``)."""
    if threshold is not None:
        return detector.detect(images, threshold)
    manifest = detector.manifest
    return [manifest.served(shapes) for shapes in detector.detect(images, manifest.lowest_threshold())]


def load_detector(directory: str | Path, device: str | None = None, runtime: str | None = None) -> Detector:
    """Load a published artifact: only its directory is needed. ``runtime`` (default ``PREANNOTATE_RUNTIME``, else
    ``auto``) says what runs its network (``models.runtime``); the manifest's ``runtime`` says what does."""
    manifest = Manifest.read(Path(directory))
    arch = get_architecture(manifest.architecture)
    family = family_of(arch)
    detector = family.load(arch, manifest.labels, Path(directory) / manifest.weights,
                           manifest_hyperparameters(manifest), device=device)
    detector.manifest = manifest
    manifest.runtime = runtimes.use(detector, family, Path(directory), runtime)
    if manifest.attributes:  # its detections carry the attributes it learned
        from preannotate.models.attributes import AttributedDetector, AttributeModel

        detector = AttributedDetector(detector, AttributeModel.load(Path(directory), manifest.attributes))
    return detector


def load_model(reference: str | ModelReference, store: ModelStore | str | Path | None = None,
               device: str | None = None, version: int | None = None, runtime: str | None = None) -> Detector:
    """The detector a reference names (``models.reference``: an artifact directory, ``NAME``, ``NAME@VERSION``, or
    an architecture's pretrained weights while nothing is published under its name); ``version`` overrides the
    store's choice; ``runtime`` as ``load_detector`` takes it (pretrained weights outside a store run in their
    framework: there is no version to keep the exported graph beside). ``ModelNotFound`` says what the store holds
    instead."""
    reference = reference if isinstance(reference, ModelReference) else ModelReference.parse(reference)
    if reference.path is not None:
        return load_detector(reference.path, device, runtime)
    root = store.root if isinstance(store, ModelStore) else Path(store or default_store())
    if not root.is_dir() and reference.architecture and reference.version is None and version is None:
        return create_detector(reference.architecture, init="pretrained", device=device)  # no store needed
    store = store if isinstance(store, ModelStore) else open_store(root)
    if version is None:
        version = reference.wanted_version(store)
    if version is not None:
        return load_detector(store.resolve(f"{reference.name}@{version}"), device, runtime)
    if reference.architecture:
        return create_detector(reference.architecture, init="pretrained", device=device)
    known = ", ".join(store.names()) or "none"
    raise ModelNotFound(f"model {reference.name!r} has no published version in {store.root} yet"
                        f"{did_you_mean(reference.name, store.names())}; models there: {known}")
