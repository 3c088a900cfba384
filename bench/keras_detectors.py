"""TensorFlow detectors (issue 13): our Keras training loop and detection against keras-hub's own plain calls, and the
TensorFlow default against the torch default at the same budget.

* Training speed: ``training.loop.train`` (its own step clock, ``elapsed_s`` in ``metrics.jsonl``: schedule,
  logs and checkpoints due included) against a plain ``model.fit`` of the same detector, compiled with the same
  optimizer, over the same ``tf.data`` pipeline (``keras_adapter.pipeline``); both after ``--warmup`` steps (the
  graph's tracing), interleaved. Target: ours / plain >= 1.0 (within the noise of this machine).
* Data loading: images/s of the pipeline alone (parse, decode, augment, batch) against what training consumes.
* Detection: ``KerasDetector.detect`` on one 640x480 frame (squash to the square, predict, NMS, shapes) against the
  bare compiled predict on the already-resized frame. Target: <= 1.05x.
* Quality (``--quality``): ``keras_ssd_mobilenet_v2_fpnlite_320`` and ``ssdlite320_mobilenet_v3_large`` from random
  weights on the same synthetic frames, the same steps and batch, each with its registry's from-scratch recipe,
  both scored by ``evaluation.score_detector`` (COCO mAP through each detector's own ``detect``) on the same
  held-out frames.

Writes the "TensorFlow detectors (issue 13)" section of bench/RESULTS.md (``--no-write`` to skip).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import _results  # bench/_results.py: the script's own folder is on sys.path
import numpy as np
import torchvision  # noqa: F401 - before TensorFlow: the other order crashes the process
from preannotate.models import create_detector, hyperparameters_for
from preannotate.training import keras_adapter
from preannotate.training.evaluation import score_detector
from preannotate.training.logs import MetricsLog
from preannotate.training.loop import train
from preannotate.training.synthetic import generate

SECTION = "## TensorFlow detectors (issue 13)"
TF_DEFAULT, TORCH_DEFAULT = "keras_ssd_mobilenet_v2_fpnlite_320", "ssdlite320_mobilenet_v3_large"
tf, keras = keras_adapter.tf, keras_adapter.keras


def hyperparameters(steps: int, batch: int, size: int) -> str:
    return f"init=random;num-steps={steps};batch-size={batch};image-size={size};num-validations=0;augment=flip"


def ours(items, labels, batch, size, warmup, steps, output: Path) -> float:
    train(TF_DEFAULT, labels, items, [], output, hyperparameters=hyperparameters(
        warmup + steps, batch, size), progress=False)
    records = {r["step"]: r for r in MetricsLog.read(output / "metrics.jsonl") if r["event"] == "train"}
    return steps * batch / (records[warmup + steps]["elapsed_s"] - records[warmup]["elapsed_s"])


class StepClock(keras.callbacks.Callback):
    """The time at the end of each step: the only thing added to the plain ``model.fit``."""

    def __init__(self):
        super().__init__()
        self.ends: list[float] = []

    def on_train_batch_end(self, batch, logs=None):
        self.ends.append(time.perf_counter())


def plain(files, labels, batch, size, warmup, steps) -> float:
    """keras-hub's detector trained as its guides do: compile, then one ``model.fit`` over the dataset, timed over
    the same steps as ours (after the same warm-up, in the same call)."""
    hp = hyperparameters_for(TF_DEFAULT, hyperparameters(warmup + steps, batch, size))
    model = create_detector(TF_DEFAULT, labels, hyperparameters=hp).model
    model.compile(optimizer=keras_adapter.build_optimizer(hp.recipe))
    clock = StepClock()
    model.fit(keras_adapter.pipeline(files, hp, size, train=True), epochs=1, steps_per_epoch=warmup + steps,
              verbose=0, callbacks=[clock])
    return steps * batch / (clock.ends[warmup + steps - 1] - clock.ends[warmup - 1])


def loading_alone(files, labels, batch, size, count: int) -> float:
    hp = hyperparameters_for(TF_DEFAULT, hyperparameters(count, batch, size))
    batches = iter(keras_adapter.pipeline(files, hp, size, train=True))
    next(batches)
    start = time.perf_counter()
    for _ in range(count):
        next(batches)
    return count * batch / (time.perf_counter() - start)


def detection(repeats: int) -> tuple[float, float]:
    detector = create_detector(TF_DEFAULT, [*generate(1).annotations.labels], hyperparameters="init=random")
    image = np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)
    square = tf.constant(detector.square(image)[0][None].astype(np.float32))
    detector.detect([image], 0.5), detector.predict(square)  # traced
    bare, full = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        {k: v.numpy() for k, v in detector.predict(square).items()}
        bare.append(time.perf_counter() - start)
        start = time.perf_counter()
        detector.detect([image], 0.5)
        full.append(time.perf_counter() - start)
    return statistics.median(full) * 1000, statistics.median(bare) * 1000


def quality(frames: int, steps: int, batch: int, size: int, work: Path) -> dict[str, dict]:
    task = generate(frames, width=160, height=120, seed=11)
    items = [(frame, task.images) for frame in task.annotations.frames.values()]
    held_out = max(8, frames // 6)
    train_items, val_items = items[held_out:], items[:held_out]
    labels = task.annotations.labels
    scores, detectors = {}, {}
    for name in (TORCH_DEFAULT, TF_DEFAULT):
        start = time.perf_counter()
        train(name, labels, train_items, [], work / name, hyperparameters=f"init=random;num-steps={steps};"
             f"batch-size={batch};image-size={size};num-validations=0", progress=False)
        seconds = time.perf_counter() - start
        detector = create_detector(name, labels, hyperparameters=f"init=random;image-size={size}")
        _load_last(name, detector, work / name)
        metrics = score_detector(detector, val_items, labels)
        scores[name] = {"map50": metrics["map50"], "map": metrics["map"], "seconds": seconds}
        detectors[name] = create_detector(name, labels, hyperparameters="init=random", device="cpu")  # at 320 px,
        _load_last(name, detectors[name], work / name)  # with the trained weights: NMS sees what it would serve
    for name, ms in serving(detectors, 30).items():
        scores[name]["serve_ms"] = ms
    return {"scores": scores, "train": len(train_items), "val": len(val_items)}


def serving(detectors: dict, repeats: int) -> dict[str, float]:
    """Median ms of each detector's ``detect`` on one 640x480 frame at its registry size, on the CPU, the
    detectors taking turns (the same load on both)."""
    image = np.random.default_rng(1).integers(0, 255, (480, 640, 3), dtype=np.uint8)
    times = {name: [] for name in detectors}
    for detector in detectors.values():
        detector.detect([image], 0.5)  # traced, warmed
    for _ in range(repeats):
        for name, detector in detectors.items():
            start = time.perf_counter()
            detector.detect([image], 0.5)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) * 1000 for name, values in times.items()}


def _load_last(name: str, detector, run: Path) -> None:
    """The weights a run ended with (no validation frames: its last checkpoint is what it would publish)."""
    if name == TF_DEFAULT:
        with np.load(run / "last.keras.npz") as saved:
            for i, weight in enumerate(detector.model.weights):
                weight.assign(saved[f"w{i}"])
        return
    import torch

    detector.model.load_state_dict(torch.load(run / "last.pt", weights_only=True)["model"])
    detector.model.eval()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=48)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds of ours and plain")
    parser.add_argument("--quality", action="store_true", help="also train both defaults and score them")
    parser.add_argument("--quality-steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads per framework (0: its own choice); "
                        "1 trains faster on a loaded 2-core machine")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    task = generate(args.frames, width=160, height=120, seed=5)
    items = [(frame, task.images) for frame in task.annotations.frames.values()]
    labels = task.annotations.labels
    with tempfile.TemporaryDirectory() as work:
        files = keras_adapter.write_records(items, labels, Path(work), "train")
        rounds = []
        for i in range(args.repeats):
            mine = ours(items, labels, args.batch, args.size, args.warmup, args.steps, Path(work) / f"ours{i}")
            peer = plain(files, labels, args.batch, args.size, args.warmup, args.steps)
            rounds.append((mine, peer))
            print(f"round {i + 1}: ours {mine:.1f} images/s, plain fit {peer:.1f}", flush=True)
        loading = loading_alone(files, labels, args.batch, args.size, 30)
        detect_ms, bare_ms = detection(30)
        scored = quality(160, args.quality_steps, args.batch, args.size, Path(work)) if args.quality else None
    ratio = statistics.median(m / p for m, p in rounds)
    machine = _results.machine()
    lines = [SECTION, "",
             f"Machine: {machine['cpu']}, {machine['cores']} cores, Python {machine['python']}, {machine['date']}. "
             f"`python bench/keras_detectors.py{' --quality' if args.quality else ''}"
             f"{f' --threads {args.threads}' if args.threads else ''}`: {TF_DEFAULT} from random "
             f"weights, {args.frames} synthetic frames at {args.size} px, batch {args.batch}, {args.warmup} warm-up "
             f"+ {args.steps} timed steps, {args.repeats} interleaved rounds.", "",
             "| measure | ours | peer | ratio | target |", "|---|---|---|---|---|",
             f"| training images/s (median round) | {statistics.median(m for m, _ in rounds):.1f} | "
             f"{statistics.median(p for _, p in rounds):.1f} (plain `model.fit`, same pipeline) | {ratio:.2f}x | "
             ">= 1.0x |",
             f"| data loading images/s vs consumed | {loading:.0f} (pipeline alone) | "
             f"{statistics.median(m for m, _ in rounds):.1f} (training) | "
             f"{loading / statistics.median(m for m, _ in rounds):.0f}x headroom | > 1x |",
             f"| detection ms per 640x480 frame | {detect_ms:.1f} (`detect`) | {bare_ms:.1f} (bare predict) | "
             f"{detect_ms / bare_ms:.3f}x | <= 1.05x |"]
    if scored:
        lines += ["", f"Quality at the same budget ({args.quality_steps} steps, batch {args.batch}, {args.size} px, "
                      f"from random weights, {scored['train']} training frames; scored on {scored['val']} held-out "
                      "frames by `evaluation.score_detector`):", "",
                  "| model | framework | mAP@.5 | mAP | training s | detect ms per 640x480 frame (320 px, CPU) |",
                  "|---|---|---|---|---|---|"]
        for name, score in scored["scores"].items():
            framework = "tensorflow" if name == TF_DEFAULT else "pytorch"
            lines.append(f"| {name} | {framework} | {score['map50']:.3f} | {score['map']:.3f} | "
                         f"{score['seconds']:.0f} | {score['serve_ms']:.1f} |")
        tf_score, torch_score = scored["scores"][TF_DEFAULT], scored["scores"][TORCH_DEFAULT]
        lines += ["", f"TF default / torch default: mAP@.5 {tf_score['map50'] / max(torch_score['map50'], 1e-9):.2f}x "
                      f"(target >= 0.9x), detect time {tf_score['serve_ms'] / torch_score['serve_ms']:.2f}x "
                      "(target <= 1.0x)."]
    _results.publish(SECTION, "\n".join(lines) + "\n", write=not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
