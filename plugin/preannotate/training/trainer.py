"""The training loop: annotated frames in, a validated model version in the store out.

In the style of torchvision's ``references/detection`` (the model returns its losses in train mode; images and
targets are lists; warm-up, gradient clipping, AMP on CUDA, DistributedDataParallel under ``torchrun``), plus
what a job that may be killed at any moment needs. Its parts: ``TrainState`` (what a checkpoint restores beside
the weights), ``Checkpointer`` (``last.pt`` and ``best.pt``), ``Validator`` (one validation and what follows from
it), ``Engine.step`` (one optimizer step) and ``Progress`` (what a person following the run sees). The output
directory holds::

    run.json            what is being trained (architecture, labels, hyperparameters, frames): a restart must match
    last.pt             the checkpoint: model, optimizer, scheduler, AMP scaler, RNG states, the state
    best.pt             the weights of the best validation so far (what gets published)
    metrics.jsonl       a record per logged step and per validation
    events.out.tfevents.*  the same as TensorBoard scalars
    result.json         the published version, once published

A run killed even with SIGKILL and started again on the same directory resumes from ``last.pt`` and ends at the
same step count, seeing the very batches it would have seen (``data.StepBatchSampler``). SIGTERM and SIGINT (or
the ``stop`` event) make it write a checkpoint and raise ``TrainingInterrupted``.

Before each validation the batch-norm statistics are re-measured on training frames
(``evaluation.recalibrate_batch_norm``): from scratch, torchvision's running averages trail the weights so far
that a model which finds everything in train mode can score near zero in eval mode.

What a model family knows about itself (which backbone stages to freeze, the smallest batch its norms take, its
input geometry) comes from the registry and the family module, not from here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
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
import torch
import torch.distributed as dist
from tqdm import tqdm

from preannotate.files import replacing, write_atomically
from preannotate.hyperparameters import HyperparameterError, Hyperparameters
from preannotate.models import (
    Manifest,
    ModelStore,
    create_detector,
    default_hyperparameters,
    family_of,
    get_architecture,
    hyperparameters_for,
    publish_detector,
)
from preannotate.models.artifact import library_versions
from preannotate.shapes import Label
from preannotate.training import data, optim
from preannotate.training.evaluation import evaluate, recalibrate_batch_norm, score_text
from preannotate.training.logs import EventWriter, MetricsLog

log = logging.getLogger(__name__)

# Small-data scaling of the registry's step budgets (made for datasets of thousands of frames).
SMALL_DATA_EPOCHS = 100
MIN_DEFAULT_STEPS = 300
CALIBRATION_FRAMES = 96  # training frames that re-measure batch-norm statistics before each validation
PROGRESS_LINES = 20      # lines a run prints when its output is not a terminal (besides one per validation)
FAMILIAR_FRAMES = 200      # training frames whose appearance is published, for the novelty of new frames
RUN_FILES = ("run.json", "last.pt", "best.pt", "metrics.jsonl", "result.json", "report.png", "predictions.png")


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
    given = hp.given
    recipe = default_hyperparameters(architecture, hp.init)
    changes: dict[str, Any] = {}
    if previous and "init" not in given:
        changes["init"] = "previous"
    smallest = get_architecture(architecture).min_batch_size
    if "batch_size" not in given and hp.batch_size > max(2, train_frames):
        changes["batch_size"] = max(2, smallest, train_frames)  # two at least: a batch norm needs two images
    if "epochs" in given and "num_steps" not in given:
        changes["num_steps"] = None  # the user's epochs, not the registry's step budget
    elif not given & {"num_steps", "epochs"} and hp.num_steps:
        per_epoch = math.ceil(train_frames / (changes.get("batch_size", hp.batch_size) * hp.num_clones))
        changes["num_steps"] = min(hp.num_steps, max(MIN_DEFAULT_STEPS, SMALL_DATA_EPOCHS * per_epoch))
    hp = hp.replaced(**changes)
    total = hp.total_steps(train_frames)
    if recipe.num_steps and total != recipe.num_steps:
        scale = total / recipe.num_steps
        scaled: dict[str, Any] = {}
        if "warmup_steps" not in given:
            scaled["warmup_steps"] = round(hp.warmup_steps * scale)
        if "schedule_steps" not in given:
            scaled["schedule_steps"] = [max(1, round(s * scale)) for s in hp.schedule_steps]
        if "schedule_step_size" not in given and hp.schedule_step_size:
            scaled["schedule_step_size"] = max(1, round(hp.schedule_step_size * scale))
        hp = hp.replaced(**scaled)
    return hp


def train(architecture: str, labels: Sequence[Label], train_items: Sequence[data.Item],
          val_items: Sequence[data.Item], output_dir: str | Path, *, store: ModelStore | str | Path | None = None,
          name: str | None = None, hyperparameters: Hyperparameters | dict[str, Any] | str | None = None,
          previous: str | Path | None = None, provenance: dict[str, Any] | None = None, device: str | None = None,
          progress: bool = True, checkpoint_every: int | None = None, workers: int | None = None,
          stop: threading.Event | None = None, promote: Callable[[dict[str, Any]], Promotion] | None = None,
          restart: bool = False) -> TrainingResult:
    """Train ``architecture`` on ``train_items`` (``(FrameAnnotations, FrameImages)`` pairs), validate on
    ``val_items``, and publish the best weights to ``store`` as the next version of ``name`` (default: the
    architecture), served at once unless ``promote(metrics)`` says otherwise.

    ``hyperparameters``: parsed ``Hyperparameters``, or a dict or ``key=value`` text parsed here once (see
    ``effective_hyperparameters``); ``init=previous`` starts from the artifact directory ``previous``.
    ``provenance`` (the CVAT tasks, say) goes into the manifest with the frames learned from. ``progress``: a
    progress bar on a terminal, a line now and then otherwise (and a line per validation either way);
    ``checkpoint_every``: steps between checkpoints (default: a twentieth of the run, 50 to 500); ``workers``:
    data-loading processes (default ``data.default_workers()``); ``stop``: an event that stops the run as SIGTERM
    does; ``restart``: forget what ``output_dir`` holds of an earlier run and start over. Raises
    ``TrainingInterrupted`` when stopped, ``RunMismatch`` when ``output_dir`` holds another run. Resumes from
    ``output_dir`` when it holds this run's checkpoint; returns at once when it holds this run's result. Under
    ``torchrun`` every process calls it; only the main one publishes."""
    if restart:
        clear_run(Path(output_dir))
    run = _Run(architecture, labels, list(train_items), list(val_items), Path(output_dir),
               hyperparameters, previous, device, workers, stop)
    try:
        return run.execute(store=ModelStore(store) if isinstance(store, (str, Path)) else store,
                           name=name or architecture, provenance=provenance or {}, progress=progress,
                           checkpoint_every=checkpoint_every, promote=promote)
    finally:
        run.close()


def clear_run(directory: Path) -> None:
    """Remove what a run wrote into ``directory`` (its checkpoints, logs and result; not the dataset beside them)."""
    for name in RUN_FILES:
        (directory / name).unlink(missing_ok=True)
    for events in directory.glob("events.out.tfevents.*"):
        events.unlink()


def frame_ranges(numbers: Sequence[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` → ``"0-2,5,7-8"``: the frames learned from, compact enough for a manifest."""
    parts, ordered = [], sorted(set(numbers))
    start = previous = None
    for number in [*ordered, None]:
        if number is not None and previous is not None and number == previous + 1:
            previous = number
            continue
        if start is not None:
            parts.append(str(start) if start == previous else f"{start}-{previous}")
        start = previous = number
    return ",".join(parts)


# ------------------------------------------------------------------------------------------------ the parts

@dataclass
class TrainState:
    """Where a run is, beside its weights and optimizer: what a checkpoint restores."""

    step: int = 0
    best_map: float | None = None
    best_step: int | None = None
    best_metrics: dict[str, Any] = field(default_factory=dict)
    bad_validations: int = 0
    elapsed_s: float = 0.0
    stopped: str | None = None        # "early-stopping", "time-limit", then "completed"
    validated_at: int | None = None


@dataclass
class Engine:
    """The model and what steps it; ``step`` is one optimizer step, as torchvision's ``train_one_epoch`` takes it."""

    model: torch.nn.Module            # the model itself (what is saved)
    trained: torch.nn.Module          # the model as stepped: wrapped in DistributedDataParallel when distributed
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    frozen_norms: list[torch.nn.Module]
    device: torch.device
    clip_norm: float | None

    def train_mode(self) -> None:
        self.trained.train()
        for module in self.frozen_norms:  # frozen statistics stay frozen
            module.eval()

    def step(self, images: Sequence[torch.Tensor], targets: Sequence[dict[str, torch.Tensor]], step: int
             ) -> tuple[dict[str, float], float]:
        """One optimizer step on a batch; returns the losses (``loss`` is their sum) and the rate it used."""
        images = [image.to(self.device, non_blocking=True) for image in images]
        targets = [{k: v.to(self.device, non_blocking=True) for k, v in t.items()} for t in targets]
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.scaler.is_enabled()):
            losses = self.trained(images, targets)
            loss = sum(losses.values())
        # one device sync per step for all the numbers logged (as the references' MetricLogger does)
        values = dict(zip(["loss", *losses], torch.stack([loss, *losses.values()]).detach().tolist(), strict=True))
        if not math.isfinite(values["loss"]):
            raise FloatingPointError(f"the loss is {values} at step {step}; try a lower initial-learning-rate or "
                                     "gradient-clip-norm")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.clip_norm:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_norm)
        lr = self.optimizer.param_groups[0]["lr"]
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return values, lr


class Checkpointer:
    """``last.pt`` (everything a resume needs) and ``best.pt`` (the weights worth publishing), each replaced in one
    step so a kill never leaves half of one. Only the main process writes."""

    def __init__(self, directory: Path, enabled: bool, total: int, samples_per_step: int):
        self.last, self.best = directory / "last.pt", directory / "best.pt"
        self.enabled, self.total, self.samples_per_step = enabled, total, samples_per_step

    def save(self, engine: Engine, state: TrainState) -> None:
        if self.enabled:
            _atomic_save({"model": engine.model.state_dict(), "optimizer": engine.optimizer.state_dict(),
                          "scheduler": engine.scheduler.state_dict(), "scaler": engine.scaler.state_dict(),
                          "rng": _rng_state(), "state": dataclasses.asdict(state), "total_steps": self.total,
                          "samples_drawn": state.step * self.samples_per_step}, self.last)

    def restore(self, engine: Engine) -> TrainState | None:
        """The state of the checkpoint, loaded into ``engine``; None when there is none yet."""
        if not self.last.exists():
            return None
        checkpoint = torch.load(self.last, map_location=engine.device, weights_only=True)
        engine.model.load_state_dict(checkpoint["model"])
        engine.optimizer.load_state_dict(checkpoint["optimizer"])
        engine.scheduler.load_state_dict(checkpoint["scheduler"])
        engine.scaler.load_state_dict(checkpoint["scaler"])
        _set_rng_state(checkpoint["rng"])
        names = {f.name for f in dataclasses.fields(TrainState)}
        return TrainState(**{k: v for k, v in checkpoint["state"].items() if k in names})

    def save_best(self, engine: Engine, state: TrainState) -> None:
        if self.enabled:
            _atomic_save({"model": engine.model.state_dict(), "step": state.step, "metrics": state.best_metrics},
                         self.best)

    def load_best(self, engine: Engine) -> None:
        if self.best.exists():
            engine.model.load_state_dict(torch.load(self.best, map_location=engine.device,
                                                    weights_only=True)["model"])


class Validator:
    """One validation: re-measure the batch norms, score the validation frames (COCO mAP), keep the best weights,
    tell the schedule, count towards early stopping. Without validation frames it only re-measures."""

    def __init__(self, loader, calibration, labels: Sequence[Label], with_masks: bool, hp: Hyperparameters,
                 checkpointer: Checkpointer, record: Callable[[TrainState, dict[str, Any]], None]):
        self.loader, self.calibration, self.labels, self.with_masks = loader, calibration, labels, with_masks
        self.hp, self.checkpointer, self.record = hp, checkpointer, record

    def __call__(self, engine: Engine, state: TrainState) -> None:
        recalibrate_batch_norm(engine.model, self.calibration, engine.device, engine.frozen_norms)
        if self.loader is None:
            return
        metrics = evaluate(engine.model, self.loader, self.labels, self.with_masks, engine.device)
        score = metrics["map"]
        state.validated_at = state.step
        improved = score is not None and (state.best_map is None
                                          or score > state.best_map + self.hp.early_stopping_delta)
        if improved or state.best_step is None:
            state.best_map, state.best_step, state.best_metrics, state.bad_validations = \
                score, state.step, metrics, 0
            self.checkpointer.save_best(engine, state)
        else:
            state.bad_validations += 1
        optim.validated(engine.scheduler, score)
        patience = self.hp.early_stopping_patience
        if patience and state.bad_validations >= patience:
            state.stopped = "early-stopping"
        self.record(state, metrics)


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
                     f"{images_per_s:.1f} images/s, about {_minutes(eta_s)} to go")

    def say(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        elif self.enabled:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


# ------------------------------------------------------------------------------------------------ the run

class _Run:
    """One training run (one process of it under torchrun); ``train`` is its public face."""

    def __init__(self, architecture: str, labels: Sequence[Label], train_items: list[data.Item],
                 val_items: list[data.Item], output_dir: Path,
                 hyperparameters: Hyperparameters | dict[str, Any] | str | None, previous: str | Path | None,
                 device: str | None, workers: int | None, stop: threading.Event | None):
        if not train_items:
            raise ValueError("no training frames")
        self.arch = get_architecture(architecture)
        self.labels = [Label(label.name, label.type, label.attributes, i) for i, label in enumerate(labels, 1)]
        self.train_items, self.val_items = train_items, val_items
        self.output = output_dir
        self.previous = Path(previous) if previous else None
        self.workers = workers
        self.stop = stop or threading.Event()
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        hp = effective_hyperparameters(architecture, hyperparameters, len(train_items),
                                       previous=self.previous is not None)
        if hp.batch_size < self.arch.min_batch_size:
            raise HyperparameterError(f"{self.arch.name} needs batch-size={self.arch.min_batch_size} or more: its "
                                      "last batch norms work on 1x1 feature maps and cannot normalize a single image")
        if hp.num_clones > 1 and self.world == 1:
            raise RuntimeError(f"num-clones={hp.num_clones} trains on {hp.num_clones} GPUs with "
                               f"DistributedDataParallel: start it with torchrun --nproc-per-node={hp.num_clones} "
                               "(the same command after it)")
        if self.world > 1:
            hp = hp.replaced(num_clones=self.world)
            if not dist.is_initialized():
                dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        self.hp = hp
        self.rank = dist.get_rank() if self.world > 1 else 0
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device(device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.total = hp.total_steps(len(train_items))
        self.with_masks = self.arch.output == "mask"
        self.identity = {"architecture": self.arch.name, "labels": [label.to_dict() for label in self.labels],
                         "hyperparameters": hp.to_dict(), "train": _digest(train_items),
                         "val": _digest(val_items), "previous": str(self.previous) if self.previous else None}
        self.main = self.rank == 0
        self._handlers: dict[int, Any] = {}
        self._events: _Logs | None = None

    def execute(self, store: ModelStore | None, name: str, provenance: dict[str, Any], progress: bool,
                checkpoint_every: int | None, promote: Callable[[dict[str, Any]], Promotion] | None
                ) -> TrainingResult:
        self.output.mkdir(parents=True, exist_ok=True)
        run_id = self._claim_directory()
        if (self.output / "result.json").exists():
            saved = json.loads((self.output / "result.json").read_text())
            log.info("%s already holds this run's result (version %s)", self.output, saved.get("version"))
            return TrainingResult(**{**saved, "path": Path(saved["path"]) if saved["path"] else None,
                                     "output_dir": self.output, "report": [Path(p) for p in saved.get("report", [])]})
        torch.manual_seed(self.hp.seed)
        detector = create_detector(self.arch.name, self.labels, init=self.hp.init, hyperparameters=self.hp,
                                   previous=self.previous, device=str(self.device))
        engine = self._engine(detector.model)
        checkpointer = Checkpointer(self.output, self.main, self.total, self.hp.batch_size * self.world)
        restored = checkpointer.restore(engine)
        state = restored or TrainState()
        if restored:
            log.info("resuming %s at step %d of %d", self.output, state.step, self.total)
        logs = self._events = _Logs(self.output, self.total, state.step if restored else None, self.main,
                                    Progress(self.total, state.step, progress and self.main, f"train {self.arch.name}"))
        validator = Validator(self._val_loader() if self.main and self.val_items else None,
                              self._calibration_loader() if self.main else None, self.labels, self.with_masks,
                              self.hp, checkpointer, logs.validation)
        if not self.val_items and self.main and not restored:
            logs.progress.say("no validation frames: the version will be published unscored (no mAP)")
        self._install_signal_handlers()
        if state.stopped is None and state.step < self.total:
            self._steps(engine, state, checkpointer, validator, logs, checkpoint_every)
        logs.progress.close()
        if state.validated_at != state.step:  # stopped between validations: the final one
            self._validate(validator, engine, state, logs)
        state.stopped = state.stopped or "completed"
        checkpointer.save(engine, state)
        if not self.main:
            return TrainingResult(name, None, None, {}, state.step, state.stopped, self.output)
        logs.write({"event": "end", "step": state.step, "total_steps": self.total, "stopped": state.stopped,
                    "best_step": state.best_step})
        checkpointer.load_best(engine)
        return self._publish(detector, state, store, name, run_id, provenance, promote)

    def _steps(self, engine: Engine, state: TrainState, checkpointer: Checkpointer, validator: Validator,
               logs: _Logs, checkpoint_every: int | None) -> None:
        """The optimizer steps from ``state.step`` on: logged, validated ``num-validations`` times, checkpointed
        (a checkpoint costs a second or two; a kill costs at most ``every`` steps), stopped by a signal, early
        stopping or the time limit."""
        every = checkpoint_every or min(500, max(50, math.ceil(self.total / 20)))
        n = self.hp.num_validations
        validation_steps = {max(1, round(self.total * k / n)) for k in range(1, n + 1)} | {self.total}
        sampler = data.StepBatchSampler(len(self.train_items), self.hp.batch_size, self.hp.seed, state.step,
                                        self.total, self.rank, self.world)
        batches = iter(self._train_loader(sampler))
        window = _Window(min(50, max(1, self.total // 100)))
        start_time, elapsed_before = time.monotonic(), state.elapsed_s
        engine.train_mode()
        while state.step < self.total:
            waited = time.perf_counter()
            images, targets = next(batches)
            window.wait += time.perf_counter() - waited
            values, lr = engine.step(images, targets, state.step + 1)
            state.step += 1
            state.elapsed_s = elapsed_before + time.monotonic() - start_time
            window.add(values)
            if window.full or state.step == self.total:
                self._log_window(window, state, lr, logs)
            if state.step in validation_steps and validator.loader is not None:
                paused = time.perf_counter()
                self._validate(validator, engine, state, logs)
                engine.train_mode()
                window.start += time.perf_counter() - paused  # images/s and ETA count training only
            if self.hp.max_training_hours is not None and state.elapsed_s >= self.hp.max_training_hours * 3600:
                state.stopped = state.stopped or "time-limit"
            signalled = self._agree(self.stop.is_set(), state)
            if signalled or state.stopped or state.step % every == 0:
                checkpointer.save(engine, state)
            if signalled:
                logs.progress.close()
                logs.write({"event": "interrupted", "step": state.step, "total_steps": self.total})
                raise TrainingInterrupted(state.step, checkpointer.last)
            if state.stopped:
                return

    def _validate(self, validator: Validator, engine: Engine, state: TrainState, logs: _Logs) -> None:
        if self.main:
            if validator.loader is not None:
                count = len(self.val_items)
                logs.progress.say(f"step {state.step}: validating on {count} frame{'' if count == 1 else 's'} ...")
            validator(engine, state)

    # ------------------------------------------------------------------------------------------------ helpers

    def _engine(self, model: torch.nn.Module) -> Engine:
        frozen_norms = family_of(self.arch).freeze_backbone(model, self.hp.trainable_backbone_layers, self.hp.init)
        optimizer = optim.build_optimizer(model.parameters(), self.hp)
        trained = model
        if self.world > 1:
            trained = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return Engine(model=model, trained=trained, optimizer=optimizer,
                      scheduler=optim.build_scheduler(optimizer, self.hp, self.total),
                      scaler=torch.amp.GradScaler(self.device.type, enabled=self.device.type == "cuda"),
                      frozen_norms=frozen_norms, device=self.device, clip_norm=self.hp.gradient_clip_norm)

    def _claim_directory(self) -> str:
        """This run's id; the directory must be empty or hold this very run (``RunMismatch`` otherwise). The main
        process decides and tells the others."""
        run_id, error = None, None
        if self.main:
            path = self.output / "run.json"
            identity = json.loads(json.dumps(self.identity))  # as JSON gives it back: tuples become lists
            if path.exists():
                saved = json.loads(path.read_text())
                run_id = saved.pop("run_id")
                changed = sorted(k for k in identity if saved.get(k) != identity[k])
                if changed:
                    error = (f"{self.output} holds another run (different {', '.join(changed)}): train into another "
                             "directory, or start this one over")
            else:
                run_id = uuid.uuid4().hex
                write_atomically(path, json.dumps({"run_id": run_id, **identity}, indent=1) + "\n")
        if self.world > 1:
            shared = [run_id, error]
            dist.broadcast_object_list(shared, src=0)
            run_id, error = shared
        if error:
            raise RunMismatch(error)
        return run_id

    def _transforms(self, train: bool):
        return data.transforms(self.hp, self.arch.fixed_size, train)

    def _train_loader(self, sampler: data.StepBatchSampler):
        dataset = data.DetectionDataset(self.train_items, self.labels, self._transforms(True), self.with_masks,
                                        self.hp.seed)
        return data.loader(dataset, batch_sampler=sampler, workers=self.workers,
                           pin_memory=self.device.type == "cuda")

    def _val_loader(self):
        dataset = data.DetectionDataset(self.val_items, self.labels, self._transforms(False), self.with_masks)
        return data.loader(dataset, batch_size=self.hp.batch_size, workers=self.workers,
                           pin_memory=self.device.type == "cuda")

    def _calibration_loader(self):
        """Training frames spread over the set, unaugmented; loaded in this process (a few dozen frames)."""
        every = max(1, len(self.train_items) // CALIBRATION_FRAMES)
        items = self.train_items[::every][:CALIBRATION_FRAMES]
        batch = max(2, self.hp.batch_size)  # full batches only: a batch norm cannot measure one 1x1 map
        items = (items * batch)[:max(batch, len(items) // batch * batch)]
        dataset = data.DetectionDataset(items, self.labels, self._transforms(False), self.with_masks)
        return data.loader(dataset, batch_size=batch, workers=0)

    def _log_window(self, window: _Window, state: TrainState, lr: float, logs: _Logs) -> None:
        seconds = time.perf_counter() - window.start
        losses = window.means()
        images_per_s = window.steps * self.hp.batch_size * self.world / max(seconds, 1e-9)
        eta = (self.total - state.step) * seconds / max(window.steps, 1)
        logs.progress.step(state.step, losses.get("loss"), lr, images_per_s, eta)
        logs.write({"event": "train", "step": state.step, "total_steps": self.total, "lr": lr,
                    **{k: round(v, 5) for k, v in losses.items()}, "images_per_s": round(images_per_s, 2),
                    "data_wait": round(window.wait / seconds, 4), "eta_s": round(eta, 1),
                    "elapsed_s": round(state.elapsed_s, 3)},
                   {"train/lr": lr, "train/images_per_s": images_per_s, **{f"train/{k}": v for k, v in losses.items()}})
        window.reset()

    def _agree(self, signalled: bool, state: TrainState) -> bool:
        """Whether to stop for a signal, and any early or time-limit stop, agreed by every process."""
        if self.world == 1:
            return signalled
        codes = {None: 0, "early-stopping": 1, "time-limit": 2}
        flags = torch.tensor([int(signalled), codes[state.stopped]], device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        state.stopped = {v: k for k, v in codes.items()}[int(flags[1])]
        return bool(flags[0])

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may; the caller's ``stop`` event still works

        def handler(signum: int, _frame: Any) -> None:
            log.warning("%s: checkpointing and stopping (send it again to stop at once)", signal.Signals(signum).name)
            self.stop.set()
            signal.signal(signum, self._handlers.get(signum, signal.SIG_DFL))

        for signum in (signal.SIGTERM, signal.SIGINT):
            self._handlers[signum] = signal.signal(signum, handler)

    def close(self) -> None:
        if self._events is not None:
            self._events.close()
        for signum, previous in self._handlers.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(signum, previous)
        self._handlers.clear()

    def _publish(self, detector: Any, state: TrainState, store: ModelStore | None, name: str, run_id: str,
                 provenance: dict[str, Any], promote: Callable[[dict[str, Any]], Promotion] | None
                 ) -> TrainingResult:
        """The best weights (already loaded) as the next version of ``name``, unless this run published before it
        was killed; whether it is served is ``promote``'s answer."""
        metrics = {**state.best_metrics, "best_step": state.best_step, "steps": state.step, "stopped": state.stopped,
                   "train_frames": len(self.train_items), "val_frames": len(self.val_items)}
        result = TrainingResult(name, None, None, metrics, state.step, state.stopped, self.output,
                                report=self._report(detector))
        if store is not None:
            result.version = self._already_published(store, name, run_id)
            decision = Promotion(True, "served") if promote is None else promote(metrics)
            if result.version is None:
                detector.familiar = self._familiar(detector)
                manifest: Manifest = detector.manifest
                manifest.hyperparameters = self.hp.to_dict()
                manifest.metrics = metrics
                manifest.libraries = library_versions()
                manifest.provenance = {
                    **provenance, "init": self.hp.init, "previous": str(self.previous) if self.previous else None,
                    "run_id": run_id, "output_dir": str(self.output.resolve()),
                    "frames": {"train": frame_ranges([f.frame for f, _ in self.train_items]),
                               "val": frame_ranges([f.frame for f, _ in self.val_items])}}
                result.version = publish_detector(detector, store, name, promote=decision.served,
                                                  files=result.report)
            result.path = store.path(name, result.version)
            result.served = store.serving(name) == result.version
            result.promotion = decision.reason if result.served == decision.served else (
                "served" if result.served else "kept, not served")
        write_atomically(self.output / "result.json", json.dumps(result.to_dict(), indent=1) + "\n")
        return result

    def _familiar(self, detector: Any) -> np.ndarray | None:
        """The appearance of (up to ``FAMILIAR_FRAMES``, spread over) the training frames, published with the
        weights: what a frame being pre-annotated is compared with (``uncertainty.novelty``)."""
        if not hasattr(detector, "appearance") or not self.train_items:
            return None
        detector.model.eval()
        items = self.train_items[::max(1, len(self.train_items) // FAMILIAR_FRAMES)][:FAMILIAR_FRAMES]
        vectors = []
        for start in range(0, len(items), 8):
            arrays = [array for frame, images in items[start:start + 8] for _, array in images.decoded([frame.frame])]
            vectors.append(detector.appearance(arrays))
        return np.concatenate(vectors)

    def _report(self, detector: Any) -> list[Path]:
        """The run's pictures (``training.report``) of the weights about to be published; a picture that cannot be
        drawn is reported in the log and costs the run nothing."""
        from preannotate.training import report

        detector.model.eval()
        try:
            return report.write_report(self.output, detector, self.val_items, self.labels,
                                       threshold=detector.manifest.score_threshold)
        except Exception:
            log.exception("the training report of %s could not be drawn", self.output)
            return []

    @staticmethod
    def _already_published(store: ModelStore, name: str, run_id: str) -> int | None:
        """A version this run published before it was killed (a restart must not publish twice)."""
        for version in reversed(store.versions(name)):
            if Manifest.read(store.path(name, version)).provenance.get("run_id") == run_id:
                return version
        return None


class _Logs:
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
        self.write({"event": "validation", "step": state.step, "total_steps": self.total, **metrics},
                   {"val/map": metrics["map"], "val/map50": metrics["map50"],
                    **{f"val/ap/{k}": v["ap"] for k, v in metrics["bbox"]["per_class"].items()}})
        if self.events is not None:
            self.events.flush()
        best = " (best so far)" if state.best_step == state.step else ""
        self.progress.say(f"step {state.step}: validation mAP@.5 {score_text(metrics['map50'])}, mAP "
                          f"{score_text(metrics['map'])}{best}")

    def close(self) -> None:
        if self.events is not None:
            self.events.close()


class _Window:
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


def _digest(items: Sequence[data.Item]) -> str:
    """Which frames (number, name, shapes) a run learns from: a restart on other data is another run."""
    text = json.dumps([(f.frame, f.name, [(s.label, s.type, s.points, s.rotation) for s in f.shapes])
                       for f, _ in items], default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename: a kill never leaves half a checkpoint."""
    with replacing(path) as temporary:
        torch.save(obj, temporary)


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    state["numpy"] = [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss]
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
