"""The whole loop on one machine, no CVAT, no GPU, no download: what ``make demo`` shows.

A generated annotated "task" (``synthetic``) is split into training and validation frames; a detector is trained
from scratch on the CPU and published into a store; the published version is then served through the very Nuclio
handler a function runs (``serving.nuclio`` on nuclio_sdk's test platform) and pre-annotates frames held out from
everything. Their predictions are scored against the generated ground truth (COCO mAP in the frames' own pixels,
exactly what CVAT would receive) and written as COCO results, with a picture of one frame and its detections.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from preannotate.formats import coco
from preannotate.models import ModelStore, hyperparameters_for
from preannotate.shapes import FrameAnnotations
from preannotate.training import data
from preannotate.training.evaluation import coco_metrics
from preannotate.training.recipe import TrainingData, train_and_publish
from preannotate.training.synthetic import COLOURS, generate

DEFAULT_ARCHITECTURE = "ssdlite320_mobilenet_v3_large"
# From scratch on 2 CPU cores, with the registry's from-scratch defaults: about 0.9 mAP@.5 on the held-out frames in
# a few minutes (batch norms re-measured before each validation is what makes so short a run usable; see
# evaluation.recalibrate_batch_norm).
DEFAULT_HYPERPARAMETERS = "init=random; batch-size=8; num-validations=3"


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
                       threshold: float = 0.3) -> list[FrameAnnotations]:
    """Each frame sent to the Nuclio handler as CVAT sends it; the shapes it answers, per frame."""
    import nuclio_sdk
    import nuclio_sdk.test

    from preannotate.serving import contract, nuclio

    with _environment(PREANNOTATE_MODEL=name, PREANNOTATE_MODEL_STORE=str(store.root)):
        platform = nuclio_sdk.test.Platform()
        answered = []
        for frame, image in frames:
            body = {"image": base64.b64encode(image).decode("ascii"), "threshold": threshold}
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

    hp = hyperparameters_for(DEFAULT_ARCHITECTURE, f"val-fraction=0.2; seed={seed}")
    with connect() as client:
        dataset = export_from_cvat(client, {"tasks": [task]}, output / "dataset", hp)
    split = TrainingData.from_folder(dataset, hp)
    say(f"exported CVAT task {task}: {len(split.train)} frames to train on, {len(split.val)} to validate and "
        "pre-annotate")
    held_frames = [frame for frame, _ in split.val]
    images = {frame.frame: next(image.encoded([frame.frame]))[1] for frame, image in split.val}
    return split.labels, split.train, split.val, held_frames, images, cvat_provenance(dataset)


def picture(image: bytes, truth: FrameAnnotations, predicted: FrameAnnotations) -> Image.Image:
    """The frame with its ground truth (thin white) and the detections (label colour, with label and score)."""
    canvas = Image.open(io.BytesIO(image)).convert("RGB")
    scale = max(1, 640 // canvas.width)
    canvas = canvas.resize((canvas.width * scale, canvas.height * scale), Image.NEAREST)
    draw = ImageDraw.Draw(canvas)
    for shape in truth.shapes:
        draw.rectangle([v * scale for v in shape.bbox()], outline=(255, 255, 255), width=1)
    for shape in predicted.shapes:
        x1, y1, x2, y2 = (v * scale for v in shape.bbox())
        colour = tuple(255 - c // 3 for c in COLOURS.get(shape.label, (0, 0, 0)))
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=3)
        draw.text((x1 + 3, y1 + 2), f"{shape.label} {shape.score or 0:.2f}", fill=colour)
    return canvas


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
    if (output / "run" / "result.json").is_file():
        say(f"{output} holds a finished demo run: reusing its model (`preannotate demo --restart` or "
            "`make demo RESTART=1` trains anew)")
    if task is None:
        labels, train_items, val_items, held_frames, images = _synthetic(frames, held_out, seed, say)
        provenance: dict[str, Any] = {"synthetic": {"seed": seed, "frames": frames + held_out}}
    else:
        labels, train_items, val_items, held_frames, images, provenance = _from_cvat(task, output, seed, say)
    held_out = len(held_frames)
    store = ModelStore(output / "store")
    hp = hyperparameters_for(architecture, f"{DEFAULT_HYPERPARAMETERS}; num-steps={steps}; {hyperparameters}")
    say(f"training {architecture} from random weights for {hp.num_steps} steps of {hp.batch_size} frames "
        f"({hp.optimizer}, {hp.schedule} to {hp.initial_learning_rate:g}; validating {hp.num_validations} times)")
    result = train_and_publish(TrainingData(labels, train_items, val_items), architecture=architecture,
                               hyperparameters=hp, store=store, name="demo", output_dir=output / "run",
                               provenance=provenance, progress=progress)
    say(f"trained {architecture} for {result.steps} steps; published demo@{result.version} "
        f"(validation mAP@.5 {result.metrics.get('map50')}) in {store.root}")

    predicted = serve_and_annotate(store, "demo", [(f, images[f.frame]) for f in held_frames])
    truth = coco.to_coco([(f, f.name) for f in held_frames], labels)
    results = coco.to_results(list(enumerate(predicted, start=1)), labels)
    metrics = coco_metrics(truth, [{k: v for k, v in r.items() if k != "segmentation"} for r in results], labels)
    (output / "predictions.json").write_text(json.dumps(results))
    shown = max(range(len(held_frames)), key=lambda i: len(held_frames[i].shapes))
    picture(images[held_frames[shown].frame], held_frames[shown], predicted[shown]).save(output / "demo.png")
    summary = {"version": result.version, "steps": result.steps, "validation": result.metrics.get("map50"),
               "map": metrics["map"], "map50": metrics["map50"], "per_class": metrics["per_class"],
               "predictions": str(output / "predictions.json"), "picture": str(output / "demo.png"),
               "minutes": round((time.monotonic() - started) / 60, 1)}
    say(f"served demo@{result.version} through the Nuclio handler on {held_out} held-out frames: "
        f"mAP@.5 {metrics['map50']}, mAP@[.5:.95] {metrics['map']}")
    say(f"predictions (COCO results): {summary['predictions']}; picture: {summary['picture']}; "
        f"{summary['minutes']} min in all")
    return summary
