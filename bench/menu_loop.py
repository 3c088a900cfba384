"""The loop inside CVAT's menu (issue 12): how long a team waits, and what the loop costs over its own work.

A function is deployed for a project (``preannotate deploy --train-project``, rendered, its environment used as a
Nuclio function's), served over HTTP with its job runner, and registered as the project's webhook in the CVAT test
double (``tests/cvat_double.py``, which sends signed deliveries as CVAT's webhooks worker does). Then, timed:

  (1) **job completion → promoted version**: a job of an annotated task is marked completed through cvat-sdk; the
      clock stops when the store serves the version its webhook trained. Peer, in the same run: the same recipe
      called directly (``export_from_cvat`` + ``train_and_publish``, what ``preannotate train --task`` runs) on the
      same task — the work itself, without the webhook, the queue and the job's process.
  (2) **upload finished → task pre-annotated**: a task is created with its upload pending (CVAT sends
      ``create:task`` first), the upload finishes, and the clock stops when its pre-annotation job succeeded.
      Peer: ``annotate_task`` called directly with the loaded model on a copy of the task.

The ratios say what the loop adds (process start, model load, waiting for the upload's next poll); the times are
what a user sees on this machine. The section "The loop in CVAT's menu (issue 12)" of bench/RESULTS.md is
rewritten. ``--frames``, ``--new-frames`` and ``--steps`` size the run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import torchvision  # noqa: F401  before anything imports TensorFlow

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from _results import machine, publish  # noqa: E402
from cvat_sdk import make_client  # noqa: E402
from preannotate.annotate import annotate_task  # noqa: E402
from preannotate.cli import main as cli  # noqa: E402
from preannotate.cvat import encoding  # noqa: E402
from preannotate.models import ModelStore, hyperparameters_for, load_model  # noqa: E402
from preannotate.serving.core import App  # noqa: E402
from preannotate.serving.http import make_server  # noqa: E402
from preannotate.serving.training import TrainingRoutes  # noqa: E402
from preannotate.training.recipe import TrainingData, export_from_cvat, train_and_publish  # noqa: E402
from preannotate.training.synthetic import generate  # noqa: E402

from tests.cvat_double import CvatDouble  # noqa: E402

SECTION = "## The loop in CVAT's menu (issue 12)"
ARCH = "ssdlite320_mobilenet_v3_large"
LABELS = [{"name": "box", "type": "rectangle"}, {"name": "disc", "type": "any"}]
SECRET = "bench-secret"


def frames_of(task) -> list[tuple[str, bytes, int, int]]:
    numbers = sorted(task.annotations.frames)
    return [(task.annotations.frames[n].name, data, task.annotations.frames[n].width,
             task.annotations.frames[n].height) for n, data in task.images.encoded(numbers)]


def wait(condition, timeout: float = 3600.0) -> float:
    """Poll ``condition`` every 50 ms; the time it first held."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the loop did not finish in time")
        time.sleep(0.05)
    return time.perf_counter()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=64, help="frames of the annotated task (default 64)")
    parser.add_argument("--new-frames", type=int, default=40, help="frames of the new task (default 40)")
    parser.add_argument("--steps", type=int, default=150, help="training steps (default 150)")
    parser.add_argument("--no-write", action="store_true", help="print, do not touch bench/RESULTS.md")
    args = parser.parse_args()
    hp_text = f"init=random; num-steps={args.steps}; batch-size=8; num-validations=1"
    work = Path(tempfile.mkdtemp(prefix="bench-menu-loop-"))
    try:
        with CvatDouble() as double:
            for key, value in {"CVAT_URL": double.base_url, "CVAT_USERNAME": double.credentials[0],
                               "CVAT_PASSWORD": double.credentials[1]}.items():
                os.environ[key] = value
            project = double.add_project("bench", LABELS)
            function_dir = work / "function"
            cli(["deploy", "--model", "shapes", "--train-project", str(project), "--store", str(work / "store"),
                 "--out", str(function_dir), "--dry-run"])
            import yaml

            config = yaml.safe_load((function_dir / "function.yaml").read_text())
            env = {e["name"]: e["value"] for e in config["spec"]["env"]}
            env.update({"PREANNOTATE_MODEL_STORE": str(work / "store"), "PREANNOTATE_WEBHOOK_SECRET": SECRET,
                        "PREANNOTATE_API_AUTH": "none", "PREANNOTATE_TRAIN_DEBOUNCE": "0s",
                        "PREANNOTATE_TRAIN_HYPERPARAMETERS": hp_text, "PREANNOTATE_DEVICE": "cpu"})
            os.environ.update(env)  # the function's environment: its job processes inherit it
            app = App.from_environment(env)
            routes = TrainingRoutes.attach(app, environ=env)
            server = make_server(app, "127.0.0.1", 0)
            threading.Thread(target=server.serve_forever, daemon=True).start()
            double.add_webhook(f"http://127.0.0.1:{server.server_address[1]}/webhook", SECRET,
                               ["update:job", "create:task", "update:task"], project)

            seen = generate(args.frames, width=160, height=120, seed=1, labels=("box", "disc"))
            ids = {label["name"]: label["id"] for label in double.labels.values() if label.get("project_id") == project}
            shapes = [encoding.labeled_shape(shape, frame=n, label_id=ids[shape.label], source="manual")
                      for n, frame in seen.annotations.frames.items() for shape in frame.shapes]
            annotated = double.add_task("annotated", frames_of(seen), project_id=project,
                                        annotations={"shapes": shapes})
            with make_client(double.base_url, credentials=double.credentials) as client:
                (job,) = client.tasks.retrieve(annotated).get_jobs()
                store = ModelStore(work / "store")
                started = time.perf_counter()
                client.jobs.retrieve(job.id).update({"state": "completed"})
                promoted = wait(lambda: store.serving("shapes") is not None) - started

                # the peer: the same recipe, called directly
                hp = hyperparameters_for(ARCH, hp_text)
                peer_started = time.perf_counter()
                dataset = export_from_cvat(client, {"tasks": [annotated]}, work / "peer" / "dataset", hp)
                train_and_publish(TrainingData.from_folder(dataset, hp), architecture=ARCH, hyperparameters=hp,
                                  store=ModelStore(work / "peer-store"), name="peer", output_dir=work / "peer" / "run",
                                  progress=False)
                peer_training = time.perf_counter() - peer_started

            new_frames = frames_of(generate(args.new_frames, width=160, height=120, seed=7, labels=("box", "disc")))
            new = double.add_task("new", new_frames, project_id=project, pending_upload=True)
            double.wait_for_deliveries()
            started = time.perf_counter()
            double.finish_upload(new)
            done = wait(lambda: any(j.request.get("kind") == "annotate" and j.state == "succeeded"
                                    for j in routes.jobs.all())) - started
            server.shutdown()
            routes.runner.stop()

            copy = double.add_task("peer", new_frames, project_id=project)
            detector = load_model("shapes", store)
            with make_client(double.base_url, credentials=double.credentials) as client:
                peer_started = time.perf_counter()
                annotate_task(client, copy, detector=detector, progress=False, state_dir=work / "journal",
                              cache_dir=work / "chunks")
                peer_annotation = time.perf_counter() - peer_started
    finally:
        shutil.rmtree(work, ignore_errors=True)

    info = machine()
    text = "\n".join([
        SECTION, "",
        f"Machine: {info['cpu']}, {info['cores']} cores, Python {info['python']}; run {info['date']} "
        "(`python bench/menu_loop.py`).",
        f"Model: `{ARCH}` from random init, `{hp_text}`, on a task of {args.frames} synthetic 160x120 frames (one "
        f"job); the new task has {args.new_frames} frames. CVAT is the test double (deliveries as CVAT's worker sends "
        "them), the function the serving core over HTTP with its job runner.", "",
        "| stretch | the loop | the work alone | loop / work |",
        "|---|---|---|---|",
        f"| job completed → version promoted | {promoted:.1f} s | {peer_training:.1f} s (export + train + publish) "
        f"| {promoted / peer_training:.2f} |",
        f"| upload finished → task pre-annotated | {done:.1f} s | {peer_annotation:.1f} s (`annotate_task`, model "
        f"loaded) | {done / peer_annotation:.2f} |", "",
        f"The loop adds a fixed {promoted - peer_training:.1f} s and {done - peer_annotation:.1f} s: the job's own "
        "process (interpreter, torch, cvat-sdk login), loading the model in it, and the runner's poll (1 s) — not a "
        "cost per frame, so a task of a thousand frames pays it once. The pre-annotation job is queued by "
        "`create:task`, finds no data and waits; the `update:task` that ends the upload makes it start at the "
        "runner's next poll.",
    ])
    publish(SECTION, text, write=not args.no_write)


if __name__ == "__main__":
    main()
