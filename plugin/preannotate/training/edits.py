"""What a reviewer must change to turn a model's shapes into the truth, counted once for every use: the threshold a
version is served at (``choose_thresholds``), the report's curves and confusion matrix, the marks on the
prediction grids and the headline figure of ``bench/review_work.py``.

**Edits.** On each frame, for each label, the predictions are matched to the true objects as COCO matches them:
greedily, most confident first, each to the unmatched true object it overlaps most at box IoU ``MATCH_IOU`` (0.5)
or more. Then

* a prediction left unmatched is a **delete** (a false positive the reviewer removes);
* a true object left unmatched is an **add** (a miss the reviewer draws);
* a match whose IoU is below ``MOVE_IOU`` (0.75) is a **move** (a loose box the reviewer drags into place).

**Why each counts 1.** Each is one action of the reviewer in CVAT's editor: select and delete, draw one box, drag
an edge or two. The times differ (drawing a box takes several seconds, deleting one about a second), but they
differ by task, by tool and by person, and a count is what a team can check against its own review (``preannotate
review`` counts exactly these three in a reviewed task). F1 is *not* the same
criterion: with ``N`` true objects, edits without moves are ``FP + N - TP`` while F1 is ``2TP / (TP + FP + N)``;
60 found and none wrong, or 70 found and 10 wrong, are both 40 edits of 100 objects, but F1 prefers the second.

A prediction of the wrong label is counted as a delete and an add (per label, as COCO does): CVAT lets a reviewer
change a label in one action, so on frames where that happens the count is an upper bound; the confusion matrix
(``confusion``) shows how often it does. IoU is that of the shapes' bounding boxes (a polygon or a mask is judged by
its box, as the box mAP is), except where either shape is a rotated rectangle or an ellipse: their box holds corners
they do not have, so those are judged by their outlines (``formats.masks.shape_iou``). For skeletons, where a
box says little, the object keypoint similarity (``shapes.keypoint_similarity``, COCO's OKS) takes its place, at the
same 0.5 and 0.75, as COCO's keypoint AP does: a loose match there is a keypoint or two the reviewer drags. A lone
point has no box: it is judged by a box grown around it (``models.keypoints.review_box``).

Matching is greedy by score, so a prediction's match depends only on the predictions more confident than itself:
the matching made once with every prediction holds for every threshold, and ``EditCurve`` reads the edits at any
threshold off one sort.

**Which of equals.** Many thresholds need the fewest edits on the validation frames: every one between two
adjacent scores, and a run of such gaps where a loose match (a move kept, or an add dropped) or a tie of a right and
a wrong prediction leaves the count unchanged. ``best`` takes the middle of the widest run, as far as it can be from
the weakest prediction it keeps and the strongest it drops: frames it never saw put their predictions on either side
of a threshold at the run's edge, which sits one score away from a false positive or a missed object.
``bench/threshold_choice.py`` judged it against the lowest of equals (served before), 0.5 for every label, 0.5 unless
the choice saves 2 edits, and the fewest edits averaged over ±0.05, on models of several strengths and many drawn
validation sets: the middle had fewer held-out edits than the lowest of equals on every model and size (its table
is in bench/RESULTS.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from preannotate.formats.masks import shape_iou
from preannotate.models.keypoints import KEYPOINT_TYPES, review_box
from preannotate.shapes import TAG, Label, Shape, box_iou, is_turned, keypoint_similarity

MATCH_IOU = 0.5   # a prediction and a true object are the same object from this box IoU on (COCO's AP@.5)
MOVE_IOU = 0.75   # a match below this IoU is a box the reviewer drags into place (COCO's strict AP@.75)
CURVE_POINTS = np.round(np.linspace(0.0, 1.0, 101), 2)  # the thresholds the report draws edits at
BACKGROUND = "background"


@dataclass
class Edits:
    """What a reviewer does to ``objects`` true objects: draws ``adds``, deletes ``deletes``, drags ``moves``."""

    objects: int = 0
    adds: int = 0
    deletes: int = 0
    moves: int = 0

    @property
    def total(self) -> int:
        return self.adds + self.deletes + self.moves

    @property
    def per_100(self) -> float | None:
        """Edits per 100 true objects (drawing every object from scratch is 100); None with no object."""
        return 100.0 * self.total / self.objects if self.objects else None

    def __add__(self, other: Edits) -> Edits:
        return Edits(self.objects + other.objects, self.adds + other.adds, self.deletes + other.deletes,
                     self.moves + other.moves)

    def to_dict(self) -> dict[str, float | int | None]:
        per_100 = self.per_100
        return {"objects": self.objects, "adds": self.adds, "deletes": self.deletes, "moves": self.moves,
                "edits": self.total, "per_100": None if per_100 is None else round(per_100, 2)}


def boxes(shapes: Sequence[Shape]) -> np.ndarray:
    """``N×4`` ``x1, y1, x2, y2`` of the shapes' bounding boxes (of a skeleton or points shape, its keypoints' box
    grown so a point has an extent: ``keypoints.review_box``)."""
    return np.asarray([review_box(shape) if shape.type in KEYPOINT_TYPES else shape.bbox() for shape in shapes],
                      dtype=float).reshape(-1, 4)


def score_of(shape: Shape) -> float:
    """A shape's score; an unscored one counts as sure (as ``coco.to_results`` has it)."""
    return 1.0 if shape.score is None else float(shape.score)


def overlap(predicted: Sequence[Shape], truth: Sequence[Shape]) -> np.ndarray:
    """``len(predicted) × len(truth)``: the keypoint similarity when all are skeletons, else IoU: of the boxes (a
    point's grown to a size, ``keypoints.review_box``: OKS at a skeleton's scale would call a point 6 px off a miss),
    or of the outlines where either shape is turned (a rotated rectangle or an ellipse; see the module doc).
    Outlines whose boxes do not meet do not meet either."""
    if all(shape.type == "skeleton" for shape in (*predicted, *truth)):
        return keypoint_similarity(predicted, truth)
    overlaps = box_iou(boxes(predicted), boxes(truth))
    for row, column in zip(*np.nonzero(overlaps), strict=True):
        if _turned(predicted[row]) or _turned(truth[column]):
            overlaps[row, column] = shape_iou(predicted[row], truth[column])
    return overlaps


def _turned(shape: Shape) -> bool:
    return shape.type == "ellipse" or is_turned(shape)


def greedy_match(truth: Sequence[Shape], predicted: Sequence[Shape], min_iou: float = MATCH_IOU
                 ) -> list[tuple[int, int | None, float]]:
    """``(prediction index, true index or None, IoU)`` for each prediction, most confident first (ties in the given
    order, as COCO's stable sort keeps them): each takes the unmatched true object it overlaps most, at ``min_iou``
    or more."""
    order = sorted(range(len(predicted)), key=lambda i: -score_of(predicted[i]))
    overlaps = overlap([predicted[i] for i in order], truth) if truth and predicted else None
    taken = np.zeros(len(truth), bool)
    matches = []
    for row, index in enumerate(order):
        best, best_iou = None, min_iou
        if overlaps is not None:
            free = np.where(taken, -1.0, overlaps[row])
            candidate = int(free.argmax())
            if free[candidate] >= best_iou:
                best, best_iou = candidate, float(free[candidate])
                taken[candidate] = True
        matches.append((index, best, best_iou if best is not None else 0.0))
    return matches


@dataclass
class FrameReview:
    """One frame's matching, label by label: which predictions are false (deletes), which true objects are missed
    (adds) and which matches are loose (moves), as indices into the lists given."""

    false: list[int] = field(default_factory=list)
    missed: list[int] = field(default_factory=list)
    loose: list[int] = field(default_factory=list)  # predictions matched below MOVE_IOU

    def edits(self, objects: int) -> Edits:
        return Edits(objects, len(self.missed), len(self.false), len(self.loose))


def review_frame(truth: Sequence[Shape], predicted: Sequence[Shape]) -> FrameReview:
    """The edits that turn ``predicted`` (kept as they are: threshold them first) into ``truth`` on one frame."""
    found = FrameReview()
    truth = [shape for shape in truth if shape.type != TAG]
    predicted_shapes = [(i, shape) for i, shape in enumerate(predicted) if shape.type != TAG]
    for label in {shape.label for shape in truth} | {shape.label for _, shape in predicted_shapes}:
        mine = [i for i, shape in enumerate(truth) if shape.label == label]
        theirs = [i for i, shape in predicted_shapes if shape.label == label]
        matched = set()
        for row, true_index, overlap in greedy_match([truth[i] for i in mine], [predicted[i] for i in theirs]):
            if true_index is None:
                found.false.append(theirs[row])
            else:
                matched.add(true_index)
                if overlap < MOVE_IOU:
                    found.loose.append(theirs[row])
        found.missed += [mine[k] for k in range(len(mine)) if k not in matched]
    for part in (found.false, found.missed, found.loose):
        part.sort()
    return found


@dataclass
class EditCurve:
    """One label's predictions over a set of frames, matched once with every prediction kept: the edits at any
    threshold (``at``) and the threshold that needs the fewest (``best``)."""

    label: str
    objects: int                                            # true objects of the label
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0))   # every prediction's score, descending
    matched: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # it matches a true object
    loose: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))    # ... below MOVE_IOU

    def at(self, threshold: float) -> Edits:
        """The edits with the predictions scoring ``threshold`` or more kept."""
        kept = int(np.searchsorted(-self.scores, -threshold, side="right"))  # scores >= threshold
        return self._kept(kept)

    def _kept(self, kept: int) -> Edits:
        found = int(self.matched[:kept].sum())
        return Edits(self.objects, self.objects - found, kept - found, int(self.loose[:kept].sum()))

    def best(self) -> float | None:
        """The threshold with the fewest edits, in the middle of the widest run of thresholds that need them (see the
        module docstring): half-way between the weakest prediction it keeps and the strongest it drops (0 when it
        drops none); None when nothing can be learned (no true object of the label, or no prediction of it: every
        threshold is alike)."""
        if not self.objects or not len(self.scores):
            return None
        # A cut can only fall between two different scores: ties are kept or dropped together.
        cuts = [0, *(k for k in range(1, len(self.scores)) if self.scores[k] < self.scores[k - 1]),
                len(self.scores)]
        totals = [self._kept(k).total for k in cuts]
        fewest = min(totals)
        runs: list[tuple[float, float]] = []  # (lower, higher) thresholds of adjacent cuts that need the fewest
        for k, total, before in zip(cuts, totals, [None, *totals[:-1]], strict=True):
            if total != fewest:
                continue
            lower = float(self.scores[k]) if k < len(self.scores) else 0.0   # the highest score dropped
            higher = float(self.scores[k - 1]) if k else 1.0                 # the lowest score kept (or the top)
            if before == fewest:
                runs[-1] = (lower, runs[-1][1])  # the run goes on down
            else:
                runs.append((lower, higher))
        lower, higher = max(runs, key=lambda run: run[1] - run[0])  # the widest; the highest of equals
        middle = (higher + lower) / 2
        return next((rounded for digits in range(2, 7) if lower < (rounded := round(middle, digits)) <= higher),
                    middle)  # as few digits as keep the same cut: a threshold people read

    def per_100(self, thresholds: Sequence[float] = tuple(CURVE_POINTS)) -> list[float | None]:
        """Edits per 100 true objects at each of ``thresholds`` (the report's curve)."""
        return [self.at(float(t)).per_100 for t in thresholds]


def edit_curves(truth: Sequence[Sequence[Shape]], predicted: Sequence[Sequence[Shape]], labels: Sequence[Label]
                ) -> dict[str, EditCurve]:
    """Each label's ``EditCurve`` over frames: ``truth[i]`` the true shapes of frame i, ``predicted[i]`` every
    shape the model found on it, scored (no threshold: detect at 0)."""
    rows: dict[str, list[tuple[float, bool, bool]]] = {label.name: [] for label in labels}
    objects = dict.fromkeys(rows, 0)
    for true_shapes, found in zip(truth, predicted, strict=True):
        true_shapes = [shape for shape in true_shapes if shape.type != TAG]
        found = [shape for shape in found if shape.type != TAG]
        for name in rows:
            mine = [shape for shape in true_shapes if shape.label == name]
            theirs = [shape for shape in found if shape.label == name]
            objects[name] += len(mine)
            for index, true_index, overlap in greedy_match(mine, theirs):
                rows[name].append((score_of(theirs[index]), true_index is not None,
                                   true_index is not None and overlap < MOVE_IOU))
    curves = {}
    for name, found_rows in rows.items():
        found_rows.sort(key=lambda row: -row[0])  # stable: the per-frame order stays among equal scores
        curves[name] = EditCurve(name, objects[name], np.asarray([r[0] for r in found_rows], float),
                                 np.asarray([r[1] for r in found_rows], bool),
                                 np.asarray([r[2] for r in found_rows], bool))
    return curves


def choose_thresholds(curves: Mapping[str, EditCurve]) -> dict[str, float]:
    """The served threshold of each label its curve can say something about (``EditCurve.best``); a label left
    out keeps the model's ``score-threshold``."""
    return {name: best for name, curve in curves.items() if (best := curve.best()) is not None}


def threshold_text(thresholds: Mapping[str, float]) -> str:
    """What a picture or a report says of the threshold it used: ``with score ≥ 0.5``, or each label's when they
    differ (``at the served thresholds: box ≥ 0.42, disc ≥ 0.37``)."""
    values = set(thresholds.values())
    if len(values) <= 1:
        return f"with score ≥ {next(iter(values), 0.0):g}"
    return "at the served thresholds: " + ", ".join(f"{name} ≥ {value:.2g}" for name, value in thresholds.items())


def count_edits(truth: Sequence[Sequence[Shape]], predicted: Sequence[Sequence[Shape]],
                threshold: float | Callable[[str], float] = 0.0) -> dict[str, Edits]:
    """Each label's edits over frames, the predictions kept from ``threshold`` (one for all labels, or a label's
    own); a label that appears in neither is absent. ``sum(..., Edits())`` is the whole."""
    threshold_of = threshold if callable(threshold) else (lambda _: float(threshold))
    names = sorted({s.label for shapes in [*truth, *predicted] for s in shapes if s.type != TAG})
    curves = edit_curves(truth, predicted, [Label(name) for name in names])
    return {name: curve.at(threshold_of(name)) for name, curve in curves.items()}


def confusion(truth: Sequence[Sequence[Shape]], predicted: Sequence[Sequence[Shape]], labels: Sequence[Label],
              threshold: float | Callable[[str], float] = 0.0) -> dict[str, list]:
    """A detector's confusion matrix over frames: ``matrix[true][predicted]`` over ``labels`` + background (the last
    row and column). Predictions are kept from ``threshold`` and matched to true objects of any label, greedily by
    score at ``MATCH_IOU``: a match counts in its two labels' cell (the diagonal: right; off it: a wrong label), a
    true object left unmatched in the background column (a miss), a prediction left unmatched in the background
    row (a false positive)."""
    threshold_of = threshold if callable(threshold) else (lambda _: float(threshold))
    names = [label.name for label in labels]
    index = {name: i for i, name in enumerate(names)}
    background = len(names)
    matrix = np.zeros((len(names) + 1, len(names) + 1), int)
    for true_shapes, found in zip(truth, predicted, strict=True):
        mine = [s for s in true_shapes if s.type != TAG and s.label in index]
        theirs = [s for s in found if s.type != TAG and s.label in index and score_of(s) >= threshold_of(s.label)]
        matched = set()
        for row, true_index, _ in greedy_match(mine, theirs):
            column = index[theirs[row].label]
            if true_index is None:
                matrix[background, column] += 1
            else:
                matched.add(true_index)
                matrix[index[mine[true_index].label], column] += 1
        for k, shape in enumerate(mine):
            if k not in matched:
                matrix[index[shape.label], background] += 1
    return {"labels": [*names, BACKGROUND], "matrix": matrix.tolist()}


def attribute_edits(truth: Sequence[Sequence[Shape]], predicted: Sequence[Sequence[Shape]],
                    labels: Sequence[Label], names: Mapping[str, Sequence[str]],
                    threshold: float | Callable[[str], float] = 0.0) -> dict[str, dict[str, int]]:
    """The attribute changes a reviewer makes on the objects a model found, per ``label/attribute`` of ``names``
    (label → the attribute names the model fills): on each prediction kept from ``threshold`` and matched to a true
    object of its label (as ``review_frame`` matches), one **edit** when the value it arrives with — its own, or the
    label's default when the model left it unset — is not the true one. Each is one action (a click in the
    attribute panel), like an add, a delete or a move, but it is counted apart from those: a shape's attributes do
    not change how it is matched, the edits of ``count_edits`` stay box edits, and this adds to them. ``checked`` is
    the matched objects with a true value; ``unset`` how many of the edits were left unset by the model."""
    threshold_of = threshold if callable(threshold) else (lambda _: float(threshold))
    defaults = {(label.name, spec.name): spec.default_value or (spec.values[0] if spec.values else "")
                for label in labels for spec in label.attributes}
    counts: dict[str, dict[str, int]] = {f"{label}/{name}": {"checked": 0, "edits": 0, "unset": 0}
                                         for label, attributes in names.items() for name in attributes}
    for true_shapes, found in zip(truth, predicted, strict=True):
        for label, attributes in names.items():
            mine = [s for s in true_shapes if s.type != TAG and s.label == label]
            theirs = [s for s in found if s.type != TAG and s.label == label and score_of(s) >= threshold_of(label)]
            for row, true_index, _ in greedy_match(mine, theirs):
                if true_index is None:
                    continue
                for name in attributes:
                    want = mine[true_index].attributes.get(name)
                    if want is None:
                        continue
                    got = theirs[row].attributes.get(name)
                    count = counts[f"{label}/{name}"]
                    count["checked"] += 1
                    arrives = got if got is not None else defaults.get((label, name), "")
                    if str(arrives).lower() != str(want).lower():
                        count["edits"] += 1
                        count["unset"] += got is None
    return counts
