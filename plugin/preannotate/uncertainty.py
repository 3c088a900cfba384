"""How sure a model is of a frame: the measure behind *least-confident frames first*.

A detector decides a frame with its threshold: every detection above it is written, every one below is dropped. The
frame is as uncertain as its closest call. A detection's ambiguity is 1 at the threshold and falls linearly to 0 at
score 0 and at score 1; the frame's uncertainty is the largest ambiguity among its candidate detections (those
scoring at least ``NEAR_MISS`` times the threshold), and its confidence is ``1 - uncertainty``.

Why this measure: it needs one forward pass (pre-annotation stays as fast as without it), it catches both kinds of
error a reviewer must fix — a kept box the model barely believes and an object it barely missed (the near misses are
what an unseen class produces: something object-like that matches no class well) — and it ignores what is settled:
sure objects near 1 and background clutter near 0. A frame with no candidate at all is confident (1.0).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from preannotate.shapes import Shape

NEAR_MISS = 0.2  # candidates: detections scoring at least this share of the threshold


def candidate_threshold(threshold: float) -> float:
    """The score to ask a detector for so that the near misses come back too."""
    return threshold * NEAR_MISS


def ambiguity(score: float, threshold: float) -> float:
    """1 at the threshold, 0 at 0 and at 1, linear in between."""
    if score < threshold:
        return max(0.0, score / threshold) if threshold > 0 else 0.0
    return max(0.0, 1 - (score - threshold) / (1 - threshold)) if threshold < 1 else 1.0


def frame_confidence(candidates: Iterable[Shape], threshold: float) -> float:
    """How sure the model is of a frame, from its candidate detections (shapes with scores, near misses included)."""
    floor = candidate_threshold(threshold)
    scores = [shape.score for shape in candidates if shape.score is not None and shape.score >= floor]
    return 1.0 - max((ambiguity(score, threshold) for score in scores), default=0.0)


def kept(candidates: Iterable[Shape], threshold: float) -> list[Shape]:
    """The detections written into the task: those at or above the threshold (unscored shapes always)."""
    return [shape for shape in candidates if shape.score is None or shape.score >= threshold]


def ranking(confidences: Mapping[int, float]) -> list[tuple[int, float]]:
    """Frames, least confident first (ties by frame number)."""
    return sorted(confidences.items(), key=lambda item: (item[1], item[0]))
