"""``preannotate.cvat_function`` as cvat-sdk's auto-annotation driver (and cvat-cli, when installed) runs it, against
the CVAT double, with real random-init models from a store."""

from __future__ import annotations

import logging
import os
import shutil
import sys

import cvat_sdk.auto_annotation as cvataa
import pytest
import torch
from cvat_sdk import Client, Config
from preannotate import cvat_function
from preannotate.annotate import annotate_task
from preannotate.frames import decode_rgb
from preannotate.models import ModelStore, create_detector, keypoint_family, publish_detector
from preannotate.models.keypoints import skeleton_label
from preannotate.shapes import Label, parse_label_list

from tests import cvat_double as double_module
from tests.conftest import encode, photo, run_while_advancing

cvat_double = double_module.cvat_double
logging.getLogger("cvat_sdk").setLevel(logging.ERROR)  # cvat-sdk 2.80 warns about the 2.42 server

FILES = [encode(photo(64, 48, seed=i)) for i in range(4)]
DOG = skeleton_label("dog", ["head", "tail", "paw"], [(0, 1), (1, 2)], label_id=1)
POSE_LABELS = [DOG, Label("nose", "points", id=2)]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """``boxes``: random Faster R-CNN (``car,person``), ``masks``: small random Mask R-CNN (``road,person``), both
    seeded so they find every label on these frames."""
    store = ModelStore(tmp_path_factory.mktemp("function-store"))
    torch.manual_seed(2)
    publish_detector(create_detector("fasterrcnn_mobilenet_v3_large_320_fpn", parse_label_list("car,person"),
                                     hyperparameters={"score_threshold": 0.333}), store, "boxes")
    torch.manual_seed(1)
    publish_detector(create_detector("maskrcnn_resnet50_fpn", parse_label_list("road:mask,person:mask"),
                                     hyperparameters={"image_size": 96, "max_image_size": 128}), store, "masks")
    torch.manual_seed(0)
    publish_detector(create_detector("keypointrcnn_mobilenet_v3_large_fpn", POSE_LABELS,
                                     hyperparameters="init=random; image-size=96; max-image-size=128; "
                                                     "nms-score-threshold=0; max-total-detections=300"), store, "pose")
    torch.manual_seed(4)  # random masks of both labels, turned ones among them, on the first frame
    outlines = create_detector("custom", [Label("plate", "rectangle"), Label("cell", "ellipse")], device="cpu",
                               hyperparameters="init=random; backbone=resnet18; top-level=4; neck=fpn; "
                                               "neck-levels=3-4; neck-channels=32; head=mask-rcnn; image-size=96; "
                                               "max-image-size=128; nms-score-threshold=0; max-total-detections=100")
    outlines.manifest.outlines = {"plate": "rotated-rectangle", "cell": "ellipse"}
    publish_detector(outlines, store, "outlines")
    return store


@pytest.fixture
def client(cvat_double, tmp_path):
    """A logged-in client whose dataset cache (cvat-sdk downloads the task's chunks there) is the test's own."""
    with Client(cvat_double.base_url, config=Config(cache_dir=tmp_path / "sdk-cache")) as sdk_client:
        sdk_client.login(cvat_double.credentials)
        yield sdk_client


def add_task(cvat_double, labels, frames=FILES) -> int:
    return cvat_double.add_task("aa", [(f"img_{i}.jpg", data, 64, 48) for i, data in enumerate(frames)], labels)


def stored(cvat_double, task_id) -> list[tuple[int, str, str, tuple[float, ...]]]:
    names = {label["id"]: label["name"] for label in cvat_double.labels.values()}
    return sorted((s["frame"], names[s["label_id"]], s["type"], tuple(s["points"]))
                  for s in cvat_double.annotations(task_id)["shapes"] if s["source"] == "auto")


def test_the_spec_comes_from_the_manifest(store):
    function = cvat_function.create(model="boxes", store=str(store.root), device="cpu")
    assert [(label.name, label.id, label.type) for label in function.spec.labels] == [
        ("car", 0, "rectangle"), ("person", 1, "rectangle")]
    masks = cvat_function.create(model="masks@1", store=str(store.root))
    assert {label.type for label in masks.spec.labels} == {"mask"}


def test_cvat_sdk_driver_gives_what_annotate_task_gives(cvat_double, client, store, tmp_path):
    labels = [{"name": "car", "type": "rectangle"}, {"name": "person", "type": "rectangle"}]
    ours, theirs = add_task(cvat_double, labels), add_task(cvat_double, labels)
    # One frame per forward pass, as cvat-sdk's driver calls the model: batched convolutions are not bit-identical,
    # and this random-init model's near-equal scores reorder on such differences.
    annotate_task(client, ours, detector="boxes", store=store.root, threshold=0.0, state_dir=tmp_path / "state",
                  cache_dir=tmp_path / "chunks", progress=False, batch_size=1)
    function = cvat_function.create(model="boxes", store=str(store.root))
    cvataa.annotate_task(client, theirs, function, conf_threshold=0.0)
    assert stored(cvat_double, theirs) == stored(cvat_double, ours)
    assert {label for _, label, _, _ in stored(cvat_double, ours)} == {"car", "person"}

    # No threshold given: the model's own (0.333 in its manifest); its person boxes score just under it.
    cvataa.annotate_task(client, theirs, function, clear_existing=True)
    detector = function.detector
    kept = [(frame, s.label, tuple(s.points)) for frame, data in enumerate(FILES)
            for s in detector.detect([decode_rgb(data)], 0.0)[0] if s.score >= 0.333]
    assert [(f, label, points) for f, label, _, points in stored(cvat_double, theirs)] == sorted(kept)
    assert 0 < len(kept) < len(stored(cvat_double, ours))


def test_unmatched_labels_follow_cvat_sdk_rules(cvat_double, client, store):
    task = add_task(cvat_double, [{"name": "car", "type": "rectangle"}])
    function = cvat_function.create(model="boxes", store=str(store.root))
    with pytest.raises(cvataa.BadFunctionError, match="label 'person' is not in dataset"):
        cvataa.annotate_task(client, task, function)
    cvataa.annotate_task(client, task, function, allow_unmatched_labels=True, conf_threshold=0.0)
    assert {label for _, label, _, _ in stored(cvat_double, task)} == {"car"}


def test_masks_and_masks_as_polygons(cvat_double, client, store):
    task = add_task(cvat_double, [{"name": "road"}, {"name": "person"}], frames=FILES[:1])
    function = cvat_function.create(model="masks", store=str(store.root))
    cvataa.annotate_task(client, task, function, conf_threshold=0.75)
    masks = stored(cvat_double, task)
    assert masks and {kind for _, _, kind, _ in masks} == {"mask"}
    expected = sorted((frame, s.label, "mask", tuple(float(p) for p in s.points))
                      for frame, data in enumerate(FILES[:1])
                      for s in function.detector.detect([decode_rgb(data)], 0.75)[0])
    assert masks == expected

    cvataa.annotate_task(client, task, function, conf_threshold=0.75, conv_mask_to_poly=True, clear_existing=True)
    polygons = stored(cvat_double, task)
    assert len(polygons) == len(masks) and {kind for _, _, kind, _ in polygons} == {"polygon"}


def test_skeletons_and_points_are_declared_with_their_keypoints_and_returned_with_every_one(cvat_double, client,
                                                                                          store, monkeypatch):
    """A keypoint model's skeleton label is declared with a keypoint per part, its points label as points; each
    skeleton comes back with an element per part (by the task's sublabel ids) and each point as a points shape."""
    # Random heatmaps are sure of no keypoint: served outside, every skeleton would be dropped (as CVAT drops one).
    monkeypatch.setattr(keypoint_family, "VISIBLE_CONFIDENCE", 0.0)
    function = cvat_function.create(model="pose", store=str(store.root))
    assert [(label.name, label.id, label.type, [(part.name, part.id) for part in getattr(label, "sublabels", [])])
            for label in function.spec.labels] == [
        ("dog", 0, "skeleton", [("head", 0), ("tail", 1), ("paw", 2)]), ("nose", 1, "points", [])]
    task = add_task(cvat_double, [{"name": "dog", "type": "skeleton", "svg": DOG.svg,
                                   "sublabels": [{"name": part.name, "type": "points"} for part in DOG.sublabels]},
                                  {"name": "nose", "type": "points"}], frames=FILES[:1])
    cvataa.annotate_task(client, task, function, conf_threshold=0.0)
    labels = {label["id"]: label["name"] for label in cvat_double.labels.values()}
    stored = sorted((labels[s["label_id"]], s["type"], tuple(s["points"]),
                     tuple((labels[e["label_id"]], tuple(e["points"]), e["outside"]) for e in s.get("elements", [])))
                    for s in cvat_double.annotations(task)["shapes"])
    found = function.detector.detect([decode_rgb(FILES[0])], 0.0)[0]
    expected = sorted((s.label, s.type, tuple(float(v) for v in s.points),
                       tuple((e.label, tuple(float(v) for v in e.points), False) for e in s.elements)) for s in found)
    assert stored == expected and {kind for _, kind, _, _ in stored} == {"skeleton", "points"}


def test_a_mask_model_returns_rotated_rectangles_and_ellipses_in_their_labels_types(cvat_double, client, store):
    function = cvat_function.create(model="outlines", store=str(store.root))
    assert [(label.name, label.type) for label in function.spec.labels] == [("plate", "rectangle"),
                                                                             ("cell", "ellipse")]
    task = add_task(cvat_double, [{"name": "plate", "type": "rectangle"}, {"name": "cell", "type": "ellipse"}],
                    frames=FILES[:1])
    cvataa.annotate_task(client, task, function, conf_threshold=0.0)
    labels = {label["id"]: label["name"] for label in cvat_double.labels.values()}
    stored = sorted((labels[s["label_id"]], s["type"], tuple(s["points"]), round(s["rotation"], 2))
                    for s in cvat_double.annotations(task)["shapes"])
    found = function.detector.detect([decode_rgb(FILES[0])], 0.0)[0]
    assert stored == sorted((s.label, s.type, tuple(float(v) for v in s.points), round(s.rotation % 360, 2))
                            for s in found)
    assert {(label, kind) for label, kind, _, rotation in stored if rotation} == {("plate", "rectangle"),
                                                                                  ("cell", "ellipse")}


def test_create_needs_a_model(monkeypatch, store):
    monkeypatch.delenv("PREANNOTATE_MODEL", raising=False)
    with pytest.raises(ValueError, match="-p model=str:NAME"):
        cvat_function.create()
    monkeypatch.setenv("PREANNOTATE_MODEL", "boxes@1")
    monkeypatch.setenv("PREANNOTATE_MODEL_STORE", str(store.root))
    assert cvat_function.create().detector.manifest.version == 1


@pytest.mark.skipif(shutil.which("cvat-cli", path=os.path.dirname(sys.executable)) is None,
                    reason="cvat-cli is not installed in this environment")
def test_cvat_cli_auto_annotate(cvat_double, store, tmp_path):
    task = add_task(cvat_double, [{"name": "car", "type": "rectangle"}, {"name": "person", "type": "rectangle"}])
    host, port = cvat_double.base_url.rsplit(":", 1)
    cli = shutil.which("cvat-cli", path=os.path.dirname(sys.executable))
    result = run_while_advancing(
        [cli, "--server-host", host, "--server-port", port, "--auth", cvat_double.credentials[0],
         "task", "auto-annotate", str(task), "--function-module", "preannotate.cvat_function",
         "-p", "model=str:boxes", "-p", f"store=str:{store.root}", "--conf-threshold", "0"],
        env={**os.environ, "PASS": cvat_double.credentials[1], "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert {label for _, label, _, _ in stored(cvat_double, task)} == {"car", "person"}
