"""Every mask encoding we meet, and the conversions between them — in this one module.

* **bitmap**: a boolean ``H×W`` numpy array over the whole image (what models and rasterizers produce);
* **CVAT RLE**: a mask shape's ``points`` — row-major runs over the tight box, starting with a background run,
  then the inclusive box ``left, top, right, bottom`` (``cvat_sdk.masks`` encodes and decodes it);
* **Nuclio mask**: what a CVAT detector returns in ``mask`` — the raw 0/1 bitmap of the box, row-major, then the
  inclusive box ``xtl, ytl, xbr, ybr``;
* **COCO RLE**: column-major runs over the whole image (pycocotools), ``{"size": [h, w], "counts": ...}``;
* **polygon**: a flat ``[x1, y1, ...]`` outline in pixel-edge coordinates (pixel ``i`` spans ``[i, i + 1)``).

A mask model serves a label drawn as rotated rectangles or ellipses by fitting each predicted mask (``fit_outline``:
OpenCV's ``minAreaRect`` and ``fitEllipse``, into CVAT's encodings), and any two shapes are compared by the pixels
they cover (``shape_iou``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np
from cvat_sdk.masks import decode_mask, encode_mask
from pycocotools import mask as coco_mask

from preannotate.shapes import OUTLINES, Shape, box_iou


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


# ------------------------------------------------------------------------------------ fitted outlines and IoU

def fit_outline(bitmap: np.ndarray, outline: str) -> tuple[str, list[float], float] | None:
    """A predicted mask as the shape its label is served as (``shapes.served_outline``): ``(CVAT type, points,
    rotation)``, or None when the mask is empty (or ``outline`` is ``mask``: it stays a mask).

    * ``rectangle``: the mask's tight box, unrotated;
    * ``rotated-rectangle``: the smallest rotated rectangle holding its largest region (``cv2.minAreaRect``), shrunk
      about its centre to the mask's area where it is larger (a turned side's pixel staircase sticks out), as CVAT
      encodes it: the unrotated box ``[xtl, ytl, xbr, ybr]`` about the same centre, and the clockwise rotation;
    * ``ellipse``: the ellipse fitted to that region's outline (``cv2.fitEllipse``), as CVAT encodes it:
      ``[cx, cy, cx + rx, cy - ry]`` and the clockwise rotation.

    The outline OpenCV fits is the region's pixel-edge outline (``bitmap_to_polygon``), so a fitted shape covers the
    pixels rather than runs through their centres. Of the equal encodings (a quarter turn with the sides swapped),
    the rotation is the smaller turn, ``[0, 45]`` or ``(315, 360)``: a box that is nearly upright comes out nearly
    unrotated, as a person would draw it."""
    if outline == "mask":
        return None
    corners = bitmap_to_polygon(bitmap, tolerance=0)
    if len(corners) < 6:
        return None
    xy = np.asarray(corners, dtype=np.float32).reshape(-1, 2)
    if outline == "rectangle":
        return "rectangle", [float(v) for v in (*xy.min(axis=0), *xy.max(axis=0))], 0.0
    if outline == "rotated-rectangle":
        (cx, cy), (width, height), angle = cv2.minAreaRect(xy)
        # the pixel-edge staircase of a turned side sticks out up to half a pixel: scaled to the mask's area
        shrink = min(1.0, math.sqrt(float(np.count_nonzero(bitmap)) / max(width * height, 1e-9)))
        width, height, angle = _smaller_turn(width * shrink, height * shrink, angle)
        return "rectangle", [cx - width / 2, cy - height / 2, cx + width / 2, cy + height / 2], angle
    if outline == "ellipse":
        if len(xy) < 5:  # fitEllipse needs five points: a region of a pixel or two is its rectangle's ellipse
            (cx, cy), (width, height), angle = cv2.minAreaRect(xy)
        else:
            (cx, cy), (width, height), angle = cv2.fitEllipse(xy)
        width, height, angle = _smaller_turn(width, height, angle)
        return "ellipse", [cx, cy, cx + width / 2, cy - height / 2], angle
    raise ValueError(f"outline {outline!r} is not one of {', '.join(OUTLINES)}")


def _smaller_turn(width: float, height: float, angle: float) -> tuple[float, float, float]:
    """OpenCV's rotated rectangle (the side ``width`` turned ``angle`` degrees clockwise on the image) as its equal
    with the smaller turn: a quarter turn swaps the sides, a half turn changes nothing; rotation in ``[0, 360)``."""
    angle = float(angle) % 180
    if angle > 90:
        angle -= 180
    if angle > 45:
        width, height, angle = height, width, angle - 90
    elif angle <= -45:
        width, height, angle = height, width, angle + 90
    return float(width), float(height), round(angle, 2) % 360


def shape_iou(a: Shape, b: Shape) -> float:
    """Intersection over union of two shapes of any geometric type: two unrotated rectangles exactly, anything else
    (rotated rectangles, ellipses, polygons, masks, or a pair of different types) by the pixels it covers."""
    if a.type == b.type == "rectangle" and not a.rotation % 360 and not b.rotation % 360:
        return float(box_iou(a.bbox(), b.bbox())[0, 0])
    box_a, box_b = a.bbox(), b.bbox()
    if float(box_iou(box_a, box_b)[0, 0]) == 0.0:  # shapes whose boxes do not meet do not meet
        return 0.0
    left, top = math.floor(min(box_a[0], box_b[0])), math.floor(min(box_a[1], box_b[1]))
    width = math.ceil(max(box_a[2], box_b[2])) - left + 1
    height = math.ceil(max(box_a[3], box_b[3])) - top + 1
    pixels_a, pixels_b = _pixels(a, left, top, width, height), _pixels(b, left, top, width, height)
    union = np.logical_or(pixels_a, pixels_b).sum()
    return float(np.logical_and(pixels_a, pixels_b).sum() / union) if union else 0.0


def _pixels(shape: Shape, left: int, top: int, width: int, height: int) -> np.ndarray:
    """The shape's pixels in the window of ``width × height`` at ``left, top``."""
    if shape.type == "mask":
        bitmap, (x1, y1, x2, y2) = cvat_rle_box(shape.points)
        window = np.zeros((height, width), dtype=bool)
        window[y1 - top:y2 - top + 1, x1 - left:x2 - left + 1] = bitmap
        return window
    outline = shape.polygon()
    shifted = [v - (left if i % 2 == 0 else top) for i, v in enumerate(outline)]
    return polygon_to_bitmap([shifted], width, height)
