"""The synthetic task generator: deterministic, CVAT-like, and readable through the same formats as CVAT data."""

from __future__ import annotations

import numpy as np
import pytest
from preannotate.formats import coco, masks
from preannotate.training.synthetic import COLOURS, generate


@pytest.fixture(scope="module")
def task():
    return generate(24, width=128, height=96, seed=3)


def test_same_seed_same_task_other_seed_other_task(task):
    again = generate(24, width=128, height=96, seed=3)
    other = generate(24, width=128, height=96, seed=4)

    assert again.images.files == task.images.files
    assert again.annotations.frames == task.annotations.frames
    assert other.images.files != task.images.files


def test_labels_are_numbered_and_typed_like_cvat_labels(task):
    labels = task.annotations.labels
    assert [(label.name, label.type, label.id) for label in labels] == [
        ("box", "rectangle", 1), ("disc", "ellipse", 2), ("triangle", "polygon", 3), ("blob", "mask", 4)]
    only = generate(3, labels=("disc", "blob"), seed=1).annotations.labels
    assert [(label.name, label.id) for label in only] == [("disc", 1), ("blob", 2)]


def test_every_label_and_shape_type_occurs_with_occlusion_and_negatives():
    task = generate(60, width=128, height=96, seed=0, empty_fraction=0.1)
    shapes = [s for f in task.annotations.frames.values() for s in f.shapes]
    by_label = {s.label: s.type for s in shapes}

    assert by_label == {"box": "rectangle", "disc": "ellipse", "triangle": "polygon", "blob": "mask"}
    assert any(s.occluded for s in shapes)
    assert any(s.rotation for s in shapes if s.type == "rectangle")
    assert any(not f.shapes for f in task.annotations.frames.values())
    assert all(s.frame == number for number, f in task.annotations.frames.items() for s in f.shapes)


def test_images_decode_at_the_annotated_size_and_objects_have_their_colour(task):
    for number, image in task.images.decoded(range(24)):
        frame = task.annotations.frames[number]
        assert image.shape == (frame.height, frame.width, 3)
        for shape in frame.shapes:
            if shape.type == "mask":  # a mask holds the visible pixels: they are the label's colour
                bitmap = masks.cvat_rle_to_bitmap(shape.points, frame.width, frame.height)
                mean = image[bitmap].mean(axis=0)
                nearest = min(COLOURS, key=lambda name: np.abs(mean - COLOURS[name]).sum())
                assert nearest == shape.label


def test_exports_through_the_coco_format(task):
    frames = list(task.annotations.frames.values())
    dataset = coco.to_coco([(f, f.name) for f in frames], task.annotations.labels)

    assert len(dataset["images"]) == 24
    assert len(dataset["annotations"]) == sum(len(f.shapes) for f in frames)
    for annotation in dataset["annotations"]:
        x, y, w, h = annotation["bbox"]
        assert w > 4 and h > 4 and 0 <= x and x + w <= 128 + 1e-6 and 0 <= y and y + h <= 96 + 1e-6
