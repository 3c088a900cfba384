"""decode_rgb: OpenCV decodes the JPEGs and PNGs it decodes to Pillow's pixels, Pillow the rest; either way the
array is what ``np.asarray(Image.open(...).convert("RGB"))`` gives."""

from __future__ import annotations

import io
import re
import struct
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image
from preannotate import frames
from preannotate.frames import InMemoryFrames, decode_rgb

WIDTH, HEIGHT = 64, 48


def picture() -> np.ndarray:
    """Gradients, a patch of noise and a sharp red edge: something for JPEG's subsampling to round."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    image = np.stack([x * 4, y * 5, (x + y) * 2], axis=-1).astype(np.uint8)
    image[10:20, 10:30] = np.random.default_rng(0).integers(0, 256, (10, 20, 3))
    image[30:, 40:] = (250, 20, 40)
    return image


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def pillow(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def rotated() -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to view
    return exif


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def only(monkeypatch, decoder: str) -> None:
    """Make the other decoder fail, so a test sees which one decoded (Pillow's expected pixels come first)."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"not decoded by {decoder}")
    if decoder == "opencv":
        monkeypatch.setattr(frames.Image, "open", refuse)
    else:
        monkeypatch.setattr(frames.cv2, "imdecode", refuse)


def jpeg(**options) -> bytes:
    return encoded(Image.fromarray(picture()), "JPEG", quality=85, **options)


def png_cases() -> dict[str, bytes]:
    rgb = picture()
    image = Image.fromarray(rgb)
    alpha = np.linspace(0, 255, WIDTH, dtype=np.uint8)[None].repeat(HEIGHT, axis=0)
    palette = image.convert("P")
    rgb16 = rgb.astype(np.uint16) * 257 + np.arange(WIDTH, dtype=np.uint16)[None, :, None]  # low bytes vary
    animation = png_chunk(b"acTL", struct.pack(">II", 1, 0))  # an APNG header: Pillow's (frames)
    still = encoded(image, "PNG")
    return {
        "rgb": still,
        "grayscale": encoded(image.convert("L"), "PNG"),
        "1-bit": encoded(image.convert("1"), "PNG"),
        "grayscale alpha": encoded(image.convert("LA"), "PNG"),
        "rgba": encoded(Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), "PNG"),
        "palette": encoded(palette, "PNG"),
        "palette transparency": encoded(palette, "PNG", transparency=3),
        "rgb transparency": encoded(image, "PNG", transparency=(8, 10, 4)),
        "16-bit rgb": cv2.imencode(".png", np.ascontiguousarray(rgb16[..., ::-1]))[1].tobytes(),
        "exif rotated": encoded(image, "PNG", exif=rotated()),
        "animated": still[:33] + animation + still[33:],
    }


JPEGS = {"4:4:4": {"subsampling": 0}, "4:2:2": {"subsampling": 1}, "4:2:0": {"subsampling": 2},
         "progressive": {"progressive": True}, "exif rotated": {"exif": rotated()}}
OPENCV_PNGS = set(png_cases()) - {"animated"}


@pytest.mark.parametrize("options", JPEGS.values(), ids=list(JPEGS))
def test_jpeg_decodes_with_opencv_to_pillows_pixels(options, monkeypatch):
    data = jpeg(**options)
    expected = pillow(data)
    only(monkeypatch, "opencv")
    decoded = decode_rgb(data)

    assert decoded.shape == (HEIGHT, WIDTH, 3) and decoded.dtype == np.uint8  # the EXIF orientation ignored
    # Both are libjpeg-turbo with the same IDCT and upsampling: equal here (OpenCV 5.0, Pillow 13); another pair
    # of builds may round a level apart, not more.
    assert np.abs(decoded.astype(int) - expected).max() <= 1


def test_grayscale_jpeg_decodes_with_opencv_to_pillows_pixels(monkeypatch):
    data = encoded(Image.fromarray(picture()).convert("L"), "JPEG")
    expected = pillow(data)
    only(monkeypatch, "opencv")

    assert np.abs(decode_rgb(data).astype(int) - expected).max() <= 1


@pytest.mark.parametrize("case", sorted(png_cases()))
def test_png_equals_pillow(case, monkeypatch):
    data = png_cases()[case]
    expected = pillow(data)
    only(monkeypatch, "opencv" if case in OPENCV_PNGS else "pillow")
    decoded = decode_rgb(data)

    assert decoded.shape == (HEIGHT, WIDTH, 3) and decoded.dtype == np.uint8
    assert np.array_equal(decoded, expected)


def test_16_bit_grayscale_is_pillows_clipped_to_255(monkeypatch):
    levels = np.arange(WIDTH * HEIGHT, dtype=np.uint16).reshape(HEIGHT, WIDTH) * 20
    data = encoded(Image.fromarray(levels), "PNG")
    expected = pillow(data)
    only(monkeypatch, "pillow")  # OpenCV scales 16 bits to 8 (levels // 257): not what Pillow gives
    decoded = decode_rgb(data)

    assert np.array_equal(decoded, expected)
    assert np.array_equal(decoded[..., 0], np.minimum(levels, 255))


@pytest.mark.parametrize("fmt", ["BMP", "GIF", "WEBP", "TIFF"])
def test_other_formats_are_pillows(fmt, monkeypatch):
    data = encoded(Image.fromarray(picture()), fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    expected = pillow(data)
    only(monkeypatch, "pillow")

    assert np.array_equal(decode_rgb(data), expected)


def test_cmyk_jpeg_is_pillows(monkeypatch):
    data = encoded(Image.fromarray(picture()).convert("CMYK"), "JPEG")
    expected = pillow(data)
    only(monkeypatch, "pillow")  # OpenCV converts CMYK a level apart from Pillow

    assert np.array_equal(decode_rgb(data), expected)


def test_jpeg_with_bytes_after_its_end_still_decodes():
    data = jpeg() + b"\0\0trailer"

    assert np.array_equal(decode_rgb(data), pillow(data))


@pytest.mark.parametrize("data", [b"", b"hello, world", bytes(range(256)) * 4, b"\xff\xd8\xff\xe0 not a jpeg",
                                  b"\x89PNG\r\n\x1a\n not a png"], ids=["empty", "text", "bytes", "jpeg", "png"])
def test_bytes_that_are_not_an_image_raise_value_error(data):
    with pytest.raises(ValueError) as raised:
        decode_rgb(data)

    message = str(raised.value)
    assert "object at 0x" not in message and "<" not in message and "BytesIO" not in message


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_a_truncated_image_raises_value_error_as_pillow_fails_it(fmt):
    data = encoded(Image.fromarray(picture()), fmt)
    truncated = data[:len(data) * 2 // 3]
    with pytest.raises(OSError):
        pillow(truncated)

    with pytest.raises(ValueError, match="truncated") as raised:
        decode_rgb(truncated)
    assert "object at 0x" not in str(raised.value)


def test_in_memory_frames_decode_in_the_order_asked():
    first, second = picture(), picture()[::-1].copy()
    files = {3: encoded(Image.fromarray(first), "PNG"), 7: encoded(Image.fromarray(second), "PNG")}

    decoded = list(InMemoryFrames(files).decoded([7, 3]))
    assert [frame for frame, _ in decoded] == [7, 3]
    assert np.array_equal(decoded[0][1], second) and np.array_equal(decoded[1][1], first)


@pytest.mark.parametrize("numbers, text", [([8, 0, 1, 2, 5, 7], "0-2,5,7-8"), ([], ""), ([3], "3"),
                                           ([5, 4, 4], "4-5"), (range(64), "0-63"), ([0, 2, 4], "0,2,4")])
def test_frame_ranges_write_and_read_back_the_same_frames(numbers, text):
    assert frames.frame_ranges(numbers) == text
    assert frames.parse_frame_ranges(text) == sorted(set(numbers))


def test_frame_ranges_are_read_with_spaces_and_in_the_order_written():
    assert frames.parse_frame_ranges(" 7 - 8 , 0-1,") == [7, 8, 0, 1]


@pytest.mark.parametrize("text, says", [("x-1", "'x-1' is not a frame number or FIRST-LAST"),
                                        ("1-", "'1-' is not a frame number or FIRST-LAST"),
                                        ("-3", "'-3' is not a frame number or FIRST-LAST"),
                                        ("5-2", "'5-2': the last frame comes before the first")])
def test_frame_ranges_that_are_not_are_refused_in_one_sentence(text, says):
    with pytest.raises(ValueError, match=f"^frame range {re.escape(says)}"):
        frames.parse_frame_ranges(text)
