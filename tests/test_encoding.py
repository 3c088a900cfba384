"""The one encoder from our shapes to CVAT's JSON, both ways, against shapes recorded from CVAT 2.42."""

from __future__ import annotations

import json

import pytest
from preannotate.cvat import encoding
from preannotate.formats import masks
from preannotate.serving import contract
from preannotate.shapes import Shape

from tests.conftest import FIXTURES

STORED = json.loads((FIXTURES / "api" / "GET_api_tasks_ID_annotations.json").read_text())["shapes"]
REQUEST = json.loads((FIXTURES / "api" / "PATCH_api_tasks_ID_annotations__action=create.request.json").read_text())
LABELS = json.loads((FIXTURES / "api" / "GET_api_labels__task_id=ID.json").read_text())["results"]
NAME_OF = {label["id"]: label["name"] for label in LABELS}
TYPE_OF = {label["id"]: label["type"] for label in LABELS}
SPEC_NAME = {a["id"]: a["name"] for label in LABELS for a in label["attributes"]}
SPEC_ID = {label["id"]: {a["name"]: a["id"] for a in label["attributes"]} for label in LABELS}
FIELDS = ("type", "frame", "label_id", "points", "rotation", "occluded", "z_order", "source", "attributes")


def decoded(stored: dict) -> Shape:
    return encoding.shape_from_stored(stored, NAME_OF[stored["label_id"]],
                                      {SPEC_NAME[a["spec_id"]]: a["value"] for a in stored["attributes"]})


def encoded(shape: Shape, stored: dict) -> dict:
    return encoding.labeled_shape(shape, frame=stored["frame"], label_id=stored["label_id"],
                                  attribute_ids=SPEC_ID[stored["label_id"]], source=shape.source)


@pytest.mark.parametrize("stored", STORED, ids=lambda s: f"{s['id']}-{s['type']}")
def test_a_stored_shape_read_and_written_again_is_the_same_request(stored):
    body = encoded(decoded(stored), stored)
    assert {k: body[k] for k in FIELDS} == {k: stored[k] for k in FIELDS}
    assert "group" not in body  # a detector's or a file's groups would join the task's own


@pytest.mark.parametrize("sent", REQUEST["shapes"], ids=lambda s: f"{s['frame']}-{s['type']}")
def test_the_recorded_create_request_is_what_we_send_for_its_shapes(sent):
    body = encoded(decoded(sent), sent)
    defaults = {"rotation": 0.0, "occluded": False, "z_order": 0}
    assert {k: body[k] for k in FIELDS} == {k: sent.get(k, defaults.get(k)) for k in FIELDS}


def test_a_mask_for_a_polygon_label_or_when_asked_is_its_outline():
    mask = decoded(next(s for s in STORED if s["type"] == "mask"))
    as_stored = encoding.labeled_shape(mask, frame=2, label_id=20, label_type="mask")
    assert as_stored["type"] == "mask" and as_stored["points"] == mask.points
    for body in (encoding.labeled_shape(mask, frame=2, label_id=19, label_type="polygon"),
                 encoding.labeled_shape(mask, frame=2, label_id=20, as_polygon=True)):
        assert body["type"] == "polygon" and body["points"] == masks.cvat_rle_to_polygon(mask.points)
    speck = Shape("road", "mask", masks.bitmap_to_cvat_rle(_one_pixel()))
    assert encoding.labeled_shape(speck, frame=0, label_id=19, label_type="polygon") is not None  # 4 corners
    assert encoding.labeled_shape(Shape("p", "polygon", [1, 1, 2, 2]), frame=0, label_id=19) is None


def test_rotation_is_kept_in_a_turn_and_only_where_it_means_something():
    rotated = encoding.labeled_shape(Shape("car", "rectangle", [1, 2, 3, 4], rotation=-30), frame=0, label_id=18)
    assert rotated["rotation"] == 330.0
    assert encoding.labeled_shape(Shape("p", "polygon", [0, 0, 4, 0, 4, 4], rotation=15), frame=0,
                                  label_id=19)["rotation"] == 0.0
    assert encoding.detector_item(Shape("car", "rectangle", [1, 2, 3, 4], rotation=370))["rotation"] == 10.0


def test_attributes_go_by_the_labels_ids_and_unknown_names_are_left_out():
    shape = Shape("car", "rectangle", [1, 2, 3, 4], attributes={"color": "blue", "wheels": "4"})
    assert encoding.labeled_shape(shape, frame=0, label_id=18, attribute_ids=SPEC_ID[18])["attributes"] == [
        {"spec_id": 1, "value": "blue"}]


@pytest.mark.parametrize("stored", [s for s in STORED if s["type"] in ("rectangle", "polygon", "mask", "ellipse")],
                         ids=lambda s: f"{s['id']}-{s['type']}")
def test_a_detector_response_item_reads_back_as_the_same_shape(stored):
    shape = decoded(stored)
    shape.score, shape.group = 0.875, 0
    item = encoding.detector_item(shape)
    assert item["label"] == shape.label and item["confidence"] == "0.8750"
    if shape.type == "mask":  # the box bitmap for CVAT, and the outline for "convert masks to polygons"
        assert item["mask"] == masks.cvat_rle_to_nuclio_mask(shape.points)
        assert item["points"] == masks.cvat_rle_to_polygon(shape.points)
    back = contract.response_to_shapes(contract.shapes_to_response([shape]), frame=stored["frame"])[0]
    assert (back.label, back.type, back.points, back.rotation, back.score, back.attributes, back.source) == (
        shape.label, shape.type, shape.points, shape.rotation % 360, 0.875, shape.attributes, "auto")


def test_a_tag_travels_as_cvat_stores_it_label_and_attributes_without_geometry():
    tag = Shape("daytime", "tag", [], score=0.9, attributes={"color": "blue"}, source="auto")
    item = encoding.detector_item(tag)
    assert item == {"confidence": "0.9000", "label": "daytime", "type": "tag",
                    "attributes": [{"name": "color", "value": "blue"}]}
    back = contract.response_to_shapes([item], frame=3)[0]
    assert (back.label, back.type, back.points, back.frame, back.score) == ("daytime", "tag", [], 3, 0.9)
    assert encoding.labeled_tag(tag, frame=3, label_id=18, attribute_ids=SPEC_ID[18]) == {
        "frame": 3, "label_id": 18, "attributes": [{"spec_id": 1, "value": "blue"}], "source": "auto"}
    with pytest.raises(ValueError, match="no points"):
        Shape("daytime", "tag", [1, 2])


def _one_pixel():
    import numpy as np

    bitmap = np.zeros((5, 5), bool)
    bitmap[2, 2] = True
    return bitmap
