"""Frame images, by frame number: the one interface exporters, annotators and trainers read pixels through; and
sets of frame numbers written down as ranges.

``FrameImages`` is the protocol; ``InMemoryFrames`` holds encoded files in memory (tests, synthetic data, a dataset
folder); ``preannotate.cvat.frames.CvatFrames`` reads a CVAT task by chunk. ``decode_rgb`` is how every reader
turns a file into pixels. ``frame_ranges`` / ``parse_frame_ranges`` are the one way frame numbers are written down
(``"0-2,5,7-8"``: a manifest's frames learned from, the frames an upload journal has written).
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Iterable, Iterator, Mapping
from typing import Protocol

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError


class FrameImages(Protocol):
    def encoded(self, frames: Iterable[int]) -> Iterator[tuple[int, bytes]]:
        """``(frame, file bytes)`` — JPEG or PNG as stored (or encoded once for video) — in the order asked."""
        ...

    def decoded(self, frames: Iterable[int]) -> Iterator[tuple[int, np.ndarray]]:
        """``(frame, RGB HxWx3 uint8 array)`` in the order asked."""
        ...


def decode_rgb(data: bytes) -> np.ndarray:
    """Image file bytes → RGB ``HxWx3`` uint8 array, as Pillow's ``convert("RGB")`` gives it: EXIF orientation
    ignored (CVAT shows frames unrotated), grayscale, palette and alpha made RGB (alpha dropped, not composited),
    16-bit RGB cut to its high 8 bits and 16-bit grayscale clipped at 255.

    OpenCV decodes the JPEGs and PNGs it decodes to exactly those pixels (faster than Pillow: libjpeg-turbo and
    libpng straight into the array); Pillow everything else — CMYK or 12-bit JPEGs, 16-bit grayscale PNGs (which
    Pillow clips and OpenCV scales), animated PNGs, other formats — and anything incomplete or that OpenCV
    refuses, so that broken files fail as Pillow fails them. A file that is not an image raises ``ValueError``."""
    if _opencv_decodes(data):
        array = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), _OPENCV_RGB | cv2.IMREAD_IGNORE_ORIENTATION)
        if array is not None and array.ndim == 3 and array.shape[2] == 3:
            return array if _OPENCV_RGB != cv2.IMREAD_COLOR else cv2.cvtColor(array, cv2.COLOR_BGR2RGB)
    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert("RGB"))
    except UnidentifiedImageError:  # its message holds the repr of our BytesIO: say what was read instead
        start = f", starting {bytes(data[:8]).hex(' ')}" if len(data) else ""
        raise ValueError(f"not an image file ({len(data)} bytes{start})") from None
    except (OSError, SyntaxError, Image.DecompressionBombError) as error:
        raise ValueError(f"cannot decode the image ({len(data)} bytes): {error}") from error


# IMREAD_COLOR_RGB (OpenCV 4.10) has the codec write RGB itself; older versions decode to BGR and swap
_OPENCV_RGB = getattr(cv2, "IMREAD_COLOR_RGB", cv2.IMREAD_COLOR)
_JPEG_FRAMES = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}  # SOFn markers
_PNG_SIGNATURE, _PNG_END = b"\x89PNG\r\n\x1a\n", b"IEND\xaeB`\x82"


def _opencv_decodes(data: bytes) -> bool:
    """Whether OpenCV decodes this file to Pillow's RGB pixels, from its headers: a complete JPEG of 8-bit
    grayscale or YCbCr/RGB samples, or a complete, still PNG other than 16-bit grayscale."""
    data = memoryview(data).cast("B")
    if data[:3] == b"\xff\xd8\xff":
        if data[-2:] != b"\xff\xd9":  # truncated (or trailing bytes): Pillow's call
            return False
        at = 2
        while at + 9 < len(data) and data[at] == 0xFF:  # segments up to the frame header
            marker, length = data[at + 1], int.from_bytes(data[at + 2:at + 4], "big")
            if marker in _JPEG_FRAMES:
                precision, components = data[at + 4], data[at + 9]
                return precision == 8 and components in (1, 3)  # not CMYK / YCCK: OpenCV converts those apart
            if marker == 0xDA:  # scan data before any frame header
                return False
            at += 2 + length
        return False
    if data[:8] == _PNG_SIGNATURE:
        if data[-8:] != _PNG_END or data[12:16] != b"IHDR" or len(data) < 33:
            return False
        bit_depth, color_type = data[24], data[25]
        if bit_depth == 16 and color_type == 0:  # Pillow keeps 16-bit gray as I;16 and clips it to 255
            return False
        at = 8
        while at + 8 <= len(data):  # chunks up to the image data: an animated PNG is Pillow's (frames)
            length, kind = int.from_bytes(data[at:at + 4], "big"), bytes(data[at + 4:at + 8])
            if kind == b"acTL":
                return False
            if kind == b"IDAT":
                return True
            at += 12 + length
        return False
    return False


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


def frame_ranges(numbers: Iterable[int]) -> str:
    """``[8, 0, 1, 2, 5, 7]`` → ``"0-2,5,7-8"``: frame numbers, sorted, each run of consecutive ones as
    ``FIRST-LAST`` (``parse_frame_ranges`` reads it back)."""
    parts = []
    # consecutive numbers keep the same difference to their position in the sorted list: one group per run
    for _, run in itertools.groupby(enumerate(sorted(set(numbers))), key=lambda item: item[1] - item[0]):
        (_, first), *rest = run
        parts.append(f"{first}-{rest[-1][1]}" if rest else str(first))
    return ",".join(parts)


def parse_frame_ranges(text: str) -> list[int]:
    """``"0-2,5,7-8"`` → ``[0, 1, 2, 5, 7, 8]``, the frame numbers ``frame_ranges`` wrote down, in its order."""
    numbers: list[int] = []
    for part in (part.strip() for part in text.split(",")):
        if not part:
            continue
        first, dash, last = part.partition("-")
        if not first.strip().isdigit() or (dash and not last.strip().isdigit()):
            raise ValueError(f"frame range {part!r} is not a frame number or FIRST-LAST (e.g. 0-2,5)")
        start, stop = int(first), int(last if dash else first)
        if stop < start:
            raise ValueError(f"frame range {part!r}: the last frame comes before the first")
        numbers.extend(range(start, stop + 1))
    return numbers
