from __future__ import annotations

import inspect
import json
import os
import stat
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from preannotate.cli import main as cli
from preannotate.models import (
    ARCHITECTURES,
    Manifest,
    ModelNotFound,
    ModelStore,
    create_detector,
    family_of,
    get_architecture,
    load_detector,
    publish_detector,
)
from preannotate.models.registry import UnknownArchitecture
from preannotate.models.torchvision_family import PretrainedWeightsUnavailable, build_model
from preannotate.shapes import parse_label_list

from tests.conftest import photo

SMALL = {"image_size": 96, "max_image_size": 128}


@pytest.mark.parametrize("name", [name for name, arch in ARCHITECTURES.items()
                                  if arch.output not in ("tag", "skeleton")])
def test_every_architecture_builds_and_detects_on_our_labels(name):  # classifiers, keypoints: their own test files
    detector = create_detector(name, parse_label_list("car,person"), hyperparameters=SMALL)
    image = photo(80, 60)
    shapes = detector.detect([image, photo(64, 48, seed=1)], threshold=0.0)
    assert len(shapes) == 2
    for shape in shapes[0]:
        assert shape.label in {"car", "person"}
        assert shape.type == ("mask" if ARCHITECTURES[name].output == "mask" else "rectangle")
        x1, y1, x2, y2 = shape.bbox()
        assert 0 <= x1 <= x2 <= 80 and 0 <= y1 <= y2 <= 60
        assert 0.0 <= shape.score <= 1.0
    # the class heads are sized for our two labels plus background
    assert detector.manifest.labels[1].id == 2 and detector.manifest.architecture == name


def test_unknown_architecture_suggests_the_close_name():
    with pytest.raises(UnknownArchitecture, match="did you mean fasterrcnn_resnet50_fpn"):
        get_architecture("fasterrcnn_resnet50")


@pytest.mark.parametrize("typed, meant", [
    ("ssdlite", "did you mean ssdlite320_mobilenet_v3_large?"),  # the start of a long name
    ("SSDLite", "did you mean ssdlite320_mobilenet_v3_large?"),
    ("maskrcnn", "did you mean maskrcnn_resnet50_fpn?"),
    ("fasterrcnn", "did you mean fasterrcnn_mobilenet_v3_large_320_fpn, fasterrcnn_mobilenet_v3_large_fpn or "
                   "fasterrcnn_resnet50_fpn?"),
    ("efficientnet-b4", "did you mean efficientnet_b4?"),  # spelled as hyperparameter values are
    ("custm", "did you mean custom?"),  # a typo
])
def test_an_unknown_architecture_gets_the_names_a_person_may_have_meant(typed, meant):
    with pytest.raises(UnknownArchitecture) as refused:
        get_architecture(typed)
    assert meant in str(refused.value)


def _cache_weights(tmp_path, monkeypatch, weights_name: str, state: dict) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    url = torchvision.models.get_weight(weights_name).url
    path = tmp_path / "torch" / "hub" / "checkpoints" / Path(url).name
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    return path


def test_pretrained_without_weights_on_disk_fails_with_a_clear_message(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    monkeypatch.setenv("PREANNOTATE_OFFLINE", "1")
    with pytest.raises(PretrainedWeightsUnavailable, match=r"ssdlite320_mobilenet_v3_large_coco-a79551df\.pth"):
        create_detector("ssdlite320_mobilenet_v3_large", init="pretrained")
    code = cli(["models", "create", "ssdlite320_mobilenet_v3_large", "--init", "pretrained",
                "--store", str(tmp_path / "store")])
    err = capsys.readouterr().err
    assert code == 2
    assert "pretrained weights for ssdlite320_mobilenet_v3_large are not on disk" in err
    assert "--init random" in err and "Traceback" not in err
    assert not (tmp_path / "store" / "ssdlite320_mobilenet_v3_large").exists()


def test_pretrained_loads_cached_coco_weights_with_coco_labels(tmp_path, monkeypatch):
    arch = get_architecture("fasterrcnn_mobilenet_v3_large_320_fpn")
    coco_model = build_model(arch, 90)  # 91 classes with background, as torchvision's COCO weights
    _cache_weights(tmp_path, monkeypatch, arch.pretrained, coco_model.state_dict())

    detector = create_detector(arch.name, init="pretrained")
    names = [label.name for label in detector.labels]
    assert len(names) == 80 and names[:3] == ["person", "bicycle", "car"] and "N/A" not in names
    assert detector.labels[-1].id == 90  # model class index kept, COCO gaps included
    for key, value in coco_model.state_dict().items():
        assert torch.equal(detector.model.state_dict()[key], value), key

    # Our own labels: everything but the class-specific heads comes from the pretrained weights.
    custom = create_detector(arch.name, parse_label_list("car,person"), init="pretrained")
    own = custom.model.state_dict()
    predictor = "roi_heads.box_predictor.cls_score.weight"
    assert own[predictor].shape[0] == 3
    body = "backbone.body.0.0.weight"
    assert torch.equal(own[body], coco_model.state_dict()[body])


def test_resnet101_starts_from_an_imagenet_backbone(tmp_path, monkeypatch):
    arch = get_architecture("fasterrcnn_resnet101_fpn")
    imagenet = torchvision.models.resnet101(weights=None).state_dict()
    _cache_weights(tmp_path, monkeypatch, arch.pretrained, imagenet)
    with pytest.raises(PretrainedWeightsUnavailable, match="no COCO-trained weights"):
        create_detector(arch.name, init="pretrained")
    detector = create_detector(arch.name, parse_label_list("car"), init="pretrained", hyperparameters=SMALL)
    own = detector.model.state_dict()
    assert torch.equal(own["backbone.body.layer4.2.conv3.weight"], imagenet["layer4.2.conv3.weight"])


def test_fine_tuning_from_a_previous_version_with_a_changed_label_set(tmp_path):
    store = ModelStore(tmp_path)
    first = create_detector("fasterrcnn_mobilenet_v3_large_320_fpn", parse_label_list("car,person"))
    publish_detector(first, store, "traffic")
    second = create_detector("fasterrcnn_mobilenet_v3_large_320_fpn", parse_label_list("car,person,bike"),
                             init="previous", previous=store.resolve("traffic"))
    before, after = first.model.state_dict(), second.model.state_dict()
    assert torch.equal(before["backbone.body.0.0.weight"], after["backbone.body.0.0.weight"])
    assert torch.equal(before["rpn.head.conv.0.0.weight"], after["rpn.head.conv.0.0.weight"])
    assert after["roi_heads.box_predictor.cls_score.weight"].shape[0] == 4  # fresh head for 3 labels
    assert second.manifest.provenance["init"] == "previous"


def test_a_published_artifact_loads_alone_and_predicts_the_same(tmp_path):
    store = ModelStore(tmp_path)
    detector = create_detector("maskrcnn_resnet50_fpn", parse_label_list("road:mask"), hyperparameters=SMALL)
    version = publish_detector(detector, store, "roads")
    directory = store.path("roads", version)
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["name"] == "roads" and manifest["version"] == 1
    assert manifest["architecture"] == "maskrcnn_resnet50_fpn"
    assert manifest["labels"] == [{"id": 1, "name": "road", "type": "mask", "attributes": []}]
    assert manifest["input_size"] == {"image_size": 96, "max_image_size": 128, "letterbox": False}
    assert manifest["libraries"]["torch"] == torch.__version__.split("+")[0] or manifest["libraries"]["torch"]
    assert {"hyperparameters", "metrics", "provenance", "created"} <= set(manifest)

    loaded = load_detector(directory)
    image = photo(80, 60, seed=3)
    expected, got = detector.detect([image], 0.0)[0], loaded.detect([image], 0.0)[0]
    assert [(s.label, s.points) for s in got] == [(s.label, s.points) for s in expected]
    assert got and got[0].type == "mask"


class _FindsTheImage(torch.nn.Module):
    """A stand-in model that "detects" the non-black part of what it is given, box and mask: with a letterbox it
    is fed a square, and the detector must map its answer back onto the frame it was asked about."""

    def forward(self, images):
        outputs = []
        for image in images:
            assert image.shape[-1] == image.shape[-2], "a letterboxing detector feeds the model squares"
            content = image.sum(0) > 0
            rows, columns = content.any(1).nonzero()[:, 0], content.any(0).nonzero()[:, 0]
            box = [columns[0], rows[0], columns[-1] + 1, rows[-1] + 1]
            outputs.append({"boxes": torch.tensor([box], dtype=torch.float32), "labels": torch.tensor([1]),
                            "scores": torch.tensor([0.9]), "masks": content[None, None].float()})
        return outputs


@pytest.mark.parametrize(("width", "height"), [(80, 50), (50, 81), (64, 64)])
def test_a_letterboxed_model_answers_in_the_frames_own_coordinates(width, height):
    from preannotate.formats import masks
    from preannotate.models.torchvision_family import TorchvisionDetector

    detector = TorchvisionDetector(_FindsTheImage(), parse_label_list("thing:mask"), "mask", "cpu", letterbox=True)
    frame = torch.full((height, width, 3), 200, dtype=torch.uint8).numpy()
    [[shape]] = detector.detect([frame], 0.5)
    bitmap = masks.cvat_rle_to_bitmap(shape.points, width, height)
    assert bitmap.shape == (height, width) and bitmap.all()  # the whole frame, none of the padding


def test_the_letterbox_is_recorded_and_a_loaded_model_pads_again(tmp_path):
    store = ModelStore(tmp_path)
    detector = create_detector("ssdlite320_mobilenet_v3_large", parse_label_list("car"),
                               hyperparameters={"letterbox": True, "image-size": 160})
    directory = store.path("cars", publish_detector(detector, store, "cars"))
    assert json.loads((directory / "manifest.json").read_text())["input_size"]["letterbox"] is True
    loaded = load_detector(directory)
    assert loaded.letterbox and not load_detector(store.path("plain", publish_detector(
        create_detector("ssdlite320_mobilenet_v3_large", parse_label_list("car")), store, "plain"))).letterbox
    image = photo(120, 70, seed=1)
    expected, got = detector.detect([image], 0.0)[0], loaded.detect([image], 0.0)[0]
    assert got and [s.points for s in got] == [s.points for s in expected]
    assert all(0 <= x <= 120 and 0 <= y <= 70 for s in got for x, y in zip(s.points[::2], s.points[1::2], strict=True))


def test_store_versions_are_published_atomically(tmp_path):
    store = ModelStore(tmp_path)

    def broken(directory):
        (directory / "model.pt").write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        store.publish("m", broken)
    assert store.versions("m") == [] and not any((tmp_path / ".staging").iterdir())

    def write(directory):
        (directory / "model.pt").write_bytes(b"w")
        return Manifest(architecture="ssdlite320_mobilenet_v3_large", labels=parse_label_list("a"))

    results = []
    threads = [threading.Thread(target=lambda: results.append(store.publish("m", write))) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [1, 2, 3, 4, 5, 6] and store.versions("m") == [1, 2, 3, 4, 5, 6]
    assert Manifest.read(store.path("m", 4)).version == 4
    assert store.resolve("m") == store.path("m", 6) and store.resolve("m@2") == store.path("m", 2)
    with pytest.raises(ModelNotFound, match="versions: 1, 2, 3, 4, 5, 6"):
        store.resolve("m@9")
    with pytest.raises(ModelNotFound, match="models there: m"):
        store.resolve("other")
    with pytest.raises(ValueError):
        store.publish("../escape", write)


@pytest.mark.parametrize("umask, directory_mode, file_mode", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)])
def test_a_published_version_is_readable_by_others_as_the_umask_allows(tmp_path, umask, directory_mode, file_mode):
    """A function whose container runs as another user than the trainer serves from the store they share."""
    previous = os.umask(umask)
    try:
        store = ModelStore(tmp_path / "store")
        publish_detector(create_detector("ssdlite320_mobilenet_v3_large", parse_label_list("car")), store, "shared")
    finally:
        os.umask(previous)
    version = store.path("shared", 1)
    assert stat.S_IMODE(version.stat().st_mode) == directory_mode
    assert {path.name: stat.S_IMODE(path.stat().st_mode) for path in version.iterdir()} == {
        "manifest.json": file_mode, "model.pt": file_mode}


def test_models_cli_create_list_show(tmp_path, capsys):
    store = str(tmp_path)
    assert cli(["models", "create", "ssdlite320_mobilenet_v3_large", "--labels", "cat,dog", "--store", store]) == 0
    assert cli(["models", "create", "ssdlite320_mobilenet_v3_large", "--labels", "cat", "--name", "pets",
                "--store", store]) == 0
    capsys.readouterr()
    assert cli(["models", "list", "--json", "--store", store]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["name"], r["version"], r["labels"]) for r in rows] == [
        ("pets", 1, 1), ("ssdlite320_mobilenet_v3_large", 1, 2)]
    assert cli(["models", "show", "pets@1", "--store", store]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["labels"][0]["name"] == "cat" and shown["provenance"]["init"] == "random"
    assert shown["hyperparameters"]["batch_size"] == 24  # the SSD defaults our users know
    assert cli(["models", "show", "nothing", "--store", store]) == 2
    assert "no published model named 'nothing'" in capsys.readouterr().err


def test_models_cli_types_the_labels_as_the_composed_model_fills_them(tmp_path, capsys):
    """Untyped labels take the type the model fills; a composition's head decides what it fills."""
    store = str(tmp_path)
    masks = ["-H", "backbone=resnet18; neck=fpn; head=mask-rcnn"]
    assert cli(["models", "create", "custom", "--labels", "a:mask,b:polygon,c", "--store", store, *masks]) == 0, \
        capsys.readouterr().err
    assert cli(["models", "create", "efficientnet_b0", "--labels", "cat,dog,bird", "--store", store]) == 0, \
        capsys.readouterr().err
    typed = {name: [(label.name, label.type) for label in Manifest.read(ModelStore(store).resolve(name)).labels]
             for name in ("custom", "efficientnet_b0")}
    assert typed == {"custom": [("a", "mask"), ("b", "polygon"), ("c", "mask")],
                     "efficientnet_b0": [("cat", "tag"), ("dog", "tag"), ("bird", "tag")]}
    capsys.readouterr()
    # what the model can never fill is still refused, for the composition as given
    assert cli(["models", "create", "custom", "--labels", "a:mask", "--store", store,
                "-H", "backbone=resnet18; head=fcos"]) == 2
    assert "custom predicts boxes: it cannot fill a (mask)" in capsys.readouterr().err
    assert cli(["models", "create", "efficientnet_b0", "--labels", "car:rectangle", "--store", store]) == 2
    assert "efficientnet_b0 predicts frame tags: it cannot fill car (rectangle)" in capsys.readouterr().err


def test_a_version_published_without_promotion_is_kept_but_not_served(tmp_path):
    store = ModelStore(tmp_path)

    def write(directory):
        (directory / "model.pt").write_bytes(b"w")
        return Manifest(architecture="ssdlite320_mobilenet_v3_large", labels=parse_label_list("a"))

    assert store.serving("m") is None
    assert [store.publish("m", write) for _ in range(2)] == [1, 2] and store.serving("m") == 2
    assert store.publish("m", write, promote=False) == 3
    assert store.serving("m") == 2 and store.resolve("m") == store.path("m", 2)
    assert [row["serving"] for row in store.describe()] == [False, True, False]
    store.promote("m", 1)  # roll back
    assert store.resolve("m") == store.path("m", 1)
    assert store.publish("m", write) == 4 and store.serving("m") == 4  # a promoted publish serves the newest
    with pytest.raises(ModelNotFound, match="no version 9"):
        store.promote("m", 9)


def test_models_cli_promote_rolls_back(tmp_path, capsys):
    store = str(tmp_path)
    for _ in range(2):
        assert cli(["models", "create", "ssdlite320_mobilenet_v3_large", "--labels", "cat", "--name", "pets",
                    "--store", store]) == 0
    assert cli(["models", "promote", "pets@1", "--store", store]) == 0
    assert ModelStore(store).serving("pets") == 1
    capsys.readouterr()
    assert cli(["models", "list", "--store", store]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[:2] == ["pets", "1*"] and lines[2].split()[:2] == ["pets", "2"]
    assert cli(["models", "promote", "pets", "--store", store]) == 2
    assert "NAME@VERSION" in capsys.readouterr().err


def test_one_grammar_names_a_model_everywhere(tmp_path):
    from preannotate.models import ModelReference, load_model, open_store

    assert ModelReference.parse("cars@v3") == ModelReference("cars@v3", "cars", 3)
    assert ModelReference.parse("ssdlite320_mobilenet_v3_large").architecture == "ssdlite320_mobilenet_v3_large"
    with pytest.raises(ModelNotFound, match="NAME@VERSION"):
        ModelReference.parse("cars@latest")
    with pytest.raises(ModelNotFound, match="no model store at"):
        open_store(tmp_path / "missing")
    # an architecture needs no store: its pretrained weights (not on this machine: the tests run offline)
    with pytest.raises(PretrainedWeightsUnavailable):
        load_model("ssdlite320_mobilenet_v3_large", tmp_path / "missing")
    with pytest.raises(ModelNotFound, match="no model store at"):
        load_model("cars", tmp_path / "missing")


def test_a_mistyped_model_name_gets_did_you_mean(tmp_path):
    from preannotate.models import load_model

    store = ModelStore(tmp_path)
    store.publish("demo", lambda directory: Manifest(architecture="ssdlite320_mobilenet_v3_large",
                                                     labels=parse_label_list("a")))
    with pytest.raises(ModelNotFound) as raised:
        load_model("dmeo", store)
    assert str(raised.value) == (f"model 'dmeo' has no published version in {tmp_path} yet (did you mean demo?); "
                                 "models there: demo")


# --- the written contracts: every registered family and what it loads ----------------------------------------------

def _members(protocol) -> dict[str, inspect.Signature | None]:
    """A protocol's members: methods with their signatures (without ``self``), attributes with None."""
    names = {name for name in vars(protocol) if not name.startswith("_")} | set(protocol.__annotations__)
    members = {}
    for name in sorted(names):
        member = getattr(protocol, name, None)
        if callable(member):
            signature = inspect.signature(member)
            members[name] = signature.replace(parameters=list(signature.parameters.values())[1:])
        else:
            members[name] = None
    return members


@pytest.mark.parametrize("family", sorted({arch.family for arch in ARCHITECTURES.values()}))
def test_every_registered_family_provides_what_the_family_protocol_names(family):
    from preannotate.models.family import ModelFamily

    arch = next(arch for arch in ARCHITECTURES.values() if arch.family == family)
    assert {a.framework for a in ARCHITECTURES.values() if a.family == family} == {arch.framework}  # one framework
    module = family_of(arch)
    assert isinstance(module, ModelFamily)
    for name, signature in _members(ModelFamily).items():
        provided = getattr(module, name)
        if signature is None:
            assert isinstance(provided, str), name
        else:
            assert list(inspect.signature(provided).parameters) == list(signature.parameters), f"{family}.{name}"


@pytest.mark.parametrize("family", sorted({arch.family for arch in ARCHITECTURES.values()}))
def test_the_families_that_run_converted_provide_what_their_protocol_names(family):
    from preannotate.models import runtime
    from preannotate.models.family import ConvertedDetector, ConvertibleFamily

    module = family_of(next(arch for arch in ARCHITECTURES.values() if arch.family == family))
    assert isinstance(module, ConvertibleFamily) == (family in ("torchvision", "keras"))  # the others: eager
    if not isinstance(module, ConvertibleFamily):
        return
    assert isinstance(module.GRAPH_FILE, str) and module.CONVERTS_TO
    assert set(module.CONVERTS_TO) <= set(runtime.CONVERTED)
    for name in ("convertible", "export_graph"):
        expected = inspect.signature(getattr(ConvertibleFamily, name)).parameters
        assert list(inspect.signature(getattr(module, name)).parameters) == list(expected)[1:], f"{family}.{name}"
    detector = inspect.signature(module.export_graph).parameters["detector"].annotation
    run = inspect.signature(getattr(module, detector).run_converted).parameters
    assert list(run) == list(inspect.signature(ConvertedDetector.run_converted).parameters)


@pytest.mark.parametrize("architecture", [next(a.name for a in ARCHITECTURES.values() if a.family == family)
                                          for family in sorted({a.family for a in ARCHITECTURES.values()})])
def test_what_every_family_creates_and_loads_is_a_detector(architecture, tmp_path):
    from preannotate.models.family import Detector

    output = get_architecture(architecture).output
    labels = parse_label_list({"tag": "day:tag,night:tag", "skeleton": "a:points,b:points"}.get(output, "a,b"))
    created = create_detector(architecture, labels, hyperparameters="init=random; image-size=64")
    store = ModelStore(tmp_path)
    loaded = load_detector(store.path("m", publish_detector(created, store, "m")))
    image = np.zeros((48, 64, 3), np.uint8)
    for detector in (created, loaded):
        assert isinstance(detector, Detector)
        for name, signature in _members(Detector).items():
            if signature is not None:
                assert list(inspect.signature(getattr(detector, name)).parameters) == list(signature.parameters)
        [(shapes, novelty)] = detector.detect_scored([image], 0.0)
        assert all(shape.source == "auto" for shape in shapes) and 0.0 <= novelty
        appearance = detector.appearance([image, image])
        assert appearance is None or len(appearance) == 2


@pytest.mark.parametrize("architecture", ["ssdlite320_mobilenet_v3_large", "fasterrcnn_mobilenet_v3_large_320_fpn"])
def test_examine_measures_what_uncertainty_computes_from_the_models_own_outputs(architecture):
    """On many frames: the flip measure is the disagreement of ``detect`` on the frame and on its mirror (boxes
    mirrored back), the class margin reads for each detection the class scores that gave it its score, and the
    training frames are familiar at every depth while a frame unlike them is not."""
    from preannotate import uncertainty

    torch.manual_seed(0)
    detector = create_detector(architecture, parse_label_list("a,b,c"), hyperparameters="init=random; image-size=64")
    with torch.no_grad():  # heads start out scoring every class alike: make the classes differ, as trained ones do
        for name, parameter in detector.model.named_parameters():
            if "head" in name:
                parameter += 0.2 * torch.randn_like(parameter)
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(6)]
    detector.familiar = detector.appearance(frames)
    threshold = 0.02  # random weights score low: let many detections through
    examined = detector.examine(frames, threshold, flip=True)
    mirrored = detector.detect([np.ascontiguousarray(frame[:, ::-1]) for frame in frames], threshold)

    def as_arrays(shapes, width=None):
        boxes = np.array([shape.points for shape in shapes], float).reshape(-1, 4)
        if width is not None:
            boxes = np.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1)
        return boxes, np.array([shape.label for shape in shapes]), np.array([shape.score for shape in shapes])

    detections = sum(len(shapes) for shapes, _ in examined)
    assert detections > 10  # enough detections for the margin and the flip to say something
    for (shapes, measured), frame, flipped in zip(examined, frames, mirrored, strict=True):
        assert set(measured) <= set(uncertainty.MEASURED)
        assert measured["flip"] == pytest.approx(uncertainty.flip_disagreement(
            as_arrays(shapes), as_arrays(flipped, frame.shape[1])), abs=1e-5)
        assert {"novelty_early", "novelty_middle", "novelty_deep"} <= set(measured)
        assert all(measured[f"novelty_{depth}"] == 0.0 for depth in ("early", "middle", "deep"))
    with torch.inference_mode():
        outputs = detector._outputs(frames)
    for image, (output, (_, measured)) in enumerate(zip(outputs, examined, strict=True)):
        keep = detector._candidates(output, threshold)
        rows = detector._class_scores_of(image, output, keep)
        labels, scores = output["labels"][keep].numpy(), output["scores"][keep].numpy()
        assert rows[np.arange(len(labels)), labels - 1] == pytest.approx(scores, abs=1e-6)
        assert np.ptp(rows) > 0.01  # the classes' scores differ: a wrong row would show
        assert measured["margin"] == pytest.approx(max(uncertainty.class_confusion(rows), default=0.0), abs=1e-5)
    unlike = np.full((48, 64, 3), (0, 200, 0), np.uint8)  # flat green: nothing like the noise it was shown
    [(_, measured)] = detector.examine([unlike], threshold)
    assert measured["novelty_early"] == 1.0


def test_a_mirrored_array_view_is_detected_as_its_copy():
    """``frame[:, ::-1]`` (a mirrored view, negative strides) is what a user's flip gives: torch cannot wrap it."""
    detector = create_detector("ssdlite320_mobilenet_v3_large", parse_label_list("car,person"), hyperparameters=SMALL)
    frame = np.asarray(photo(80, 60))
    mirrored = frame[:, ::-1]
    assert mirrored.strides[1] < 0
    assert detector.detect([mirrored], threshold=0.0) == detector.detect([mirrored.copy()], threshold=0.0)
