"""The training loop for real, on synthetic data on the CPU: it learns, it publishes a complete version, it survives
SIGKILL (resuming to the same step count and the same weights), SIGTERM leaves a usable checkpoint, Mask R-CNN
learns from polygons and masks, and a previous version is fine-tuned on a changed label set."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from preannotate.models import Manifest, ModelStore, create_detector, load_detector
from preannotate.training import data
from preannotate.training.logs import MetricsLog
from preannotate.training.loop import train
from preannotate.training.runs import frame_ranges
from preannotate.training.synthetic import generate

from tests.conftest import files_activity, run_while_advancing, wait_while_advancing

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
# One torch thread here and in the subprocesses: on a 2-core machine shared with other work, two OpenMP threads
# that keep waiting for each other make a step 5-8x slower; one thread never costs more than 2x.
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
       "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def split(task, val: int):
    items = [(frame, task.images) for frame in task.annotations.frames.values()]
    return items[val:], items[:val]


# --- learning from scratch ----------------------------------------------------------------------------------------

def test_from_scratch_on_the_cpu_reaches_map50_of_one_half_on_held_out_frames(tmp_path):
    task = generate(160, width=128, height=96, seed=0, objects=(1, 3), size=(0.25, 0.5))  # 4 labels
    train_items, val_items = data.split_task(task.annotations, task.images, val_fraction=0.15)
    assert (len(train_items), len(val_items)) == (136, 24)
    started = time.monotonic()
    result = train("ssdlite320_mobilenet_v3_large", task.annotations.labels, train_items, val_items, tmp_path / "run",
                   store=tmp_path / "store", name="shapes", progress=False,
                   hyperparameters="init=random; optimizer=adamw; initial-learning-rate=0.003; weight-decay=0.0001; "
                                   "schedule=one-cycle; warmup-steps=0; num-steps=40; batch-size=8; num-validations=2; "
                                   "augment=flip")
    minutes = (time.monotonic() - started) / 60
    print(f"from scratch: mAP@.5 {result.metrics['map50']}, mAP {result.metrics['map']} after {result.steps} steps "
          f"in {minutes:.1f} min")

    assert result.metrics["map50"] >= 0.5
    assert (result.version, result.steps, result.stopped) == (1, 40, "completed")
    manifest = Manifest.read(result.path)
    assert [(label.name, label.type, label.id) for label in manifest.labels] == [
        ("box", "rectangle", 1), ("disc", "ellipse", 2), ("triangle", "polygon", 3), ("blob", "mask", 4)]
    assert manifest.hyperparameters["optimizer"] == "adamw" and manifest.hyperparameters["num_steps"] == 40
    assert manifest.metrics["map50"] == result.metrics["map50"]
    assert set(manifest.metrics["bbox"]["per_class"]) == {"box", "disc", "triangle", "blob"}
    frames = manifest.provenance["frames"]
    assert frames == {"train": frame_ranges([f.frame for f, _ in train_items]),
                      "val": frame_ranges([f.frame for f, _ in val_items])}
    assert len(frames["val"].split(",")) > 1  # held-out frames from all over the task
    assert {"torch", "torchvision", "python"} <= set(manifest.libraries)
    records = MetricsLog.read(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records if r["event"] == "validation"] == [20, 40]
    trained = [r for r in records if r["event"] == "train"]
    assert all({"loss", "lr", "images_per_s", "eta_s", "total_steps"} <= set(r) for r in trained)
    assert list((tmp_path / "run").glob("events.out.tfevents.*"))

    # the published version serves: the held-out frames' objects are found with their labels
    detector = load_detector(result.path, device="cpu")
    frame, images = val_items[0]
    (_, image), = images.decoded([frame.frame])
    found = detector.detect([image], threshold=0.3)[0]
    assert {s.label for s in found} & {s.label for s in frame.shapes}


# --- killed, interrupted, resumed ---------------------------------------------------------------------------------

SCRIPT = textwrap.dedent("""
    import sys
    from preannotate.training.synthetic import generate
    from preannotate.training.loop import train
    from preannotate.training.runs import TrainingInterrupted

    task = generate(20, width=96, height=72, seed=1, labels=("box", "disc"), objects=(1, 1), size=(0.4, 0.6))
    items = [(frame, task.images) for frame in task.annotations.frames.values()]
    try:
        train("ssdlite320_mobilenet_v3_large", task.annotations.labels, items[4:], items[:4], sys.argv[1],
              store=sys.argv[2], name="shapes", progress=False, checkpoint_every=2,
              hyperparameters="init=random; num-steps=12; batch-size=2; optimizer=adamw; initial-learning-rate=0.002; "
                              "schedule=cosine; warmup-steps=3; augment=flip,scale,colour; num-validations=2")
    except TrainingInterrupted:
        sys.exit(3)
""")


class Training(subprocess.Popen):
    """The run in a process of its own, its messages in a log beside its output directory (which it may clear)."""

    def __init__(self, output: Path, store: Path):
        self.output, self.log = output, output.with_suffix(".log")
        output.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            super().__init__([sys.executable, "-c", SCRIPT, str(output), str(store)], env=ENV, cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=log)

    def said(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def activity(self):
        """What moves while it trains: its metrics and checkpoints, its messages."""
        return files_activity(self.output, self.log)


def wait_for_step(process: Training, metrics: Path, step: int) -> None:
    def reached() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"training ended early ({process.returncode}): {process.said()}")
        return metrics.exists() and any(r.get("step", 0) >= step for r in MetricsLog.read(metrics))

    wait_while_advancing(reached, process.activity(), f"the run to step {step}")


def finish(process: Training) -> int:
    try:
        wait_while_advancing(lambda: process.poll() is not None, process.activity(), "the run")
    finally:
        if process.poll() is None:  # stalled, or the test was interrupted
            process.kill()
            process.wait()
    if process.returncode not in (0, 3, -signal.SIGKILL):
        raise AssertionError(f"training failed ({process.returncode}): {process.said()}")
    return process.returncode


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference: the same run, never stopped."""
    root = tmp_path_factory.mktemp("uninterrupted")
    assert finish(Training(root / "run", root / "store")) == 0
    return root / "run"


def test_a_run_killed_with_sigkill_resumes_to_the_same_steps_and_weights(tmp_path, uninterrupted):
    run, store = tmp_path / "run", tmp_path / "store"
    process = Training(run, store)
    wait_for_step(process, run / "metrics.jsonl", 5)
    process.send_signal(signal.SIGKILL)
    assert finish(process) == -signal.SIGKILL
    killed_at = torch.load(run / "last.pt", weights_only=True)["state"]["step"]
    assert 4 <= killed_at < 12 and not (run / "result.json").exists()

    assert finish(Training(run, store)) == 0  # the same command again
    result = json.loads((run / "result.json").read_text())
    assert (result["steps"], result["version"]) == (12, 1)
    assert ModelStore(store).versions("shapes") == [1]
    steps = [r["step"] for r in MetricsLog.read(run / "metrics.jsonl") if r["event"] == "train"]
    assert steps == list(range(1, 13))  # what the killed run logged past its checkpoint was dropped
    resumed = torch.load(run / "last.pt", weights_only=True)
    reference = torch.load(uninterrupted / "last.pt", weights_only=True)
    assert resumed["state"]["step"] == reference["state"]["step"] == 12
    for name, tensor in reference["model"].items():  # the very same batches, augmentations and random draws
        assert torch.equal(resumed["model"][name], tensor), name
    published = torch.load(store / "shapes" / "v1" / "model.pt", weights_only=True)
    best = torch.load(run / "best.pt", weights_only=True)
    assert all(torch.equal(published[k], v) for k, v in best["model"].items())

    assert finish(Training(run, store)) == 0  # a finished run started again publishes nothing new
    assert ModelStore(store).versions("shapes") == [1]


def test_sigterm_checkpoints_and_stops_with_a_usable_checkpoint(tmp_path):
    run, store = tmp_path / "run", tmp_path / "store"
    process = Training(run, store)
    wait_for_step(process, run / "metrics.jsonl", 3)
    process.send_signal(signal.SIGTERM)
    assert finish(process) == 3  # TrainingInterrupted
    checkpoint = torch.load(run / "last.pt", weights_only=True)
    stopped = [r for r in MetricsLog.read(run / "metrics.jsonl") if r["event"] == "interrupted"]
    assert len(stopped) == 1 and stopped[0]["step"] == checkpoint["state"]["step"] >= 3
    assert {"model", "optimizer", "scheduler", "scaler", "rng"} <= set(checkpoint)
    assert not store.exists() or not ModelStore(store).versions("shapes")  # nothing published
    labels = json.loads((run / "run.json").read_text())["labels"]
    from preannotate.shapes import Label

    model = create_detector("ssdlite320_mobilenet_v3_large", [Label.from_dict(x) for x in labels]).model
    model.load_state_dict(checkpoint["model"])  # loads as it is


# --- masks, fine-tuning ---------------------------------------------------------------------------------------------

def test_mask_rcnn_learns_from_polygons_masks_and_ellipses(tmp_path):
    task = generate(10, width=96, height=72, seed=2, labels=("disc", "triangle", "blob"), objects=(1, 2),
                    size=(0.4, 0.6))
    train_items, val_items = split(task, 2)
    result = train("maskrcnn_resnet50_fpn", task.annotations.labels, train_items, val_items, tmp_path / "run",
                   store=tmp_path / "store", progress=False,
                   hyperparameters="init=random; num-steps=3; batch-size=2; image-size=72; max-image-size=96; "
                                   "optimizer=adamw; initial-learning-rate=0.0005; num-validations=1")
    records = [r for r in MetricsLog.read(tmp_path / "run" / "metrics.jsonl") if r["event"] == "train"]
    assert all(r["loss_mask"] > 0 and math.isfinite(r["loss_mask"]) for r in records)
    assert len(records) == 3
    assert {"bbox", "segm"} <= set(result.metrics) and result.metrics["map"] == result.metrics["segm"]["map"]
    detector = load_detector(result.path, device="cpu")
    assert [(label.name, label.type) for label in detector.manifest.labels] == [
        ("disc", "ellipse"), ("triangle", "polygon"), ("blob", "mask")]
    assert detector.manifest.outlines == {"disc": "ellipse"}  # served as people drew it: its masks fitted
    frame, images = val_items[0]
    (_, image), = images.decoded([frame.frame])
    served = {(shape.label, shape.type) for shape in detector.detect([image], threshold=0.0)[0]}
    # (three steps may find nothing; test_rotated.py serves every type from a mask model's output)
    assert served <= {("disc", "ellipse"), ("triangle", "mask"), ("blob", "mask")}


def test_fine_tuning_a_previous_version_on_a_changed_label_set_keeps_the_backbone(tmp_path):
    arch, size = "fasterrcnn_mobilenet_v3_large_320_fpn", "image-size=72; max-image-size=96"
    store = ModelStore(tmp_path / "store")
    first = generate(6, width=96, height=72, seed=3, labels=("box", "disc"))
    train_items, val_items = split(first, 2)
    v1 = train(arch, first.annotations.labels, train_items, val_items, tmp_path / "v1", store=store, name="shapes",
               progress=False, hyperparameters=f"init=random; num-steps=2; batch-size=2; {size}; num-validations=1")
    second = generate(6, width=96, height=72, seed=4, labels=("box", "disc", "triangle"))
    train_items, val_items = split(second, 2)
    v2 = train(arch, second.annotations.labels, train_items, val_items, tmp_path / "v2", store=store, name="shapes",
               previous=v1.path, progress=False,
               hyperparameters=f"init=previous; trainable-backbone-layers=0; num-steps=2; batch-size=2; {size}; "
                               "num-validations=1")

    assert (v1.version, v2.version) == (1, 2)
    before = torch.load(v1.path / "model.pt", weights_only=True)
    after = torch.load(v2.path / "model.pt", weights_only=True)
    backbone = [k for k in before if k.startswith("backbone.body.")]
    assert backbone and all(torch.equal(before[k], after[k]) for k in backbone)  # frozen, batch norms included
    head = "roi_heads.box_predictor.cls_score.weight"
    assert (before[head].shape[0], after[head].shape[0]) == (3, 4)  # background + labels: a new head
    assert not torch.equal(before["rpn.head.conv.0.0.weight"], after["rpn.head.conv.0.0.weight"])  # trained on
    manifest = Manifest.read(v2.path)
    assert [label.name for label in manifest.labels] == ["box", "disc", "triangle"]
    assert manifest.provenance["init"] == "previous" and manifest.provenance["previous"] == str(v1.path)


DDP_SCRIPT = textwrap.dedent("""
    import sys
    from preannotate.training.synthetic import generate
    from preannotate.training.loop import train

    task = generate(20, width=96, height=72, seed=1, labels=("box", "disc"), objects=(1, 1), size=(0.4, 0.6))
    items = [(frame, task.images) for frame in task.annotations.frames.values()]
    result = train("ssdlite320_mobilenet_v3_large", task.annotations.labels, items[4:], items[:4], sys.argv[1],
                   store=sys.argv[2], name="shapes", progress=False, workers=0,
                   hyperparameters="init=random; num-clones=2; epochs=1; batch-size=2; num-validations=1")
    print("RESULT", result.version, result.steps)
""")


def test_num_clones_trains_with_distributed_data_parallel_under_torchrun(tmp_path):
    """Two CPU processes (gloo) stand in for two GPUs: the same code path as ``num-clones=2`` on a GPU machine."""
    done = run_while_advancing([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                                "--no-python", sys.executable, "-c", DDP_SCRIPT,
                                str(tmp_path / "run"), str(tmp_path / "store")],
                               watch=(tmp_path,), env=ENV, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    # 16 frames, 2 per process per step: an epoch is 4 steps; only the main process publishes
    assert sorted(line for line in done.stdout.splitlines() if line.startswith("RESULT")) == [
        "RESULT 1 4", "RESULT None 4"]
    checkpoint = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert checkpoint["samples_drawn"] == 16 and checkpoint["total_steps"] == 4
    assert Manifest.read(tmp_path / "store" / "shapes" / "v1").hyperparameters["num_clones"] == 2


# --- stopping early -------------------------------------------------------------------------------------------------

def test_early_stopping_and_the_time_limit_stop_the_run_and_still_publish(tmp_path):
    task = generate(5, width=96, height=72, seed=5, labels=("box", "disc"))
    train_items, val_items = split(task, 1)
    common = "init=random; batch-size=2; num-steps=10; num-validations=5; gradient-clip-norm=1"
    # a rate too small to change anything: mAP never improves after the first validation (step 2)
    stalled = train("ssdlite320_mobilenet_v3_large", task.annotations.labels, train_items, val_items,
                    tmp_path / "stalled", store=tmp_path / "store", name="stalled", progress=False,
                    hyperparameters=f"{common}; initial-learning-rate=1e-8; early-stopping-patience=2")
    assert (stalled.stopped, stalled.steps, stalled.metrics["best_step"], stalled.version) == (
        "early-stopping", 6, 2, 1)
    timed = train("ssdlite320_mobilenet_v3_large", task.annotations.labels, train_items, val_items,
                  tmp_path / "timed", store=tmp_path / "store", name="timed", progress=False,
                  hyperparameters=f"{common}; max-training-hours=0")
    assert (timed.stopped, timed.steps, timed.version) == ("time-limit", 1, 1)
    assert timed.metrics["best_step"] == 1  # validated where it stopped
