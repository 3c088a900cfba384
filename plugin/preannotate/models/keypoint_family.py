"""Keypoint models: torchvision's Keypoint R-CNN, learning a project's skeleton and points labels.

Two architectures: ``keypointrcnn_resnet50_fpn`` (torchvision's builder; COCO's person-pose weights: a ``person``
skeleton of 17 keypoints, heads for other labels start fresh) and ``keypointrcnn_mobilenet_v3_large_fpn``
(torchvision's ``KeypointRCNN`` over the MobileNetV3-Large FPN of ``fasterrcnn_mobilenet_v3_large_fpn``, with light
heads, ``registry``'s ``build``: trainable from random weights on a CPU).

The keypoint head has one channel per keypoint of every keypoint label (``models.keypoints.KeypointLayout``);
a detection of a label reads its own channels and comes back as a CVAT ``skeleton`` with one ``points`` element per
sublabel (``outside`` where the heatmap is unsure: ``keypoints.VISIBLE_CONFIDENCE``), or as a ``points`` shape of one
point for a points label. A label of another type is learned and served as boxes (Keypoint R-CNN is a Faster R-CNN
too). Everything else — building without weights, loading by name and shape, knobs, freezing, saving — is the
torchvision family's (``models.torchvision_family``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from PIL import Image
from torchvision.models.detection import KeypointRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import mobilenet_backbone
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.keypoint_rcnn import KeypointRCNNHeads, KeypointRCNNPredictor
from torchvision.transforms.v2 import functional as F

from preannotate.hyperparameters import Hyperparameters
from preannotate.models import torchvision_family as torch_family
from preannotate.models.keypoints import VISIBLE_CONFIDENCE, KeypointLayout, skeleton_label
from preannotate.models.registry import Architecture, PretrainedWeightsUnavailable, num_classes
from preannotate.shapes import Label, Shape

WEIGHTS_FILE = torch_family.WEIGHTS_FILE
# COCO's person skeleton (torchvision's weights meta names the keypoints; the edges are COCO's, 1-based there)
COCO_PERSON_EDGES = ((15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7), (6, 8),
                     (7, 9), (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6))


def build_model(arch: Architecture, labels: Sequence[Label], image_size: int | None = None,
                max_image_size: int | None = None) -> KeypointRCNN:
    """An untrained Keypoint R-CNN of ``arch`` for ``labels``: a class per label, a keypoint channel per keypoint."""
    keypoints = KeypointLayout.of(labels).total
    if not keypoints:
        raise ValueError(f"{arch.name} learns skeleton and points labels: none of "
                         f"{', '.join(label.name for label in labels)} is one")
    size = {"min_size": image_size or arch.image_size, "max_size": max_image_size or arch.max_image_size}
    classes = num_classes(labels) + 1
    if arch.build.get("backbone") == "mobilenet_v3_large":
        # torchvision's fasterrcnn_mobilenet_v3_large_fpn feeds its FPN only the stride-32 stages: a keypoint needs a
        # finer place than a box, so the stages from stride 8 on (``returned_layers``), 15 anchors a place
        stages = arch.build["returned_layers"]
        backbone = mobilenet_backbone(backbone_name="mobilenet_v3_large", fpn=True, weights=None, trainable_layers=6,
                                      returned_layers=list(stages))
        anchors = AnchorGenerator(((16, 32, 64, 128, 256),) * (len(stages) + 1), ((0.5, 1.0, 2.0),) * (len(stages) + 1))
        layers, box = arch.build["keypoint_head"], arch.build["box_head"]  # torchvision's: 8 × 512, 1024
        pool = 7  # the box head's region side, as torchvision's MultiScaleRoIAlign gives it
        return KeypointRCNN(backbone, None, rpn_anchor_generator=anchors, rpn_score_thresh=0.05,
                            box_head=TwoMLPHead(backbone.out_channels * pool * pool, box),
                            box_predictor=FastRCNNPredictor(box, classes),
                            keypoint_head=KeypointRCNNHeads(backbone.out_channels, layers),
                            keypoint_predictor=KeypointRCNNPredictor(layers[-1], keypoints),
                            **size, **arch.build.get("rcnn", {}))
    return torchvision.models.get_model(arch.name, weights=None, weights_backbone=None, num_classes=classes,
                                        num_keypoints=keypoints, **size)


class KeypointDetector(torch_family.TorchvisionDetector):
    """A Keypoint R-CNN as a ``Detector``: skeletons, points (and boxes for other labels) in CVAT's encoding."""

    def __init__(self, model: torch.nn.Module, labels: Sequence[Label], output: str,
                 device: str | torch.device | None = None, letterbox: bool = False,
                 appearance: Mapping[str, torch.nn.Module] | None = None):
        super().__init__(model, labels, output, device, letterbox, appearance)
        self.layout = KeypointLayout.of(self.labels)
        self._heatmaps: torch.Tensor | None = None
        self.model.roi_heads.keypoint_predictor.register_forward_hook(self._keep_heatmaps)

    def _keep_heatmaps(self, module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> None:
        if not module.training:
            self._heatmaps = output.detach()

    def _outputs(self, images: Sequence[Image.Image | np.ndarray]) -> list[dict[str, torch.Tensor]]:
        """The model's output for each image in its own pixels, with each keypoint's ``keypoint_confidence``: the
        probability its heatmap gives its most likely cell (the loss is a cross-entropy over those cells)."""
        tensors = [self.to_tensor(image) for image in images]
        sizes = [tuple(tensor.shape[-2:]) for tensor in tensors]
        if self.letterbox:
            tensors = [F.center_crop(tensor, [max(size)] * 2) for tensor, size in zip(tensors, sizes, strict=True)]
        self._heatmaps = None
        outputs = self.model(tensors)
        counts = [len(output["boxes"]) for output in outputs]
        heatmaps = self._heatmaps if self._heatmaps is not None and sum(counts) else None
        confidence = (heatmaps.flatten(2).float().softmax(-1).amax(-1) if heatmaps is not None
                      else torch.zeros((sum(counts), self.layout.total), device=self.device))
        for output, part in zip(outputs, confidence.split(counts), strict=True):
            output["keypoint_confidence"] = part
        if self.letterbox:
            outputs = [_unpad(output, size) for output, size in zip(outputs, sizes, strict=True)]
        return outputs

    def to_shapes(self, output: dict[str, torch.Tensor], threshold: float) -> list[Shape]:
        keep = output["scores"] >= threshold
        boxes = output["boxes"][keep].cpu().tolist()
        classes = output["labels"][keep].cpu().tolist()
        scores = output["scores"][keep].cpu().tolist()
        points = output["keypoints"][keep, :, :2].cpu().tolist()
        confidence = output["keypoint_confidence"][keep].cpu().tolist()
        shapes = []
        for box, cls, score, xy, sure in zip(boxes, classes, scores, points, confidence, strict=True):
            label = self._label_by_class.get(cls)
            if label is None:
                continue
            channels = self.layout.channels(label.name)
            if label.type == "points":
                (channel,) = channels
                shapes.append(Shape(label.name, "points", [round(v, 2) for v in xy[channel]], score=score,
                                    source="auto"))
            elif label.type == "skeleton":
                elements = [Shape(sublabel.name, "points", [round(v, 2) for v in xy[channel]], score=score,
                                  outside=sure[channel] < VISIBLE_CONFIDENCE, source="auto")
                            for sublabel, channel in zip(label.sublabels, channels, strict=True)]
                shapes.append(Shape(label.name, "skeleton", [], score=score, elements=elements, source="auto"))
            else:
                shapes.append(Shape(label.name, "rectangle", [round(v, 2) for v in box], score=score, source="auto"))
        return shapes


def _unpad(output: dict[str, torch.Tensor], size: tuple[int, int]) -> dict[str, torch.Tensor]:
    """A letterboxed image's detections, keypoints too, in the image's coordinates before padding."""
    height, width = size
    top, left = (max(size) - height) // 2, (max(size) - width) // 2
    keypoints = output["keypoints"].clone()
    keypoints[..., 0] -= left
    keypoints[..., 1] -= top
    return {**torch_family._unpad(output, size), "keypoints": keypoints}


def pretrained_labels(arch: Architecture) -> list[Label]:
    """COCO's person skeleton (its 17 keypoints and edges) for the COCO weights."""
    if arch.pretrained_kind != "coco":
        raise PretrainedWeightsUnavailable(
            f"{arch.name} has no COCO-trained weights in torchvision (only an ImageNet backbone): give the skeleton "
            "and points labels to train it on")
    meta = torch_family._weights_enum(arch).meta
    return [skeleton_label(meta["categories"][1], meta["keypoint_names"], COCO_PERSON_EDGES, label_id=1)]


def pretrained_state_dict(arch: Architecture) -> dict[str, torch.Tensor]:
    """The pretrained weights keyed as in our model: COCO's whole Keypoint R-CNN, or an ImageNet MobileNetV3 whose
    ``features`` are the FPN's body (``backbone.body.<block>``; its classifier left out)."""
    state = torch_family.pretrained_state_dict(arch)
    if arch.pretrained_kind == "backbone":
        state = {key.replace("backbone.body.features.", "backbone.body.", 1): value for key, value in state.items()
                 if not key.startswith("backbone.body.classifier.")}
    return state


def create(arch: Architecture, labels: Sequence[Label], hp: Hyperparameters, init: str = "random",
           state: dict[str, torch.Tensor] | None = None, device: str | None = None) -> KeypointDetector:
    """A keypoint detector for ``labels``: ``random``, ``pretrained`` (heads for other labels or keypoints start
    fresh) or from ``state`` (a previous model's weights, kept where names and shapes agree)."""
    model = build_model(arch, labels, hp.network.image_size, hp.network.max_image_size)
    torch_family.apply_knobs(model, hp)
    if init == "pretrained":
        torch_family.load_matching(model, pretrained_state_dict(arch))
    elif state is not None:
        torch_family.load_matching(model, state)
    return KeypointDetector(model, labels, arch.output, device, hp.network.letterbox)


def load(arch: Architecture, labels: Sequence[Label], weights_path: Path, hp: Hyperparameters,
         device: str | None = None) -> KeypointDetector:
    """A published keypoint model: its architecture, labels, hyperparameters and weights file."""
    model = build_model(arch, labels, hp.network.image_size, hp.network.max_image_size)
    torch_family.apply_knobs(model, hp)
    return torch_family.restored(model, labels, arch.output, weights_path, device, hp.network.letterbox,
                                 kind=KeypointDetector)


read_weights, write_weights = torch_family.read_weights, torch_family.write_weights
fetch_pretrained, freeze_backbone = torch_family.fetch_pretrained, torch_family.freeze_backbone
