"""How sure a model is of a frame: the measure behind *least-confident frames first*.

Candidate measures of a frame's doubt (``MEASURES``; each 0 = sure … 1 = in doubt), from its candidate detections
and what ``Detector.examine`` measured of it:

* **Close calls.** A detection's *ambiguity* is 1 at the threshold and falls linearly to 0 at score 0 and at 1; a
  frame's is the largest among its candidates (detections scoring at least ``NEAR_MISS`` times the threshold).
* **Class margin.** How close the runner-up class comes on the frame's detections (``class_confusion``).
* **Flip disagreement.** How the detections on the frame and on its mirror image disagree (``flip_disagreement``;
  the test-time augmentation MONAI Label offers: a second forward pass).
* **Novelty**, at three depths of the backbone. A model trained on some classes is often *blind* to an unseen one
  — no detection at all, not even a weak one. What still tells such a frame apart is its appearance in the
  backbone's layers: the detector keeps those features of a sample of its training frames; a frame's *novelty* is
  how its distance to the nearest training frame ranks among the training frames' own nearest-neighbour distances,
  0 for anything as close as the median training frame, 1 for a frame farther than all of them.

``bench/ranking.py`` judges them on held-out cases (unseen kinds of object, unfamiliar backgrounds, several seeds);
``SERVED`` names the one the confidence tags carry (``frame_confidence``): the novelty at the early depth (edges and
colours, before the network learned what to ignore).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

from preannotate.shapes import Shape, box_iou

NEAR_MISS = 0.2  # candidates: detections scoring at least this share of the threshold


def candidate_threshold(threshold: float) -> float:
    """The score to ask a detector for so that the near misses come back too."""
    return threshold * NEAR_MISS


def ambiguity(score: float, threshold: float) -> float:
    """1 at the threshold, 0 at 0 and at 1, linear in between."""
    if score < threshold:
        return max(0.0, score / threshold) if threshold > 0 else 0.0
    return max(0.0, 1 - (score - threshold) / (1 - threshold)) if threshold < 1 else 1.0


def frame_confidence(candidates: Iterable[Shape], threshold: float, novelty: float = 0.0) -> float:
    """How sure the model is of a frame: 1 minus the served measure (``SERVED``) of its candidate detections (shapes
    with scores, near misses included) and its ``novelty`` (``unfamiliarity`` of what ``Detector.examine``
    measured)."""
    return 1.0 - MEASURES[SERVED](list(candidates), {SERVED_NOVELTY: novelty}, threshold)


def normalized(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (cosine similarity becomes a dot product)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def novelty(vectors: np.ndarray, familiar: np.ndarray) -> np.ndarray:
    """How unfamiliar each row of ``vectors`` (appearance features of frames) is next to ``familiar`` (those of
    the training frames): 0 up to the median training frame's nearest-neighbour distance, rising to 1 beyond the
    largest one (see the module docstring). Cosine distances."""
    familiar = normalized(familiar)
    if len(familiar) < 2:
        return np.zeros(len(vectors))
    own = familiar @ familiar.T
    np.fill_diagonal(own, -np.inf)
    typical = np.sort(1.0 - own.max(axis=1))  # each training frame's distance to its nearest other one
    distance = 1.0 - (normalized(vectors) @ familiar.T).max(axis=1)
    rank = np.searchsorted(typical, distance, side="left") / len(typical)  # share of training frames closer
    return np.clip(2.0 * rank - 1.0, 0.0, 1.0)


def class_confusion(class_scores: np.ndarray) -> np.ndarray:
    """How close the runner-up class comes, for each row of ``class_scores`` (a detection's score for every class,
    background left out): 1 minus the margin between the two best classes once the scores are shared out to sum
    to 1 — 0 when one class has it all, 1 when two tie. Scale-free: a weak detection is not confused for being
    weak."""
    scores = np.asarray(class_scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[1] < 2:
        return np.zeros(len(scores))
    shares = scores / np.maximum(scores.sum(axis=1, keepdims=True), 1e-12)
    best, runner_up = np.sort(shares, axis=1)[:, :-3:-1].T
    return 1.0 - (best - runner_up)


Detections = tuple[np.ndarray, np.ndarray, np.ndarray]  # boxes (n×4, x1 y1 x2 y2), classes (n), scores (n)


def flip_disagreement(frame: Detections, mirrored: Detections, iou: float = 0.5) -> float:
    """How much a model's detections on a frame and on the frame mirrored left to right (boxes mirrored back)
    disagree: each detection of either is paired with the same-class detection of the other overlapping it most
    (at least ``iou``); its disagreement is the difference of their scores (its own score when it has no pair).
    The frame's is the largest: 0 when both passes saw the same, near 1 when one saw a sure object the other did
    not."""
    def one_way(ours: Detections, theirs: Detections) -> float:
        boxes, classes, scores = ours
        other_boxes, other_classes, other_scores = theirs
        if not len(scores):
            return 0.0
        overlap = box_iou(boxes, other_boxes)
        overlap[np.asarray(classes)[:, None] != np.asarray(other_classes)[None, :]] = 0.0
        paired = np.where(overlap.max(axis=1, initial=0.0) >= iou,
                          np.asarray(other_scores)[overlap.argmax(axis=1)] if len(other_scores) else 0.0, 0.0)
        return float(np.abs(np.asarray(scores) - paired).max())

    return max(one_way(frame, mirrored), one_way(mirrored, frame))


def close_call(candidates: Iterable[Shape], threshold: float) -> float:
    """The frame's closest call: the largest ``ambiguity`` among its candidates (0 without any)."""
    floor = candidate_threshold(threshold)
    return max((ambiguity(shape.score, threshold) for shape in candidates
                if shape.score is not None and shape.score >= floor), default=0.0)


# What ``Detector.examine`` measures of a frame, by name (each 0 = sure … 1 = in doubt; a model that cannot give one
# leaves it out, read as 0): novelty at three depths of the backbone, the class margin of its detections and how its
# detections on the mirrored frame disagree.
MEASURED = ("novelty_early", "novelty_middle", "novelty_deep", "margin", "flip")

Measure = Callable[[Sequence[Shape], Mapping[str, float], float], float]


def _measured(*names: str) -> Measure:
    """The largest of the named measures of ``Detector.examine``."""
    return lambda candidates, measured, threshold: max(float(measured.get(name, 0.0)) for name in names)


def _largest(*parts: Measure) -> Measure:
    return lambda candidates, measured, threshold: max(part(candidates, measured, threshold) for part in parts)


def _close_call(candidates: Sequence[Shape], measured: Mapping[str, float], threshold: float) -> float:
    return close_call(candidates, threshold)


# The candidate measures of a frame's doubt (higher: review it earlier), from its candidate detections, what
# ``Detector.examine`` measured and the threshold; ``bench/ranking.py`` judges them on held-out cases and the one
# named ``SERVED`` ranks the frames people see (``frame_confidence``).
MEASURES: dict[str, Measure] = {
    "close call": _close_call,
    "class margin": _measured("margin"),
    "flip disagreement": _measured("flip"),
    "novelty, early": _measured("novelty_early"),
    "novelty, middle": _measured("novelty_middle"),
    "novelty, deep": _measured("novelty_deep"),
    "issue 12: max(close call, novelty early)": _largest(_close_call, _measured("novelty_early")),
    "max(novelty early, middle)": _measured("novelty_early", "novelty_middle"),
    "max(close call, novelty early, middle)": _largest(_close_call, _measured("novelty_early", "novelty_middle")),
}
# Served: the early novelty alone. On bench/ranking.py's 36 held-out cases (3 seeds) it put unfamiliar frames first
# best (AUROC 0.76, recall@K 0.58) — issue 12's max(close call, novelty early) scored 0.70 and 0.46: close calls
# are as common on ordinary frames as on unfamiliar ones, and the model is often blind to an unseen kind.
SERVED = "novelty, early"
SERVED_NOVELTY = "novelty_early"  # the one of ``Detector.examine``'s measures the served measure reads


def unfamiliarity(measured: Mapping[str, float]) -> float:
    """How unfamiliar a frame is, from what its detector measured (``Detector.examine``): the novelty the served
    measure reads."""
    return float(measured.get(SERVED_NOVELTY, 0.0))


def kept(candidates: Iterable[Shape], threshold: float) -> list[Shape]:
    """The detections written into the task: those at or above the threshold (unscored shapes always)."""
    return [shape for shape in candidates if shape.score is None or shape.score >= threshold]


def ranking(confidences: Mapping[int, float]) -> list[tuple[int, float]]:
    """Frames, least confident first (ties by frame number)."""
    return sorted(confidences.items(), key=lambda item: (item[1], item[0]))
