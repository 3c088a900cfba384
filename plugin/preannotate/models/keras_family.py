"""TensorFlow detection models on Keras 3 and keras-hub: build (random, pretrained or from a previous model), run,
save — behind the same calls as ``torchvision_family``.

Every model is keras-hub's ``RetinaNetObjectDetector`` (anchors, focal loss, an FPN) over a ``PyramidEncoder``: the
feature-pyramid adapter keras-hub's ``RetinaNetBackbone`` asks for (``FeaturePyramidBackbone.pyramid_outputs`` at
strides 8, 16 and 32) around a classification network — MobileNetV2 and EfficientNet-B0 from ``keras.applications``
(whose ImageNet weights are the pretrained start), ResNet-50 from keras-hub. The encoder takes pixels in 0-255 and
normalizes them itself, so training, evaluation and serving feed the same input.

The TF default, ``keras_ssd_mobilenet_v2_fpnlite_320``, is the TF OD API's SSD MobileNetV2 FPN-lite 320 instead
(``FpnLiteDetector`` on an ``FpnLiteBackbone``, Keras layers on keras-hub's RetinaNet task): a 128-channel FPN over
P3-P7 built of depthwise-separable convolutions; one tower of four depthwise-separable convolutions (128 channels,
batch norm, ReLU6) shared by the box and class predictions and by every level, each level with its own batch norms
(``WeightSharedConvolutionalBoxPredictor`` with ``use_depthwise`` and ``share_prediction_tower``); 6 anchors per
location, 2 scales x 3 aspect ratios, 4 strides wide (the ``multiscale_anchor_generator`` of the OD API's FPN
configs: the 0.2-0.95 scales belong to its plain SSDs); boxes matched at IoU 0.5 with each box forced onto its best
anchor; the OD API's box variances (0.1, 0.1, 0.2, 0.2); sigmoid focal loss with alpha 0.25 and gamma 2. Why (issue
24): keras-hub's RetinaNet in that place reached mAP@.5 0.23 where the torch default reached 1.0 at the same budget
(``bench/keras_detectors.py --quality``), and its batch norms were not why (re-measured after training: 0.22). Its
heads were. keras-hub gives the prior-probability bias (-4.6) to the box head, not the class head: every class
started at 0.5 on every anchor (a first loss of 271 against 0.95 now) and every box at exp(-4.6) of its anchor. Its
box targets carry no variances, so the Huber loss met them in its flat quadratic part and localisation barely
learned (mAP@.5:.95 0.057). Its anchors sit on the corners of their cells, half a stride off what each convolution
sees. And its head and FPN convolutions have no normalisation: with the prior moved to the class head alone, the
first loss was still 101 (set by the scale of randomly initialised features) and the run reached 0.001 — the batch
norms of the OD API's head are part of the cure, not a detail. Each is fixed here (``CLASS_PRIOR``,
``BOX_VARIANCE``, ``CentredAnchors``, the batch-normed separable tower); the model (2.7 M parameters) reaches 0.92-0.99
mAP@.5 on the same benchmark (the torch default: 0.99), and serves a frame faster than it on a CPU.

Post-processing is TensorFlow's ``combined_non_max_suppression`` (``ClassNMS``), the TF OD API's own: a score floor,
an IoU, a cap per class and a cap per image — the four ``second_stage_*`` keys of our users.

Weights are saved in Keras's own format (``model.keras``: the architecture and the weights); a previous version's
weights reach a new model by position and shape (``assign_matching``), so a changed label set keeps everything but
its class head. TensorFlow is imported here without torchvision: a TensorFlow serving process never loads torch.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from preannotate.formats.tfrecord import tensorflow
from preannotate.hyperparameters import Hyperparameters
from preannotate.models.family import Graph
from preannotate.models.registry import Architecture, PretrainedWeightsUnavailable, num_classes
from preannotate.shapes import Label, Shape

tf = tensorflow(with_torchvision=False)
import keras  # noqa: E402 - after TensorFlow, imported quietly above
import keras_hub  # noqa: E402
from keras_hub.src.models.retinanet.retinanet_label_encoder import RetinaNetLabelEncoder  # noqa: E402 - not exported

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.keras"
# The exported graph (models.runtime): the network's forward pass — pixel scaling, encoder, FPN, heads; anchors,
# decoding and NMS stay ``decode_predictions`` in TensorFlow — as OpenVINO's IR (Keras's own export writes it, and
# ``model.bin`` beside it); ONNX would need tf2onnx, which has not kept up with TensorFlow. Two processes exporting
# a version at once leave a matching pair whichever files win: the export writes the same ``model.bin`` byte for byte
# (only the node names in ``model.xml`` differ).
GRAPH_FILE = "model.xml"
CONVERTS_TO = ("openvino",)
BOX_FORMAT = "xyxy"          # pixels of the square the model sees
NMS_SCORE_FLOOR = 0.05       # detections kept before a request's own threshold (torchvision's default floor)
NMS_IOU = 0.5
MAX_DETECTIONS = 100
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# encoder name → its builder's inputs: a keras.applications network (pyramid levels by layer name) or keras-hub's
# ResNet; how it wants its pixels ("raw": 0-255, it normalizes itself; "symmetric": -1..1; "imagenet": mean/std);
# ``stages``: the last layer at strides 2, 4, 8 and 16 — the ends of the first four of its five stages, which
# ``trainable-backbone-layers`` counts as torchvision counts ResNet's conv1 and layer1-4.
ENCODERS: dict[str, dict[str, Any]] = {
    "mobilenet_v2": {"application": "MobileNetV2", "pixels": "symmetric",
                     "levels": {"P3": "block_6_expand_relu", "P4": "block_13_expand_relu", "P5": "out_relu"},
                     "stages": ["block_1_expand_relu", "block_3_expand_relu", "block_6_expand_relu",
                                "block_13_expand_relu"]},
    "efficientnet_b0": {"application": "EfficientNetB0", "pixels": "raw",
                        "levels": {"P3": "block4a_expand_activation", "P4": "block6a_expand_activation",
                                   "P5": "top_activation"},
                        "stages": ["block2a_expand_activation", "block3a_expand_activation",
                                   "block4a_expand_activation", "block6a_expand_activation"]},
    "resnet50": {"stages": ["conv1_relu", "stack0_block2_out", "stack1_block3_out", "stack2_block5_out"],
                 "keras_hub": {"input_conv_filters": [64], "input_conv_kernel_sizes": [7],
                               "stackwise_num_filters": [64, 128, 256, 512], "stackwise_num_blocks": [3, 4, 6, 3],
                               "stackwise_num_strides": [1, 2, 2, 2], "block_type": "bottleneck_block",
                               "use_pre_activation": False}, "pixels": "imagenet"},
}
COCO_CATEGORIES = [  # the 91 category indices of COCO-trained detectors ("N/A": an unused index)
    "__background__", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "N/A", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse",
    "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "N/A", "backpack", "umbrella", "N/A", "N/A", "handbag",
    "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
    "skateboard", "surfboard", "tennis racket", "bottle", "N/A", "wine glass", "cup", "fork", "knife", "spoon",
    "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake",
    "chair", "couch", "potted plant", "bed", "N/A", "dining table", "N/A", "N/A", "toilet", "N/A", "tv", "laptop",
    "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "N/A",
    "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush"]


@keras.saving.register_keras_serializable(package="preannotate")
class PixelScaling(keras.layers.Layer):
    """Pixels 0-255 to what the encoder was trained on (``ENCODERS[...]["pixels"]``)."""

    def __init__(self, pixels: str = "raw", **kwargs):
        super().__init__(**kwargs)
        self.pixels = pixels

    def call(self, images):
        if self.pixels == "symmetric":
            return images / 127.5 - 1.0
        if self.pixels == "imagenet":
            mean = keras.ops.convert_to_tensor(IMAGENET_MEAN, dtype=images.dtype)
            std = keras.ops.convert_to_tensor(IMAGENET_STD, dtype=images.dtype)
            return (images / 255.0 - mean) / std
        return images

    def get_config(self):
        return {**super().get_config(), "pixels": self.pixels}


@keras.saving.register_keras_serializable(package="preannotate")
class PyramidEncoder(keras_hub.models.FeaturePyramidBackbone):
    """A classification network as the pyramid encoder keras-hub's ``RetinaNetBackbone`` takes: pixels 0-255 in,
    ``pyramid_outputs`` P3-P5 (strides 8, 16, 32) out. ``weights="imagenet"`` starts from ImageNet (downloaded by
    Keras, or from its cache); a saved model is rebuilt without and gets its own weights back."""

    def __init__(self, encoder: str, image_shape=(None, None, 3), weights: str | None = None, **kwargs):
        spec = ENCODERS[encoder]
        inputs = keras.Input(image_shape, name="pixels")
        scaled = PixelScaling(spec["pixels"], name="pixel_scaling")(inputs)
        if "application" in spec:
            network = getattr(keras.applications, spec["application"])(
                include_top=False, weights=weights, input_shape=tuple(image_shape))
            features = keras.Model(network.inputs, {k: network.get_layer(n).output for k, n in spec["levels"].items()},
                                   name=encoder)
        else:
            network = keras_hub.models.ResNetBackbone(**spec["keras_hub"], image_shape=tuple(image_shape))
            features = keras.Model(network.inputs, {k: network.pyramid_outputs[k] for k in ("P3", "P4", "P5")},
                                   name=encoder)
        outputs = features(scaled)
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)
        self.encoder, self.image_shape, self.features = encoder, tuple(image_shape), features
        self.pyramid_outputs = outputs

    def get_config(self):
        return {"encoder": self.encoder, "image_shape": self.image_shape, "name": self.name,
                "trainable": self.trainable}


@keras.saving.register_keras_serializable(package="preannotate")
class ClassNMS(keras.layers.Layer):
    """keras-hub's ``prediction_decoder`` slot filled with TensorFlow's ``combined_non_max_suppression`` (the TF OD
    API's batch multiclass NMS): per-class suppression with a cap per class and per image."""

    def __init__(self, bounding_box_format: str = BOX_FORMAT, from_logits: bool = True,
                 confidence_threshold: float = NMS_SCORE_FLOOR, iou_threshold: float = NMS_IOU,
                 max_detections: int = MAX_DETECTIONS, max_detections_per_class: int = MAX_DETECTIONS, **kwargs):
        super().__init__(**kwargs)
        self.bounding_box_format, self.from_logits = bounding_box_format, from_logits
        self.confidence_threshold, self.iou_threshold = confidence_threshold, iou_threshold
        self.max_detections, self.max_detections_per_class = max_detections, max_detections_per_class

    def call(self, box_prediction, class_prediction, images=None):
        scores = tf.sigmoid(class_prediction) if self.from_logits else class_prediction
        boxes, confidence, classes, valid = tf.image.combined_non_max_suppression(
            tf.expand_dims(box_prediction, 2), scores, self.max_detections_per_class, self.max_detections,
            iou_threshold=self.iou_threshold, score_threshold=self.confidence_threshold, clip_boxes=False)
        return {"boxes": boxes, "confidence": confidence, "labels": tf.cast(classes, "int32"),
                "num_detections": valid}

    def get_config(self):
        return {**super().get_config(), "bounding_box_format": self.bounding_box_format,
                "from_logits": self.from_logits, "confidence_threshold": self.confidence_threshold,
                "iou_threshold": self.iou_threshold, "max_detections": self.max_detections,
                "max_detections_per_class": self.max_detections_per_class}


BOX_VARIANCE = (0.1, 0.1, 0.2, 0.2)  # the TF OD API's box coder (scale factors 10, 10, 5, 5)
FOCAL_ALPHA, FOCAL_GAMMA = 0.25, 2.0  # the TF OD API's sigmoid focal loss
CLASS_PRIOR = 0.01                    # the class logits' starting probability (bias -4.6, the OD API's)
BN_MOMENTUM = 0.99                    # neck and head batch norms (Keras's default; the OD API's 0.997 suits long runs)


@keras.saving.register_keras_serializable(package="preannotate")
class CentredAnchors(keras_hub.layers.AnchorGenerator):
    """keras-hub's anchors moved by half a stride onto the centres of their cells: its grid starts at each cell's
    corner, which puts every anchor half a cell off what its convolution sees (for a 32 px anchor at stride 8, an IoU
    of 0.62 with the box it should fit exactly)."""

    def call(self, inputs):
        anchors = super().call(inputs)
        height, width = tuple(keras.ops.shape(inputs))[-3:-1]
        centred = {}
        for level, boxes in anchors.items():
            cells = 2 ** int(level[1:])
            half_x, half_y = (width // math.ceil(width / cells)) / 2, (height // math.ceil(height / cells)) / 2
            centred[level] = boxes + keras.ops.convert_to_tensor([half_x, half_y, half_x, half_y], boxes.dtype)
        return centred


@keras.saving.register_keras_serializable(package="preannotate")
class FiniteLabelEncoder(RetinaNetLabelEncoder):
    """keras-hub's label encoder whose box targets stay finite: with every box forced to its best anchor (the OD
    API's ``force_match_for_each_row``) a padding box (zero size) takes an anchor too, and its log-size target is
    -inf — a NaN in the loss however small its weight."""

    def call(self, images, gt_boxes, gt_classes):
        boxes, classes = super().call(images, gt_boxes, gt_classes)
        return keras.ops.where(keras.ops.isfinite(boxes), boxes, 0.0), classes


@keras.saving.register_keras_serializable(package="preannotate")
class UpsampleLike(keras.layers.Layer):
    """Nearest-neighbour upsampling of a coarser level to the size of the finer one (the FPN's top-down path)."""

    def call(self, coarse, fine):
        return tf.image.resize(coarse, tf.shape(fine)[1:3], method="nearest")


def _separable(x, filters: int, name: str, strides: int = 1):
    """The OD API's depthwise-separable convolution: 3x3 depthwise, 1x1 pointwise, batch norm, ReLU6."""
    x = keras.layers.SeparableConv2D(filters, 3, strides=strides, padding="same", use_bias=False, name=name)(x)
    x = keras.layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=1e-3, name=f"{name}_bn")(x)
    return keras.layers.ReLU(6.0, name=f"{name}_relu6")(x)


@keras.saving.register_keras_serializable(package="preannotate")
class FpnLiteBackbone(keras_hub.models.Backbone):
    """The encoder and the FPN-lite neck of the OD API's SSD MobileNetV2 FPN-lite: 1x1 laterals to ``filters``
    channels on P3-P5, the top-down sum, a depthwise-separable 3x3 smoothing each of P3-P4, and P6-P7 by
    stride-2 depthwise-separable convolutions."""

    def __init__(self, image_encoder, min_level: int = 3, max_level: int = 7, filters: int = 128,
                 image_shape=(None, None, 3), **kwargs):
        images = keras.Input(image_shape, name="inputs")
        encoded = image_encoder(images)
        levels = {}
        for level in (5, 4, 3):
            lateral = keras.layers.Conv2D(filters, 1, name=f"fpn_lateral_P{level}")(encoded[f"P{level}"])
            if level < 5:
                lateral = keras.layers.Add(name=f"fpn_sum_P{level}")(
                    [lateral, UpsampleLike(name=f"fpn_up_P{level}")(levels[level + 1], lateral)])
            levels[level] = lateral
        outputs = {f"P{level}": _separable(levels[level], filters, f"fpn_smooth_P{level}") if level < 5
                   else levels[level] for level in (3, 4, 5)}
        for level in range(6, max_level + 1):
            outputs[f"P{level}"] = _separable(outputs[f"P{level - 1}"], filters, f"fpn_down_P{level}", strides=2)
        outputs = {f"P{level}": outputs[f"P{level}"] for level in range(min_level, max_level + 1)}
        super().__init__(inputs=images, outputs=outputs, **kwargs)
        self.image_encoder, self.min_level, self.max_level, self.filters = image_encoder, min_level, max_level, filters
        self.image_shape = tuple(image_shape)
        self.pyramid_outputs = outputs

    def get_config(self):
        return {**super().get_config(), "image_encoder": keras.layers.serialize(self.image_encoder),
                "min_level": self.min_level, "max_level": self.max_level, "filters": self.filters,
                "image_shape": self.image_shape}

    @classmethod
    def from_config(cls, config):
        return cls(**{**config, "image_encoder": keras.layers.deserialize(config["image_encoder"])})


@keras.saving.register_keras_serializable(package="preannotate")
class FpnLiteDetector(keras_hub.models.RetinaNetObjectDetector):
    """SSD with the OD API's weight-shared depthwise-separable box predictor on an ``FpnLiteBackbone``: one tower of
    ``head_layers`` separable convolutions (``head_depth`` channels, shared by the box and class predictions and by
    every level; each level keeps its own batch norms), then a separable box and class predictor. Anchors: 2 scales
    x 3 aspect ratios per location, ``anchor_size`` strides wide; boxes matched at IoU 0.5 and each box to its best
    anchor, encoded with the OD API's variances; sigmoid focal loss with its alpha. keras-hub's RetinaNet supplies
    the label encoding, the loss and the decoding."""

    def __init__(self, backbone, num_classes: int, bounding_box_format: str = BOX_FORMAT, head_depth: int = 128,
                 head_layers: int = 4, anchor_size: float = 4.0, prediction_decoder=None, **kwargs):
        kwargs.pop("compile", None)
        anchors = CentredAnchors(bounding_box_format, min_level=backbone.min_level, max_level=backbone.max_level,
                                 num_scales=2, aspect_ratios=[0.5, 1.0, 2.0], anchor_size=anchor_size)
        per_location = anchors.num_base_anchors
        tower = [keras.layers.SeparableConv2D(head_depth, 3, padding="same", use_bias=False,
                                              name=f"head_tower_{i}") for i in range(head_layers)]
        box_head = keras.layers.SeparableConv2D(per_location * 4, 3, padding="same", name="box_head")
        classification_head = keras.layers.SeparableConv2D(
            per_location * num_classes, 3, padding="same", name="classification_head",
            bias_initializer=keras.initializers.Constant(-math.log((1 - CLASS_PRIOR) / CLASS_PRIOR)))
        images = keras.Input(backbone.image_shape, name="images")
        features = backbone(images)
        boxes, classes = [], []
        for level, x in features.items():
            for i, conv in enumerate(tower):
                x = keras.layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=1e-3,
                                                    name=f"head_{level}_bn_{i}")(conv(x))
                x = keras.layers.ReLU(6.0, name=f"head_{level}_relu6_{i}")(x)
            boxes.append(keras.layers.Reshape((-1, 4), name=f"box_pred_{level}")(box_head(x)))
            classes.append(keras.layers.Reshape((-1, num_classes), name=f"cls_pred_{level}")(classification_head(x)))
        outputs = {"bbox_regression": keras.layers.Concatenate(axis=1, name="bbox_regression")(boxes),
                   "cls_logits": keras.layers.Concatenate(axis=1, name="cls_logits")(classes)}
        keras_hub.models.ObjectDetector.__init__(self, inputs=images, outputs=outputs, **kwargs)
        self.bounding_box_format, self.num_classes, self.backbone = bounding_box_format, num_classes, backbone
        self.head_depth, self.head_layers, self.anchor_size = head_depth, head_layers, anchor_size
        self.preprocessor, self.activation, self.use_prediction_head_norm = None, None, False
        self.pre_logits_num_conv_layers = head_layers
        self.box_head, self.classification_head, self.anchor_generator = box_head, classification_head, anchors
        self.label_encoder = FiniteLabelEncoder(anchors, bounding_box_format, encoding_format="center_xywh",
                                                positive_threshold=0.5, negative_threshold=0.5,
                                                box_variance=list(BOX_VARIANCE),
                                                box_matcher_force_match_for_each_col=True)
        self._prediction_decoder = prediction_decoder or ClassNMS(bounding_box_format)

    def compile(self, optimizer="auto", **kwargs):
        """keras-hub's losses with the OD API's focal alpha (keras-hub leaves class balancing off)."""
        focal = keras.losses.BinaryFocalCrossentropy(apply_class_balancing=True, alpha=FOCAL_ALPHA,
                                                     gamma=FOCAL_GAMMA, from_logits=True, reduction="sum")
        super().compile(optimizer=optimizer, classification_loss=focal, **kwargs)

    def decode_predictions(self, predictions, data):
        """keras-hub decodes without the variances: scale the deltas back first."""
        variance = keras.ops.convert_to_tensor(BOX_VARIANCE, predictions["bbox_regression"].dtype)
        return super().decode_predictions({**predictions, "bbox_regression": predictions["bbox_regression"] * variance},
                                          data)

    def get_config(self):
        return {"backbone": keras.layers.serialize(self.backbone), "num_classes": self.num_classes,
                "bounding_box_format": self.bounding_box_format, "head_depth": self.head_depth,
                "head_layers": self.head_layers, "anchor_size": self.anchor_size,
                "prediction_decoder": keras.layers.serialize(self._prediction_decoder), "name": self.name}

    @classmethod
    def from_config(cls, config):
        return cls(**{**config, "backbone": keras.layers.deserialize(config["backbone"]),
                      "prediction_decoder": keras.layers.deserialize(config["prediction_decoder"])})


def decoder(postprocessing: dict[str, Any]) -> ClassNMS:
    """The NMS layer of the post-processing keys (``hyperparameters.POSTPROCESSING``), our defaults for the rest."""
    total = postprocessing.get("max_total_detections", MAX_DETECTIONS)
    return ClassNMS(confidence_threshold=postprocessing.get("nms_score_threshold", NMS_SCORE_FLOOR),
                    iou_threshold=postprocessing.get("nms_iou_threshold", NMS_IOU), max_detections=total,
                    max_detections_per_class=min(total, postprocessing.get("max_detections_per_class", total)))


def build_model(arch: Architecture, num_classes: int, postprocessing: dict[str, Any] | None = None,
                weights: str | None = None) -> keras.Model:
    """An untrained detector of ``arch`` for ``num_classes`` classes (``weights="imagenet"``: its encoder's)."""
    spec = arch.build
    encoder = PyramidEncoder(spec["encoder"], weights=weights, name="encoder")
    if spec.get("neck") == "fpn_lite":
        backbone = FpnLiteBackbone(encoder, spec["min_level"], spec["max_level"], spec["depth"], name="backbone")
        return FpnLiteDetector(backbone, num_classes, head_depth=spec["depth"], head_layers=spec["head_convs"],
                               prediction_decoder=decoder(postprocessing or {}))
    backbone = keras_hub.models.RetinaNetBackbone(image_encoder=encoder, min_level=spec["min_level"],
                                                  max_level=spec["max_level"], use_p5=False)
    return keras_hub.models.RetinaNetObjectDetector(
        backbone=backbone, num_classes=num_classes, bounding_box_format=BOX_FORMAT,
        pre_logits_num_conv_layers=spec["head_convs"], prediction_decoder=decoder(postprocessing or {}))


def freeze_backbone(model: keras.Model, trainable_layers: int | None, init: str) -> list[keras.layers.Layer]:
    """Freeze all but the last ``trainable_layers`` (0-5) of the encoder's five stages (``ENCODERS[...]["stages"]``);
    None trains them all, as the TF OD API fine-tunes (whatever ``init``). Frozen batch norms keep their statistics
    (Keras runs a non-trainable ``BatchNormalization`` in inference mode). Returns the encoder layers frozen."""
    if trainable_layers is None or trainable_layers >= 5:
        return []
    encoder = model.backbone.image_encoder
    layers = encoder.features.layers
    if trainable_layers == 0:
        encoder.trainable = False
        return list(layers)
    names = [layer.name for layer in layers]
    last_frozen = names.index(ENCODERS[encoder.encoder]["stages"][4 - trainable_layers])  # the end of stage 5 - k
    for layer in layers[:last_frozen + 1]:
        layer.trainable = False
    return list(layers[:last_frozen + 1])


def pretrained_labels(arch: Architecture) -> list[Label]:
    """The COCO labels of a detector pretrained on COCO (keras-hub's preset), ids = its class index + 1."""
    if arch.pretrained_kind != "coco":
        raise PretrainedWeightsUnavailable(
            f"{arch.name} has no COCO-trained weights (only an ImageNet encoder): give the labels to train it on "
            "(--labels a,b,...)")
    return [Label(name, "rectangle", id=index + 1) for index, name in enumerate(COCO_CATEGORIES)
            if index > 0 and name != "N/A"]


def pretrained_model(arch: Architecture, num_classes: int, postprocessing: dict[str, Any]) -> keras.Model:
    """``arch`` for ``num_classes`` with pretrained weights: the whole detector from its keras-hub preset (COCO;
    class heads of another size start fresh) or its encoder's ImageNet weights (Keras's download)."""
    try:
        if arch.pretrained_kind == "coco":
            model = build_model(arch, num_classes, postprocessing)
            preset = keras_hub.models.RetinaNetObjectDetector.from_preset(arch.pretrained)
            assign_matching(model, [(w.path, np.asarray(w)) for w in _detector_weights(preset)])
            return model
        return build_model(arch, num_classes, postprocessing, weights=arch.pretrained)
    except PretrainedWeightsUnavailable:
        raise
    except Exception as error:  # any download or cache failure: tell the operator what to do instead
        raise PretrainedWeightsUnavailable(
            f"pretrained weights for {arch.name} ({arch.pretrained}) could not be loaded: {_reason(error)}. Keras "
            "keeps them in ~/.keras (KERAS_HOME) and keras-hub's presets in KAGGLEHUB_CACHE: fetch them there once "
            "(`preannotate models fetch-weights`), or start from random weights (`-H init=random`).") from None


def fetch_pretrained(arch: Architecture) -> Path:
    """The pretrained weights in Keras's (``KERAS_HOME``) and keras-hub's (``KAGGLEHUB_CACHE``) caches, downloaded when
    missing and proven to load: where Keras keeps them."""
    pretrained_model(arch, 1, {})
    return Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras")


def _detector_weights(model: keras.Model) -> list[Any]:
    """A preset's weights without its preprocessor's: those of the network itself, in build order."""
    return [w for w in model.weights if "preprocessor" not in w.path]


def _reason(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__


def assign_matching(model: keras.Model, state: Sequence[tuple[str, np.ndarray]]) -> list[str]:
    """Give ``model`` each weight of ``state`` (``(path, array)`` in build order, a model of the same architecture)
    whose position and shape match; return the paths left as they were (a class head sized for other labels).
    Positions, not names: Keras numbers the names of the layers it builds, so two builds name them differently."""
    own = _detector_weights(model)
    source = list(state)
    if len(source) != len(own):
        raise ValueError(f"the previous model has {len(source)} weights, this architecture {len(own)}: "
                         "init=previous needs a version of the same architecture")
    skipped = []
    for variable, (_, array) in zip(own, source, strict=True):
        if tuple(variable.shape) == tuple(array.shape):
            variable.assign(array)
        else:
            skipped.append(variable.path)
    if skipped:
        log.info("kept fresh initialization for %d weights (e.g. %s)", len(skipped), ", ".join(skipped[:3]))
    return skipped


class KerasDetector:
    """A Keras detector ready to detect, with its labels (class index + 1 = ``Label.id``). Frames are squashed
    (or, with ``letterbox``, padded first) to the model's square, as training fed them."""

    def __init__(self, model: keras.Model, labels: Sequence[Label], image_size: int, letterbox: bool = False,
                 device: str | None = None):
        self.model = model
        # on the CPU when asked or when TensorFlow sees no GPU; else TensorFlow's choice: its first GPU
        self.device = "/CPU:0" if device == "cpu" or not tf.config.list_physical_devices("GPU") else None
        self.labels = list(labels)
        self.output = "rectangle"
        self.image_size, self.letterbox = int(image_size), letterbox
        self.familiar = None  # no appearance sample: frames are never called unfamiliar
        self.graph: Graph | None = None  # the converted forward pass, if any
        self._label_by_class = {label.id - 1: label for label in self.labels}
        self.predict = tf.function(self._predict, reduce_retracing=True, autograph=False)  # no Python control flow

    def _predict(self, batch):
        return self.model.decode_predictions(self.model(batch, training=False), batch)

    def run_converted(self, graph: Graph) -> None:
        """Detect through ``graph`` from now on: the network's forward pass (``export_graph``) compiled by another
        runtime (``models.runtime``); its raw outputs are decoded as the eager model's are (``decode_predictions``:
        anchors, box variances, NMS). ``model`` stays the Keras model (what is trained and saved)."""
        self.graph = graph
        decode = tf.function(self.model.decode_predictions, reduce_retracing=True, autograph=False)

        def predict(batch):
            return decode({name: tf.constant(value) for name, value in graph(batch.numpy()).items()}, batch)
        self.predict = predict

    def square(self, image: Any) -> tuple[np.ndarray, float, float, int, int]:
        """The frame as the model's input, with how to map its boxes back (x and y scale, left and top pad)."""
        array = np.asarray(image)
        height, width = array.shape[:2]
        left = top = 0
        if self.letterbox:
            side = max(height, width)
            top, left = (side - height) // 2, (side - width) // 2
            array = cv2.copyMakeBorder(array, top, side - height - top, left, side - width - left,
                                       cv2.BORDER_CONSTANT, value=(0, 0, 0))
        resized = cv2.resize(array, (self.image_size, self.image_size), interpolation=cv2.INTER_LINEAR)
        return (resized, array.shape[1] / self.image_size, array.shape[0] / self.image_size, left, top)

    def detect(self, images: Sequence[Any], threshold: float) -> list[list[Shape]]:
        """Shapes found on each image, in its pixel coordinates, with ``score >= threshold``."""
        if not len(images):
            return []
        squares = [self.square(image) for image in images]
        batch = np.stack([square[0] for square in squares]).astype(np.float32)
        with tf.device(self.device) if self.device else contextlib.nullcontext():
            found = {k: v.numpy() for k, v in self.predict(tf.constant(batch)).items()}
        results = []
        for i, (image, (_, sx, sy, left, top)) in enumerate(zip(images, squares, strict=True)):
            height, width = np.asarray(image).shape[:2]
            shapes = []
            for box, score, cls in zip(found["boxes"][i][:found["num_detections"][i]],
                                       found["confidence"][i], found["labels"][i], strict=False):
                label = self._label_by_class.get(int(cls))
                if label is None or score < threshold:
                    continue
                x1, y1, x2, y2 = box[0] * sx - left, box[1] * sy - top, box[2] * sx - left, box[3] * sy - top
                points = [round(float(np.clip(x1, 0, width)), 2), round(float(np.clip(y1, 0, height)), 2),
                          round(float(np.clip(x2, 0, width)), 2), round(float(np.clip(y2, 0, height)), 2)]
                shapes.append(Shape(label.name, "rectangle", points, score=float(score), source="auto"))
            results.append(shapes)
        return results

    def detect_scored(self, images: Sequence[Any], threshold: float) -> list[tuple[list[Shape], float]]:
        """The shapes of each image with its unfamiliarity: 0, this family keeps no appearance sample."""
        return [(shapes, 0.0) for shapes in self.detect(images, threshold)]

    def appearance(self, images: Sequence[Any], depth: str | None = None) -> None:
        return None  # no appearance layer is read: its frames are never called unfamiliar


def create(arch: Architecture, labels: Sequence[Label], hp: Hyperparameters, init: str = "random",
           state: Sequence[tuple[str, np.ndarray]] | None = None, device: str | None = None) -> KerasDetector:
    """Build a detector for ``labels``: ``random``, ``pretrained`` (keras-hub's preset or the encoder's ImageNet
    weights) or from ``state`` (a previous model's weights; a class head for a changed label set starts fresh).
    ``device="cpu"`` keeps detection on the CPU; otherwise TensorFlow places it (its first GPU, if any)."""
    count, postprocessing = num_classes(labels), hp.post.overrides()
    if init == "pretrained":
        model = pretrained_model(arch, count, postprocessing)
    else:
        model = build_model(arch, count, postprocessing)
        if state is not None:
            assign_matching(model, state)
    return KerasDetector(model, labels, hp.network.image_size or arch.image_size, hp.network.letterbox, device)


def load(arch: Architecture, labels: Sequence[Label], weights_path: Path, hp: Hyperparameters,
         device: str | None = None) -> KerasDetector:
    """A published model: its ``model.keras`` — nothing downloaded. The post-processing keys of its manifest
    replace the saved decoder's."""
    model = keras.saving.load_model(weights_path, compile=False)
    postprocessing = hp.post.overrides()
    if postprocessing:
        model._prediction_decoder = decoder(postprocessing)
    return KerasDetector(model, labels, hp.network.image_size or arch.image_size, hp.network.letterbox, device)


def read_weights(path: Path) -> list[tuple[str, np.ndarray]]:
    """A saved model's weights, ``(path, array)`` in build order (what ``create(state=...)`` takes)."""
    model = keras.saving.load_model(path, compile=False)
    return [(w.path, np.asarray(w)) for w in _detector_weights(model)]


def write_weights(detector: KerasDetector, path: Path) -> None:
    detector.model.save(path)


def convertible(detector: KerasDetector) -> bool:
    """Whether the detector can run its forward pass converted (``models.runtime``): every Keras detector here."""
    return isinstance(detector, KerasDetector)


def export_graph(detector: KerasDetector, path: Path) -> None:
    """Export the detector's forward pass as OpenVINO IR at ``path`` (``.xml``; its weights into ``.bin`` beside
    it), for any batch and image size."""
    detector.model.export(str(path), format="openvino", verbose=False,
                          input_signature=[keras.InputSpec(shape=(None, None, None, 3), dtype="float32")])
