"""Each label served at its own threshold: recorded in the manifest when a version is published (old manifests
still load), and used wherever no threshold is asked for — the HTTP/Nuclio door (``App.detect``), the cvat-sdk door
(``cvat_function``) and the pre-annotation of a task (``annotate_task``, through the CVAT double); a threshold that
is asked for (CVAT's menu, ``--threshold``, ``--conf-threshold``) replaces them for every label."""

from __future__ import annotations

import base64
import io
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from cvat_sdk import make_client
from PIL import Image
from preannotate.annotate import annotate_task
from preannotate.cvat.review import CONFIDENCE_LABEL, SHAPES_ATTRIBUTE
from preannotate.cvat_function import DetectionFunction
from preannotate.frames import decode_rgb
from preannotate.hyperparameters import Hyperparameters
from preannotate.models import Manifest, ModelStore, create_detector, load_model, publish_detector
from preannotate.serving.core import App, ModelProvider, Request
from preannotate.shapes import FrameAnnotations, Label, Shape, parse_label_list
from preannotate.training import runs

from tests import cvat_double as double_module
from tests.conftest import encode, photo

cvat_double = double_module.cvat_double
logging.getLogger("cvat_sdk").setLevel(logging.ERROR)  # cvat-sdk 2.80 warns about the 2.42 server

FILES = [encode(photo(64, 48, seed=i), "PNG") for i in range(4)]  # PNG: the task's frames decode to the same pixels


# --- the manifest ---------------------------------------------------------------------------------------------------

def test_the_manifest_keeps_each_labels_threshold_and_an_old_one_without_them_still_loads(tmp_path):
    manifest = Manifest("ssdlite320_mobilenet_v3_large", [Label("car", id=1), Label("person", id=2)],
                        score_threshold=0.5, thresholds={"car": 0.42})
    manifest.write(tmp_path)
    again = Manifest.read(tmp_path)
    assert again.thresholds == {"car": 0.42} and again.to_dict() == manifest.to_dict()
    assert again.served_thresholds() == {"car": 0.42, "person": 0.5} and again.lowest_threshold() == 0.42
    shapes = [Shape("car", "rectangle", [0, 0, 1, 1], score=0.45),
              Shape("person", "rectangle", [0, 0, 1, 1], score=0.45),
              Shape("person", "rectangle", [0, 0, 1, 1])]  # unscored: always kept
    assert [(s.label, s.score) for s in again.served(shapes)] == [("car", 0.45), ("person", None)]

    old = manifest.to_dict()
    del old["thresholds"]  # written before thresholds were chosen
    (tmp_path / "manifest.json").write_text(json.dumps(old))
    loaded = Manifest.read(tmp_path)
    assert loaded.thresholds == {} and loaded.served_thresholds() == {"car": 0.5, "person": 0.5}


# --- a published model with its own thresholds ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """``served``: a random-init Faster R-CNN for ``car,person`` (seeded so that it finds both on these frames),
    published with ``car`` and ``person`` each at the median score of what it finds of them; and what it finds on
    each frame at threshold 0."""
    torch.manual_seed(2)
    detector = create_detector("fasterrcnn_mobilenet_v3_large_320_fpn", parse_label_list("car,person"),
                               hyperparameters={"score_threshold": 0.333})
    found = [detector.detect([decode_rgb(data)], 0.0)[0] for data in FILES]
    scores = {name: [s.score for shapes in found for s in shapes if s.label == name] for name in ("car", "person")}
    assert all(len(values) > 4 for values in scores.values()), "the seeded model should find both labels"
    detector.manifest.thresholds = {name: float(np.median(values)) for name, values in scores.items()}
    store = ModelStore(tmp_path_factory.mktemp("served-store"))
    publish_detector(detector, store, "served")
    return store, found, detector.manifest.thresholds


def kept(found, thresholds):
    return [sorted((s.label, round(s.points[0], 2), round(s.points[1], 2)) for s in shapes
                   if s.score >= thresholds[s.label]) for shapes in found]


def test_the_http_and_nuclio_door_serves_each_label_at_its_threshold_unless_one_is_asked_for(served):
    store, found, thresholds = served
    app = App(ModelProvider("served", store, how_to_train=None))
    for data, expected in zip(FILES, kept(found, thresholds), strict=True):
        reply = app.handle(Request("POST", "/", {"image": base64.b64encode(data).decode("ascii")}))
        assert reply.status == 200
        assert sorted((s["label"], round(s["points"][0], 2), round(s["points"][1], 2)) for s in reply.body) == expected
    # a threshold from CVAT's menu replaces the served ones, for every label
    asked = app.handle(Request("POST", "/", {"image": base64.b64encode(FILES[0]).decode("ascii"), "threshold": 0.1}))
    assert sorted((s["label"], round(s["points"][0], 2), round(s["points"][1], 2)) for s in asked.body) == \
        kept(found[:1], {"car": 0.1, "person": 0.1})[0]
    assert app.handle(Request("GET", "/health")).body["model"]["thresholds"] == thresholds


def test_the_cvat_sdk_door_serves_each_label_at_its_threshold_unless_conf_threshold_is_given(served):
    store, found, thresholds = served
    function = DetectionFunction(load_model("served", store))
    names = [label.name for label in function.spec.labels]
    for conf_threshold, wanted in ((None, thresholds), (0.1, {"car": 0.1, "person": 0.1})):
        context = SimpleNamespace(frame_name="f.png", conf_threshold=conf_threshold, conv_mask_to_poly=False)
        for data, expected in zip(FILES, kept(found, wanted), strict=True):
            answered = function.detect(context, Image.open(io.BytesIO(data)))
            assert sorted((names[a.label_id], round(a.points[0], 2), round(a.points[1], 2))
                          for a in answered) == expected


def test_pre_annotating_a_task_writes_each_label_at_its_threshold_and_what_arrived(served, cvat_double, tmp_path):
    store, found, thresholds = served
    labels = [{"name": "car", "type": "rectangle"}, {"name": "person", "type": "rectangle"}]
    task = cvat_double.add_task("served", [(f"f{i}.png", data, 64, 48) for i, data in enumerate(FILES)], labels)
    options = {"store": store.root, "state_dir": tmp_path / "state", "cache_dir": tmp_path / "chunks",
               "progress": False}
    with make_client(cvat_double.base_url, credentials=cvat_double.credentials) as client:
        report = annotate_task(client, task, detector="served", **options)
        assert report.threshold == ("at the served thresholds: " +
                                    ", ".join(f"{name} ≥ {thresholds[name]:.2g}" for name in ("car", "person")))
        stored = cvat_double.annotations(task)
        name = {cvat_double.label_id(task, label["name"]): label["name"] for label in labels}
        written = [sorted((name[s["label_id"]], round(s["points"][0], 2), round(s["points"][1], 2))
                          for s in stored["shapes"] if s["frame"] == frame) for frame in range(len(FILES))]
        assert written == kept(found, thresholds)
        # each frame's confidence tag says how many shapes arrived (what `preannotate review` compares with)
        confidence = next(label for label in client.tasks.retrieve(task).get_labels() if label.name == CONFIDENCE_LABEL)
        count = next(a.id for a in confidence.attributes if a.name == SHAPES_ATTRIBUTE)
        arrived = {t["frame"]: int(next(a["value"] for a in t["attributes"] if a["spec_id"] == count))
                   for t in stored["tags"] if t["label_id"] == confidence.id}
        assert arrived == {frame: len(shapes) for frame, shapes in enumerate(written)}

        report = annotate_task(client, task, detector="served", threshold=0.1, **options)  # --threshold: every label
        assert report.threshold == "with score ≥ 0.1"
        again = [sorted((name[s["label_id"]], round(s["points"][0], 2), round(s["points"][1], 2))
                        for s in cvat_double.annotations(task)["shapes"] if s["frame"] == frame)
                 for frame in range(len(FILES))]
        assert again == kept(found, {"car": 0.1, "person": 0.1})


# --- choosing them when publishing ------------------------------------------------------------------------------------

class Scripted:
    """A detector that was run already: ``served_thresholds`` reads only its manifest."""

    def __init__(self, labels):
        self.manifest = Manifest("ssdlite320_mobilenet_v3_large", labels, score_threshold=0.5)


def sample(frames):
    """``(items, found)`` as ``evaluation.sample_detections`` answers: true and found shapes per frame."""
    items = [(FrameAnnotations(i, 100, 100, f"f{i}", truth), None) for i, (truth, _) in enumerate(frames)]
    return items, [found for _, found in frames]


def box(label, score=None, x=0):
    return Shape(label, "rectangle", [x, 0.0, x + 50.0, 50.0], score=score)


FRAMES = [([box("car")], [box("car", 0.9), box("car", 0.8, x=60)]),  # a confident false car beside a true one
          ([box("car")], [box("car", 0.95)]),
          ([box("cat")], [box("cat", 0.4)]),  # cats are found at low scores
          ([], [box("cat", 0.1)])]


def record(text=""):
    labels = [Label("car", id=1), Label("cat", id=2), Label("dog", id=3)]
    return runs.RunRecord(Path("."), Hyperparameters().updated(text) if text else Hyperparameters(), labels, [], [],
                          None, "run")


def test_publishing_chooses_each_labels_threshold_and_records_the_edits_it_saves():
    detector = Scripted(record().labels)
    review = runs.set_served_thresholds(detector, sample(FRAMES), record())
    assert detector.manifest.thresholds == {"car": 0.85, "cat": 0.25}  # dog: no true dog, keeps score-threshold
    assert review["thresholds"] == {"car": 0.85, "cat": 0.25, "dog": 0.5}
    assert review["served"] == {"objects": 3, "adds": 0, "deletes": 0, "moves": 0, "edits": 0, "per_100": 0.0}
    assert review["at_score_threshold"] == {"threshold": 0.5, "objects": 3, "adds": 1, "deletes": 1, "moves": 0,
                                            "edits": 2, "per_100": 66.67}


def test_a_score_threshold_the_user_set_serves_every_label_and_no_validation_chooses_nothing():
    detector = Scripted(record().labels)
    review = runs.set_served_thresholds(detector, sample(FRAMES), record("score-threshold=0.3"))
    assert detector.manifest.thresholds == {} and review["thresholds"] == {"car": 0.5, "cat": 0.5, "dog": 0.5}
    assert runs.set_served_thresholds(detector, sample([]), record()) == {} and detector.manifest.thresholds == {}
    assert runs.set_served_thresholds(detector, None, record()) == {}  # the validation frames could not be detected


def test_a_classifier_keeps_its_score_threshold():
    detector = Scripted(record().labels)
    detector.output = "tag"
    assert runs.set_served_thresholds(detector, sample(FRAMES), record()) == {} and detector.manifest.thresholds == {}


def test_detect_served_is_what_every_door_calls():
    """One place decides between a threshold asked for and the served ones (``models.detect_served``)."""
    from preannotate.models import detect_served

    class Fixed:
        manifest = Manifest("ssdlite320_mobilenet_v3_large", [Label("car"), Label("cat")], score_threshold=0.5,
                            thresholds={"car": 0.7, "cat": 0.2})
        asked: list[float] = []

        def detect(self, images, threshold):
            self.asked.append(threshold)
            return [[s for s in [box("car", 0.6), box("car", 0.8), box("cat", 0.3)] if s.score >= threshold]
                    for _ in images]

    detector = Fixed()
    assert [(s.label, s.score) for s in detect_served(detector, [None])[0]] == [("car", 0.8), ("cat", 0.3)]
    assert [(s.label, s.score) for s in detect_served(detector, [None], 0.5)[0]] == [("car", 0.6), ("car", 0.8)]
    assert detector.asked == [0.2, 0.5]  # the lowest served threshold, then the one asked for
