"""Rotated rectangles and ellipses (issue 23): learned from their outline by a mask model, served in their own type
(each predicted mask fitted: ``minAreaRect``, ``fitEllipse``), in the spec, the exports, the CVAT round trip, the
review edits and the outline mAP."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from cvat_sdk import make_client
from preannotate.cvat import lambda_spec
from preannotate.cvat.reader import read_task
from preannotate.cvat.upload import write_predictions
from preannotate.formats import coco, masks
from preannotate.models import ARCHITECTURES, Manifest, create_detector, get_architecture
from preannotate.serving import contract
from preannotate.shapes import (
    FrameAnnotations,
    Label,
    Shape,
    ellipse_polygon,
    is_turned,
    served_outline,
    served_outlines,
)
from preannotate.training import edits
from preannotate.training.evaluation import score_shapes
from preannotate.training.synthetic import generate_turned

from tests import cvat_double as double_module
from tests.conftest import encode, photo

cvat_double = double_module.cvat_double
logging.getLogger("cvat_sdk").setLevel(logging.ERROR)

WIDTH, HEIGHT = 160, 120


def raster(shape: Shape) -> np.ndarray:
    outline = ellipse_polygon(shape.points, shape.rotation, 256) if shape.type == "ellipse" else shape.polygon()
    return masks.polygon_to_bitmap([outline], WIDTH, HEIGHT)


def fitted(bitmap: np.ndarray, outline: str) -> Shape:
    kind, points, rotation = masks.fit_outline(bitmap, outline)
    return Shape("x", kind, points, rotation=rotation)


# ------------------------------------------------------------------------------------------------ fitting a mask

@pytest.mark.parametrize("rotation", [0.0, 12.5, 30.0, 44.0, 61.0, 100.0, 135.0, 300.0])
def test_a_turned_rectangle_mask_is_served_as_cvat_encodes_the_rectangle(rotation):
    truth = Shape("x", "rectangle", [40, 45, 110, 70], rotation=rotation)
    served = fitted(raster(truth), "rotated-rectangle")
    assert served.type == "rectangle"
    assert masks.shape_iou(served, truth) > 0.93  # CVAT's clockwise rotation: the other way would miss at 30°
    centre = [(served.points[0] + served.points[2]) / 2, (served.points[1] + served.points[3]) / 2]
    assert np.allclose(centre, [75, 57.5], atol=0.6)
    # the same rectangle, the smaller turn of its equal encodings: a quarter turn swaps the sides
    sides = sorted([served.points[2] - served.points[0], served.points[3] - served.points[1]])
    assert np.allclose(sides, [25, 70], atol=1.5)
    assert abs((served.rotation - rotation + 45) % 90 - 45) < 1.0
    assert served.rotation <= 45 or served.rotation >= 315


@pytest.mark.parametrize("rotation", [0.0, 20.0, 45.0, 77.0, 150.0])
def test_an_ellipse_mask_is_served_as_cvat_encodes_the_ellipse(rotation):
    truth = Shape("x", "ellipse", [80, 60, 80 + 35, 60 - 14], rotation=rotation)
    served = fitted(raster(truth), "ellipse")
    assert served.type == "ellipse" and masks.shape_iou(served, truth) > 0.95
    cx, cy, right, top = served.points
    assert np.allclose([cx, cy], [80, 60], atol=0.6)
    assert np.allclose(sorted([right - cx, cy - top]), [14, 35], atol=1.0)  # [cx, cy, cx + rx, cy - ry]
    assert abs((served.rotation - rotation + 45) % 90 - 45) < 1.5
    assert served.rotation <= 45 or served.rotation >= 315


def test_a_mask_served_upright_or_as_a_mask_and_an_empty_one():
    bitmap = np.zeros((HEIGHT, WIDTH), bool)
    bitmap[10:30, 20:60] = True
    assert masks.fit_outline(bitmap, "rectangle") == ("rectangle", [20.0, 10.0, 60.0, 30.0], 0.0)
    assert masks.fit_outline(bitmap, "rotated-rectangle") == ("rectangle", [20.0, 10.0, 60.0, 30.0], 0.0)
    assert masks.fit_outline(bitmap, "mask") is None
    assert masks.fit_outline(np.zeros((HEIGHT, WIDTH), bool), "ellipse") is None
    with pytest.raises(ValueError, match="not one of"):
        masks.fit_outline(bitmap, "circle")


# ------------------------------------------------------------------------------------------- the one rule

def shapes_of(label: str, rotations: list[float], kind: str = "rectangle") -> list[Shape]:
    return [Shape(label, kind, [0, 0, 10, 5], rotation=r) for r in rotations]


def test_what_a_mask_model_serves_each_label_as():
    assert served_outline(Label("cell", "ellipse"), []) == "ellipse"
    assert served_outline(Label("plate", "rectangle"), shapes_of("plate", [12, 30, 0])) == "rotated-rectangle"
    assert served_outline(Label("plate", "rectangle"), shapes_of("plate", [12, 0, 0])) == "rectangle"
    assert served_outline(Label("plate", "rectangle"), []) == "rectangle"
    # a quarter or half turn keeps a box upright; other labels' shapes do not count
    assert served_outline(Label("plate", "rectangle"), shapes_of("plate", [90, 180, 270.2, 30])
                          + shapes_of("car", [30, 30])) == "rectangle"
    assert served_outline(Label("thing"), shapes_of("thing", [0, 0], "ellipse") + shapes_of("thing", [5])) == "ellipse"
    assert served_outline(Label("thing"), shapes_of("thing", [20, 20])
                          + [Shape("thing", "polygon", [0, 0, 4, 0, 4, 4])]) == "rotated-rectangle"
    assert served_outline(Label("thing"), shapes_of("thing", [20])
                          + [Shape("thing", "polygon", [0, 0, 4, 0, 4, 4])]) == "mask"  # a tie
    assert served_outline(Label("thing"), []) == "mask"
    assert served_outline(Label("road", "polygon"), shapes_of("road", [20, 20])) == "mask"
    assert is_turned(Shape("a", "rectangle", [0, 0, 1, 1], rotation=359.0))
    assert not is_turned(Shape("a", "ellipse", [0, 0, 1, 1], rotation=30.0))
    frames = [FrameAnnotations(0, 10, 10, shapes=shapes_of("plate", [20]))]
    assert served_outlines([Label("plate", "rectangle"), Label("road", "polygon")], frames) == {
        "plate": "rotated-rectangle"}


def test_the_manifest_records_each_labels_outline():
    manifest = Manifest("custom", [Label("plate", "rectangle", id=1)], outlines={"plate": "rotated-rectangle"})
    again = Manifest.from_dict(manifest.to_dict())
    assert again.outlines == {"plate": "rotated-rectangle"}
    assert again.outline_of("plate") == "rotated-rectangle" and again.outline_of("road") == "mask"
    assert "outlines" not in Manifest("custom", []).to_dict()  # a box model's manifest is as before


SMALL_MASK_MODEL = ("init=random; backbone=resnet18; top-level=4; neck=fpn; neck-levels=3-4; neck-channels=32; "
                    "head=mask-rcnn; image-size=96; max-image-size=128")


@pytest.fixture(scope="module")
def mask_detector():
    labels = [Label("plate", "rectangle"), Label("cell", "ellipse"), Label("road", "polygon")]
    return create_detector("custom", labels, hyperparameters=SMALL_MASK_MODEL, device="cpu")


def test_a_mask_detector_serves_each_label_in_its_own_type(mask_detector):
    assert mask_detector.manifest.outlines == {"plate": "rectangle", "cell": "ellipse"}  # by type, until trained
    mask_detector.manifest.outlines = {"plate": "rotated-rectangle", "cell": "ellipse"}
    plate = Shape("plate", "rectangle", [40, 45, 110, 70], rotation=30)
    cell = Shape("cell", "ellipse", [80, 60, 110, 45], rotation=20)
    road = Shape("road", "polygon", [5, 5, 40, 5, 20, 30])
    bitmaps = np.stack([raster(shape) for shape in (plate, cell, road)])
    output = {"boxes": torch.tensor([s.bbox() for s in (plate, cell, road)], dtype=torch.float32),
              "labels": torch.tensor([1, 2, 3]), "scores": torch.tensor([0.9, 0.8, 0.7]),
              "masks": torch.from_numpy(bitmaps[:, None].astype(np.float32))}
    served = mask_detector.to_shapes(output, 0.5)
    assert [(s.label, s.type) for s in served] == [("plate", "rectangle"), ("cell", "ellipse"), ("road", "mask")]
    assert masks.shape_iou(served[0], plate) > 0.93 and served[0].rotation == pytest.approx(30, abs=1)
    assert masks.shape_iou(served[1], cell) > 0.95 and served[1].rotation == pytest.approx(20, abs=1.5)
    items = contract.shapes_to_response(served)  # CVAT honours rotation for rectangles and ellipses
    assert [(i["type"], round(i.get("rotation", 0))) for i in items] == [("rectangle", 30), ("ellipse", 20),
                                                                          ("mask", 0)]
    back = contract.response_to_shapes(items)
    assert [(s.type, s.points, s.rotation) for s in back[:2]] == [(s.type, s.points, s.rotation) for s in served[:2]]


# ----------------------------------------------------------------------------------------------------- the spec

def test_a_mask_model_lists_rectangle_and_ellipse_labels_and_a_box_model_says_it_cannot():
    project = [Label("plate", "rectangle"), Label("cell", "ellipse"), Label("road", "polygon"),
               Label("thing"), Label("pose", "points")]
    listed, impossible = lambda_spec.spec_labels(project, "mask", {"thing": "rotated-rectangle"})
    assert [(label.name, label.type) for label in listed] == [("plate", "rectangle"), ("cell", "ellipse"),
                                                             ("road", "mask"), ("thing", "rectangle")]
    assert [label.name for label in impossible] == ["pose"]
    listed, impossible = lambda_spec.spec_labels(project, "rectangle")
    assert [label.name for label in listed] == ["plate", "thing"]
    assert [label.name for label in impossible] == ["cell", "road", "pose"]
    sentence = lambda_spec.cannot_fill(impossible[0])
    assert sentence.startswith("cell (ellipse): a box model returns upright rectangles") and "mask-rcnn" in sentence
    mask_rcnn, ssd = get_architecture("maskrcnn_resnet50_fpn"), get_architecture("ssdlite320_mobilenet_v3_large")
    assert {"rectangle", "ellipse"} <= set(mask_rcnn.label_types) and "ellipse" not in ssd.label_types
    assert all("ellipse" in a.label_types for a in ARCHITECTURES.values() if a.output == "mask")


# ------------------------------------------------------------------------------------------------------ exports

def test_exports_keep_the_turned_outline():
    rectangle = Shape("plate", "rectangle", [40, 45, 110, 70], rotation=30)
    ellipse = Shape("cell", "ellipse", [80, 60, 110, 45], rotation=20)
    annotation = coco.shape_to_annotation(rectangle, WIDTH, HEIGHT)
    assert annotation["segmentation"] == [[round(v, 3) for v in rectangle.polygon()]]
    assert np.allclose(annotation["bbox"], np.subtract(rectangle.bbox(), [0, 0, *rectangle.bbox()[:2]]), atol=1e-3)
    annotation = coco.shape_to_annotation(ellipse, WIDTH, HEIGHT)
    assert masks.coco_rle_to_bitmap(annotation["segmentation"]).sum() == pytest.approx(np.pi * 30 * 15, rel=0.03)
    dataset = coco.to_coco([(FrameAnnotations(0, WIDTH, HEIGHT, shapes=[rectangle, ellipse]), "f.jpg")],
                           [Label("plate", "rectangle"), Label("cell", "ellipse")])
    assert [a["attributes"]["rotation"] for a in dataset["annotations"]] == [30, 20]
    _, [(frame, _)] = coco.from_coco(dataset)  # the importer gives the rotated rectangle back
    back = frame.shapes[0]
    assert (back.type, back.rotation) == ("rectangle", 30) and np.allclose(back.points, rectangle.points, atol=1e-3)


def test_the_tfrecord_keeps_the_upright_box_and_the_turned_mask():
    from preannotate.formats import tfrecord

    rectangle = Shape("plate", "rectangle", [40, 45, 110, 70], rotation=30)
    ellipse = Shape("cell", "ellipse", [80, 60, 110, 45], rotation=20)
    frame = FrameAnnotations(0, WIDTH, HEIGHT, shapes=[rectangle, ellipse])
    labels = [Label("plate", "rectangle", id=1), Label("cell", "ellipse", id=2)]
    example = tfrecord.frame_example(frame, encode(photo(WIDTH, HEIGHT)), labels, filename="f.png", source_id="0",
                                     with_masks=True)
    back, _ = tfrecord.parse_example(example.SerializeToString(), labels)[:2]
    assert [s.type for s in back.shapes] == ["mask", "mask"]
    for original, read in zip((rectangle, ellipse), back.shapes, strict=True):
        assert masks.shape_iou(original, read) > 0.9
    features = example.features.feature
    xmin = np.array(features["image/object/bbox/xmin"].float_list.value) * WIDTH
    assert np.allclose(xmin, [rectangle.bbox()[0], ellipse.bbox()[0]], atol=1.0)


def test_turned_shapes_go_to_cvat_and_come_back_with_their_rotation(cvat_double):
    labels = [{"name": "plate", "type": "rectangle"}, {"name": "cell", "type": "ellipse"}]
    task = cvat_double.add_task("turned", [("img_0.jpg", encode(photo(WIDTH, HEIGHT)), WIDTH, HEIGHT)], labels)
    served = [Shape("plate", "rectangle", [40, 45, 110, 70], score=0.9, rotation=30.5),
              Shape("cell", "ellipse", [80, 60, 110, 45], score=0.8, rotation=340.25)]
    with make_client(cvat_double.base_url, credentials=cvat_double.credentials) as client:
        write_predictions(client, task, {0: served})
        back = read_task(client, task).frames[0].shapes
    assert sorted((s.label, s.type, s.points, s.rotation) for s in back) == [
        ("cell", "ellipse", [80.0, 60.0, 110.0, 45.0], 340.25), ("plate", "rectangle", [40.0, 45.0, 110.0, 70.0], 30.5)]


# ---------------------------------------------------------------------------------------- review edits and mAP

def test_review_edits_judge_turned_shapes_by_their_outline():
    truth = [Shape("plate", "rectangle", [40, 50, 120, 60], rotation=45)]
    crossing = [Shape("plate", "rectangle", [40, 50, 120, 60], rotation=135, score=0.9)]  # the same upright box
    assert truth[0].bbox() == pytest.approx(crossing[0].bbox())
    counted = edits.count_edits([truth], [crossing], 0.5)["plate"]
    assert (counted.adds, counted.deletes) == (1, 1)  # an X is no match for its other arm
    same = [Shape("plate", "rectangle", [41, 50, 121, 60], rotation=45, score=0.9)]
    counted = edits.count_edits([truth], [same], 0.5)["plate"]
    assert (counted.adds, counted.deletes, counted.moves) == (0, 0, 0)
    assert edits.overlap(crossing, truth)[0, 0] < 0.3


def test_outline_map_scores_the_turned_outline_and_the_upright_box_falls_short():
    task = generate_turned(6, seed=3)
    frames = list(task.annotations.frames.values())
    labels = task.annotations.labels
    exact = [[Shape(s.label, s.type, s.points, rotation=s.rotation, score=0.9) for s in f.shapes] for f in frames]
    upright = [[Shape(s.label, "rectangle", list(s.bbox()), score=0.9) for s in f.shapes] for f in frames]
    assert score_shapes(frames, exact, labels, iou_type="segm")["map"] == pytest.approx(1.0)
    assert score_shapes(frames, upright, labels, iou_type="bbox")["map"] == pytest.approx(1.0)  # boxes cannot tell
    assert score_shapes(frames, upright, labels, iou_type="segm")["map50"] < 0.7


def test_the_turned_generator_draws_long_turned_boxes_and_ellipses():
    task = generate_turned(12, seed=5)
    assert [(label.name, label.type) for label in task.annotations.labels] == [("box", "rectangle"),
                                                                                ("disc", "ellipse")]
    shapes = [s for f in task.annotations.frames.values() for s in f.shapes]
    assert shapes and all(s.type in ("rectangle", "ellipse") for s in shapes)
    assert sum(is_turned(s) or s.type == "ellipse" and s.rotation % 90 for s in shapes) > 0.8 * len(shapes)
    assert [s.points for s in shapes] == [s.points for f in generate_turned(12, seed=5).annotations.frames.values()
                                          for s in f.shapes]


def test_models_architectures_says_what_each_model_fills(capsys):
    from preannotate.cli import main as cli

    assert cli(["models", "architectures"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("maskrcnn_resnet50_fpn"))
    assert "mask,rectangle,ellipse,polygon,any" in row
    assert "a rotated rectangle is served as the box around it and an ellipse label not at all" in out
