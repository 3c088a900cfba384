"""The Nuclio entry point, called as Nuclio calls it (nuclio_sdk.test.Platform)."""

from __future__ import annotations

import json

import nuclio_sdk
import nuclio_sdk.test
import pytest
from preannotate.models import ModelStore, create_detector, publish_detector
from preannotate.serving import nuclio
from preannotate.shapes import parse_label_list

from tests.conftest import b64, encode, photo


class Function:
    """One deployed function: a fresh Nuclio platform (so init_context runs) with the given environment."""

    def __init__(self, monkeypatch, model: str, store):
        monkeypatch.setenv("PREANNOTATE_MODEL", model)
        monkeypatch.setenv("PREANNOTATE_MODEL_STORE", str(store))
        self.platform = nuclio_sdk.test.Platform()

    def call(self, body=None, method="POST", path="/", content_type="application/json"):
        if content_type == "application/json" and isinstance(body, (dict, list)):
            pass  # Nuclio decodes JSON bodies into a dict for exactly this content type
        elif isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
        event = nuclio_sdk.Event(body=body, content_type=content_type, method=method, path=path, headers={})
        response = self.platform.call_handler(nuclio.handler, event)
        assert isinstance(response, nuclio_sdk.Response)
        assert response.content_type == "application/json"
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in response.headers.items())
        return response.status_code, json.loads(response.body)


@pytest.fixture
def boxes(monkeypatch, published_store):
    return Function(monkeypatch, "boxes", published_store.root)


def detect_body(threshold=None, size=(96, 64)):
    body = {"image": b64(encode(photo(*size)))}
    if threshold is not None:
        body["threshold"] = threshold
    return body


def test_detector_call_answers_cvat_shapes(boxes):
    status, items = boxes.call(detect_body(threshold=0.0))
    assert status == 200 and isinstance(items, list) and items
    for item in items:
        assert set(item) == {"confidence", "label", "points", "type", "attributes"}
        assert item["type"] == "rectangle" and item["label"] in {"car", "person"}
        x1, y1, x2, y2 = item["points"]
        assert 0 <= x1 <= x2 <= 96 and 0 <= y1 <= y2 <= 64
        assert 0.0 <= float(item["confidence"]) <= 1.0
    # Without a threshold, the model's own default (0.3 in its manifest) applies.
    status, default = boxes.call(detect_body())
    assert status == 200 and len(default) <= len(items)
    assert all(float(item["confidence"]) >= 0.3 for item in default)


def test_body_delivered_as_bytes_is_read_too(boxes):
    status, items = boxes.call(detect_body(threshold=0.0), content_type="text/plain")
    assert status == 200 and items


@pytest.mark.parametrize("body, status, message", [
    (b"", 400, "empty request body"),
    (b"{not json", 400, "not JSON"),
    ({"threshold": 0.5}, 400, "no 'image'"),
    ({"image": "***"}, 400, "not valid base64"),
    ({"image": b64(b"GIF89a but broken")}, 400, "not an image file"),
    ({"image": b64(encode(photo())), "threshold": 2}, 400, "between 0 and 1"),
])
def test_bad_input_gets_a_4xx_json_error_and_the_next_request_is_served(boxes, body, status, message):
    got_status, reply = boxes.call(body, content_type="application/json" if isinstance(body, dict) else "text/plain")
    assert got_status == status and message in reply["error"]
    assert boxes.call(detect_body(threshold=0.0))[0] == 200


@pytest.mark.parametrize("decoded, message", [
    (2, "not 2"), (1e308, "not 1e+308"), (True, "not true"), ("string", "not a string"), (None, "empty request body"),
])
def test_json_that_nuclio_decoded_to_no_object_gets_a_400(boxes, decoded, message):
    # Nuclio decodes every JSON value of an application/json body: a bare number reaches the handler as an int
    event = nuclio_sdk.Event(body=decoded, content_type="application/json", method="POST", path="/", headers={})
    response = boxes.platform.call_handler(nuclio.handler, event)
    assert response.status_code == 400 and message in json.loads(response.body)["error"]
    assert boxes.call(detect_body(threshold=0.0))[0] == 200


def test_an_image_over_the_size_limit_gets_413(boxes, monkeypatch):
    monkeypatch.setenv("PREANNOTATE_MAX_IMAGE_PIXELS", "1000")
    status, reply = boxes.call(detect_body())
    assert status == 413 and "over the limit" in reply["error"]


def test_health_models_and_unknown_routes(boxes):
    status, health = boxes.call(method="GET", path="/health")
    assert status == 200 and health["status"] == "ok"
    boxes.call(detect_body())
    status, models = boxes.call(method="GET", path="/models")
    assert status == 200
    assert models["serving"]["name"] == "boxes" and models["serving"]["version"] == 1
    assert [label["name"] for label in models["serving"]["labels"]] == ["car", "person"]
    assert [row["version"] for row in models["versions"]] == [1]
    status, reply = boxes.call(method="GET", path="/nothing")
    assert status == 404 and "routes: POST /" in reply["error"]
    status, reply = boxes.call(method="GET", path="/")
    assert status == 405 and "use POST" in reply["error"]


def test_mask_model_returns_masks_with_polygons(monkeypatch, published_store):
    function = Function(monkeypatch, "masks", published_store.root)
    status, items = function.call(detect_body(threshold=0.0, size=(80, 60)))
    assert status == 200 and items
    for item in items:
        assert item["type"] == "mask" and item["label"] in {"road", "person"}
        *bitmap, xtl, ytl, xbr, ybr = item["mask"]
        assert len(bitmap) == (xbr - xtl + 1) * (ybr - ytl + 1) and set(bitmap) <= {0, 1} and any(bitmap)
        assert 0 <= xtl <= xbr < 80 and 0 <= ytl <= ybr < 60
        xs, ys = item["points"][0::2], item["points"][1::2]
        assert len(xs) >= 3 and xtl <= min(xs) and max(xs) <= xbr + 1 and ytl <= min(ys) and max(ys) <= ybr + 1


def test_newly_published_version_is_served_on_the_next_request(monkeypatch, tmp_path):
    store = ModelStore(tmp_path)
    arch = "fasterrcnn_mobilenet_v3_large_320_fpn"
    publish_detector(create_detector(arch, parse_label_list("car")), store, "swap")
    function = Function(monkeypatch, "swap", tmp_path)
    assert function.call(detect_body(0.0))[0] == 200
    assert function.call(method="GET", path="/models")[1]["serving"]["version"] == 1
    publish_detector(create_detector(arch, parse_label_list("bike,bus")), store, "swap")
    status, items = function.call(detect_body(0.0))
    assert status == 200 and {item["label"] for item in items} <= {"bike", "bus"}
    assert function.call(method="GET", path="/models")[1]["serving"]["version"] == 2


def test_pinned_version_and_artifact_path(monkeypatch, published_store):
    pinned = Function(monkeypatch, "boxes@1", published_store.root)
    assert pinned.call(detect_body(0.0))[0] == 200
    by_path = Function(monkeypatch, str(published_store.path("masks", 1)), "/nonexistent")
    status, items = by_path.call(detect_body(0.0, size=(64, 48)))
    assert status == 200 and all(item["type"] == "mask" for item in items)


def test_function_without_a_model_keeps_answering_and_says_why(monkeypatch, tmp_path):
    monkeypatch.setenv("PREANNOTATE_TRAIN_PROJECT", "6")  # deployed for a project, before its first job
    function = Function(monkeypatch, "not-trained-yet", tmp_path)
    status, reply = function.call(detect_body())
    assert status == 503 and reply["error"] == ("not trained yet: finish a job in CVAT project 6 (its webhook starts "
                                                "training) or POST /train")
    assert function.call(method="GET", path="/health")[0] == 200
    monkeypatch.delenv("PREANNOTATE_TRAIN_PROJECT")
    # an architecture whose pretrained weights are not on disk (no network here)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    function = Function(monkeypatch, "retinanet_resnet50_fpn", tmp_path)
    status, reply = function.call(detect_body())
    assert status == 503 and "pretrained weights for retinanet_resnet50_fpn are not on disk" in reply["error"]


def test_an_internal_error_is_a_500_and_the_function_keeps_serving(boxes, caplog):
    boxes.call(detect_body())
    app = boxes.platform._get_handler_context(nuclio.handler).user_data.app
    detector = app.provider.current()
    original = detector.detect
    detector.detect = lambda *args, **kwargs: (_ for _ in ()).throw(RuntimeError("CUDA out of memory"))
    try:
        with caplog.at_level("ERROR", logger="preannotate.serving.core"):
            status, reply = boxes.call(detect_body())
        assert status == 500 and "internal error" in reply["error"]
        assert "RuntimeError" not in reply["error"] and "CUDA out of memory" in caplog.text  # the log has it
    finally:
        detector.detect = original
    assert boxes.call(detect_body())[0] == 200


def test_init_context_without_a_model_name_fails_loudly(monkeypatch):
    monkeypatch.delenv("PREANNOTATE_MODEL", raising=False)
    with pytest.raises(RuntimeError, match="PREANNOTATE_MODEL is not set"):
        nuclio_sdk.test.Platform().call_handler(nuclio.handler, nuclio_sdk.Event(body=b"", path="/health"))
