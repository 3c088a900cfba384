"""Video as tracks, measured as the field measures tracking (issue 22): MOTA, IDF1, identity switches (py-motmetrics)
and the review work, for per-frame shapes against tracks, with ByteTrack's own defaults as the peer.

The registry's default detector is trained briefly from random init on synthetic clips
(``training.synthetic.generate_video``: objects on crossing arcs that enter, leave and hide behind each other). Each
held-out clip (seeds not trained on) is uploaded to the CVAT test double as a *video* task (H.264 chunks) three times
and pre-annotated by ``annotate_task`` with the same detections (the detector's answers are recorded on the first run
and replayed):

* **shapes**: ``as_tracks=False``, one unrelated shape per detection;
* **tracks**: ``as_tracks=True``, our defaults (one box per object, ``tracking.DUPLICATE_IOU``;
  ``tracking.ByteTrackLinker``: ByteTrack starting a track from any detection the model kept, a lost track kept 30
  frames; each run smoothed over ``tracking.SMOOTH_FRAMES``; keyframes where CVAT's interpolation misses by
  IoU < 0.85);
* **peer**: the same pipeline with supervision's ``sv.ByteTrack()`` at its own defaults (activation threshold 0.25,
  matching threshold 0.8, buffer 30, frame rate 30) as the linker (``annotate_task(linker=...)``), fed the served
  detections, as a team would feed it what the model serves.

What CVAT stores is read back through ``cvat.reader.read_task`` (tracks interpolated as CVAT interpolates them) and
scored against the truth. The rows *linked detections* score the linker's output before smoothing and keyframing
(``tracking.follow``): ours after one box per object; the peer's on every served detection, which is what
``sv.ByteTrack()`` gives a team that uses it alone (every detection a keyframe).

Scoring. Boxes are compared after clipping to the frame (a detector cannot see outside it). A truth object less than
``VISIBLE`` visible (hidden behind others) is *don't care*, as MOTChallenge treats its distractors: a box on it is
neither a false positive nor required. Matching at IoU >= 0.5; MOTP is given as the mean IoU of the matches. Shapes
carry no identity, so each counts as its own track: their IDF1 and switches say what a team that wants tracks gets.

Review work (``review_edits``). *To look at*: shapes written, or keyframes written (outside keyframes included: the
reviewer steps through every keyframe). *Edits per 100 object-frames* (of required truth):

* per-frame shapes, counted as issue 21 counts a reviewed frame (``training.edits.review_frame``, after the boxes on
  don't-care objects are left out): delete a false positive, add a missed object, move a box matched at IoU < 0.75;
  a box of the wrong label is a delete and an add. Re-linking shapes into tracks is not counted (a lower bound for a
  team that wants tracks);
* tracks, counted as the CVAT actions that fix them: for each run of consecutive frames where an object is missed or
  its box is off (IoU < 0.75), the keyframes CVAT's interpolation needs to follow the truth over that run within IoU
  0.75 (``tracking.keyframes``: one for a single frame, its first and last and any between where interpolation would
  still miss: a moving object lost for a stretch costs more than one frame); a track with no match at all is deleted
  (1); a run of frames where a matched track shows nothing (a false positive stretch) is ended by one outside
  keyframe (1); each time an object passes to another track is a merge (1), each time a track passes to another
  object a split (1) — a swap of two ids costs 4, as CVAT's split and merge tools would take; a track of the wrong
  label is relabelled once (1), where per-frame shapes pay once per frame.

``--quick`` is a smoke run (fewer steps, frames and seeds); the default trains for about ten minutes on two cores.
Writes the section "Video as tracks (issue 22)" of bench/RESULTS.md (``--no-write`` to skip).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
import tempfile
import time
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import torchvision  # noqa: F401  before anything imports TensorFlow

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import motmetrics as mm  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from _results import machine, publish  # noqa: E402
from cvat_sdk import make_client  # noqa: E402
from preannotate import tracking  # noqa: E402
from preannotate.annotate import annotate_task  # noqa: E402
from preannotate.cvat.reader import read_task  # noqa: E402
from preannotate.models import ModelStore, hyperparameters_for, load_detector  # noqa: E402
from preannotate.shapes import Shape, box_iou  # noqa: E402
from preannotate.training.edits import MOVE_IOU, review_frame, threshold_text  # noqa: E402
from preannotate.training.recipe import TrainingData, train_and_publish  # noqa: E402
from preannotate.training.synthetic import generate_video  # noqa: E402
from scipy.optimize import linear_sum_assignment  # noqa: E402

from tests.cvat_double import CvatDouble  # noqa: E402

SECTION = "## Video as tracks (issue 22)"
ARCH = "ssdlite320_mobilenet_v3_large"
LABELS = ("box", "disc", "triangle")
VISIBLE = 0.25  # a truth object less visible than this is hidden behind others: don't care
MATCH_IOU = 0.5  # a box on an object (MOTChallenge's threshold)
LOOSE_IOU = MOVE_IOU  # a matched box below this is moved (issue 21)
TRAIN_SEEDS = 100  # training clips are seeds 100, 101, ...; test clips the --seeds (0, 1, ...)

logging.getLogger("cvat_sdk").setLevel(logging.ERROR)


class DefaultByteTrack(tracking.ByteTrackLinker):
    """The peer: supervision's ByteTrack with every setting at its default, behind the same ``Linker`` protocol, fed
    the served detections (those scoring ``threshold`` or more), as a team would feed it what the model serves."""

    def __init__(self, threshold: float):
        import supervision as sv

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*ByteTrack.*", category=FutureWarning)
            self.tracker = sv.ByteTrack()
        self._detections = sv.Detections
        self.threshold = threshold

    def assign(self, boxes: np.ndarray, scores: np.ndarray) -> np.ndarray:
        served = np.asarray(scores) >= self.threshold
        ids = np.zeros(len(boxes), dtype=int)
        ids[served] = super().assign(np.asarray(boxes)[served], np.asarray(scores)[served])
        return ids


class Replayed:
    """A detector whose answers are recorded once and replayed after (the same detections for every run), and
    ``log``: each call's answers in call order (the frames of one task, in order)."""

    def __init__(self, detector):
        self.detector, self.answers, self.log = detector, {}, []
        self.labels, self.manifest, self.familiar, self.model = (detector.labels, detector.manifest,
                                                                 detector.familiar, detector.model)

    def detect_scored(self, images, threshold):
        keys = [(hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest(), threshold) for image in images]
        missing = [i for i, key in enumerate(keys) if key not in self.answers]
        if missing:
            for i, answer in zip(missing, self.detector.detect_scored([images[i] for i in missing], threshold),
                                 strict=True):
                self.answers[keys[i]] = answer
        answers = [self.answers[key] for key in keys]
        self.log += answers
        return answers

    def detect(self, images, threshold):
        return [shapes for shapes, _ in self.detect_scored(images, threshold)]

    def appearance(self, images):
        return self.detector.appearance(images)


# ------------------------------------------------------------------------------------------------------ scoring

def clipped(box, width: int, height: int) -> tuple[float, float, float, float]:
    return max(0.0, box[0]), max(0.0, box[1]), min(float(width), box[2]), min(float(height), box[3])


def truth_of(video, width: int, height: int) -> dict[int, list[tuple[int, str, tuple, bool]]]:
    """Frame → (object id, label, box clipped to the frame, required: visible enough) of every object in view."""
    return {n: [(s.track_id, s.label, clipped(s.bbox(), width, height), video.visibility[(n, s.track_id)] >= VISIBLE)
                for s in frame.shapes] for n, frame in video.annotations.frames.items()}


def hypotheses_of(frames: dict[int, list[Shape]], width: int, height: int) -> dict[int, list[tuple]]:
    """Frame → (id, label, box) of stored or linked shapes; a shape without a track id is a track of its own."""
    return {n: [(s.track_id if s.track_id is not None else f"{n}.{i}", s.label, clipped(s.bbox(), width, height))
                for i, s in enumerate(shapes)] for n, shapes in frames.items()}


def match(truth: list[tuple], hypotheses: list[tuple]) -> tuple[list[tuple[int, int, float]], set[int], set[int]]:
    """One frame: (truth index, hypothesis index, IoU) pairs at IoU >= MATCH_IOU (Hungarian, most overlap), the
    unmatched hypotheses that are false positives (those on a don't-care object left out), the required truths
    missed."""
    pairs = []
    if truth and hypotheses:
        overlaps = box_iou([t[2] for t in truth], [h[2] for h in hypotheses])
        rows, cols = linear_sum_assignment(-overlaps)
        pairs = [(r, c, float(overlaps[r, c])) for r, c in zip(rows, cols, strict=True) if overlaps[r, c] >= MATCH_IOU]
    matched_t, matched_h = {p[0] for p in pairs}, {p[1] for p in pairs}
    false = set(range(len(hypotheses))) - matched_h
    missed = {i for i, t in enumerate(truth) if t[3] and i not in matched_t}
    return pairs, false, missed


def mot_metrics(truth: dict, hypotheses: dict) -> dict[str, float]:
    """py-motmetrics over the frames: don't-care objects and the boxes on them are left out first."""
    accumulator = mm.MOTAccumulator(auto_id=True)
    numbers: dict = {}  # hypothesis id → a number (motmetrics takes numbers)
    for frame in sorted(truth):
        objects, boxes = truth[frame], hypotheses.get(frame, [])
        pairs, _, _ = match(objects, boxes)
        on_dont_care = {h for t, h, _ in pairs if not objects[t][3]}
        required = [t for t in objects if t[3]]
        kept = [h for i, h in enumerate(boxes) if i not in on_dont_care]
        distances = 1 - box_iou([t[2] for t in required], [h[2] for h in kept])
        distances[distances > 1 - MATCH_IOU] = np.nan  # no match (motmetrics' iou_matrix needs numpy < 2)
        accumulator.update([t[0] for t in required], [numbers.setdefault(h[0], len(numbers)) for h in kept],
                           distances)
    names = ["mota", "idf1", "num_switches", "motp", "precision", "recall", "num_objects"]
    summary = mm.metrics.create().compute(accumulator, metrics=names, name="run")
    values = {name: float(summary[name].iloc[0]) for name in names}
    values["mean_iou"] = 1 - values.pop("motp")
    return values


def review_edits(truth: dict, hypotheses: dict, tracked: bool) -> Counter:
    """The edits a reviewer makes to turn what arrived into the truth: see the module docstring. ``truth``: frame →
    (object id, label, box, required); ``hypotheses``: frame → (id, label, box); ``tracked``: the ids are tracks
    (else every box is a per-frame shape)."""
    edits: Counter = Counter()
    bad: dict[int, list[tuple[int, tuple]]] = defaultdict(list)  # object → (frame, box) missed or loose
    needed: dict[int, list[int]] = defaultdict(list)  # object → its required frames
    object_ids: dict[int, list] = defaultdict(list)  # object → the tracks it was matched to, frame by frame
    track_objects: dict = defaultdict(list)  # track → the objects it was matched to, frame by frame
    false_frames: dict = defaultdict(list)  # track → frames it shows nothing there
    for frame in sorted(truth):
        objects, boxes = truth[frame], hypotheses.get(frame, [])
        pairs, false, missed = match(objects, boxes)
        if not tracked:
            on_dont_care = {h for t, h, _ in pairs if not objects[t][3]}
            found = review_frame([Shape(label, "rectangle", list(box)) for _, label, box, required in objects
                                  if required],
                                 [Shape(label, "rectangle", list(box)) for h, (_, label, box) in enumerate(boxes)
                                  if h not in on_dont_care])
            edits.update(add=len(found.missed), delete=len(found.false), move=len(found.loose))
            continue
        for t, h, overlap in pairs:
            object_id, label, box, required = objects[t]
            track, track_label, _ = boxes[h]
            object_ids[object_id].append(track)
            track_objects[track].append((object_id, label, track_label))
            if required and overlap < LOOSE_IOU:
                bad[object_id].append((frame, box))
        for t in missed:
            bad[objects[t][0]].append((frame, objects[t][2]))
        for h in false:
            false_frames[boxes[h][0]].append(frame)
        for object_id, _, _, required in objects:
            if required:
                needed[object_id].append(frame)
    if not tracked:
        return +edits
    for object_id, frames in bad.items():  # runs of consecutive required frames to fix: the keyframes they take
        order = {frame: k for k, frame in enumerate(needed[object_id])}
        run: list[tuple[int, tuple]] = []
        for frame, box in [*frames, (None, None)]:
            if run and (frame is None or order[frame] != order[run[-1][0]] + 1):
                shapes = [Shape("object", "rectangle", list(b), frame=f) for f, b in run]
                edits["keyframe"] += len(tracking.keyframes(shapes, min_iou=LOOSE_IOU))
                run = []
            if frame is not None:
                run.append((frame, box))
    for track, frames in false_frames.items():
        if not track_objects.get(track):
            edits["delete track"] += 1
        else:
            edits["hide"] += sum(1 for k, frame in enumerate(frames) if k == 0 or frames[k - 1] != frame - 1)
    for tracks in object_ids.values():
        edits["merge"] += sum(a != b for a, b in zip(tracks, tracks[1:], strict=False))
    for seen in track_objects.values():
        objects = [object_id for object_id, _, _ in seen]
        edits["split"] += sum(a != b for a, b in zip(objects, objects[1:], strict=False))
        truth_label = Counter(label for _, label, _ in seen).most_common(1)[0][0]
        edits["relabel"] += seen[0][2] != truth_label
    return +edits


# --------------------------------------------------------------------------------------------------------- run

def train(args, work: Path):
    """The registry's default detector from random init on clips of the training seeds; its published directory."""
    items, labels = [], None
    for k in range(args.train_clips):
        video = generate_video(num_frames=args.frames, seed=TRAIN_SEEDS + k, labels=LABELS, objects=args.objects)
        labels = video.annotations.labels
        items += [(frame, video.images) for frame in video.annotations.frames.values()]
    val = items[::10]
    train_items = [item for k, item in enumerate(items) if k % 10]
    hp = hyperparameters_for(ARCH, f"init=random; num-steps={args.steps}; batch-size={args.batch}; "
                                   "num-validations=1")
    result = train_and_publish(TrainingData(labels, train_items, val), architecture=ARCH, hyperparameters=hp,
                               store=ModelStore(work / "store"), name="tracking", output_dir=work / "run",
                               progress=False)
    return result, len(train_items)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 600; --quick 120)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--train-clips", type=int, default=4, help="training clips (default 4)")
    parser.add_argument("--frames", type=int, default=120, help="frames per clip (default 120)")
    parser.add_argument("--objects", type=int, default=6, help="objects per clip (default 6)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="test clips (default 0-4; --quick 0 1)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 120 steps, 2 clips of 60 frames")
    parser.add_argument("--model", type=Path, default=None,
                        help="a published model directory to test instead of training one (the same weights across "
                             "runs: e.g. one published by an earlier run's train, kept)")
    parser.add_argument("--no-write", action="store_true", help="print, do not touch bench/RESULTS.md")
    args = parser.parse_args(argv)
    if args.quick:
        args.train_clips, args.frames = 2, 60
    args.seeds = args.seeds if args.seeds is not None else [0, 1] if args.quick else [0, 1, 2, 3, 4]
    args.steps = args.steps or (120 if args.quick else 600)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-tracking-") as tmp:
        work = Path(tmp)
        t0 = time.monotonic()
        result, trained_on = (None, None) if args.model else train(args, work)
        training_minutes = (time.monotonic() - t0) / 60
        detector = Replayed(load_detector(args.model or result.path))
        print(f"model ready in {training_minutes:.1f} min: validation {detector.manifest.metrics}", flush=True)
        threshold = threshold_text({label.name: detector.manifest.threshold_of(label.name)
                                    for label in detector.labels})
        rows = evaluate(args, detector, work)
    text = report(args, argv, rows, detector.manifest, trained_on, training_minutes, threshold,
                  time.monotonic() - started)
    publish(SECTION, text, write=not args.no_write)
    return 0


def evaluate(args, detector: Replayed, work: Path) -> dict[str, list]:
    """Each method's per-seed (metrics, edits, looked at, object-frames, tracks) on the test clips ``args.seeds``."""
    rows: dict[str, list] = defaultdict(list)
    with CvatDouble() as double, make_client(double.base_url, credentials=double.credentials) as client:
        for seed in args.seeds:
            video = generate_video(num_frames=args.frames, seed=seed, labels=LABELS, objects=args.objects)
            any_frame = video.annotations.frames[0]
            width, height = any_frame.width, any_frame.height
            truth = truth_of(video, width, height)
            required = sum(t[3] for objects in truth.values() for t in objects)
            clip = [(f.name, video.images.files[n], width, height) for n, f in video.annotations.frames.items()]
            for method in ("shapes", "tracks", "peer"):
                task = double.add_task(f"{method}-{seed}", clip, [{"name": n, "type": "any"} for n in LABELS],
                                       video="clip.mp4")
                detector.log = []
                annotate_task(client, task, detector=detector, as_tracks=method != "shapes",
                              linker=DefaultByteTrack if method == "peer" else tracking.ByteTrackLinker,
                              state_dir=work / "state", cache_dir=work / "chunks", progress=False)
                stored = double.annotations(task)
                looked_at = (len(stored["shapes"]) if method == "shapes"
                             else sum(len(track["shapes"]) for track in stored["tracks"]))
                frames = {n: [s for s in f.shapes if s.label in LABELS]
                          for n, f in read_task(client, task).frames.items()}
                hypotheses = hypotheses_of(frames, width, height)
                rows[method].append((mot_metrics(truth, hypotheses),
                                     review_edits(truth, hypotheses, tracked=method != "shapes"), looked_at,
                                     required, len(stored["tracks"])))
                if method == "shapes":  # the detections every run wrote, frame by frame, each at its label's
                    served = detector.manifest.threshold_of
                    detections = {n: [s for s in shapes if s.score is None or s.score >= served(s.label)]
                                  for n, (shapes, _) in zip(sorted(video.annotations.frames), detector.log,
                                                            strict=True)}
            lowest = detector.manifest.lowest_threshold()
            for method, linker in (("linked: tracks", tracking.ByteTrackLinker(lowest)),
                               ("linked: peer", DefaultByteTrack(lowest))):
                overlap = tracking.DUPLICATE_IOU if method == "linked: tracks" else 1.01  # the peer: every box
                hypotheses = hypotheses_of(tracking.follow(detections, linker, overlap=overlap), width, height)
                rows[method].append((mot_metrics(truth, hypotheses), review_edits(truth, hypotheses, True),
                                     None, required, None))
            for method, tracked in (("scratch: shapes", False), ("scratch: tracks", True)):
                rows[method].append((mot_metrics(truth, {}), review_edits(truth, {}, tracked), None, required,
                                     None))
            print(f"seed {seed}: " + ", ".join(
                f"{m} MOTA {r[-1][0]['mota']:.3f} IDF1 {r[-1][0]['idf1']:.3f} edits "
                f"{100 * sum(r[-1][1].values()) / r[-1][3]:.1f}" for m, r in rows.items()), flush=True)
    return rows


NAMES = {"shapes": "per-frame shapes (`as_tracks=False`)", "tracks": "**tracks, ours** (`as_tracks=True`)",
         "peer": "tracks, peer: `sv.ByteTrack()` defaults", "linked: tracks": "linked detections, ours (before "
         "smoothing and keyframes)", "linked: peer": "`sv.ByteTrack()` defaults alone (every served detection, each "
         "a keyframe)",
         "scratch: shapes": "nothing arrives: drawn as shapes", "scratch: tracks": "nothing arrives: drawn as tracks "
         "(the truth's keyframes at IoU 0.75)"}


def report(args, argv, rows, manifest, trained_on, training_minutes, threshold, seconds) -> str:
    info = machine()
    given = argv if argv is not None else sys.argv[1:]
    hp = manifest.hyperparameters
    model = (f"`{ARCH}` from random init, {args.steps} steps of batch {args.batch} ({training_minutes:.1f} min) on "
             f"{trained_on} frames of {args.train_clips} synthetic clips (seeds {TRAIN_SEEDS}-"
             f"{TRAIN_SEEDS + args.train_clips - 1}" if args.model is None else
             f"`{manifest.architecture}` given with `--model` (published by this script's `train` in an earlier run: "
             f"random init, {hp.get('num_steps', hp.get('num-steps', '?'))} steps of batch "
             f"{hp.get('batch_size', hp.get('batch-size', '?'))}")
    lines = [
        SECTION, "",
        "Command: `.venv/bin/python bench/tracking.py`" + (f" (`{' '.join(given)}`)" if given else "") + ".", "",
        f"Machine: {info['cpu']}, {info['cores']} cores (torch threads: {torch.get_num_threads()}); torch "
        f"{torch.__version__}, motmetrics {mm.__version__}, Python {info['python']}; run {info['date']}, "
        f"{seconds:.0f} s in all.", "",
        f"Method: see `bench/tracking.py`'s docstring. {model}; validation mAP@.5 "
        f"{manifest.metrics.get('map50')}), served {threshold}. Test clips: seeds "
        f"{', '.join(map(str, args.seeds))}, {args.frames} frames of 320x240 each, {args.objects} objects on crossing "
        f"arcs (labels {', '.join(LABELS)}), each uploaded as a video task (one job) to the CVAT double and "
        f"pre-annotated by `annotate_task`; every method gets the same detections. Objects less than {VISIBLE:.0%} "
        f"visible are don't care; matches at IoU >= {MATCH_IOU}; MOTP as the matches' mean IoU.", "",
        "All seeds together (MOT metrics over every frame of every clip; edits summed):", "",
        "| what CVAT stores | MOTA | IDF1 | ID switches | MOTP (IoU) | precision | recall | to look at | tracks | "
        "edits / 100 object-frames | edits |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for method, runs in rows.items():
        objects = sum(r[3] for r in runs)
        weight = [r[0]["num_objects"] for r in runs]
        mean = {k: np.average([r[0][k] for r in runs], weights=weight) for k in runs[0][0]}  # nan: no boxes
        switches = sum(int(r[0]["num_switches"]) for r in runs)
        edits = sum((r[1] for r in runs), Counter())
        looked = "–" if runs[0][2] is None else str(sum(r[2] for r in runs))
        tracks = "–" if runs[0][4] is None else str(sum(r[4] for r in runs))
        lines.append(f"| {NAMES[method]} | {mean['mota']:.3f} | {mean['idf1']:.3f} | {switches} | "
                     f"{mean['mean_iou']:.3f} | {mean['precision']:.3f} | {mean['recall']:.3f} | {looked} | {tracks} | "
                     f"{100 * sum(edits.values()) / objects:.1f} | "
                     f"{', '.join(f'{k} {v}' for k, v in sorted(edits.items()) if v)} |")
    lines += ["", f"Required object-frames: {sum(r[3] for r in rows['shapes'])} over {len(args.seeds)} clips. "
              "MOTA, IDF1, MOTP, precision and recall are per-clip values weighted by the clip's object-frames.", "",
              "Per clip (MOTA / IDF1 / edits per 100 object-frames):", "",
              "| seed | " + " | ".join(NAMES[m] for m in rows) + " |",
              "|---:|" + "---|" * len(rows)]
    for k, seed in enumerate(args.seeds):
        cells = [f"{run[0]['mota']:.3f} / {run[0]['idf1']:.3f} / {100 * sum(run[1].values()) / run[3]:.1f}"
                 for run in (runs[k] for runs in rows.values())]
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
