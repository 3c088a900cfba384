"""Skeletons and points (issue 23): the keypoint family, its training targets, OKS evaluation, the report's drawing
and the synthetic pose frames."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from preannotate.models import ModelStore, create_detector, get_architecture, load_detector, publish_detector
from preannotate.models.keypoints import (
    MIN_BOX,
    VISIBLE_CONFIDENCE,
    KeypointLayout,
    object_box,
    review_box,
    skeleton_edges,
    skeleton_label,
)
from preannotate.shapes import FrameAnnotations, Label, Shape
from preannotate.training import data, synthetic
from preannotate.training.evaluation import CocoAccumulator, score_keypoints, summary

DOG = skeleton_label("dog", ["head", "tail", "paw"], [(0, 1), (1, 2)], label_id=1)
LABELS = [DOG, Label("nose", "points", id=2), Label("car", "rectangle", id=3)]
SMALL = "init=random; image-size=96; max-image-size=128"
KEYPOINT_MODELS = ["keypointrcnn_mobilenet_v3_large_fpn",
                   pytest.param("keypointrcnn_resnet50_fpn", marks=pytest.mark.slow)]  # a minute on a busy CPU


def dog(head, tail, paw, hidden=()) -> Shape:
    return Shape("dog", "skeleton", [], elements=[
        Shape(name, "points", list(xy), outside=name in hidden)
        for name, xy in (("head", head), ("tail", tail), ("paw", paw))])


# --- what the numbers mean ----------------------------------------------------------------------------------------

def test_each_keypoint_label_has_its_own_channels_and_other_labels_none():
    layout = KeypointLayout.of([LABELS[2], LABELS[1], LABELS[0]])  # by class index, whatever the order given
    assert layout.slots == {"dog": (0, 3), "nose": (3, 1)} and layout.total == 4
    assert list(layout.channels("nose")) == [3] and list(layout.channels("car")) == []


def test_a_skeleton_without_keypoints_is_refused_in_a_sentence():
    with pytest.raises(ValueError, match="skeleton label 'cat' has no sublabels"):
        KeypointLayout.of([Label("cat", "skeleton", id=1)])
    with pytest.raises(ValueError, match="learns skeleton and points labels: none of car"):
        create_detector("keypointrcnn_mobilenet_v3_large_fpn", [Label("car", "rectangle", id=1)],
                        hyperparameters=SMALL)


def test_edges_are_read_from_cvat_svg_by_the_names_of_its_nodes():
    # as CVAT's skeleton editor stores it: nodes numbered in drawing order, which need not be the sublabels' order
    svg = ('<line x1="1" y1="1" x2="2" y2="2" data-type="edge" data-node-from="2" data-node-to="1"></line>'
           '<line x1="1" y1="1" x2="2" y2="2" data-type="edge" data-node-from="3" data-node-to="2"></line>'
           '<circle r="0.75" cx="1" cy="1" data-type="element node" data-node-id="1" data-label-name="paw"></circle>'
           '<circle r="0.75" cx="2" cy="2" data-type="element node" data-node-id="2" data-label-name="head"></circle>'
           '<circle r="0.75" cx="3" cy="3" data-type="element node" data-node-id="3" data-label-name="tail">'
           '</circle>')
    label = Label("dog", "skeleton", sublabels=DOG.sublabels, svg=f'<svg viewBox="0 0 100 100">{svg}</svg>')
    assert skeleton_edges(label) == [(0, 2), (1, 0)]  # head-paw, tail-head: by name, not by number
    assert skeleton_edges(DOG) == [(0, 1), (1, 2)]  # what we write reads back


def test_a_nameless_node_is_the_sublabel_of_its_number():
    svg = '<line data-node-from="1" data-node-to="3"></line>'
    assert skeleton_edges(Label("dog", "skeleton", sublabels=DOG.sublabels, svg=svg)) == [(0, 2)]
    assert skeleton_edges(Label("dog", "skeleton", sublabels=DOG.sublabels, svg="<line data-node-from=")) == []


def test_an_objects_box_is_its_visible_keypoints_padded_and_a_point_gets_an_extent():
    assert object_box([(10, 10, True), (50, 30, True), (90, 90, False)], 200, 100) == pytest.approx(
        (6, 8, 54, 32))  # 10 % of 40 and of 20 on each side; the hidden one left out
    x1, y1, x2, y2 = object_box([(100, 50, True)], 200, 100)
    assert (x2 - x1, y2 - y1) == pytest.approx((MIN_BOX * 100, MIN_BOX * 100)) and (x1 + x2) / 2 == 100
    assert object_box([(0, 0, False)], 200, 100) is None
    assert object_box([(1, 1, True)], 200, 100)[:2] == (0.0, 0.0)  # kept on the frame


def test_review_edits_match_a_point_served_a_few_pixels_off():
    from preannotate.training import edits

    truth = [Shape("nose", "points", [50, 50])]
    near, off, far = (Shape("nose", "points", xy, score=0.9) for xy in ([52, 51], [56, 50], [70, 60]))
    assert edits.count_edits([truth], [[near]], 0.5)["nose"].total == 0
    assert edits.count_edits([truth], [[off]], 0.5)["nose"].moves == 1
    assert edits.count_edits([truth], [[far]], 0.5)["nose"].total == 2  # a delete and an add
    assert review_box(dog((10, 10), (30, 10), (0, 0), hidden={"paw"})) == (-4, -2, 44, 22)  # the hidden paw: not


# --- training targets ---------------------------------------------------------------------------------------------

def test_targets_hold_coco_visibility_in_each_labels_channels():
    frame = FrameAnnotations(0, 200, 100, shapes=[
        dog((20, 20), (60, 40), (30, 80), hidden={"tail"}),
        Shape("nose", "points", [150, 50, 170, 60]),  # a points shape of two points: two objects
        Shape("car", "rectangle", [100, 10, 140, 30]),
        dog((0, 0), (0, 0), (0, 0), hidden={"head", "tail", "paw"}),  # nothing visible: nothing to learn
    ])
    boxes, classes, keypoints = data.keypoint_targets(frame, LABELS, KeypointLayout.of(LABELS))
    assert classes.tolist() == [1, 2, 2, 3] and keypoints.shape == (4, 4, 3)
    assert keypoints[0].tolist() == [[20, 20, 2], [0, 0, 0], [30, 80, 2], [0, 0, 0]]  # the tail hidden: v=0
    assert keypoints[1].tolist() == [[0, 0, 0]] * 3 + [[150, 50, 2]]
    assert keypoints[2, 3].tolist() == [170, 60, 2] and not keypoints[3].any()  # the car: a box, no keypoints
    assert boxes[0].tolist() == pytest.approx([19, 14, 31, 86])  # the visible head and paw, padded
    assert boxes[3].tolist() == [100, 10, 140, 30]


def test_the_dataset_moves_keypoints_with_the_pixels_and_never_flips_them():
    task = synthetic.generate_skeletons(2, 160, 120, seed=3)
    hp = get_architecture("keypointrcnn_mobilenet_v3_large_fpn")
    from preannotate.models import hyperparameters_for

    hp = hyperparameters_for(hp.name, "image-size=60; max-image-size=80; augment=flip")
    transform = data.transforms(hp, False, train=True, keypoints=True)
    assert not any(isinstance(step, torchvision.transforms.v2.RandomHorizontalFlip) for step in transform.transforms)
    items = [(frame, task.images) for frame in task.annotations.frames.values()]
    dataset = data.DetectionDataset(items, task.annotations.labels, transform, keypoints=True)
    image, target = dataset[0]
    assert image.shape[-2:] == (60, 80) and set(target) == {"boxes", "labels", "keypoints"}
    frame = items[0][0]
    figure = next(s for s in frame.shapes if s.type == "skeleton")
    expected = [[e.points[0] / 2, e.points[1] / 2, 0 if e.outside else 2] for e in figure.elements]
    row = target["keypoints"][0, :7].tolist()
    assert [[round(v, 3) for v in point] for point in row] == [
        [round(v, 3) for v in point] if point[2] else [0, 0, 0] for point in expected]


def test_a_keypoint_moved_off_the_frame_is_no_longer_visible():
    target = {"labels": torch.tensor([1]), "keypoints": torch.tensor([[[5.0, 5.0], [-3.0, 5.0], [5.0, 20.0]]]),
              "visibility": torch.tensor([[2.0, 2.0, 2.0]])}
    assert data._with_visibility(target, (10, 10), 3)["keypoints"].tolist() == [[[5, 5, 2], [0, 0, 0], [0, 0, 0]]]
    nothing = {"labels": torch.zeros(0, dtype=torch.int64), "keypoints": torch.zeros(0, 2),  # all dropped
               "visibility": torch.zeros(0)}
    assert data._with_visibility(nothing, (10, 10), 3)["keypoints"].shape == (0, 3, 3)


# --- the family -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", KEYPOINT_MODELS)
def test_keypoint_models_serve_skeletons_points_and_boxes_in_cvats_encoding(name):
    torch.manual_seed(0)
    detector = create_detector(name, LABELS, hyperparameters=SMALL)
    detector.model.roi_heads.score_thresh = 0.0
    detector.model.roi_heads.detections_per_img = 300  # random weights score every class alike: see them all
    [shapes] = detector.detect([np.random.default_rng(0).integers(0, 255, (60, 80, 3), np.uint8)], 0.0)
    kinds = {shape.label: shape for shape in shapes}
    assert set(kinds) == {"dog", "nose", "car"}
    skeleton = kinds["dog"]
    assert skeleton.type == "skeleton" and skeleton.points == [] and skeleton.source == "auto"
    assert [e.label for e in skeleton.elements] == ["head", "tail", "paw"]
    assert all(e.type == "points" and len(e.points) == 2 for e in skeleton.elements)
    assert kinds["nose"].type == "points" and len(kinds["nose"].points) == 2
    assert kinds["car"].type == "rectangle" and len(kinds["car"].points) == 4
    for shape in shapes:
        x1, y1, x2, y2 = shape.bbox()
        assert -1 <= x1 <= x2 <= 81 and -1 <= y1 <= y2 <= 61


def test_a_keypoint_the_heatmap_is_unsure_of_is_served_outside():
    detector = create_detector("keypointrcnn_mobilenet_v3_large_fpn", LABELS, hyperparameters=SMALL)
    sure = [0.9, VISIBLE_CONFIDENCE / 2, VISIBLE_CONFIDENCE, 0.0]
    output = {"boxes": torch.tensor([[0.0, 0, 10, 10], [0, 0, 5, 5]]), "labels": torch.tensor([1, 2]),
              "scores": torch.tensor([0.8, 0.7]),
              "keypoints": torch.tensor([[[1.0, 2, 1], [3, 4, 1], [5, 6, 1], [7, 8, 1]]] * 2),
              "keypoint_confidence": torch.tensor([sure, sure])}
    skeleton, point = detector.to_shapes(output, 0.5)
    assert [(e.points, e.outside) for e in skeleton.elements] == [([1, 2], False), ([3, 4], True), ([5, 6], False)]
    assert point.type == "points" and point.points == [7, 8] and point.score == pytest.approx(0.7)


def test_keypoints_confidence_is_the_peak_of_each_heatmap(monkeypatch):
    detector = create_detector("keypointrcnn_mobilenet_v3_large_fpn", LABELS, hyperparameters=SMALL)
    detector.model.roi_heads.score_thresh = 0.0
    image = np.zeros((60, 80, 3), np.uint8)
    [output] = detector._outputs([image])
    heatmaps = detector._heatmaps
    assert output["keypoint_confidence"].shape == (len(output["boxes"]), 4)
    expected = heatmaps.flatten(2).softmax(-1).amax(-1)
    assert torch.allclose(output["keypoint_confidence"], expected)


def test_a_letterboxed_keypoint_model_takes_the_padding_off_its_keypoints():
    torch.manual_seed(0)
    detector = create_detector("keypointrcnn_mobilenet_v3_large_fpn", LABELS, hyperparameters=SMALL)
    detector.model.roi_heads.score_thresh = 0.0
    image = np.random.default_rng(1).integers(0, 255, (40, 80, 3), np.uint8)
    plain = detector._outputs([image])[0]
    detector.letterbox = True
    padded = detector.model([torch.nn.functional.pad(detector.to_tensor(image), (0, 0, 20, 20))])[0]
    unpadded = detector._outputs([image])[0]
    assert torch.allclose(unpadded["keypoints"][..., 1], padded["keypoints"][..., 1] - 20)
    assert plain["keypoints"].shape[1:] == unpadded["keypoints"].shape[1:]


def test_a_published_keypoint_model_loads_with_its_skeleton_and_detects_the_same(tmp_path):
    torch.manual_seed(0)
    created = create_detector("keypointrcnn_mobilenet_v3_large_fpn", LABELS, hyperparameters=SMALL)
    store = ModelStore(tmp_path)
    loaded = load_detector(store.path("pose", publish_detector(created, store, "pose")))
    assert loaded.labels[0].sublabels == DOG.sublabels and loaded.labels[0].svg == DOG.svg
    image = np.random.default_rng(2).integers(0, 255, (60, 80, 3), np.uint8)
    first, again = created.detect([image], 0.0)[0], loaded.detect([image], 0.0)[0]
    assert [(s.label, s.type, [e.points for e in s.elements], s.points) for s in first] == \
        [(s.label, s.type, [e.points for e in s.elements], s.points) for s in again]


def test_the_coco_weights_are_a_person_skeleton_of_17_keypoints():
    from preannotate.models import family_of

    arch = get_architecture("keypointrcnn_resnet50_fpn")
    [person] = family_of(arch).pretrained_labels(arch)
    assert person.name == "person" and person.type == "skeleton" and len(person.sublabels) == 17
    assert person.sublabels[0].name == "nose" and (5, 6) in skeleton_edges(person)  # the shoulders
    assert len(skeleton_edges(person)) == 19
    assert arch.label_types == ("skeleton", "points")


def test_an_imagenet_mobilenet_fills_the_whole_fpn_body(monkeypatch):
    """The ImageNet classifier's ``features.N`` are the FPN body's blocks: every one of their tensors is loaded."""
    from preannotate.models import keypoint_family
    from preannotate.models import torchvision_family as torch_family

    imagenet = torchvision.models.mobilenet_v3_large(weights=None).state_dict()
    monkeypatch.setattr(torch_family, "pretrained_state_dict",
                        lambda arch: {"backbone.body." + k: v for k, v in imagenet.items()})  # as it prefixes them
    arch = get_architecture("keypointrcnn_mobilenet_v3_large_fpn")
    state = keypoint_family.pretrained_state_dict(arch)
    model = keypoint_family.build_model(arch, LABELS, 96, 128)
    fresh = torch_family.load_matching(model, state)
    assert not [name for name in fresh if name.startswith("backbone.body.")]
    assert any(name.startswith("roi_heads.keypoint") for name in fresh)


# --- evaluation -----------------------------------------------------------------------------------------------------

def test_oks_ap_is_one_for_the_truth_and_ignores_hidden_keypoints():
    truth = FrameAnnotations(0, 200, 200, shapes=[dog((20, 20), (100, 40), (60, 150), hidden={"tail"}),
                                                  Shape("nose", "points", [150, 150])])
    exact = [dog((20, 20), (170, 190), (60, 150), hidden={"tail"}), Shape("nose", "points", [150, 150])]
    for shape in exact:
        shape.score = 0.9
    scored = score_keypoints([truth], [exact], LABELS)  # the hidden tail elsewhere costs nothing
    assert scored["map"] == pytest.approx(1.0) and scored["per_class"]["car"]["ap"] is None
    off = [dog((23, 22), (100, 40), (62, 153)), Shape("nose", "points", [154, 150], score=0.9)]
    off[0].score = 0.9
    worse = score_keypoints([truth], [off], LABELS)
    assert worse["map"] < 0.9 and worse["map50"] == pytest.approx(1.0)  # close, not exact
    # a lone point is judged at a quarter of the frame: 4 px of 200 is OKS 0.73, 12 px is 0.06
    far = score_keypoints([truth], [[Shape("nose", "points", [162, 150], score=0.9)]], LABELS)
    assert far["per_class"]["nose"]["ap50"] == 0.0
    assert worse["visibility"] == {"visible": 1.0, "hidden": 0.0}  # the tail came back visible
    assert score_keypoints([truth], [[]], LABELS)["map"] == 0.0


def test_the_validation_scores_keypoints_by_oks_and_makes_it_the_headline():
    layout = KeypointLayout.of(LABELS)
    accumulator = CocoAccumulator(False, keypoints=layout)
    keypoints = torch.tensor([[[10.0, 10, 2], [30, 30, 2], [0, 0, 0], [0, 0, 0]]])
    target = {"boxes": torch.tensor([[8.0, 8, 32, 32]]), "labels": torch.tensor([1]), "keypoints": keypoints}
    exact = {**target, "scores": torch.tensor([0.9]), "keypoints": keypoints}
    accumulator.add(target, exact, 64, 64)
    metrics = accumulator.metrics(LABELS)
    assert metrics["keypoints"]["map"] == pytest.approx(1.0) and metrics["map"] == metrics["keypoints"]["map"]
    assert metrics["bbox"]["map"] == pytest.approx(1.0)
    assert summary(metrics) == "keypoint AP@.5 1.000, keypoint AP 1.000"
    shifted = CocoAccumulator(False, keypoints=layout)
    shifted.add(target, {**exact, "keypoints": keypoints + torch.tensor([4.0, 0, 0])}, 64, 64)
    assert shifted.metrics(LABELS)["map"] < 0.5


# --- the report and the synthetic frames ----------------------------------------------------------------------------

def test_the_report_draws_a_skeletons_edges_between_its_visible_keypoints():
    from preannotate.training.report import _outlines

    shape = dog((10, 10), (50, 10), (50, 40), hidden={"paw"})
    drawn = _outlines(shape, 100, 100, skeleton_edges(DOG))
    lines = [outline.tolist() for outline, closed in drawn if not closed]
    assert lines == [[[10, 10], [50, 10]]]  # head-tail; tail-paw is not drawn: the paw is hidden
    assert sum(closed for _, closed in drawn) == 2  # the two visible keypoints


def test_the_prediction_grid_draws_skeletons(tmp_path):
    from preannotate.training.report import prediction_grid

    task = synthetic.generate_skeletons(2, 160, 120, seed=4)
    frames = list(task.annotations.frames.values())
    images = dict(task.images.decoded([0, 1]))
    path = prediction_grid([(images[f.frame], f, f) for f in frames], tmp_path / "grid.png", title="t",
                           labels=task.annotations.labels)
    assert path.stat().st_size > 1000


def test_synthetic_figures_hide_the_joints_behind_their_boards():
    task = synthetic.generate_skeletons(30, 160, 120, seed=0)
    again = synthetic.generate_skeletons(30, 160, 120, seed=0)
    assert task.annotations.frames[5].shapes == again.annotations.frames[5].shapes  # a function of the seed
    figures = [s for f in task.annotations.frames.values() for s in f.shapes if s.label == "figure"]
    hidden = [e for s in figures for e in s.elements if e.outside]
    assert figures and 0 < len(hidden) < sum(len(s.elements) for s in figures) / 4
    assert all([e.label for e in s.elements] == list(synthetic.FIGURE_KEYPOINTS) for s in figures)
    frame = task.annotations.frames[0]
    pixels = dict(task.images.decoded([0]))[0]
    for figure in (s for s in frame.shapes if s.label == "figure"):
        for element in figure.elements:  # a hidden joint is under a grey board, a visible one is not
            x, y = (int(v) for v in element.points)
            r, g, b = (int(v) for v in pixels[min(y, 119), min(x, 159)])
            if element.outside:
                assert max(r, g, b) - min(r, g, b) < 25
    assert task.annotations.labels[0].type == "skeleton" and task.annotations.labels[1].type == "points"


@pytest.mark.slow
def test_a_keypoint_model_trains_through_the_one_loop_and_publishes_oks(tmp_path):
    from preannotate.training.loop import train

    task = synthetic.generate_skeletons(12, 128, 96, seed=2)
    items = [(frame, task.images) for frame in task.annotations.frames.values()]
    result = train("keypointrcnn_mobilenet_v3_large_fpn", task.annotations.labels, items[:9], items[9:],
                   tmp_path / "run", store=tmp_path / "store", name="pose", progress=False, workers=0,
                   hyperparameters="init=random; num-steps=4; batch-size=2; image-size=96; max-image-size=128")
    manifest = load_detector(result.path).manifest
    assert "keypoints" in manifest.metrics and manifest.metrics["map"] == manifest.metrics["keypoints"]["map"]
    assert manifest.labels[0].sublabels and (tmp_path / "run" / "predictions.png").exists()


def test_labels_numbered_for_a_run_or_a_model_keep_their_keypoints(tmp_path):
    """The run and ``create_detector`` number labels 1..N: a skeleton keeps its sublabels and drawing (they rebuilt
    labels from name, type and attributes, and a keypoint model then had no keypoints to learn)."""
    from preannotate.training.loop import RunSpec

    unnumbered = [skeleton_label("dog", ["head", "tail"], [(0, 1)]), Label("nose", "points")]
    task = synthetic.generate_skeletons(2, 64, 48)
    spec = RunSpec.prepare("keypointrcnn_mobilenet_v3_large_fpn", unnumbered,
                           [(frame, task.images) for frame in task.annotations.frames.values()], [], tmp_path,
                           "init=random; num-steps=1", None)
    assert [(label.id, label.sublabels, label.svg) for label in spec.labels] == [
        (1, unnumbered[0].sublabels, unnumbered[0].svg), (2, (), "")]
    detector = create_detector("keypointrcnn_mobilenet_v3_large_fpn", unnumbered, hyperparameters=SMALL)
    assert detector.labels[0].sublabels == unnumbered[0].sublabels and detector.layout.total == 3


def test_the_reports_precision_of_a_keypoint_model_is_by_oks():
    from preannotate.training.report import precision_recall

    truth = FrameAnnotations(0, 200, 200, shapes=[dog((20, 20), (100, 40), (60, 150))])
    found = [dog((20, 20), (100, 40), (60, 150))]
    found[0].score = 0.8
    curves = precision_recall([truth], [found], LABELS)
    assert curves["per_class"]["dog"]["precision50"][:101] == [1.0] * 101  # found, at every recall
