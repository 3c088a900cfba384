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

import cv2
import numpy as np
from cvat_sdk.masks import decode_mask, encode_mask
from pycocotools import mask as coco_mask


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
    ``tolerance`` pixels (a region too thin to survive that keeps its exact outline); ``[]`` when it is empty.

    Regions are 4-connected (pixels touching only at a corner are separate regions) and the outline is the outer
    one (holes are not cut out). Traced by OpenCV — ``cv2.findContours`` then ``cv2.approxPolyDP``, as CVAT's own
    serverless functions do — but on the pixel edges rather than through the boundary pixels' centres."""
    bitmap = np.asarray(bitmap, dtype=bool)
    rows, cols = np.flatnonzero(bitmap.any(axis=1)), np.flatnonzero(bitmap.any(axis=0))
    if not rows.size:
        return []
    top, left = int(rows[0]), int(cols[0])
    box = bitmap[top:rows[-1] + 1, left:cols[-1] + 1]  # trace only the tight box: masks are mostly background
    corners = max(_pixel_edge_outlines(box), key=lambda outline: _largest_first(outline, box.shape[1]))
    simplified = corners
    if tolerance > 0:
        simplified = cv2.approxPolyDP(corners.reshape(-1, 1, 2), float(tolerance), closed=True).reshape(-1, 2)
        if len(simplified) < 3:  # a region a pixel or two thin: keep its exact outline rather than lose it
            simplified = corners
    return np.round(simplified + (left, top), 2).astype(np.float64).ravel().tolist()


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


def _pixel_edge_outlines(bitmap: np.ndarray) -> list[np.ndarray]:
    """The outer outlines along the pixel edges of the 4-connected regions that may be the largest, from one
    ``cv2.findContours`` call: their corners (``x, y``, int32, where the outline turns).

    OpenCV traces the centres of 8-connected foreground pixels; the pixel-edge outline of 4-connected regions is
    the border of the *background* instead, so it is traced on a grid of twice the resolution in which every cell
    is a pixel centre (odd, odd), a pixel edge (odd, even or even, odd) or a pixel corner (even, even): a cell is
    set when it touches a background pixel (background pixels drawn as closed squares, 8-connected). Each
    foreground region is then a hole of that grid and its hole border runs exactly along the region's edges and
    corners — except that OpenCV steps diagonally past a corner of a pixel, which is put back."""
    height, width = bitmap.shape
    # cell (row, col) of the grid sits at [row + 2, col + 2]: one ring for the padding pixels around the bitmap
    # (background, so regions on the border close) and an empty ring outside it, all OpenCV assumes is there
    centres = np.zeros((2 * height + 5, 2 * width + 5), dtype=np.uint8)
    centres[1::2, 1::2] = 1
    centres[3:-3:2, 3:-3:2] = ~bitmap
    grid = cv2.dilate(centres, np.ones((3, 3), dtype=np.uint8))
    grid[[0, -1], :] = grid[:, [0, -1]] = 0
    contours, hierarchy = cv2.findContours(grid, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    holes = np.flatnonzero(hierarchy[0][:, 3] >= 0)  # the borders of the grid's holes: the regions' outlines
    # Only regions that may be the largest are converted (one, or a few, in all but noise). A border of n cells
    # runs along at most n pixel edges, so encloses at most (n / 4)² pixels, and OpenCV's contourArea of it is
    # within n / 8 square pixels of the outline's (a diagonal step cuts or adds 1/8): longest borders first.
    lengths = np.array([len(contours[i]) for i in holes])
    candidates, smallest_largest = [], -np.inf
    for i in holes[np.argsort(-lengths, kind="stable")]:
        slack = len(contours[i]) / 8
        if (2 * slack) ** 2 < smallest_largest:
            break
        area = cv2.contourArea(contours[i]) / 4
        candidates.append((contours[i], area + slack))
        smallest_largest = max(smallest_largest, area - slack)
    return [_outline_corners(c.reshape(-1, 2) - 2) for c, most in candidates if most >= smallest_largest]


def _outline_corners(cells: np.ndarray) -> np.ndarray:
    """A closed hole border of the double-resolution grid (cells ``x, y``) → the outline's corners in pixel-edge
    coordinates, only those where it turns, with a positive area (clockwise on the image, ``y`` down)."""
    after = np.roll(cells, -1, axis=0)
    diagonal = np.flatnonzero(np.all(cells != after, axis=1))
    # a diagonal step joins two edge midpoints; the path between them runs through their shared (even, even) corner
    start, end = cells[diagonal], after[diagonal]
    shared = np.where((start[:, :1] % 2 == 0), np.stack([start[:, 0], end[:, 1]], axis=1),
                      np.stack([end[:, 0], start[:, 1]], axis=1))
    path = np.insert(cells, diagonal + 1, shared, axis=0)
    path = path[np.all(path % 2 == 0, axis=1)] // 2  # the corners along the path, one pixel apart
    into, out = path - np.roll(path, 1, axis=0), np.roll(path, -1, axis=0) - path
    turns = into[:, 0] * out[:, 1] != into[:, 1] * out[:, 0]
    corners = path[turns].astype(np.int32)
    return corners if _signed_area(corners) > 0 else corners[::-1]


def _largest_first(corners: np.ndarray, width: int) -> tuple[float, int]:
    """Sort key: the larger area first, then (of equals) the region met first in row-major order — the one whose
    top-left pixel comes first (as scikit-image's contours came, which this module used before OpenCV)."""
    return _signed_area(corners), -int(np.min(corners[:, 1] * (width + 1) + corners[:, 0]))


def _signed_area(corners: np.ndarray) -> float:
    xs, ys = corners[:, 0].astype(np.float64), corners[:, 1].astype(np.float64)
    return 0.5 * float(np.sum(xs * np.roll(ys, -1) - ys * np.roll(xs, -1)))  # (not np.dot: BLAS threads)


def _whole_numbers(values: Sequence[float]) -> np.ndarray:
    """Mask numbers as int64, checked in one vectorised step (exports convert millions of them)."""
    array = np.asarray(values, dtype=np.float64)
    if not np.isfinite(array).all() or (array != np.floor(array)).any():
        bad = next(v for v in values if not float(v).is_integer())
        raise ValueError(f"mask values must be whole numbers, got {bad!r}")
    return array.astype(np.int64)
