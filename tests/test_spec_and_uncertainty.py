"""The CVAT spec of a function (what CVAT maps, what a model's labels become in it) and how sure a model is of a
frame (close calls and unfamiliar frames)."""

from __future__ import annotations

import pytest
from preannotate import uncertainty
from preannotate.cvat import lambda_spec
from preannotate.shapes import Label, Shape


@pytest.mark.parametrize("spec_type, task_type, mapped", [
    ("rectangle", "rectangle", True), ("rectangle", "any", True), ("any", "polygon", True),
    ("mask", "polygon", True), ("polygon", "mask", True),           # CVAT's one compatible pair
    ("rectangle", "polygon", False), ("mask", "rectangle", False), ("rectangle", "tag", False),
    ("any", "skeleton", False), ("skeleton", "any", False)])
def test_compatible_follows_cvats_lambda_manager(spec_type, task_type, mapped):
    assert lambda_spec.compatible(spec_type, task_type) is mapped


def test_spec_labels_type_what_the_model_returns_and_report_the_rest():
    project = [Label("car", "rectangle"), Label("person", "polygon"), Label("road", "mask"), Label("sign", "any"),
               Label("daytime", "tag"), Label("car", "polygon")]
    boxes, impossible = lambda_spec.spec_labels(project, "rectangle")
    assert [(label.name, label.type) for label in boxes] == [("car", "rectangle"), ("sign", "rectangle")]
    assert [label.name for label in impossible] == ["person", "road", "daytime"]  # the second "car" is a duplicate
    masks, impossible = lambda_spec.spec_labels(project, "mask")
    assert [(label.name, label.type) for label in masks] == [("person", "mask"), ("road", "mask"), ("sign", "mask")]
    assert [label.name for label in impossible] == ["car", "daytime"]


def test_spec_names_and_unmapped_labels():
    env = {lambda_spec.FUNCTION_LABELS_ENV: '["box", "disc"]'}
    assert lambda_spec.spec_names(env) == ["box", "disc"]
    assert lambda_spec.spec_names({}) is None and lambda_spec.spec_names({lambda_spec.FUNCTION_LABELS_ENV: "{"}) is None
    learned = [Label("box", "rectangle"), Label("bar", "rectangle"), Label("disc", "rectangle")]
    assert lambda_spec.unmapped(["box", "disc"], learned) == ["bar"]


# ------------------------------------------------------------------------------------------ uncertainty

def _scored(*scores: float) -> list[Shape]:
    return [Shape("box", "rectangle", [0, 0, 1, 1], score=score) for score in scores]


@pytest.mark.parametrize("score, expected", [(0.5, 1.0), (0.25, 0.5), (0.0, 0.0), (1.0, 0.0), (0.75, 0.5)])
def test_ambiguity_peaks_at_the_threshold(score, expected):
    assert uncertainty.ambiguity(score, 0.5) == pytest.approx(expected)


def test_a_frame_is_as_uncertain_as_its_closest_call():
    threshold = 0.5
    assert uncertainty.frame_confidence(_scored(0.98, 0.97), threshold) == pytest.approx(0.94)  # 0.97: closest call
    assert uncertainty.frame_confidence(_scored(0.98, 0.45), threshold) == pytest.approx(0.1)  # a near miss
    assert uncertainty.frame_confidence(_scored(0.98, 0.55), threshold) == pytest.approx(0.1)  # a barely kept box
    assert uncertainty.frame_confidence(_scored(0.09), threshold) == 1.0  # clutter under the candidate floor
    assert uncertainty.frame_confidence([], threshold) == 1.0
    assert [s.score for s in uncertainty.kept(_scored(0.98, 0.45, 0.5), threshold)] == [0.98, 0.5]
    assert uncertainty.candidate_threshold(threshold) == pytest.approx(0.1)
    assert uncertainty.ranking({3: 0.9, 1: 0.2, 2: 0.2, 0: 1.0}) == [(1, 0.2), (2, 0.2), (3, 0.9), (0, 1.0)]


def test_novelty_is_zero_for_a_typical_frame_and_one_beyond_every_training_frame():
    import numpy as np

    rng = np.random.default_rng(0)
    familiar = 10 + rng.normal(size=(50, 16))  # the training frames: one cluster
    typical = 10 + rng.normal(size=(1, 16)) * 0.5
    unlike = -10 + rng.normal(size=(1, 16))
    novelty = uncertainty.novelty(np.concatenate([familiar[:1], typical, unlike]), familiar)
    assert novelty[0] == 0.0 and novelty[1] == 0.0 and novelty[2] == 1.0
    assert uncertainty.novelty(unlike, familiar[:1]).tolist() == [0.0]  # one frame is no reference
    assert uncertainty.frame_confidence(_scored(0.99), 0.5, novelty=0.9) == pytest.approx(0.1)


def test_class_confusion_is_how_close_the_runner_up_class_comes():
    import numpy as np

    confusion = uncertainty.class_confusion(np.array([[0.9, 0.0, 0.0],     # one class has it all
                                                      [0.3, 0.3, 0.0],     # two tie
                                                      [0.06, 0.02, 0.02],  # weak, but clear which class
                                                      [0.6, 0.2, 0.2]]))
    assert confusion == pytest.approx([0.0, 1.0, 0.6, 0.6])
    assert uncertainty.class_confusion(np.zeros((0, 3))).shape == (0,)
    assert uncertainty.class_confusion(np.array([[0.7]])).tolist() == [0.0]  # one class: nothing to confuse


def test_flip_disagreement_pairs_detections_of_a_class_by_overlap():
    import numpy as np

    def detections(*rows):  # (x1, y1, x2, y2, class, score)
        rows = np.array(rows, dtype=float).reshape(-1, 6)
        return rows[:, :4], rows[:, 4].astype(int), rows[:, 5]

    frame = detections((10, 10, 50, 50, 1, 0.9), (60, 10, 90, 40, 2, 0.6))
    assert uncertainty.flip_disagreement(frame, frame) == 0.0
    moved_a_little = detections((12, 10, 52, 50, 1, 0.85), (60, 12, 90, 42, 2, 0.6))
    assert uncertainty.flip_disagreement(frame, moved_a_little) == pytest.approx(0.05)
    assert uncertainty.flip_disagreement(frame, detections((10, 10, 50, 50, 1, 0.9))) == pytest.approx(0.6)
    other_class = detections((10, 10, 50, 50, 2, 0.9), (60, 10, 90, 40, 2, 0.6))
    assert uncertainty.flip_disagreement(frame, other_class) == pytest.approx(0.9)  # a box seen as another class
    elsewhere = detections((10, 60, 50, 95, 1, 0.9), (60, 10, 90, 40, 2, 0.6))
    assert uncertainty.flip_disagreement(frame, elsewhere) == pytest.approx(0.9)  # no overlap: no pair
    nothing = detections()
    assert uncertainty.flip_disagreement(frame, nothing) == pytest.approx(0.9)
    assert uncertainty.flip_disagreement(nothing, frame) == pytest.approx(0.9)
    assert uncertainty.flip_disagreement(nothing, nothing) == 0.0
