"""Every mask encoding we meet, and the conversions between them — in this one module.

* **bitmap**: a boolean ``H×W`` numpy array over the whole image (what models and rasterizers produce);
* **CVAT RLE**: a mask shape's ``points`` — row-major runs over the tight box, starting with a background run,
  then the inclusive box ``left, top, right, bottom`` (``cvat_sdk.masks`` encodes and decodes it);
* **Nuclio mask**: what a CVAT detector returns in ``mask`` — the raw 0/1 bitmap of the box, row-major, then the
  inclusive box ``xtl, ytl, xbr, ybr``;
* **COCO RLE**: column-major runs over the whole image (pycocotools), ``{"size": [h, w], "counts": ...}``;
* **polygon**: a flat ``[x1, y1, ...]`` outline in pixel-edge coordinates (pixel ``i`` spans ``[i, i + 1)``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from cvat_sdk.masks import decode_mask, encode_mask
from pycocotools import mask as coco_mask
from skimage import measure


def bitmap_to_cvat_rle(bitmap: np.ndarray) -> list[float]:
    """Whole-image boolean bitmap → CVAT RLE over its tight box (an empty bitmap gives a 1-pixel empty box)."""
    return [float(v) for v in encode_mask(np.asarray(bitmap, dtype=bool))]


def cvat_rle_to_bitmap(points: Sequence[float], width: int, height: int) -> np.ndarray:
    """CVAT RLE → whole-image boolean bitmap of ``height × width``."""
    return decode_mask(_whole_numbers(points).tolist(), image_width=width, image_height=height)


def cvat_rle_box(points: Sequence[float]) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """CVAT RLE → (the bitmap of its box, the inclusive box ``left, top, right, bottom``), no image size needed."""
    numbers = _whole_numbers(points)
    runs, (left, top, right, bottom) = numbers[:-4], numbers[-4:].tolist()
    width, height = right - left + 1, bottom - top + 1
    if width <= 0 or height <= 0:
        raise ValueError(f"mask box {left, top, right, bottom} is empty")
    values = np.repeat((np.arange(len(runs)) % 2).astype(bool), runs)
    if values.size != width * height:
        raise ValueError(f"mask runs cover {values.size} pixels but its box has {width * height}")
    return values.reshape(height, width), (left, top, right, bottom)


def cvat_rle_to_nuclio_mask(points: Sequence[float]) -> list[int]:
    """CVAT RLE → the ``mask`` list a CVAT detector returns: box bitmap (0/1, row-major) + ``xtl, ytl, xbr, ybr``."""
    box_bitmap, box = cvat_rle_box(points)
    return box_bitmap.astype(np.uint8).ravel().tolist() + list(box)


def nuclio_mask_to_cvat_rle(mask: Sequence[float]) -> list[float]:
    """A detector response's ``mask`` (0/1 or 0/255 box bitmap + inclusive box) → CVAT RLE."""
    numbers = _whole_numbers(mask)
    values, (left, top, right, bottom) = numbers[:-4], numbers[-4:].tolist()
    width, height = right - left + 1, bottom - top + 1
    if width <= 0 or height <= 0 or len(values) != width * height:
        raise ValueError(f"mask has {len(values)} values for a box of {width}x{height}")
    box_bitmap = np.asarray(values).reshape(height, width) > 0
    runs = encode_mask(box_bitmap, bbox=[0, 0, width, height])[:-4]  # runs over the box, then our own offset
    return [float(v) for v in [*runs, left, top, right, bottom]]


def bitmap_to_polygon(bitmap: np.ndarray, tolerance: float = 1.0) -> list[float]:
    """The outline of the largest connected region of a bitmap along its pixel edges, simplified to within
    ``tolerance`` pixels (a region too thin to survive that keeps its exact outline); ``[]`` when it is empty."""
    bitmap = np.asarray(bitmap, dtype=bool)
    if not bitmap.any():
        return []
    # Pad so regions touching the border still give closed contours; level 0.5 runs between pixel centres.
    contours = measure.find_contours(np.pad(bitmap, 1).astype(np.uint8), 0.5)
    corners = _pixel_edge_outline(max(contours, key=_contour_area))
    simplified = measure.approximate_polygon(np.vstack([corners, corners[:1]]), tolerance=tolerance)[:-1]
    if len(simplified) < 3:  # a region a pixel or two thin: keep its exact outline rather than lose it
        simplified = corners
    # (row, col) in padded pixel-centre coordinates → (x, y) in pixel-edge coordinates: -1 padding, +0.5 centre.
    xy = np.stack([simplified[:, 1] - 0.5, simplified[:, 0] - 0.5], axis=1)
    return [round(float(v), 2) for v in xy.ravel()]


def cvat_rle_to_polygon(points: Sequence[float], tolerance: float = 1.0) -> list[float]:
    """CVAT RLE → polygon in image coordinates."""
    box_bitmap, (left, top, _, _) = cvat_rle_box(points)
    polygon = bitmap_to_polygon(box_bitmap, tolerance)
    return [v + (left if i % 2 == 0 else top) for i, v in enumerate(polygon)]


def polygon_to_bitmap(polygons: Sequence[Sequence[float]], width: int, height: int) -> np.ndarray:
    """One or more flat polygons (one instance) → whole-image boolean bitmap (rasterized by pycocotools)."""
    usable = [list(map(float, p)) for p in polygons if len(p) >= 6]
    if not usable:
        return np.zeros((height, width), dtype=bool)
    rles = coco_mask.frPyObjects(usable, height, width)
    return coco_mask.decode(coco_mask.merge(rles)).astype(bool)


def cvat_rle_to_coco_rle(points: Sequence[float], width: int, height: int) -> dict | None:
    """CVAT RLE (row-major, over its box) → compressed COCO RLE (column-major, over the image), cropped to the
    image: the box's columns are walked in COCO's order and only the run boundaries are placed; None if empty."""
    box, (left, top, _, _) = cvat_rle_box(points)
    x0, y0 = max(0, -left), max(0, -top)
    box = box[y0:max(0, height - top), x0:max(0, width - left)]
    left, top = left + x0, top + y0
    if not box.any():
        return None
    columns = np.zeros((box.shape[1], box.shape[0] + 2), dtype=np.int8)  # each column with a 0 above and below
    columns[:, 1:-1] = box.T
    column, row = np.nonzero(np.diff(columns, axis=1))  # in column-major order already
    changes = (left + column) * height + top + row  # image index where each run of 1s starts or ends
    touching = np.nonzero(changes[1:] == changes[:-1])[0]  # a run ends on the last row, the next starts on row 0
    changes = np.delete(changes, np.concatenate([touching, touching + 1]))
    counts = np.diff(np.concatenate([[0], changes, [width * height]]))
    if counts[-1] == 0:  # the last run of 1s reaches the image's end: no background run after it
        counts = counts[:-1]
    return coco_mask.frPyObjects({"size": [height, width], "counts": counts.tolist()}, height, width)


def bitmap_to_coco_rle(bitmap: np.ndarray) -> dict:
    """Whole-image bitmap → compressed COCO RLE ``{"size": [h, w], "counts": str}`` (JSON-ready)."""
    rle = coco_mask.encode(np.asfortranarray(np.asarray(bitmap, dtype=np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def coco_rle_to_bitmap(rle: dict) -> np.ndarray:
    """COCO RLE, compressed (string counts) or uncompressed (list counts) → boolean bitmap."""
    height, width = rle["size"]
    if isinstance(rle["counts"], list):
        rle = coco_mask.frPyObjects(rle, height, width)
    elif isinstance(rle["counts"], str):
        rle = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
    return coco_mask.decode(rle).astype(bool)


def _pixel_edge_outline(contour: np.ndarray) -> np.ndarray:
    """A closed marching-squares contour of a 0/1 image → the corners of the staircase along the pixel edges.

    Each contour point is the midpoint of a pixel edge and consecutive points are two edges meeting at the
    centre of their marching-squares cell — a pixel corner. Walking those corners gives the exact outline
    (the contour itself cuts every corner by half a pixel); only the corners where it turns are kept."""
    starts, ends = contour[:-1], contour[1:]
    moved = np.any(starts != ends, axis=1)
    path = np.floor(np.minimum(starts[moved], ends[moved])) + 0.5
    path = path[np.any(path != np.roll(path, 1, axis=0), axis=1)]
    before, after = np.roll(path, 1, axis=0), np.roll(path, -1, axis=0)
    cross = (path[:, 0] - before[:, 0]) * (after[:, 1] - path[:, 1]) - (path[:, 1] - before[:, 1]) * (
        after[:, 0] - path[:, 0])
    return path[cross != 0]


def _contour_area(contour: np.ndarray) -> float:
    rows, cols = contour[:, 0], contour[:, 1]
    return 0.5 * abs(float(np.dot(cols, np.roll(rows, 1)) - np.dot(rows, np.roll(cols, 1))))


def _whole_numbers(values: Sequence[float]) -> np.ndarray:
    """Mask numbers as int64, checked in one vectorised step (exports convert millions of them)."""
    array = np.asarray(values, dtype=np.float64)
    if not np.isfinite(array).all() or (array != np.floor(array)).any():
        bad = next(v for v in values if not float(v).is_integer())
        raise ValueError(f"mask values must be whole numbers, got {bad!r}")
    return array.astype(np.int64)
