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
    # a mask model fills the rectangle label too: each mask fitted to a rectangle (issue 23)
    assert [(label.name, label.type) for label in masks] == [("car", "rectangle"), ("person", "mask"),
                                                             ("road", "mask"), ("sign", "mask")]
    assert [label.name for label in impossible] == ["daytime"]


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


def test_a_close_call_is_the_closest_candidate_to_the_threshold():
    threshold = 0.5
    assert uncertainty.close_call(_scored(0.98, 0.97), threshold) == pytest.approx(0.06)  # 0.97: closest call
    assert uncertainty.close_call(_scored(0.98, 0.45), threshold) == pytest.approx(0.9)  # a near miss
    assert uncertainty.close_call(_scored(0.98, 0.55), threshold) == pytest.approx(0.9)  # a barely kept box
    assert uncertainty.close_call(_scored(0.09), threshold) == 0.0  # clutter under the candidate floor
    assert uncertainty.close_call([], threshold) == 0.0
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
    assert uncertainty.frame_confidence(_scored(0.5), 0.5, novelty=0.0) == 1.0  # served: a close call is not doubt


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


# Many cases, drawn at random (seeded): each measure against what it must do whatever the frame holds.

def _random_detections(rng, count: int, width: int = 200, classes: int = 3):
    """``count`` boxes far apart (one per 40-pixel column: no two overlap), random classes and scores."""
    import numpy as np

    left = rng.permutation(width // 40)[:count] * 40.0
    boxes = np.stack([left, rng.uniform(0, 20, count), left + rng.uniform(15, 35, count),
                      rng.uniform(40, 80, count)], 1)
    return boxes, rng.integers(1, classes + 1, count), rng.uniform(0.05, 1.0, count)


@pytest.mark.parametrize("seed", range(40))
def test_class_confusion_is_the_margin_of_the_two_best_shares_on_random_rows(seed):
    import numpy as np

    rng = np.random.default_rng(seed)
    scores = rng.dirichlet(np.full(int(rng.integers(2, 8)), 0.5), size=int(rng.integers(1, 20)))
    scores *= rng.uniform(0.01, 1.0, (len(scores), 1))  # a weak detection is not confused for being weak
    shares = scores / scores.sum(1, keepdims=True)
    top_two = np.sort(shares, 1)[:, ::-1][:, :2]
    confusion = uncertainty.class_confusion(scores)
    assert confusion == pytest.approx(1.0 - (top_two[:, 0] - top_two[:, 1]))
    assert ((0.0 <= confusion) & (confusion <= 1.0)).all()
    assert uncertainty.class_confusion(scores[:, rng.permutation(scores.shape[1])]) == pytest.approx(confusion)
    tied = scores.copy()
    tied[:, 0] = tied[:, 1] = tied.max(1)  # two classes tie at the top: as confused as it gets
    assert uncertainty.class_confusion(tied) == pytest.approx(1.0)
    alone = np.zeros_like(scores)
    alone[:, 0] = scores[:, 0]
    assert uncertainty.class_confusion(alone) == pytest.approx(0.0)


@pytest.mark.parametrize("seed", range(40))
def test_flip_disagreement_on_random_frames(seed):
    import numpy as np

    rng = np.random.default_rng(seed)
    boxes, classes, scores = frame = _random_detections(rng, int(rng.integers(1, 6)))
    empty = (np.zeros((0, 4)), np.zeros(0, int), np.zeros(0))
    assert uncertainty.flip_disagreement(frame, frame) == 0.0  # both passes saw the same
    reordered = rng.permutation(len(scores))
    assert uncertainty.flip_disagreement(frame, (boxes[reordered], classes[reordered], scores[reordered])) == 0.0
    assert uncertainty.flip_disagreement(frame, empty) == pytest.approx(scores.max())  # the mirror saw nothing
    assert uncertainty.flip_disagreement(empty, frame) == pytest.approx(scores.max())
    one = int(rng.integers(len(scores)))
    shifted = scores.copy()
    shifted[one] = rng.uniform(0.0, 1.0)
    jittered = boxes + rng.uniform(-2, 2, boxes.shape)  # a box a pixel or two off is the same object
    assert uncertainty.flip_disagreement(frame, (jittered, classes, shifted)) == pytest.approx(
        abs(shifted[one] - scores[one]))
    other = classes.copy()
    other[one] = classes[one] % 3 + 1  # seen as another class: no pair on either side
    assert uncertainty.flip_disagreement(frame, (boxes, other, scores)) == pytest.approx(scores[one])
    mirrored = (boxes, classes, scores)
    assert uncertainty.flip_disagreement(frame, mirrored) == uncertainty.flip_disagreement(mirrored, frame)


@pytest.mark.parametrize("seed", range(20))
def test_novelty_on_random_clouds_is_zero_inside_one_far_away_and_grows_with_distance(seed):
    import numpy as np

    rng = np.random.default_rng(seed)
    dims = int(rng.integers(4, 64))
    centre = rng.uniform(1, 2, dims)
    familiar = centre + rng.normal(0, 0.1, (int(rng.integers(20, 100)), dims))
    assert (uncertainty.novelty(familiar, familiar) == 0.0).all()  # each training frame is its own neighbour
    fresh = uncertainty.novelty(centre + rng.normal(0, 0.1, (200, dims)), familiar)  # new draws of the same kind
    assert (fresh == 0.0).mean() >= 0.25  # about half are as close as the median training frame is to its own
    away = rng.normal(0, 1, dims)
    away -= away @ centre / (centre @ centre) * centre  # a direction the training frames never took
    steps = [uncertainty.novelty((centre + t * away)[None], familiar)[0] for t in np.linspace(0, 10, 12)]
    assert steps[0] == 0.0 and steps[-1] == 1.0
    assert all(later >= earlier for earlier, later in zip(steps, steps[1:], strict=False))


def _random_frame(rng):
    """Candidate shapes and what ``examine`` measured, at random (some measures left out, as a model may)."""
    shapes = [Shape(label="a", type="rectangle", points=[0, 0, 1, 1], score=float(score))
              for score in rng.uniform(0.0, 1.0, int(rng.integers(0, 5)))]
    measured = {name: float(rng.uniform()) for name in uncertainty.MEASURED if rng.uniform() < 0.8}
    return shapes, measured


@pytest.mark.parametrize("seed", range(30))
def test_every_measure_is_a_doubt_in_0_1_that_rises_with_its_own_evidence(seed):
    import numpy as np

    rng = np.random.default_rng(seed)
    threshold = float(rng.uniform(0.2, 0.8))
    shapes, measured = _random_frame(rng)
    for name, measure in uncertainty.MEASURES.items():
        doubt = measure(shapes, measured, threshold)
        assert 0.0 <= doubt <= 1.0, name
        assert measure(shapes, {key: 1.0 for key in uncertainty.MEASURED}, threshold) >= doubt, name
    # each measure reads what its name says, and only that
    for name, key in [("class margin", "margin"), ("flip disagreement", "flip"), ("novelty, early", "novelty_early"),
                      ("novelty, middle", "novelty_middle"), ("novelty, deep", "novelty_deep")]:
        assert uncertainty.MEASURES[name](shapes, measured, threshold) == measured.get(key, 0.0)
        others = {other: value for other, value in measured.items() if other != key}
        assert uncertainty.MEASURES[name]([], others, threshold) == 0.0
    close = Shape(label="a", type="rectangle", points=[0, 0, 1, 1], score=threshold)  # right at the threshold
    assert uncertainty.MEASURES["close call"]([*shapes, close], {}, threshold) == 1.0
    assert uncertainty.MEASURES["close call"](shapes, {key: 1.0 for key in uncertainty.MEASURED}, threshold) == \
        uncertainty.close_call(shapes, threshold)


@pytest.mark.parametrize("seed", range(30))
def test_the_confidence_tag_is_the_served_measure(seed):
    import numpy as np

    rng = np.random.default_rng(seed)
    threshold = float(rng.uniform(0.2, 0.8))
    shapes, measured = _random_frame(rng)
    served = uncertainty.MEASURES[uncertainty.SERVED](shapes, measured, threshold)
    assert uncertainty.frame_confidence(shapes, threshold, uncertainty.unfamiliarity(measured)) == \
        pytest.approx(1.0 - served)
