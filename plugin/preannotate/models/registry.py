"""The model registry: every architecture we can build, train and serve, with its defaults — in one place."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from preannotate.cvat import lambda_spec
from preannotate.hyperparameters import (
    COMPOSITION,
    KNOBS,
    POSTPROCESSING,
    STAGES,
    HyperparameterError,
    Hyperparameters,
)
from preannotate.suggest import did_you_mean


class UnknownArchitecture(ValueError):
    pass


class PretrainedWeightsUnavailable(RuntimeError):
    """The pretrained weights are neither on disk nor downloadable; the message says where to put them."""


@dataclass(frozen=True)
class Architecture:
    name: str
    family: str                      # the module in preannotate.models that builds and runs it (models.family)
    output: str                      # "rectangle" (boxes), "mask" (instance masks, also sent as polygons), "tag" or
    #                                  "skeleton" (keypoints: skeleton and points labels)
    description: str
    pretrained: str | None           # torchvision weights enum member with COCO (or backbone) weights
    pretrained_kind: str = "coco"    # "coco": whole detector trained on COCO; "backbone": ImageNet backbone only;
    #                                  "imagenet": a whole classifier trained on ImageNet
    image_size: int = 800            # shorter side the model resizes to (square side for SSD)
    max_image_size: int = 1333
    fixed_size: bool = False         # squashes every frame to an image_size square (SSD), else keeps the aspect
    min_batch_size: int = 1          # SSD: its last batch norms see 1x1 maps and cannot normalize a single image
    cpu_timeout_s: int = 30          # Nuclio eventTimeout on the CPU (one frame, with margin) ...
    gpu_timeout_s: int = 30          # ... and on a GPU
    defaults: dict[str, Any] = field(default_factory=dict)  # hyperparameters that differ from the global defaults
    scratch: dict[str, Any] = field(default_factory=dict)   # what differs when it starts from random weights
    postprocessing: tuple[str, ...] = ()  # the post-processing keys (hyperparameters.POSTPROCESSING) it honours
    knobs: tuple[str, ...] = ()           # the network keys (hyperparameters.KNOBS) it has the parts for
    build: dict[str, Any] = field(default_factory=dict)     # what its family needs to build it (keras: encoder...)
    framework: str = "pytorch"       # what its family runs on (manifests, CVAT's function annotations, functions/,
    #                                  the training adapter, the base image): "pytorch" or "tensorflow"

    def resolved(self, hp: Hyperparameters) -> Architecture:
        """This architecture as ``hp`` composes it: a composed model with the Mask R-CNN head returns masks."""
        if self.family == "composed" and (hp.network.head or self.build.get("head")) == "mask_rcnn":
            return dataclasses.replace(self, output="mask")
        return self

    @property
    def label_types(self) -> tuple[str, ...]:
        """The CVAT label types this model's output fills (``cvat.lambda_spec.FILLS``): boxes fill rectangle labels,
        upright only (a rotated rectangle is served as the upright box around it, an ellipse label not at all);
        instance masks fill mask and polygon labels (CVAT's lambda manager turns a mask into a polygon for a polygon
        label) and rectangle and ellipse labels, each mask fitted to its label's shape, rotated rectangles included
        (``formats.masks.fit_outline``); a classifier's tags fill tag labels; a keypoint model's keypoints fill
        skeleton labels and points labels (one point each)."""
        return lambda_spec.label_types(self.output)

    @property
    def function_name(self) -> str:
        """The Nuclio function (and CVAT function id) that serves this architecture."""
        return function_name(self.name, self.framework)


def function_name(model_name: str, framework: str = "pytorch") -> str:
    """The Nuclio function (and CVAT function id) serving a model, an architecture's or one of the store's:
    ``pth-`` or ``tf-`` as CVAT's own, then the name in lower case with dashes."""
    return FUNCTION_PREFIX[framework] + re.sub(r"[^a-z0-9]+", "-", model_name.lower()).strip("-")


FUNCTION_PREFIX = {"pytorch": "pth-preannotate-", "tensorflow": "tf-preannotate-"}  # as CVAT's own functions
# torchvision's detectors take a score floor, an NMS IoU and a cap per image; none caps detections per class.
_TORCH_POSTPROCESSING = ("nms_score_threshold", "nms_iou_threshold", "max_total_detections")
# The network keys of the TF OD API pages on torchvision's parts (torchvision_family.apply_knobs): every model has
# batch norms, a box coder, a matcher and staged unfreezing; two-stage ones an RPN; SSD default boxes with scales.
_TORCH_KNOBS = (*STAGES, "matched_threshold", "unmatched_threshold", "box_coder_y_scale", "box_coder_x_scale",
               "box_coder_height_scale", "box_coder_width_scale", "backbone_batchnorm_decay",
               "backbone_batchnorm_epsilon", "head_batchnorm_decay", "head_batchnorm_epsilon")
_RPN = ("rpn_score_threshold", "rpn_nms_iou_threshold", "rpn_max_proposals")
_SSD_KNOBS = (*_TORCH_KNOBS, "anchor_min_scale", "anchor_max_scale")

# Defaults follow what our users trained with from pretrained weights (Onepanel's TF OD API templates): SSD batch 24,
# learning rate 0.004, 15,000 steps; Faster R-CNN batch 1, 0.0003, 10,000 steps. The trainer fits the budget to
# the data and keeps the warm-up's and the schedule's share of the run (training.runs.effective_hyperparameters).
_SSD = {"batch_size": 24, "initial_learning_rate": 0.004, "num_steps": 15000, "optimizer": "sgd",
        "schedule": "cosine", "warmup_steps": 500, "weight_decay": 4e-5}
_RCNN = {"batch_size": 1, "initial_learning_rate": 0.0003, "num_steps": 10000, "optimizer": "sgd",
         "schedule": "multi-step", "schedule_steps": [9000], "schedule_lrs": [0.00003], "warmup_steps": 100}
_RETINA = {**_RCNN, "batch_size": 2, "initial_learning_rate": 0.001}
# From random weights nothing is there to protect from a high rate, and SGD at a fine-tuning rate crawls: the recipe
# of torchvision-style from-scratch training (AdamW, one-cycle: a 30 % rise then annealing, clipped gradients).
_SCRATCH = {"optimizer": "adamw", "initial_learning_rate": 0.003, "weight_decay": 1e-4, "schedule": "one-cycle",
            "warmup_steps": 0, "schedule_steps": [], "schedule_lrs": [], "gradient_clip_norm": 10.0}
_RCNN_SCRATCH = {**_SCRATCH, "initial_learning_rate": 0.001}

ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in [
    Architecture(
        "ssdlite320_mobilenet_v3_large", "torchvision", "rectangle",
        "SSDlite 320 with a MobileNetV3-Large backbone: the recommended default, fast on a CPU",
        "SSDLite320_MobileNet_V3_Large_Weights.COCO_V1", image_size=320, max_image_size=320,
        fixed_size=True, min_batch_size=2, defaults=_SSD, scratch=_SCRATCH,
        postprocessing=_TORCH_POSTPROCESSING, knobs=_SSD_KNOBS),
    Architecture(
        "fasterrcnn_mobilenet_v3_large_320_fpn", "torchvision", "rectangle",
        "Faster R-CNN, MobileNetV3-Large FPN at 320 px: quick two-stage detector for CPUs",
        "FasterRCNN_MobileNet_V3_Large_320_FPN_Weights.COCO_V1", image_size=320, max_image_size=640,
        defaults={**_RCNN, "batch_size": 4, "initial_learning_rate": 0.002}, scratch=_RCNN_SCRATCH,
        postprocessing=_TORCH_POSTPROCESSING, knobs=(*_TORCH_KNOBS, *_RPN)),
    Architecture(
        "fasterrcnn_mobilenet_v3_large_fpn", "torchvision", "rectangle",
        "Faster R-CNN, MobileNetV3-Large FPN at 800 px",
        "FasterRCNN_MobileNet_V3_Large_FPN_Weights.COCO_V1", image_size=800, max_image_size=1333,
        cpu_timeout_s=60, defaults={**_RCNN, "batch_size": 2, "initial_learning_rate": 0.001}, scratch=_RCNN_SCRATCH,
        postprocessing=_TORCH_POSTPROCESSING, knobs=(*_TORCH_KNOBS, *_RPN)),
    Architecture(
        "fasterrcnn_resnet50_fpn", "torchvision", "rectangle",
        "Faster R-CNN, ResNet-50 FPN: accurate boxes, best on a GPU",
        "FasterRCNN_ResNet50_FPN_Weights.COCO_V1", cpu_timeout_s=60, defaults=_RCNN, scratch=_RCNN_SCRATCH,
        postprocessing=_TORCH_POSTPROCESSING, knobs=(*_TORCH_KNOBS, *_RPN)),
    Architecture(
        "fasterrcnn_resnet101_fpn", "torchvision", "rectangle",
        "Faster R-CNN, ResNet-101 FPN (ImageNet backbone; train it on your labels)",
        "ResNet101_Weights.IMAGENET1K_V2", pretrained_kind="backbone", cpu_timeout_s=90,
        defaults=_RCNN, scratch=_RCNN_SCRATCH,
        postprocessing=_TORCH_POSTPROCESSING, knobs=(*_TORCH_KNOBS, *_RPN)),
    Architecture(
        "retinanet_resnet50_fpn", "torchvision", "rectangle",
        "RetinaNet, ResNet-50 FPN: one-stage detector, good on many small objects",
        "RetinaNet_ResNet50_FPN_Weights.COCO_V1", cpu_timeout_s=60, defaults=_RETINA, scratch=_RCNN_SCRATCH,
        postprocessing=_TORCH_POSTPROCESSING, knobs=_TORCH_KNOBS),
    Architecture(
        "maskrcnn_resnet50_fpn", "torchvision", "mask",
        "Mask R-CNN, ResNet-50 FPN: instance masks, returned as CVAT masks with polygons",
        "MaskRCNN_ResNet50_FPN_Weights.COCO_V1", cpu_timeout_s=90, defaults=_RCNN, scratch=_RCNN_SCRATCH,
        postprocessing=_TORCH_POSTPROCESSING, knobs=(*_TORCH_KNOBS, *_RPN)),
]}

# Keypoint R-CNN (models.keypoint_family): skeleton and points labels. The light one trains from random weights on a
# CPU: its FPN starts at stride 8 (keypoints need finer places than boxes), and its heads are where the time goes
# (they run once per sampled region), so a keypoint head of four 64-channel
# convolutions (torchvision's: eight of 512), a box head of 256 (1024), 64 sampled regions an image (512), and at most
# 50 detections a frame.
_KEYPOINT_KNOBS = (*_TORCH_KNOBS, *_RPN)
for _arch in [
    Architecture(
        "keypointrcnn_mobilenet_v3_large_fpn", "keypoint", "skeleton",
        "Keypoint R-CNN, MobileNetV3-Large FPN, light keypoint head: skeletons and points, trainable on a CPU",
        "MobileNet_V3_Large_Weights.IMAGENET1K_V1", pretrained_kind="backbone", image_size=320, max_image_size=640,
        defaults={**_RCNN, "batch_size": 4, "initial_learning_rate": 0.002}, scratch=_RCNN_SCRATCH,
        postprocessing=_TORCH_POSTPROCESSING, knobs=_KEYPOINT_KNOBS,
        build={"backbone": "mobilenet_v3_large", "returned_layers": (2, 3, 4, 5), "keypoint_head": (64, 64, 64, 64),
               "box_head": 256,
               "rcnn": {"box_batch_size_per_image": 64, "rpn_pre_nms_top_n_train": 1000,
                        "rpn_post_nms_top_n_train": 500, "rpn_pre_nms_top_n_test": 150,
                        "rpn_post_nms_top_n_test": 150, "box_detections_per_img": 50}}),
    Architecture(
        "keypointrcnn_resnet50_fpn", "keypoint", "skeleton",
        "Keypoint R-CNN, ResNet-50 FPN: skeletons and points (COCO's person pose; train it on your skeletons)",
        "KeypointRCNN_ResNet50_FPN_Weights.COCO_V1", cpu_timeout_s=90, defaults=_RCNN, scratch=_RCNN_SCRATCH,
        postprocessing=_TORCH_POSTPROCESSING, knobs=_KEYPOINT_KNOBS),
]:
    ARCHITECTURES[_arch.name] = _arch

# TensorFlow: keras-hub's RetinaNet detector (anchors, focal loss, FPN) over a feature-pyramid encoder, trained from
# the TFRecords of our bridge (training.keras_adapter). ``build``: the encoder (keras_family.ENCODERS), the pyramid
# levels, the shared head's depth, and a keras-hub preset holding COCO weights of the whole detector.
# SSD's recipe from pretrained weights is the TF OD API's ssd_mobilenet_v2 config (RMSprop, momentum 0.9, decay 0.9,
# epsilon 1.0, rate 0.004 decaying by 0.95 every 800,720 steps on 15,000) fitted by the trainer like the others.
_KERAS_SCRATCH = {**_SCRATCH, "gradient_clip_norm": 10.0}
_KERAS_POSTPROCESSING = POSTPROCESSING  # combined (per-class) NMS takes every knob of the TF OD API
for _arch in [
    Architecture(
        "keras_ssd_mobilenet_v2_fpnlite_320", "keras", "rectangle",
        "SSD MobileNetV2 FPN-lite 320 (TensorFlow/Keras): the TF OD API users' default, trained from TFRecords",
        "imagenet", pretrained_kind="backbone", image_size=320, max_image_size=320, fixed_size=True,
        min_batch_size=2, defaults={**_SSD, "optimizer": "rmsprop", "schedule": "step", "schedule_gamma": 0.95,
                                     "schedule_step_size": 800, "rmsprop_epsilon": 1.0},
        scratch=_KERAS_SCRATCH, postprocessing=_KERAS_POSTPROCESSING,
        build={"encoder": "mobilenet_v2", "neck": "fpn_lite", "min_level": 3, "max_level": 7, "depth": 128,
               "head_convs": 4},
        framework="tensorflow"),
    Architecture(
        "keras_retinanet_resnet50_fpn", "keras", "rectangle",
        "RetinaNet ResNet-50 FPN (TensorFlow/keras-hub, COCO weights from its preset)",
        "retinanet_resnet50_fpn_coco", image_size=640, max_image_size=640, fixed_size=True, cpu_timeout_s=60,
        defaults={**_RETINA, "optimizer": "sgd"}, scratch=_RCNN_SCRATCH, postprocessing=_KERAS_POSTPROCESSING,
        build={"encoder": "resnet50", "min_level": 3, "max_level": 7, "head_convs": 4},
        framework="tensorflow"),
    Architecture(
        "keras_retinanet_efficientnet_b0", "keras", "rectangle",
        "RetinaNet over EfficientNet-B0 (TensorFlow/Keras), 384 px: a light one-stage detector for CPUs",
        "imagenet", pretrained_kind="backbone", image_size=384, max_image_size=384, fixed_size=True,
        min_batch_size=2, defaults={**_RETINA, "batch_size": 8, "initial_learning_rate": 0.004},
        scratch=_KERAS_SCRATCH, postprocessing=_KERAS_POSTPROCESSING,
        build={"encoder": "efficientnet_b0", "min_level": 3, "max_level": 6, "head_convs": 2},
        framework="tensorflow"),
]:
    ARCHITECTURES[_arch.name] = _arch

# The model designer: backbone × neck × head from torchvision's parts (models.composed_family); the keys of
# hyperparameters.COMPOSITION choose them, over this default (RetinaNet on a ResNet-50 FPN, P3-P7).
ARCHITECTURES["custom"] = Architecture(
    "custom", "composed", "rectangle",
    "The model designer: backbone=, neck=, head= ... of your choosing (torchvision's parts, ImageNet backbones)",
    "DEFAULT", pretrained_kind="backbone", image_size=640, max_image_size=1024, cpu_timeout_s=60, defaults=_RETINA,
    scratch=_RCNN_SCRATCH, postprocessing=_TORCH_POSTPROCESSING, knobs=(*_TORCH_KNOBS, *_RPN),  # RPN: its R-CNN heads
    build={"backbone": "resnet50", "top_level": 5, "neck": "fpn", "neck_levels": (3, 7), "neck_channels": 256,
           "neck_layers": 3, "head": "retinanet", "resize_input": True})

# Image classifiers, served as CVAT tags (models.classifier_family): torchvision's ImageNet networks at their ImageNet
# resolution. From ImageNet weights: SGD with a cosine decay, as torchvision's classification reference fine-tunes
# (its rate scaled to a batch of 32); from random weights the detectors' from-scratch recipe.
_CLASSIFY = {"batch_size": 32, "initial_learning_rate": 0.01, "num_steps": 3000, "optimizer": "sgd",
             "schedule": "cosine", "warmup_steps": 100, "weight_decay": 1e-4}
for _name, _weights, _size, _timeout, _what in [
    ("efficientnet_b0", "EfficientNet_B0_Weights.IMAGENET1K_V1", 224, 30, "EfficientNet-B0 classifier, the lightest"),
    ("efficientnet_b4", "EfficientNet_B4_Weights.IMAGENET1K_V1", 380, 30, "EfficientNet-B4 classifier, the default"),
    ("efficientnet_b7", "EfficientNet_B7_Weights.IMAGENET1K_V1", 600, 60, "EfficientNet-B7 classifier, the most "
                                                                          "accurate (best on a GPU)"),
    ("resnet50", "ResNet50_Weights.IMAGENET1K_V2", 224, 30, "ResNet-50 classifier"),
    ("mobilenet_v3_large", "MobileNet_V3_Large_Weights.IMAGENET1K_V2", 224, 30, "MobileNetV3-Large classifier, fast "
                                                                                "on a CPU"),
    ("mobilenet_v3_small", "MobileNet_V3_Small_Weights.IMAGENET1K_V1", 224, 30, "MobileNetV3-Small classifier, the "
                                                                                "fastest"),
]:
    ARCHITECTURES[_name] = Architecture(
        _name, "classifier", "tag", f"{_what}: a CVAT tag per frame, trained on your tags",
        _weights, pretrained_kind="imagenet", image_size=_size, max_image_size=_size, fixed_size=True,
        min_batch_size=2, cpu_timeout_s=_timeout, defaults=_CLASSIFY, scratch=_SCRATCH, build={"network": _name})

DEFAULT_ARCHITECTURE = "ssdlite320_mobilenet_v3_large"
DEFAULT_CLASSIFIER = "efficientnet_b4"


def num_classes(labels) -> int:
    """Classes a model predicts (background excluded): the largest class index among the labels."""
    if any(label.id is None or label.id < 1 for label in labels):
        raise ValueError("every label needs its model class index (id >= 1)")
    return max(label.id for label in labels)


def get_architecture(name: str) -> Architecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise UnknownArchitecture(f"unknown architecture {name!r}{did_you_mean(name, ARCHITECTURES)}; known: "
                                  f"{', '.join(ARCHITECTURES)}") from None


def default_hyperparameters(name: str, init: str | None = None) -> Hyperparameters:
    """The architecture's default hyperparameters, with its input size; with ``init="random"`` its from-scratch
    recipe on top (none of them counts as given)."""
    arch = get_architecture(name)
    defaults = {"image_size": arch.image_size, "max_image_size": arch.max_image_size, **arch.defaults}
    if init == "random":
        defaults.update(arch.scratch)
    return Hyperparameters().updated(defaults, given=False)


def hyperparameters_for(name: str, text: str | dict[str, Any] | Hyperparameters | None = None) -> Hyperparameters:
    """The one parse of a user's hyperparameters for an architecture: its defaults with ``text`` on top, the keys
    given remembered. ``init=random`` brings the architecture's from-scratch recipe for every key the user did not
    give. Hyperparameters already parsed pass through."""
    if isinstance(text, Hyperparameters):
        return text
    hp = default_hyperparameters(name).updated(text or "")
    check_postprocessing(name, hp)
    check_composition(name, hp)
    if hp.recipe.init == "random":
        scratch = default_hyperparameters(name, "random")
        hp = hp.replaced(**{key: scratch.value(key) for key in get_architecture(name).scratch
                                        if key not in hp.given})
        hp.check()
    return hp


def check_postprocessing(name: str, hp: Hyperparameters) -> None:
    """A post-processing or network key the architecture cannot honour is an error naming the architectures that
    can."""
    arch = get_architecture(name)
    for key in sorted(hp.given & {*POSTPROCESSING, *KNOBS, *STAGES}):
        if key not in (*arch.postprocessing, *arch.knobs) and hp.value(key) is not None:
            able = [a.name for a in ARCHITECTURES.values() if key in (*a.postprocessing, *a.knobs)]
            raise HyperparameterError(f"{name} cannot honour {key.replace('_', '-')} (its post-processing has no such "
                                      f"knob); architectures that can: {', '.join(able) or 'none'}")


def check_composition(name: str, hp: Hyperparameters) -> None:
    """The designer's keys choose parts of a composed model: for any other architecture they are an error."""
    arch = get_architecture(name)
    given = sorted(hp.given & set(COMPOSITION))
    if given and arch.family != "composed":
        composed = [a.name for a in ARCHITECTURES.values() if a.family == "composed"]
        raise HyperparameterError(f"{name} is not composed: {given[0].replace('_', '-')} chooses a part of a composed "
                                  f"model; architectures that take it: {', '.join(composed)}")
