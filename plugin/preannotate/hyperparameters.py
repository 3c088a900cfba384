"""The hyperparameter language our users know, in one place.

Written as ``key=value`` lines or ``;``/``,``-separated (``num-steps=2000; batch-size=4``), dashes or underscores
alike. A list value may continue after a comma (``augment=flip,colour``). ``schedule-step-N`` / ``schedule-lr-N``
give the multi-step schedule (step N switches to learning rate N). Unknown keys and bad values are errors that
say what is valid.

A text is parsed once, into ``Hyperparameters`` that remember which keys the user gave (``given``): the registry's
defaults for an architecture, ``Hyperparameters.updated`` with the user's text on top (``models.hyperparameters_for``),
and that one object travels on. The keys are one language to the user and four concerns to the code, each read by
the part that owns it:

* ``recipe`` (``Recipe``) — how the model is trained: steps, batch, optimizer, schedule, stopping, freezing, seed;
* ``network`` (``Network``) — what the model is: its input geometry, the TF OD API's network knobs, a designer's
  composition (``backbone``, ``neck``, ``head``, ...);
* ``post`` (``Postprocessing``) — what it returns: the served threshold and non-maximum suppression;
* ``sources`` (``Sources``) — what it learns from: which CVAT jobs count (``train-on``) and the validation share.

What the user did not give, the trainer may fit to the data (``Hyperparameters.replaced``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from preannotate.suggest import close_names

OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop", "adamax", "adagrad", "adadelta")
SCHEDULES = ("constant", "multi-step", "one-cycle", "step", "exponential", "cosine", "on-plateau")
AUGMENTATIONS = ("flip", "scale", "colour")
INITS = ("random", "pretrained", "previous")
# The model designer's parts (``models.composed_family``), spelled as the keys are: dashes or underscores alike.
BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
             *(f"efficientnet_b{i}" for i in range(8)), "efficientnet_v2_s", "efficientnet_v2_m", "efficientnet_v2_l",
             "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large")
NECKS = ("none", "fpn", "bifpn")
HEADS = ("retinanet", "fcos", "faster_rcnn", "mask_rcnn")
LEVELS = (2, 7)  # level i has stride 2^i: what a neck may produce
COMPOSITION = ("backbone", "top_level", "neck", "neck_levels", "neck_channels", "neck_layers", "head", "resize_input")
# CVAT jobs whose frames training learns from — and whose change starts training: state completed, stage validation
# or acceptance, or all of them. One grammar and one default, for the ``train-on`` key and PREANNOTATE_TRAIN_ON.
TRAIN_ON = ("completed", "validation", "acceptance", "all")
DEFAULT_TRAIN_ON = ("completed", "acceptance")


class HyperparameterError(ValueError):
    """A hyperparameter text that cannot be used; the message names the key and what is valid."""


def _choice(options: tuple[str, ...]):
    def parse(text: str) -> str:
        value = text.strip().lower().replace("_", "-")
        value = {"multistep": "multi-step", "onecycle": "one-cycle", "plateau": "on-plateau",
                 "color": "colour", "cosine-annealing": "cosine"}.get(value, value)
        if value not in options:
            raise ValueError(f"{text!r} is not one of {', '.join(options)}")
        return value
    return parse


def _part(options: tuple[str, ...]):
    """A part of a composed model: lower case, dashes as underscores (``EfficientNet-V2-S`` → ``efficientnet_v2_s``)."""
    def parse(text: str) -> str:
        value = text.strip().lower().replace("-", "_")
        if value not in options:
            raise ValueError(f"{text.strip()!r} is not one of {', '.join(o.replace('_', '-') for o in options)}")
        return value
    return parse


def _levels(text: str) -> tuple[int, int]:
    """``3-7`` → (3, 7): the neck's levels, lowest to highest."""
    match = re.fullmatch(r"\s*(\d+)\s*[-:,]\s*(\d+)\s*", text)
    low, high = (int(match.group(1)), int(match.group(2))) if match else (None, None)
    if low is None or not LEVELS[0] <= low <= high <= LEVELS[1]:
        raise ValueError(f"{text.strip()!r} is not LOW-HIGH with {LEVELS[0]} <= LOW <= HIGH <= {LEVELS[1]} "
                         "(e.g. 3-7)")
    return low, high


def _int(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError(f"{text.strip()!r} is not a whole number") from None


def _float(text: str) -> float:
    try:
        return float(text.strip())
    except ValueError:
        raise ValueError(f"{text.strip()!r} is not a number") from None


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{text!r} is not a boolean (true/false)")


def _augmentations(text: str) -> tuple[str, ...]:
    items = [t for t in re.split(r"[,+\s]+", text.strip().lower()) if t]
    if items in (["none"], ["off"], []):
        return ()
    parse = _choice(AUGMENTATIONS)
    return tuple(dict.fromkeys(parse(item) for item in items))


def parse_train_on(text: str) -> tuple[str, ...]:
    """``completed,acceptance`` → ``("completed", "acceptance")``. Earlier spellings of PREANNOTATE_TRAIN_ON
    (``state=completed``, ``stage=acceptance``, ``any``) read the same."""
    parse = _choice(TRAIN_ON)
    words = [re.sub(r"^(state|stage)\s*=\s*", "", item) for item in re.split(r"[,+\s]+", text.strip().lower())]
    items = tuple(dict.fromkeys(parse("all" if word == "any" else word) for word in words if word))
    if not items:
        raise ValueError("name the jobs to learn from: completed, validation, acceptance or all")
    return items


def _model_name(text: str) -> str:
    value = text.strip()
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*(@v?\d+)?", value):
        raise ValueError(f"{value!r} is not a model of the store (NAME or NAME@VERSION)")
    return value


def _optional(parse):
    def wrapped(text: str):
        return None if text.strip().lower() in ("", "none", "null", "off") else parse(text)
    return wrapped


def _param(default=dataclasses.MISSING, parse=None, help: str = "", low=None, high=None, **kwargs):
    return field(default=default, metadata={"parse": parse, "help": help, "low": low, "high": high}, **kwargs)


@dataclass(frozen=True)
class Recipe:
    """How the model is trained (the optimizer's recipe and the run's budget)."""

    num_steps: int | None = _param(None, _optional(_int), "optimizer steps (wins over epochs)", low=1)
    epochs: float | None = _param(None, _optional(_float), "passes over the training set", low=0.01)
    batch_size: int = _param(4, _int, "images per step (per GPU)", low=1)
    initial_learning_rate: float = _param(0.001, _float, "peak learning rate", low=1e-8, high=10)
    optimizer: str = _param("sgd", _choice(OPTIMIZERS), "one of " + ", ".join(OPTIMIZERS))
    momentum: float = _param(0.9, _float, "SGD/RMSprop momentum", low=0, high=1)
    rmsprop_decay: float = _param(0.9, _float, "RMSprop's decay of its squared-gradient average (rho)", low=0,
                                  high=1)
    rmsprop_epsilon: float = _param(1e-7, _float, "RMSprop's epsilon", low=0, high=10)
    weight_decay: float = _param(1e-4, _float, "L2 weight decay", low=0, high=1)
    schedule: str = _param("one-cycle", _choice(SCHEDULES), "one of " + ", ".join(SCHEDULES))
    schedule_steps: list[int] = _param(help="multi-step boundaries (schedule-step-N)", default_factory=list)
    schedule_lrs: list[float] = _param(help="learning rate after each boundary (schedule-lr-N)",
                                       default_factory=list)
    schedule_gamma: float = _param(0.1, _float, "decay factor of step/exponential/multi-step", low=0, high=1)
    schedule_step_size: int | None = _param(None, _optional(_int), "steps between decays of the step schedule", low=1)
    warmup_steps: int = _param(0, _int, "linear warm-up steps (one-cycle: its rise)", low=0)
    one_cycle_initial_factor: float = _param(0.04, _float, "one-cycle: the starting rate as a share of the peak",
                                             low=1e-9, high=1)
    one_cycle_final_factor: float = _param(4e-6, _float, "one-cycle: the final rate as a share of the peak",
                                           low=0, high=1)
    early_stopping_patience: int | None = _param(None, _optional(_int), "validations without improvement", low=1)
    early_stopping_delta: float = _param(0.0, _float, "least mAP gain that counts as improvement", low=0)
    gradient_clip_norm: float | None = _param(None, _optional(_float), "max gradient norm", low=0)
    trainable_backbone_layers: int | None = _param(None, _optional(_int), "backbone layers retrained (0-5)",
                                                   low=0, high=6)
    # Mask R-CNN's three phases (the seeds' stage-N-epochs), cumulative: the heads alone until stage 1 ends, the upper
    # backbone too until stage 2 ends, everything until stage 3 ends (the run's length unless num-steps/epochs say).
    stage_1_epochs: float | None = _param(None, _optional(_float), "epochs training the heads alone", low=0)
    stage_2_epochs: float | None = _param(None, _optional(_float), "epochs until the upper backbone trains too "
                                          "(cumulative)", low=0)
    stage_3_epochs: float | None = _param(None, _optional(_float), "epochs until the end, everything training "
                                          "(cumulative)", low=0)
    max_training_hours: float | None = _param(None, _optional(_float), "stop (and publish) after this long", low=0)
    num_validations: int = _param(5, _int, "evaluations on the validation split per run", low=0)
    augment: tuple[str, ...] = _param(("flip",), _augmentations, "any of " + ", ".join(AUGMENTATIONS) + " or none")
    seed: int = _param(0, _int, "seed of the split, the shuffling and the initialization")
    num_clones: int = _param(1, _int, "GPUs to train on (DistributedDataParallel)", low=1)
    init: str = _param("pretrained", _choice(INITS), "random, pretrained or previous (a published version)")
    init_from: str | None = _param(None, _optional(_model_name), "NAME[@VERSION] of any model in the store to start "
                                   "from (init=previous): its weights wherever names and shapes agree")

    def total_steps(self, train_images: int) -> int:
        """Optimizer steps of a run on ``train_images`` images: ``num-steps``, else ``epochs`` worth of batches."""
        if self.num_steps:
            return self.num_steps
        return max(1, round((self.epochs or 1.0) * self.steps_per_epoch(train_images)))

    def steps_per_epoch(self, train_images: int) -> int:
        return max(1, -(-train_images // (self.batch_size * self.num_clones)))

    def trainable_layers_at(self, step: int, train_images: int) -> int | None:
        """The backbone stages trained at ``step`` under stage-N-epochs (0 in stage 1, 3 in stage 2, all after), or
        None when the run has no stages."""
        if self.stage_1_epochs is None and self.stage_2_epochs is None:
            return None
        epoch = step / self.steps_per_epoch(train_images)
        if self.stage_1_epochs is not None and epoch < self.stage_1_epochs:
            return 0
        if self.stage_2_epochs is not None and epoch < self.stage_2_epochs:
            return 3
        return 99  # every stage


@dataclass(frozen=True)
class Network:
    """What the model is: its input geometry, the network knobs and, for the designer, its composition."""

    image_size: int | None = _param(None, _optional(_int), "shorter side (square side for SSD) in pixels", low=32)
    max_image_size: int | None = _param(None, _optional(_int), "longest side in pixels", low=32)
    letterbox: bool = _param(False, _bool, "resize keeping the aspect ratio and pad to a square")
    # Network knobs (``KNOBS``); None keeps the model's own.
    rpn_score_threshold: float | None = _param(None, _optional(_float), "two-stage: RPN score threshold", low=0,
                                               high=1)
    rpn_nms_iou_threshold: float | None = _param(None, _optional(_float), "two-stage: RPN NMS IoU", low=0, high=1)
    rpn_max_proposals: int | None = _param(None, _optional(_int), "two-stage: proposals kept after the RPN's NMS",
                                           low=1)
    matched_threshold: float | None = _param(None, _optional(_float), "IoU from which an anchor (or proposal) "
                                             "learns an object", low=0, high=1)
    unmatched_threshold: float | None = _param(None, _optional(_float), "IoU below which it learns background",
                                               low=0, high=1)
    box_coder_y_scale: float | None = _param(None, _optional(_float), "box coder weight of y", low=1e-6)
    box_coder_x_scale: float | None = _param(None, _optional(_float), "box coder weight of x", low=1e-6)
    box_coder_height_scale: float | None = _param(None, _optional(_float), "box coder weight of height", low=1e-6)
    box_coder_width_scale: float | None = _param(None, _optional(_float), "box coder weight of width", low=1e-6)
    backbone_batchnorm_decay: float | None = _param(None, _optional(_float), "backbone batch norms' decay (1 - "
                                                    "torch's momentum)", low=0, high=1)
    backbone_batchnorm_epsilon: float | None = _param(None, _optional(_float), "backbone batch norms' epsilon",
                                                      low=0, high=1)
    head_batchnorm_decay: float | None = _param(None, _optional(_float), "other batch norms' decay", low=0, high=1)
    head_batchnorm_epsilon: float | None = _param(None, _optional(_float), "other batch norms' epsilon", low=0,
                                                  high=1)
    anchor_min_scale: float | None = _param(None, _optional(_float), "SSD: the smallest default box's scale",
                                            low=0, high=1)
    anchor_max_scale: float | None = _param(None, _optional(_float), "SSD: the largest default box's scale", low=0,
                                            high=1)
    # The model designer (architecture ``custom``); None: the registry's composition. See ``COMPOSITION``.
    backbone: str | None = _param(None, _part(BACKBONES), "custom: the backbone (resnet18 ... mobilenet-v3-large)")
    top_level: int | None = _param(None, _int, "custom: the deepest backbone level used (stride 2^level)", low=2,
                                   high=5)
    neck: str | None = _param(None, _part(NECKS), "custom: none, fpn or bifpn")
    neck_levels: tuple[int, int] | None = _param(None, _levels, "custom: the levels the neck produces, e.g. 3-7")
    neck_channels: int | None = _param(None, _int, "custom: the neck's output channels", low=8, high=1024)
    neck_layers: int | None = _param(None, _int, "custom: BiFPN layers", low=1, high=8)
    head: str | None = _param(None, _part(HEADS), "custom: retinanet, fcos, faster-rcnn or mask-rcnn")
    resize_input: bool | None = _param(None, _bool, "custom: scale every frame to image-size (false: keep its own)")

    def knobs(self) -> dict[str, Any]:
        """The network knobs set (``KNOBS``), for the model families to apply."""
        return _set(self, KNOBS)

    def composition(self) -> dict[str, Any]:
        """The designer's keys set (``COMPOSITION``), for the composed family to build."""
        return _set(self, COMPOSITION)


@dataclass(frozen=True)
class Postprocessing:
    """What the model returns: the threshold it is served at and how detections are suppressed."""

    score_threshold: float = _param(0.5, _float, "served threshold of a label the validation frames choose none "
                                    "for (given: of every label)", low=0, high=1)
    # Post-processing (the TF OD API's second-stage keys); None keeps the model's own. See ``POSTPROCESSING``.
    nms_score_threshold: float | None = _param(None, _optional(_float), "score below which detections are dropped "
                                               "before non-maximum suppression", low=0, high=1)
    nms_iou_threshold: float | None = _param(None, _optional(_float), "IoU above which non-maximum suppression "
                                             "drops the weaker box", low=0, high=1)
    max_detections_per_class: int | None = _param(None, _optional(_int), "detections kept per class and image",
                                                  low=1)
    max_total_detections: int | None = _param(None, _optional(_int), "detections kept per image", low=1)

    def overrides(self) -> dict[str, Any]:
        """The post-processing keys set (``POSTPROCESSING``), for the model families to apply."""
        return _set(self, POSTPROCESSING)


@dataclass(frozen=True)
class Sources:
    """What the model learns from: which CVAT jobs count, and the share of frames held out for validation."""

    val_fraction: float = _param(0.2, _float, "share of frames held out for validation", low=0, high=0.9)
    train_on: tuple[str, ...] = _param(DEFAULT_TRAIN_ON, parse_train_on,
                                       "CVAT jobs to learn from: any of completed (state), validation, acceptance "
                                       "(stage), or all")


CONCERNS = {"recipe": Recipe, "network": Network, "post": Postprocessing, "sources": Sources}
# every key of the language: its concern and its field
FIELDS: dict[str, tuple[str, dataclasses.Field]] = {
    f.name: (concern, f) for concern, cls in CONCERNS.items() for f in dataclasses.fields(cls)}


def _set(group: Any, keys: tuple[str, ...]) -> dict[str, Any]:
    """Those of ``keys`` that are set (not None) in ``group``, with their values."""
    return {key: getattr(group, key) for key in keys if getattr(group, key) is not None}


@dataclass(frozen=True)
class Hyperparameters:
    """One parse of the user's keys: the four concerns, and which keys the user gave (the trainer fits only the
    others to the data)."""

    recipe: Recipe = field(default_factory=Recipe)
    network: Network = field(default_factory=Network)
    post: Postprocessing = field(default_factory=Postprocessing)
    sources: Sources = field(default_factory=Sources)
    given: frozenset[str] = field(default=frozenset(), compare=False)  # values make two equal, not their origin

    def value(self, key: str) -> Any:
        """The value of a key of the language (its canonical name), whichever concern holds it."""
        return getattr(getattr(self, FIELDS[key][0]), key)

    def replaced(self, **changes: Any) -> Hyperparameters:
        """A copy with ``changes`` (canonical keys) that are not the user's (what the trainer fits), ``given``
        kept."""
        by_concern: dict[str, dict[str, Any]] = {}
        for key, value in changes.items():
            by_concern.setdefault(FIELDS[key][0], {})[key] = value
        return dataclasses.replace(self, **{concern: dataclasses.replace(getattr(self, concern), **values)
                                            for concern, values in by_concern.items()})

    def to_dict(self) -> dict[str, Any]:
        """Every key and its value, flat, as JSON keeps them (manifests, ``run.json``)."""
        data = {}
        for concern in CONCERNS:
            for key, value in dataclasses.asdict(getattr(self, concern)).items():
                data[key] = list(value) if isinstance(value, tuple) else value
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Hyperparameters:
        return cls().updated(data, given=False)

    def updated(self, values: dict[str, Any] | str, given: bool = True) -> Hyperparameters:
        """A copy with ``values`` (a dict of Python values or of strings, or a hyperparameter text) applied; their
        keys join ``given`` unless ``given=False`` (defaults, not the user's choice)."""
        if isinstance(values, str):
            values = parse_pairs(values)
        named: set[str] = set()
        changes: dict[str, Any] = {}
        steps: dict[int, int] = dict(enumerate(self.recipe.schedule_steps, 1))
        lrs: dict[int, float] = dict(enumerate(self.recipe.schedule_lrs, 1))
        for raw_key, value in values.items():
            key = normalize_key(raw_key)
            numbered = re.fullmatch(r"schedule_(step|lr)_(\d+)", key)
            if numbered:
                named.add("schedule_steps" if numbered.group(1) == "step" else "schedule_lrs")
                target, parse = (steps, _int) if numbered.group(1) == "step" else (lrs, _float)
                target[int(numbered.group(2))] = converted = _convert(raw_key, value, parse)
                _check_range(raw_key, converted, 0, None)
                continue
            key = ALIASES.get(key, key)
            if key in REFUSED:
                raise HyperparameterError(f"{raw_key} is not offered: {REFUSED[key]}")
            if key == "val_split":  # Onepanel's percentage
                key, value = "val_fraction", _convert(raw_key, value, _float) / 100
            if key not in FIELDS:
                raise HyperparameterError(unknown_key(raw_key))
            named.add(key)
            definition = FIELDS[key][1]
            if value is None and definition.default is None:  # to_dict's "not set" (the text "none" is parsed)
                changes[key] = None
                continue
            meta = definition.metadata
            if key in ("schedule_steps", "schedule_lrs"):
                parse = _int if key == "schedule_steps" else _float
                items = value if isinstance(value, (list, tuple)) else re.split(r"[,+\s]+", str(value).strip())
                target = steps if key == "schedule_steps" else lrs
                target.clear()
                target.update({i: _convert(raw_key, v, parse) for i, v in enumerate(items, 1) if str(v)})
                for converted in target.values():
                    _check_range(raw_key, converted, 0, None)
                continue
            converted = _convert(raw_key, value, meta["parse"])
            _check_range(raw_key, converted, meta["low"], meta["high"])
            changes[key] = converted
        if "init_from" in named and changes.get("init_from"):
            if "init" in named and changes.get("init", "previous") != "previous":
                raise HyperparameterError("init-from starts from a model's weights: it goes with init=previous (or "
                                          f"no init), not init={changes['init']}")
            changes["init"] = "previous"
            named.add("init")
        if given and "schedule" not in named and any(normalize_key(k) in DECAY_KEYS for k in values):
            changes["schedule"] = "step"
            named.add("schedule")
        if given and "schedule_steps" in named and "schedule_lrs" not in named and set(lrs) != set(steps):
            lrs.clear()  # the defaults' rates went with the defaults' steps: the user's decay by schedule-gamma
        if lrs and set(lrs) != set(steps):
            raise HyperparameterError("schedule-lr-N needs a schedule-step-N for every N and the other way round "
                                      f"(got steps for N in {sorted(steps)}, rates for N in {sorted(lrs)})")
        changes["schedule_steps"] = [steps[i] for i in sorted(steps)]
        changes["schedule_lrs"] = [lrs[i] for i in sorted(lrs)]
        result = dataclasses.replace(self.replaced(**changes), given=self.given | named if given else self.given)
        result.check()
        return result

    def check(self) -> None:
        recipe = self.recipe
        if recipe.schedule_lrs and len(recipe.schedule_lrs) != len(recipe.schedule_steps):
            raise HyperparameterError("schedule-lr-N needs a schedule-step-N for every N "
                                      f"(got {len(recipe.schedule_steps)} steps, {len(recipe.schedule_lrs)} rates)")
        if recipe.schedule_steps != sorted(recipe.schedule_steps):
            raise HyperparameterError(f"schedule steps must increase, got {recipe.schedule_steps}")
        stages = [s for s in (recipe.stage_1_epochs, recipe.stage_2_epochs, recipe.stage_3_epochs) if s is not None]
        if stages != sorted(stages):
            raise HyperparameterError(f"stage-N-epochs are cumulative and must increase, got {stages}")
        if recipe.schedule == "multi-step" and not recipe.schedule_steps:
            raise HyperparameterError("schedule=multi-step needs schedule-step-1=N (and optionally schedule-lr-1=LR)")


# Spellings our users bring from Onepanel, the TF Object Detection API and torchvision's references.
ALIASES = {
    "steps": "num_steps", "num_train_steps": "num_steps", "iterations": "num_steps",
    "num_epochs": "epochs", "batch": "batch_size",
    "learning_rate": "initial_learning_rate", "lr": "initial_learning_rate",
    "clip_grad_norm": "gradient_clip_norm", "grad_clip": "gradient_clip_norm",
    "trainable_layers": "trainable_backbone_layers",
    "early_stopping": "early_stopping_patience", "patience": "early_stopping_patience",
    "warmup": "warmup_steps", "augmentation": "augment", "augmentations": "augment",
    "min_dimension": "image_size", "max_dimension": "max_image_size", "gpus": "num_clones",
    "validations": "num_validations",
    # the model designer's trainer page: multi-step (milestones, factor), one-cycle (initial and final rate factors,
    # warm-up period)
    "milestones": "schedule_steps", "multi_step_milestones": "schedule_steps", "factor": "schedule_gamma",
    "multi_step_factor": "schedule_gamma", "initial_lr_factor": "one_cycle_initial_factor",
    "final_lr_factor": "one_cycle_final_factor", "warmup_period": "warmup_steps",
    "max_iterations": "num_steps", "maximum_training_iterations": "num_steps", "max_hours": "max_training_hours",
    "maximum_training_hours": "max_training_hours", "number_of_validations": "num_validations",
    "stage1_epochs": "stage_1_epochs", "stage2_epochs": "stage_2_epochs", "stage3_epochs": "stage_3_epochs",
    # the TF OD API's names (Onepanel's SSD and Faster R-CNN pages)
    "momentum_optimizer_value": "momentum", "momentum_decay": "rmsprop_decay", "momentum_epsilon": "rmsprop_epsilon",
    "decay_steps": "schedule_step_size", "decay_factor": "schedule_gamma",
    "second_stage_nms_score_threshold": "nms_score_threshold",
    "second_stage_nms_iou_threshold": "nms_iou_threshold",
    "second_stage_max_detections_per_class": "max_detections_per_class",
    "second_stage_max_detections_max_total_detections": "max_total_detections",
    "max_detections": "max_total_detections",
    "first_stage_nms_score_threshold": "rpn_score_threshold", "first_stage_nms_iou_threshold": "rpn_nms_iou_threshold",
    "first_stage_max_proposals": "rpn_max_proposals",
    "boxcoder_y_scale": "box_coder_y_scale", "boxcoder_x_scale": "box_coder_x_scale",
    "boxcoder_height_scale": "box_coder_height_scale", "boxcoder_width_scale": "box_coder_width_scale",
    "first_stage_batchnorm_decay": "backbone_batchnorm_decay", "first_stage_batchnorm_epsilon":
        "backbone_batchnorm_epsilon", "second_stage_batchnorm_decay": "head_batchnorm_decay",
    "second_stage_batchnorm_epsilon": "head_batchnorm_epsilon",
    "anchor_generator_min_scale": "anchor_min_scale", "anchor_generator_max_scale": "anchor_max_scale",
}
# The TF OD API's exponential_decay_learning_rate (decay_steps, decay_factor) is a staircase by default: our ``step``
# schedule. Those keys bring it unless the user names a schedule.
DECAY_KEYS = ("decay_steps", "decay_factor")
POSTPROCESSING = ("nms_score_threshold", "nms_iou_threshold", "max_detections_per_class", "max_total_detections")
# The network and box-coding keys of the TF OD API pages, set on the built model where it has the part (the
# registry says which architectures do: ``Architecture.knobs``).
KNOBS = ("rpn_score_threshold", "rpn_nms_iou_threshold", "rpn_max_proposals", "matched_threshold",
         "unmatched_threshold", "box_coder_y_scale", "box_coder_x_scale", "box_coder_height_scale",
         "box_coder_width_scale", "backbone_batchnorm_decay", "backbone_batchnorm_epsilon", "head_batchnorm_decay",
         "head_batchnorm_epsilon", "anchor_min_scale", "anchor_max_scale")
STAGES = ("stage_1_epochs", "stage_2_epochs", "stage_3_epochs")  # the torch trainer's staged unfreezing
# Keys of those pages that no model here has: refused with the reason (and what to use instead).
REFUSED = {
    "second_stage_use_dropout": "torchvision's box heads and keras-hub's have no dropout",
    "second_stage_dropout_keep_probability": "torchvision's box heads and keras-hub's have no dropout",
    "second_stage_regularizer_weight": "an L2 weight on the heads alone is not offered; weight-decay applies to "
                                       "every weight",
    "first_stage_regularizer_weight": "an L2 weight on the heads alone is not offered; weight-decay applies to "
                                      "every weight",
    "first_stage_features_stride": "the backbones' strides are fixed; the designer (architecture custom) chooses "
                                   "its levels with top-level and neck-levels",
    "height_stride": "anchors follow the feature maps' strides; the designer (architecture custom) chooses the "
                     "levels with neck-levels",
    "width_stride": "anchors follow the feature maps' strides; the designer (architecture custom) chooses the "
                    "levels with neck-levels",
    "maxpool_kernel_size": "torchvision's two-stage models pool regions with RoIAlign, not a max pool",
    "maxpool_stride": "torchvision's two-stage models pool regions with RoIAlign, not a max pool",
    "first_stage_activation": "torchvision's SSDlite fixes ReLU6 in its backbone and head",
    "second_stage_activation": "torchvision's SSDlite fixes ReLU6 in its backbone and head",
    "second_stage_kernel_size": "torchvision's SSDlite head fixes its 3x3 depthwise kernels",
    "second_stage_box_code_size": "boxes are coded with 4 numbers in every model here",
    "anchor_generator_num_layers": "SSDlite predicts on its six feature maps; the designer (architecture custom) "
                                   "chooses the levels with neck-levels",
}


def normalize_key(key: str) -> str:
    """``--Stage1-Epochs`` → ``stage1_epochs``: case, dashes and a command line's leading dashes do not matter."""
    return key.strip().lstrip("-").lower().replace("-", "_")


def valid_keys() -> list[str]:
    names = [key.replace("_", "-") for key in FIELDS if key not in ("schedule_steps", "schedule_lrs")]
    return names + ["schedule-step-N", "schedule-lr-N"]


def unknown_key(key: str) -> str:
    """The sentence for a key the language lacks: the keys (and aliases) it may mean, and where to read them all,
    instead of the ~70 of them at once."""
    close = close_names(normalize_key(key), [*FIELDS, *ALIASES])
    hint = f"; did you mean {' or '.join(name.replace('_', '-') for name in close)}?" if close else ""
    return f"unknown hyperparameter {key.strip()!r}{hint} (`preannotate train --help-hyperparameters` lists them all)"


def parse_pairs(text: str) -> dict[str, str]:
    """``"a=1; b=2\\nc=x,y"`` → ``{"a": "1", "b": "2", "c": "x,y"}``; a comma item without ``=`` continues
    the previous value (a list); ``#`` starts a comment that runs to the end of its line."""
    pairs: dict[str, str] = {}
    last_key = None
    uncommented = "\n".join(line.partition("#")[0] for line in text.splitlines())
    for token in re.split(r"[;\n,]", uncommented):
        token = token.strip()
        if not token:
            continue
        if "=" not in token:
            if last_key is None:
                raise HyperparameterError(f"{token!r} is not key=value (e.g. num-steps=2000; batch-size=8)")
            pairs[last_key] += "," + token
            continue
        key, _, value = token.partition("=")
        last_key = key.strip()
        pairs[last_key] = value.strip()
    return pairs


def help_text() -> str:
    """Every key of the language with what it does, grouped by concern."""
    lines = []
    for concern, cls in CONCERNS.items():
        lines.append(f"\n{concern}: {cls.__doc__.splitlines()[0]}")
        for f in dataclasses.fields(cls):
            if f.name in ("schedule_steps", "schedule_lrs"):
                continue
            lines.append(f"  {f.name.replace('_', '-'):30} {f.metadata['help']}")
            if f.name == "schedule":
                lines.append(f"  {'schedule-step-N, schedule-lr-N':30} multi-step schedule: at step N switch to rate N")
    return "\n".join(lines).lstrip("\n")


def _convert(key: str, value: Any, parse) -> Any:
    """``value`` (text, or a Python value as ``to_dict`` and the registry give them) parsed and checked by
    ``parse``: a Python value goes through its text, so ``2.5`` steps or a ``None`` rate fail as text would."""
    if isinstance(value, (list, tuple)) and parse in (_augmentations, parse_train_on):
        value = ",".join(str(v) for v in value)
    elif isinstance(value, (list, tuple)) and parse is _levels:
        value = "-".join(str(v) for v in value)
    elif not isinstance(value, str):
        value = str(value)
    try:
        return parse(value)
    except ValueError as error:
        raise HyperparameterError(f"bad value for {key}: {error}") from None


def _check_range(key: str, value: Any, low, high) -> None:
    if value is None or isinstance(value, (str, tuple, bool)):
        return
    if not math.isfinite(value):
        raise HyperparameterError(f"bad value for {key}: {value} (must be a finite number)")
    if low is not None and value < low or high is not None and value > high:
        bounds = f"at least {low}" if high is None else f"between {low} and {high}"
        raise HyperparameterError(f"bad value for {key}: {value} (must be {bounds})")
