"""The training run, written once for every framework: annotated frames in, a validated model version in the store out.

``train`` is its public face. A ``Run`` follows one script — claim the output directory, resume, step, validate and
judge, stop early or at the time limit, checkpoint, report, publish — and asks a ``FrameworkAdapter`` only what
differs between frameworks: how the model is built and a step runs, how weights and optimizer state are saved, how
batch norms are re-measured and the validation frames scored (``training.torch_adapter``: torchvision's reference
loop, DDP under ``torchrun``; ``training.keras_adapter``: ``tf.data`` over our TFRecords, Keras's own step, several
GPUs under ``MirroredStrategy``). The output directory holds::

    run.json            what is being trained (architecture, labels, hyperparameters, frames): a restart must match
    last.pt | last.keras.npz      the checkpoint: weights, optimizer, schedule, RNG states, the run's ``TrainState``
    best.pt | best.weights.npz    the weights of the best validation so far (what gets published)
    records/            the TensorFlow runs' frames as TF OD API TFRecords
    metrics.jsonl       a record per logged step and per validation
    events.out.tfevents.*  the same as TensorBoard scalars
    report.png, predictions.png   the run's pictures (``training.report``; attributes.png when it learned some)
    result.json         the published version, once published

A run killed even with SIGKILL and started again on the same directory resumes from its checkpoint and ends at the
same step count, seeing the very batches it would have seen. SIGTERM and SIGINT (or the ``stop`` event) make it
write a checkpoint and raise ``TrainingInterrupted``. Before each validation the batch-norm statistics are
re-measured on training frames: from scratch, running averages trail the weights so far that a model which finds
everything in train mode can score near zero in eval mode.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import math
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from preannotate.hyperparameters import Hyperparameters
from preannotate.models import Architecture, Detector, ModelStore, get_architecture
from preannotate.shapes import Label
from preannotate.training.evaluation import headline
from preannotate.training.runs import (
    Progress,
    Promotion,
    RunLogs,
    RunMismatch,
    RunRecord,
    StepWindow,
    TrainingInterrupted,
    TrainingResult,
    TrainState,
    check_batch_size,
    checkpoint_interval,
    claim_directory,
    effective_hyperparameters,
    judge_validation,
    publish_run,
    run_identity,
    saved_result,
    signals_set,
    tag_examples,
    tag_labels,
    validation_steps,
)

log = logging.getLogger(__name__)

# Everything a run writes into its directory, whatever its framework: ``train(restart=True)`` removes it all (not a
# dataset exported beside it). Each adapter's ``FILES`` must be among these (a test checks).
RUN_FILES = ("run.json", "last.pt", "best.pt", "last.keras.npz", "best.weights.npz", "records", "metrics.jsonl",
             "result.json", "report.png", "predictions.png", "attributes.png")
ADAPTERS = {"pytorch": "preannotate.training.torch_adapter", "tensorflow": "preannotate.training.keras_adapter"}


@dataclass
class StepOutcome:
    """One optimizer step, as the run logs it."""

    losses: dict[str, float]   # ``loss`` (their sum) and its parts
    lr: float                  # the learning rate the step used
    data_wait: float = 0.0     # seconds spent waiting for the batch (0 when the framework loads inside the step)


@dataclass
class RunSpec:
    """What a run learns, from which frames, into where: the same in every process and framework."""

    arch: Architecture            # as the hyperparameters compose it (a composed head decides what it returns)
    labels: list[Label]           # numbered 1..N: the model's classes
    train_items: list[Any]        # ``(FrameAnnotations, FrameImages)`` pairs
    val_items: list[Any]
    hp: Hyperparameters           # the user's, fitted to the data (``runs.effective_hyperparameters``)
    output: Path
    previous: Path | None         # the published version ``init=previous`` starts from

    @classmethod
    def prepare(cls, architecture: str, labels: Sequence[Label], train_items: Sequence[Any],
                val_items: Sequence[Any], output: Path, hyperparameters: Hyperparameters | dict[str, Any] | str | None,
                previous: str | Path | None) -> RunSpec:
        if not train_items:
            raise ValueError("no training frames")
        arch = get_architecture(architecture)
        train_items, val_items = list(train_items), list(val_items)
        if arch.output == "tag":  # a classifier learns the frames' tags, one example per tag
            labels = tag_labels(labels, train_items)
            train_items, val_items = tag_examples(train_items, labels), tag_examples(val_items, labels)
            if not train_items:
                named = ", ".join(label.name for label in labels) or "a tag label"
                raise ValueError(f"no training frame has a tag of {named}: tag frames in CVAT (labels of type tag) "
                                 "to train a classifier")
        numbered = [dataclasses.replace(label, id=i) for i, label in enumerate(labels, 1)]  # sublabels kept
        previous = Path(previous) if previous else None
        hp = effective_hyperparameters(arch.name, hyperparameters, len(train_items), previous=previous is not None)
        check_batch_size(arch.name, hp)
        return cls(arch.resolved(hp), numbered, train_items, val_items, hp, output, previous)

    @property
    def total(self) -> int:
        """Optimizer steps of the run."""
        return self.hp.recipe.total_steps(len(self.train_items))

    def identity(self) -> dict[str, Any]:
        return run_identity(self.arch.name, self.labels, self.hp, self.train_items, self.val_items, self.previous)


class FrameworkAdapter(Protocol):
    """What a framework owns of a run; ``Run`` owns the rest. Built with the ``RunSpec`` (it may fit ``spec.hp`` to
    its devices before anything reads it), then ``build`` makes the model once the directory is claimed."""

    FILES: tuple[str, ...]   # what it writes into the output directory (among ``RUN_FILES``)
    main: bool               # this process logs, validates, checkpoints and publishes (False on other DDP ranks)
    checkpoint: Path         # the file a resume restores

    def shared(self, value: Any) -> Any:
        """``value`` as the main process has it (every process of a distributed run gets the main one's)."""

    def build(self) -> TrainState | None:
        """Make the model, its optimizer and schedule; the state of the checkpoint restored into them, if any."""

    def start(self, step: int) -> None:
        """Get ready to step from ``step`` on (the data order resumes at the sample it would have drawn next)."""

    def prepare(self, step: int) -> dict[str, Any] | None:
        """Before the step after ``step``: what changed in the model for it (an event to log), or None."""

    def step(self, step: int) -> StepOutcome:
        """Optimizer step number ``step`` (1-based)."""

    def evaluate(self) -> dict[str, Any] | None:
        """Re-measure the batch norms on training frames, then score the validation frames (``evaluation``'s
        metrics); None without validation frames (only re-measured)."""

    def validated(self, score: float | None) -> None:
        """A validation scored ``score`` (an on-plateau schedule listens)."""

    def save(self, state: TrainState) -> None:
        """Write the checkpoint, replacing the last in one step."""

    def save_best(self, state: TrainState) -> None:
        """Keep the weights of the validation just judged the best."""

    def agree(self, signalled: bool, state: TrainState) -> bool:
        """Whether to stop for a signal, with any early or time-limit stop in ``state``, agreed by every process."""

    def publishable(self) -> Detector:
        """The model with the best validation's weights (the last without one), in inference mode."""

    def close(self) -> None:
        """Release what the run holds."""


def adapter_class(arch: Architecture) -> type[FrameworkAdapter]:
    """The adapter of the architecture's framework, imported on use: a run loads only its own framework."""
    return importlib.import_module(ADAPTERS[arch.framework]).Adapter


def clear_run(directory: Path) -> None:
    """Remove what a run wrote into ``directory`` (``RUN_FILES``, TensorBoard events), not the dataset beside it."""
    for name in RUN_FILES:
        path = directory / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    for events in directory.glob("events.out.tfevents.*"):
        events.unlink()


def train(architecture: str, labels: Sequence[Label], train_items: Sequence[Any], val_items: Sequence[Any],
          output_dir: str | Path, *, store: ModelStore | str | Path | None = None, name: str | None = None,
          hyperparameters: Hyperparameters | dict[str, Any] | str | None = None, previous: str | Path | None = None,
          provenance: dict[str, Any] | None = None, device: str | None = None, progress: bool = True,
          checkpoint_every: int | None = None, workers: int | None = None, stop: threading.Event | None = None,
          promote: Callable[[dict[str, Any]], Promotion] | None = None, restart: bool = False) -> TrainingResult:
    """Train ``architecture`` on ``train_items`` (``(FrameAnnotations, FrameImages)`` pairs), validate on
    ``val_items``, and publish the best weights to ``store`` as the next version of ``name`` (default: the
    architecture), served at once unless ``promote(metrics)`` says otherwise.

    ``hyperparameters``: parsed ``Hyperparameters``, or a dict or ``key=value`` text parsed here once (see
    ``runs.effective_hyperparameters``); ``init=previous`` starts from the artifact directory ``previous``.
    ``provenance`` (the CVAT tasks, say) goes into the manifest with the frames learned from. ``progress``: a
    progress bar on a terminal, a line now and then otherwise (and a line per validation either way);
    ``checkpoint_every``: steps between checkpoints (default: a twentieth of the run, 50 to 500); ``device`` and
    ``workers`` (data-loading processes): the torch adapter's (TensorFlow chooses its own); ``stop``: an event that
    stops the run as SIGTERM does; ``restart``: forget what ``output_dir`` holds of an earlier run and start over.
    Raises ``TrainingInterrupted`` when stopped, ``RunMismatch`` when ``output_dir`` holds another run. Resumes from
    ``output_dir`` when it holds this run's checkpoint; returns at once when it holds this run's result. Under
    ``torchrun`` every process calls it; only the main one publishes."""
    output = Path(output_dir)
    if restart:
        clear_run(output)
    spec = RunSpec.prepare(architecture, labels, train_items, val_items, output, hyperparameters, previous)
    adapter = adapter_class(spec.arch)(spec, device=device, workers=workers)
    run = Run(spec, adapter, stop or threading.Event(), progress, checkpoint_every)
    try:
        return run.execute(store=ModelStore(store) if isinstance(store, (str, Path)) else store,
                           name=name or architecture, provenance=provenance or {}, promote=promote)
    finally:
        run.close()


@dataclass
class Run:
    """One training run (one process of it under torchrun), in any framework."""

    spec: RunSpec
    adapter: FrameworkAdapter
    stop: threading.Event
    progress: bool = True
    checkpoint_every: int | None = None
    logs: RunLogs | None = None
    _exit: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)  # signal handlers while it runs

    def execute(self, store: ModelStore | None, name: str, provenance: dict[str, Any],
                promote: Callable[[dict[str, Any]], Promotion] | None) -> TrainingResult:
        spec, adapter = self.spec, self.adapter
        spec.output.mkdir(parents=True, exist_ok=True)
        run_id = self._claim_directory()
        saved = saved_result(spec.output)
        if saved is not None:
            return saved
        restored = adapter.build()
        state = restored or TrainState()
        if restored:
            log.info("resuming %s at step %d of %d", spec.output, state.step, spec.total)
        logs = self.logs = RunLogs(spec.output, spec.total, state.step if restored else None, adapter.main,
                                   Progress(spec.total, state.step, self.progress and adapter.main,
                                            f"train {spec.arch.name}"))
        if not spec.val_items and adapter.main and not restored:
            logs.progress.say("no validation frames: the version will be published unscored (no mAP)")
        self._exit.enter_context(signals_set(self.stop))
        if state.stopped is None and state.step < spec.total:
            self._steps(state)
        logs.progress.close()
        if state.validated_at != state.step:  # stopped between validations: the final one
            self._validate(state)
        state.stopped = state.stopped or "completed"
        adapter.save(state)
        if not adapter.main:
            return TrainingResult(name, None, None, {}, state.step, state.stopped, spec.output)
        logs.write({"event": "end", "step": state.step, "total_steps": spec.total, "stopped": state.stopped,
                    "best_step": state.best_step})
        record = RunRecord(spec.output, spec.hp, spec.labels, spec.train_items, spec.val_items, spec.previous, run_id)
        return publish_run(adapter.publishable(), state, record, store, name, provenance, promote)

    def _steps(self, state: TrainState) -> None:
        """The optimizer steps from ``state.step`` on: logged, validated ``num-validations`` times, checkpointed
        (a checkpoint costs a second or two; a kill costs at most ``every`` steps), stopped by a signal, early
        stopping or the time limit."""
        spec, adapter, logs = self.spec, self.adapter, self.logs
        total, hp = spec.total, spec.hp
        every = checkpoint_interval(total, self.checkpoint_every)
        validations = validation_steps(total, hp.recipe.num_validations) if spec.val_items else set()
        window = StepWindow(min(50, max(1, total // 100)))
        adapter.start(state.step)
        start_time, elapsed_before = time.monotonic(), state.elapsed_s
        while state.step < total:
            changed = adapter.prepare(state.step)
            if changed:
                logs.write({"event": "stage", "step": state.step, **changed})
            outcome = adapter.step(state.step + 1)
            if not math.isfinite(outcome.losses["loss"]):
                raise FloatingPointError(f"the loss is {outcome.losses} at step {state.step + 1}; try a lower "
                                         "initial-learning-rate or gradient-clip-norm")
            state.step += 1
            state.elapsed_s = elapsed_before + time.monotonic() - start_time
            window.add(outcome.losses)
            window.wait += outcome.data_wait
            if window.full or state.step == total:
                self._log_window(window, state, outcome.lr)
            if state.step in validations:
                paused = time.perf_counter()
                self._validate(state)
                window.start += time.perf_counter() - paused  # images/s and ETA count training only
            if hp.recipe.max_training_hours is not None and state.elapsed_s >= hp.recipe.max_training_hours * 3600:
                state.stopped = state.stopped or "time-limit"
            signalled = adapter.agree(self.stop.is_set(), state)
            if signalled or state.stopped or state.step % every == 0:
                adapter.save(state)
            if signalled:
                logs.progress.close()
                logs.write({"event": "interrupted", "step": state.step, "total_steps": total})
                raise TrainingInterrupted(state.step, adapter.checkpoint)
            if state.stopped:
                return

    def _validate(self, state: TrainState) -> None:
        """Re-measure the batch norms and score the validation frames (main process only); keep the best weights,
        tell the schedule, count towards early stopping."""
        if not self.adapter.main:
            return
        count = len(self.spec.val_items)
        if count:
            self.logs.progress.say(f"step {state.step}: validating on {count} frame{'' if count == 1 else 's'} ...")
        metrics = self.adapter.evaluate()
        if metrics is None:
            return
        if judge_validation(state, metrics, self.spec.hp):
            self.adapter.save_best(state)
        self.adapter.validated(headline(metrics))
        self.logs.validation(state, metrics)

    def _log_window(self, window: StepWindow, state: TrainState, lr: float) -> None:
        seconds = time.perf_counter() - window.start
        losses = window.means()
        recipe = self.spec.hp.recipe
        images_per_s = window.steps * recipe.batch_size * recipe.num_clones / max(seconds, 1e-9)
        eta = (self.spec.total - state.step) * seconds / max(window.steps, 1)
        self.logs.progress.step(state.step, losses.get("loss"), lr, images_per_s, eta)
        self.logs.write({"event": "train", "step": state.step, "total_steps": self.spec.total, "lr": lr,
                         **{k: round(v, 5) for k, v in losses.items()}, "images_per_s": round(images_per_s, 2),
                         "data_wait": round(window.wait / max(seconds, 1e-9), 4), "eta_s": round(eta, 1),
                         "elapsed_s": round(state.elapsed_s, 3)},
                        {"train/lr": lr, "train/images_per_s": images_per_s,
                         **{f"train/{k}": v for k, v in losses.items()}})
        window.reset()

    def _claim_directory(self) -> str:
        """This run's id; the directory must be empty or hold this very run (``RunMismatch`` otherwise). The main
        process decides and tells the others."""
        claimed = claim_directory(self.spec.output, self.spec.identity()) if self.adapter.main else (None, None)
        run_id, error = self.adapter.shared(claimed)
        if error:
            raise RunMismatch(error)
        return run_id

    def close(self) -> None:
        if self.logs is not None:
            self.logs.close()
        self.adapter.close()
        self._exit.close()
