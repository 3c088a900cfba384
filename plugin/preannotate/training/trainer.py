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
import logging
import math
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from preannotate.files import replacing
from preannotate.hyperparameters import Hyperparameters
from preannotate.models import (
    ModelStore,
    create_detector,
    family_of,
    get_architecture,
)
from preannotate.shapes import Label
from preannotate.training import data, optim
from preannotate.training.evaluation import evaluate, evaluate_tags, headline, recalibrate_batch_norm
from preannotate.training.runs import (  # noqa: F401 - the shared vocabulary of runs, re-exported
    CALIBRATION_FRAMES,
    FAMILIAR_FRAMES,
    RUN_FILES,
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
    clear_run,
    effective_hyperparameters,
    frame_ranges,
    items_digest,
    judge_validation,
    publish_run,
    run_identity,
    sample,
    saved_result,
    signals_set,
    validation_steps,
)

log = logging.getLogger(__name__)




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


# ------------------------------------------------------------------------------------------------ the parts

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
    """One validation: re-measure the batch norms, score the validation frames (COCO mAP; a classifier's accuracy
    with ``tags``), keep the best weights, tell the schedule, count towards early stopping. Without validation
    frames it only re-measures."""

    def __init__(self, loader, calibration, labels: Sequence[Label], with_masks: bool, hp: Hyperparameters,
                 checkpointer: Checkpointer, record: Callable[[TrainState, dict[str, Any]], None], tags: bool = False):
        self.loader, self.calibration, self.labels, self.with_masks = loader, calibration, labels, with_masks
        self.hp, self.checkpointer, self.record, self.tags = hp, checkpointer, record, tags

    def __call__(self, engine: Engine, state: TrainState) -> None:
        recalibrate_batch_norm(engine.model, self.calibration, engine.device, engine.frozen_norms)
        if self.loader is None:
            return
        metrics = evaluate_tags(engine.model, self.loader, self.labels, engine.device) if self.tags else \
            evaluate(engine.model, self.loader, self.labels, self.with_masks, engine.device)
        if judge_validation(state, metrics, self.hp):
            self.checkpointer.save_best(engine, state)
        optim.validated(engine.scheduler, headline(metrics))
        self.record(state, metrics)


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
        self.tags = self.arch.output == "tag"  # a classifier: it learns the frames' tags, one example per tag
        if self.tags:
            labels = data.tag_labels(labels, train_items)
            train_items, val_items = data.tag_examples(train_items, labels), data.tag_examples(val_items, labels)
            if not train_items:
                named = ", ".join(label.name for label in labels) or "a tag label"
                raise ValueError(f"no training frame has a tag of {named}: tag frames in CVAT (labels of type tag) "
                                 "to train a classifier")
        self.labels = [Label(label.name, label.type, label.attributes, i) for i, label in enumerate(labels, 1)]
        self.train_items, self.val_items = train_items, val_items
        self.output = output_dir
        self.previous = Path(previous) if previous else None
        self.workers = workers
        self.stop = stop or threading.Event()
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        hp = effective_hyperparameters(architecture, hyperparameters, len(train_items),
                                       previous=self.previous is not None)
        check_batch_size(self.arch.name, hp)
        if hp.num_clones > 1 and self.world == 1:
            raise RuntimeError(f"num-clones={hp.num_clones} trains on {hp.num_clones} GPUs with "
                               f"DistributedDataParallel: start it with torchrun --nproc-per-node={hp.num_clones} "
                               "(the same command after it)")
        if self.world > 1:
            hp = hp.replaced(num_clones=self.world)
            if not dist.is_initialized():
                dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        self.hp = hp
        self.arch = self.arch.resolved(hp)  # a composed model's head decides what it returns
        self.rank = dist.get_rank() if self.world > 1 else 0
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device(device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.total = hp.total_steps(len(train_items))
        self.with_masks = self.arch.output == "mask"
        self.identity = run_identity(self.arch.name, self.labels, hp, train_items, val_items, self.previous)
        self.main = self.rank == 0
        self._exit = contextlib.ExitStack()  # the signal handlers while it runs
        self._events: RunLogs | None = None

    def execute(self, store: ModelStore | None, name: str, provenance: dict[str, Any], progress: bool,
                checkpoint_every: int | None, promote: Callable[[dict[str, Any]], Promotion] | None
                ) -> TrainingResult:
        self.output.mkdir(parents=True, exist_ok=True)
        run_id = self._claim_directory()
        saved = saved_result(self.output)
        if saved is not None:
            return saved
        torch.manual_seed(self.hp.seed)
        detector = create_detector(self.arch.name, self.labels, init=self.hp.init, hyperparameters=self.hp,
                                   previous=self.previous, device=str(self.device))
        engine = self._engine(detector.model)
        checkpointer = Checkpointer(self.output, self.main, self.total, self.hp.batch_size * self.world)
        restored = checkpointer.restore(engine)
        state = restored or TrainState()
        if restored:
            log.info("resuming %s at step %d of %d", self.output, state.step, self.total)
        logs = self._events = RunLogs(self.output, self.total, state.step if restored else None, self.main,
                                    Progress(self.total, state.step, progress and self.main, f"train {self.arch.name}"))
        validator = Validator(self._val_loader() if self.main and self.val_items else None,
                              self._calibration_loader() if self.main else None, self.labels, self.with_masks,
                              self.hp, checkpointer, logs.validation, self.tags)
        if not self.val_items and self.main and not restored:
            logs.progress.say("no validation frames: the version will be published unscored (no mAP)")
        self._exit.enter_context(signals_set(self.stop))
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
        detector.model.eval()
        return publish_run(detector, state, RunRecord(self.output, self.hp, self.labels, self.train_items,
                                                      self.val_items, self.previous, run_id),
                           store, name, provenance, promote)

    def _steps(self, engine: Engine, state: TrainState, checkpointer: Checkpointer, validator: Validator,
               logs: RunLogs, checkpoint_every: int | None) -> None:
        """The optimizer steps from ``state.step`` on: logged, validated ``num-validations`` times, checkpointed
        (a checkpoint costs a second or two; a kill costs at most ``every`` steps), stopped by a signal, early
        stopping or the time limit."""
        every = checkpoint_interval(self.total, checkpoint_every)
        validations = validation_steps(self.total, self.hp.num_validations)
        sampler = data.StepBatchSampler(len(self.train_items), self.hp.batch_size, self.hp.seed, state.step,
                                        self.total, self.rank, self.world)
        batches = iter(self._train_loader(sampler))
        window = StepWindow(min(50, max(1, self.total // 100)))
        start_time, elapsed_before = time.monotonic(), state.elapsed_s
        engine.train_mode()
        stage = None
        while state.step < self.total:
            layers = self.hp.trainable_layers_at(state.step, len(self.train_items))
            if layers is not None and layers != stage:  # a new stage of stage-N-epochs (or the one resumed in)
                stage = layers
                engine.frozen_norms = self._train_stages(engine.model, layers)
                engine.train_mode()
                logs.write({"event": "stage", "step": state.step, "trainable_backbone_layers": layers})
            waited = time.perf_counter()
            images, targets = next(batches)
            window.wait += time.perf_counter() - waited
            values, lr = engine.step(images, targets, state.step + 1)
            state.step += 1
            state.elapsed_s = elapsed_before + time.monotonic() - start_time
            window.add(values)
            if window.full or state.step == self.total:
                self._log_window(window, state, lr, logs)
            if state.step in validations and validator.loader is not None:
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

    def _validate(self, validator: Validator, engine: Engine, state: TrainState, logs: RunLogs) -> None:
        if self.main:
            if validator.loader is not None:
                count = len(self.val_items)
                logs.progress.say(f"step {state.step}: validating on {count} frame{'' if count == 1 else 's'} ...")
            validator(engine, state)

    # ------------------------------------------------------------------------------------------------ helpers

    def _engine(self, model: torch.nn.Module) -> Engine:
        phased = self.hp.trainable_layers_at(0, len(self.train_items)) is not None
        # with stage-N-epochs every weight joins the optimizer; each stage then decides which ones have gradients
        frozen_norms = [] if phased else family_of(self.arch).freeze_backbone(
            model, self.hp.trainable_backbone_layers, self.hp.init)
        optimizer = optim.build_optimizer(model.parameters(), self.hp)
        trained = model
        if self.world > 1:
            trained = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=phased)
        return Engine(model=model, trained=trained, optimizer=optimizer,
                      scheduler=optim.build_scheduler(optimizer, self.hp, self.total),
                      scaler=torch.amp.GradScaler(self.device.type, enabled=self.device.type == "cuda"),
                      frozen_norms=frozen_norms, device=self.device, clip_norm=self.hp.gradient_clip_norm)

    def _train_stages(self, model: torch.nn.Module, layers: int) -> list[torch.nn.Module]:
        """Only the heads and the last ``layers`` backbone stages get gradients from now on."""
        for parameter in model.backbone.parameters():
            parameter.requires_grad_(True)
        return family_of(self.arch).freeze_backbone(model, layers, self.hp.init)

    def _claim_directory(self) -> str:
        """This run's id; the directory must be empty or hold this very run (``RunMismatch`` otherwise). The main
        process decides and tells the others."""
        run_id, error = claim_directory(self.output, self.identity) if self.main else (None, None)
        if self.world > 1:
            shared = [run_id, error]
            dist.broadcast_object_list(shared, src=0)
            run_id, error = shared
        if error:
            raise RunMismatch(error)
        return run_id

    def _dataset(self, items: Sequence[data.Item], train: bool) -> data.DetectionDataset:
        transform = data.transforms(self.hp, self.arch.fixed_size, train, boxes=not self.tags)
        return data.DetectionDataset(items, self.labels, transform, self.with_masks, self.hp.seed if train else 0,
                                     tags=self.tags)

    def _train_loader(self, sampler: data.StepBatchSampler):
        return data.loader(self._dataset(self.train_items, True), batch_sampler=sampler, workers=self.workers,
                           pin_memory=self.device.type == "cuda")

    def _val_loader(self):
        dataset = self._dataset(self.val_items, False)
        return data.loader(dataset, batch_size=self.hp.batch_size, workers=self.workers,
                           pin_memory=self.device.type == "cuda")

    def _calibration_loader(self):
        """Training frames spread over the set, unaugmented; loaded in this process (a few dozen frames)."""
        items = sample(self.train_items, CALIBRATION_FRAMES)
        batch = max(2, self.hp.batch_size)  # full batches only: a batch norm cannot measure one 1x1 map
        items = (items * batch)[:math.ceil(len(items) / batch) * batch]  # every one, the last batch filled up
        return data.loader(self._dataset(items, False), batch_size=batch, workers=0)

    def _log_window(self, window: StepWindow, state: TrainState, lr: float, logs: RunLogs) -> None:
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

    def close(self) -> None:
        if self._events is not None:
            self._events.close()
        self._exit.close()


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
