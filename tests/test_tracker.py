"""The model as CVAT's tracker and reid function, called as CVAT 2.42 calls them (the request shapes in
tests/fixtures/cvat-2.42/lambda/, derived from its lambda manager) through the real Nuclio wrapper."""

from __future__ import annotations

import copy
import json

import nuclio_sdk
import nuclio_sdk.test
import numpy as np
import pytest
from PIL import Image
from preannotate.models import Manifest, ModelReference
from preannotate.serving import core, following, nuclio
from preannotate.shapes import Label, Shape
from scipy import ndimage

from tests.conftest import FIXTURES, b64, encode

LAMBDA = FIXTURES / "lambda"
RED, GREEN, BLUE = (230, 20, 20), (20, 200, 20), (20, 20, 230)
SIZE = (160, 96)


def fixture(name: str):
    return json.loads((LAMBDA / name).read_text())


def frame(*objects: tuple[tuple[int, int, int], tuple[int, int, int, int]]) -> str:
    """A PNG frame (base64, as CVAT sends it): grey, with each (colour, box) painted on."""
    array = np.full((SIZE[1], SIZE[0], 3), 120, np.uint8)
    for colour, (x1, y1, x2, y2) in objects:
        array[y1:y2, x1:x2] = colour
    return b64(encode(Image.fromarray(array), "PNG"))


class ColourDetector:
    """A detector that truly reads the frame: each blob of a known colour is an object (red and green: car, blue:
    person); its appearance is a crop's mean colour. ``with_appearance=False`` is a model without an appearance
    layer."""

    LABELS = {RED: "car", GREEN: "car", BLUE: "person"}

    def __init__(self, manifest: Manifest, with_appearance: bool = True):
        self.manifest, self.with_appearance = manifest, with_appearance
        self.labels = [Label("car", "rectangle", id=1), Label("person", "rectangle", id=2)]
        self.model, self.familiar = None, None
        self.appearance_crops = 0

    def detect(self, images, threshold):
        found = []
        for image in images:
            array = np.asarray(image).astype(int)
            shapes = []
            for colour, label in self.LABELS.items():
                blobs, _ = ndimage.label(np.abs(array - colour).sum(axis=2) < 30)
                for rows, columns in ndimage.find_objects(blobs):
                    shapes.append(Shape(label, "rectangle", [columns.start, rows.start, columns.stop, rows.stop],
                                        score=0.9, source="auto"))
            found.append([shape for shape in shapes if shape.score >= threshold])
        return found

    def detect_scored(self, images, threshold):
        return [(shapes, 0.0) for shapes in self.detect(images, threshold)]

    def appearance(self, images, depth=None):
        if not self.with_appearance:
            return None
        self.appearance_crops += len(images)
        return np.stack([np.asarray(image).reshape(-1, 3).mean(axis=0) for image in images])


class Function:
    """A deployed tracker or reid function (fresh Nuclio platform: init_context runs) serving ``model``."""

    def __init__(self, monkeypatch, store, kind: str, model: str = "boxes", detector=None):
        monkeypatch.setenv("PREANNOTATE_MODEL", model)
        monkeypatch.setenv("PREANNOTATE_MODEL_STORE", str(store.root))
        monkeypatch.setenv("PREANNOTATE_FUNCTION_KIND", kind)
        if detector is not None:  # the one thing replaced: the network, by one whose detections a test chooses
            monkeypatch.setattr(core, "load_model", lambda *args, **kwargs: detector)
        self.platform = nuclio_sdk.test.Platform()

    def call(self, body, method="POST", path="/"):
        event = nuclio_sdk.Event(body=body, content_type="application/json", method=method, path=path, headers={})
        response = self.platform.call_handler(nuclio.handler, event)
        return response.status_code, json.loads(response.body)


class Tracker(Function):
    """CVAT's UI and server around the function: start on the drawn frame, then continue with the states only."""

    def start(self, image: str, *boxes, labels=None):
        body = fixture("POST_tracker.start.request.json")
        body["image"] = image
        body["shapes"] = [{"type": "rectangle", "points": list(box)} for box in boxes]
        for shape, label in zip(body["shapes"], labels or [], strict=False):
            shape["label"] = label
        status, answer = self.call(body)
        assert status == 200, answer
        return answer

    def next(self, image: str, states):
        body = fixture("POST_tracker.continue.request.json")
        # what CVAT does with a state: json.dumps with compact separators, signed, unsigned, json.loads
        body.update(image=image, shapes=[None] * len(states),
                    states=[json.loads(json.dumps(state, separators=(",", ":"))) for state in states])
        status, answer = self.call(body)
        assert status == 200, answer
        return answer


@pytest.fixture
def colour(published_store):
    return ColourDetector(Manifest.read(ModelReference.parse("boxes").directory(published_store)))


@pytest.fixture
def tracker(monkeypatch, published_store, colour):
    return Tracker(monkeypatch, published_store, "tracker", detector=colour)


def box_at(x: int, y: int = 30, w: int = 20, h: int = 20) -> tuple[int, int, int, int]:
    return x, y, x + w, y + h


def points(answer, index=0):
    shape = answer["shapes"][index]
    assert shape["type"] == "rectangle"
    return shape["points"]


def iou(a, b) -> float:
    return float(following.iou([tuple(a)], [tuple(b)])[0, 0])


# ------------------------------------------------------------------------------------------ tracker

def test_a_box_moving_across_frames_is_followed(tracker):
    # the person draws a box a little off the car; the car drives right, 7 pixels a frame
    answer = tracker.start(frame((RED, box_at(10))), (12, 28, 31, 49))
    assert points(answer) == [12, 28, 31, 49]  # the drawn shape is answered as drawn
    state = answer["states"][0]
    assert state["label"] == "car"  # the label of the detection under the drawn box
    for step in range(1, 12):
        answer = tracker.next(frame((RED, box_at(10 + 7 * step))), answer["states"])
        assert points(answer) == list(box_at(10 + 7 * step)), step
    assert answer["states"][0]["velocity"] == [7, 0, 7, 0] and answer["states"][0]["missed"] == 0


def test_a_shape_no_detection_continues_is_carried_over_and_found_again_further_on(tracker):
    answer = tracker.start(frame((RED, box_at(10))), box_at(10))
    answer = tracker.next(frame((RED, box_at(18))), answer["states"])
    assert points(answer) == list(box_at(18))
    for missed in (1, 2):  # hidden: carried over unchanged, the frames counted
        answer = tracker.next(frame(), answer["states"])
        assert points(answer) == list(box_at(18)) and answer["states"][0]["missed"] == missed
    # it reappears where it would be after three more frames of the same motion (no overlap with the last box)
    answer = tracker.next(frame((RED, box_at(42))), answer["states"])
    assert iou(box_at(18), box_at(42)) == 0
    assert points(answer) == list(box_at(42)) and answer["states"][0]["missed"] == 0


def test_only_a_detection_of_the_shapes_label_continues_it(tracker):
    answer = tracker.start(frame((RED, box_at(10))), box_at(10))
    # a person now stands exactly where the car was; the car moved on a little
    answer = tracker.next(frame((BLUE, box_at(10)), (RED, box_at(16, y=34))), answer["states"])
    assert iou(box_at(10), box_at(10)) > iou(box_at(10), box_at(16, y=34)) >= following.MIN_IOU
    assert points(answer) == list(box_at(16, y=34))


def test_a_label_the_caller_names_is_followed_and_an_unknown_one_is_refused_with_the_names(tracker):
    answer = tracker.start(frame((RED, box_at(10)), (BLUE, box_at(14, y=34))), box_at(12, y=32), labels=["person"])
    assert answer["states"][0]["label"] == "person"
    body = fixture("POST_tracker.start.request.json")
    body["image"] = frame()
    body["shapes"][0]["label"] = "persn"
    status, reply = tracker.call(body)
    assert status == 400 and "no label 'persn' (did you mean person?)" in reply["error"]


def test_appearance_decides_between_two_detections_that_move_alike(monkeypatch, published_store, colour):
    # the red car drawn; next frame a red car and a green car both overlap it, the green one a little more
    drawn, red_next, green_next = (10, 10, 30, 30), (16, 10, 36, 30), (6, 12, 26, 32)
    assert iou(drawn, green_next) > iou(drawn, red_next) >= following.MIN_IOU
    picks = {}
    for with_appearance in (True, False):
        colour.with_appearance = with_appearance
        function = Tracker(monkeypatch, published_store, "tracker", detector=colour)
        answer = function.start(frame((RED, drawn)), drawn)
        answer = function.next(frame((RED, red_next), (GREEN, green_next)), answer["states"])
        picks[with_appearance] = points(answer)
    assert picks == {True: list(red_next), False: list(green_next)}  # motion alone takes the wrong car


def test_one_detection_continues_one_shape_and_the_other_is_carried_over(tracker):
    left, right = (10, 30, 30, 50), (22, 30, 42, 50)
    answer = tracker.start(frame((RED, left), (RED, (60, 30, 80, 50))), left, right)
    answer = tracker.next(frame((RED, (12, 30, 32, 50))), answer["states"])
    assert points(answer, 0) == [12, 30, 32, 50]  # the better continuation of the only car there
    assert points(answer, 1) == list(right) and answer["states"][1]["missed"] == 1


def test_recorded_request_shapes_are_answered_as_cvat_reads_them(tracker):
    start = fixture("POST_tracker.start.request.json")
    start["image"] = frame((RED, (10, 8, 40, 28)))
    status, answer = tracker.call(start)
    expected = fixture("POST_tracker.response.json")
    assert status == 200 and set(answer) == set(expected)
    assert [set(shape) for shape in answer["shapes"]] == [set(shape) for shape in expected["shapes"]]
    assert answer["shapes"] == expected["shapes"]
    assert len(answer["states"]) == len(start["shapes"])
    follow = fixture("POST_tracker.continue.request.json")
    follow.update(image=frame((RED, (14, 8, 44, 28))), states=answer["states"])
    status, answer = tracker.call(follow)
    assert status == 200 and answer["shapes"] == [{"type": "rectangle", "points": [14, 8, 44, 28]}]


def test_states_of_a_real_model_are_small_json(monkeypatch, published_store):
    """The published (random) Faster R-CNN MobileNet: a state carries its int8 look, and stays small."""
    function = Tracker(monkeypatch, published_store, "tracker")
    answer = function.start(frame((RED, box_at(10))), box_at(10), (60, 20, 100, 60))
    answer = function.next(frame((RED, box_at(16))), answer["states"])
    for state in answer["states"]:
        assert state["look"]  # the model has an appearance layer
        size = len(json.dumps(state, separators=(",", ":")))
        assert size < 512, size  # measured: about 210 bytes (80 int8 values, 108 characters of base64)


STATE = {"v": 1, "label": "car", "box": [10, 30, 30, 50], "velocity": [0, 0, 0, 0], "missed": 0}


@pytest.mark.parametrize("change, message", [
    (lambda b: b.update(states="x"), "'states' must be an array"),
    (lambda b: b.update(shapes=[None], states=[STATE, STATE]), "'shapes' has 1 items and 'states' 2"),
    (lambda b: b.update(states=[[1, 2]]), "states[0] must be a state this tracker answered"),
    (lambda b: b.update(states=[{**STATE, "v": 7}]), "made by another tracker"),
    (lambda b: b.update(states=[{**STATE, "box": [1, 2, 3]}]), "'box' must be four finite numbers"),
    (lambda b: b.update(states=[{**STATE, "box": [30, 30, 10, 50]}]), "x1 <= x2"),
    (lambda b: b.update(states=[{**STATE, "missed": -1}]), "'missed' must be a whole number"),
    (lambda b: b.update(states=[{**STATE, "look": "not base64!"}]), "not an appearance this tracker made"),
    (lambda b: b.update(states=[None]), "shapes[0] must be a shape"),
    (lambda b: b.pop("states"), "neither 'shapes' nor 'states'"),
    (lambda b: b.pop("image"), "no 'image'"),
])
def test_bad_states_are_refused_with_one_sentence_and_the_function_keeps_serving(tracker, change, message):
    body = fixture("POST_tracker.continue.request.json")
    body.update(image=frame(), states=[copy.deepcopy(STATE)])
    body.pop("shapes")  # CVAT's server pads them; a direct caller may not
    change(body)
    status, reply = tracker.call(body)
    assert status == 400 and message in reply["error"], reply
    assert "Traceback" not in reply["error"] and "Error" not in reply["error"]
    status, _ = tracker.call({**fixture("POST_tracker.continue.request.json"), "image": frame(), "states": [STATE]})
    assert status == 200


@pytest.mark.parametrize("shape, message", [
    ({"type": "polygon", "points": [1, 2, 3, 4, 5, 6]}, "of type polygon: this tracker follows rectangles only"),
    ([1, 2, 3, 4], "declare supported_shape_types"),
    ({"type": "rectangle", "points": [1, 2, "3", 4]}, "four finite numbers"),
])
def test_shapes_the_tracker_cannot_follow_are_refused(tracker, shape, message):
    body = fixture("POST_tracker.start.request.json")
    body.update(image=frame(), shapes=[shape])
    status, reply = tracker.call(body)
    assert status == 400 and message in reply["error"], reply


def test_a_tracker_function_says_its_kind_and_refuses_a_detector_call(tracker):
    status, health = tracker.call(None, method="GET", path="/health")
    assert status == 200 and health["kind"] == "tracker"
    status, reply = tracker.call({"image": frame()})
    assert status == 400 and "neither 'shapes' nor 'states'" in reply["error"]


# ------------------------------------------------------------------------------------------ reid

def reid_body(boxes0, boxes1, image0, image1, **options):
    body = fixture("POST_reid.request.json")
    template = body["boxes0"][0]
    body.update(image0=image0, image1=image1, **options)
    body["boxes0"] = [{**template, "points": list(box), "label_id": label, "path_id": index}
                      for index, (box, label) in enumerate(boxes0)]
    body["boxes1"] = [{**{k: v for k, v in template.items() if k != "path_id"}, "points": list(box),
                       "label_id": label, "frame": 1} for box, label in boxes1]
    return body


def test_reid_links_the_boxes_of_two_frames_by_label_distance_and_appearance(monkeypatch, published_store, colour):
    reid = Function(monkeypatch, published_store, "reid", detector=colour)
    red0, green0, person0 = (10, 10, 30, 30), (40, 10, 60, 30), (100, 50, 120, 70)
    red1, green1, person1 = (18, 12, 38, 32), (32, 10, 52, 30), (150, 50, 158, 70)  # the two cars cross
    body = reid_body([(red0, 18), (green0, 18), (person0, 19)], [(green1, 18), (person1, 19), (red1, 18)],
                     frame((RED, red0), (GREEN, green0), (BLUE, person0)),
                     frame((GREEN, green1), (BLUE, person1), (RED, red1)))
    status, matches = reid.call(body)
    # each car to itself by its look (by overlap alone neither is within the threshold); the person moved 40 px
    assert status == 200 and matches == [2, 0, 1]
    status, matches = reid.call({**body, "max_distance": 30})  # the person is now too far
    assert status == 200 and matches == [2, 0, -1]
    body["boxes1"][2]["label_id"] = 19  # the red car's match is now another label
    status, matches = reid.call(body)
    assert status == 200 and matches[0] == -1


def test_recorded_reid_request_is_answered_with_one_index_per_box(monkeypatch, published_store):
    reid = Function(monkeypatch, published_store, "reid")  # the published model itself
    body = fixture("POST_reid.request.json")
    body.update(image0=frame((RED, (10, 8, 40, 28))), image1=frame((RED, (6, 5, 31, 26))))
    status, matches = reid.call(body)
    expected = fixture("POST_reid.response.json")
    assert status == 200 and isinstance(matches, list) and len(matches) == len(expected) == len(body["boxes0"])
    assert all(isinstance(m, int) and -1 <= m < len(body["boxes1"]) for m in matches)


@pytest.mark.parametrize("change, message", [
    (lambda b: b.pop("boxes1"), "no 'boxes1'"),
    (lambda b: b["boxes0"][0].pop("label_id"), "boxes0[0] has no 'label_id'"),
    (lambda b: b["boxes0"][0].update(points=[1, 2]), "four finite numbers"),
    (lambda b: b.update(threshold=3), "'threshold' must be a distance between 0 and 1"),
    (lambda b: b.update(max_distance=-5), "'max_distance' must be a positive number"),
    (lambda b: b.pop("image1"), "no 'image1'"),
])
def test_bad_reid_requests_get_a_400(monkeypatch, published_store, colour, change, message):
    reid = Function(monkeypatch, published_store, "reid", detector=colour)
    body = fixture("POST_reid.request.json")
    body.update(image0=frame(), image1=frame())
    change(body)
    status, reply = reid.call(body)
    assert status == 400 and message in reply["error"], reply


def test_an_unknown_function_kind_fails_at_start(monkeypatch, published_store):
    monkeypatch.setenv("PREANNOTATE_MODEL", "boxes")
    monkeypatch.setenv("PREANNOTATE_MODEL_STORE", str(published_store.root))
    monkeypatch.setenv("PREANNOTATE_FUNCTION_KIND", "trackr")
    with pytest.raises(ValueError, match="PREANNOTATE_FUNCTION_KIND is 'trackr'"):
        nuclio_sdk.test.Platform().call_handler(nuclio.handler, nuclio_sdk.Event(body=b"", path="/health"))
