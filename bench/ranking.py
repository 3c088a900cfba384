"""Least-confident frames first: which measure of a frame's doubt puts the frames with unfamiliar content first
(issue 21), judged on many held-out cases.

For each seed a small detector is trained from random init on three familiar kinds of object (box, disc, triangle
of ``training.synthetic``) with the project's own recipe (``train_and_publish``: its defaults, a short budget at a
small image size, see ``--steps`` and ``--size``), cached per seed and budget in ``--cache``. Its sample of training
frames is read as publishing reads it. Then, for each *case kind*, a task of ``--ordinary`` ordinary frames (the
familiar objects on the familiar background, new draws) and ``--unfamiliar`` unfamiliar ones:

* ``<kind> alone``: frames holding only objects of an unseen kind (``synthetic.UNSEEN_LABELS`` and ``blob``: a red
  plus sign and a blue crescent in the colours of box and disc, an orange arrow, a purple bar, a yellow star);
* ``<kind> among``: frames holding an unseen object among familiar ones;
* ``<background>``: the familiar objects on a background the training never had (a black and white tiled floor,
  green foliage).

Every frame goes through ``Detector.examine`` at the candidate threshold the pre-annotation asks for
(``uncertainty.candidate_threshold`` of the model's threshold), with the mirrored pass, and each candidate measure
(``uncertainty.MEASURES``, the served one in bold, and rank averages of some) scores it. A measure is judged by how
well its order puts the unfamiliar frames first: AUROC (the chance that an unfamiliar frame ranks above an ordinary
one, ties half) and recall@K (the share of the unfamiliar frames among the K first, K = their number, ties shared
out as a random order among equals would). The cost of the measures (frames per second of ``detect``, ``examine``
and ``examine`` with the mirrored pass) is measured on the same frames.

The default run (3 seeds, 100 steps each) took 47 minutes on 2 cores shared with other heavy work (training 5-18
min per seed, cached for a second run; scoring 5-7 min per seed, most of it the mirrored pass); ``--quick`` (one
seed, 40 steps, small tasks) checks that it runs and says little.

Writes the "Ranking unfamiliar frames first (issue 21)" section of bench/RESULTS.md (``--no-write`` to skip).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import _results  # bench/_results.py: the script's own folder is on sys.path
import numpy as np
import torch
from preannotate import uncertainty
from preannotate.models import ModelStore, hyperparameters_for, load_detector
from preannotate.shapes import Shape
from preannotate.training.recipe import TrainingData, train_and_publish
from preannotate.training.runs import _familiar
from preannotate.training.synthetic import generate

SECTION = "## Ranking unfamiliar frames first (issue 21)"
ARCH = "ssdlite320_mobilenet_v3_large"
FAMILIAR = ("box", "disc", "triangle")
UNSEEN = ("cross", "crescent", "arrow", "bar", "blob")
BACKGROUNDS = ("checker", "foliage")


@dataclass
class Frame:
    """What a candidate measure sees of one frame: its candidate detections and what the detector measured."""

    shapes: list[Shape]
    measured: dict[str, float]


# The candidates are ``uncertainty.MEASURES`` (the served one marked) and, below, rank averages of some of them:
# those need every frame of the task before any is scored (the pre-annotation tags frames as they are done).
RANK_AVERAGES = {
    "rank average of all six (within a task)": ("close call", "class margin", "flip disagreement",
                                                "novelty, early", "novelty, middle", "novelty, deep"),
    "rank average of close call, novelty early, middle (within a task)": ("close call", "novelty, early",
                                                                          "novelty, middle"),
}


def auroc(scores: Sequence[float], unfamiliar: Sequence[bool]) -> float:
    """The chance that an unfamiliar frame scores above an ordinary one (ties count half)."""
    scores, positive = np.asarray(scores, float), np.asarray(unfamiliar, bool)
    above = scores[positive][:, None] - scores[~positive][None, :]
    return float(((above > 0).sum() + 0.5 * (above == 0).sum()) / above.size)


def recall_at_k(scores: Sequence[float], unfamiliar: Sequence[bool]) -> float:
    """The expected share of the unfamiliar frames among the K highest-scoring ones, K = their number, equal scores
    taken in a random order."""
    scores, positive = np.asarray(scores, float), np.asarray(unfamiliar, bool)
    k = int(positive.sum())
    cutoff = np.sort(scores)[::-1][k - 1]
    above, tied = scores > cutoff, scores == cutoff
    places = k - int(above.sum())  # places left in the first K for the frames tied at the cutoff
    found = positive[above].sum() + places * positive[tied].sum() / tied.sum()
    return float(found / k)


def ranks(values: Sequence[float]) -> np.ndarray:
    """Average ranks (0 = lowest), ties sharing theirs."""
    values = np.asarray(values, float)
    order = values.argsort(kind="stable")
    ranked = np.empty(len(values))
    ranked[order] = np.arange(len(values))
    for value in np.unique(values):
        ranked[values == value] = ranked[values == value].mean()
    return ranked


def frames_of(task) -> list[np.ndarray]:
    return [image for _, image in task.images.decoded(sorted(task.annotations.frames))]


def case_frames(kind: str, count: int, seed: int, width: int, height: int) -> list[np.ndarray]:
    """``count`` unfamiliar frames of a case kind (see the module docstring)."""
    if kind in BACKGROUNDS:
        return frames_of(generate(count, width, height, seed=seed, labels=FAMILIAR, empty_fraction=0,
                                  background=kind))
    unseen, where = kind.split()
    if where == "alone":
        return frames_of(generate(count, width, height, seed=seed, labels=(unseen,), empty_fraction=0))
    task = generate(8 * count, width, height, seed=seed, labels=(*FAMILIAR, unseen), objects=(2, 3),
                    empty_fraction=0)
    holding = [number for number, frame in sorted(task.annotations.frames.items())
               if {shape.label for shape in frame.shapes} - {unseen} and unseen in
               {shape.label for shape in frame.shapes}]  # the unseen kind and a familiar one
    return [image for _, image in task.images.decoded(holding[:count])]


def trained(seed: int, args: argparse.Namespace, cache: Path):
    """The seed's detector (trained once per seed and budget), its training sample's appearance read anew."""
    hp_text = f"init=random; num-steps={args.steps}; batch-size={args.batch}; num-validations=1; image-size={args.size}"
    key = hashlib.sha256(json.dumps([ARCH, hp_text, seed, args.train_frames, args.width, args.height]).encode())
    name = f"seed{seed}-{key.hexdigest()[:10]}"
    store = ModelStore(cache / "store")
    task = generate(args.train_frames + 40, args.width, args.height, seed=seed, labels=FAMILIAR)
    items = [(frame, task.images) for frame in task.annotations.frames.values()]
    train_items, val_items = items[40:], items[:40]
    minutes = 0.0
    if store.serving(name) is None:
        started = time.monotonic()
        print(f"training seed {seed}: {hp_text}", flush=True)
        train_and_publish(TrainingData(task.annotations.labels, train_items, val_items), architecture=ARCH,
                          hyperparameters=hyperparameters_for(ARCH, hp_text), store=store, name=name,
                          output_dir=cache / "runs" / name, progress=False, workers=0)
        minutes = (time.monotonic() - started) / 60
    detector = load_detector(store.resolve(name), device="cpu")
    detector.familiar = _familiar(detector, train_items)  # as publishing reads it (the depths read may be newer)
    return detector, hp_text, minutes


def score_case(detector, ordinary: list[np.ndarray], unfamiliar: list[np.ndarray], threshold: float
               ) -> dict[str, tuple[float, float]]:
    """Each candidate's AUROC and recall@K on one task."""
    frames = [Frame(shapes, doubts) for images in (ordinary, unfamiliar)
              for start in range(0, len(images), 16)
              for shapes, doubts in detector.examine(images[start:start + 16],
                                                     uncertainty.candidate_threshold(threshold), flip=True)]
    truth = [False] * len(ordinary) + [True] * len(unfamiliar)
    scores = {name: [measure(frame.shapes, frame.measured, threshold) for frame in frames]
              for name, measure in uncertainty.MEASURES.items()}
    for name, parts in RANK_AVERAGES.items():
        scores[name] = list(np.mean([ranks(scores[part]) for part in parts], axis=0))
    return {name: (auroc(values, truth), recall_at_k(values, truth)) for name, values in scores.items()}


def cost(detector, images: list[np.ndarray], threshold: float, rounds: int = 3) -> dict[str, float]:
    """Frames per second of ``detect``, ``examine`` and ``examine`` with the mirrored pass, batches of 8, best of
    ``rounds``."""
    asked = uncertainty.candidate_threshold(threshold)
    ways = {"detect": lambda batch: detector.detect(batch, asked),
            "examine": lambda batch: detector.examine(batch, asked),
            "examine + flip": lambda batch: detector.examine(batch, asked, flip=True)}
    speeds = {}
    for name, run in ways.items():
        best = float("inf")
        for _ in range(rounds):
            started = time.perf_counter()
            for start in range(0, len(images), 8):
                run(images[start:start + 8])
            best = min(best, time.perf_counter() - started)
        speeds[name] = len(images) / best
    return speeds


def table(results: Mapping[str, Mapping[str, list[tuple[float, float]]]], kinds: Sequence[str], which: int
          ) -> list[str]:
    """A markdown table: candidates × case kinds (mean over seeds), with the group means."""
    groups = {"alone": [k for k in kinds if k.endswith(" alone")], "among": [k for k in kinds if k.endswith(" among")],
              "background": [k for k in kinds if k in BACKGROUNDS]}
    header = ["measure", *kinds, *(f"**{group}**" for group in groups), "**all**"]
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    for name, by_kind in results.items():
        means = {kind: float(np.mean([pair[which] for pair in by_kind[kind]])) for kind in kinds}
        cells = [f"{means[kind]:.2f}" for kind in kinds]
        cells += [f"**{np.mean([means[k] for k in members]):.2f}**" for members in groups.values()]
        cells.append(f"**{np.mean(list(means.values())):.2f}**")
        shown = f"**{name}** (served)" if name == uncertainty.SERVED else name
        lines.append(f"| {shown} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--quick", action="store_true",
                        help="one seed, 40 steps, small tasks: a check that it runs, not a result")
    parser.add_argument("--steps", type=int, default=100, help="training steps per seed (default 100)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=128, help="the detector's square input side (default 128)")
    parser.add_argument("--width", type=int, default=128, help="frame width (default 128)")
    parser.add_argument("--height", type=int, default=96, help="frame height (default 96)")
    parser.add_argument("--train-frames", type=int, default=200)
    parser.add_argument("--ordinary", type=int, default=24, help="ordinary frames per task (default 24)")
    parser.add_argument("--unfamiliar", type=int, default=8, help="unfamiliar frames per task (default 8)")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "preannotate-bench-ranking")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.train_frames, args.ordinary, args.unfamiliar = [1], 40, 60, 8, 4
    torch.set_num_threads(max(1, torch.get_num_threads()))
    started = time.monotonic()
    kinds = [*(f"{unseen} {where}" for where in ("alone", "among") for unseen in UNSEEN), *BACKGROUNDS]
    results: dict[str, dict[str, list[tuple[float, float]]]] = {}
    training_minutes, speeds, hp_text, threshold = [], [], "", 0.5
    for seed in args.seeds:
        detector, hp_text, minutes = trained(seed, args, args.cache)
        training_minutes.append(minutes)
        threshold = detector.manifest.score_threshold
        for index, kind in enumerate(kinds):
            case_seed = 1000 * seed + index
            ordinary = frames_of(generate(args.ordinary, args.width, args.height, seed=case_seed + 500,
                                          labels=FAMILIAR))
            unfamiliar = case_frames(kind, args.unfamiliar, case_seed, args.width, args.height)
            for name, pair in score_case(detector, ordinary, unfamiliar, threshold).items():
                results.setdefault(name, {}).setdefault(kind, []).append(pair)
            if index == 0:
                speeds.append(cost(detector, ordinary + unfamiliar, threshold))
        print(f"seed {seed} scored ({time.monotonic() - started:.0f} s so far)", flush=True)

    machine = _results.machine()
    given = argv if argv is not None else sys.argv[1:]
    speed = {way: float(np.median([s[way] for s in speeds])) for way in speeds[0]}
    trained_now = [m for m in training_minutes if m]
    lines = [
        SECTION, "",
        "Command: `.venv/bin/python bench/ranking.py`" + (f" (`{' '.join(given)}`)" if given else "") + ".", "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores (torch threads: {torch.get_num_threads()}); torch "
        f"{torch.__version__}, Python {machine['python']}; run {machine['date']}, "
        f"{(time.monotonic() - started) / 60:.1f} min in all"
        + (f" (training {', '.join(f'{m:.1f}' for m in trained_now)} min per seed)" if trained_now else
           " (the trained detectors came from the cache)") + ".", "",
        f"Method: per seed ({', '.join(map(str, args.seeds))}), `{ARCH}` from random init trained by "
        f"`train_and_publish` with `{hp_text}` on {args.train_frames} frames of box, disc and triangle "
        f"({args.width}x{args.height}); then per case kind a task of {args.ordinary} ordinary frames and "
        f"{args.unfamiliar} unfamiliar ones, every frame examined at the candidate threshold "
        f"{uncertainty.candidate_threshold(threshold):g} (the model's threshold {threshold:g} x "
        f"{uncertainty.NEAR_MISS:g}). Case kinds: *alone* = only objects of the unseen kind; *among* = an unseen "
        "object among familiar ones; checker, foliage = the familiar objects on an unseen background. Each cell is "
        f"the mean over the {len(args.seeds)} seeds.", "",
        "AUROC (0.5 is a random order):", "", *table(results, kinds, 0), "",
        "Recall@K (K = the unfamiliar frames of the task):", "", *table(results, kinds, 1), "",
        f"Cost on {args.ordinary + args.unfamiliar} frames of {args.width}x{args.height} at input "
        f"{args.size}, batches of 8 (median over seeds): `detect` {speed['detect']:.0f} frames/s, `examine` "
        f"{speed['examine']:.0f} frames/s, `examine` with the mirrored pass {speed['examine + flip']:.0f} frames/s.",
    ]
    _results.publish(SECTION, "\n".join(lines) + "\n", write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
