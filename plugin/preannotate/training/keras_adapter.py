"""What a TensorFlow run owns (``training.loop.FrameworkAdapter``): a keras-hub detector stepped by Keras's own
``train_step`` (its focal and Huber losses) over our TFRecords.

The frames are written once as TF Object Detection API records (``formats.tfrecord.frame_example``, what
``preannotate export --format tfrecord`` writes) into ``records/`` of the output directory, and read back through
``tf.data``: parse, decode, letterbox or squash to the model's square, augment (stateless, seeded by the sample's
position, so a resumed run draws the same), pad and batch, prefetch — all in the graph. Each step sets the learning
rate of ``optim.Schedule`` and runs the model's compiled train function on the next batch (what ``model.fit`` runs,
one step at a time). ``last.keras.npz`` holds the weights, the optimizer's variables and the run's state (a run
killed even with SIGKILL resumes at the sample it would have drawn next); ``best.weights.npz`` the best validation's
weights. Validation re-measures the batch norms, then scores the detector's own ``detect`` with COCO mAP.
``num-clones=N`` trains on N GPUs with ``tf.distribute.MirroredStrategy``.
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from preannotate.files import replacing
from preannotate.hyperparameters import HyperparameterError, Hyperparameters, Recipe
from preannotate.models import Detector, create_detector
from preannotate.models import keras_family as family
from preannotate.shapes import Label
from preannotate.training import optim
from preannotate.training.evaluation import score_detector
from preannotate.training.loop import RunSpec, StepOutcome
from preannotate.training.runs import CALIBRATION_FRAMES, TrainState, sample

tf, keras = family.tf, family.keras

SHUFFLE_BUFFER = 2048
_FEATURES = {
    "image/encoded": tf.io.FixedLenFeature([], tf.string),
    **{f"image/object/bbox/{k}": tf.io.VarLenFeature(tf.float32) for k in ("xmin", "ymin", "xmax", "ymax")},
    "image/object/class/label": tf.io.VarLenFeature(tf.int64),
}


class Adapter:
    FILES = ("last.keras.npz", "best.weights.npz", "records")
    main = True  # one process: MirroredStrategy spreads a step over the GPUs

    def __init__(self, spec: RunSpec, device: str | None = None, workers: int | None = None):
        # ``device`` and ``workers`` are TensorFlow's to choose: every GPU it sees, tf.data's autotuned parallelism
        self.spec = spec
        self.checkpoint, self.best = spec.output / "last.keras.npz", spec.output / "best.weights.npz"
        recipe = spec.hp.recipe
        self.global_batch = recipe.batch_size * recipe.num_clones  # batch-size is per GPU; Keras splits the whole
        self.size = spec.hp.network.image_size or spec.arch.image_size

    def shared(self, value: Any) -> Any:
        return value

    def build(self) -> TrainState | None:
        spec, hp = self.spec, self.spec.hp
        records = spec.output / "records"
        self.train_files = write_records(spec.train_items, spec.labels, records, "train")
        self.calibration_files = write_records(sample(spec.train_items, CALIBRATION_FRAMES), spec.labels, records,
                                               "calibration")
        if spec.val_items:  # the validation frames as records too: what was learned from is on disk, whole
            write_records(spec.val_items, spec.labels, records, "val")
        keras.utils.set_random_seed(hp.recipe.seed)
        self.strategy = strategy_for(hp.recipe)
        with self.strategy.scope():
            self.detector = create_detector(spec.arch.name, spec.labels, init=hp.recipe.init, hyperparameters=hp,
                                            previous=spec.previous)
            self.model = self.detector.model
            family.freeze_backbone(self.model, hp.recipe.trainable_backbone_layers, hp.recipe.init)
            self.optimizer = build_optimizer(hp.recipe)
            self.model.compile(optimizer=self.optimizer)
            self.optimizer.build(self.model.trainable_variables)
        self.schedule = optim.Schedule(hp.recipe, spec.total)
        return self._restore()

    def _restore(self) -> TrainState | None:
        if not self.checkpoint.exists():
            return None
        with np.load(self.checkpoint) as saved:
            for i, w in enumerate(self.model.weights):
                w.assign(saved[f"w{i}"])
            for i, v in enumerate(self.optimizer.variables):
                v.assign(saved[f"o{i}"])
            meta = json.loads(saved["meta"].tobytes())
        self.schedule.plateau_scale, self.schedule.plateau_best = meta["plateau"]
        names = {f.name for f in dataclasses.fields(TrainState)}
        return TrainState(**{k: v for k, v in meta["state"].items() if k in names})

    def publishable(self) -> Detector:
        if self.best.exists():
            _assign(self.model, self.best)
        self.model.compile()  # a fresh, unbuilt optimizer: the published model.keras carries no training state
        return self.detector

    def start(self, step: int) -> None:
        batches = pipeline(self.train_files, self.spec.hp, self.size, train=True, start=step * self.global_batch,
                           batch=self.global_batch)
        self.batches = iter(self.strategy.experimental_distribute_dataset(batches))
        self.model.make_train_function()

    def prepare(self, step: int) -> dict[str, Any] | None:
        return None  # the stage keys are torch's (the registry refuses them for Keras models)

    def step(self, step: int) -> StepOutcome:
        lr = self.spec.hp.recipe.initial_learning_rate * self.schedule(step - 1)
        self.optimizer.learning_rate = lr
        self.model.reset_metrics()  # the loss logged is this step's, not a running mean
        logs = self.model.train_function(self.batches)
        return StepOutcome({"loss": float(logs["loss"])}, lr)

    def agree(self, signalled: bool, state: TrainState) -> bool:
        return signalled

    def evaluate(self) -> dict[str, Any] | None:
        hp = self.spec.hp
        recalibrate_batch_norm(self.model, pipeline(self.calibration_files, hp, self.size, train=False,
                                                    batch=max(2, hp.recipe.batch_size)))
        if not self.spec.val_items:
            return None
        return score_detector(self.detector, self.spec.val_items, self.spec.labels)

    def validated(self, score: float | None) -> None:
        self.schedule.validated(score)

    def save(self, state: TrainState) -> None:
        arrays = {f"w{i}": np.asarray(w) for i, w in enumerate(self.model.weights)}
        arrays.update({f"o{i}": np.asarray(v) for i, v in enumerate(self.optimizer.variables)})
        meta = {"state": dataclasses.asdict(state), "plateau": [self.schedule.plateau_scale,
                                                                self.schedule.plateau_best]}
        _save_npz(self.checkpoint, {**arrays, "meta": np.frombuffer(json.dumps(meta).encode(), np.uint8)})

    def save_best(self, state: TrainState) -> None:
        _save_npz(self.best, {f"w{i}": np.asarray(w) for i, w in enumerate(self.model.weights)})

    def close(self) -> None:
        self.batches = None


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
    OD API records (padding boxes: label -1). ``train``: shuffled by ``hp.recipe.seed`` without end, augmented, starting
    at sample ``start`` (a resumed run's next)."""
    batch = batch or hp.recipe.batch_size
    records = tf.data.TFRecordDataset([str(f) for f in files])
    if train:
        records = records.shuffle(SHUFFLE_BUFFER, seed=hp.recipe.seed, reshuffle_each_iteration=True).repeat()
    samples = records.enumerate().skip(start)  # skipped before decoding: a resume reads, never decodes, the past

    def parse(index, serialized):
        example = tf.io.parse_single_example(serialized, _FEATURES)
        image = tf.cast(tf.io.decode_image(example["image/encoded"], channels=3, expand_animations=False),
                        tf.float32)
        height, width = tf.cast(tf.shape(image)[0], tf.float32), tf.cast(tf.shape(image)[1], tf.float32)
        xmin, ymin, xmax, ymax = (tf.sparse.to_dense(example[f"image/object/bbox/{k}"])
                                  for k in ("xmin", "ymin", "xmax", "ymax"))
        boxes = tf.stack([xmin * width, ymin * height, xmax * width, ymax * height], axis=-1)
        if hp.network.letterbox:  # pad to a square first, centred as serving pads (keras_family.KerasDetector.square)
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
            image, boxes = augment(image, boxes, size, hp, tf.stack([tf.cast(hp.recipe.seed, tf.int64), index]))
        # one padding box always: a batch without objects still has a box dimension
        boxes = tf.concat([boxes, tf.zeros([1, 4])], axis=0)
        classes = tf.concat([classes, [-1.0]], axis=0)
        return image, {"boxes": boxes, "labels": classes}

    batches = samples.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).padded_batch(
        batch, padded_shapes=([size, size, 3], {"boxes": [None, 4], "labels": [None]}),
        padding_values=(0.0, {"boxes": 0.0, "labels": -1.0}), drop_remainder=train)
    return batches.prefetch(tf.data.AUTOTUNE)


def augment(image, boxes, size: int, hp: Hyperparameters, seed):
    """``hp.recipe.augment`` in the graph, stateless (the same sample draws the same): ``flip`` (horizontal), ``colour``
    (brightness, contrast, saturation), ``scale`` (zoom out 1-1.5x onto a grey canvas)."""
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 6)
    if "flip" in hp.recipe.augment:
        flip = tf.random.stateless_uniform([], seeds[0]) < 0.5
        image = tf.where(flip, image[:, ::-1, :], image)
        boxes = tf.where(flip, tf.stack([size - boxes[:, 2], boxes[:, 1], size - boxes[:, 0], boxes[:, 3]], -1), boxes)
    if "colour" in hp.recipe.augment:
        image = tf.image.stateless_random_brightness(image, 0.2 * 255, seeds[1])
        image = tf.image.stateless_random_contrast(image, 0.8, 1.2, seeds[2])
        image = tf.image.stateless_random_saturation(image, 0.8, 1.2, seeds[3])
        image = tf.clip_by_value(image, 0.0, 255.0)
    if "scale" in hp.recipe.augment:
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


def build_optimizer(recipe: Recipe) -> keras.optimizers.Optimizer:
    """The Keras optimizer of the ``recipe`` (weight decay decoupled, as Keras applies it; ``gradient-clip-norm``
    clips the global norm). Its rate is set at every step from ``optim.Schedule``."""
    common = {"learning_rate": recipe.initial_learning_rate, "weight_decay": recipe.weight_decay or None,
              "global_clipnorm": recipe.gradient_clip_norm}
    name = recipe.optimizer
    if name == "sgd":
        return keras.optimizers.SGD(momentum=recipe.momentum, **common)
    if name == "rmsprop":  # the TF OD API's rms_prop_optimizer: decay (rho), momentum, epsilon
        return keras.optimizers.RMSprop(rho=recipe.rmsprop_decay, momentum=recipe.momentum,
                                        epsilon=recipe.rmsprop_epsilon, **common)
    classes = {"adam": keras.optimizers.Adam, "adamw": keras.optimizers.AdamW, "adamax": keras.optimizers.Adamax,
               "adagrad": keras.optimizers.Adagrad, "adadelta": keras.optimizers.Adadelta}
    return classes[name](**common)


def strategy_for(recipe: Recipe) -> tf.distribute.Strategy:
    """``num-clones`` GPUs under ``MirroredStrategy``, else TensorFlow's default (one device)."""
    if recipe.num_clones <= 1:
        return tf.distribute.get_strategy()
    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) < recipe.num_clones:
        raise HyperparameterError(f"num-clones={recipe.num_clones} trains on {recipe.num_clones} GPUs with "
                                  f"MirroredStrategy, and TensorFlow sees {len(gpus)}")
    return tf.distribute.MirroredStrategy([gpu.name for gpu in gpus[:recipe.num_clones]])


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


def _assign(model: keras.Model, path: Path) -> None:
    with np.load(path) as saved:
        for i, w in enumerate(model.weights):
            w.assign(saved[f"w{i}"])


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    with replacing(path) as temporary:
        temporary.write_bytes(buffer.getvalue())
