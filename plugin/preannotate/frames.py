"""Frame images, by frame number: the one interface exporters, annotators and trainers read pixels through.

``FrameImages`` is the protocol; ``InMemoryFrames`` holds encoded files in memory (tests, synthetic data, a dataset
folder); ``preannotate.cvat.frames.CvatFrames`` reads a CVAT task by chunk. ``decode_rgb`` is how every reader
turns a file into pixels.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator, Mapping
from typing import Protocol

import numpy as np
from PIL import Image


class FrameImages(Protocol):
    def encoded(self, frames: Iterable[int]) -> Iterator[tuple[int, bytes]]:
        """``(frame, file bytes)`` — JPEG or PNG as stored (or encoded once for video) — in the order asked."""
        ...

    def decoded(self, frames: Iterable[int]) -> Iterator[tuple[int, np.ndarray]]:
        """``(frame, RGB HxWx3 uint8 array)`` in the order asked."""
        ...


def decode_rgb(data: bytes) -> np.ndarray:
    """Image file bytes → RGB array (EXIF orientation ignored, as CVAT shows frames)."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


class InMemoryFrames:
    """Encoded frame files held in memory."""

    def __init__(self, files: Mapping[int, bytes]):
        self.files = dict(files)

    def encoded(self, frames: Iterable[int]) -> Iterator[tuple[int, bytes]]:
        for frame in frames:
            yield frame, self.files[frame]

    def decoded(self, frames: Iterable[int]) -> Iterator[tuple[int, np.ndarray]]:
        for frame, data in self.encoded(frames):
            yield frame, decode_rgb(data)
