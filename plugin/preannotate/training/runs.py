"""The vocabulary of a training run, whatever its framework: the result and its promotion, the budget fitted to
the data, the state a checkpoint restores, the claim on an output directory, the logs and progress a person follows,
and publishing the best weights as the next version. ``training.loop`` is the run; nothing here imports a framework.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from preannotate.files import write_atomically
from preannotate.frames import frame_ranges
from preannotate.hyperparameters import HyperparameterError, Hyperparameters
from preannotate.models import (
    Manifest,
    ModelStore,
    default_hyperparameters,
    get_architecture,
    hyperparameters_for,
    publish_detector,
)
from preannotate.models.artifact import library_versions
from preannotate.shapes import LEARNED_ATTRIBUTE_TYPES, TAG, Label, Shape, served_outlines
from preannotate.training import edits
from preannotate.training.evaluation import headline, sample_detections, summary
from preannotate.training.logs import EventWriter, MetricsLog

log = logging.getLogger(__name__)

# Small-data scaling of the registry's step budgets (made for datasets of thousands of frames).
SMALL_DATA_EPOCHS = 100
MIN_DEFAULT_STEPS = 300
CALIBRATION_FRAMES = 96  # training frames that re-measure batch-norm statistics before each validation
PROGRESS_LINES = 20      # lines a run prints when its output is not a terminal (besides one per validation)
FAMILIAR_FRAMES = 200      # training frames whose appearance is published, for the novelty of new frames


class TrainingInterrupted(RuntimeError):
    """Stopped by a signal or the ``stop`` event; ``checkpoint`` resumes it."""

    def __init__(self, step: int, checkpoint: Path):
        super().__init__(f"training stopped at step {step}; checkpoint {checkpoint} (run again to resume)")
        self.step, self.checkpoint = step, checkpoint


class RunMismatch(ValueError):
    """The output directory holds a different run."""


@dataclass
class Promotion:
    """Whether a newly published version is served, and the sentence that says why."""

    served: bool
    reason: str


@dataclass
class TrainingResult:
    name: str
    version: int | None       # None when nothing was published (no store given)
    path: Path | None         # the published version's directory
    metrics: dict[str, Any]   # those of the published weights (best validation), see ``evaluation``
    steps: int                # optimizer steps trained
    stopped: str              # "completed", "early-stopping" or "time-limit"
    output_dir: Path
    served: bool | None = None  # whether the published version is the one served now
    promotion: str = ""       # why it is served or kept unserved
    report: list[Path] = field(default_factory=list)  # the run's pictures (training.report), copied into the version

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "path": str(self.path) if self.path else None,
                "output_dir": str(self.output_dir), "report": [str(path) for path in self.report]}


def effective_hyperparameters(architecture: str, hyperparameters: Hyperparameters | dict[str, Any] | str | None,
                              train_frames: int, previous: bool = False) -> Hyperparameters:
    """The hyperparameters of a run: the user's (``models.hyperparameters_for``: the architecture's defaults under
    what the user gave) with what the user did not give fitted to ``train_frames``.

    The registry's budgets are made for thousands of frames. A batch never exceeds the data; without
    ``num-steps`` or ``epochs`` the budget is at most ``SMALL_DATA_EPOCHS`` epochs (at least ``MIN_DEFAULT_STEPS``
    steps); and whenever the run is shorter or longer than the recipe's, the warm-up and schedule boundaries the
    user did not set keep their share of it (SSD's 500 warm-up steps of 15,000 become 10 of 300). Given a
    ``previous`` version to start from, ``init`` defaults to ``previous``."""
    hp = hyperparameters_for(architecture, hyperparameters)
    given, recipe = hp.given, hp.recipe
    registry_steps = default_hyperparameters(architecture, recipe.init).recipe.num_steps
    changes: dict[str, Any] = {}
    if previous and "init" not in given:
        changes["init"] = "previous"
    smallest = get_architecture(architecture).min_batch_size
    if "batch_size" not in given and recipe.batch_size > max(2, train_frames):
        changes["batch_size"] = max(2, smallest, train_frames)  # two at least: a batch norm needs two images
    if "stage_3_epochs" in given and not given & {"num_steps", "epochs"}:
        given = given | {"epochs"}  # the last stage's end is the run's
        changes["epochs"] = recipe.stage_3_epochs
    if "epochs" in given and "num_steps" not in given:
        changes["num_steps"] = None  # the user's epochs, not the registry's step budget
    elif not given & {"num_steps", "epochs"} and recipe.num_steps:
        per_epoch = math.ceil(train_frames / (changes.get("batch_size", recipe.batch_size) * recipe.num_clones))
        changes["num_steps"] = min(recipe.num_steps, max(MIN_DEFAULT_STEPS, SMALL_DATA_EPOCHS * per_epoch))
    hp = hp.replaced(**changes)
    recipe = hp.recipe
    total = recipe.total_steps(train_frames)
    if registry_steps and total != registry_steps:
        scale = total / registry_steps
        scaled: dict[str, Any] = {}
        if "warmup_steps" not in given:
            scaled["warmup_steps"] = round(recipe.warmup_steps * scale)
        if "schedule_steps" not in given:
            scaled["schedule_steps"] = [max(1, round(s * scale)) for s in recipe.schedule_steps]
        if "schedule_step_size" not in given and recipe.schedule_step_size:
            scaled["schedule_step_size"] = max(1, round(recipe.schedule_step_size * scale))
        hp = hp.replaced(**scaled)
    return hp


def tag_labels(labels: Sequence[Label], items: Sequence[Any]) -> list[Label]:
    """The classes a classifier learns: the ``tag`` labels, and ``any`` labels the frames use as tags (CVAT tags
    take only those two types; an ``any`` label never used as a tag is a shape's)."""
    used = {tag for frame, _ in items for tag in frame.tags}
    return [label for label in labels if label.type == "tag" or (label.type == "any" and label.name in used)]


def tag_examples(items: Sequence[Any], labels: Sequence[Label]) -> list[Any]:
    """A classifier's examples: each frame once per tag it has of ``labels`` (a frame with several is an example of
    each, as CVAT's ImageNet export copies it into each label's folder); frames without one are left out."""
    names = {label.name for label in labels}
    return [(dataclasses.replace(frame, tags=[tag]), images) for frame, images in items
            for tag in frame.tags_among(names)]




@dataclass
class TrainState:
    """Where a run is, beside its weights and optimizer: what a checkpoint restores."""

    step: int = 0
    best_map: float | None = None     # the best headline score (mAP, or a classifier's top-1 accuracy)
    best_step: int | None = None
    best_metrics: dict[str, Any] = field(default_factory=dict)
    bad_validations: int = 0
    elapsed_s: float = 0.0
    stopped: str | None = None        # "early-stopping", "time-limit", then "completed"
    validated_at: int | None = None


def judge_validation(state: TrainState, metrics: dict[str, Any], hp: Hyperparameters) -> bool:
    """Record a validation in ``state``; True when it is the best so far (its weights are the ones to keep). A run
    whose mAP has not gained ``early-stopping-delta`` for ``early-stopping-patience`` validations is stopped."""
    score = headline(metrics)
    state.validated_at = state.step
    improved = score is not None and (state.best_map is None or score > state.best_map + hp.recipe.early_stopping_delta)
    best = improved or state.best_step is None
    if best:
        state.best_map, state.best_step, state.best_metrics, state.bad_validations = score, state.step, metrics, 0
    else:
        state.bad_validations += 1
    if hp.recipe.early_stopping_patience and state.bad_validations >= hp.recipe.early_stopping_patience:
        state.stopped = "early-stopping"
    return best

class Progress:
    """What a person following the run sees: a bar on a terminal; otherwise (a log, a pipe, ``make demo`` in CI) a
    line every twentieth of the run. Validations are announced either way, since they pause the steps."""

    def __init__(self, total: int, initial: int, enabled: bool, desc: str):
        self.enabled, self.total, self.desc = enabled, total, desc
        self.terminal = enabled and sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, desc=desc) \
            if self.terminal else None
        self.every = max(1, math.ceil(total / PROGRESS_LINES))
        self.next_line = (initial // self.every + 1) * self.every

    def step(self, step: int, loss: float | None, lr: float, images_per_s: float, eta_s: float) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", img_s=f"{images_per_s:.1f}", refresh=False)
        elif self.enabled and loss is not None and (step >= self.next_line or step == self.total):
            self.next_line = (step // self.every + 1) * self.every
            self.say(f"{self.desc}: step {step}/{self.total}, loss {loss:.3f}, lr {lr:.2e}, "
                     f"{images_per_s:.1f} images/s, about {minutes(eta_s)} to go")

    def say(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        elif self.enabled:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


class RunLogs:
    """What a run leaves for people and tools (main process only): ``metrics.jsonl``, TensorBoard scalars and the
    progress a person sees."""

    def __init__(self, directory: Path, total: int, resume_step: int | None, main: bool, progress: Progress):
        self.total, self.progress = total, progress
        self.metrics = MetricsLog(directory / "metrics.jsonl", resume_step) if main else None
        self.events = EventWriter(directory, resume_step) if main else None

    def write(self, record: dict[str, Any], scalars: dict[str, float] | None = None) -> None:
        if self.metrics is not None:
            self.metrics.write(record)
            if scalars:
                self.events.scalars(record["step"], scalars)

    def validation(self, state: TrainState, metrics: dict[str, Any]) -> None:
        if "top1" in metrics:  # a classifier
            scalars = {"val/top1": metrics["top1"], "val/top5": metrics["top5"],
                       **{f"val/accuracy/{k}": v["accuracy"] for k, v in metrics["per_class"].items()}}
        else:
            scalars = {"val/map": metrics["map"], "val/map50": metrics["map50"],
                       **{f"val/ap/{k}": v["ap"] for k, v in metrics["bbox"]["per_class"].items()}}
        self.write({"event": "validation", "step": state.step, "total_steps": self.total, **metrics}, scalars)
        if self.events is not None:
            self.events.flush()
        best = " (best so far)" if state.best_step == state.step else ""
        self.progress.say(f"step {state.step}: validation {summary(metrics)}{best}")

    def close(self) -> None:
        if self.events is not None:
            self.events.close()


class StepWindow:
    """Losses and timings of the steps since the last logged one."""

    def __init__(self, size: int):
        self.size = size
        self.reset()

    def reset(self) -> None:
        self.start, self.steps, self.wait, self.sums = time.perf_counter(), 0, 0.0, {}

    def add(self, values: dict[str, float]) -> None:
        self.steps += 1
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + value

    @property
    def full(self) -> bool:
        return self.steps >= self.size

    def means(self) -> dict[str, float]:
        return {k: v / max(self.steps, 1) for k, v in self.sums.items()}


def items_digest(items: Sequence[Any]) -> str:
    """Which frames (number, name, shapes, tags) a run learns from: a restart on other data is another run."""
    text = json.dumps([(f.frame, f.name, [(s.label, s.type, s.points, s.rotation) for s in f.shapes], f.tags)
                       for f, _ in items], default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class RunRecord:
    """What a run learned from, as its published version records it."""

    output: Path
    hp: Hyperparameters
    labels: Sequence[Label]
    train_items: Sequence[Any]
    val_items: Sequence[Any]
    previous: Path | None
    run_id: str


def publish_run(detector: Any, state: TrainState, run: RunRecord, store: ModelStore | None, name: str,
                provenance: dict[str, Any], promote: Callable[[dict[str, Any]], Promotion] | None) -> TrainingResult:
    """The best weights (already loaded into ``detector``, in inference mode) as the next version of ``name``,
    unless this run published before it was killed; whether it is served is ``promote``'s answer. Each label is
    served at the threshold that needs the fewest review edits on the validation frames (``set_served_thresholds``).
    The labels' select, radio and checkbox attributes are learned here, from the same frames, by a classifier on the
    shapes' crops that the version carries beside the weights (``with_attributes``).
    The run's pictures and ``result.json`` are written beside its checkpoints."""
    outlines = served_outlines(run.labels, [frame for frame, _ in run.train_items])
    if getattr(detector, "output", None) == "mask":  # each label served in the shape people drew it in
        detector.manifest.outlines = outlines
    elif turned := [name for name, outline in outlines.items() if outline in ("rotated-rectangle", "ellipse")]:
        log.warning("%s: drawn as rotated rectangles or ellipses, served as the upright boxes around them (a box "
                    "model cannot turn a box); a mask model (maskrcnn_resnet50_fpn, or custom with head=mask-rcnn) "
                    "serves them in their own type", ", ".join(turned))
    detector = with_attributes(detector, run)
    sample = _validation_sample(detector, run)
    review = set_served_thresholds(detector, sample, run)
    attribute_model = getattr(detector, "attribute_model", None)
    metrics = {**state.best_metrics, "best_step": state.best_step, "steps": state.step, "stopped": state.stopped,
               "train_frames": len(run.train_items), "val_frames": len(run.val_items),
               **({"review": review} if review else {}),
               **({"attributes": _attribute_review(attribute_model, sample, detector.manifest, run.labels)}
                  if attribute_model is not None else {})}
    result = TrainingResult(name, None, None, metrics, state.step, state.stopped, run.output,
                            report=_report(detector, run, name, sample))
    if store is not None:
        result.version = _already_published(store, name, run.run_id)
        decision = Promotion(True, "served") if promote is None else promote(metrics)
        if result.version is None:
            detector.familiar = _familiar(detector, run.train_items)
            manifest: Manifest = detector.manifest
            manifest.hyperparameters = run.hp.to_dict()
            manifest.metrics = metrics
            manifest.libraries = library_versions()
            manifest.provenance = {
                **provenance, "init": run.hp.recipe.init, "previous": str(run.previous) if run.previous else None,
                "run_id": run.run_id, "output_dir": str(run.output.resolve()),
                "frames": {"train": frame_ranges([f.frame for f, _ in run.train_items]),
                           "val": frame_ranges([f.frame for f, _ in run.val_items])}}
            result.version = publish_detector(detector, store, name, promote=decision.served, files=result.report)
        result.path = store.path(name, result.version)
        result.served = store.serving(name) == result.version
        result.promotion = decision.reason if result.served == decision.served else (
            "served" if result.served else "kept, not served")
    write_atomically(run.output / "result.json", json.dumps(result.to_dict(), indent=1) + "\n")
    return result


def saved_result(output: Path) -> TrainingResult | None:
    """The result a finished run left in ``output`` (a restart returns it instead of training again)."""
    path = output / "result.json"
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    log.info("%s already holds this run's result (version %s)", output, saved.get("version"))
    return TrainingResult(**{**saved, "path": Path(saved["path"]) if saved["path"] else None,
                             "output_dir": output, "report": [Path(p) for p in saved.get("report", [])]})


def claim_directory(output: Path, identity: dict[str, Any]) -> tuple[str | None, str | None]:
    """This run's id in ``output`` (``run.json``), made when the directory holds no run yet; or the sentence saying
    it holds another one."""
    path = output / "run.json"
    identity = json.loads(json.dumps(identity))  # as JSON gives it back: tuples become lists
    if not path.exists():
        run_id = uuid.uuid4().hex
        write_atomically(path, json.dumps({"run_id": run_id, **identity}, indent=1) + "\n")
        return run_id, None
    saved = json.loads(path.read_text())
    run_id = saved.pop("run_id")
    changed = sorted(k for k in identity if saved.get(k) != identity[k])
    if changed:
        return None, (f"{output} holds another run (different {', '.join(changed)}): train into another directory, "
                      "or start this one over")
    return run_id, None


def with_attributes(detector: Any, run: RunRecord) -> Any:
    """The detector whose detections carry the attributes its labels' shapes taught (``training.attributes``:
    a crop classifier trained on the run's frames, seeded by its seed), or the detector itself when no label has a
    learnable attribute with a value on the training frames (and for a classifier, whose tags have none)."""
    learned = any(spec.input_type in LEARNED_ATTRIBUTE_TYPES for label in run.labels for spec in label.attributes)
    if getattr(detector, "output", None) == TAG or not learned:
        return detector  # and torch is not imported for it
    if get_architecture(detector.manifest.architecture).framework != "pytorch":
        # the crop classifier is a torch network, and torch imported after TensorFlow crashes the process
        log.warning("attributes are learned beside torch models only: %s runs in TensorFlow, so its detections "
                    "arrive without them (people set them)", detector.manifest.architecture)
        return detector
    from preannotate.models.attributes import AttributedDetector
    from preannotate.training.attributes import train_attribute_model

    model = train_attribute_model(run.labels, run.train_items, run.val_items, seed=run.hp.recipe.seed)
    return detector if model is None else AttributedDetector(detector, model)


def _attribute_review(attribute_model: Any, sample: tuple[list[Any], list[list[Shape]]] | None, manifest: Manifest,
                      labels: Sequence[Label]) -> dict[str, Any]:
    """Each learned attribute's validation figures (on true boxes), with the reviewer's attribute edits on the
    detections matched to true objects at the served thresholds (``edits.attribute_edits``: ``review``)."""
    metrics = attribute_model.metrics
    if sample is None or not sample[0]:
        return metrics
    names: dict[str, list[str]] = {}
    for head in attribute_model.heads:
        names.setdefault(head.label, []).append(head.name)
    review = edits.attribute_edits([frame.shapes for frame, _ in sample[0]], sample[1], labels, names,
                                   manifest.threshold_of)
    return {key: {**figures, "review": review[key]} for key, figures in metrics.items()}


def _familiar(detector: Any, train_items: Sequence[Any]) -> Any:
    """The appearance of (up to ``FAMILIAR_FRAMES``, spread over) the training frames, published with the
    weights: what a frame being pre-annotated is compared with (``uncertainty.novelty``)."""
    if not train_items:
        return None
    items = sample(train_items, FAMILIAR_FRAMES)
    vectors = []
    for start in range(0, len(items), 8):
        arrays = [array for frame, images in items[start:start + 8] for _, array in images.decoded([frame.frame])]
        vectors.append(detector.appearance(arrays))
    if any(vector is None for vector in vectors):  # a model whose appearance layer never ran: nothing to compare
        return None
    return np.concatenate(vectors)


def _validation_sample(detector: Any, run: RunRecord) -> tuple[list[Any], list[list[Shape]]] | None:
    """Every shape the detector finds on (up to ``SAMPLE_FRAMES`` of) the validation frames; None when it fails,
    which costs the run its thresholds and pictures (said in the log), not its version."""
    try:
        return sample_detections(detector, run.val_items)
    except Exception:
        log.exception("the validation frames of %s could not be detected again", run.output)
        return None


def set_served_thresholds(detector: Any, sample: tuple[list[Any], list[list[Shape]]] | None, run: RunRecord
                          ) -> dict[str, Any]:
    """Set ``detector.manifest.thresholds``: each label's threshold with the fewest review edits on the sample of
    validation frames (``edits.choose_thresholds``; the edits are deletes, adds and moves, each one reviewer
    action). Returns what the manifest's metrics record of it (``review``): the thresholds, and the edits at them
    and at ``score-threshold``. Nothing is chosen for a classifier, without validation frames, or when the user set
    ``score-threshold`` (it then serves every label); a label without true objects among the frames keeps it."""
    manifest = detector.manifest
    if sample is None or not sample[0] or getattr(detector, "output", None) == TAG:
        return {}
    truth, found = [frame.shapes for frame, _ in sample[0]], sample[1]
    if "score_threshold" not in run.hp.given:
        manifest.thresholds = edits.choose_thresholds(edits.edit_curves(truth, found, run.labels))
    served = sum(edits.count_edits(truth, found, manifest.threshold_of).values(), edits.Edits())
    default = sum(edits.count_edits(truth, found, manifest.score_threshold).values(), edits.Edits())
    return {"thresholds": manifest.served_thresholds(), "frames": len(truth), "served": served.to_dict(),
            "at_score_threshold": {"threshold": manifest.score_threshold, **default.to_dict()}}


def _report(detector: Any, run: RunRecord, name: str, sample: tuple[list[Any], list[list[Shape]]] | None
            ) -> list[Path]:
    """The run's pictures (``training.report``) of the weights about to be published, at their served
    thresholds; a picture that cannot be drawn is reported in the log and costs the run nothing."""
    from preannotate.training import report

    if sample is None:
        return []
    try:
        return report.write_report(run.output, detector, run.val_items, run.labels,
                                   threshold=detector.manifest.served_thresholds(), name=name, sample=sample)
    except Exception:
        log.exception("the training report of %s could not be drawn", run.output)
        return []


def _already_published(store: ModelStore, name: str, run_id: str) -> int | None:
    """A version this run published before it was killed (a restart must not publish twice)."""
    for version in reversed(store.versions(name)):
        if Manifest.read(store.path(name, version)).provenance.get("run_id") == run_id:
            return version
    return None


def sample(items: Sequence[Any], count: int) -> list[Any]:
    """Up to ``count`` of ``items``, taken at an even stride from the start (calibration frames, the familiar
    sample)."""
    return list(items[::max(1, len(items) // count)][:count])


def checkpoint_interval(total: int, given: int | None) -> int:
    """Steps between checkpoints: ``given``, else a twentieth of the run, 50 to 500 (a checkpoint costs a second or
    two; a kill costs at most this many steps)."""
    return given or min(500, max(50, math.ceil(total / 20)))


def validation_steps(total: int, validations: int) -> set[int]:
    """The steps after which a run validates: ``validations`` spread over it, and its last."""
    return {max(1, round(total * k / validations)) for k in range(1, validations + 1)} | {total}


def check_batch_size(architecture: str, hp: Hyperparameters) -> None:
    """The smallest batch an architecture trains with (SSD-like models normalize 1x1 maps)."""
    smallest = get_architecture(architecture).min_batch_size
    if hp.recipe.batch_size < smallest:
        raise HyperparameterError(f"{architecture} needs batch-size={smallest} or more: its last batch norms work on "
                                  "1x1 feature maps and cannot normalize a single image")


def run_identity(architecture: str, labels: Sequence[Label], hp: Hyperparameters, train_items: Sequence[Any],
                 val_items: Sequence[Any], previous: Path | None) -> dict[str, Any]:
    """What a run is (``run.json``): a restart must match it, or it is another run."""
    return {"architecture": architecture, "labels": [label.to_dict() for label in labels],
            "hyperparameters": hp.to_dict(), "train": items_digest(train_items), "val": items_digest(val_items),
            "previous": str(previous) if previous else None}


@contextlib.contextmanager
def signals_set(stop: threading.Event):
    """SIGTERM and SIGINT set ``stop`` (checkpoint, then ``TrainingInterrupted``) while the block runs; a second
    one stops at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handlers = {}

    def handler(signum: int, _frame: Any) -> None:
        log.warning("%s: checkpointing and stopping (send it again to stop at once)", signal.Signals(signum).name)
        stop.set()
        signal.signal(signum, handlers.get(signum, signal.SIG_DFL))

    for signum in (signal.SIGTERM, signal.SIGINT):
        handlers[signum] = signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, previous in handlers.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(signum, previous)
