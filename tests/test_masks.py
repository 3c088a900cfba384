"""Mask encodings against what CVAT 2.42 itself recorded: the REST API's mask shape and CVAT's own COCO export."""

from __future__ import annotations

import json

import numpy as np
import pytest
from preannotate.formats import masks
from preannotate.shapes import Shape, ellipse_polygon
from pycocotools import mask as coco_mask

from tests.conftest import FIXTURES

MASK_WIDTH, MASK_HEIGHT = 96, 64      # frame 2, where shape 91 (a mask) lies
ELLIPSE_WIDTH, ELLIPSE_HEIGHT = 80, 60  # frame 3, where shape 93 (an ellipse) lies


def api_shape(shape_id: int) -> dict:
    annotations = json.loads((FIXTURES / "api" / "GET_api_tasks_ID_annotations.json").read_text())
    return next(s for s in annotations["shapes"] if s["id"] == shape_id)


def exported(image_id: int) -> dict:
    """CVAT's COCO export of a frame's one RLE (``iscrowd``) annotation."""
    coco = json.loads((FIXTURES / "export" / "instances_default.json").read_text())
    (annotation,) = [a for a in coco["annotations"] if a["image_id"] == image_id and a["iscrowd"]]
    return annotation


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def pixel_rectangle(width: int, height: int, left: int, top: int, right: int, bottom: int) -> np.ndarray:
    """A bitmap with pixels ``left..right`` × ``top..bottom`` (inclusive) set."""
    bitmap = np.zeros((height, width), dtype=bool)
    bitmap[top:bottom + 1, left:right + 1] = True
    return bitmap


def vertices(polygon: list[float]) -> list[tuple[float, float]]:
    return list(zip(polygon[0::2], polygon[1::2], strict=True))


def shoelace(polygon: list[float]) -> float:
    xs, ys = np.asarray(polygon[0::2]), np.asarray(polygon[1::2])
    return 0.5 * abs(float(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1))))


@pytest.fixture(scope="module")
def recorded_mask() -> np.ndarray:
    """Shape 91 as CVAT's COCO export wrote it (decoded by pycocotools itself, not by our code)."""
    rle = exported(image_id=3)["segmentation"]  # image 3 is frame 2
    assert rle["size"] == [MASK_HEIGHT, MASK_WIDTH] and isinstance(rle["counts"], list)
    return coco_mask.decode(coco_mask.frPyObjects(rle, *rle["size"])).astype(bool)


@pytest.fixture(scope="module")
def odd_shapes() -> list[np.ndarray]:
    """Bitmaps with diagonals, notches, a one-pixel neck and a saddle (two pixels touching at a corner)."""
    y, x = np.mgrid[0:40, 0:50]
    blob = ((x - 20) / 14.0) ** 2 + ((y - 18) / 9.0) ** 2 <= 1
    blob |= ((x - 33) / 8.0) ** 2 + ((y - 27) / 11.0) ** 2 <= 1
    triangle = (x >= 5) & (y >= 5) & (x - 5 <= 2 * (y - 5)) & (y < 35)
    ell = pixel_rectangle(50, 40, 5, 5, 12, 34) | pixel_rectangle(50, 40, 5, 27, 40, 34)
    ell[12:20, 25:30] = True  # an island, smaller than the L: not part of the outline
    neck = pixel_rectangle(50, 40, 2, 2, 15, 15) | pixel_rectangle(50, 40, 16, 8, 30, 8) | pixel_rectangle(
        50, 40, 31, 2, 44, 15)
    saddle = pixel_rectangle(50, 40, 10, 10, 20, 20)
    saddle[21, 21] = True  # touches the square only at a corner: a separate region
    saddle[10, 20] = False
    return [blob, triangle, ell, neck, saddle]


# --- CVAT RLE against CVAT's own COCO export ----------------------------------------------------------------


def test_recorded_cvat_rle_decodes_to_the_bitmap_cvat_exported(recorded_mask):
    bitmap = masks.cvat_rle_to_bitmap(api_shape(91)["points"], MASK_WIDTH, MASK_HEIGHT)

    assert bitmap.shape == (MASK_HEIGHT, MASK_WIDTH) and bitmap.dtype == bool
    assert np.array_equal(bitmap, recorded_mask)
    assert bitmap.sum() == exported(image_id=3)["area"] == 56


def test_exported_bitmap_encodes_to_the_recorded_cvat_rle(recorded_mask):
    assert masks.bitmap_to_cvat_rle(recorded_mask) == api_shape(91)["points"]


def test_recorded_mask_box_and_first_row():
    box_bitmap, box = masks.cvat_rle_box(api_shape(91)["points"])
    left, top, width, height = exported(image_id=3)["bbox"]  # CVAT's COCO box: [30, 20, 10, 8]

    assert box == (left, top, left + width - 1, top + height - 1) == (30, 20, 39, 27)
    assert box_bitmap.shape == (height, width)
    assert "".join(str(int(v)) for v in box_bitmap[0]) == "0001111000"
    assert "".join(str(int(v)) for v in box_bitmap[3]) == "1111111111"  # the widest row touches the box sides


def test_box_bitmap_is_the_image_bitmap_cropped(recorded_mask):
    box_bitmap, (left, top, right, bottom) = masks.cvat_rle_box(api_shape(91)["points"])

    assert np.array_equal(box_bitmap, recorded_mask[top:bottom + 1, left:right + 1])
    outside = recorded_mask.copy()
    outside[top:bottom + 1, left:right + 1] = False
    assert not outside.any()


def test_coco_rle_round_trip_matches_cvat_export(recorded_mask):
    rle = masks.bitmap_to_coco_rle(recorded_mask)
    rle = json.loads(json.dumps(rle))  # JSON-ready: survives being written and read back

    assert rle["size"] == [MASK_HEIGHT, MASK_WIDTH] and isinstance(rle["counts"], str)
    assert np.array_equal(masks.coco_rle_to_bitmap(rle), recorded_mask)
    # pycocotools reads our compressed RLE to the area and box CVAT's export states
    native = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
    assert coco_mask.area(native) == exported(image_id=3)["area"]
    assert coco_mask.toBbox(native).tolist() == exported(image_id=3)["bbox"]


def test_coco_rle_to_bitmap_reads_cvat_uncompressed_rle(recorded_mask):
    rle = exported(image_id=3)["segmentation"]
    bitmap = masks.coco_rle_to_bitmap(rle)

    assert np.array_equal(bitmap, recorded_mask)
    # column-major: the first run (1943 background pixels) ends 23 pixels into column 30 (1943 = 30 * 64 + 23)
    assert rle["counts"][0] == 1943
    assert not bitmap[:, :30].any() and not bitmap[:23, 30].any() and bitmap[23, 30]


def test_coco_rle_round_trip_of_the_exported_ellipse():
    annotation = exported(image_id=4)
    bitmap = masks.coco_rle_to_bitmap(annotation["segmentation"])

    assert bitmap.shape == (ELLIPSE_HEIGHT, ELLIPSE_WIDTH) and bitmap.sum() == annotation["area"] == 419
    assert np.array_equal(masks.coco_rle_to_bitmap(masks.bitmap_to_coco_rle(bitmap)), bitmap)
    assert np.array_equal(masks.cvat_rle_to_bitmap(masks.bitmap_to_cvat_rle(bitmap), ELLIPSE_WIDTH,
                                                   ELLIPSE_HEIGHT), bitmap)
    left, top, right, bottom = masks.bitmap_to_cvat_rle(bitmap)[-4:]
    assert [left, top, right - left + 1, bottom - top + 1] == annotation["bbox"]


# --- Nuclio detector masks ----------------------------------------------------------------------------------


def test_cvat_rle_to_nuclio_mask_of_the_recorded_mask(recorded_mask):
    mask = masks.cvat_rle_to_nuclio_mask(api_shape(91)["points"])

    assert len(mask) == 10 * 8 + 4
    assert mask[-4:] == [30, 20, 39, 27]
    assert mask[:10] == [0, 0, 0, 1, 1, 1, 1, 0, 0, 0]
    assert np.array_equal(np.reshape(mask[:-4], (8, 10)), recorded_mask[20:28, 30:40].astype(int))
    assert all(isinstance(v, int) for v in mask)


@pytest.mark.parametrize("scale", [1, 255])
def test_nuclio_mask_round_trip(scale):
    points = api_shape(91)["points"]
    mask = masks.cvat_rle_to_nuclio_mask(points)
    scaled = [v * scale for v in mask[:-4]] + mask[-4:]

    assert masks.nuclio_mask_to_cvat_rle(scaled) == points
    assert masks.nuclio_mask_to_cvat_rle([float(v) for v in scaled]) == points


def test_nuclio_mask_starting_with_foreground_gives_an_empty_first_run():
    # box 2x2 at (5, 7): row-major 1 1 / 0 1
    rle = masks.nuclio_mask_to_cvat_rle([1, 1, 0, 1, 5, 7, 6, 8])

    assert rle == [0.0, 2.0, 1.0, 1.0, 5.0, 7.0, 6.0, 8.0]
    bitmap = masks.cvat_rle_to_bitmap(rle, 10, 10)
    assert np.argwhere(bitmap).tolist() == [[7, 5], [7, 6], [8, 6]]  # (row, col)
    assert masks.cvat_rle_to_nuclio_mask(rle) == [1, 1, 0, 1, 5, 7, 6, 8]


def test_nuclio_mask_all_background():
    rle = masks.nuclio_mask_to_cvat_rle([0] * 6 + [1, 2, 3, 3])

    assert rle == [6.0, 1.0, 2.0, 3.0, 3.0]
    assert not masks.cvat_rle_to_bitmap(rle, 5, 5).any()


# --- polygons -----------------------------------------------------------------------------------------------


def test_bitmap_to_polygon_of_a_rectangle_is_its_pixel_edge_outline():
    bitmap = pixel_rectangle(12, 10, left=2, top=3, right=5, bottom=6)
    polygon = masks.bitmap_to_polygon(bitmap)

    # pixels 2..5 span x 2..6 and pixels 3..6 span y 3..7
    assert len(polygon) == 8
    assert set(vertices(polygon)) == {(2.0, 3.0), (6.0, 3.0), (6.0, 7.0), (2.0, 7.0)}
    assert shoelace(polygon) == bitmap.sum() == 16  # the corners come in outline order, not crossed
    assert np.array_equal(masks.polygon_to_bitmap([polygon], 12, 10), bitmap)


def test_bitmap_to_polygon_of_an_empty_bitmap():
    assert masks.bitmap_to_polygon(np.zeros((10, 12), dtype=bool)) == []
    assert masks.bitmap_to_polygon(np.zeros((10, 12), dtype=bool), tolerance=0) == []


@pytest.mark.parametrize("tolerance", [0, 1.0])
def test_single_pixel_and_one_pixel_line_keep_their_outline(tolerance):
    pixel = pixel_rectangle(8, 8, 4, 5, 4, 5)
    line = pixel_rectangle(20, 8, 3, 2, 16, 2)

    assert set(vertices(masks.bitmap_to_polygon(pixel, tolerance))) == {(4, 5), (5, 5), (5, 6), (4, 6)}
    assert set(vertices(masks.bitmap_to_polygon(line, tolerance))) == {(3, 2), (17, 2), (17, 3), (3, 3)}
    assert np.array_equal(masks.polygon_to_bitmap([masks.bitmap_to_polygon(line, tolerance)], 20, 8), line)


def test_polygon_round_trip_is_exact_without_simplification(odd_shapes):
    for bitmap in odd_shapes[:2]:  # single regions without holes
        polygon = masks.bitmap_to_polygon(bitmap, tolerance=0)
        assert all(float(v).is_integer() for v in polygon)  # corners of pixels
        assert np.array_equal(masks.polygon_to_bitmap([polygon], 50, 40), bitmap)


def test_polygon_round_trip_of_odd_shapes_with_default_tolerance(odd_shapes, recorded_mask):
    blob, triangle, ell, neck, saddle = odd_shapes
    for bitmap in (blob, triangle, recorded_mask):
        height, width = bitmap.shape
        polygon = masks.bitmap_to_polygon(bitmap)
        assert iou(masks.polygon_to_bitmap([polygon], width, height), bitmap) >= 0.9
        assert len(polygon) < len(masks.bitmap_to_polygon(bitmap, tolerance=0))  # simplified


def test_polygon_is_the_outline_of_the_largest_region(odd_shapes):
    _, _, ell, neck, saddle = odd_shapes
    island = pixel_rectangle(50, 40, 25, 12, 29, 19)
    assert np.array_equal(masks.polygon_to_bitmap([masks.bitmap_to_polygon(ell, 0)], 50, 40), ell & ~island)
    # a one-pixel neck still joins two squares into one region
    assert np.array_equal(masks.polygon_to_bitmap([masks.bitmap_to_polygon(neck, 0)], 50, 40), neck)
    # a pixel touching only a corner is not part of the region
    corner = pixel_rectangle(50, 40, 21, 21, 21, 21)
    assert np.array_equal(masks.polygon_to_bitmap([masks.bitmap_to_polygon(saddle, 0)], 50, 40), saddle & ~corner)


def test_polygon_of_a_mask_with_a_hole_is_its_outer_outline():
    ring = pixel_rectangle(20, 20, 2, 2, 15, 15) & ~pixel_rectangle(20, 20, 6, 6, 10, 10)

    assert set(vertices(masks.bitmap_to_polygon(ring))) == {(2, 2), (16, 2), (16, 16), (2, 16)}


def test_cvat_rle_to_polygon_is_in_image_coordinates(recorded_mask):
    points = api_shape(91)["points"]
    exact = masks.cvat_rle_to_polygon(points, tolerance=0)
    simplified = masks.cvat_rle_to_polygon(points)

    assert np.array_equal(masks.polygon_to_bitmap([exact], MASK_WIDTH, MASK_HEIGHT), recorded_mask)
    assert iou(masks.polygon_to_bitmap([simplified], MASK_WIDTH, MASK_HEIGHT), recorded_mask) >= 0.9
    for polygon in (exact, simplified):
        xs, ys = polygon[0::2], polygon[1::2]
        assert (min(xs), min(ys), max(xs), max(ys)) == (30, 20, 40, 28)  # the box in pixel-edge coordinates
    with pytest.raises(ValueError, match="formats.masks.cvat_rle_to_polygon"):  # shapes sit below the codecs
        Shape("road", "mask", points).polygon()


def test_polygon_to_bitmap_joins_polygons_and_skips_degenerate_ones():
    first, second = [1, 1, 4, 1, 4, 3, 1, 3], [6, 5, 9, 5, 9, 8, 6, 8]
    bitmap = masks.polygon_to_bitmap([first, second, [0, 0, 5, 5]], 10, 10)

    expected = pixel_rectangle(10, 10, 1, 1, 3, 2) | pixel_rectangle(10, 10, 6, 5, 8, 7)
    assert np.array_equal(bitmap, expected)
    assert not masks.polygon_to_bitmap([], 10, 10).any()
    assert not masks.polygon_to_bitmap([[0, 0, 5, 5]], 10, 10).any()
    assert masks.polygon_to_bitmap([], 10, 7).shape == (7, 10)


# --- masks at the image border ------------------------------------------------------------------------------


def test_mask_covering_the_whole_image():
    bitmap = np.ones((6, 9), dtype=bool)
    rle = masks.bitmap_to_cvat_rle(bitmap)

    assert rle == [0.0, 54.0, 0.0, 0.0, 8.0, 5.0]
    assert np.array_equal(masks.cvat_rle_to_bitmap(rle, 9, 6), bitmap)
    assert masks.nuclio_mask_to_cvat_rle(masks.cvat_rle_to_nuclio_mask(rle)) == rle
    assert np.array_equal(masks.coco_rle_to_bitmap(masks.bitmap_to_coco_rle(bitmap)), bitmap)
    assert set(vertices(masks.bitmap_to_polygon(bitmap))) == {(0, 0), (9, 0), (9, 6), (0, 6)}


@pytest.mark.parametrize("corner", ["top-left", "top-right", "bottom-left", "bottom-right"])
def test_mask_in_an_image_corner(corner):
    width, height = 16, 12
    left = 0 if "left" in corner else width - 5
    top = 0 if "top" in corner else height - 4
    bitmap = pixel_rectangle(width, height, left, top, left + 4, top + 3)
    bitmap[top if "bottom" in corner else top + 3, left if "right" in corner else left + 4] = False  # notch

    rle = masks.bitmap_to_cvat_rle(bitmap)
    assert rle[-4:] == [left, top, left + 4, top + 3]
    assert np.array_equal(masks.cvat_rle_to_bitmap(rle, width, height), bitmap)
    assert np.array_equal(masks.coco_rle_to_bitmap(masks.bitmap_to_coco_rle(bitmap)), bitmap)
    polygon = masks.bitmap_to_polygon(bitmap, tolerance=0)
    xs, ys = polygon[0::2], polygon[1::2]
    assert (min(xs), min(ys), max(xs), max(ys)) == (left, top, left + 5, top + 4)
    assert np.array_equal(masks.polygon_to_bitmap([polygon], width, height), bitmap)


def test_empty_bitmap_encodes_as_an_empty_one_pixel_box():
    rle = masks.bitmap_to_cvat_rle(np.zeros((5, 7), dtype=bool))

    assert rle == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert not masks.cvat_rle_to_bitmap(rle, 7, 5).any()
    assert masks.cvat_rle_to_nuclio_mask(rle) == [0, 0, 0, 0, 0]


# --- invalid input ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("points", [
    [3, 4, 5, 30, 20, 39, 27],            # 12 pixels for a 10x8 box
    [3, 4, 5, 6, 3, 8, 1, 20, 1, 8, 3, 6, 5, 4, 4, 30, 20, 39, 27],  # one pixel too many
    [5, 40, 20, 39, 27],                  # right < left
    [5, 30, 28, 39, 27],                  # bottom < top
])
def test_runs_not_matching_the_box_are_rejected(points):
    with pytest.raises(ValueError):
        masks.cvat_rle_box(points)
    with pytest.raises(ValueError):
        masks.cvat_rle_to_nuclio_mask(points)
    with pytest.raises(ValueError):
        masks.cvat_rle_to_bitmap(points, MASK_WIDTH, MASK_HEIGHT)
    with pytest.raises(ValueError):
        masks.cvat_rle_to_polygon(points)


@pytest.mark.parametrize("bad", [3.5, float("nan"), float("inf")])
def test_non_integer_values_are_rejected(bad):
    points = list(api_shape(91)["points"])
    points[0] = bad
    with pytest.raises(ValueError):
        masks.cvat_rle_box(points)
    with pytest.raises(ValueError):
        masks.cvat_rle_to_bitmap(points, MASK_WIDTH, MASK_HEIGHT)
    box = list(api_shape(91)["points"][-4:])
    box[2] = bad
    with pytest.raises(ValueError):
        masks.nuclio_mask_to_cvat_rle([1] * 80 + box)


def test_box_outside_the_image_is_rejected():
    points = api_shape(91)["points"]
    with pytest.raises(ValueError):
        masks.cvat_rle_to_bitmap(points, 39, MASK_HEIGHT)  # right column 39 needs 40 pixels
    with pytest.raises(ValueError):
        masks.cvat_rle_to_bitmap(points, MASK_WIDTH, 27)


@pytest.mark.parametrize("mask", [
    [1, 0, 1, 0, 1, 5, 7, 6, 8],  # 5 values for a 2x2 box
    [1, 0, 1, 5, 7, 6, 8],        # 3 values
    [5, 7, 4, 8],                 # empty box
])
def test_nuclio_mask_not_matching_its_box_is_rejected(mask):
    with pytest.raises(ValueError):
        masks.nuclio_mask_to_cvat_rle(mask)


# --- an ellipse against CVAT's export of it -----------------------------------------------------------------


def test_ellipse_rasterized_against_cvat_export():
    shape = api_shape(93)
    cvat = masks.coco_rle_to_bitmap(exported(image_id=4)["segmentation"])
    ours = masks.polygon_to_bitmap([Shape("sign", "ellipse", shape["points"]).polygon()], ELLIPSE_WIDTH,
                                   ELLIPSE_HEIGHT)

    # CVAT's exporter draws the ellipse around the *pixel* (40, 30) with radii 15.5 x 8.5: half a pixel off its
    # own pixel-edge geometry (centre 40, 30; radii 15 x 8), so its mask is a ring of pixels larger than ours.
    assert ours.sum() == pytest.approx(np.pi * 15 * 8, rel=0.03)
    assert (ours & cvat).sum() / ours.sum() >= 0.99
    assert iou(ours, cvat) >= 0.85
    cx, cy, right, top = shape["points"]
    pixel_centred = ellipse_polygon([cx + 0.5, cy + 0.5, right + 1, top], segments=64)
    assert iou(masks.polygon_to_bitmap([pixel_centred], ELLIPSE_WIDTH, ELLIPSE_HEIGHT), cvat) >= 0.95


# --- polygons traced by OpenCV ------------------------------------------------------------------------------


def test_polygon_is_opencvs_contour_moved_out_to_the_pixel_edges():
    import cv2

    bitmap = pixel_rectangle(12, 10, left=2, top=3, right=5, bottom=6)
    (centres,), _ = cv2.findContours(bitmap.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)

    # CVAT's functions outline the boundary pixels' centres, half a pixel inside; ours is the pixels' own edges
    assert set(map(tuple, centres.reshape(-1, 2).tolist())) == {(2, 3), (5, 3), (5, 6), (2, 6)}
    assert set(vertices(masks.bitmap_to_polygon(bitmap))) == {(2, 3), (6, 3), (6, 7), (2, 7)}


def test_outline_runs_through_a_pinch_and_keeps_the_pocket_out():
    # a square ring cut open at its top-right pixel: its ends (2, 6) and (3, 7) touch at the corner (7, 3) only,
    # so it is one region (through the other three sides) whose inside is open to the outside through that corner
    ring = pixel_rectangle(12, 12, 2, 2, 7, 7) & ~pixel_rectangle(12, 12, 3, 3, 6, 6)
    ring[2, 7] = False
    polygon = masks.bitmap_to_polygon(ring, tolerance=0)

    assert np.array_equal(masks.polygon_to_bitmap([polygon], 12, 12), ring)  # the inside is not filled
    assert vertices(polygon).count((7, 3)) == 2  # the outline passes through the pinch twice


def test_of_equal_regions_the_first_in_row_major_order_is_outlined():
    bitmap = pixel_rectangle(20, 10, 12, 1, 14, 2) | pixel_rectangle(20, 10, 1, 6, 3, 7)  # two 3x2 regions

    assert set(vertices(masks.bitmap_to_polygon(bitmap))) == {(12, 1), (15, 1), (15, 3), (12, 3)}


def test_polygon_of_a_noisy_mask_is_the_largest_region_with_its_holes_filled():
    import cv2

    rng = np.random.default_rng(7)
    y, x = np.mgrid[0:300, 0:300]
    bitmap = ((x - 150) / 100.0) ** 2 + ((y - 140) / 80.0) ** 2 + rng.normal(0, 0.2, (300, 300)) < 1
    bitmap |= rng.random((300, 300)) < 0.03  # specks everywhere, some touching the blob at a corner only
    count, labels, stats, _ = cv2.connectedComponentsWithStats(bitmap.astype(np.uint8), connectivity=4)
    region = labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    outside = np.pad(~region, 1, constant_values=True).astype(np.uint8)
    cv2.floodFill(outside, None, (0, 0), 2, flags=8)  # background reaching the border, 8-connected
    filled = outside[1:-1, 1:-1] != 2

    exact = masks.bitmap_to_polygon(bitmap, tolerance=0)
    assert count > 100 and np.array_equal(masks.polygon_to_bitmap([exact], 300, 300), filled)
    simplified = masks.bitmap_to_polygon(bitmap, tolerance=1.5)
    assert len(simplified) < len(exact) / 2
    assert iou(masks.polygon_to_bitmap([simplified], 300, 300), filled) >= 0.95


@pytest.mark.parametrize("tolerance", [0.5, 1.0, 3.0])
def test_simplified_outline_stays_within_the_tolerance(odd_shapes, tolerance):
    blob, triangle, *_ = odd_shapes
    for bitmap in (blob, triangle):
        exact = np.reshape(masks.bitmap_to_polygon(bitmap, tolerance=0), (-1, 2))
        simplified = np.reshape(masks.bitmap_to_polygon(bitmap, tolerance), (-1, 2))
        starts, ends = simplified, np.roll(simplified, -1, axis=0)
        for corner in exact:  # every corner of the exact outline lies within the tolerance of some simplified edge
            along = np.clip(np.einsum("ij,ij->i", corner - starts, ends - starts)
                            / np.einsum("ij,ij->i", ends - starts, ends - starts), 0, 1)
            nearest = starts + along[:, None] * (ends - starts)
            assert np.min(np.linalg.norm(corner - nearest, axis=1)) <= tolerance + 1e-9
