"""The one training recipe — load → split → train (validating) → publish → promote — for ``preannotate train``, a
function's training jobs and the demo alike: ``train_model`` from what a user names (a folder, or CVAT tasks).

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

import logging
import threading
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
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
from preannotate.training.loop import train
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
        labels, train_items, val_items = training_split(path, hp.sources.val_fraction, hp.recipe.seed)
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


def train_and_publish(training_data: TrainingData, *, architecture: str, hyperparameters: Hyperparameters,
                      store: ModelStore, name: str, output_dir: str | Path, previous: Path | None = None,
                      provenance: dict[str, Any] | None = None, promote: str = "auto", device: str | None = None,
                      progress: bool = True, stop: threading.Event | None = None, workers: int | None = None,
                      restart: bool = False) -> TrainingResult:
    """Train on ``training_data``, publish the best validation as the next version of ``name`` in ``store``, and
    serve it if ``should_promote`` says so (``result.served``, ``result.promotion``)."""
    serving_version = store.serving(name)
    serving = Manifest.read(store.path(name, serving_version)) if serving_version is not None else None
    return train(architecture, training_data.labels, training_data.train, training_data.val, output_dir,
                 store=store, name=name, hyperparameters=hyperparameters, previous=previous,
                 provenance=provenance, device=device, progress=progress, stop=stop, workers=workers,
                 restart=restart, promote=lambda metrics: should_promote(promote, metrics, serving))


def train_model(architecture: str, hp: Hyperparameters, *, store: ModelStore, name: str, output_dir: Path,
                data: Path | None = None, request: Mapping[str, Any] | None = None,
                connect: Callable[[], AbstractContextManager] | None = None, dataset_dir: Path | None = None,
                from_model: str | None = None, promote: str = "auto", provenance: dict[str, Any] | None = None,
                device: str | None = None, progress: bool = True, stop: threading.Event | None = None,
                restart: bool = False, announce: Callable[[str], None] = log.info) -> TrainingResult:
    """The whole recipe from what a user names: the dataset folder ``data``, or the CVAT tasks of ``request``
    (``tasks`` / ``project``; a client from ``connect()``) exported once into ``dataset_dir`` (default
    ``output_dir/dataset``); trained into ``output_dir`` and published as the next version of ``name``.
    ``from_model`` (or ``init-from``) is the store's model to start from, resolved before anything is read.
    ``announce`` says what is about to be trained. Raises ``NothingFinished`` when CVAT has nothing finished to
    learn from, and what ``loop.train`` raises."""
    source = from_model or hp.recipe.init_from  # any model of the store: a typo fails before CVAT is read
    previous = store.resolve(source) if source else None
    if data is None:
        with connect() as client:
            data = export_from_cvat(client, request, dataset_dir or output_dir / "dataset", hp,
                                    dataset_format(architecture))
    training_data = TrainingData.from_folder(data, hp)
    count = len(training_data.train)
    announce(f"training {architecture} on {count} frame{'' if count == 1 else 's'}, validating on "
             f"{len(training_data.val)}; output in {output_dir}")
    return train_and_publish(training_data, architecture=architecture, hyperparameters=hp, store=store, name=name,
                             output_dir=output_dir, previous=previous,
                             provenance={**cvat_provenance(data), **(provenance or {})}, promote=promote,
                             device=device, progress=progress, stop=stop, restart=restart)


def dataset_format(architecture: str) -> str:
    """What a model learns from on disk: a classifier its frames' tags (an ImageNet-style folder), a detector COCO."""
    return "imagenet" if get_architecture(architecture).output == "tag" else "coco"


def export_from_cvat(client, request: Mapping[str, Any], directory: Path, hp: Hyperparameters,
                     fmt: str = "coco") -> Path:
    """The frames people finished (``hp.sources.train_on``) of the CVAT tasks a request names, exported once into
    ``directory`` as a ``fmt`` folder (``dataset_format``) split by ``hp``: ``cvat.export.export_finished``."""
    return export_finished(client, request, directory, fmt, train_on=hp.sources.train_on,
                           val_fraction=hp.sources.val_fraction, seed=hp.recipe.seed)
