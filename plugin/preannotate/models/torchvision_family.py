"""torchvision detection models: build (random, COCO-pretrained or from a previous model), run, save.

Every model is built the same way — torchvision's own builder without weights, sized for our labels — and
weights are then loaded by name and shape. That one path serves COCO-pretrained starts (class heads of another
size stay freshly initialized), ImageNet backbones, published artifacts, and fine-tuning a previous version
whose label set changed (new heads, kept backbone).
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import sys
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

if "tensorflow" in sys.modules and "torchvision" not in sys.modules:  # see formats.tfrecord.tensorflow
    raise ImportError("this process already runs TensorFlow, and torchvision cannot be loaded after it (their bundled "
                      "libraries clash): serve or train torch and TensorFlow models in separate processes")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from PIL import Image
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.ssd import SSD
from torchvision.transforms.v2 import functional as F

from preannotate import uncertainty
from preannotate.formats import masks
from preannotate.hyperparameters import HyperparameterError, Hyperparameters
from preannotate.models.family import Graph
from preannotate.models.registry import Architecture, PretrainedWeightsUnavailable, num_classes
from preannotate.shapes import Label, Shape

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.pt"

def build_model(arch: Architecture, num_classes: int, image_size: int | None = None,
                max_image_size: int | None = None) -> torch.nn.Module:
    """An untrained model of ``arch`` with ``num_classes`` classes (background excluded)."""
    kwargs = {"num_classes": num_classes + 1, "weights": None, "weights_backbone": None}
    if arch.name.startswith(("fasterrcnn", "maskrcnn", "retinanet")):
        kwargs.update(min_size=image_size or arch.image_size, max_size=max_image_size or arch.max_image_size)
    if arch.name == "fasterrcnn_resnet101_fpn":
        # torchvision has no builder for it: its FPN backbone builder with ResNet-101, as the R-50 builder does.
        backbone = resnet_fpn_backbone(backbone_name="resnet101", weights=None, trainable_layers=5)
        return FasterRCNN(backbone, num_classes=num_classes + 1, min_size=kwargs["min_size"],
                          max_size=kwargs["max_size"])
    model = torchvision.models.get_model(arch.name, **kwargs)
    if arch.fixed_size and image_size and image_size != arch.image_size:
        # SSDlite's builder fixes its square at 320; its head is convolutional and its default boxes are relative
        # to the image, so another square only needs the transform that resizes to it
        model.transform.min_size, model.transform.max_size = (image_size,), image_size
        model.transform.fixed_size = (image_size, image_size)
    return model


def apply_knobs(model: torch.nn.Module, hp: Hyperparameters) -> None:
    """The post-processing and network keys of ``hp`` (``hyperparameters.POSTPROCESSING``, ``KNOBS``) on
    torchvision's parts: the two-stage models keep NMS, matcher and box coder in ``roi_heads`` and have an ``rpn``;
    SSD, RetinaNet and FCOS keep them on the model. The registry refuses keys an architecture lacks; a composed
    head without the part says so here."""
    owner = getattr(model, "roi_heads", model)
    names = {"nms_score_threshold": "score_thresh", "nms_iou_threshold": "nms_thresh",
             "max_total_detections": "detections_per_img"}
    for key, value in hp.post.overrides().items():
        setattr(owner, names[key], value)
    knobs = hp.network.knobs()
    if not knobs:
        return
    if {"rpn_score_threshold", "rpn_nms_iou_threshold", "rpn_max_proposals"} & knobs.keys():
        rpn = _part(model, "rpn", "the region proposal network of a two-stage head (faster-rcnn, mask-rcnn)")
        rpn.score_thresh = knobs.get("rpn_score_threshold", rpn.score_thresh)
        rpn.nms_thresh = knobs.get("rpn_nms_iou_threshold", rpn.nms_thresh)
        if "rpn_max_proposals" in knobs:
            rpn._post_nms_top_n = {"training": knobs["rpn_max_proposals"], "testing": knobs["rpn_max_proposals"]}
    if {"matched_threshold", "unmatched_threshold"} & knobs.keys():
        matcher = _part(owner, "proposal_matcher", "an IoU matcher (FCOS samples object centres instead)")
        high = knobs.get("matched_threshold", matcher.high_threshold)
        if isinstance(matcher, det_utils.SSDMatcher):  # SSD matches at one IoU
            if knobs.get("unmatched_threshold", high) != high:
                raise HyperparameterError("SSD learns background below the IoU it matches at: unmatched-threshold "
                                          "must equal matched-threshold")
            owner.proposal_matcher = det_utils.SSDMatcher(high)
        else:
            low = knobs.get("unmatched_threshold", matcher.low_threshold)
            if low > high:
                raise HyperparameterError(f"unmatched-threshold ({low}) must not exceed matched-threshold ({high})")
            owner.proposal_matcher = det_utils.Matcher(high, low, matcher.allow_low_quality_matches)
    scales = ("box_coder_x_scale", "box_coder_y_scale", "box_coder_width_scale", "box_coder_height_scale")
    if set(scales) & knobs.keys():
        coder = _part(owner, "box_coder", "a box coder")
        if not hasattr(coder, "weights"):
            raise HyperparameterError("this head codes boxes without weights (FCOS): box-coder scales do not apply")
        owner.box_coder = det_utils.BoxCoder(tuple(knobs.get(key, weight) for key, weight in zip(
            scales, coder.weights, strict=True)), coder.bbox_xform_clip)
    backbone_norms = {id(m) for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            where = "backbone" if id(module) in backbone_norms else "head"
            if f"{where}_batchnorm_decay" in knobs:
                module.momentum = 1 - knobs[f"{where}_batchnorm_decay"]  # TF's decay is torch's 1 - momentum
            module.eps = knobs.get(f"{where}_batchnorm_epsilon", module.eps)
    if {"anchor_min_scale", "anchor_max_scale"} & knobs.keys():
        boxes = _part(model, "anchor_generator", "SSD's default boxes")
        if not isinstance(boxes, DefaultBoxGenerator):
            raise HyperparameterError("anchor-min-scale and anchor-max-scale shape SSD's default boxes")
        model.anchor_generator = DefaultBoxGenerator(boxes.aspect_ratios, knobs.get("anchor_min_scale",
                                                                                   boxes.scales[0]),
                                                     knobs.get("anchor_max_scale", boxes.scales[-2]),
                                                     steps=boxes.steps, clip=boxes.clip)


def _part(owner: torch.nn.Module, name: str, what: str) -> Any:
    part = getattr(owner, name, None)
    if part is None:
        raise HyperparameterError(f"this model has no {name.replace('_', ' ')}: the key needs {what}")
    return part


def pretrained_labels(arch: Architecture) -> list[Label]:
    """The COCO labels of the architecture's pretrained weights, ids = the model's class indices."""
    if arch.pretrained_kind != "coco":
        raise PretrainedWeightsUnavailable(
            f"{arch.name} has no COCO-trained weights in torchvision (only an ImageNet backbone): "
            "give the labels to train it on (--labels a,b,...)")
    categories = _weights_enum(arch).meta["categories"]
    label_type = "mask" if arch.output == "mask" else "rectangle"
    return [Label(name=name, type=label_type, id=index) for index, name in enumerate(categories)
            if index > 0 and name != "N/A"]


def pretrained_state_dict(arch: Architecture) -> dict[str, torch.Tensor]:
    """The architecture's pretrained weights, keyed as in our model, from torchvision's cache (or
    ``PREANNOTATE_WEIGHTS_DIR``), downloaded there if missing unless ``PREANNOTATE_OFFLINE`` is set."""
    weights = _weights_enum(arch)
    candidates = _weights_candidates(arch)
    found = next((path for path in candidates if path.is_file()), None)
    if found is not None:
        state = torch.load(found, map_location="cpu", weights_only=True)
    elif os.environ.get("PREANNOTATE_OFFLINE"):
        raise PretrainedWeightsUnavailable(_missing_weights_message(arch, candidates, weights.url, "offline"))
    else:
        try:
            state = torch.hub.load_state_dict_from_url(weights.url, map_location="cpu", progress=False,
                                                       check_hash=True, weights_only=True)
        except Exception as error:  # any network or hash failure: tell the operator what to do instead
            reason = getattr(error, "reason", None) or getattr(error, "strerror", None) or "the download failed"
            raise PretrainedWeightsUnavailable(
                _missing_weights_message(arch, candidates, weights.url, str(reason))) from None
    if arch.pretrained_kind == "backbone":  # an ImageNet classifier: its layers are our FPN body
        state = {"backbone.body." + k: v for k, v in state.items() if not k.startswith("fc.")}
    return state


def fetch_pretrained(arch: Architecture) -> Path:
    """The pretrained weights in torchvision's cache (or ``PREANNOTATE_WEIGHTS_DIR``), downloaded there when missing
    and proven to load: where they are."""
    pretrained_state_dict(arch)
    return next(path for path in _weights_candidates(arch) if path.is_file())


def _weights_candidates(arch: Architecture) -> list[Path]:
    """Where the pretrained weights file is looked for, in order: ``PREANNOTATE_WEIGHTS_DIR``, torchvision's cache
    (where a download goes)."""
    filename = os.path.basename(_weights_enum(arch).url)
    candidates = [Path(torch.hub.get_dir()) / "checkpoints" / filename]
    if os.environ.get("PREANNOTATE_WEIGHTS_DIR"):
        candidates.insert(0, Path(os.environ["PREANNOTATE_WEIGHTS_DIR"]) / filename)
    return candidates


def load_matching(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Load every tensor of ``state`` whose name and shape match ``model``; return the names left as they were
    (class heads sized for other labels, or parts the source lacks)."""
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(usable, strict=False)
    skipped = sorted(k for k in own if k not in usable and not k.endswith("num_batches_tracked"))
    if skipped:
        log.info("kept fresh initialization for %d tensors (e.g. %s)", len(skipped), ", ".join(skipped[:3]))
    return skipped


class TorchvisionDetector:
    """A torchvision detection model ready to detect, with its labels (class index = ``Label.id``)."""

    def __init__(self, model: torch.nn.Module, labels: Sequence[Label], output: str,
                 device: str | torch.device | None = None, letterbox: bool = False,
                 appearance: Mapping[str, torch.nn.Module] | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.letterbox = letterbox  # trained on frames padded to a square: pad them so here too
        self.model = model.to(self.device).eval()
        self.runner = self.model  # what detects: the model, or a copy whose exported part runs converted
        self.labels = list(labels)
        self.output = output
        self._label_by_class = {label.id: label for label in self.labels}
        # The appearance of each image of the last forward pass at each depth of the backbone, and that of a sample
        # of the training frames (saved with the weights, the depths side by side): how unfamiliar a frame is
        # (``uncertainty.novelty``). And the score of every class at every box the last pass considered.
        self.familiar: np.ndarray | None = None
        self._appearance: dict[str, np.ndarray] = {}
        self._class_scores: torch.Tensor | None = None
        layers = appearance_layers(self.model) if appearance is None else appearance
        for depth, layer in layers.items():
            layer.register_forward_hook(functools.partial(self._keep_appearance, depth))
        source = class_score_source(self.model)
        if source is not None:
            module, scores = source
            module.register_forward_hook(lambda _module, _inputs, output: self._keep_class_scores(scores(output)))

    def _keep_appearance(self, depth: str, module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> None:
        if not module.training:  # inference only: training must not hold on to its graph
            # detached: a forward outside inference mode (a caller's own) must not keep its graph
            self._appearance[depth] = appearance_vectors(output.detach()).float().cpu().numpy()

    def run_converted(self, graph: Graph) -> None:
        """Detect through ``graph`` from now on: the exported part (``export_graph``) compiled by another runtime
        (``models.runtime``) runs in place of the backbone (and SSD's, RetinaNet's or FCOS's head) in a copy of the
        model, whose transform, anchors, decoding and NMS are the model's own. ``model`` stays the whole eager
        network (what is trained and saved)."""
        runner = copy.copy(self.model)
        runner.__dict__["_modules"] = dict(self.model._modules)  # its own parts: swapping them leaves the model
        runner.backbone = ConvertedPart(graph, self._appearance)
        if not isinstance(self.model, GeneralizedRCNN):  # one-stage: the head is in the graph too
            runner.head = HeadOutputs(runner.backbone)
            source = class_score_source(self.model)
            if source is not None:  # the class scores, read as from the eager head
                runner.head.register_forward_hook(
                    lambda _module, _inputs, output: self._keep_class_scores(source[1](output)))
        self.runner = runner

    def _keep_class_scores(self, scores: torch.Tensor) -> None:
        if not self.model.training:
            self._class_scores = scores.detach()

    def detect_scored(self, images: Sequence[Image.Image | np.ndarray], threshold: float
                      ) -> list[tuple[list[Shape], float]]:
        """The shapes of each image, with how unfamiliar the image is (0 without a training sample to compare)."""
        # ``detect`` and the novelty only: the served measure (``uncertainty.SERVED``) reads nothing else, and the
        # class margins ``examine`` also reads cost several times the forward pass (bench/ranking.py)
        shapes = self.detect(images, threshold)
        novelty = self._novelty(self._appearance)
        return [(found, uncertainty.unfamiliarity({name: float(values[i]) for name, values in novelty.items()}))
                for i, found in enumerate(shapes)]

    def appearance(self, images: Sequence[Image.Image | np.ndarray], depth: str | None = None) -> np.ndarray:
        """The appearance of each image, its depths side by side (what ``familiar`` holds for the training
        frames), or the one ``depth`` of ``DEPTHS``."""
        self.detect(images, 1.0)
        return np.concatenate([self._appearance[name] for name in DEPTHS if name in self._appearance
                               and depth in (None, name)], 1)

    @torch.inference_mode()
    def examine(self, images: Sequence[Image.Image | np.ndarray], threshold: float, flip: bool = False
                ) -> list[tuple[list[Shape], dict[str, float]]]:
        """``detect``, with what the forward pass says about how sure the model is of each image, measure by
        measure (``uncertainty.MEASURES``: those this model can give): the novelty at each depth of its backbone
        (with ``familiar``), how close the runner-up class comes on its detections (``margin``, where the model's
        class scores can be read) and, with ``flip``, how much its detections on the mirrored image disagree
        (``flip``: a second forward pass). Detections scoring under ``threshold`` are not considered."""
        arrays = [np.asarray(image) for image in images]
        mirrored = [np.ascontiguousarray(array[:, ::-1]) for array in arrays] if flip else []
        outputs = self._outputs([*arrays, *mirrored])
        found = [self._candidates(output, threshold) for output in outputs]
        novelty = self._novelty({depth: vectors[:len(arrays)] for depth, vectors in self._appearance.items()})
        examined = []
        for i, (output, keep) in enumerate(zip(outputs, found[:len(arrays)], strict=False)):
            doubts = {measure: float(values[i]) for measure, values in novelty.items()}
            class_scores = self._class_scores_of(i, output, keep)
            if class_scores is not None:
                doubts["margin"] = max(uncertainty.class_confusion(class_scores), default=0.0)
            if flip and "boxes" in output:
                width = arrays[i].shape[1]
                other = found[len(arrays) + i]
                boxes = outputs[len(arrays) + i]["boxes"][other].cpu().numpy()
                doubts["flip"] = uncertainty.flip_disagreement(
                    _detections(output, keep),
                    (np.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1),
                     *_detections(outputs[len(arrays) + i], other)[1:]))
            examined.append((self.to_shapes(output, threshold), doubts))
        return examined

    def _novelty(self, appearance: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``uncertainty.novelty`` at each depth whose training sample ``familiar`` holds (a version published
        before the deeper depths were read holds only the first)."""
        if self.familiar is None:
            return {}
        novelty, start = {}, 0
        for depth in DEPTHS:
            if depth not in appearance:
                continue
            if start >= self.familiar.shape[1]:
                break
            width = appearance[depth].shape[1]
            novelty[f"novelty_{depth}"] = uncertainty.novelty(appearance[depth],
                                                                      self.familiar[:, start:start + width])
            start += width
        return novelty

    def _candidates(self, output: dict[str, torch.Tensor], threshold: float) -> torch.Tensor:
        """Which of an output's detections are of the model's labels and score at least ``threshold``."""
        known = torch.tensor([int(cls) in self._label_by_class for cls in output["labels"].tolist()], dtype=torch.bool,
                             device=output["labels"].device)
        return (output["scores"] >= threshold) & known

    def _class_scores_of(self, image: int, output: dict[str, torch.Tensor], keep: torch.Tensor) -> np.ndarray | None:
        """Every class's score (background left out) at each kept detection of ``image``: the row of the last
        pass's class scores that gave the detection its score (torchvision keeps only the winning class's score;
        the row is found by that score: it is the same number, one row of the head's output). None when the model's
        class scores are not read."""
        scores = self._class_scores
        if scores is None:
            return None
        rows = scores[image] if scores.dim() == 3 else scores  # one image's boxes (SSD, RetinaNet) or the batch's
        found = [rows[(rows[:, cls] - score).abs().argmin(), 1:]
                 for cls, score in zip(output["labels"][keep].tolist(), output["scores"][keep].tolist(), strict=True)]
        return torch.stack(found).float().cpu().numpy() if found else np.zeros((0, rows.shape[1] - 1), np.float32)

    @torch.inference_mode()
    def detect(self, images: Sequence[Image.Image | np.ndarray], threshold: float) -> list[list[Shape]]:
        """Shapes found on each image, in its pixel coordinates, with ``score >= threshold``."""
        return [self.to_shapes(output, threshold) for output in self._outputs(images)]

    def _outputs(self, images: Sequence[Image.Image | np.ndarray]) -> list[dict[str, torch.Tensor]]:
        """The model's output for each image, in the image's pixel coordinates (a letterbox taken off)."""
        tensors = [self.to_tensor(image) for image in images]
        if not self.letterbox:
            return self.runner(tensors)
        sizes = [tuple(tensor.shape[-2:]) for tensor in tensors]
        squares = [F.center_crop(tensor, [max(size)] * 2) for tensor, size in zip(tensors, sizes, strict=True)]
        return [_unpad(output, size) for output, size in zip(self.runner(squares), sizes, strict=True)]

    def to_tensor(self, image: Image.Image | np.ndarray) -> torch.Tensor:
        # a read-only HWC view, no copy: the float conversion below makes the one copy the model needs
        array = np.asarray(image)
        if any(stride < 0 for stride in array.strides):  # a mirrored view (frame[:, ::-1]): torch takes no such view
            array = np.ascontiguousarray(array)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "non-writable array": never written to
            tensor = torch.from_numpy(array).permute(2, 0, 1)
        return F.to_dtype(tensor.to(self.device), torch.float32, scale=True)

    def to_shapes(self, output: dict[str, torch.Tensor], threshold: float) -> list[Shape]:
        keep = output["scores"] >= threshold
        boxes = output["boxes"][keep].round(decimals=2).cpu().tolist()
        classes = output["labels"][keep].cpu().tolist()
        scores = output["scores"][keep].cpu().tolist()
        bitmaps = (output["masks"][keep, 0] > 0.5).cpu().numpy() if "masks" in output else None
        manifest = getattr(self, "manifest", None)  # set once made or loaded (models.create_detector, load_detector)
        shapes = []
        for i, (box, cls, score) in enumerate(zip(boxes, classes, scores, strict=True)):
            label = self._label_by_class.get(cls)
            if label is None:
                continue
            if bitmaps is not None:  # a mask model's detection with no mask pixel found nothing
                outline = manifest.outline_of(label.name) if manifest is not None else "mask"
                fitted = masks.fit_outline(bitmaps[i], outline) if outline != "mask" else None
                if fitted is not None:  # served in its label's own shape: a (rotated) rectangle or an ellipse
                    kind, points, rotation = fitted
                    shapes.append(Shape(label.name, kind, [round(p, 2) for p in points], rotation=round(rotation, 2),
                                        score=score, source="auto"))
                elif outline == "mask" and bitmaps[i].any():
                    shapes.append(Shape(label.name, "mask", masks.bitmap_to_cvat_rle(bitmaps[i]), score=score,
                                        source="auto"))
            else:
                shapes.append(Shape(label.name, "rectangle", box, score=score,
                                    source="auto"))
        return shapes


def freeze_backbone(model: torch.nn.Module, trainable_layers: int | None, init: str) -> list[torch.nn.Module]:
    """Freeze all but the last ``trainable_layers`` stages of the backbone, as torchvision's builders do (None:
    all of them from scratch, else torchvision's default of 3 — all for SSDlite). From pretrained or previous
    weights the backbone's batch norms are frozen too (torchvision's ``FrozenBatchNorm2d``; small detection
    batches would wreck their statistics); they are returned so the loop keeps them in eval mode."""
    ssd = hasattr(model.backbone, "features")  # SSDlite's MobileNet extractor; the others wrap an FPN body
    if ssd:  # the builder split MobileNet's C4 block in two: its first half starts a stage
        first, rest = model.backbone.features
        blocks = [*first, *rest]
        starts = sorted({0, len(first) - 1, len(blocks) - 1,
                         *(i for i, b in enumerate(blocks) if getattr(b, "_is_cn", False))})
    elif hasattr(model.backbone.body, "layer4"):  # ResNet: conv1 + bn1, then layer1..layer4
        names = [name for name, _ in model.backbone.body.named_children()]
        blocks = list(model.backbone.body.children())
        starts = [0, *(names.index(f"layer{k}") for k in range(1, 5))]
    else:  # MobileNetV3 features: stages start at the strided blocks (torchvision's stage_indices)
        blocks = list(model.backbone.body.children())
        starts = sorted({0, len(blocks) - 1, *(i for i, b in enumerate(blocks) if getattr(b, "_is_cn", False))})
    if trainable_layers is None:
        trainable_layers = len(starts) if init == "random" or ssd else 3
    trainable_layers = min(trainable_layers, len(starts))
    freeze_before = len(blocks) if trainable_layers == 0 else starts[len(starts) - trainable_layers]
    for block in blocks[:freeze_before]:
        block.requires_grad_(False)
    return freeze_norms(model.backbone.body) if init != "random" and not ssd else []


def freeze_norms(module: torch.nn.Module) -> list[torch.nn.Module]:
    """Freeze the batch norms inside ``module`` (weights and, kept in eval mode by the loop, statistics): small
    detection batches would wreck statistics learned on large ones. Returns them."""
    norms = [m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for norm in norms:
        norm.requires_grad_(False)
    return norms


def _unpad(output: dict[str, torch.Tensor], size: tuple[int, int]) -> dict[str, torch.Tensor]:
    """A letterboxed image's detections in the coordinates of the image before padding. ``center_crop`` pads
    ``(side - height) // 2`` rows above and ``(side - width) // 2`` columns left, as the training letterbox does."""
    height, width = size
    top, left = (max(size) - height) // 2, (max(size) - width) // 2
    boxes = output["boxes"] - torch.tensor([left, top, left, top], dtype=output["boxes"].dtype,
                                           device=output["boxes"].device)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    unpadded = {**output, "boxes": boxes}
    if "masks" in output:
        unpadded["masks"] = output["masks"][..., top:top + height, left:left + width]
    return unpadded


def create(arch: Architecture, labels: Sequence[Label], hp: Hyperparameters, init: str = "random",
           state: dict[str, torch.Tensor] | None = None, device: str | None = None) -> TorchvisionDetector:
    """Build a detector for ``labels`` sized by ``hp``: ``random``, ``pretrained`` (torchvision's weights) or from
    ``state`` (a previous model's weights; heads for a changed label set start fresh)."""
    model = build_model(arch, num_classes(labels), hp.network.image_size, hp.network.max_image_size)
    apply_knobs(model, hp)
    if init == "pretrained":
        load_matching(model, pretrained_state_dict(arch))
    elif state is not None:
        load_matching(model, state)
    return TorchvisionDetector(model, labels, arch.output, device, hp.network.letterbox)


DEPTHS = ("early", "middle", "deep")  # where a frame's appearance is read, in the order ``familiar`` holds them


def appearance_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The backbone's stages whose outputs are a frame's appearance, by depth: ``early`` at stride 4-8 (edges and
    colours, before the network learned what to ignore; SSDlite: the fifth block of its MobileNet, FPN models: the
    fifth child of their body — ResNet's layer1, MobileNet's fifth block), ``middle`` at stride 16 (SSDlite: the
    first stride-16 block; ResNet: layer3) and ``deep``, the backbone's last stage. Empty for a model built
    otherwise: its frames are never called unfamiliar."""
    backbone = getattr(model, "backbone", None)
    if hasattr(backbone, "features"):
        blocks = [*backbone.features[0].children()]
        return {"early": blocks[4], "middle": blocks[7], "deep": backbone.features[1]}
    if hasattr(backbone, "body"):
        children = [*backbone.body.children()]
        if hasattr(backbone.body, "layer3"):  # ResNet
            return {"early": children[4], "middle": backbone.body.layer3, "deep": children[-1]}
        return {"early": children[4], "middle": children[7], "deep": children[-1]}  # MobileNetV3's blocks
    return {}


def class_score_source(model: torch.nn.Module
                       ) -> tuple[torch.nn.Module, Callable[[Any], torch.Tensor]] | None:
    """Where the model's score of every class at every box it considers can be read: the module and how its
    output becomes those scores (as the model's own post-processing computes them: SSD's softmax over the head's
    logits, RetinaNet's sigmoid, the two-stage models' softmax over their box predictor's logits). None for FCOS
    (its scores mix in a centreness) and for models built otherwise."""
    if isinstance(model, SSD):
        return model.head, lambda output: torch.softmax(output["cls_logits"], -1)
    if isinstance(model, RetinaNet):
        return model.head, lambda output: torch.sigmoid(output["cls_logits"])
    predictor = getattr(getattr(model, "roi_heads", None), "box_predictor", None)
    if predictor is not None:
        return predictor, lambda output: torch.softmax(output[0], -1)
    return None


def appearance_vectors(output: torch.Tensor) -> torch.Tensor:
    """One layer's output as each image's appearance at its depth: each channel's mean and maximum, side by side."""
    return torch.cat([output.mean((2, 3)), output.amax((2, 3))], 1)


# The exported graph (models.runtime): the backbone and a one-stage model's head as ONNX, read by OpenVINO and
# ONNX Runtime alike.
GRAPH_FILE = "model.onnx"
CONVERTS_TO = ("openvino", "onnxruntime")


def convertible(detector: TorchvisionDetector) -> bool:
    """Whether the detector can run its exported part converted (``models.runtime``): torchvision's detection
    models, whose backbone (and one-stage head) is a graph without Python control flow over its values."""
    return type(detector) is TorchvisionDetector and isinstance(detector.model, (SSD, GeneralizedRCNN, RetinaNet,
                                                                                 FCOS))


class ExportedPart(torch.nn.Module):
    """What runs on the transformed batch, as one graph to export, its outputs by name: the head's (a one-stage
    model's: ``cls_logits``, ``bbox_regression``...), the backbone's features (``feature:KEY``; of a one-stage
    model only one channel of each: the sizes its anchors are laid on) and each depth's appearance
    (``appearance:DEPTH``, as ``appearance_vectors`` reads it)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.backbone = model.backbone
        self.head = None if isinstance(model, GeneralizedRCNN) else model.head
        self.layers = appearance_layers(model)

    def named(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        seen: dict[str, torch.Tensor] = {}
        hooks = [layer.register_forward_hook(lambda _m, _i, output, depth=depth: seen.update(
            {f"appearance:{depth}": appearance_vectors(output)})) for depth, layer in self.layers.items()]
        try:
            features = self.backbone(images)
        finally:
            for hook in hooks:
                hook.remove()
        if self.head is None:
            return {**{f"feature:{key}": value for key, value in features.items()}, **seen}
        return {**self.head(list(features.values())),
                **{f"feature:{key}": value[:, :1] for key, value in features.items()}, **seen}

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.named(images).values())


def export_graph(detector: TorchvisionDetector, path: Path) -> None:
    """Export the detector's ``ExportedPart`` to ONNX at ``path``, for any batch and image size."""
    model = detector.model
    part = ExportedPart(model).eval()
    with torch.no_grad():  # an example batch as the model's own transform makes it, from a 4:3 frame
        example = model.transform([torch.rand(3, 480, 640, device=detector.device)])[0].tensors
        names = list(part.named(example))
        outputs = part(example)
        dynamic = {"images": {0: "batch", 2: "height", 3: "width"},
                   **{name: {axis: f"{name}_{axis}" for axis in range(output.dim())}
                      for name, output in zip(names, outputs, strict=True)}}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on shapes read as Python numbers: constant here
            torch.onnx.export(part, (example,), str(path), input_names=["images"], output_names=names,
                              dynamic_axes=dynamic, opset_version=17, dynamo=False)


class ConvertedPart(torch.nn.Module):
    """In the copy of a model that runs converted, in the place of its backbone: runs the exported graph and
    hands on what it computed — the features to the model, the head's outputs to ``HeadOutputs`` (in the head's
    place), each depth's appearance into ``appearance`` (the detector's)."""

    def __init__(self, graph: Graph, appearance: dict[str, np.ndarray]):
        super().__init__()
        self.graph = graph
        self.appearance = appearance
        self.head_outputs: dict[str, torch.Tensor] = {}

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        features, head = OrderedDict(), {}
        for name, value in self.graph(images.float().contiguous().numpy()).items():
            kind, _, key = name.partition(":")
            if kind == "appearance":
                self.appearance[key] = value
            elif kind == "feature":
                features[key] = torch.from_numpy(value)
            else:
                head[name] = torch.from_numpy(value)
        self.head_outputs = head
        return features


class HeadOutputs(torch.nn.Module):
    """In the copy of a one-stage model that runs converted, in the place of its head: what the graph computed
    for it (``ConvertedPart``)."""

    def __init__(self, part: ConvertedPart):
        super().__init__()
        self._part = [part]  # held, not a submodule: it is the backbone's

    def forward(self, features: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return self._part[0].head_outputs


def _detections(output: dict[str, torch.Tensor], keep: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boxes, classes and scores of an output's kept detections, as arrays."""
    return tuple(output[key][keep].cpu().numpy() for key in ("boxes", "labels", "scores"))


APPEARANCE_FILE = "appearance.npy"  # beside the weights: the training sample's appearance


def load(arch: Architecture, labels: Sequence[Label], weights_path: Path, hp: Hyperparameters,
         device: str | None = None) -> TorchvisionDetector:
    """A published model: its architecture, labels, hyperparameters and weights file — nothing downloaded."""
    model = build_model(arch, num_classes(labels), hp.network.image_size, hp.network.max_image_size)
    apply_knobs(model, hp)
    return restored(model, labels, arch.output, weights_path, device, hp.network.letterbox)


def restored(model: torch.nn.Module, labels: Sequence[Label], output: str, weights_path: Path,
             device: str | None, letterbox: bool, appearance: Mapping[str, torch.nn.Module] | None = None,
             kind: type[TorchvisionDetector] = TorchvisionDetector) -> TorchvisionDetector:
    """``model`` with its published weights (and its training frames' appearance, when saved) as a detector (of
    ``kind``: a classifier's is a subclass)."""
    model.load_state_dict(read_weights(weights_path))
    detector = kind(model, labels, output, device, letterbox, appearance)
    familiar = weights_path.with_name(APPEARANCE_FILE)
    if familiar.is_file():
        detector.familiar = np.load(familiar).astype(np.float32)
    return detector


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def write_weights(detector: TorchvisionDetector, path: Path) -> None:
    torch.save(detector.model.state_dict(), path)
    if detector.familiar is not None:
        np.save(path.with_name(APPEARANCE_FILE), detector.familiar.astype(np.float16))


def _weights_enum(arch: Architecture):
    return torchvision.models.get_weight(arch.pretrained)


def _missing_weights_message(arch: Architecture, candidates: list[Path], url: str, reason: str) -> str:
    return (f"pretrained weights for {arch.name} are not on disk and could not be downloaded ({reason}). "
            f"Put {Path(url).name} (from {url}) into {candidates[-1].parent} or into PREANNOTATE_WEIGHTS_DIR, "
            "or start from random weights (`-H init=random` for `preannotate train`, `--init random` for "
            "`preannotate models create`).")
