"""Attributes (issue 23): what is learned and what is left to people, the synthetic frames whose attributes are what
they look like, the crop classifier (trained, validated, unsure left unset), the version that carries it, the
report, the reviewer's attribute edits, the function's spec and answers, and CVAT storing them by spec id."""

from __future__ import annotations

import copy
import json
import threading

import numpy as np
import pytest
import torch
from cvat_sdk import make_client, models
from preannotate.cvat import lambda_spec
from preannotate.models import ModelStore, create_detector, load_detector, publish_detector
from preannotate.models.attributes import (
    AttributedDetector,
    AttributeModel,
    Head,
    cut,
    learnable,
    left_to_people,
)
from preannotate.serving.contract import shapes_to_response
from preannotate.serving.core import App
from preannotate.serving.http import make_server
from preannotate.shapes import AttributeSpec, Label, Shape
from preannotate.training import edits, synthetic
from preannotate.training.attributes import examples, train_attribute_model
from preannotate.training.loop import train

LEARNED = {"colour", "striped", "size"}


def box_project_labels() -> list[dict]:
    """The synthetic labels as a box model's project has them (rectangles), with their attributes."""
    return [{**label.to_dict(), "type": "rectangle"} for label in synthetic.ATTRIBUTE_LABELS]


def published_answering(colour_model, store: ModelStore, detections: int) -> None:
    """A random SSDlite for the synthetic labels (``detections`` boxes a frame) with the trained attribute model
    set to answer every attribute (trusted, sure at any probability): what is stored is then what was learned."""
    model, _ = colour_model
    torch.manual_seed(0)
    detector = create_detector("ssdlite320_mobilenet_v3_large", synthetic.ATTRIBUTE_LABELS,
                               hyperparameters={"score_threshold": 0.3, "max_total_detections": detections})
    answering = [Head(**{**vars(h), "accuracy": None}) for h in model.heads]
    publish_detector(AttributedDetector(detector, AttributeModel(model.net, answering, min_confidence=0.0)), store,
                     "shapes")


def items_of(task):
    return [(frame, task.images) for frame in task.annotations.frames.values()]


@pytest.fixture(scope="module")
def colour_model():
    """An attribute classifier trained briefly on synthetic frames (seconds), and frames it never saw."""
    train_task = synthetic.generate_attributed(40, width=96, height=72, seed=3)
    val_task = synthetic.generate_attributed(12, width=96, height=72, seed=4)
    model = train_attribute_model(synthetic.ATTRIBUTE_LABELS, items_of(train_task), items_of(val_task), seed=0,
                                  steps=80)
    return model, val_task


def test_select_radio_and_checkbox_are_learned_number_and_text_are_left_to_people():
    label = Label("car", "rectangle", (AttributeSpec("colour", "select", ("red", "blue")),
                                      AttributeSpec("parked", "checkbox", ("false",)),
                                      AttributeSpec("kind", "radio", ("van", "truck")),
                                      AttributeSpec("speed", "number", ("0", "200", "1")),
                                      AttributeSpec("plate", "text"),
                                      AttributeSpec("only", "select", ("one",))), id=1)
    tag = Label("night", "tag", (AttributeSpec("hue", "select", ("a", "b")),))
    assert [(name, spec.name) for name, spec in learnable([label, tag])] == [
        ("car", "colour"), ("car", "parked"), ("car", "kind")]
    assert [spec.name for _, spec in left_to_people([label])] == ["speed", "plate", "only"]


def test_the_synthetic_attributes_are_what_the_objects_look_like():
    task = synthetic.generate_attributed(24, seed=5)
    means = {colour: [] for colour in synthetic.ATTRIBUTE_COLOURS}
    sizes = {size: [] for size in synthetic.ATTRIBUTE_SIZES}
    for frame, images in items_of(task):
        _, image = next(iter(images.decoded([frame.frame])))
        for shape in frame.shapes:
            assert set(shape.attributes) == LEARNED, "note (a text) is never set: nothing in the picture tells it"
            x1, y1, x2, y2 = (int(round(v)) for v in shape.bbox())
            cx, cy = (x1 + x2) // 2, (y1 + y2) // 2
            if not shape.occluded and shape.attributes["striped"] == "false":
                means[shape.attributes["colour"]].append(image[cy - 1:cy + 2, cx - 1:cx + 2].reshape(-1, 3).mean(0))
            sizes[shape.attributes["size"]].append(max(x2 - x1, y2 - y1))
    for colour, channel in (("red", 0), ("green", 1), ("blue", 2)):
        assert means[colour] and all(int(np.argmax(m)) == channel for m in means[colour]), colour
    assert max(sizes["small"]) < min(sizes["large"])


def test_a_crop_is_the_box_with_its_surroundings_and_black_beyond_the_frame():
    image = np.full((40, 60, 3), 200, np.uint8)
    inside = cut(image, (10, 10, 30, 30), side=20)
    assert inside.shape == (3, 20, 20) and (inside == 200).all()
    corner = cut(image, (0, 0, 20, 20), side=20)  # 15% of the box lies left of and above the frame
    assert (corner[:, 0, :] == 0).all() and (corner[:, :, 0] == 0).all() and (corner[:, -1, -1] == 200).all()


def test_the_classifier_learns_the_attributes_and_fills_them_on_unseen_objects(colour_model):
    model, val_task = colour_model
    heads = {head.key: head for head in model.heads}
    assert set(heads) == {f"{label}/{name}" for label in ("box", "disc") for name in LEARNED}
    for key in ("box/colour", "disc/colour"):  # the easiest: a colour is learned in a few dozen steps
        assert heads[key].accuracy >= 0.9 and heads[key].accuracy > heads[key].majority and heads[key].trusted
    truth = [frame.shapes for frame, _ in items_of(val_task)]
    found = [[Shape(s.label, s.type, list(s.points), rotation=s.rotation, score=0.9) for s in shapes]
             for shapes in truth]
    model.fill([image for _, image in val_task.images.decoded(sorted(val_task.annotations.frames))], found)
    pairs = [(t.attributes["colour"], f.attributes.get("colour")) for ts, fs in zip(truth, found, strict=True)
             for t, f in zip(ts, fs, strict=True)]
    assert sum(want == got for want, got in pairs) >= 0.9 * len(pairs)
    assert all("note" not in shape.attributes for shapes in found for shape in shapes)


def test_an_attribute_the_model_is_unsure_of_or_cannot_be_trusted_with_is_left_unset(colour_model):
    model, val_task = colour_model
    frame, images = items_of(val_task)[0]
    _, image = next(iter(images.decoded([frame.frame])))

    def filled(with_model: AttributeModel) -> list[dict[str, str]]:
        shapes = [Shape(s.label, s.type, list(s.points), rotation=s.rotation) for s in frame.shapes]
        with_model.fill([image], [shapes])
        return [shape.attributes for shape in shapes]

    assert any(filled(model)), "sure and trusted: set"
    assert not any(filled(AttributeModel(model.net, model.heads, min_confidence=1.01))), "never sure enough: unset"
    distrusted = [Head(**{**vars(h), "accuracy": 0.3, "majority": 0.5}) for h in copy.deepcopy(model.heads)]
    assert not any(filled(AttributeModel(model.net, distrusted))), "no better than the commonest value: unset"


def test_examples_take_checkbox_values_as_cvat_and_coco_write_them_and_skip_unknown_values():
    heads = [Head("box", "striped", "checkbox", ["false", "true"]), Head("box", "colour", "select", ["red", "blue"])]
    task = synthetic.generate_attributed(6, width=96, height=72, seed=8)
    frame, images = items_of(task)[0]
    shape = frame.shapes[0]
    shape.label = "box"
    shape.attributes = {"striped": "True", "colour": "purple"}
    _, _, targets = examples([(type(frame)(frame.frame, frame.width, frame.height, shapes=[shape]), images)], heads)
    assert targets.tolist() == [[1, -1]]


def test_a_run_publishes_its_attribute_model_with_the_detector_as_one_version(tmp_path):
    task = synthetic.generate_attributed(8, width=96, height=72, seed=1)
    items = items_of(task)
    store = ModelStore(tmp_path / "store")
    result = train("ssdlite320_mobilenet_v3_large", task.annotations.labels, items[:6], items[6:], tmp_path / "run",
                   store=store, name="shapes", progress=False, workers=0,
                   hyperparameters="init=random; image-size=64; num-steps=2; batch-size=2; num-validations=1")
    manifest = json.loads((result.path / "manifest.json").read_text())
    recorded = manifest["attributes"]
    assert recorded["file"] == "attributes.pt" and (result.path / "attributes.pt").is_file()
    assert {f"{h['label']}/{h['name']}" for h in recorded["heads"]} == {
        f"{label}/{name}" for label in ("box", "disc") for name in LEARNED}
    figures = manifest["metrics"]["attributes"]
    assert set(figures) == {f"{h['label']}/{h['name']}" for h in recorded["heads"]}
    assert all({"accuracy", "majority", "answered", "trusted", "review"} <= set(f) for f in figures.values())
    assert "attributes.png" in manifest["report"] and (result.path / "attributes.png").is_file()
    loaded = load_detector(result.path)
    assert isinstance(loaded, AttributedDetector) and loaded.manifest.version == result.version
    _, image = next(iter(task.images.decoded([7])))
    for shapes in (loaded.detect([image], 0.0)[0], loaded.detect_scored([image], 0.0)[0][0]):
        assert shapes and all(set(s.attributes) <= LEARNED for s in shapes)
        heads = {h["name"]: h for h in recorded["heads"] if h["label"] == shapes[0].label}
        assert all(value in heads[name]["values"] for s in shapes for name, value in s.attributes.items())


def test_a_model_without_learnable_attributes_is_published_as_before(tmp_path):
    task = synthetic.generate(6, width=96, height=72, seed=1, labels=("box",))
    items = items_of(task)
    result = train("ssdlite320_mobilenet_v3_large", task.annotations.labels, items[:4], items[4:], tmp_path / "run",
                   store=ModelStore(tmp_path / "store"), name="plain", progress=False, workers=0,
                   hyperparameters="init=random; image-size=64; num-steps=2; batch-size=2; num-validations=1")
    manifest = json.loads((result.path / "manifest.json").read_text())
    assert "attributes" not in manifest and "attributes" not in manifest["metrics"]
    assert not (result.path / "attributes.pt").exists()
    assert not isinstance(load_detector(result.path), AttributedDetector)


def test_a_wrong_or_unset_attribute_on_a_found_object_is_one_edit_each():
    labels = [Label("car", "rectangle", (AttributeSpec("colour", "select", ("red", "blue"), default_value="red"),
                                         AttributeSpec("parked", "checkbox", ("false",), default_value="false")))]
    truth = [[Shape("car", "rectangle", [0, 0, 10, 10], attributes={"colour": "blue", "parked": "true"}),
              Shape("car", "rectangle", [20, 20, 30, 30], attributes={"colour": "red", "parked": "false"}),
              Shape("car", "rectangle", [40, 40, 50, 50], attributes={"colour": "blue", "parked": "false"})]]
    found = [[Shape("car", "rectangle", [0, 0, 10, 10], score=0.9, attributes={"colour": "blue", "parked": "false"}),
              Shape("car", "rectangle", [20, 20, 30, 30], score=0.8, attributes={}),  # unset: the defaults, right
              Shape("car", "rectangle", [60, 60, 70, 70], score=0.7, attributes={"colour": "blue"})]]  # unmatched
    counts = edits.attribute_edits(truth, found, labels, {"car": ["colour", "parked"]})
    assert counts == {"car/colour": {"checked": 2, "edits": 0, "unset": 0},
                      "car/parked": {"checked": 2, "edits": 1, "unset": 0}}
    found[0][1].attributes = {}
    found[0][0].attributes = {}  # unset where the truth is not the default: an edit, counted as unset
    counts = edits.attribute_edits(truth, found, labels, {"car": ["colour", "parked"]})
    assert counts["car/colour"] == {"checked": 2, "edits": 1, "unset": 1}
    assert edits.attribute_edits(truth, found, labels, {"car": ["colour"]}, threshold=0.95)["car/colour"][
        "checked"] == 0


def test_the_spec_lists_each_labels_attributes_with_name_input_type_and_values():
    listed, _ = lambda_spec.spec_labels(synthetic.ATTRIBUTE_LABELS, "rectangle")
    spec = json.loads(lambda_spec.spec_text(listed))
    for label in spec:
        assert [a["name"] for a in label["attributes"]] == ["colour", "striped", "size", "note"]
        assert all(set(a) == {"name", "input_type", "values"} for a in label["attributes"])
    assert spec[0]["attributes"][1] == {"name": "striped", "input_type": "checkbox", "values": ["false"]}


def test_the_answer_carries_the_attributes_as_cvat_reads_them():
    shape = Shape("box", "rectangle", [1, 2, 3, 4], score=0.9, attributes={"colour": "red", "striped": "true"})
    assert shapes_to_response([shape])[0]["attributes"] == [{"name": "colour", "value": "red"},
                                                           {"name": "striped", "value": "true"}]


def test_cvat_stores_the_served_attributes_by_their_spec_ids(cvat_double, colour_model, tmp_path):
    """The function, served over HTTP, called from CVAT's Automatic annotation menu (the double's lambda manager,
    which drops attributes its spec does not list and values the label does not allow): every learned attribute
    arrives under the task label's spec id, and the text attribute is never written."""
    _, val_task = colour_model
    store = ModelStore(tmp_path / "store")
    published_answering(colour_model, store, 4)
    task = cvat_double.add_task("attributes", [(f"frame_{i}.jpg", data, 96, 72) for i, (_, data) in
                                               enumerate(val_task.images.encoded([0, 1]))], box_project_labels())
    app = App.from_environment({"PREANNOTATE_MODEL": "shapes", "PREANNOTATE_MODEL_STORE": str(store.root),
                                "PREANNOTATE_API_AUTH": "none", "PREANNOTATE_DEVICE": "cpu"})
    server = make_server(app, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        listed, _ = lambda_spec.spec_labels(load_detector(store.resolve("shapes")).labels, "rectangle")
        cvat_double.add_lambda_function("attributes", f"http://127.0.0.1:{server.server_address[1]}/",
                                        [label.to_dict() for label in listed])
        with make_client(cvat_double.base_url, credentials=cvat_double.credentials) as client:
            made, _ = client.api_client.lambda_api.create_requests(
                models.FunctionCallRequest(function="attributes", task=task, threshold=0.3))
        assert cvat_double.run_lambda_request(made.id)["status"] == "finished"
    finally:
        server.shutdown()
        server.server_close()
    specs = {label["id"]: {a["id"]: a for a in label["attributes"]} for label in cvat_double.labels.values()}
    shapes = [s for s in cvat_double.tasks[task].annotations["shapes"] if s["source"] == "auto"]
    assert len(shapes) == 8
    for shape in shapes:
        written = {specs[shape["label_id"]][a["spec_id"]]["name"]: a["value"] for a in shape["attributes"]}
        assert set(written) == LEARNED
        assert written["striped"] in ("true", "false") and written["colour"] in synthetic.ATTRIBUTE_COLOURS


def test_a_coco_export_keeps_what_the_attribute_classifier_learns_from(tmp_path):
    """Training reads an exported folder (``recipe.TrainingData.from_folder``): the labels' attribute specs and each
    shape's values must come back from it as CVAT gave them (a checkbox as "true"/"false")."""
    from preannotate.formats.dataset import export_dataset, training_split

    task = synthetic.generate_attributed(6, width=96, height=72, seed=2)
    export_dataset(tmp_path / "data", "coco", task.annotations.labels, sorted(task.annotations.frames.items()),
                   task.images, val_fraction=0.0, progress=False)
    labels, train_items, _ = training_split(tmp_path / "data")
    assert [(name, spec.name) for name, spec in learnable(labels)] == [
        (label, name) for label in ("box", "disc") for name in ("colour", "striped", "size")]
    read = [shape.attributes for frame, _ in train_items for shape in frame.shapes]
    written = [shape.attributes for _, frame in sorted(task.annotations.frames.items()) for shape in frame.shapes]
    assert sorted(map(sorted, (a.items() for a in read))) == sorted(map(sorted, (a.items() for a in written)))


def test_cvat_sdk_auto_annotation_writes_the_learned_attributes_by_the_tasks_spec_ids(cvat_double, colour_model,
                                                                                      tmp_path):
    """The cvat-sdk door (``cvat-cli task auto-annotate``): the function declares each label's learned attributes
    (with the project's input types and values, as cvat-sdk checks them) and its shapes carry them."""
    import cvat_sdk.auto_annotation as cvataa
    from cvat_sdk import Client, Config
    from preannotate import cvat_function

    _, val_task = colour_model
    store = ModelStore(tmp_path / "store")
    published_answering(colour_model, store, 3)
    task = cvat_double.add_task("sdk", [(f"frame_{i}.jpg", data, 96, 72) for i, (_, data) in
                                        enumerate(val_task.images.encoded([0, 1]))], box_project_labels())
    function = cvat_function.create(model="shapes", store=str(store.root), device="cpu")
    assert [[a.name for a in label.attributes] for label in function.spec.labels] == [["colour", "striped", "size"]] * 2
    with Client(cvat_double.base_url, config=Config(cache_dir=tmp_path / "sdk-cache")) as client:
        client.login(cvat_double.credentials)
        cvataa.annotate_task(client, task, function, conf_threshold=0.0)
    specs = {label["id"]: {a["id"]: a for a in label["attributes"]} for label in cvat_double.labels.values()}
    shapes = [s for s in cvat_double.tasks[task].annotations["shapes"] if s["source"] == "auto"]
    assert len(shapes) == 6
    for shape in shapes:
        written = {specs[shape["label_id"]][a["spec_id"]]["name"]: a["value"] for a in shape["attributes"]}
        assert set(written) == LEARNED and written["size"] in synthetic.ATTRIBUTE_SIZES


def test_captions_name_the_values_and_the_chart_draws_each_attribute(tmp_path):
    from preannotate.training import report

    assert report.attribute_text({"colour": "red", "striped": "true", "size": "large"}) == "red striped large"
    assert report.attribute_text({"colour": "red", "striped": "false", "note": "x"}, ["striped"]) == "no striped"
    heads = {"box/colour": Head("box", "colour", "select", ["red", "blue"], 0.9, 0.5, 0.95, 0.93, 40).to_dict(),
             "box/striped": Head("box", "striped", "checkbox", ["false", "true"], 0.5, 0.5, 1.0, 0.5, 40).to_dict()}
    figure = report.attributes_figure(heads, title="t")
    texts = [text.get_text() for text in figure.axes[0].texts]
    assert any("not served" in text for text in texts) and any(text.startswith("0.900") for text in texts)
    task = synthetic.generate_attributed(2, width=96, height=72, seed=3)
    frame = task.annotations.frames[0]
    grid = report._grid_figure([(next(iter(task.images.encoded([0])))[1], frame, type(frame)(0, 96, 72))], "",
                               4, task.annotations.labels)
    drawn = {text.get_text() for ax in grid.axes for text in ax.texts}
    for shape in frame.shapes:  # the truth's label with its values, though nothing was predicted
        assert f"{shape.label} {report.attribute_text(shape.attributes)}" in drawn


def test_the_same_frames_and_seed_train_the_same_weights():
    task = synthetic.generate_attributed(10, width=96, height=72, seed=6)
    first, second = (train_attribute_model(synthetic.ATTRIBUTE_LABELS, items_of(task), [], seed=4, steps=3)
                     for _ in range(2))
    torch.manual_seed(99)  # whatever the global generator holds
    third = train_attribute_model(synthetic.ATTRIBUTE_LABELS, items_of(task), [], seed=4, steps=3)
    for model in (second, third):
        assert all(torch.equal(a, b) for a, b in zip(first.net.state_dict().values(), model.net.state_dict().values(),
                                                     strict=True))
    assert all(head.accuracy is None and head.trusted for head in first.heads), "unvalidated: served, unscored"


def test_a_tensorflow_model_is_published_without_attributes_and_says_so(caplog):
    """The crop classifier is a torch network; torch imported after TensorFlow crashes the process (a Keras training
    job died with SIGSEGV): a Keras version's detections arrive without attributes, and the run says why."""
    from types import SimpleNamespace

    from preannotate.models import Manifest, hyperparameters_for
    from preannotate.training.runs import RunRecord, with_attributes

    labels = [Label("box", "rectangle", (AttributeSpec("colour", "select", ("red", "green")),), id=1)]
    keras = SimpleNamespace(output="rectangle", manifest=Manifest(architecture="keras_ssd_mobilenet_v2_fpnlite_320",
                                                                  labels=labels, name="k", version=1))
    run = RunRecord(output=None, hp=hyperparameters_for("keras_ssd_mobilenet_v2_fpnlite_320"), labels=labels,
                    train_items=[], val_items=[], previous=None, run_id="r")
    with caplog.at_level("WARNING"):
        assert with_attributes(keras, run) is keras
    assert "attributes are learned beside torch models only" in caplog.text
