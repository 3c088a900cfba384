from __future__ import annotations

import atexit
import base64
import io
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torchvision  # noqa: F401  before any test module imports TensorFlow: the other order crashes the process
from PIL import Image

from tests.cvat_double import cvat_double  # noqa: F401  (the fixture, for every test module)

FIXTURES = Path(__file__).parent / "fixtures" / "cvat-2.42"

# Tests never reach the network for weights: a missing file must fail fast with our message.
os.environ.setdefault("PREANNOTATE_OFFLINE", "1")
# Chunk caches and upload journals of the tests stay out of the user's ~/.cache.
_SCRATCH = tempfile.mkdtemp(prefix="preannotate-tests-")
atexit.register(shutil.rmtree, _SCRATCH, ignore_errors=True)  # nothing left in the temporary directory
os.environ.setdefault("PREANNOTATE_CACHE", os.path.join(_SCRATCH, "chunks"))
os.environ.setdefault("PREANNOTATE_STATE_DIR", os.path.join(_SCRATCH, "journal"))


def wait_for(predicate, timeout: float = 30.0, what: str = "a condition"):
    """``predicate()``'s first true value, polled every 50 ms; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


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
