"""Composed detectors — the model designer: a backbone × neck × head, all torchvision's parts.

* **backbone**: a torchvision classification network (ResNet 18–152, EfficientNet B0–B7 and V2 S/M/L, MobileNet V2
  and V3), its feature maps taken by ``torchvision.models.feature_extraction`` at the end of each stride (level *i*
  has stride 2^i), up to ``top-level`` (at most 5);
* **neck**: ``none`` (the top level alone), ``fpn`` (``torchvision.ops.FeaturePyramidNetwork``) or ``bifpn``
  (``BiFPN`` below: EfficientDet's repeated top-down and bottom-up fusion with fast normalized weights), producing
  ``neck-levels`` (``3-7``: levels above the backbone's come from stride-2 convolutions, as RetinaNet's P6 and P7)
  with ``neck-channels`` channels;
* **head**: torchvision's ``RetinaNet``, ``FCOS``, ``FasterRCNN`` or ``MaskRCNN``, with anchors sized to the levels.

The result is a torchvision detection model: ``torchvision_family``'s detector runs it, its trainer trains it, its
weights load by name and shape (``init=previous`` keeps every part whose shapes agree). ``resize-input=false`` keeps
each frame at its own resolution instead of scaling it to ``image-size``. The composition is part of the
hyperparameters, so the manifest records it and loading rebuilds exactly that model.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.models.feature_extraction import create_feature_extractor
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock

from preannotate.hyperparameters import (  # noqa: F401 - the parts' names, for their users
    BACKBONES,
    HEADS,
    NECKS,
    HyperparameterError,
    Hyperparameters,
)
from preannotate.models import torchvision_family as torch_family
from preannotate.models.registry import Architecture, PretrainedWeightsUnavailable, num_classes
from preannotate.shapes import Label

PROBE = 64  # the side of the image a backbone is probed with to find its strides


def backbone_stages(network: nn.Module, name: str) -> list[tuple[list[str], int, int]]:
    """A torchvision classifier's stages in order, each ``(its modules, level, channels)``: the stem (level 1), then
    one per stride — ResNet's ``layer1``-``layer4`` (levels 2-5); for the ``features`` networks, the blocks at each
    stride, found by probing."""
    if name.startswith("resnet"):
        width = 64 if name in ("resnet18", "resnet34") else 256
        return [(["conv1", "bn1"], 1, 64), *((
            [f"layer{i}"], i + 1, width * 2 ** (i - 1)) for i in range(1, 5))]
    stages: list[tuple[list[str], int, int]] = []
    x = torch.zeros(1, 3, PROBE, PROBE)
    with torch.no_grad():
        for index, block in enumerate(network.features):
            x = block(x)
            level = max(1, round(math.log2(PROBE / x.shape[-1])))
            if stages and stages[-1][1] == level:
                stages[-1][0].append(f"features.{index}")
                stages[-1] = (stages[-1][0], level, int(x.shape[1]))
            else:
                stages.append(([f"features.{index}"], level, int(x.shape[1])))
    return stages


def feature_body(network: nn.Module, name: str, top_level: int) -> nn.Module:
    """The backbone's feature maps ``{"level": tensor}`` for levels 2..top: torchvision's feature extractor over
    ``network``, its modules keeping their names (``layer1``..., as in torchvision's own detectors, so weights of
    one reach the other by name). It carries ``levels``, ``channels`` (per level) and ``stages`` (the modules of
    the stem and of each level: what ``trainable-backbone-layers`` counts)."""
    stages = [stage for stage in backbone_stages(network, name) if stage[1] <= top_level]
    levels = [(modules[-1], level, channels) for modules, level, channels in stages if level >= 2]
    if not levels:
        raise HyperparameterError(f"{name} has no level at or below top-level={top_level}")
    body = create_feature_extractor(network, {node: str(level) for node, level, _ in levels})
    body.stages = [modules for modules, _, _ in stages]
    body.levels = [level for _, level, _ in levels]
    body.channels = {level: channels for _, level, channels in levels}
    return body


class ExtraLevels(ExtraFPNBlock):
    """Levels above the backbone's from stride-2 convolutions, each over the one below (RetinaNet's P6/P7 for any
    count), for torchvision's ``FeaturePyramidNetwork``."""

    def __init__(self, channels: int, count: int):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(channels, channels, 3, 2, 1) for _ in range(count))

    def forward(self, p: list[torch.Tensor], c: list[torch.Tensor], names: list[str]):
        for index, conv in enumerate(self.convs):
            p.append(conv(p[-1] if index == 0 else nn.functional.relu(p[-1])))
            names.append(f"extra{index}")
        return p, names


class BiFPNLayer(nn.Module):
    """One BiFPN layer (EfficientDet, Tan et al. 2020): a top-down then a bottom-up pass, each node a fast normalized
    fusion ``sum(w_i x_i) / (sum(w_i) + eps)`` with ``w = relu(weights)``, followed by a depthwise-separable
    convolution, batch norm and SiLU."""

    def __init__(self, channels: int, count: int, eps: float = 1e-4):
        super().__init__()
        self.count, self.eps = count, eps
        self.top_down_weights = nn.Parameter(torch.ones(count - 1, 2))
        self.bottom_up_weights = nn.Parameter(torch.ones(count - 1, 3))
        self.top_down = nn.ModuleList(_separable(channels) for _ in range(count - 1))
        self.bottom_up = nn.ModuleList(_separable(channels) for _ in range(count - 1))

    def fuse(self, weights: torch.Tensor, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        w = nn.functional.relu(weights[:len(inputs)])
        return sum(wi * x for wi, x in zip(w, inputs, strict=True)) / (w.sum() + self.eps)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        top_down = [features[-1]]
        for i in range(self.count - 2, -1, -1):  # from the second highest level down
            up = nn.functional.interpolate(top_down[0], size=features[i].shape[-2:], mode="nearest")
            top_down.insert(0, self.top_down[i](self.fuse(self.top_down_weights[i], [features[i], up])))
        out = [top_down[0]]
        for i in range(1, self.count):
            down = nn.functional.max_pool2d(out[-1], 3, 2, 1)
            if down.shape[-2:] != features[i].shape[-2:]:
                down = nn.functional.interpolate(down, size=features[i].shape[-2:], mode="nearest")
            inputs = [features[i], down] if i == self.count - 1 else [features[i], top_down[i], down]
            out.append(self.bottom_up[i - 1](self.fuse(self.bottom_up_weights[i - 1], inputs)))
        return out


def _separable(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False),
                         nn.Conv2d(channels, channels, 1, bias=False), nn.BatchNorm2d(channels), nn.SiLU())


class BiFPN(nn.Module):
    """``layers`` BiFPN layers over the levels ``levels`` (inputs projected to ``channels``; levels above the
    backbone's made by stride-2 max pooling, as EfficientDet makes P6 and P7)."""

    def __init__(self, in_channels: dict[int, int], levels: Sequence[int], channels: int, layers: int):
        super().__init__()
        self.levels = list(levels)
        self.inputs = [level for level in self.levels if level in in_channels]
        self.project = nn.ModuleDict({str(level): nn.Sequential(nn.Conv2d(in_channels[level], channels, 1),
                                                                nn.BatchNorm2d(channels))
                                      for level in self.inputs})
        self.extra = len(self.levels) - len(self.inputs)
        self.layers = nn.ModuleList(BiFPNLayer(channels, len(self.levels)) for _ in range(layers))

    def forward(self, features: dict[int, torch.Tensor]) -> list[torch.Tensor]:
        maps = [self.project[str(level)](features[level]) for level in self.inputs]
        for _ in range(self.extra):
            maps.append(nn.functional.max_pool2d(maps[-1], 3, 2, 1))
        for layer in self.layers:
            maps = layer(maps)
        return maps


class Neck(nn.Module):
    """Backbone + neck as torchvision's detection heads take it: ``OrderedDict`` of maps, ``out_channels``; named
    as torchvision's ``BackboneWithFPN`` (``body``, ``fpn``)."""

    def __init__(self, body: nn.Module, neck: str, levels: Sequence[int], channels: int, layers: int):
        super().__init__()
        self.body, self.kind = body, neck
        top = max(body.levels)
        if neck == "none":  # the top level alone; wider than neck-channels it is narrowed by a 1x1 convolution (a
            # RetinaNet head on EfficientNet-B7's 2560 channels would hold 470M weights)
            self.levels, self.out_channels = [top], min(body.channels[top], channels)
            self.reduce = nn.Conv2d(body.channels[top], channels, 1) if body.channels[top] > channels else None
            return
        self.levels = list(levels)
        self.inputs = [level for level in self.levels if level in body.channels]
        if not self.inputs:
            raise HyperparameterError(f"neck-levels {levels[0]}-{levels[-1]} take no level of the backbone (levels "
                             f"{body.levels[0]}-{top})")
        if self.inputs != self.levels[:len(self.inputs)]:
            raise HyperparameterError("neck-levels must start at a backbone level and go up without a gap")
        self.out_channels = channels
        if neck == "fpn":
            extra = len(self.levels) - len(self.inputs)
            self.fpn = FeaturePyramidNetwork([body.channels[level] for level in self.inputs], channels,
                                             extra_blocks=ExtraLevels(channels, extra) if extra else None)
        else:
            self.bifpn = BiFPN(body.channels, self.levels, channels, layers)

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        features = {int(level): x for level, x in self.body(images).items()}
        if self.kind == "none":
            top = features[self.levels[0]]
            return OrderedDict([("0", top if self.reduce is None else self.reduce(top))])
        if self.kind == "fpn":
            maps = list(self.fpn(OrderedDict((str(level), features[level]) for level in self.inputs)).values())
        else:
            maps = self.bifpn(features)
        return OrderedDict((str(i), x) for i, x in enumerate(maps))


class KeepSize(GeneralizedRCNNTransform):
    """``resize-input=false``: every frame at its own resolution (normalized and batched, never scaled)."""

    def resize(self, image: torch.Tensor, target: dict[str, torch.Tensor] | None = None):
        return image, target


def build_model(arch: Architecture, num_classes: int, image_size: int | None = None,
                max_image_size: int | None = None, composition: dict[str, Any] | None = None,
                weights: str | None = None) -> nn.Module:
    """The composed detector of ``composition`` (``Hyperparameters.composition()``) for ``num_classes`` classes;
    ``weights``: the backbone's torchvision weights (``"DEFAULT"``: its ImageNet ones)."""
    spec = {**arch.build, **(composition or {})}
    name, neck, head = spec["backbone"], spec["neck"], spec["head"]
    network = torchvision.models.get_model(name, weights=weights)
    body = feature_body(network, name, spec["top_level"])
    low, high = spec["neck_levels"]
    backbone = Neck(body, neck, range(low, high + 1), spec["neck_channels"], spec["neck_layers"])
    if head == "fcos" and backbone.out_channels % 32:  # its head's GroupNorm takes groups of 32 channels
        where = "neck-channels" if neck != "none" else f"{name}'s level {backbone.levels[0]} (neck=none)"
        raise HyperparameterError(f"head=fcos normalizes in groups of 32 channels: {where} gives "
                                  f"{backbone.out_channels}; use a multiple of 32")
    count = len(backbone.levels)
    sizes = tuple((32 * 2 ** (level - 3),) for level in backbone.levels)  # 32 px at stride 8, doubling per level
    common = {"min_size": image_size or arch.image_size, "max_size": max_image_size or arch.max_image_size}
    if head == "retinanet":
        scales = tuple(tuple(s * 2 ** (k / 3) for k in range(3)) for (s,) in sizes)
        model = RetinaNet(backbone, num_classes + 1, anchor_generator=AnchorGenerator(scales, ((0.5, 1.0, 2.0),) *
                                                                                      count), **common)
    elif head == "fcos":
        model = FCOS(backbone, num_classes + 1, anchor_generator=AnchorGenerator(
            tuple((2 ** level,) for level in backbone.levels), ((1.0,),) * count), **common)
    else:
        names = [str(i) for i in range(count)]
        anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * count)
        kwargs = {"rpn_anchor_generator": anchors, "box_roi_pool": MultiScaleRoIAlign(names, 7, 2), **common}
        if head == "mask_rcnn":
            model = MaskRCNN(backbone, num_classes + 1, mask_roi_pool=MultiScaleRoIAlign(names, 14, 2), **kwargs)
        else:
            model = FasterRCNN(backbone, num_classes + 1, **kwargs)
    if not spec["resize_input"]:
        transform = model.transform
        model.transform = KeepSize(transform.min_size, transform.max_size, transform.image_mean,
                                   transform.image_std)
    return model


def output(composition: dict[str, Any]) -> str:
    """What a composition returns: masks for the Mask R-CNN head, boxes otherwise."""
    return "mask" if composition.get("head") == "mask_rcnn" else "rectangle"


def pretrained_labels(arch: Architecture) -> list[Label]:
    raise PretrainedWeightsUnavailable(f"{arch.name} is composed from an ImageNet backbone: it has no COCO weights; "
                                       "give the labels to train it on (--labels a,b,...)")


def create(arch: Architecture, labels: Sequence[Label], hp: Hyperparameters, init: str = "random",
           state: dict[str, torch.Tensor] | None = None, device: str | None = None
           ) -> torch_family.TorchvisionDetector:
    """The composed detector ``hp`` describes, for ``labels``: ``random``, ``pretrained`` (the backbone's ImageNet
    weights, from torchvision's cache or downloaded there) or from ``state`` (any model's weights, kept where names
    and shapes agree)."""
    weights = "DEFAULT" if init == "pretrained" else None
    try:
        model, composition = _model(arch, labels, hp, weights)
    except (OSError, RuntimeError) as error:
        if weights is None:
            raise
        raise PretrainedWeightsUnavailable(
            f"the ImageNet weights of {hp.network.backbone or arch.build['backbone']} could not be loaded "
            f"({error.__class__.__name__}): put them into torchvision's cache ($TORCH_HOME/hub/checkpoints) or start "
            "from random weights (`-H init=random`)") from None
    if state is not None:
        torch_family.load_matching(model, state)
    return torch_family.TorchvisionDetector(model, labels, output(composition), device, hp.network.letterbox,
                                            appearance_layers(model))


def load(arch: Architecture, labels: Sequence[Label], weights_path: Path, hp: Hyperparameters,
         device: str | None = None) -> torch_family.TorchvisionDetector:
    """A published composed model: the composition of its hyperparameters rebuilt, its weights loaded."""
    model, composition = _model(arch, labels, hp)
    return torch_family.restored(model, labels, output(composition), weights_path, device, hp.network.letterbox,
                                 appearance_layers(model))


def _model(arch: Architecture, labels: Sequence[Label], hp: Hyperparameters, weights: str | None = None
           ) -> tuple[nn.Module, dict[str, Any]]:
    """The model ``hp`` composes (over the registry's composition), its knobs set, and that composition."""
    composition = {**arch.build, **hp.network.composition()}
    network = hp.network
    model = build_model(arch, num_classes(labels), network.image_size, network.max_image_size, composition, weights)
    torch_family.apply_knobs(model, hp)
    return model, composition


def fetch_pretrained(arch: Architecture) -> Path:
    """The registry's backbone's ImageNet weights in torchvision's cache (a composition naming another backbone
    fetches its own when it is created)."""
    try:
        torchvision.models.get_model(arch.build["backbone"], weights="DEFAULT")
    except (OSError, RuntimeError) as error:
        raise PretrainedWeightsUnavailable(f"the ImageNet weights of {arch.build['backbone']} could not be fetched "
                                           f"({error.__class__.__name__})") from None
    return Path(torch.hub.get_dir()) / "checkpoints"


WEIGHTS_FILE, read_weights, write_weights = torch_family.WEIGHTS_FILE, torch_family.read_weights, \
    torch_family.write_weights


def freeze_backbone(model: nn.Module, trainable_layers: int | None, init: str) -> list[nn.Module]:
    """Freeze all but the last ``trainable_layers`` of the backbone's stages (stem, then one per level, as
    torchvision counts ResNet's conv1 and layer1-4; None: all of them from random weights, else 3, torchvision's
    default). From pretrained or previous weights the backbone's batch norms keep their statistics; they are
    returned so the loop keeps them in eval mode."""
    body = model.backbone.body
    if trainable_layers is None:
        trainable_layers = len(body.stages) if init == "random" else 3
    for modules in body.stages[:max(0, len(body.stages) - trainable_layers)]:
        for module in modules:
            body.get_submodule(module).requires_grad_(False)
    return torch_family.freeze_norms(body) if init != "random" else []


def appearance_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Where a frame's appearance is read (``uncertainty.novelty``), by depth: the last leaf module of the backbone's
    level-2 stage (``early``), of its level-4 stage (``middle``, or the top one below that) and of its top stage
    (``deep``). Leaves, because the feature extractor traces through the blocks and calls only their leaves."""
    body = model.backbone.body
    if len(body.stages) < 2:
        return {}
    stages = {"early": body.stages[1], "middle": body.stages[min(3, len(body.stages) - 1)], "deep": body.stages[-1]}
    layers = {}
    for depth, modules in stages.items():
        leaves = [m for m in body.get_submodule(modules[-1]).modules() if not list(m.children())]
        if leaves:
            layers[depth] = leaves[-1]
    return layers
