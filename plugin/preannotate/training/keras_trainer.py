"""The TensorFlow training loop: annotated frames in, TFRecords written by our bridge, a validated Keras model version
in the store out — the same run as ``training.trainer`` (its result, budget, logs, validation, publishing: those of
``training.runs``), in TensorFlow.

The frames are written once as TF Object Detection API records (``formats.tfrecord.frame_example``, what
``preannotate export --format tfrecord`` writes) into ``records/`` of the output directory, and read back through
``tf.data``: parse, decode, letterbox or squash to the model's square, augment (stateless, seeded by the sample's
position, so a resumed run draws the same), pad and batch, prefetch — all in the graph. ``model.fit`` steps the
keras-hub detector (its own focal and Huber losses); a ``keras.callbacks.Callback`` does what a step of ours does
around it: the learning rate of ``optim.Schedule``, logs, validations (COCO mAP through the detector's own
``detect``, after re-measuring batch-norm statistics), checkpoints, early stopping, the time limit and SIGTERM.

The output directory holds ``run.json``, ``records/``, ``last.keras.npz`` (weights, optimizer variables and the
state: a run killed even with SIGKILL resumes there, at the sample it would have drawn next), ``best.weights.npz``,
``metrics.jsonl``, TensorBoard events and ``result.json``. ``num-clones=N`` trains on N GPUs with
``tf.distribute.MirroredStrategy``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from preannotate.files import replacing
from preannotate.hyperparameters import HyperparameterError, Hyperparameters
from preannotate.models import ModelStore, create_detector, get_architecture
from preannotate.models import keras_family as family
from preannotate.shapes import Label
from preannotate.training import optim
from preannotate.training.evaluation import score_detector
from preannotate.training.runs import (
    CALIBRATION_FRAMES,
    Progress,
    Promotion,
    RunLogs,
    RunMismatch,
    RunRecord,
    TrainingInterrupted,
    TrainingResult,
    TrainState,
    check_batch_size,
    checkpoint_interval,
    claim_directory,
    clear_run,
    effective_hyperparameters,
    judge_validation,
    publish_run,
    run_identity,
    sample,
    saved_result,
    signals_set,
    validation_steps,
)

tf, keras = family.tf, family.keras
log = logging.getLogger(__name__)

SHUFFLE_BUFFER = 2048
_FEATURES = {
    "image/encoded": tf.io.FixedLenFeature([], tf.string),
    **{f"image/object/bbox/{k}": tf.io.VarLenFeature(tf.float32) for k in ("xmin", "ymin", "xmax", "ymax")},
    "image/object/class/label": tf.io.VarLenFeature(tf.int64),
}


def write_records(items: Sequence[Any], labels: Sequence[Label], directory: Path, split: str) -> list[Path]:
    """The frames of ``items`` as ``<split>.record-00000-of-00001`` in ``directory``, by the bridge's writer; a
    complete file from before is reused (the records of a run never change: its identity holds their digest)."""
    from preannotate.formats import tfrecord

    path = tfrecord.shard_paths(directory / f"{split}.record", 1)[0]
    if not path.is_file():
        directory.mkdir(parents=True, exist_ok=True)
        examples = (tfrecord.frame_example(frame, data, labels, filename=frame.name or str(frame.frame),
                                           source_id=str(frame.frame))
                    for frame, images in items for _, data in images.encoded([frame.frame]))
        tfrecord.write_records(directory / f"{split}.partial", examples, 1)[0].rename(path)  # complete, or absent
    return [path]


def pipeline(files: Sequence[Path], hp: Hyperparameters, size: int, *, train: bool, start: int = 0,
             batch: int | None = None) -> tf.data.Dataset:
    """Batches of ``(images 0-255 [B, size, size, 3], {"boxes" [B, N, 4] pixels xyxy, "labels" [B, N]})`` from TF
    OD API records (padding boxes: label -1). ``train``: shuffled by ``hp.seed`` without end, augmented, starting
    at sample ``start`` (a resumed run's next)."""
    batch = batch or hp.batch_size
    records = tf.data.TFRecordDataset([str(f) for f in files])
    if train:
        records = records.shuffle(SHUFFLE_BUFFER, seed=hp.seed, reshuffle_each_iteration=True).repeat()
    samples = records.enumerate().skip(start)  # skipped before decoding: a resume reads, never decodes, the past

    def parse(index, serialized):
        example = tf.io.parse_single_example(serialized, _FEATURES)
        image = tf.cast(tf.io.decode_image(example["image/encoded"], channels=3, expand_animations=False),
                        tf.float32)
        height, width = tf.cast(tf.shape(image)[0], tf.float32), tf.cast(tf.shape(image)[1], tf.float32)
        xmin, ymin, xmax, ymax = (tf.sparse.to_dense(example[f"image/object/bbox/{k}"])
                                  for k in ("xmin", "ymin", "xmax", "ymax"))
        boxes = tf.stack([xmin * width, ymin * height, xmax * width, ymax * height], axis=-1)
        if hp.letterbox:  # pad to a square first, centred as serving pads (keras_family.KerasDetector.square)
            side = tf.maximum(height, width)
            top, left = tf.math.floordiv(side - height, 2), tf.math.floordiv(side - width, 2)
            image = tf.image.pad_to_bounding_box(image, tf.cast(top, tf.int32), tf.cast(left, tf.int32),
                                                 tf.cast(side, tf.int32), tf.cast(side, tf.int32))
            boxes += tf.stack([left, top, left, top])
            height = width = side
        image = tf.image.resize(image, [size, size])
        boxes *= tf.stack([size / width, size / height, size / width, size / height])
        classes = tf.cast(tf.sparse.to_dense(example["image/object/class/label"]) - 1, tf.float32)
        if train:
            image, boxes = augment(image, boxes, size, hp, tf.stack([tf.cast(hp.seed, tf.int64), index]))
        # one padding box always: a batch without objects still has a box dimension
        boxes = tf.concat([boxes, tf.zeros([1, 4])], axis=0)
        classes = tf.concat([classes, [-1.0]], axis=0)
        return image, {"boxes": boxes, "labels": classes}

    batches = samples.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).padded_batch(
        batch, padded_shapes=([size, size, 3], {"boxes": [None, 4], "labels": [None]}),
        padding_values=(0.0, {"boxes": 0.0, "labels": -1.0}), drop_remainder=train)
    return batches.prefetch(tf.data.AUTOTUNE)


def augment(image, boxes, size: int, hp: Hyperparameters, seed):
    """``hp.augment`` in the graph, stateless (the same sample draws the same): ``flip`` (horizontal), ``colour``
    (brightness, contrast, saturation), ``scale`` (zoom out 1-1.5x onto a grey canvas)."""
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 6)
    if "flip" in hp.augment:
        flip = tf.random.stateless_uniform([], seeds[0]) < 0.5
        image = tf.where(flip, image[:, ::-1, :], image)
        boxes = tf.where(flip, tf.stack([size - boxes[:, 2], boxes[:, 1], size - boxes[:, 0], boxes[:, 3]], -1), boxes)
    if "colour" in hp.augment:
        image = tf.image.stateless_random_brightness(image, 0.2 * 255, seeds[1])
        image = tf.image.stateless_random_contrast(image, 0.8, 1.2, seeds[2])
        image = tf.image.stateless_random_saturation(image, 0.8, 1.2, seeds[3])
        image = tf.clip_by_value(image, 0.0, 255.0)
    if "scale" in hp.augment:
        factor = tf.random.stateless_uniform([], seeds[4], 1.0, 1.5)
        inner = tf.cast(tf.round(size / factor), tf.int32)
        offset = tf.cast(tf.random.stateless_uniform([2], seeds[5], 0.0, 1.0) * tf.cast(size - inner, tf.float32),
                         tf.int32)
        small = tf.image.resize(image, [inner, inner])
        image = tf.image.pad_to_bounding_box(small - 114.0, offset[1], offset[0], size, size) + 114.0
        shrink = tf.cast(inner, tf.float32) / size
        shift = tf.cast(tf.stack([offset[0], offset[1], offset[0], offset[1]]), tf.float32)
        boxes = boxes * shrink + shift
    return image, boxes


def build_optimizer(hp: Hyperparameters) -> keras.optimizers.Optimizer:
    """The Keras optimizer of ``hp`` (weight decay decoupled, as Keras applies it; ``gradient-clip-norm`` clips the
    global norm). Its rate is set at every step from ``optim.Schedule``."""
    common = {"learning_rate": hp.initial_learning_rate, "weight_decay": hp.weight_decay or None,
              "global_clipnorm": hp.gradient_clip_norm}
    name = hp.optimizer
    if name == "sgd":
        return keras.optimizers.SGD(momentum=hp.momentum, **common)
    if name == "rmsprop":  # the TF OD API's rms_prop_optimizer: decay (rho), momentum, epsilon
        return keras.optimizers.RMSprop(rho=hp.rmsprop_decay, momentum=hp.momentum, epsilon=hp.rmsprop_epsilon,
                                        **common)
    classes = {"adam": keras.optimizers.Adam, "adamw": keras.optimizers.AdamW, "adamax": keras.optimizers.Adamax,
               "adagrad": keras.optimizers.Adagrad, "adadelta": keras.optimizers.Adadelta}
    return classes[name](**common)


def strategy_for(hp: Hyperparameters) -> tf.distribute.Strategy:
    """``num-clones`` GPUs under ``MirroredStrategy``, else TensorFlow's default (one device)."""
    if hp.num_clones <= 1:
        return tf.distribute.get_strategy()
    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) < hp.num_clones:
        raise HyperparameterError(f"num-clones={hp.num_clones} trains on {hp.num_clones} GPUs with MirroredStrategy, "
                                  f"and TensorFlow sees {len(gpus)}")
    return tf.distribute.MirroredStrategy([gpu.name for gpu in gpus[:hp.num_clones]])


def recalibrate_batch_norm(model: keras.Model, batches) -> int:
    """Re-measure the trainable batch norms as the plain average over ``batches`` (precise BN, as the torch
    trainer does before each validation): Keras's momentum of 0.99 trails a model trained from scratch by
    hundreds of steps. Returns how many norms were measured."""
    norms = [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)
             and layer.trainable]
    if not norms:
        return 0
    momenta = [norm.momentum for norm in norms]
    try:
        for seen, (images, _) in enumerate(batches):
            for norm in norms:
                norm.momentum = seen / (seen + 1)  # a cumulative average: the first batch replaces the old
            model(images, training=True)
    finally:
        for norm, momentum in zip(norms, momenta, strict=True):
            norm.momentum = momentum
    return len(norms)


class Checkpoint:
    """``last.keras.npz`` (weights, optimizer variables, the state) and ``best.weights.npz``, each replaced in one
    step so a kill never leaves half of one."""

    def __init__(self, directory: Path):
        self.last, self.best = directory / "last.keras.npz", directory / "best.weights.npz"

    def save(self, model: keras.Model, optimizer: keras.optimizers.Optimizer, state: TrainState,
             schedule: optim.Schedule) -> None:
        arrays = {f"w{i}": np.asarray(w) for i, w in enumerate(model.weights)}
        arrays.update({f"o{i}": np.asarray(v) for i, v in enumerate(optimizer.variables)})
        meta = {"state": dataclasses.asdict(state), "plateau": [schedule.plateau_scale, schedule.plateau_best]}
        _save_npz(self.last, {**arrays, "meta": np.frombuffer(json.dumps(meta).encode(), np.uint8)})

    def restore(self, model: keras.Model, optimizer: keras.optimizers.Optimizer, schedule: optim.Schedule
                ) -> TrainState | None:
        if not self.last.exists():
            return None
        with np.load(self.last) as saved:
            for i, w in enumerate(model.weights):
                w.assign(saved[f"w{i}"])
            optimizer.build(model.trainable_variables)
            for i, v in enumerate(optimizer.variables):
                v.assign(saved[f"o{i}"])
            meta = json.loads(saved["meta"].tobytes())
        schedule.plateau_scale, schedule.plateau_best = meta["plateau"]
        names = {f.name for f in dataclasses.fields(TrainState)}
        return TrainState(**{k: v for k, v in meta["state"].items() if k in names})

    def save_best(self, model: keras.Model) -> None:
        _save_npz(self.best, {f"w{i}": np.asarray(w) for i, w in enumerate(model.weights)})

    def load_best(self, model: keras.Model) -> None:
        if self.best.exists():
            with np.load(self.best) as saved:
                for i, w in enumerate(model.weights):
                    w.assign(saved[f"w{i}"])


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    with replacing(path) as temporary:
        temporary.write_bytes(buffer.getvalue())


def train(architecture: str, labels: Sequence[Label], train_items: Sequence[Any], val_items: Sequence[Any],
          output_dir: str | Path, *, store: ModelStore | str | Path | None = None, name: str | None = None,
          hyperparameters: Hyperparameters | dict[str, Any] | str | None = None, previous: str | Path | None = None,
          provenance: dict[str, Any] | None = None, device: str | None = None, progress: bool = True,
          checkpoint_every: int | None = None, workers: int | None = None, stop: threading.Event | None = None,
          promote: Callable[[dict[str, Any]], Promotion] | None = None, restart: bool = False) -> TrainingResult:
    """``training.trainer.train`` for a Keras architecture (same arguments, same result; ``device`` and ``workers``
    are TensorFlow's to choose: every GPU it sees, ``tf.data``'s autotuned parallelism)."""
    if restart:
        clear_run(Path(output_dir))
    run = _Run(architecture, labels, list(train_items), list(val_items), Path(output_dir), hyperparameters,
               previous, stop)
    return run.execute(store=ModelStore(store) if isinstance(store, (str, Path)) else store,
                       name=name or architecture, provenance=provenance or {}, progress=progress,
                       checkpoint_every=checkpoint_every, promote=promote)


class _Run:
    def __init__(self, architecture: str, labels: Sequence[Label], train_items: list[Any], val_items: list[Any],
                 output: Path, hyperparameters: Any, previous: str | Path | None, stop: threading.Event | None):
        if not train_items:
            raise ValueError("no training frames")
        self.arch = get_architecture(architecture)
        self.labels = [Label(label.name, label.type, label.attributes, i) for i, label in enumerate(labels, 1)]
        self.train_items, self.val_items, self.output = train_items, val_items, output
        self.previous = Path(previous) if previous else None
        self.stop = stop or threading.Event()
        self.hp = effective_hyperparameters(architecture, hyperparameters, len(train_items),
                                            previous=self.previous is not None)
        check_batch_size(self.arch.name, self.hp)
        self.total = self.hp.total_steps(len(train_items))
        self.global_batch = self.hp.batch_size * self.hp.num_clones  # batch-size is per GPU; Keras splits the whole
        self.size = self.hp.image_size or self.arch.image_size
        self.identity = run_identity(self.arch.name, self.labels, self.hp, train_items, val_items, self.previous)

    def execute(self, store: ModelStore | None, name: str, provenance: dict[str, Any], progress: bool,
                checkpoint_every: int | None, promote: Callable[[dict[str, Any]], Promotion] | None
                ) -> TrainingResult:
        self.output.mkdir(parents=True, exist_ok=True)
        run_id, error = claim_directory(self.output, self.identity)
        if error:
            raise RunMismatch(error)
        saved = saved_result(self.output)
        if saved is not None:
            return saved
        records = self.output / "records"
        train_files = write_records(self.train_items, self.labels, records, "train")
        calibration_files = write_records(sample(self.train_items, CALIBRATION_FRAMES), self.labels, records,
                                          "calibration")
        if self.val_items:  # the validation frames as records too: what was learned from is on disk, whole
            write_records(self.val_items, self.labels, records, "val")
        keras.utils.set_random_seed(self.hp.seed)
        with strategy_for(self.hp).scope():
            detector = create_detector(self.arch.name, self.labels, init=self.hp.init, hyperparameters=self.hp,
                                       previous=self.previous)
            model = detector.model
            family.freeze_backbone(model, self.hp.trainable_backbone_layers)
            optimizer = build_optimizer(self.hp)
            model.compile(optimizer=optimizer)
        schedule = optim.Schedule(self.hp, self.total)
        checkpoint = Checkpoint(self.output)
        restored = checkpoint.restore(model, optimizer, schedule)
        state = restored or TrainState()
        if restored:
            log.info("resuming %s at step %d of %d", self.output, state.step, self.total)
        logs = RunLogs(self.output, self.total, state.step if restored else None, True,
                       Progress(self.total, state.step, progress, f"train {self.arch.name}"))
        if not self.val_items and not restored:
            logs.progress.say("no validation frames: the version will be published unscored (no mAP)")

        def validate() -> None:
            recalibrate_batch_norm(model, pipeline(calibration_files, self.hp, self.size, train=False,
                                                   batch=max(2, self.hp.batch_size)))
            if not self.val_items:
                return
            count = len(self.val_items)
            logs.progress.say(f"step {state.step}: validating on {count} frame{'' if count == 1 else 's'} ...")
            metrics = score_detector(detector, self.val_items, self.labels)
            if judge_validation(state, metrics, self.hp):
                checkpoint.save_best(model)
            schedule.validated(metrics["map"])
            logs.validation(state, metrics)

        steps = _Steps(self, state, optimizer, schedule, checkpoint, logs, validate, checkpoint_every)
        with signals_set(self.stop):
            if state.stopped is None and state.step < self.total:
                batches = pipeline(train_files, self.hp, self.size, train=True, start=state.step * self.global_batch,
                                   batch=self.global_batch)
                model.fit(batches,
                          epochs=1, steps_per_epoch=self.total - state.step, verbose=0, callbacks=[steps])
        logs.progress.close()
        if steps.interrupted:
            logs.write({"event": "interrupted", "step": state.step, "total_steps": self.total})
            logs.close()
            raise TrainingInterrupted(state.step, checkpoint.last)
        if state.validated_at != state.step:
            validate()
        state.stopped = state.stopped or "completed"
        checkpoint.save(model, optimizer, state, schedule)
        logs.write({"event": "end", "step": state.step, "total_steps": self.total, "stopped": state.stopped,
                    "best_step": state.best_step})
        logs.close()
        checkpoint.load_best(model)
        model.compile()  # a fresh, unbuilt optimizer: the published model.keras carries no training state
        return publish_run(detector, state, RunRecord(self.output, self.hp, self.labels, self.train_items,
                                                      self.val_items, self.previous, run_id),
                           store, name, provenance, promote)


class _Steps(keras.callbacks.Callback):
    """What happens around each of ``model.fit``'s steps (see the module docstring)."""

    def __init__(self, run: _Run, state: TrainState, optimizer, schedule: optim.Schedule, checkpoint: Checkpoint,
                 logs: RunLogs, validate: Callable[[], None], checkpoint_every: int | None):
        super().__init__()
        self.run, self.state, self.optimizer, self.schedule = run, state, optimizer, schedule
        self.checkpoint, self.logs, self.validate = checkpoint, logs, validate
        total = run.total
        self.every = checkpoint_interval(total, checkpoint_every)
        self.validation_steps = validation_steps(total, run.hp.num_validations)
        self.log_every = min(50, max(1, total // 100))
        self.interrupted = False
        self._window_start, self._window_steps = time.perf_counter(), 0
        self._loss_sum, self._logged_sum = 0.0, 0.0  # Keras reports the epoch's running mean: sums give windows
        self._started, self._elapsed_before = time.monotonic(), state.elapsed_s

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        self.optimizer.learning_rate = self.run.hp.initial_learning_rate * self.schedule(self.state.step)

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        state, run = self.state, self.run
        state.step += 1
        state.elapsed_s = self._elapsed_before + time.monotonic() - self._started
        loss = float((logs or {}).get("loss", math.nan))
        if not math.isfinite(loss):
            raise FloatingPointError(f"the loss is {loss} at step {state.step}; try a lower initial-learning-rate or "
                                     "gradient-clip-norm")
        self._loss_sum, self._window_steps = loss * (batch + 1), self._window_steps + 1
        if self._window_steps >= self.log_every or state.step == run.total:
            self._log()
        if state.step in self.validation_steps and run.val_items:  # without them: one re-measure, at the end
            paused = time.perf_counter()
            self.validate()
            self._window_start += time.perf_counter() - paused
        if run.hp.max_training_hours is not None and state.elapsed_s >= run.hp.max_training_hours * 3600:
            state.stopped = state.stopped or "time-limit"
        signalled = run.stop.is_set()
        if signalled or state.stopped or state.step % self.every == 0:
            self.checkpoint.save(self.model, self.optimizer, state, self.schedule)
        if signalled or state.stopped:
            self.interrupted = signalled
            self.model.stop_training = True

    def _log(self) -> None:
        seconds = time.perf_counter() - self._window_start
        window_mean = (self._loss_sum - self._logged_sum) / max(self._window_steps, 1)
        self._logged_sum = self._loss_sum
        images_per_s = self._window_steps * self.run.global_batch / max(seconds, 1e-9)
        eta = (self.run.total - self.state.step) * seconds / max(self._window_steps, 1)
        lr = float(self.optimizer.learning_rate.numpy())
        self.logs.progress.step(self.state.step, window_mean, lr, images_per_s, eta)
        self.logs.write({"event": "train", "step": self.state.step, "total_steps": self.run.total, "lr": lr,
                         "loss": round(window_mean, 5), "images_per_s": round(images_per_s, 2),
                         "eta_s": round(eta, 1), "elapsed_s": round(self.state.elapsed_s, 3)},
                        {"train/lr": lr, "train/images_per_s": images_per_s, "train/loss": window_mean})
        self._window_start, self._window_steps = time.perf_counter(), 0
