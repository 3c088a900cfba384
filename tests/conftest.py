from __future__ import annotations

import atexit
import base64
import contextlib
import io
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

# One math thread per test process and per process it starts (they inherit it), set before torch loads: on a 2-core
# machine busy with other work, two OpenMP threads that keep waiting for each other made the demo's small training
# take 4 min instead of 12 s; one thread never costs more than 2x.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torchvision  # noqa: E402, F401  before any test module imports TensorFlow: the other order crashes the process
from PIL import Image  # noqa: E402

from tests.cvat_double import cvat_double  # noqa: E402, F401  (the fixture, for every test module)

FIXTURES = Path(__file__).parent / "fixtures" / "cvat-2.42"

# Tests never reach the network for weights: a missing file must fail fast with our message.
os.environ.setdefault("PREANNOTATE_OFFLINE", "1")
# Chunk caches and upload journals of the tests stay out of the user's ~/.cache.
_SCRATCH = tempfile.mkdtemp(prefix="preannotate-tests-")
atexit.register(shutil.rmtree, _SCRATCH, ignore_errors=True)  # nothing left in the temporary directory
os.environ.setdefault("PREANNOTATE_CACHE", os.path.join(_SCRATCH, "chunks"))
os.environ.setdefault("PREANNOTATE_STATE_DIR", os.path.join(_SCRATCH, "journal"))
# Models run in eager PyTorch unless a test asks for another runtime (tests/test_runtime.py): exporting a version's
# graph for OpenVINO costs seconds, once per store, and most tests make their own store.
os.environ.setdefault("PREANNOTATE_RUNTIME", "torch")


# Two kinds of wait. Something that answers at once (a thread, a local server accepting a request) gets a fixed,
# generous timeout: ``wait_for``. Work that takes as long as the machine makes it (a training job, a pre-annotation,
# a process starting and running) gets ``wait_while_advancing``: it waits as long as the work shows progress and
# fails once nothing has moved for STALLED_S seconds, so a loaded machine makes a test slower, never red, and a stuck
# job still fails in minutes.
STALLED_S = 300.0
SAFETY_CAP_S = 4 * 3600.0  # a net under a job that advances forever


def wait_for(predicate, timeout: float = 30.0, what: str = "a condition"):
    """``predicate()``'s first true value, polled every 50 ms; AssertionError after ``timeout`` seconds. For things
    that happen at once; for work, ``wait_while_advancing``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def wait_while_advancing(predicate, progress, what: str, stalled_s: float = STALLED_S, poll_s: float = 0.1):
    """``predicate()``'s first true value, however long that takes while ``progress()`` (a snapshot of the work:
    ``job_activity``, ``files_activity``) keeps changing; AssertionError once it has returned the same thing for
    ``stalled_s`` seconds, or after ``SAFETY_CAP_S`` in all."""
    started = moved = time.monotonic()
    seen = progress()
    while True:
        value = predicate()
        if value:
            return value
        now, current = time.monotonic(), progress()
        if current != seen:
            seen, moved = current, now
        elif now - moved > stalled_s:
            raise AssertionError(f"{what} stopped advancing: nothing moved for {stalled_s:g} s")
        if now - started > SAFETY_CAP_S:
            raise AssertionError(f"{what} still not done after {SAFETY_CAP_S:.0f} s")
        time.sleep(poll_s)


def files_activity(*roots: str | os.PathLike):
    """A ``progress`` for ``wait_while_advancing``: every file under ``roots`` (or the file itself) with its size and
    modification time, which changes whenever the work writes (a log line, a metrics record, a checkpoint)."""
    def snapshot() -> frozenset:
        found = set()
        for root in map(Path, roots):
            for path in [root, *(root.rglob("*") if root.is_dir() else ())]:
                with contextlib.suppress(OSError):  # written or removed while we look
                    stat = path.stat()
                    found.add((str(path), stat.st_size, stat.st_mtime_ns))
        return frozenset(found)

    return snapshot


def job_activity(jobs, job_id: str):
    """A ``progress`` for a job of a ``JobStore``: its state, its step (``JobStore.progress``, from the trainer's
    metrics) and every file its process writes (log, export, checkpoints)."""
    files = files_activity(jobs.directory(job_id))

    def snapshot() -> tuple:
        return jobs.get(job_id).state, jobs.progress(job_id).get("step"), files()

    return snapshot


def run_while_advancing(command: list[str], *, watch: tuple = (), what: str | None = None,
                        stalled_s: float = STALLED_S, **popen) -> subprocess.CompletedProcess:
    """``subprocess.run(command, capture_output=True, text=True)`` bounded by the work, not the clock: waits while
    its output or a file under ``watch`` (its run directory, say) changes; once neither has for ``stalled_s``
    seconds, kills it (and what it started) and raises AssertionError with the end of its output."""
    scratch = Path(tempfile.mkdtemp(dir=_SCRATCH))
    out, err = scratch / "stdout", scratch / "stderr"
    with open(out, "wb") as stdout, open(err, "wb") as stderr:  # files, not pipes: their growth is progress
        process = subprocess.Popen(command, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL,
                                   start_new_session=True, **popen)  # a group of its own: its children go with it
    try:
        wait_while_advancing(lambda: process.poll() is not None, files_activity(scratch, *watch),
                             what or " ".join(map(str, command))[:200], stalled_s)
    except AssertionError as stalled:
        raise AssertionError(f"{stalled}\n{err.read_text(errors='replace')[-3000:]}") from None
    finally:
        # stalled, interrupted, or ended with something it started still running (a server a script put in the
        # background): the whole group goes
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    done = subprocess.CompletedProcess(command, process.returncode, out.read_text(errors="replace"),
                                       err.read_text(errors="replace"))
    shutil.rmtree(scratch, ignore_errors=True)
    return done


def photo(width: int = 96, height: int = 64, seed: int = 0) -> Image.Image:
    """A small deterministic RGB picture (gradient, a bright box, noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    array = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1),
                      np.full_like(x, 90)], axis=-1).astype(np.int32)
    array[height // 4: height // 2, width // 4: width // 2] = [240, 30, 30]
    array += rng.integers(-10, 10, array.shape)
    return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))


def encode(image: Image.Image, fmt: str = "JPEG", **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@pytest.fixture(scope="session")
def published_store(tmp_path_factory):
    """A store with a random-init ``fasterrcnn_mobilenet_v3_large_320_fpn`` published as ``boxes@1`` and a small
    Mask R-CNN published as ``masks@1``."""
    from preannotate.models import ModelStore, create_detector, publish_detector
    from preannotate.shapes import parse_label_list

    store = ModelStore(tmp_path_factory.mktemp("store"))
    publish_detector(create_detector("fasterrcnn_mobilenet_v3_large_320_fpn", parse_label_list("car,person"),
                                     hyperparameters={"score_threshold": 0.3}), store, "boxes")
    publish_detector(create_detector("maskrcnn_resnet50_fpn", parse_label_list("road:mask,person:mask"),
                                     hyperparameters={"image_size": 96, "max_image_size": 128}), store, "masks")
    return store
