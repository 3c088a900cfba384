"""Image classifiers served as CVAT tags: torchvision's EfficientNet, ResNet and MobileNetV3 networks.

A classifier is trained and served by the same loop and the same core as a detector. ``TagModel`` gives
torchvision's classification networks the calling convention of its detection models — in train mode
``model(images, targets)`` returns its losses (``{"loss_classifier"}``, cross-entropy against each target's one
class); in eval mode ``model(images)`` returns, per image, ``{"scores", "labels"}`` of every class, best first — so
the trainer, the batch-norm recalibration and the checkpoints take it unchanged. ``TagClassifier`` is its
``Detector``: the best class of each frame, when it scores at least the threshold, as a ``Shape`` of type ``tag``,
which CVAT stores as the frame's tag.

Frames are squashed to an ``image-size`` square (the network's ImageNet resolution by default), or letterboxed with
``letterbox=true``, in training and in serving alike. Pretrained means torchvision's ImageNet weights: with no
labels of its own the model tags frames with ImageNet's 1000 classes; trained on a project's tags, everything but
the last layer starts from them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as nn_functional
import torchvision
from PIL import Image
from torchvision.transforms.v2 import functional as F

from preannotate.hyperparameters import Hyperparameters
from preannotate.models import torchvision_family as torch_family
from preannotate.models.registry import Architecture, num_classes
from preannotate.shapes import TAG, Label, Shape

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # what torchvision's weights expect


class TagModel(torch.nn.Module):
    """A classification network speaking torchvision's detection calling convention (see the module docstring).
    Images of any size are resized to ``image_size`` squares here, so serving needs nothing else."""

    def __init__(self, network: torch.nn.Module, image_size: int):
        super().__init__()
        self.network, self.image_size = network, image_size
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: Sequence[torch.Tensor], targets: Sequence[dict[str, torch.Tensor]] | None = None):
        size = [self.image_size, self.image_size]
        batch = torch.stack([image if list(image.shape[-2:]) == size else F.resize(image, size, antialias=True)
                             for image in images])
        logits = self.network((batch - self.mean) / self.std)
        if self.training:
            if targets is None:
                raise ValueError("in training mode the classifier needs targets")
            classes = torch.stack([target["labels"][0] for target in targets]) - 1  # label ids count from 1
            return {"loss_classifier": nn_functional.cross_entropy(logits, classes)}
        scores, order = logits.float().softmax(1).sort(1, descending=True)
        return [{"scores": s, "labels": o + 1} for s, o in zip(scores, order, strict=True)]


class TagClassifier(torch_family.TorchvisionDetector):
    """A trained ``TagModel`` as a ``Detector``: each frame's best class as a tag when it scores ``threshold`` or
    more (none otherwise: a frame the model is unsure of is left for a person)."""

    def _outputs(self, images: Sequence[Image.Image | np.ndarray]) -> list[dict[str, torch.Tensor]]:
        tensors = [self.to_tensor(image) for image in images]
        if self.letterbox:  # padded to a square around the image, as the training letterbox pads
            tensors = [F.center_crop(tensor, [max(tensor.shape[-2:])] * 2) for tensor in tensors]
        return self.model(tensors)

    def to_shapes(self, output: dict[str, torch.Tensor], threshold: float) -> list[Shape]:
        score, cls = float(output["scores"][0]), int(output["labels"][0])
        label = self._label_by_class.get(cls)
        if label is None or score < threshold:
            return []
        return [Shape(label.name, TAG, [], score=score, source="auto")]


def network(arch: Architecture, classes: int, hp: Hyperparameters) -> TagModel:
    """The architecture's torchvision network with ``classes`` outputs (random weights), as a ``TagModel``."""
    built = torchvision.models.get_model(arch.build["network"], weights=None, num_classes=classes)
    return TagModel(built, hp.network.image_size or arch.image_size)


def stages(model: TagModel) -> list[torch.nn.Module]:
    """The network's stages, input first, without its classifier: ResNet's stem (conv1, bn1) and layer1-4; the
    blocks of EfficientNet's and MobileNetV3's ``features``."""
    net = model.network
    if hasattr(net, "features"):
        return list(net.features.children())
    return [torch.nn.ModuleList([net.conv1, net.bn1]), net.layer1, net.layer2, net.layer3, net.layer4]


def appearance_layers(model: TagModel) -> dict[str, torch.nn.Module]:
    """Where a frame's appearance is read (``uncertainty.novelty``), by depth: a stride-4 stage (``early``: ResNet's
    layer1, the third block of EfficientNet's or MobileNetV3's features) and the last one (``deep``)."""
    blocks = stages(model)
    return {"early": model.network.layer1 if hasattr(model.network, "layer1") else model.network.features[2],
            "deep": blocks[-1]}


def freeze_backbone(model: TagModel, trainable_layers: int | None, init: str) -> list[torch.nn.Module]:
    """Train only the last ``trainable_layers`` stages (and the classifier); None trains every one. A classifier's
    batches are large enough for its batch norms to keep learning: none is frozen."""
    blocks = stages(model)
    count = len(blocks) if trainable_layers is None else min(trainable_layers, len(blocks))
    for block in blocks[:len(blocks) - count]:
        block.requires_grad_(False)
    return []


def pretrained_labels(arch: Architecture) -> list[Label]:
    """The labels of the pretrained weights: ImageNet's 1000 classes, as tags."""
    categories = torchvision.models.get_weight(arch.pretrained).meta["categories"]
    return [Label(name=name, type=TAG, id=index) for index, name in enumerate(categories, start=1)]


def pretrained_state_dict(arch: Architecture) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet weights of the network, keyed as in ``TagModel`` (found or fetched as the detectors'
    weights are: ``torchvision_family.pretrained_state_dict``)."""
    return {"network." + key: value for key, value in torch_family.pretrained_state_dict(arch).items()}


def create(arch: Architecture, labels: Sequence[Label], hp: Hyperparameters, init: str = "random",
           state: dict[str, torch.Tensor] | None = None, device: str | None = None) -> TagClassifier:
    """A classifier for ``labels``: ``random``, ``pretrained`` (ImageNet; a last layer sized for other labels starts
    fresh) or from ``state`` (any model's weights, kept where names and shapes agree)."""
    model = network(arch, num_classes(labels), hp)
    if init == "pretrained":
        torch_family.load_matching(model, pretrained_state_dict(arch))
    elif state is not None:
        torch_family.load_matching(model, state)
    return TagClassifier(model, labels, arch.output, device, hp.network.letterbox, appearance_layers(model))


def load(arch: Architecture, labels: Sequence[Label], weights_path: Path, hp: Hyperparameters,
         device: str | None = None) -> TagClassifier:
    """A published classifier: its architecture, labels, hyperparameters and weights file."""
    model = network(arch, num_classes(labels), hp)
    return torch_family.restored(model, labels, arch.output, weights_path, device, hp.network.letterbox,
                                 appearance_layers(model), kind=TagClassifier)


# the detectors' files and cache
WEIGHTS_FILE, read_weights, write_weights = torch_family.WEIGHTS_FILE, torch_family.read_weights, \
    torch_family.write_weights
fetch_pretrained = torch_family.fetch_pretrained
