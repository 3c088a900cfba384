"""The whole loop on one machine, no CVAT, no GPU, no download: what ``make demo`` shows.

A generated annotated "task" (``synthetic``) is split into training and validation frames; a detector is trained
from scratch on the CPU and published into a store; the published version is then served through the very Nuclio
handler a function runs (``serving.nuclio`` on nuclio_sdk's test platform) and pre-annotates frames held out from
everything. Their predictions are scored against the generated ground truth (COCO mAP in the frames' own pixels,
exactly what CVAT would receive) and written as COCO results beside their COCO ground truth, with a grid of
held-out frames showing truth and detections, and the training run's own report.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from preannotate.formats import coco
from preannotate.models import Manifest, ModelStore, hyperparameters_for
from preannotate.shapes import FrameAnnotations
from preannotate.training import data, report
from preannotate.training.edits import Edits, count_edits
from preannotate.training.evaluation import coco_metrics, score_text
from preannotate.training.recipe import TrainingData, train_and_publish
from preannotate.training.synthetic import generate

DEFAULT_ARCHITECTURE = "ssdlite320_mobilenet_v3_large"
# From scratch on 2 CPU cores, with the registry's from-scratch defaults: about 0.95 mAP@.5 on the held-out frames in
# about two minutes of an idle machine (batch norms re-measured before each validation is what makes so short
# a run usable; see evaluation.recalibrate_batch_norm).
DEFAULT_HYPERPARAMETERS = "init=random; batch-size=8; num-validations=3"
GRID_FRAMES = 12  # held-out frames in demo.png, those with the most objects


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def serve_and_annotate(store: ModelStore, name: str, frames: list[tuple[FrameAnnotations, bytes]],
                       threshold: float | None = None) -> list[FrameAnnotations]:
    """Each frame sent to the Nuclio handler as CVAT sends it (with no threshold, as CVAT's menu does when its
    field is left empty: each label at its served threshold); the shapes it answers, per frame."""
    import nuclio_sdk
    import nuclio_sdk.test

    from preannotate.serving import contract, nuclio

    with _environment(PREANNOTATE_MODEL=name, PREANNOTATE_MODEL_STORE=str(store.root)):
        platform = nuclio_sdk.test.Platform()
        # The test platform prints every INFO line twice (its own handler, and ours through propagation) and its
        # logger skips level checks: only its handlers' levels keep the chatter out, warnings still shown.
        chatter = logging.getLogger("mock_platform")
        chatter.propagate = False
        for output in chatter.handlers:
            output.setLevel(logging.WARNING)
        answered = []
        for frame, image in frames:
            body = {"image": base64.b64encode(image).decode("ascii"),
                    **({"threshold": threshold} if threshold is not None else {})}
            response = platform.call_handler(nuclio.handler, nuclio_sdk.Event(
                body=body, content_type="application/json", method="POST", path="/", headers={}))
            if response.status_code != 200:
                raise RuntimeError(f"the function answered {response.status_code}: {response.body}")
            shapes = contract.response_to_shapes(json.loads(response.body), frame.frame)
            answered.append(FrameAnnotations(frame.frame, frame.width, frame.height, frame.name, shapes))
    return answered


def _synthetic(frames: int, held_out: int, seed: int, say: Callable[[str], None]):
    task = generate(frames + held_out, width=320, height=240, seed=seed)
    labels = task.annotations.labels
    held = dict(list(task.annotations.frames.items())[-held_out:])
    annotations = type(task.annotations)(frames={k: v for k, v in task.annotations.frames.items() if k not in held},
                                         labels=labels)
    train_items, val_items = data.split_task(annotations, task.images, val_fraction=0.15, seed=seed)
    say(f"generated a task of {frames + held_out} frames (labels: {', '.join(label.name for label in labels)}): "
        f"{len(train_items)} to train on, {len(val_items)} to validate on, {held_out} held out")
    held_frames = list(held.values())
    return labels, train_items, val_items, held_frames, dict(task.images.encoded([f.frame for f in held_frames]))


def _from_cvat(task: int, output: Path, seed: int, say: Callable[[str], None]):
    from preannotate.cvat.client import connect
    from preannotate.training.recipe import cvat_provenance, export_from_cvat

    # A demo task need not have finished jobs: every shape people made counts (never the model's own auto ones).
    hp = hyperparameters_for(DEFAULT_ARCHITECTURE, f"val-fraction=0.2; seed={seed}; train-on=all")
    with connect() as client:
        dataset = export_from_cvat(client, {"tasks": [task]}, output / "dataset", hp)
    split = TrainingData.from_folder(dataset, hp)
    say(f"exported CVAT task {task}: {len(split.train)} frames to train on, {len(split.val)} to validate and "
        "pre-annotate")
    held_frames = [frame for frame, _ in split.val]
    images = {frame.frame: next(image.encoded([frame.frame]))[1] for frame, image in split.val}
    return split.labels, split.train, split.val, held_frames, images, cvat_provenance(dataset)


def run_demo(output: str | Path, *, architecture: str = DEFAULT_ARCHITECTURE, steps: int = 120,
             frames: int = 200, held_out: int = 40, seed: int = 0, hyperparameters: str = "",
             progress: bool = True, say: Callable[[str], None] = print, task: int | None = None,
             restart: bool = False) -> dict[str, Any]:
    """Generate, train, publish, serve, pre-annotate, score; everything lands in ``output`` (store included).
    With ``task`` (a CVAT task id; ``CVAT_URL`` and credentials from the environment) the frames come from that
    task instead: its validation frames (a fifth) are the ones pre-annotated and scored. A finished run in
    ``output`` is reused (and said so) unless ``restart``. Returns what it printed as a dict."""
    output = Path(output)
    started = time.monotonic()
    if restart and output.exists():
        shutil.rmtree(output)
    finished = (output / "run" / "result.json").is_file()
    if task is None:
        labels, train_items, val_items, held_frames, images = _synthetic(frames, held_out, seed, say)
        provenance: dict[str, Any] = {"synthetic": {"seed": seed, "frames": frames + held_out}}
    else:
        labels, train_items, val_items, held_frames, images, provenance = _from_cvat(task, output, seed, say)
    held_out = len(held_frames)
    store = ModelStore(output / "store")
    hp = hyperparameters_for(architecture, f"{DEFAULT_HYPERPARAMETERS}; num-steps={steps}; {hyperparameters}")
    if finished:  # the same run, finished before: training returns its result at once
        say(f"{output} holds a finished demo run: reusing its model (`preannotate demo --restart` or "
            "`make demo RESTART=1` trains anew)")
    else:
        recipe = hp.recipe
        say(f"training {architecture} from random weights for {recipe.num_steps} steps of {recipe.batch_size} frames "
            f"({recipe.optimizer}, {recipe.schedule} to {recipe.initial_learning_rate:g}; validating "
            f"{recipe.num_validations} times)")
    result = train_and_publish(TrainingData(labels, train_items, val_items), architecture=architecture,
                               hyperparameters=hp, store=store, name="demo", output_dir=output / "run",
                               provenance=provenance, progress=progress)
    say(f"trained {architecture} for {result.steps} steps; published demo@{result.version} "
        f"(validation mAP@.5 {score_text(result.metrics.get('map50'))}) in {store.root}")

    if result.report:
        say(f"training report: {', '.join(str(path) for path in result.report)}")

    predicted = serve_and_annotate(store, "demo", [(f, images[f.frame]) for f in held_frames])
    truth = coco.to_coco([(f, f.name) for f in held_frames], labels)
    results = coco.to_results(list(enumerate(predicted, start=1)), labels)
    metrics = coco_metrics(truth, [{k: v for k, v in r.items() if k != "segmentation"} for r in results], labels)
    (output / "predictions.json").write_text(json.dumps(results))
    (output / "ground_truth.json").write_text(json.dumps(truth))  # what predictions.json is scored against
    held = output / "held-out"  # the frames themselves, for trying the model on them (README: quick try)
    held.mkdir(exist_ok=True)
    for frame in held_frames:
        (held / Path(frame.name).name).write_bytes(images[frame.frame])
    served = Manifest.read(store.path("demo", result.version)).served_thresholds()
    work = sum(count_edits([f.shapes for f in held_frames], [f.shapes for f in predicted]).values(), Edits())
    shown = sorted(range(len(held_frames)), key=lambda i: -len(held_frames[i].shapes))[:GRID_FRAMES]
    report.prediction_grid([(images[held_frames[i].frame], held_frames[i], predicted[i]) for i in sorted(shown)],
                           output / "demo.png", labels=labels,
                           title=f"demo@{result.version} served through the Nuclio handler, detections "
                                 f"{report.threshold_text(served)}: held-out frames; {work.per_100 or 0:.0f} review "
                                 f"edits per 100 true objects ({work.adds} missed, {work.deletes} false, "
                                 f"{work.moves} loose)")
    summary = {"version": result.version, "steps": result.steps, "validation": result.metrics.get("map50"),
               "map": metrics["map"], "map50": metrics["map50"], "per_class": metrics["per_class"],
               "thresholds": served, "edits": work.to_dict(),
               "predictions": str(output / "predictions.json"), "ground_truth": str(output / "ground_truth.json"),
               "picture": str(output / "demo.png"), "report": [str(path) for path in result.report],
               "minutes": round((time.monotonic() - started) / 60, 1)}
    per_class = ", ".join(f"{name} {score_text(values['ap50'])}" for name, values in metrics["per_class"].items())
    say(f"served demo@{result.version} through the Nuclio handler on {held_out} held-out frames "
        f"({report.threshold_text(served)}): mAP@.5 {score_text(metrics['map50'])}, mAP@[.5:.95] "
        f"{score_text(metrics['map'])}; AP@.5 per class: {per_class}; a reviewer would make "
        f"{work.per_100 or 0:.0f} edits per 100 true objects ({work.adds} adds, {work.deletes} deletes, "
        f"{work.moves} moves; drawing them all from scratch is 100)")
    say(f"predictions (COCO results): {summary['predictions']}, scored against {summary['ground_truth']}; "
        f"picture: {summary['picture']}; {summary['minutes']} min in all")
    return summary
