"""How sure a model is of a frame: the measure behind *least-confident frames first*.

Two kinds of doubt, both from the one forward pass that pre-annotates the frame (so scoring costs nothing extra):

* **Close calls.** A detector decides a frame with its threshold: every detection above it is written, every one
  below is dropped. A detection's *ambiguity* is 1 at the threshold and falls linearly to 0 at score 0 and at 1; a
  frame's is the largest among its candidates (detections scoring at least ``NEAR_MISS`` times the threshold). It
  catches a box the model barely believes and an object it barely missed, and ignores what is settled: sure
  objects near 1, background clutter near 0.
* **Unfamiliar frames.** A model trained on some classes is often *blind* to an unseen one — no detection at all,
  not even a weak one (measured: SSDlite trained on boxes and discs scores green triangles like empty background,
  and its deep features put them next to the empty training frames). What still tells such a frame apart is its
  appearance in the backbone's *early* layers (edges and colours, before the network learned what to ignore). The
  detector keeps those features of a sample of its training frames; a frame's *novelty* is how its distance to the
  nearest training frame ranks among the training frames' own nearest-neighbour distances, 0 for anything as close
  as the median training frame, 1 for a frame farther than all of them.

A frame's uncertainty is the larger of the two; its confidence is ``1 - uncertainty`` (a frame with neither is 1.0).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

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


def frame_confidence(candidates: Iterable[Shape], threshold: float, novelty: float = 0.0) -> float:
    """How sure the model is of a frame, from its candidate detections (shapes with scores, near misses included)
    and its ``novelty``."""
    floor = candidate_threshold(threshold)
    scores = [shape.score for shape in candidates if shape.score is not None and shape.score >= floor]
    return 1.0 - max(novelty, max((ambiguity(score, threshold) for score in scores), default=0.0))


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


def kept(candidates: Iterable[Shape], threshold: float) -> list[Shape]:
    """The detections written into the task: those at or above the threshold (unscored shapes always)."""
    return [shape for shape in candidates if shape.score is None or shape.score >= threshold]


def ranking(confidences: Mapping[int, float]) -> list[tuple[int, float]]:
    """Frames, least confident first (ties by frame number)."""
    return sorted(confidences.items(), key=lambda item: (item[1], item[0]))
