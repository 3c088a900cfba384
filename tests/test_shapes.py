"""Labels and shapes, checked against CVAT 2.42's recorded task annotations and its COCO export of the same task."""

from __future__ import annotations

import cmath
import json
import math

import numpy as np
import pytest
from preannotate.formats import masks
from preannotate.shapes import (
    LABEL_TYPES,
    AttributeSpec,
    Label,
    Shape,
    ellipse_polygon,
    parse_label_list,
    rectangle_corners,
)

from tests.conftest import FIXTURES


def api_shape(shape_id: int) -> Shape:
    annotations = json.loads((FIXTURES / "api" / "GET_api_tasks_ID_annotations.json").read_text())
    data = next(s for s in annotations["shapes"] if s["id"] == shape_id)
    return Shape(label=str(data["label_id"]), type=data["type"], points=data["points"], frame=data["frame"],
                 rotation=data["rotation"])


def exported_bbox(image_id: int, area: float) -> tuple[float, float, float, float]:
    """CVAT's COCO ``[x, y, w, h]`` of one annotation as ``(x1, y1, x2, y2)``."""
    coco = json.loads((FIXTURES / "export" / "instances_default.json").read_text())
    (x, y, w, h), = [a["bbox"] for a in coco["annotations"] if a["image_id"] == image_id and a["area"] == area]
    return x, y, x + w, y + h


def pairs(flat: list[float]) -> list[tuple[float, float]]:
    return list(zip(flat[0::2], flat[1::2], strict=True))


# --- rotated rectangles -------------------------------------------------------------------------------------


def test_recorded_rotated_rectangle_corners_turn_30_degrees_about_the_centre():
    shape = api_shape(88)  # [10, 8, 40, 28], rotation 30
    assert shape.points == [10.0, 8.0, 40.0, 28.0] and shape.rotation == 30.0
    centre = complex(25, 18)
    unrotated = [complex(10, 8), complex(40, 8), complex(40, 28), complex(10, 28)]

    corners = [complex(x, y) for x, y in pairs(rectangle_corners(shape.points, shape.rotation))]

    assert len(corners) == 4
    for before, after in zip(unrotated, corners, strict=True):
        assert abs(after - centre) == pytest.approx(abs(before - centre))
        turned = math.degrees(cmath.phase((after - centre) / (before - centre)))  # angle in image axes (y down)
        assert turned == pytest.approx(30.0)
    # clockwise on screen: the top-left corner moves right and up, the top-right one right and down
    assert corners[0].real > 10 and corners[0].imag < 8
    assert corners[1].real > 40 and corners[1].imag > 8
    assert corners[0] == pytest.approx(centre + complex(-15, -10) * cmath.exp(1j * math.radians(30)))


def test_rectangle_corners_without_rotation_go_clockwise_from_top_left():
    assert rectangle_corners([6, 5, 31, 26]) == [6, 5, 31, 5, 31, 26, 6, 26]
    assert rectangle_corners([6, 5, 31, 26], 360.0) == [6, 5, 31, 5, 31, 26, 6, 26]
    assert rectangle_corners([6, 5, 31, 26, 99], 0.0) == [6, 5, 31, 5, 31, 26, 6, 26]  # extra values ignored


def test_rectangle_corners_half_and_quarter_turns():
    half = pairs(rectangle_corners([10, 8, 40, 28], 180))
    assert half == [pytest.approx(p) for p in [(40, 28), (10, 28), (10, 8), (40, 8)]]

    quarter = pairs(rectangle_corners([10, 8, 40, 28], 90))  # 30 wide, 20 high → 20 wide, 30 high
    assert quarter[0] == pytest.approx((35, 3))  # top-left goes to the top right
    xs, ys = [x for x, _ in quarter], [y for _, y in quarter]
    assert (min(xs), min(ys), max(xs), max(ys)) == pytest.approx((15, 3, 35, 33))


def test_negative_rotation_is_the_same_as_its_complement():
    assert rectangle_corners([10, 8, 40, 28], -30) == pytest.approx(rectangle_corners([10, 8, 40, 28], 330))
    assert rectangle_corners([10, 8, 40, 28], 390) == pytest.approx(rectangle_corners([10, 8, 40, 28], 30))


# --- bounding boxes -----------------------------------------------------------------------------------------


def test_bbox_of_recorded_shapes_matches_cvat_export():
    assert api_shape(89).bbox() == exported_bbox(image_id=2, area=525.0)  # rectangle [6, 5, 31, 26]
    assert api_shape(90).bbox() == exported_bbox(image_id=2, area=839.0)  # polygon
    assert api_shape(97).bbox() == (52, 22, 78, 48)                       # polygon on frame 4
    assert api_shape(91).bbox() == exported_bbox(image_id=3, area=56.0)   # mask: box in pixel-edge coordinates


def test_bbox_of_the_rotated_recorded_rectangle():
    x1, y1, x2, y2 = api_shape(88).bbox()
    # a w x h box turned by a: w cos a + h sin a wide, w sin a + h cos a high, same centre
    cos, sin = math.cos(math.radians(30)), math.sin(math.radians(30))
    width, height = 30 * cos + 20 * sin, 30 * sin + 20 * cos

    assert (x1, y1, x2, y2) == pytest.approx((25 - width / 2, 18 - height / 2, 25 + width / 2, 18 + height / 2))
    assert x2 - x1 > 30 and y2 - y1 > 20


def test_bbox_of_an_ellipse():
    shape = api_shape(93)  # centre (40, 30), rx 15, ry 8

    assert shape.bbox() == pytest.approx((25, 22, 55, 38))


@pytest.mark.parametrize("rotation", [0, 20, 45, 90, 135, 200])
def test_bbox_of_a_rotated_ellipse_holds_it_tightly(rotation):
    shape = Shape("sign", "ellipse", [40, 30, 55, 22], rotation=rotation)
    dense = ellipse_polygon(shape.points, rotation, segments=3600)
    xs, ys = dense[0::2], dense[1::2]

    x1, y1, x2, y2 = shape.bbox()
    assert x1 <= min(xs) + 1e-9 and y1 <= min(ys) + 1e-9 and x2 >= max(xs) - 1e-9 and y2 >= max(ys) - 1e-9
    assert (x1, y1, x2, y2) == pytest.approx((min(xs), min(ys), max(xs), max(ys)), abs=1e-3)
    assert ((x1 + x2) / 2, (y1 + y2) / 2) == pytest.approx((40, 30))


def test_bbox_of_points_and_polylines():
    assert api_shape(94).bbox() == (10, 10, 30, 15)   # points
    assert api_shape(95).bbox() == (0, 30, 79, 50)    # polyline


def test_bbox_of_a_mask_encoded_from_a_bitmap():
    bitmap = np.zeros((20, 30), dtype=bool)
    bitmap[4:9, 7:19] = True
    bitmap[4, 7] = False
    assert Shape("road", "mask", masks.bitmap_to_cvat_rle(bitmap)).bbox() == (7, 4, 19, 9)


def test_ellipse_polygon_samples_lie_on_the_ellipse():
    points = ellipse_polygon([40, 30, 55, 22], 25, segments=32)
    cos, sin = math.cos(math.radians(-25)), math.sin(math.radians(-25))

    assert len(points) == 64
    for x, y in pairs(points):
        dx, dy = x - 40, y - 30
        u, v = dx * cos - dy * sin, dx * sin + dy * cos  # undo the rotation
        assert (u / 15) ** 2 + (v / 8) ** 2 == pytest.approx(1)


def test_polygon_of_each_type():
    assert api_shape(90).polygon() == [40.0, 10.0, 70.0, 12.0, 65.0, 45.0, 42.0, 40.0]
    assert api_shape(88).polygon() == rectangle_corners([10, 8, 40, 28], 30)
    assert len(api_shape(93).polygon()) == 64
    assert all(isinstance(v, float) for v in Shape("a", "polyline", [1, 2, 3, 4]).polygon())


# --- labels -------------------------------------------------------------------------------------------------


def test_label_round_trip_with_attributes():
    label = Label("car", "rectangle", (AttributeSpec("color", "select", ("red", "blue")),
                                       AttributeSpec("parked", "checkbox", ("false",))), id=1)
    data = label.to_dict()

    assert data == {"id": 1, "name": "car", "type": "rectangle", "attributes": [
        {"name": "color", "input_type": "select", "values": ["red", "blue"]},
        {"name": "parked", "input_type": "checkbox", "values": ["false"]}]}
    assert list(data) == ["id", "name", "type", "attributes"]
    assert Label.from_dict(data) == label
    assert Label.from_dict(json.loads(json.dumps(data))) == label


def test_label_without_id_leaves_it_out():
    label = Label("person", "polygon")

    assert label.to_dict() == {"name": "person", "type": "polygon", "attributes": []}
    assert Label.from_dict(label.to_dict()) == label


def test_label_from_cvat_label_dict():
    # a label as CVAT's API gives it: extra keys, null type, numeric attribute values
    data = {"id": 18, "name": "car", "color": "#fa3253", "type": None, "parent_id": None,
            "attributes": [{"id": 1, "name": "size", "input_type": "number", "mutable": True,
                            "values": [0, 10, 1], "default_value": "0"}]}
    label = Label.from_dict(data)

    assert label.type == "any" and label.id == 18
    assert label.attributes == (AttributeSpec("size", "number", ("0", "10", "1"), default_value="0",
                                              mutable=True),)
    assert Label.from_dict({"name": "bare"}) == Label("bare")


@pytest.mark.parametrize("label_type", LABEL_TYPES)
def test_every_label_type_is_accepted(label_type):
    assert Label("thing", label_type).type == label_type


@pytest.mark.parametrize("name", ["", "   "])
def test_label_needs_a_name(name):
    with pytest.raises(ValueError, match="non-empty name"):
        Label(name)


def test_invalid_label_type_and_attribute_input_type():
    with pytest.raises(ValueError, match="'box'"):
        Label("car", "box")
    with pytest.raises(ValueError, match="'box'"):
        Label.from_dict({"name": "car", "type": "box"})
    with pytest.raises(ValueError, match="'slider'"):
        AttributeSpec("size", "slider")


@pytest.mark.parametrize("shape_type", ["box", "", "Rectangle"])
def test_invalid_shape_type(shape_type):
    with pytest.raises(ValueError, match="shape type"):
        Shape("car", shape_type, [0, 0, 1, 1])


def test_a_tag_is_a_classifiers_prediction_without_geometry():
    assert Shape("day", "tag", [], score=0.9).points == []
    with pytest.raises(ValueError, match="a tag is the frame's label: it has no points"):
        Shape("day", "tag", [0, 0, 1, 1])


# --- label lists --------------------------------------------------------------------------------------------


def test_parse_label_list():
    labels = parse_label_list("car, person:polygon ,road : mask")

    assert [(label.id, label.name, label.type) for label in labels] == [
        (1, "car", "any"), (2, "person", "polygon"), (3, "road", "mask")]


def test_parse_label_list_default_type_and_empty_items():
    labels = parse_label_list(",car,,person:any,", default_type="rectangle")

    assert [(label.id, label.name, label.type) for label in labels] == [(1, "car", "rectangle"), (2, "person", "any")]
    assert parse_label_list("car:", default_type="mask")[0].type == "mask"


def test_parse_label_list_rejects_duplicates():
    with pytest.raises(ValueError, match="duplicate label names: car, dog"):
        parse_label_list("car,dog,person,dog:polygon,car")


@pytest.mark.parametrize("text", ["", " ", ",", " , , "])
def test_parse_label_list_rejects_an_empty_list(text):
    with pytest.raises(ValueError, match="no labels"):
        parse_label_list(text)


@pytest.mark.parametrize("text", ["car:box", ":polygon", "car,person:rect"])
def test_parse_label_list_rejects_bad_items(text):
    with pytest.raises(ValueError):
        parse_label_list(text)


def test_box_iou_is_every_pair_and_zero_for_empty_boxes():
    from preannotate.shapes import box_iou

    a = [(0, 0, 10, 10), (5, 5, 15, 15), (3, 3, 3, 3)]
    b = [(0, 0, 10, 10), (20, 20, 30, 30)]
    got = box_iou(a, b)
    assert got.shape == (3, 2)
    assert got[0, 0] == 1.0 and got[0, 1] == 0.0
    assert got[1, 0] == pytest.approx(25 / 175)
    assert got[2].tolist() == [0.0, 0.0]  # an empty box overlaps nothing
    assert box_iou([], b).shape == (0, 2) and box_iou(a, []).shape == (3, 0)
    assert box_iou((3, 3, 3, 3), (3, 3, 3, 3))[0, 0] == 0.0  # two empty boxes: no division by zero


def test_a_skeleton_label_round_trips_with_its_sublabels_and_drawing():
    svg = '<line x1="10" y1="10" x2="40" y2="40" data-type="edge" data-node-from="1" data-node-to="2"></line>'
    dog = Label("dog", "skeleton", sublabels=(Label("nose", "points"), Label("tail", "points")), svg=svg)
    data = dog.to_dict()
    assert [s["name"] for s in data["sublabels"]] == ["nose", "tail"] and data["svg"] == svg
    assert Label.from_dict(data) == dog
    assert "sublabels" not in Label("car", "rectangle").to_dict()  # only a skeleton carries them


def test_a_skeletons_box_holds_its_visible_keypoints():
    keypoints = [Shape("nose", "points", [1, 2]), Shape("tail", "points", [30, 40], outside=True),
                 Shape("ear", "points", [5, 9])]
    assert Shape("dog", "skeleton", [], elements=keypoints).bbox() == (1.0, 2.0, 5.0, 9.0)
    hidden = [Shape("nose", "points", [1, 2], outside=True), Shape("tail", "points", [30, 40], outside=True)]
    assert Shape("dog", "skeleton", [], elements=hidden).bbox() == (1.0, 2.0, 30.0, 40.0)
