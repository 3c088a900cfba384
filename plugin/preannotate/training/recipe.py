"""The one training recipe — load → split → train (validating) → publish → promote — for ``preannotate train``, a
function's training jobs and the demo alike.

Loading is ``export_from_cvat`` (``cvat.export.export_finished``: CVAT tasks exported once into a folder that
training reads, so a resumed run never reads the server again) or a folder the user exported;
``TrainingData.from_folder`` splits it.

The hyperparameters arrive parsed once (``models.hyperparameters_for``); their ``val-fraction`` and ``seed`` split
the data, and the same object goes on to the trainer. Whether the new version is served is ``should_promote``:

* ``always`` / ``never``: as asked;
* ``auto`` (the default): the first version is served; a scored version is served unless it scores below the
  version served now (COCO mAP on its own validation frames); an *unscored* version (it had no validation frames)
  is never served over a scored one, and when it is served the reason says it was not scored.
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from preannotate.cvat.export import NothingFinished as NothingFinished  # raised by export_from_cvat
from preannotate.cvat.export import cvat_provenance as cvat_provenance  # what it learned from, for the manifest
from preannotate.cvat.export import export_finished
from preannotate.formats.dataset import training_split
from preannotate.hyperparameters import Hyperparameters
from preannotate.models import Manifest, ModelStore, get_architecture
from preannotate.shapes import Label
from preannotate.training.evaluation import headline, headline_name
from preannotate.training.runs import Promotion, TrainingResult

if TYPE_CHECKING:
    from preannotate.training import data

log = logging.getLogger(__name__)

PROMOTE_CHOICES = ("auto", "always", "never")


@dataclass
class TrainingData:
    """Labels, training frames and validation frames, as the trainer takes them."""

    labels: list[Label]
    train: list[data.Item]
    val: list[data.Item]

    @classmethod
    def from_folder(cls, path: str | Path, hp: Hyperparameters) -> TrainingData:
        """A dataset folder (``preannotate export``, or a job's export): its ``val`` split, or ``val-fraction`` of
        its frames held out by the ``seed``."""
        labels, train_items, val_items = training_split(path, hp.val_fraction, hp.seed)
        return cls(labels, train_items, val_items)


def should_promote(policy: str, metrics: dict[str, Any], serving: Manifest | None) -> Promotion:
    """Whether a version scoring ``metrics`` is served instead of ``serving`` (see the module docstring)."""
    if policy not in PROMOTE_CHOICES:
        raise ValueError(f"promote must be one of {', '.join(PROMOTE_CHOICES)}, not {policy!r}")
    new = headline(metrics)
    old = headline(serving.metrics) if serving is not None else None
    name = headline_name(metrics)
    served_now = f"{serving.name}@{serving.version}" if serving is not None else ""
    if policy == "always":
        return Promotion(True, "served (promote=always)")
    if policy == "never":
        return Promotion(False, "kept, not served (promote=never)")
    if serving is None:
        return Promotion(True, "served: the first version" + ("" if new is not None else
                                                               ", not scored (it had no validation frames)"))
    if new is None:
        if old is not None:
            return Promotion(False, f"kept, not served: it was not scored (no validation frames), and {served_now} "
                                    f"scored {name} {old:.3f}")
        return Promotion(True, "served, not scored (no validation frames), as the version before it")
    if old is None:
        return Promotion(True, f"served: {name} {new:.3f}, where {served_now} was not scored")
    if new >= old:
        return Promotion(True, f"served: {name} {new:.3f} >= {old:.3f} of {served_now}")
    return Promotion(False, f"kept, not served: {name} {new:.3f} < {old:.3f} of {served_now}, which stays served")


def trainer_for(architecture: str):
    """The ``train`` of the architecture's framework: ``training.trainer`` (torch) or ``training.keras_trainer``
    (TensorFlow), imported on use, so a run loads only its own framework."""
    module = "keras_trainer" if get_architecture(architecture).framework == "tensorflow" else "trainer"
    return importlib.import_module(f"preannotate.training.{module}").train


def train_and_publish(training_data: TrainingData, *, architecture: str, hyperparameters: Hyperparameters,
                      store: ModelStore, name: str, output_dir: str | Path, previous: Path | None = None,
                      provenance: dict[str, Any] | None = None, promote: str = "auto", device: str | None = None,
                      progress: bool = True, stop: threading.Event | None = None, workers: int | None = None,
                      restart: bool = False) -> TrainingResult:
    """Train on ``training_data``, publish the best validation as the next version of ``name`` in ``store``, and
    serve it if ``should_promote`` says so (``result.served``, ``result.promotion``)."""
    serving_version = store.serving(name)
    serving = Manifest.read(store.path(name, serving_version)) if serving_version is not None else None
    train = trainer_for(architecture)
    return train(architecture, training_data.labels, training_data.train, training_data.val, output_dir,
                 store=store, name=name, hyperparameters=hyperparameters, previous=previous,
                 provenance=provenance, device=device, progress=progress, stop=stop, workers=workers,
                 restart=restart, promote=lambda metrics: should_promote(promote, metrics, serving))


def dataset_format(architecture: str) -> str:
    """What a model learns from on disk: a classifier its frames' tags (an ImageNet-style folder), a detector COCO."""
    return "imagenet" if get_architecture(architecture).output == "tag" else "coco"


def export_from_cvat(client, request: Mapping[str, Any], directory: Path, hp: Hyperparameters,
                     fmt: str = "coco") -> Path:
    """The frames people finished (``hp.train_on``) of the CVAT tasks a request names, exported once into
    ``directory`` as a ``fmt`` folder (``dataset_format``) split by ``hp``: ``cvat.export.export_finished``."""
    return export_finished(client, request, directory, fmt, train_on=hp.train_on, val_fraction=hp.val_fraction,
                           seed=hp.seed)
