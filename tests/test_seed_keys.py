"""Every training key of the seeds' pages (tests/fixtures/reference/seed-keys.md, table A) either changes the built
model or the run — checked on the object it changes — or is refused with a sentence that says why."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from preannotate.hyperparameters import HyperparameterError
from preannotate.models import create_detector, hyperparameters_for
from preannotate.models import keras_family as keras
from preannotate.shapes import parse_label_list
from preannotate.training import optim
from preannotate.training.runs import effective_hyperparameters

SEED_KEYS = Path(__file__).parent / "fixtures" / "reference" / "seed-keys.md"
SSD, FRCNN, RETINA, MASK = ("ssdlite320_mobilenet_v3_large", "fasterrcnn_mobilenet_v3_large_320_fpn",
                            "retinanet_resnet50_fpn", "maskrcnn_resnet50_fpn")
LABELS = parse_label_list("car,person")


def table_a_keys() -> list[str]:
    """The keys of table A as the page writes them (`a` / `b`, `c`, ... in the first column)."""
    text = SEED_KEYS.read_text().split("## B.")[0]
    keys = []
    for line in text.splitlines():
        if line.startswith("| `"):
            first = line.split("|")[1]
            keys += [key.lstrip("-") for key in re.findall(r"`([^`]+)`", first)]
    return keys


def _model(arch, text):
    return create_detector(arch, LABELS, hyperparameters=f"init=random;image-size=64;max-image-size=64;{text}").model


def _run(text, arch=SSD, frames=100):
    return effective_hyperparameters(arch, text, frames)


def _recipe(arch: str, text: str):
    return hyperparameters_for(arch, text).recipe


def _optimizer(text, arch=SSD):
    return optim.build_optimizer([torch.nn.Parameter(torch.zeros(1))], hyperparameters_for(arch, text).recipe)


def _norms(model, inside_backbone: bool):
    backbone = {id(m) for m in model.backbone.modules()}
    return [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d) and (id(m) in backbone) ==
            inside_backbone]


# key -> a check of what it changed, on the object it changed
CHANGES = {
    "num-steps": lambda: _run("num-steps=123").recipe.total_steps(100) == 123,
    "epochs": lambda: _run("epochs=3;batch-size=10").recipe.total_steps(100) == 30,
    "initial-learning-rate": lambda: _optimizer("initial-learning-rate=0.02").defaults["lr"] == 0.02,
    "initial_learning_rate": lambda: _optimizer("initial_learning_rate=0.02").defaults["lr"] == 0.02,
    "learning_rate": lambda: _optimizer("learning_rate=0.02").defaults["lr"] == 0.02,
    "batch-size": lambda: _run("batch-size=5;epochs=1").recipe.total_steps(100) == 20,
    "batch_size": lambda: _run("batch_size=5;epochs=1").recipe.total_steps(100) == 20,
    "num-clones": lambda: _run("num-clones=2;batch-size=5;epochs=1").recipe.total_steps(100) == 10,
    "num_clones": lambda: _run("num_clones=2;batch-size=5;epochs=1").recipe.total_steps(100) == 10,
    "schedule-step-1": lambda: optim.Schedule(_recipe(FRCNN, "schedule-step-1=40;schedule-lr-1=1e-4;"
                                                                           "initial-learning-rate=1e-3"), 100)
                        .main(40) == pytest.approx(0.1),
    "schedule-lr-1": lambda: optim.Schedule(_recipe(FRCNN, "schedule-step-1=40;schedule-lr-1=5e-4;"
                                                                         "initial-learning-rate=1e-3"), 100)
                      .main(50) == pytest.approx(0.5),
    "schedule-step-2": lambda: optim.Schedule(_recipe(
        FRCNN, "schedule-step-1=40;schedule-lr-1=5e-4;schedule-step-2=70;schedule-lr-2=1e-4;"
               "initial-learning-rate=1e-3"), 100).main(80) == pytest.approx(0.1),
    "schedule-lr-2": lambda: optim.Schedule(_recipe(
        FRCNN, "schedule-step-1=40;schedule-lr-1=5e-4;schedule-step-2=70;schedule-lr-2=2e-4;"
               "initial-learning-rate=1e-3"), 100).main(80) == pytest.approx(0.2),
    "momentum_optimizer_value": lambda: _optimizer("momentum_optimizer_value=0.7").defaults["momentum"] == 0.7,
    "decay_steps": lambda: optim.Schedule(_recipe(SSD, "decay_steps=10;decay_factor=0.5"), 100)
                    .main(25) == pytest.approx(0.25),
    "decay_factor": lambda: optim.Schedule(_recipe(SSD, "decay_steps=10;decay_factor=0.9"), 100)
                     .main(10) == pytest.approx(0.9),
    "momentum_decay": lambda: _optimizer("optimizer=rmsprop;momentum_decay=0.8").defaults["alpha"] == 0.8,
    "momentum_epsilon": lambda: _optimizer("optimizer=rmsprop;momentum_epsilon=0.5").defaults["eps"] == 0.5,
    "second_stage_nms_score_threshold": lambda: _model(FRCNN, "second_stage_nms_score_threshold=0.3")
                                         .roi_heads.score_thresh == 0.3,
    "second_stage_nms_iou_threshold": lambda: _model(SSD, "second_stage_nms_iou_threshold=0.4").nms_thresh
                                       == 0.4,
    "second_stage_max_detections_per_class": lambda: keras.decoder(hyperparameters_for(
        "keras_ssd_mobilenet_v2_fpnlite_320", "second_stage_max_detections_per_class=7").post.overrides())
        .max_detections_per_class == 7,
    "second_stage_max_detections_max_total_detections":
        lambda: _model(RETINA, "second_stage_max_detections_max_total_detections=9").detections_per_img == 9,
    "first_stage_nms_score_threshold": lambda: _model(FRCNN, "first_stage_nms_score_threshold=0.2")
                                        .rpn.score_thresh == 0.2,
    "first_stage_nms_iou_threshold": lambda: _model(FRCNN, "first_stage_nms_iou_threshold=0.6").rpn.nms_thresh
                                      == 0.6,
    "first_stage_max_proposals": lambda: _model(FRCNN, "first_stage_max_proposals=50").rpn.post_nms_top_n()
                                  == 50,
    "first_stage_batchnorm_decay": lambda: {round(n.momentum, 9) for n in _norms(_model(
        SSD, "first_stage_batchnorm_decay=0.97"), True)} == {0.03},
    "first_stage_batchnorm_epsilon": lambda: {n.eps for n in _norms(_model(
        SSD, "first_stage_batchnorm_epsilon=0.002"), True)} == {0.002},
    "second_stage_batchnorm_decay": lambda: {round(n.momentum, 9) for n in _norms(_model(
        SSD, "second_stage_batchnorm_decay=0.9"), False)} == {0.1},
    "second_stage_batchnorm_epsilon": lambda: {n.eps for n in _norms(_model(
        SSD, "second_stage_batchnorm_epsilon=0.01"), False)} == {0.01},
    "boxcoder_y_scale": lambda: _model(SSD, "boxcoder_y_scale=8").box_coder.weights == (10.0, 8.0, 5.0, 5.0),
    "boxcoder_x_scale": lambda: _model(SSD, "boxcoder_x_scale=8").box_coder.weights == (8.0, 10.0, 5.0, 5.0),
    "boxcoder_height_scale": lambda: _model(FRCNN, "boxcoder_height_scale=4").roi_heads.box_coder.weights ==
                              (10.0, 10.0, 5.0, 4.0),
    "boxcoder_width_scale": lambda: _model(FRCNN, "boxcoder_width_scale=4").roi_heads.box_coder.weights ==
                             (10.0, 10.0, 4.0, 5.0),
    "matched_threshold": lambda: _model(RETINA, "matched_threshold=0.6").proposal_matcher.high_threshold == 0.6,
    "unmatched_threshold": lambda: _model(RETINA, "unmatched_threshold=0.3").proposal_matcher.low_threshold
                            == 0.3,
    "anchor_generator_min_scale": lambda: _model(SSD, "anchor_generator_min_scale=0.1")
                                   .anchor_generator.scales[0] == pytest.approx(0.1),
    "anchor_generator_max_scale": lambda: _model(SSD, "anchor_generator_max_scale=0.8")
                                   .anchor_generator.scales[-2] == pytest.approx(0.8),
    "stage-1-epochs": lambda: [hyperparameters_for(MASK, "stage-1-epochs=1;stage-2-epochs=2;batch-size=10")
                                    .recipe.trainable_layers_at(step, 100) for step in (0, 9, 10, 19, 20)] ==
                       [0, 0, 3, 3, 99],
    "stage-2-epochs": lambda: hyperparameters_for(MASK, "stage-2-epochs=2;batch-size=10")
                       .recipe.trainable_layers_at(15, 100) == 3,
    "stage-3-epochs": lambda: _run("stage-1-epochs=1;stage-2-epochs=2;stage-3-epochs=4;batch-size=10",
                                        MASK).recipe.total_steps(100) == 40,
    "stage1_epochs": lambda: hyperparameters_for(MASK, "--stage1_epochs=2").recipe.stage_1_epochs == 2,
    "val_split": lambda: hyperparameters_for(SSD, "val_split=25").sources.val_fraction == 0.25,
}
REFUSED = {
    "second_stage_use_dropout": "no dropout", "second_stage_dropout_keep_probability": "no dropout",
    "second_stage_regularizer_weight": "weight-decay", "first_stage_regularizer_weight": "weight-decay",
    "first_stage_features_stride": "architecture custom", "height_stride": "neck-levels",
    "width_stride": "neck-levels", "maxpool_kernel_size": "RoIAlign", "maxpool_stride": "RoIAlign",
    "first_stage_activation": "ReLU6", "second_stage_activation": "ReLU6",
    "second_stage_kernel_size": "3x3", "second_stage_box_code_size": "4 numbers",
    "anchor_generator_num_layers": "neck-levels",
}


def test_every_key_of_the_seeds_table_is_checked_here():
    keys = table_a_keys()
    assert len(keys) > 50 and set(keys) == set(CHANGES) | set(REFUSED)


@pytest.mark.parametrize("key", sorted(CHANGES))
def test_a_seed_key_changes_the_model_or_the_run(key):
    assert CHANGES[key](), key


@pytest.mark.parametrize("key", sorted(REFUSED))
def test_a_seed_key_no_model_has_is_refused_with_the_reason(key):
    with pytest.raises(HyperparameterError, match=rf"{key} is not offered: .*{REFUSED[key]}"):
        hyperparameters_for(SSD, f"{key}=1")


@pytest.mark.parametrize("key, arch, able", [
    ("second_stage_max_detections_per_class", SSD, "keras_ssd_mobilenet_v2_fpnlite_320"),
    ("first_stage_max_proposals", SSD, "fasterrcnn_resnet50_fpn"),
    ("anchor_generator_min_scale", RETINA, "ssdlite320_mobilenet_v3_large"),
    ("stage-1-epochs", "keras_ssd_mobilenet_v2_fpnlite_320", "maskrcnn_resnet50_fpn"),
])
def test_a_key_an_architecture_lacks_names_the_architectures_that_take_it(key, arch, able):
    with pytest.raises(HyperparameterError, match=rf"{arch} cannot honour .*architectures that can: .*{able}"):
        hyperparameters_for(arch, f"{key}=1")


def test_ssd_matches_at_one_iou():
    with pytest.raises(HyperparameterError, match="unmatched-threshold must equal matched-threshold"):
        _model(SSD, "matched_threshold=0.5;unmatched_threshold=0.4")
    assert _model(SSD, "matched_threshold=0.6").proposal_matcher.high_threshold == 0.6


def test_stage_epochs_unfreeze_the_backbone_stage_by_stage_in_a_run(tmp_path):
    from preannotate.training.logs import MetricsLog
    from preannotate.training.loop import train
    from preannotate.training.synthetic import generate

    task = generate(8, width=64, height=48, seed=2)
    items = [(frame, task.images) for frame in task.annotations.frames.values()]
    result = train(FRCNN, task.annotations.labels, items, [], tmp_path / "run", progress=False, workers=0,
                   hyperparameters="init=random;image-size=64;max-image-size=64;batch-size=2;stage-1-epochs=1;"
                                   "stage-2-epochs=2;stage-3-epochs=3;num-validations=0")
    assert result.steps == 12  # stage 3 ends the run: 3 epochs of 4 steps
    stages = [(r["step"], r["trainable_backbone_layers"]) for r in MetricsLog.read(tmp_path / "run" /
                                                                                    "metrics.jsonl")
              if r["event"] == "stage"]
    assert stages == [(0, 0), (4, 3), (8, 99)]
