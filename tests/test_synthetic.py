"""The synthetic task generator: deterministic, CVAT-like, and readable through the same formats as CVAT data."""

from __future__ import annotations

import numpy as np
import pytest
from preannotate.formats import coco, masks
from preannotate.training.synthetic import COLOURS, HARD, LABELS, UNSEEN_LABELS, generate


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


def _digest(task) -> str:
    """The frames' pixels and annotations, and the labels, as one hash."""
    import hashlib

    digest = hashlib.sha256()
    for number, image in task.images.decoded(sorted(task.annotations.frames)):
        digest.update(np.ascontiguousarray(image).tobytes())
        frame = task.annotations.frames[number]
        digest.update(repr([(s.label, s.type, [round(p, 2) for p in s.points], s.rotation, s.occluded)
                            for s in frame.shapes] + frame.tags).encode())
    digest.update(repr([(label.name, label.type, label.id) for label in task.annotations.labels]).encode())
    return digest.hexdigest()[:16]


@pytest.mark.parametrize("arguments, expected", [  # digests taken before the unseen kinds and backgrounds came
    ({"num_frames": 12, "seed": 3}, "40ab104dffbb5398"),
    ({"num_frames": 12, "seed": 5, "tags": True, "empty_fraction": 0.2}, "8854e5403b1a3b48"),
    ({"num_frames": 12, "seed": 2, **HARD}, "17af7932b9833e5a"),
    ({"num_frames": 6, "seed": 1, "labels": ("disc", "blob")}, "ce46719d4cb118cd")])
def test_what_generate_drew_before_stays_the_same(arguments, expected):
    assert _digest(generate(**arguments, image_format="PNG")) == expected


def test_unseen_kinds_are_drawn_only_when_named_in_their_colour():
    default = generate(40, width=128, height=96, seed=0)
    assert {s.label for f in default.annotations.frames.values() for s in f.shapes} == {label.name for label in LABELS}
    named = tuple(label.name for label in UNSEEN_LABELS)
    task = generate(12, width=128, height=96, seed=1, labels=named, objects=(1, 1), empty_fraction=0,
                    image_format="PNG")
    assert [label.name for label in task.annotations.labels] == list(named)
    seen = set()
    for number, image in task.images.decoded(range(12)):
        (shape,) = task.annotations.frames[number].shapes
        assert shape.type == "polygon"
        bitmap = masks.polygon_to_bitmap([shape.points], 128, 96)
        assert bitmap.sum() > 30  # an object, not a sliver
        assert np.abs(image[bitmap].mean(axis=0) - COLOURS[shape.label]).max() < 30  # jitter 25, shading
        seen.add(shape.label)
    assert seen == set(named)


def test_unfamiliar_backgrounds_differ_from_the_default_and_unknown_ones_are_refused():
    def colourfulness(task):
        images = np.stack([image for _, image in task.images.decoded(sorted(task.annotations.frames))]).astype(float)
        return images.std(axis=(1, 2)).mean(), (images[..., 1] - images[..., [0, 2]].mean(-1)).mean()

    muted = colourfulness(generate(6, 128, 96, seed=1, empty_fraction=1.0))
    checker = colourfulness(generate(6, 128, 96, seed=1, empty_fraction=1.0, background="checker"))
    foliage = colourfulness(generate(6, 128, 96, seed=1, empty_fraction=1.0, background="foliage"))
    assert checker[0] > 2 * muted[0]  # black and white tiles: far more contrast
    assert foliage[1] > muted[1] + 20  # green
    with pytest.raises(ValueError, match="background must be one of muted, checker, foliage"):
        generate(1, background="grass")
