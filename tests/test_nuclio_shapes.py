"""The real Nuclio wrapper answering every kind of shape (issue 23): skeletons and points from a keypoint model,
learned attributes, rotated rectangles and ellipses from a mask model. Each function is Nuclio's handler called
by ``nuclio_sdk.test.Platform`` (so ``init_context`` runs, and JSON bodies arrive decoded as Nuclio decodes them),
reached over HTTP by the CVAT double's lambda manager, which maps and stores the answer as CVAT 2.42 does."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import nuclio_sdk
import nuclio_sdk.test
import pytest
import torch
from cvat_sdk import make_client, models
from preannotate.cvat import lambda_spec
from preannotate.models import ModelStore, create_detector, load_detector, publish_detector
from preannotate.models.attributes import AttributedDetector, AttributeModel, AttributeNet, Head, learnable
from preannotate.models.keypoints import skeleton_label
from preannotate.serving import nuclio
from preannotate.shapes import Label
from preannotate.training import synthetic

from tests.conftest import b64, encode, photo

DOG = skeleton_label("dog", ["head", "tail", "paw"], [(0, 1), (1, 2)], label_id=1)
POSE_LABELS = [DOG, Label("nose", "points", id=2)]
# random weights score every class alike, low: every detection is kept, so each label is answered
POSE_TASK_LABELS = [{"name": "dog", "type": "skeleton", "svg": DOG.svg,
                     "sublabels": [{"name": part.name, "type": "points"} for part in DOG.sublabels]},
                    {"name": "nose", "type": "points"}]
SMALL_KEYPOINT_MODEL = ("init=random; image-size=96; max-image-size=128; nms-score-threshold=0; "
                        "max-total-detections=300")
SMALL_MASK_MODEL = ("init=random; backbone=resnet18; top-level=4; neck=fpn; neck-levels=3-4; neck-channels=32; "
                    "head=mask-rcnn; image-size=96; max-image-size=128; nms-score-threshold=0; "
                    "max-total-detections=100")
WIDTH, HEIGHT = 96, 72


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> ModelStore:
    """Random-init versions, none trained (what is checked is the wrapper, not what a model learned):

    * ``pose``: the light Keypoint R-CNN for a dog skeleton and a ``nose`` points label;
    * ``shapes``: an SSDlite for the synthetic attribute labels with an untrained attribute classifier set to answer
      every learned attribute (trusted, sure at any probability);
    * ``outlines``: a small Mask R-CNN whose manifest serves ``plate`` as a rotated rectangle and ``cell`` as an
      ellipse."""
    store = ModelStore(tmp_path_factory.mktemp("nuclio-shapes-store"))
    torch.manual_seed(0)
    publish_detector(create_detector("keypointrcnn_mobilenet_v3_large_fpn", POSE_LABELS,
                                     hyperparameters=SMALL_KEYPOINT_MODEL), store, "pose")
    torch.manual_seed(0)
    boxes = create_detector("ssdlite320_mobilenet_v3_large", synthetic.ATTRIBUTE_LABELS,
                            hyperparameters={"score_threshold": 0.3, "max_total_detections": 3})
    heads = [Head(label, spec.name, spec.input_type, list(spec.values) if spec.input_type != "checkbox"
                  else ["false", "true"]) for label, spec in learnable(synthetic.ATTRIBUTE_LABELS)]
    net = AttributeNet([len(head.values) for head in heads])
    publish_detector(AttributedDetector(boxes, AttributeModel(net, heads, min_confidence=0.0)), store, "shapes")
    torch.manual_seed(4)  # a seed whose random masks of both labels include turned ones on these frames
    masks = create_detector("custom", [Label("plate", "rectangle"), Label("cell", "ellipse")],
                            hyperparameters=SMALL_MASK_MODEL, device="cpu")
    masks.manifest.outlines = {"plate": "rotated-rectangle", "cell": "ellipse"}
    publish_detector(masks, store, "outlines")
    return store


@contextmanager
def nuclio_function(monkeypatch, store: ModelStore, model: str) -> Iterator[tuple[str, nuclio_sdk.test.Platform]]:
    """The deployed function: Nuclio's handler on a fresh platform, behind an HTTP trigger as Nuclio puts it (the
    body of an ``application/json`` request decoded before the handler sees it). Yields its URL and platform."""
    monkeypatch.setenv("PREANNOTATE_MODEL", model)
    monkeypatch.setenv("PREANNOTATE_MODEL_STORE", str(store.root))
    monkeypatch.setenv("PREANNOTATE_DEVICE", "cpu")
    platform = nuclio_sdk.test.Platform()
    lock = threading.Lock()

    class Trigger(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            content_type = self.headers.get_content_type()
            event = nuclio_sdk.Event(body=json.loads(body) if content_type == "application/json" else body,
                                     content_type=content_type, method="POST", path=self.path, headers={})
            with lock:
                response = platform.call_handler(nuclio.handler, event)
            answer = response.body.encode() if isinstance(response.body, str) else response.body
            self.send_response(response.status_code)
            self.send_header("Content-Type", response.content_type)
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Trigger)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", platform
    finally:
        server.shutdown()
        server.server_close()


def call(platform: nuclio_sdk.test.Platform, threshold: float) -> list[dict]:
    """CVAT's detector request, straight to the handler: the answer's items."""
    body = {"image": b64(encode(photo(WIDTH, HEIGHT, seed=5))), "threshold": threshold}
    response = platform.call_handler(nuclio.handler, nuclio_sdk.Event(
        body=body, content_type="application/json", method="POST", path="/", headers={}))
    assert response.status_code == 200, response.body
    return json.loads(response.body)


def run_from_cvats_menu(cvat_double, url: str, model_labels: list[Label], output: str, task_labels: list[dict],
                        threshold: float) -> list[dict]:
    """Deploy the function with the spec ``deploy`` writes for it, run it on a new task from CVAT's Automatic
    annotation menu, and return what CVAT stored (``source: auto``). (A threshold of 0 is not sent: the lambda
    manager sends only a true one, and the model's own applies.)"""
    listed, _ = lambda_spec.spec_labels(model_labels, output)
    task = cvat_double.add_task("menu", [(f"frame_{i}.png", encode(photo(WIDTH, HEIGHT, seed=5 + i)), WIDTH, HEIGHT)
                                         for i in range(2)], task_labels)
    cvat_double.add_lambda_function("fn", url, json.loads(lambda_spec.spec_text(listed)))
    with make_client(cvat_double.base_url, credentials=cvat_double.credentials) as client:
        made, _ = client.api_client.lambda_api.create_requests(
            models.FunctionCallRequest(function="fn", task=task, threshold=threshold))
    assert cvat_double.run_lambda_request(made.id)["status"] == "finished"
    return [s for s in cvat_double.tasks[task].annotations["shapes"] if s["source"] == "auto"]


def names_by_id(cvat_double) -> dict[int, str]:
    labels = list(cvat_double.labels.values())
    return {label["id"]: label["name"] for label in labels}


# --- skeletons and points -------------------------------------------------------------------------------------------

def test_a_keypoint_model_answers_skeletons_with_every_keypoint_and_points(monkeypatch, store, cvat_double):
    from preannotate.models import keypoint_family

    # Random heatmaps are flat: sure of no keypoint, so every one would be served outside (and CVAT drop the
    # skeleton, as the next test checks). Here the function calls every keypoint visible.
    monkeypatch.setattr(keypoint_family, "VISIBLE_CONFIDENCE", 0.0)
    with nuclio_function(monkeypatch, store, "pose") as (url, platform):
        items = call(platform, 0.0)
        skeletons = [item for item in items if item["type"] == "skeleton"]
        points = [item for item in items if item["type"] == "points"]
        assert skeletons and points and len(skeletons) + len(points) == len(items)
        for item in skeletons:
            assert item["label"] == "dog" and "points" not in item and 0 <= float(item["confidence"]) <= 1
            assert [e["label"] for e in item["elements"]] == ["head", "tail", "paw"]
            for element in item["elements"]:
                assert set(element) == {"label", "type", "points", "outside"} and element["type"] == "points"
                x, y = element["points"]
                assert isinstance(element["outside"], bool) and -1 <= x <= WIDTH + 1 and -1 <= y <= HEIGHT + 1
        assert all(item["label"] == "nose" and len(item["points"]) == 2 for item in points)

        stored = run_from_cvats_menu(cvat_double, url, load_detector(store.resolve("pose")).labels, "skeleton",
                                     POSE_TASK_LABELS, 0.01)
    names = names_by_id(cvat_double)
    dogs = [s for s in stored if s["type"] == "skeleton"]
    assert dogs and {names[s["label_id"]] for s in dogs} == {"dog"}
    assert {s["type"] for s in stored} == {"skeleton", "points"}
    for dog in dogs:  # one element per part of the task's skeleton, by the part's own label id
        assert sorted(names[e["label_id"]] for e in dog["elements"]) == ["head", "paw", "tail"]
        assert not any(e["outside"] for e in dog["elements"]) and all(len(e["points"]) == 2 for e in dog["elements"])
    assert {names[s["label_id"]] for s in stored if s["type"] == "points"} == {"nose"}


def test_a_skeleton_the_model_sees_no_keypoint_of_is_served_outside_and_cvat_drops_it(monkeypatch, store,
                                                                                      cvat_double):
    with nuclio_function(monkeypatch, store, "pose") as (url, platform):
        items = call(platform, 0.0)
        skeletons = [item for item in items if item["type"] == "skeleton"]
        assert skeletons and all(e["outside"] for item in skeletons for e in item["elements"])
        stored = run_from_cvats_menu(cvat_double, url, load_detector(store.resolve("pose")).labels, "skeleton",
                                     POSE_TASK_LABELS, 0.01)
    assert stored and {s["type"] for s in stored} == {"points"}


# --- attributes ---------------------------------------------------------------------------------------------------

def test_a_version_with_learned_attributes_answers_them_and_cvat_stores_them(monkeypatch, store, cvat_double):
    with nuclio_function(monkeypatch, store, "shapes") as (url, platform):
        items = call(platform, 0.0)
        assert len(items) == 3
        values = {spec.name: spec for _, spec in learnable(synthetic.ATTRIBUTE_LABELS)}
        for item in items:
            answered = {a["name"]: a["value"] for a in item["attributes"]}
            assert set(answered) == {"colour", "striped", "size"}  # the text attribute is left to people
            assert all(value in (values[name].values if values[name].input_type != "checkbox" else ("true", "false"))
                       for name, value in answered.items())
        task_labels = [{**label.to_dict(), "type": "rectangle"} for label in synthetic.ATTRIBUTE_LABELS]
        stored = run_from_cvats_menu(cvat_double, url, load_detector(store.resolve("shapes")).labels, "rectangle",
                                     task_labels, 0.3)
    specs = {label["id"]: {a["id"]: a["name"] for a in label["attributes"]} for label in cvat_double.labels.values()}
    assert len(stored) == 6
    for shape in stored:
        assert {specs[shape["label_id"]][a["spec_id"]] for a in shape["attributes"]} == {"colour", "striped", "size"}


# --- rotated rectangles and ellipses ------------------------------------------------------------------------------

def test_a_mask_model_answers_rotated_rectangles_and_ellipses_in_their_own_type(monkeypatch, store, cvat_double):
    with nuclio_function(monkeypatch, store, "outlines") as (url, platform):
        items = call(platform, 0.0)
        kinds = {(item["label"], item["type"]) for item in items}
        assert kinds == {("plate", "rectangle"), ("cell", "ellipse")}
        for item in items:  # rotation: left out when 0
            assert len(item["points"]) == 4 and "mask" not in item and 0 < item.get("rotation", 1) < 360
        turned = {item["type"] for item in items if item.get("rotation")}
        assert turned == {"rectangle", "ellipse"}  # random masks, some of them turned
        stored = run_from_cvats_menu(cvat_double, url, load_detector(store.resolve("outlines")).labels, "mask",
                                     [{"name": "plate", "type": "rectangle"}, {"name": "cell", "type": "ellipse"}],
                                     0.01)
    names = names_by_id(cvat_double)
    assert {(names[s["label_id"]], s["type"]) for s in stored} == kinds
    answered = sorted((item["type"], round(item.get("rotation", 0), 3)) for item in items)
    assert sorted((s["type"], round(s["rotation"], 3)) for s in stored if s["frame"] == 0) == answered
