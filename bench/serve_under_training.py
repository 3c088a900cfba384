"""Detection latency while the function trains (issue 6): 200 concurrent CVAT detector calls through the local
server (`preannotate serve`, the same routes and runner as the Nuclio function), once while idle and once while a
training job runs in the server's job process. None may fail; p50/p99 are reported against the idle run (the peer,
measured in the same run).

The training job learns from a synthetic task served by the CVAT test double (``tests/cvat_double.py``) in this
process; the served model is a random-init ``ssdlite320_mobilenet_v3_large`` published in a temporary store.

Run: ``.venv/bin/python bench/serve_under_training.py`` (about 5 minutes on 2 cores); writes its section of
bench/RESULTS.md unless ``--no-write``.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from _results import machine, publish  # noqa: E402
from preannotate.models import ModelStore, create_detector, publish_detector  # noqa: E402
from preannotate.shapes import parse_label_list  # noqa: E402
from preannotate.training.synthetic import generate  # noqa: E402

from tests.cvat_double import CvatDouble  # noqa: E402

SECTION = "## Detection while training (issue 6)"
REQUESTS = 200
MODEL = "ssdlite320_mobilenet_v3_large"
TRAINING = ("init=random; num-steps=2000; batch-size=4; image-size=160; num-validations=1; val-fraction=0.2; "
            "optimizer=adamw; initial-learning-rate=0.002")


TOKEN = "bench-token"  # the training routes are closed without one
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(url: str, body: bytes, headers: dict[str, str] | None = None, method: str = "POST"):
    req = urllib.request.Request(url, data=body, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=300) as response:
            payload = response.read()
            return response.status, time.perf_counter() - started, payload
    except urllib.error.HTTPError as error:
        return error.code, time.perf_counter() - started, error.read()
    except OSError as error:
        return 0, time.perf_counter() - started, str(error).encode()


def burst(url: str, body: bytes) -> dict:
    """``REQUESTS`` detection calls at once (all in flight together), as CVAT's workers and users send them."""
    with ThreadPoolExecutor(REQUESTS) as pool:
        results = list(pool.map(lambda _: request(url, body), range(REQUESTS)))
    latencies = sorted(seconds for status, seconds, _ in results if status == 200)
    failures = [(status, payload[:200]) for status, _, payload in results if status != 200]
    return {"ok": len(latencies), "failed": len(failures), "failures": failures[:3],
            "p50": statistics.median(latencies) if latencies else float("nan"),
            "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else float("nan")}


def synthetic_task(double: CvatDouble) -> int:
    task = generate(16, width=160, height=120, seed=3, labels=("box", "disc"))
    frames = [(f.name, data, f.width, f.height) for (_, f), (_, data) in
              zip(sorted(task.annotations.frames.items()), task.images.encoded(sorted(task.annotations.frames)),
                  strict=True)]
    task_id = double.add_task("bench-shapes", frames, [{"name": "box", "type": "rectangle"},
                                                        {"name": "disc", "type": "ellipse"}])
    shapes = [{"type": s.type, "frame": s.frame, "label_id": double.label_id(task_id, s.label), "points": s.points,
               "rotation": s.rotation % 360, "source": "manual", "occluded": False, "z_order": 0, "group": 0,
               "attributes": []}
              for frame in task.annotations.frames.values() for s in frame.shapes]
    double._write(double.tasks[task_id], None, "create", {"shapes": shapes, "tags": [], "tracks": []})
    return task_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (640, 480), (120, 140, 160)).save(buffer, "JPEG", quality=90)
    body = json.dumps({"image": base64.b64encode(buffer.getvalue()).decode(), "threshold": 0.5}).encode()
    with tempfile.TemporaryDirectory(prefix="preannotate-bench-") as tmp, CvatDouble() as double:
        store = Path(tmp) / "store"
        publish_detector(create_detector(MODEL, parse_label_list("box,disc")), ModelStore(store), "shapes")
        task_id = synthetic_task(double)
        port = free_port()
        env = {**os.environ, "CVAT_URL": double.base_url, "CVAT_USERNAME": double.credentials[0],
               "CVAT_PASSWORD": double.credentials[1], "PREANNOTATE_TRAIN_HYPERPARAMETERS": TRAINING,
               "PREANNOTATE_CACHE": str(Path(tmp) / "cache"), "PREANNOTATE_API_TOKEN": TOKEN}
        server = subprocess.Popen([sys.executable, "-m", "preannotate.cli", "serve", "--model", "shapes", "--store",
                                   str(store), "--port", str(port), "--device", "cpu"], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            server.stdout.readline()  # "serving ... on http://..." once the model is loaded
            # Keep reading the server's output: a full pipe would block its logging, and with it every request.
            output: deque[str] = deque(maxlen=50)
            threading.Thread(target=lambda: output.extend(server.stdout), daemon=True).start()
            url = f"http://127.0.0.1:{port}"
            request(url + "/", body)  # warm-up
            idle = burst(url + "/", body)
            print(f"idle: {idle}", file=sys.stderr)
            status, _, payload = request(url + "/train", json.dumps({"tasks": [task_id]}).encode(), AUTH)
            job = json.loads(payload)["job"]
            assert status == 202, payload
            while (state := json.loads(request(f"{url}/jobs/{job}", b"", AUTH, method="GET")[2]))["state"] in (
                    "queued", "running") and state.get("step", 0) < 1:
                time.sleep(0.5)  # until the job process is past its start-up and is training
            if state["state"] != "running":
                raise RuntimeError(f"the training job did not start training: {state['state']} "
                                   f"{state.get('error')} {state.get('log_tail', [])[-5:]}\n{''.join(output)}")
            training = burst(url + "/", body)
            state = json.loads(request(f"{url}/jobs/{job}", b"", AUTH, method="GET")[2])
            print(f"training: {training}; job {state['state']} at step {state.get('step')}", file=sys.stderr)
            if state["state"] != "running":
                raise RuntimeError(f"the job was not running during the burst: {state['state']}")
            request(f"{url}/jobs/{job}/cancel", b"", AUTH)
        finally:
            server.terminate()
            server.wait(30)
    info = machine()
    rows = [("idle", idle), ("while training", training)]
    lines = [SECTION, "", "Command: `.venv/bin/python bench/serve_under_training.py`.", "",
             f"Machine: {info['cpu']}, {info['cores']} cores, Python {info['python']}; run {info['date']}.", "",
             f"Method: `preannotate serve` with a random-init `{MODEL}` (the function's routes and job runner); "
             f"{REQUESTS} `POST /` calls (640x480 JPEG) in flight together, first idle, then while a training job "
             "(`POST /train` on a synthetic task served by the CVAT test double) trains in the server's job process.",
             "", "| run | answered 200 | failed | p50 s | p99 s |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {name} | {r['ok']} | {r['failed']} | {r['p50']:.2f} | {r['p99']:.2f} |" for name, r in rows]
    lines += ["", f"p50 while training / idle: {training['p50'] / idle['p50']:.2f}; "
                  f"p99: {training['p99'] / idle['p99']:.2f}. Target: no failed request."]
    text = "\n".join(lines) + "\n"
    publish(SECTION, text, write=not args.no_write)
    return 0 if idle["failed"] == training["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
