"""Review work as the headline figure (issue 21): the edits a reviewer makes on what pre-annotation stored.

The registry's default detector (``ssdlite320_mobilenet_v3_large``) is trained from random init on a synthetic
task, as ``make demo`` trains it (``--frames`` frames of 320x240, ``--steps`` steps), and published: publishing
chooses each label's served threshold on the run's validation frames (``training.edits``). A held-out synthetic task
(another seed, ``--held-out`` frames) is put into the CVAT test double (``tests/cvat_double.py``) twice and
pre-annotated the way the function's own pre-annotation runs (``annotate_task`` with the loaded model, only frames no
one annotated, confidence tags): once with no threshold (each label at its served threshold) and once at 0.5 for
every label (what every model was served at before). The shapes CVAT stored are read back (``cvat.reader``) and
compared with the held-out truth by ``training.edits.count_edits``: adds (objects missed), deletes (shapes matching
no object), moves (matches below IoU 0.75), per 100 true objects; drawing every object from scratch is 100.

The section "Review work (issue 21)" of bench/RESULTS.md is rewritten. The default run trains 120 steps, as
``make demo`` does (about 2 minutes on 2 idle cores; 38 measured on 2 cores shared with other heavy work);
``--quick`` (fewer frames and steps, nothing written) checks that it runs.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torchvision  # noqa: F401  before anything imports TensorFlow

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from _results import machine, publish  # noqa: E402
from cvat_sdk import make_client  # noqa: E402
from preannotate.annotate import annotate_task  # noqa: E402
from preannotate.cvat.reader import read_task  # noqa: E402
from preannotate.demo import DEFAULT_ARCHITECTURE, DEFAULT_HYPERPARAMETERS  # noqa: E402
from preannotate.models import ModelStore, hyperparameters_for, load_model  # noqa: E402
from preannotate.training import data  # noqa: E402
from preannotate.training.edits import Edits, count_edits  # noqa: E402
from preannotate.training.recipe import TrainingData, train_and_publish  # noqa: E402
from preannotate.training.synthetic import generate  # noqa: E402

from tests.cvat_double import CvatDouble  # noqa: E402

SECTION = "## Review work (issue 21)"
QUICK = (60, 30, 20)  # frames, steps, held-out frames of --quick
WIDTH, HEIGHT = 320, 240


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def frames_of(task) -> list[tuple[str, bytes, int, int]]:
    numbers = sorted(task.annotations.frames)
    return [(task.annotations.frames[n].name, encoded, WIDTH, HEIGHT)
            for n, encoded in task.images.encoded(numbers)]


def stored_edits(client, task_id: int, truth) -> dict[str, Edits]:
    """Each label's edits between what the task holds now and the truth (frames by number)."""
    stored = read_task(client, task_id).frames
    numbers = sorted(truth.annotations.frames)
    return count_edits([truth.annotations.frames[n].shapes for n in numbers],
                       [stored[n].shapes if n in stored else [] for n in numbers])


def row(name: str, found: dict[str, Edits]) -> str:
    whole = sum(found.values(), Edits())
    return (f"| {name} | {whole.objects} | {whole.adds} | {whole.deletes} | {whole.moves} | {whole.total} | "
            f"**{whole.per_100:.1f}** |")


def verdict(found: dict[str, dict[str, Edits]], validation: dict) -> str:
    """Whether the served thresholds saved edits over 0.5 on the held-out task, which labels made the difference,
    and what the validation frames they were chosen on said (how many edits each choice rested on)."""
    served, half = (sum(found[name].values(), Edits()) for name in ("served", "0.5"))
    change = served.total - half.total
    said = ("fewer" if change < 0 else "more") if change else "as many"
    labels = []
    for label in sorted(set(found["served"]) | set(found["0.5"])):
        a, b = found["served"].get(label, Edits()), found["0.5"].get(label, Edits())
        parts = [f"{n:+d} {what}" for n, what in ((a.adds - b.adds, "adds"), (a.deletes - b.deletes, "deletes"),
                                                   (a.moves - b.moves, "moves")) if n]
        if parts:
            labels.append(f"{label} {', '.join(parts)}")
    at_them, at_half = validation.get("served") or {}, validation.get("at_score_threshold") or {}
    return (f"**The served thresholds needed {said} edits than 0.5 on the held-out task** ({served.total} against "
            f"{half.total}{'; ' + '; '.join(labels) if labels else ''}). On the validation frames they were chosen "
            f"on ({validation.get('frames', 0)} frames, {at_them.get('objects', 0)} objects) they needed "
            f"{at_them.get('edits', '?')} edits against {at_half.get('edits', '?')} at 0.5 "
            f"({at_them.get('per_100', float('nan')):.1f} and {at_half.get('per_100', float('nan')):.1f} per 100).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=200, help="frames to train and validate on (default 200)")
    parser.add_argument("--steps", type=int, default=120, help="training steps (default 120, as make demo)")
    parser.add_argument("--held-out", type=int, default=60, help="frames of the held-out task (default 60)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the training task (the held-out one: +1000)")
    parser.add_argument("--no-write", action="store_true", help="print, do not touch bench/RESULTS.md")
    parser.add_argument("--quick", action="store_true",
                        help=f"--frames {QUICK[0]} --steps {QUICK[1]} --held-out {QUICK[2]}, and --no-write: a check "
                             "that it runs (a few minutes on 2 busy cores), not figures to quote")
    args = parser.parse_args()
    if args.quick:
        args.frames, args.steps, args.held_out = QUICK
        args.no_write = True
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="bench-review-work-"))
    hp_text = f"{DEFAULT_HYPERPARAMETERS}; num-steps={args.steps}"
    try:
        seen = generate(args.frames, width=WIDTH, height=HEIGHT, seed=args.seed)
        labels = seen.annotations.labels
        train_items, val_items = data.split_task(seen.annotations, seen.images, val_fraction=0.15, seed=args.seed)
        store = ModelStore(work / "store")
        hp = hyperparameters_for(DEFAULT_ARCHITECTURE, hp_text)
        say(f"training {DEFAULT_ARCHITECTURE} for {args.steps} steps on {len(train_items)} frames "
            f"({len(val_items)} to validate on); on 2 cores shared with other work this is the long part")
        result = train_and_publish(TrainingData(labels, train_items, val_items), architecture=DEFAULT_ARCHITECTURE,
                                   hyperparameters=hp, store=store, name="shapes", output_dir=work / "run",
                                   progress=False)
        trained = time.monotonic() - started
        detector = load_model("shapes", store)
        manifest = detector.manifest
        served = manifest.served_thresholds()
        validation = manifest.metrics.get("review") or {}

        held_out = generate(args.held_out, width=WIDTH, height=HEIGHT, seed=args.seed + 1000)
        task_labels = [{"name": label.name, "type": "any"} for label in labels]  # boxes go into any label
        found = {}
        with CvatDouble() as double, make_client(double.base_url, credentials=double.credentials) as client:
            for name, threshold in (("served", None), ("0.5", 0.5)):
                say(f"pre-annotating the held-out task ({args.held_out} frames) "
                    + ("at the served thresholds" if threshold is None else f"at {threshold} for every label"))
                task_id = double.add_task(f"held-out-{name}", frames_of(held_out), task_labels)
                annotate_task(client, task_id, detector=detector, threshold=threshold, only_unannotated=True,
                              progress=False, state_dir=work / "journal", cache_dir=work / "chunks" / name)
                found[name] = stored_edits(client, task_id, held_out)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    info = machine()
    minutes = (time.monotonic() - started) / 60
    objects = sum(found["served"].values(), Edits()).objects
    thresholds = ", ".join(f"{name} ≥ {value:.2g}" for name, value in served.items())
    per_label = ["| label | true objects | served threshold | edits per 100 at it | at 0.5 |",
                 "|---|---:|---:|---:|---:|"]
    for label in labels:
        at_served, at_half = found["served"].get(label.name, Edits()), found["0.5"].get(label.name, Edits())
        fmt = (lambda e: "–" if e.per_100 is None else f"{e.per_100:.1f}")  # noqa: E731
        per_label.append(f"| {label.name} | {at_served.objects} | {served[label.name]:.2g} | {fmt(at_served)} | "
                         f"{fmt(at_half)} |")
    text = "\n".join([
        SECTION, "",
        f"Machine: {info['cpu']}, {info['cores']} cores, Python {info['python']}; run {info['date']}, "
        f"{minutes:.1f} min in all ({trained / 60:.1f} training). Command: `.venv/bin/python bench/review_work.py` "
        f"(`--frames {args.frames} --steps {args.steps} --held-out {args.held_out} --seed {args.seed}`).", "",
        f"Model: `{DEFAULT_ARCHITECTURE}` from random init, `{hp_text}`, on {len(train_items)} synthetic "
        f"{WIDTH}x{HEIGHT} frames ({len(val_items)} more to validate on and choose the thresholds: {thresholds}); "
        f"validation mAP@.5 {result.metrics.get('map50') or 0:.3f}. Held out: a task of {args.held_out} frames of "
        f"another seed ({objects} objects) in the CVAT test double, pre-annotated by `annotate_task` as the "
        "function's own pre-annotation runs it; what CVAT stored compared with the truth by "
        "`training.edits.count_edits` (adds: objects missed; deletes: shapes matching no object at IoU 0.5; moves: "
        "matches below IoU 0.75; each counts 1).", "",
        "| pre-annotation | true objects | adds | deletes | moves | edits | edits per 100 objects |",
        "|---|---:|---:|---:|---:|---:|---:|",
        row("served thresholds (chosen per label at publishing)", found["served"]),
        row("0.5 for every label (before)", found["0.5"]),
        f"| annotating from scratch | {objects} | {objects} | 0 | 0 | {objects} | **100.0** |", "",
        *per_label, "",
        verdict(found, validation),
    ])
    publish(SECTION, text, write=not args.no_write)


if __name__ == "__main__":
    main()
