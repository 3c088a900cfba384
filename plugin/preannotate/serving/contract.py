"""CVAT's detector contract — the JSON a Nuclio detector receives and returns — in this one module.

Request (CVAT's lambda manager, ``Content-Type: application/json``)::

    {"image": "<base64 of the frame file: JPEG, PNG, ...>", "threshold": 0.5}   # threshold only when truthy

Response: a JSON list, one item per shape::

    {"confidence": "0.93", "label": "car", "type": "rectangle", "points": [xtl, ytl, xbr, ybr], "attributes": []}
    {"confidence": "0.88", "label": "person", "type": "polygon", "points": [x1, y1, x2, y2, ...]}
    {"confidence": "0.81", "label": "road", "type": "mask",
     "mask": [<0/1 bitmap of the box, row-major>..., xtl, ytl, xbr, ybr], "points": [<polygon>]}

``points`` of a mask item is its outline, used when the user asks CVAT to convert masks to polygons.
Coordinates are absolute pixels of the image as sent (after its EXIF orientation).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from preannotate.formats import masks
from preannotate.shapes import Shape

MAX_BODY_BYTES = 32 * 1024 * 1024  # the maxRequestBodySize CVAT's functions declare
DEFAULT_MAX_IMAGE_PIXELS = 8192 * 8192


class ContractError(Exception):
    """A request that breaks the contract: answered with ``status`` and ``{"error": message}``."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class DetectRequest:
    image: Image.Image
    threshold: float | None


def max_image_pixels() -> int:
    return int(os.environ.get("PREANNOTATE_MAX_IMAGE_PIXELS", DEFAULT_MAX_IMAGE_PIXELS))


def json_body(body: Any) -> Any:
    """The request body as JSON: Nuclio hands over a dict for ``application/json``, bytes otherwise."""
    if isinstance(body, (dict, list)):
        return body
    if body is None or (isinstance(body, (bytes, bytearray, str)) and not body.strip()):
        raise ContractError("empty request body: send JSON like {\"image\": \"<base64>\"}")
    if isinstance(body, (bytes, bytearray)) and len(body) > MAX_BODY_BYTES:
        raise ContractError(f"request body of {len(body)} bytes is over the {MAX_BODY_BYTES}-byte limit", 413)
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ContractError(f"request body is not JSON: {error}") from None


def parse_detect_request(body: Any) -> DetectRequest:
    data = json_body(body)
    if not isinstance(data, dict):
        raise ContractError(f"request body must be a JSON object, got {type(data).__name__}")
    if "image" not in data:
        raise ContractError("request has no 'image' (base64 of the frame)")
    encoded = data["image"]
    if not isinstance(encoded, str) or not encoded:
        raise ContractError("'image' must be a non-empty base64 string")
    threshold = data.get("threshold")
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
            raise ContractError(f"'threshold' must be a number between 0 and 1, got {threshold!r}")
        threshold = float(threshold)
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ContractError("'image' is not valid base64") from None
    return DetectRequest(image=decode_image(raw), threshold=threshold)


def decode_image(raw: bytes) -> Image.Image:
    """Image file bytes → RGB image, upright per its EXIF orientation; 16-bit, grayscale, palette and alpha images
    are converted the way a viewer shows them."""
    limit = max_image_pixels()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw))
            if image.width * image.height > limit:
                raise ContractError(f"image of {image.width}x{image.height} pixels is over the limit of {limit} "
                                    "pixels (PREANNOTATE_MAX_IMAGE_PIXELS)", 413)
            image.load()
    except ContractError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as error:
        raise ContractError(f"'image' is not a readable image: {error}") from None
    image = ImageOps.exif_transpose(image)
    return to_rgb(image)


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


def shape_to_response(shape: Shape) -> dict[str, Any]:
    """One shape as an item of CVAT's detector response."""
    item: dict[str, Any] = {
        "confidence": f"{shape.score:.4f}" if shape.score is not None else None,
        "label": shape.label,
        "type": shape.type,
        "attributes": [{"name": k, "value": str(v)} for k, v in shape.attributes.items()],
    }
    if shape.type == "mask":
        item["mask"] = masks.cvat_rle_to_nuclio_mask(shape.points)
        item["points"] = shape.polygon()
    else:
        item["points"] = [float(p) for p in shape.points]
    if shape.rotation and shape.type in ("rectangle", "ellipse"):
        item["rotation"] = shape.rotation
    if shape.group:
        item["group_id"] = shape.group
    if item["confidence"] is None:
        del item["confidence"]
    return item


def shapes_to_response(shapes: list[Shape]) -> list[dict[str, Any]]:
    return [shape_to_response(shape) for shape in shapes]


def response_to_shapes(items: list[dict[str, Any]], frame: int = 0) -> list[Shape]:
    """A detector response (ours or any CVAT function's) → shapes with ``source: auto``; masks come back in
    CVAT's RLE."""
    shapes = []
    for item in items:
        shape_type = item["type"]
        if shape_type == "tag":
            continue
        points = (masks.nuclio_mask_to_cvat_rle(item["mask"]) if shape_type == "mask"
                  else [float(p) for p in item["points"]])
        confidence = item.get("confidence")
        shapes.append(Shape(
            label=item["label"], type=shape_type, points=points, frame=frame,
            score=float(confidence) if confidence not in (None, "") else None,
            rotation=float(item.get("rotation", 0.0)),
            attributes={a["name"]: a["value"] for a in item.get("attributes") or ()},
            group=int(item.get("group_id") or 0), source="auto"))
    return shapes
