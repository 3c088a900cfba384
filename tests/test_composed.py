"""The model designer: composed detectors (backbone × neck × head from torchvision's parts), as a user describes
them in the hyperparameter language, trained a step and served; BiFPN's shapes and fusion."""

from __future__ import annotations

import copy
import itertools
import json

import pytest
import torch
import torchvision
from preannotate.hyperparameters import BACKBONES, HEADS, NECKS, HyperparameterError
from preannotate.models import (
    ModelStore,
    create_detector,
    get_architecture,
    hyperparameters_for,
    load_detector,
    publish_detector,
    save_artifact,
)
from preannotate.models import composed_family as composed
from preannotate.shapes import parse_label_list

from tests.conftest import photo

TINY = "init=random;image-size=64;max-image-size=64;neck-channels=64"  # fcos: GroupNorm(32) on 1x1 maps


def _step_and_detect(detector, with_masks: bool) -> None:
    """One training step (finite losses, gradients reach the backbone) and a detection in eval mode."""
    model = detector.model
    model.train()
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([1])} for _ in images]
    if with_masks:
        for target in targets:
            mask = torch.zeros(1, 64, 64, dtype=torch.uint8)
            mask[0, 8:40, 8:40] = 1
            target["masks"] = mask
    losses = model(images, targets)
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.body.parameters())
    model.eval()
    shapes = detector.detect([photo(80, 60)], threshold=0.0)
    assert len(shapes) == 1
    for shape in shapes[0]:
        assert shape.type == ("mask" if with_masks else "rectangle")


def _labels(head):
    return parse_label_list("car,person", "mask" if head == "mask_rcnn" else "rectangle")


FAST = [("resnet18", neck, head) for neck in NECKS for head in HEADS] + \
       [(backbone, "fpn", "retinanet") for backbone in ("mobilenet_v3_small", "efficientnet_b0", "mobilenet_v2")]


@pytest.mark.parametrize("backbone, neck, head", FAST)
def test_a_composed_detector_builds_trains_a_step_and_detects(backbone, neck, head):
    text = f"{TINY};backbone={backbone.replace('_', '-')};neck={neck};head={head.replace('_', '-')};neck-layers=1"
    detector = create_detector("custom", _labels(head), hyperparameters=text)
    _step_and_detect(detector, head == "mask_rcnn")


_NETWORKS: dict[str, torch.nn.Module] = {}


@pytest.fixture
def networks_built_once(monkeypatch):
    """Each backbone network initialized once for the grid, then copied (initializing EfficientNet-V2-L's 118M
    weights costs seconds; a copy is the same random network)."""
    build = torchvision.models.get_model

    def cached(name, **kwargs):
        if kwargs.get("weights") is not None:
            return build(name, **kwargs)
        if name not in _NETWORKS:
            _NETWORKS.clear()  # one at a time: the grid is ordered by backbone
            _NETWORKS[name] = build(name, **kwargs)
        return copy.deepcopy(_NETWORKS[name])

    monkeypatch.setattr(composed.torchvision.models, "get_model", cached)


@pytest.mark.slow
@pytest.mark.parametrize("backbone, neck, head", [c for c in itertools.product(BACKBONES, NECKS, HEADS)
                                                  if c not in FAST])
def test_every_listed_composition_builds_trains_a_step_and_detects(backbone, neck, head, networks_built_once):
    detector = create_detector("custom", _labels(head), hyperparameters=(
        f"{TINY};backbone={backbone};neck={neck};head={head};neck-layers=1"))
    composed.freeze_backbone(detector.model, 1, "random")  # the step trains the top stage: a short backward
    _step_and_detect(detector, head == "mask_rcnn")


def test_values_are_spelled_as_keys_are_and_bad_ones_say_what_is_valid():
    hp = hyperparameters_for("custom", "backbone=EfficientNet-V2-S; head=faster-rcnn; neck=none; neck_levels=2-6; "
                                       "top-level=4; resize-input=false")
    assert hp.network.composition() == {"backbone": "efficientnet_v2_s", "head": "faster_rcnn", "neck": "none",
                                "neck_levels": (2, 6), "top_level": 4, "resize_input": False}
    with pytest.raises(HyperparameterError, match="bad value for backbone: 'vgg16' is not one of resnet18"):
        hyperparameters_for("custom", "backbone=vgg16")
    with pytest.raises(HyperparameterError, match="neck-levels.*'3-9'"):
        hyperparameters_for("custom", "neck-levels=3-9")
    with pytest.raises(HyperparameterError, match=r"ssdlite320_mobilenet_v3_large is not composed: backbone .*"
                                                  r"architectures that take it: custom"):
        hyperparameters_for("ssdlite320_mobilenet_v3_large", "backbone=resnet18")


def test_levels_follow_the_backbone_strides_and_the_neck_adds_levels_above_them():
    detector = create_detector("custom", _labels("retinanet"), hyperparameters=(
        "init=random;backbone=mobilenet-v3-small;neck=fpn;neck-levels=3-7;neck-channels=32"))
    neck = detector.model.backbone
    assert neck.body.levels == [2, 3, 4, 5] and neck.levels == [3, 4, 5, 6, 7]
    maps = neck(torch.rand(1, 3, 128, 128))
    assert [tuple(x.shape[-2:]) for x in maps.values()] == [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    assert {x.shape[1] for x in maps.values()} == {32}
    none = create_detector("custom", _labels("fcos"), hyperparameters=(
        "init=random;backbone=resnet18;neck=none;top-level=4;head=fcos"))
    (only,) = none.model.backbone(torch.rand(1, 3, 64, 64)).values()
    assert only.shape[1:] == (256, 4, 4)  # ResNet-18's layer3: stride 16, 256 channels
    narrowed = create_detector("custom", _labels("retinanet"), hyperparameters=(
        "init=random;backbone=resnet50;neck=none;neck-channels=128;head=retinanet"))
    (only,) = narrowed.model.backbone(torch.rand(1, 3, 64, 64)).values()
    assert only.shape[1:] == (128, 2, 2)  # ResNet-50's 2048 channels of layer4, narrowed to neck-channels


def test_bifpn_fuses_with_fast_normalized_weights_and_keeps_every_level():
    bifpn = composed.BiFPN({3: 8, 4: 16, 5: 32}, [3, 4, 5, 6, 7], channels=12, layers=2)
    features = {3: torch.rand(2, 8, 32, 32), 4: torch.rand(2, 16, 16, 16), 5: torch.rand(2, 32, 8, 8)}
    maps = bifpn(features)
    assert [tuple(m.shape) for m in maps] == [(2, 12, 32, 32), (2, 12, 16, 16), (2, 12, 8, 8), (2, 12, 4, 4),
                                              (2, 12, 2, 2)]
    layer = bifpn.layers[0]
    a, b = torch.full((1, 1), 2.0), torch.full((1, 1), 6.0)
    assert layer.fuse(torch.tensor([1.0, 1.0]), [a, b]).item() == pytest.approx(4.0, rel=1e-3)
    assert layer.fuse(torch.tensor([3.0, -5.0]), [a, b]).item() == pytest.approx(2.0, rel=1e-3)  # relu'd weight
    assert layer.top_down_weights.requires_grad and layer.top_down_weights.shape == (4, 2)
    assert layer.bottom_up_weights.shape == (4, 3)


def test_the_manifest_records_the_composition_and_loading_rebuilds_exactly_that_model(tmp_path):
    text = f"{TINY};backbone=resnet34;neck=bifpn;neck-levels=3-6;neck-layers=2;head=fcos;resize-input=false"
    detector = create_detector("custom", _labels("fcos"), hyperparameters=text)
    (tmp_path / "v").mkdir()
    manifest = save_artifact(detector, tmp_path / "v")
    assert {k: manifest.hyperparameters[k] for k in ("backbone", "neck", "head")} == \
        {"backbone": "resnet34", "neck": "bifpn", "head": "fcos"}
    loaded = load_detector(tmp_path / "v")
    assert isinstance(loaded.model.transform, composed.KeepSize)
    mine, theirs = detector.model.state_dict(), loaded.model.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    image = photo(90, 70)
    assert [s.points for s in loaded.detect([image], 0.0)[0]] == [s.points for s in detector.detect([image], 0.0)[0]]


def test_resize_input_false_keeps_each_frame_at_its_own_resolution():
    keep = create_detector("custom", _labels("retinanet"), hyperparameters=f"{TINY};resize-input=false")
    images, _ = keep.model.transform([torch.rand(3, 90, 70)])
    assert images.image_sizes == [(90, 70)]
    scaled = create_detector("custom", _labels("retinanet"), hyperparameters=TINY)
    assert scaled.model.transform([torch.rand(3, 90, 70)])[0].image_sizes[0] != (90, 70)


def test_mask_rcnn_head_makes_the_custom_model_a_mask_model():
    arch = get_architecture("custom")
    assert arch.output == "rectangle"
    hp = hyperparameters_for("custom", "head=mask-rcnn")
    assert arch.resolved(hp).output == "mask" and "polygon" in arch.resolved(hp).label_types


def test_trainable_backbone_layers_counts_the_stem_and_each_level():
    detector = create_detector("custom", _labels("retinanet"), hyperparameters=f"{TINY};backbone=resnet18")
    body = detector.model.backbone.body
    assert body.stages == [["conv1", "bn1"], ["layer1"], ["layer2"], ["layer3"], ["layer4"]]
    composed.freeze_backbone(detector.model, 2, "random")
    trainable = {name.split(".")[0] for name, p in body.named_parameters() if p.requires_grad}
    assert trainable == {"layer3", "layer4"}


def test_init_from_takes_any_models_backbone_neck_and_heads_where_names_and_shapes_agree(tmp_path):
    store = ModelStore(tmp_path / "store")
    source = create_detector("retinanet_resnet50_fpn", parse_label_list("car,person"), init="random",
                             hyperparameters="image-size=64;max-image-size=64")
    publish_detector(source, store, "cars")
    hp = hyperparameters_for("custom", "init-from=cars@1;backbone=resnet50;neck=fpn;neck-levels=3-7;head=retinanet;"
                                       "image-size=64;max-image-size=64")
    assert (hp.recipe.init, hp.recipe.init_from) == ("previous", "cars@1")
    composed_model = create_detector("custom", parse_label_list("car,person,bus"), hyperparameters=hp,
                                     previous=store.resolve(hp.recipe.init_from))
    theirs, mine = source.model.state_dict(), composed_model.model.state_dict()
    same = {k for k in mine if k in theirs and torch.equal(mine[k], theirs[k])}
    assert {k for k in mine if k.startswith("backbone.body.") and not k.endswith("num_batches_tracked")} <= same
    assert {k for k in mine if k.startswith(("backbone.fpn.inner_blocks", "backbone.fpn.layer_blocks"))} <= same
    assert "head.classification_head.conv.0.0.weight" in same and "head.regression_head.bbox_reg.weight" in same
    assert "head.classification_head.cls_logits.weight" not in same  # three labels now: a fresh class head
    with pytest.raises(HyperparameterError, match="init-from starts from a model's weights"):
        hyperparameters_for("custom", "init=random;init-from=cars")
    with pytest.raises(HyperparameterError, match="is not a model of the store"):
        hyperparameters_for("custom", "init-from=../cars")


def test_the_designer_pages_trainer_keys_change_the_schedule():
    from preannotate.training import optim

    hp = hyperparameters_for("custom", "schedule=one-cycle; initial-lr-factor=0.1; final-lr-factor=0.001; "
                                       "warmup-period=20; max-iterations=100; lr=0.01")
    recipe = hp.recipe
    assert (recipe.one_cycle_initial_factor, recipe.one_cycle_final_factor, recipe.warmup_steps, recipe.num_steps) == \
        (0.1, 0.001, 20, 100)
    schedule = optim.Schedule(hp.recipe, 100)
    reference = optim.build_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01), hp.recipe, 100)
    rates = []
    for step in range(100):
        rates.append(reference.get_last_lr()[0])
        assert 0.01 * schedule(step) == pytest.approx(rates[-1], rel=1e-9)
        reference.optimizer.step()
        reference.step()
    assert rates[0] == pytest.approx(0.001) and max(rates) == pytest.approx(0.01) and rates.index(max(rates)) == 20
    assert rates[-1] == pytest.approx(0.01 * 0.001, rel=1e-6)
    steps = hyperparameters_for("custom", "schedule=multi-step; milestones=30,60; factor=0.5")
    assert (steps.recipe.schedule_steps, steps.recipe.schedule_gamma) == ([30, 60], 0.5)
    assert optim.Schedule(steps.recipe, 100).main(65) == pytest.approx(0.25)


@pytest.mark.slow
def test_a_composed_detector_trains_publishes_and_serves_its_version(tmp_path):
    from preannotate.training.loop import train
    from preannotate.training.synthetic import generate

    task = generate(10, width=64, height=48, seed=4)
    items = [(frame, task.images) for frame in task.annotations.frames.values()]
    store = ModelStore(tmp_path / "store")
    result = train("custom", task.annotations.labels, items[2:], items[:2], tmp_path / "run", store=store,
                   name="designed", progress=False, workers=0, hyperparameters=(
                       f"{TINY};backbone=mobilenet-v3-small;neck=bifpn;neck-layers=2;head=faster-rcnn;num-steps=4;"
                       "batch-size=2;num-validations=1"))
    assert result.version == 1 and result.metrics["map"] is not None and result.steps == 4
    manifest = store.path("designed", 1) / "manifest.json"
    recorded = json.loads(manifest.read_text())["hyperparameters"]
    assert (recorded["backbone"], recorded["neck"], recorded["head"]) == ("mobilenet_v3_small", "bifpn", "faster_rcnn")
    served = load_detector(store.path("designed", 1))
    assert isinstance(served.model, torchvision.models.detection.FasterRCNN)
    assert served.detect([photo(80, 60)], 0.0)[0] is not None
    # its training frames' appearance was published: new frames are scored for novelty as the fixed models' are
    assert served.familiar is not None and len(served.familiar) == 8
    (_, novelty), = served.detect_scored([photo(80, 60)], 0.0)
    assert 0.0 <= novelty <= 1.0


def test_a_neck_that_takes_no_backbone_level_says_so():
    with pytest.raises(HyperparameterError, match=r"neck-levels 6-7 take no level of the backbone \(levels 2-5\)"):
        create_detector("custom", _labels("retinanet"), hyperparameters=f"{TINY};backbone=resnet18;neck-levels=6-7")
    with pytest.raises(HyperparameterError, match="head=fcos normalizes in groups of 32 channels"):
        create_detector("custom", _labels("fcos"), hyperparameters=f"{TINY};head=fcos;neck-channels=48")
