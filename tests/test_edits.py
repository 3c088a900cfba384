"""The review edits a model's shapes cost (``training.edits``): the matching on hand-made frames, the curve over
thresholds against matching anew at each, the served threshold each label gets, and the confusion matrix."""

from __future__ import annotations

import numpy as np
import pytest
from preannotate.shapes import Label, Shape
from preannotate.training import edits
from preannotate.training.edits import Edits, count_edits, edit_curves, review_frame


def box(x1, y1, x2, y2, label="car", score=None) -> Shape:
    return Shape(label, "rectangle", [float(x1), float(y1), float(x2), float(y2)], score=score)


def total(truth, predicted, threshold=0.0) -> Edits:
    """The edits of one frame, every label together."""
    return sum(count_edits([truth], [predicted], threshold).values(), Edits())


A = box(0, 0, 100, 100)
B = box(200, 0, 300, 100)

# name: (truth, predicted, (adds, deletes, moves))
CASES = {
    "perfect": ([A, B], [box(0, 0, 100, 100, score=0.9), box(200, 0, 300, 100, score=0.8)], (0, 0, 0)),
    "nothing predicted: every object drawn": ([A, B], [], (2, 0, 0)),
    "nothing there: every prediction deleted": ([], [box(0, 0, 10, 10, score=0.9)] * 3, (0, 3, 0)),
    "loose box (IoU 0.6): dragged": ([A], [box(0, 0, 100, 60, score=0.9)], (0, 0, 1)),
    "tight enough (IoU 0.8): kept": ([A], [box(0, 0, 100, 80, score=0.9)], (0, 0, 0)),
    "IoU exactly 0.75 is not a move": ([A], [box(0, 0, 100, 75, score=0.9)], (0, 0, 0)),
    "IoU exactly 0.5 matches": ([A], [box(0, 0, 100, 50, score=0.9)], (0, 0, 1)),
    "under IoU 0.5: a delete and an add": ([A], [box(0, 0, 100, 40, score=0.9)], (1, 1, 0)),
    "wrong label: a delete and an add": ([A], [box(0, 0, 100, 100, label="truck", score=0.9)], (1, 1, 0)),
    "a duplicate: the second is deleted": ([A], [box(0, 0, 100, 100, score=0.9), box(2, 2, 100, 100, score=0.7)],
                                          (0, 1, 0)),
    "unscored shapes count as sure": ([A], [box(0, 0, 100, 100), box(500, 500, 510, 510)], (0, 1, 0)),
    "the most confident takes the object it overlaps most, as COCO's greedy match": (
        [box(0, 0, 100, 100), box(0, 50, 100, 150)],
        # p1 overlaps the first object at 0.67 (and the second at 0.2); p2, less sure, fits the first better (0.9)
        # but finds it taken, and the second overlaps it too little: deleted, and the second drawn
        [box(0, 0, 100, 67, score=0.9), box(0, 0, 100, 90, score=0.8)], (1, 1, 1)),
    "tags are not shapes": ([A, Shape("day", "tag", [])], [box(0, 0, 100, 100, score=0.9), Shape("night", "tag", [])],
                            (0, 0, 0)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_edits_of_hand_made_frames(case):
    truth, predicted, (adds, deletes, moves) = CASES[case]
    found = total(truth, predicted)
    assert (found.adds, found.deletes, found.moves) == (adds, deletes, moves)
    assert found.objects == sum(s.type != "tag" for s in truth)
    review = review_frame(truth, predicted)  # the same matching, as the prediction grids mark it
    assert (len(review.missed), len(review.false), len(review.loose)) == (adds, deletes, moves)


def test_review_frame_names_which_object_is_missed_and_which_prediction_is_false():
    truth = [A, B, box(400, 0, 500, 100, label="truck")]
    predicted = [box(200, 0, 300, 60, score=0.8), box(600, 600, 650, 650, score=0.7), box(0, 0, 100, 100, score=0.6)]
    review = review_frame(truth, predicted)
    assert review.missed == [2] and review.false == [1] and review.loose == [0]


def test_a_mask_or_a_polygon_is_judged_by_its_box():
    from preannotate.formats import masks

    bitmap = np.zeros((120, 120), bool)
    bitmap[0:100, 0:100] = True
    mask = Shape("car", "mask", masks.bitmap_to_cvat_rle(bitmap), score=0.9)
    polygon = Shape("car", "polygon", [0, 0, 100, 0, 100, 100, 0, 100], score=0.9)
    assert total([A], [mask]).total == 0 and total([A], [polygon]).total == 0


def test_a_threshold_drops_what_scores_under_it_one_for_all_labels_or_each_its_own():
    truth = [A, box(200, 0, 300, 100, label="truck")]
    predicted = [box(0, 0, 100, 100, score=0.4), box(200, 0, 300, 100, label="truck", score=0.6)]
    assert total(truth, predicted, 0.5) == Edits(2, 1, 0, 0)  # the car's box dropped: drawn again
    assert total(truth, predicted, 0.3) == Edits(2, 0, 0, 0)
    own = {"car": 0.3, "truck": 0.7}
    per_label = count_edits([truth], [predicted], own.__getitem__)
    assert per_label == {"car": Edits(1, 0, 0, 0), "truck": Edits(1, 1, 0, 0)}


def test_edits_per_100_objects():
    assert Edits(40, 19, 8, 2).per_100 == pytest.approx(72.5)
    assert Edits(0, 0, 3, 0).per_100 is None  # no object: nothing to compare with
    assert Edits(10, 1, 2, 3).to_dict() == {"objects": 10, "adds": 1, "deletes": 2, "moves": 3, "edits": 6,
                                            "per_100": 60.0}


def random_frames(seed: int, frames: int = 30):
    """Frames of random true boxes of two labels, and predictions near some, far from others, duplicated, with
    random scores (ties included)."""
    rng = np.random.default_rng(seed)
    truth, predicted = [], []
    for _ in range(frames):
        true_shapes, found = [], []
        for _ in range(rng.integers(0, 5)):
            x, y, w, h = rng.uniform(0, 200, 2).tolist() + rng.uniform(10, 60, 2).tolist()
            label = str(rng.choice(["car", "truck"]))
            true_shapes.append(box(x, y, x + w, y + h, label))
            for _ in range(rng.integers(0, 3)):  # near it: tight, loose or off
                dx, dy = rng.normal(0, 0.25 * w), rng.normal(0, 0.25 * h)
                found.append(box(x + dx, y + dy, x + w + dx, y + h + dy, label if rng.random() > 0.1 else "car",
                                 round(float(rng.uniform()), 1)))
        for _ in range(rng.integers(0, 3)):  # far from everything
            x, y = rng.uniform(300, 500, 2)
            found.append(box(x, y, x + 20, y + 20, str(rng.choice(["car", "truck"])), round(float(rng.uniform()), 1)))
        truth.append(true_shapes)
        predicted.append(found)
    return truth, predicted


@pytest.mark.parametrize("seed", range(5))
def test_the_curve_read_at_a_threshold_is_matching_anew_with_what_scores_that_much(seed):
    truth, predicted = random_frames(seed)
    curves = edit_curves(truth, predicted, [Label("car"), Label("truck")])
    for threshold in np.linspace(0, 1, 21):
        kept = [[s for s in shapes if s.score >= threshold] for shapes in predicted]
        anew = {name: Edits() for name in ("car", "truck")}
        for true_shapes, found in zip(truth, kept, strict=True):
            review = review_frame(true_shapes, found)
            for name in anew:
                mine = lambda shapes, indices: sum(shapes[i].label == name for i in indices)  # noqa: E731, B023
                anew[name] = anew[name] + Edits(sum(s.label == name for s in true_shapes),
                                                mine(true_shapes, review.missed), mine(found, review.false),
                                                mine(found, review.loose))
        assert {name: curve.at(threshold) for name, curve in curves.items()} == anew, threshold


@pytest.mark.parametrize("seed", range(5))
def test_the_chosen_threshold_needs_no_more_edits_than_any_other(seed):
    truth, predicted = random_frames(seed)
    curves = edit_curves(truth, predicted, [Label("car"), Label("truck")])
    for name, chosen in edits.choose_thresholds(curves).items():
        fewest = curves[name].at(chosen).total
        assert all(fewest <= curves[name].at(t).total for t in np.linspace(0, 1, 101)), name


def scored(label: str, right: list[float], wrong: list[float]):
    """One frame per prediction: a true object of ``label`` found at each score of ``right``, an empty frame with a
    false positive at each score of ``wrong``."""
    truth = [[box(0, 0, 50, 50, label)] for _ in right] + [[] for _ in wrong]
    predicted = [[box(0, 0, 50, 50, label, s)] for s in right] + [[box(0, 0, 50, 50, label, s)] for s in wrong]
    return truth, predicted


def test_a_label_whose_false_positives_score_high_gets_a_higher_threshold():
    car = scored("car", right=[0.95, 0.93, 0.9], wrong=[0.85, 0.8])
    cat = scored("cat", right=[0.65, 0.6, 0.55], wrong=[0.2, 0.1])
    curves = edit_curves(car[0] + cat[0], car[1] + cat[1], [Label("car"), Label("cat")])
    chosen = edits.choose_thresholds(curves)
    assert 0.85 < chosen["car"] <= 0.9 and 0.2 < chosen["cat"] <= 0.55
    assert chosen == {"car": 0.88, "cat": 0.38}  # half-way, in as few digits as keep the same cut
    assert curves["car"].at(chosen["car"]) == Edits(3, 0, 0, 0)
    assert curves["car"].at(0.5) == Edits(3, 0, 2, 0)  # the usual 0.5 keeps the confident mistakes


def test_a_label_the_model_finds_badly_gets_a_threshold_above_what_it_answers():
    truth, predicted = scored("car", right=[], wrong=[0.7, 0.6])
    truth += [[box(0, 0, 50, 50)]]  # one object it never finds
    predicted += [[]]
    chosen = edits.choose_thresholds(edit_curves(truth, predicted, [Label("car")]))["car"]
    assert chosen > 0.7  # nothing it says is right: nothing is served


def test_equal_edits_choose_the_middle_of_the_thresholds_that_need_them():
    # a tight box at 0.9, a loose one at 0.7 (kept: a move; dropped: an add), a false one at 0.2
    truth = [[box(0, 0, 50, 50)], [box(0, 0, 50, 50)], []]
    predicted = [[box(0, 0, 50, 50, score=0.9)], [box(0, 0, 50, 30, score=0.7)], [box(0, 0, 50, 50, score=0.2)]]
    curve = edit_curves(truth, predicted, [Label("car")])["car"]
    assert curve.at(0.8).total == curve.at(0.45).total == 1 and curve.at(0.1).total == 2
    # anywhere in (0.2, 0.9] needs 1 edit: the middle, as far as can be from the scores on either side (the lowest
    # of them, 0.45, sits next to the false positive's score, where frames never seen put theirs on either side)
    assert curve.best() == 0.55


def test_equal_edits_at_separate_thresholds_choose_the_widest_run():
    truth = [[box(0, 0, 50, 50)], [], [box(0, 0, 50, 50)]]
    predicted = [[box(0, 0, 50, 50, score=0.7)], [box(0, 0, 50, 50, score=0.6)], [box(0, 0, 50, 50, score=0.5)]]
    curve = edit_curves(truth, predicted, [Label("car")])["car"]
    assert curve.at(0.65).total == curve.at(0.5).total == 1  # one add, or one delete
    assert curve.best() == 0.25  # (0, 0.5] is wider than (0.6, 0.7]: keep everything, half-way down to 0


def test_tied_scores_are_kept_or_dropped_together():
    truth = [[box(0, 0, 50, 50)], [], []]
    predicted = [[box(0, 0, 50, 50, score=0.6)], [box(0, 0, 50, 50, score=0.6)], [box(0, 0, 50, 50, score=0.6)]]
    curve = edit_curves(truth, predicted, [Label("car")])["car"]
    assert curve.best() > 0.6  # one right and two wrong at the same score: none served


def test_nothing_is_chosen_without_true_objects_or_predictions_of_a_label():
    truth, predicted = scored("car", right=[0.9], wrong=[0.3])
    predicted[0].append(box(0, 0, 5, 5, "cat", 0.9))  # cat: predicted, never true; dog: neither
    curves = edit_curves(truth, predicted, [Label("car"), Label("cat"), Label("dog")])
    assert curves["cat"].best() is None and curves["dog"].best() is None
    assert set(edits.choose_thresholds(curves)) == {"car"}
    truth, predicted = [[box(0, 0, 50, 50)]], [[]]  # true, never predicted: every threshold alike
    assert edit_curves(truth, predicted, [Label("car")])["car"].best() is None


def test_the_confusion_matrix_counts_right_wrong_label_missed_and_false():
    labels = [Label("car"), Label("truck")]
    truth = [[box(0, 0, 100, 100), box(200, 0, 300, 100, "truck"), box(400, 0, 500, 100, "truck")]]
    predicted = [[box(0, 0, 100, 100, score=0.9), box(200, 0, 300, 100, "car", 0.8), box(600, 0, 650, 50, "truck", 0.7),
                  box(0, 0, 100, 100, "truck", 0.2)]]
    matrix = edits.confusion(truth, predicted, labels, threshold=0.5)
    assert matrix["labels"] == ["car", "truck", "background"]
    assert matrix["matrix"] == [[1, 0, 0],   # the car found as a car
                                [1, 0, 1],   # a truck called a car, a truck missed
                                [0, 1, 0]]   # a truck where there is nothing
    assert edits.confusion(truth, predicted, labels, threshold=0.1)["matrix"][2] == [0, 2, 0]  # the 0.2 truck too
