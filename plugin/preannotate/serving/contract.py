"""CVAT's detector contract — the JSON a Nuclio detector receives and returns — in this one module.

Request (CVAT's lambda manager, ``Content-Type: application/json``)::

    {"image": "<base64 of the frame file: JPEG, PNG, ...>", "threshold": 0.5}   # threshold only when truthy

Response: a JSON list, one item per shape::

    {"confidence": "0.93", "label": "car", "type": "rectangle", "points": [xtl, ytl, xbr, ybr], "attributes": []}
    {"confidence": "0.88", "label": "person", "type": "polygon", "points": [x1, y1, x2, y2, ...]}
    {"confidence": "0.81", "label": "road", "type": "mask",
     "mask": [<0/1 bitmap of the box, row-major>..., xtl, ytl, xbr, ybr], "points": [<polygon>]}
    {"confidence": "0.97", "label": "daytime", "type": "tag", "attributes": []}     # a classifier: CVAT stores a tag
    {"confidence": "0.90", "label": "plate", "type": "rectangle", "points": [xtl, ytl, xbr, ybr], "rotation": 30.0}
    {"confidence": "0.85", "label": "cell", "type": "ellipse", "points": [cx, cy, cx + rx, cy - ry], "rotation": 12.5}

``points`` of a mask item is its outline, used when the user asks CVAT to convert masks to polygons. ``rotation``
(degrees, clockwise, about the centre; left out when 0) comes with rectangles and ellipses only, the types CVAT
honours it for: a mask model serves a label drawn rotated or as ellipses that way (``formats.masks.fit_outline``).
Coordinates are absolute pixels of the image as sent (after its EXIF orientation).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from preannotate.cvat import encoding
from preannotate.shapes import Shape

MAX_BODY_BYTES = 32 * 1024 * 1024  # the maxRequestBodySize CVAT's functions declare
DEFAULT_MAX_IMAGE_PIXELS = 8192 * 8192
MAX_ASPECT_RATIO = 100  # a detector scales the long side into its input: past this the short one would round to 0
EXAMPLE_BODY = '{"image": "<base64 of the frame>"}'
NOT_AN_IMAGE = "'image' is not an image file (JPEG, PNG, or another format Pillow reads)"


class ContractError(Exception):
    """A request that breaks the contract: answered with ``status`` and ``{"error": message}``; the message is one
    sentence for the client, never an exception's text."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class DetectRequest:
    image: Image.Image
    threshold: float | None


def max_image_pixels() -> int:
    """``PREANNOTATE_MAX_IMAGE_PIXELS``: a number of pixels (``67108864``) or ``WIDTHxHEIGHT`` (``8192x8192``)."""
    text = os.environ.get("PREANNOTATE_MAX_IMAGE_PIXELS", "").strip()
    if not text:
        return DEFAULT_MAX_IMAGE_PIXELS
    match = re.fullmatch(r"(\d{1,12})(?:\s*[x*×]\s*(\d{1,12}))?", text)
    if not match or int(match.group(1)) * int(match.group(2) or 1) <= 0:
        # the operator's mistake, not the client's: a 500, with this sentence in the function's log
        raise ValueError(f"PREANNOTATE_MAX_IMAGE_PIXELS is {text[:40]!r}: set a number of pixels (67108864) or "
                         "WIDTHxHEIGHT (8192x8192)")
    return int(match.group(1)) * int(match.group(2) or 1)


def describe(value: Any) -> str:
    """A JSON value named for a message, short whatever its size: ``a string``, ``an array``, ``1.5``, ``null``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"
    if isinstance(value, (int, float)):
        text = repr(value) if not isinstance(value, int) or abs(value) < 10 ** 20 else ""
        return text if text and len(text) <= 24 else "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return "a value that is not JSON"


def json_body(body: Any, example: str = EXAMPLE_BODY) -> Any:
    """The request body as a JSON value, for every door: bytes or text are decoded; a value a door already decoded
    (Nuclio decodes ``application/json`` bodies) is returned as it is. Whatever is wrong is a ``ContractError``
    (``example``: the body the route expects, as its messages show it)."""
    if body is None:  # no body, or a JSON null Nuclio decoded
        raise ContractError(f"empty request body (or a JSON null): send JSON like {example}")
    if isinstance(body, (bytes, bytearray, str)) and not body.strip():
        raise ContractError(f"empty request body: send JSON like {example}")
    if not isinstance(body, (bytes, bytearray, str)):
        return body
    if len(body) > MAX_BODY_BYTES:
        raise ContractError(f"request body of {len(body)} bytes is over the {MAX_BODY_BYTES}-byte limit", 413)
    try:
        return json.loads(body)
    except UnicodeDecodeError:
        raise ContractError("request body is not JSON: it is not UTF-8 text") from None
    except json.JSONDecodeError as error:
        where = f" from line {error.lineno}, column {error.colno} on" if error.pos else ""
        raise ContractError(f"request body is not JSON{where}: send JSON like {example}") from None
    except RecursionError:
        raise ContractError("request body is not JSON this function reads: its arrays or objects are nested too "
                            "deeply") from None
    except ValueError:  # an integer of more digits than Python converts (sys.get_int_max_str_digits)
        raise ContractError("request body is not JSON this function reads: a number in it has too many "
                            "digits") from None


def json_object(body: Any, example: str = EXAMPLE_BODY) -> dict[str, Any]:
    """The request body as a JSON object (what every CVAT call sends)."""
    data = json_body(body, example)
    if not isinstance(data, dict):
        raise ContractError(f"request body must be a JSON object like {example}, not {describe(data)}")
    return data


def image_field(data: dict[str, Any], key: str = "image") -> Image.Image:
    """The frame CVAT sends as base64 in ``data[key]``, decoded (``decode_image``)."""
    if key not in data:
        raise ContractError(f"request has no '{key}' (base64 of the frame)")
    encoded = data[key]
    if not isinstance(encoded, str) or not encoded:
        got = "" if encoded == "" else f", not {describe(encoded)}"
        raise ContractError(f"'{key}' must be a non-empty base64 string{got}")
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ContractError(f"'{key}' is not valid base64") from None
    return decode_image(raw)


def parse_detect_request(body: Any) -> DetectRequest:
    data = json_object(body)
    image = data.get("image")
    if not isinstance(image, str) or not image:
        image_field(data)  # says what is wrong with it
    threshold = data.get("threshold")
    if threshold is not None:
        if (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                or not 0 <= threshold <= 1):  # NaN compares False: refused too
            raise ContractError(f"'threshold' must be a number between 0 and 1, got {describe(threshold)}")
        threshold = float(threshold)
    return DetectRequest(image=image_field(data), threshold=threshold)


def decode_image(raw: bytes) -> Image.Image:
    """Image file bytes → RGB image, upright per its EXIF orientation; 16-bit, grayscale, palette and alpha images
    are converted the way a viewer shows them. An image over ``max_image_pixels()`` is a 413, refused from its
    header before its pixels are decoded."""
    limit = max_image_pixels()
    over = f"pixels is over the limit of {limit} pixels (PREANNOTATE_MAX_IMAGE_PIXELS)"
    if Image.MAX_IMAGE_PIXELS is not None and limit > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = limit  # Pillow's own bomb check must not refuse what the operator allows
    try:
        image = Image.open(io.BytesIO(raw))
    except Image.DecompressionBombError as error:  # past twice Pillow's limit, itself at least ours
        pixels = re.search(r"\((\d+) pixels\)", str(error))
        raise ContractError(f"image of {pixels.group(1) if pixels else 'more'} {over}", 413) from None
    except UnidentifiedImageError:
        raise ContractError(NOT_AN_IMAGE) from None
    except Exception:  # whatever a damaged header makes a Pillow plugin raise
        raise ContractError("'image' is a damaged image file: its header cannot be read") from None
    if image.width * image.height > limit:
        raise ContractError(f"image of {image.width}x{image.height} {over}", 413)
    if max(image.size) > MAX_ASPECT_RATIO * max(min(image.size), 1):
        raise ContractError(f"image of {image.width}x{image.height} pixels is too narrow to detect anything in: "
                            f"one side may be at most {MAX_ASPECT_RATIO} times the other")
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
    except Exception:  # truncated or corrupt data, from any of Pillow's decoders
        raise ContractError(f"'image' is a damaged or truncated {image.format or 'image'} file: its pixels "
                            "cannot be decoded") from None
    try:
        return to_rgb(image)
    except (ValueError, OSError):
        raise ContractError(f"'image' has pixels of a kind this function cannot convert to RGB "
                            f"(mode {image.mode})") from None


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit (or 32-bit integer) grayscale: stretch the full range of the type to 8 bits
        array = np.asarray(image).astype(np.float64)
        scale = 255.0 / (65535.0 if image.mode.startswith("I;16") or array.max() <= 65535 else array.max())
        image = Image.fromarray(np.clip(array * scale, 0, 255).astype(np.uint8))
    elif image.mode == "F":
        array = np.asarray(image)
        image = Image.fromarray(np.clip(array * (255.0 if array.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        background = Image.new("RGB", image.size, (255, 255, 255))  # transparent areas as a viewer shows them
        rgba = image.convert("RGBA")
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB") if image.mode != "RGB" else image


def shapes_to_response(shapes: list[Shape]) -> list[dict[str, Any]]:
    """The response to a detector call: one item per shape (``cvat.encoding.detector_item``)."""
    return [encoding.detector_item(shape) for shape in shapes]


def response_to_shapes(items: list[dict[str, Any]], frame: int = 0) -> list[Shape]:
    """A detector response (ours or any CVAT function's) → shapes with ``source: auto``; masks come back in
    CVAT's RLE, tags as shapes of type ``tag``."""
    if not isinstance(items, list):
        raise ValueError("a detector response is a JSON list of shapes")
    return [encoding.shape_from_detector_item(item, frame) for item in items]
