"""Image classification as CVAT tags: the classifier family, its training from frame tags, its scores, and every
door a tag leaves by — the detector contract, the Nuclio handler, cvat-sdk's auto-annotation, ``annotate`` — with
the tags of synthetic tasks (each frame lit as ``day``, ``night`` or ``fog``) and of the CVAT double."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import Counter

import cvat_sdk.auto_annotation as cvataa
import numpy as np
import pytest
import torch
import torchvision
from cvat_sdk import make_client, models
from cvat_sdk.core.proxies.annotations import AnnotationUpdateAction
from nuclio_sdk import Event
from nuclio_sdk.test import Platform
from preannotate import cvat_function
from preannotate.annotate import annotate_task
from preannotate.formats import imagenet
from preannotate.formats.dataset import export_dataset, read_dataset, training_split
from preannotate.models import ARCHITECTURES, ModelStore, create_detector, get_architecture, load_model
from preannotate.models.classifier_family import TagModel
from preannotate.models.registry import DEFAULT_CLASSIFIER
from preannotate.serving import nuclio
from preannotate.shapes import TAG, FrameAnnotations, Label, Shape
from preannotate.training import data, runs, synthetic
from preannotate.training.evaluation import accuracy
from preannotate.training.loop import train
from preannotate.training.report import confusion

from tests.conftest import b64

logging.getLogger("cvat_sdk").setLevel(logging.ERROR)  # cvat-sdk 2.80 warns about the 2.42 server

CLASSIFIERS = [name for name, arch in ARCHITECTURES.items() if arch.output == TAG]
LIGHTING = [label.name for label in synthetic.TAG_LABELS]


@pytest.fixture(scope="module")
def lighting():
    """A synthetic task whose frames are tagged by their lighting (and carry shapes a classifier must ignore)."""
    return synthetic.generate(60, 96, 72, tags=True, seed=3)


@pytest.fixture(scope="module")
def trained(lighting, tmp_path_factory):
    """A MobileNetV3-Small trained from random weights on the lighting tags, published as ``lighting@1``."""
    root = tmp_path_factory.mktemp("classifier")
    train_items, val_items = data.split_task(lighting.annotations, lighting.images, 0.25)
    result = train("mobilenet_v3_small", lighting.annotations.labels, train_items, val_items, root / "run",
                   store=root / "store", name="lighting", progress=False, workers=0,
                   hyperparameters="init=random; num-steps=120; batch-size=16; image-size=64; num-validations=2")
    return result, ModelStore(root / "store")


# ------------------------------------------------------------------------------------------------ the family

def test_the_registry_offers_the_classifiers_with_efficientnet_b4_the_default():
    assert set(CLASSIFIERS) == {"efficientnet_b0", "efficientnet_b4", "efficientnet_b7", "resnet50",
                                "mobilenet_v3_large", "mobilenet_v3_small"}
    assert DEFAULT_CLASSIFIER == "efficientnet_b4"
    b4 = get_architecture("efficientnet_b4")
    assert (b4.output, b4.label_types, b4.framework, b4.image_size) == ("tag", ("tag", "any"), "pytorch", 380)
    assert b4.function_name == "pth-preannotate-efficientnet-b4"


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_every_classifier_builds_takes_a_training_step_and_tags_a_frame(name):
    torch.manual_seed(0)
    labels = [Label("day", TAG), Label("night", TAG), Label("fog", TAG)]
    classifier = create_detector(name, labels, init="random", hyperparameters="image-size=32")
    model = classifier.model
    assert isinstance(model, TagModel) and model.network.__class__.__name__.lower().startswith(name.split("_")[0][:6])
    model.train()
    losses = model([torch.rand(3, 40, 56), torch.rand(3, 32, 32)],
                   [{"labels": torch.tensor([1])}, {"labels": torch.tensor([3])}])
    assert set(losses) == {"loss_classifier"} and losses["loss_classifier"].item() > 0
    losses["loss_classifier"].backward()
    assert all(p.grad is not None for p in model.network.parameters() if p.requires_grad)
    model.eval()
    [tags] = classifier.detect([np.zeros((30, 50, 3), np.uint8)], 0.0)
    assert len(tags) == 1 and tags[0].type == TAG and tags[0].label in {"day", "night", "fog"}
    assert tags[0].points == [] and 1 / 3 <= tags[0].score <= 1


def test_in_eval_mode_every_class_comes_ranked_and_the_threshold_keeps_only_a_sure_best():
    torch.manual_seed(1)
    classifier = create_detector("mobilenet_v3_small", [Label("a", TAG), Label("b", TAG)], init="random",
                                 hyperparameters="image-size=32")
    [output] = classifier.model([torch.rand(3, 32, 32)])
    assert output["labels"].tolist() in ([1, 2], [2, 1])
    assert torch.all(output["scores"][:-1] >= output["scores"][1:]) and abs(output["scores"].sum().item() - 1) < 1e-5
    image = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    [[tag]] = classifier.detect([image], 0.0)
    assert classifier.detect([image], tag.score - 1e-4) == [[tag]]
    assert classifier.detect([image], tag.score + 1e-4) == [[]]  # not sure enough: left for a person


def test_trainable_backbone_layers_freezes_the_first_stages():
    classifier = create_detector("resnet50", [Label("a", TAG), Label("b", TAG)], init="random",
                                 hyperparameters="image-size=32")
    from preannotate.models import family_of

    family_of(get_architecture("resnet50")).freeze_backbone(classifier.model, 2, "random")
    net = classifier.model.network
    assert not any(p.requires_grad for p in [*net.conv1.parameters(), *net.layer1.parameters(),
                                             *net.layer2.parameters()])
    assert all(p.requires_grad for p in [*net.layer3.parameters(), *net.layer4.parameters(), *net.fc.parameters()])


def test_pretrained_without_labels_tags_with_imagenet_classes(monkeypatch, tmp_path):
    """No weights can be downloaded here: the offline message says what to do, and the labels are ImageNet's."""
    from preannotate.models import PretrainedWeightsUnavailable, family_of

    arch = get_architecture("efficientnet_b0")
    labels = family_of(arch).pretrained_labels(arch)
    assert len(labels) == 1000 and labels[0] == Label("tench", TAG, id=1) and len({x.name for x in labels}) == 1000
    monkeypatch.setenv("PREANNOTATE_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(PretrainedWeightsUnavailable, match="init=random"):
        create_detector("efficientnet_b0", init="pretrained")


def test_a_box_label_is_refused_for_a_classifier():
    from preannotate.models import UnsupportedLabels, check_label_types

    with pytest.raises(UnsupportedLabels, match="predicts frame tags: it cannot fill car \\(rectangle\\)"):
        check_label_types(get_architecture("efficientnet_b4"), [Label("car", "rectangle"), Label("day", TAG)])


# ------------------------------------------------------------------------------------------------ data and scores

def test_a_frame_is_an_example_of_each_tag_it_has_and_untagged_frames_are_left_out():
    frames = [FrameAnnotations(0, 8, 8, "a", tags=["day"]), FrameAnnotations(1, 8, 8, "b", tags=["day", "fog"]),
              FrameAnnotations(2, 8, 8, "c"), FrameAnnotations(3, 8, 8, "d", tags=["cvat.review", "night"])]
    labels = [Label("car", "rectangle"), Label("day", TAG), Label("fog", "any"), Label("night", TAG),
              Label("sign", "any")]
    items = [(frame, None) for frame in frames]
    classes = runs.tag_labels(labels, items)
    assert [label.name for label in classes] == ["day", "fog", "night"]  # sign: an "any" label never used as a tag
    examples = runs.tag_examples(items, classes)
    assert [(f.name, f.tags) for f, _ in examples] == [("a", ["day"]), ("b", ["day"]), ("b", ["fog"]),
                                                        ("d", ["night"])]


def test_accuracy_counts_top_1_top_5_and_each_class():
    labels = [Label(name, TAG, id=i) for i, name in enumerate("abcdefg", start=1)]
    truth = [1, 1, 2, 3]
    ranked = [[1, 2, 3, 4, 5, 6, 7], [2, 3, 4, 5, 1, 6, 7], [2, 1, 3, 4, 5, 6, 7], [7, 6, 5, 4, 2, 1, 3]]
    scores = accuracy(truth, ranked, labels)
    assert scores["top1"] == 0.5 and scores["top5"] == 0.75 and scores["images"] == 4
    assert scores["per_class"]["a"] == {"accuracy": 0.5, "frames": 2}
    assert scores["per_class"]["b"] == {"accuracy": 1.0, "frames": 1}
    assert scores["per_class"]["g"] == {"accuracy": None, "frames": 0}


def test_the_confusion_matrix_counts_each_frames_best_tag_and_frames_left_untagged():
    labels = [Label("day", TAG, id=1), Label("night", TAG, id=2)]
    frames = [FrameAnnotations(i, 4, 4, tags=[tag]) for i, tag in enumerate(["day", "day", "night"])]
    predicted = [[Shape("day", TAG, [], score=0.9)], [Shape("night", TAG, [], score=0.6)], []]
    assert confusion(frames, predicted, labels)["confusion"] == [[1, 1, 0], [0, 0, 1]]


# ------------------------------------------------------------------------------------------------ formats

def test_tags_export_as_an_imagenet_folder_that_torchvision_reads_and_that_reads_back(lighting, tmp_path):
    frames = {n: dataclasses.replace(f, tags=list(f.tags)) for n, f in list(lighting.annotations.frames.items())[:12]}
    frames[0].tags = ["day", "fog"]  # several tags: a copy in each folder, as CVAT's ImageNet export does
    frames[1].tags = []
    labels = [*lighting.annotations.labels, Label("a/b", TAG)]
    summary = export_dataset(tmp_path / "tags", "imagenet", labels, sorted(frames.items()), lighting.images,
                             val_fraction=0.25, progress=False)
    untagged = sum(not f.tags for f in frames.values())
    assert untagged >= 1 and summary.skipped == Counter({imagenet.UNTAGGED: untagged})
    assert sum(summary.objects.values()) == sum(len(f.tags) for f in frames.values())
    assert (tmp_path / "tags" / "train" / "day").is_dir() or (tmp_path / "tags" / "val" / "day").is_dir()
    folder = torchvision.datasets.ImageFolder(str(tmp_path / "tags" / "train"))
    assert set(folder.classes) <= set(LIGHTING)
    read_labels, splits = read_dataset(tmp_path / "tags")
    assert [label.name for label in read_labels] == [label.name for label in labels]  # labels.json keeps them all
    back = Counter((frame.name, tuple(frame.tags)) for pairs in splits.values() for frame, _ in pairs)
    wanted = Counter((f.name, (tag,)) for f in frames.values() for tag in f.tags)
    assert back == wanted
    labels_back, train_items, val_items = training_split(tmp_path / "tags")
    assert train_items and val_items and all(len(frame.tags) == 1 for frame, _ in train_items + val_items)
    frame, image = train_items[0]
    _, array = next(iter(image.decoded([frame.frame])))
    assert array.shape == (frame.height, frame.width, 3)


def test_a_folder_made_elsewhere_takes_its_folder_names_as_tag_labels(tmp_path):
    from tests.conftest import photo

    for split, name in (("train", "cat"), ("train", "dog"), ("val", "dog")):
        (tmp_path / split / name).mkdir(parents=True, exist_ok=True)
        photo(32, 24).save(tmp_path / split / name / "x.jpg")
    labels, splits = read_dataset(tmp_path)
    assert labels == [Label("cat", TAG, id=1), Label("dog", TAG, id=2)]
    assert [(f.tags, f.width, f.height) for f, _ in splits["val"]] == [(["dog"], 32, 24)]


def test_tfrecords_carry_the_frame_tags_as_image_class(lighting, tmp_path):
    items = sorted(lighting.annotations.frames.items())[:6]
    export_dataset(tmp_path / "records", "tfrecord", lighting.annotations.labels, items, lighting.images,
                   progress=False)
    _, splits = read_dataset(tmp_path / "records")
    assert [frame.tags for frame, _ in splits["train"]] == [frame.tags for _, frame in items]


# ------------------------------------------------------------------------------------------------ training

def test_a_classifier_learns_the_tags_from_scratch_and_is_published_with_its_accuracy(trained, lighting):
    result, store = trained
    assert result.metrics["top1"] >= 0.9 and result.metrics["top5"] == 1.0
    assert set(result.metrics["per_class"]) == set(LIGHTING)
    model = load_model("lighting", store)
    assert model.manifest.architecture == "mobilenet_v3_small" and [label.name for label in model.labels] == LIGHTING
    assert model.manifest.metrics["top1"] == result.metrics["top1"]
    held = [frame for frame in lighting.annotations.frames.values() if frame.tags][-10:]
    arrays = [array for _, array in lighting.images.decoded([frame.frame for frame in held])]
    predicted = model.detect(arrays, 0.0)
    assert sum(tags[0].label == frame.tags[0] for frame, tags in zip(held, predicted, strict=True)) >= 8
    records = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(r["top1"] for r in records if r["event"] == "validation") == result.metrics["top1"]  # the best kept
    assert [p.name for p in result.report] == ["report.png", "predictions.png"]


def test_a_task_without_tags_cannot_train_a_classifier(lighting, tmp_path):
    frames = [(FrameAnnotations(f.frame, f.width, f.height, f.name, f.shapes), lighting.images)
              for f in list(lighting.annotations.frames.values())[:4]]
    with pytest.raises(ValueError, match="no training frame has a tag of day, night, fog: tag frames in CVAT"):
        train("mobilenet_v3_small", lighting.annotations.labels, frames, [], tmp_path / "run",
              hyperparameters="init=random; num-steps=1; batch-size=2", progress=False, workers=0)


# ------------------------------------------------------------------------------------------------ serving

def test_the_nuclio_function_answers_cvat_with_tag_items(trained, lighting, monkeypatch):
    """What CVAT's lambda manager turns into a tag (``DetectionResultConverter``: ``type == "tag"``)."""
    _, store = trained
    monkeypatch.setenv("PREANNOTATE_MODEL", "lighting")
    monkeypatch.setenv("PREANNOTATE_MODEL_STORE", str(store.root))
    monkeypatch.setenv("PREANNOTATE_DEVICE", "cpu")
    frame = next(f for f in lighting.annotations.frames.values() if f.tags)
    image = dict(lighting.images.encoded([frame.frame]))[frame.frame]
    event = Event(body={"image": b64(image), "threshold": 0.5}, content_type="application/json", method="POST",
                  path="/")
    response = Platform().call_handler(nuclio.handler, event)
    items = json.loads(response.body)
    assert response.status_code == 200 and len(items) == 1
    assert set(items[0]) == {"label", "type", "confidence", "attributes"}
    assert items[0]["type"] == "tag" and items[0]["label"] == frame.tags[0] and float(items[0]["confidence"]) >= 0.5


def test_cvat_sdk_and_annotate_write_the_same_tags_and_reruns_replace_them(trained, lighting, cvat_double,
                                                                          tmp_path):
    _, store = trained
    numbers = [f.frame for f in lighting.annotations.frames.values() if f.tags][:6]
    files = [(f"img_{n}.jpg", dict(lighting.images.encoded([n]))[n], 96, 72) for n in numbers]
    labels = [{"name": "day", "type": "tag"}, {"name": "night", "type": "tag"}, {"name": "fog", "type": "any"},
              {"name": "car", "type": "rectangle"}]
    ours, theirs = (cvat_double.add_task(name, files, labels) for name in ("ours", "theirs"))
    with make_client(cvat_double.base_url, credentials=cvat_double.credentials) as client:
        client.tasks.retrieve(ours).update_annotations(models.PatchedLabeledDataRequest(tags=[
            models.LabeledImageRequest(frame=0, label_id=cvat_double.label_id(ours, "day"), source="manual")]),
            action=AnnotationUpdateAction.CREATE)
        options = {"store": store.root, "state_dir": tmp_path / "state", "cache_dir": tmp_path / "chunks",
                   "progress": False, "threshold": 0.0, "batch_size": 1, "confidence_tags": False}
        first = annotate_task(client, ours, detector="lighting", **options)
        assert (first.created, first.deleted) == (len(numbers), 0)
        again = annotate_task(client, ours, detector="lighting", **options)  # a re-run replaces its tags
        assert (again.created, again.deleted) == (len(numbers), len(numbers))
        function = cvat_function.create(model="lighting", store=str(store.root))
        assert {label.type for label in function.spec.labels} == {"tag"}
        cvataa.annotate_task(client, theirs, function, conf_threshold=0.0)

    def tags(task, source):
        names = {cvat_double.label_id(task, n): n for n in ("day", "night", "fog")}
        return sorted((t["frame"], names[t["label_id"]]) for t in cvat_double.annotations(task)["tags"]
                      if t["source"] == source)

    assert len(tags(ours, "auto")) == len(numbers)  # one per frame, however often it ran
    assert tags(ours, "auto") == tags(theirs, "auto")
    assert tags(ours, "manual") == [(0, "day")]  # a person's tag stays
    truth = [lighting.annotations.frames[n].tags[0] for n in numbers]
    assert sum(label == truth[frame] for frame, label in tags(ours, "auto")) >= len(numbers) - 1
    assert not cvat_double.annotations(ours)["shapes"]


@pytest.mark.slow
def test_from_tags_people_finished_in_cvat_to_tags_written_back(lighting, cvat_double, monkeypatch, tmp_path, capsys):
    """``preannotate train`` on a CVAT task whose job is completed (its tags exported ImageNet-style), then
    ``preannotate annotate`` of a new task: what the menu loop does, for a classifier."""
    from preannotate.cli import main as cli

    for key, value in (("CVAT_URL", cvat_double.base_url), ("CVAT_USERNAME", cvat_double.credentials[0]),
                       ("CVAT_PASSWORD", cvat_double.credentials[1])):
        monkeypatch.setenv(key, value)
    frames = sorted(lighting.annotations.frames.values(), key=lambda f: f.frame)
    files = [(f.name, dict(lighting.images.encoded([f.frame]))[f.frame], f.width, f.height) for f in frames]
    labels = [{"name": "car", "type": "rectangle"}, *({"name": n, "type": "tag"} for n in LIGHTING)]
    labelled, fresh = cvat_double.add_task("labelled", files, labels), cvat_double.add_task("new", files[:8], labels)
    with make_client(cvat_double.base_url, credentials=cvat_double.credentials) as client:
        client.tasks.retrieve(labelled).update_annotations(models.PatchedLabeledDataRequest(tags=[
            models.LabeledImageRequest(frame=f.frame, label_id=cvat_double.label_id(labelled, f.tags[0]))
            for f in frames if f.tags]), action=AnnotationUpdateAction.CREATE)
        for job in client.jobs.list(task_id=labelled):
            client.jobs.retrieve(job.id).update({"state": "completed"})
    store = tmp_path / "store"
    assert cli(["train", "--task", str(labelled), "--model", "mobilenet_v3_small", "--name", "lighting", "-H",
                "init=random; num-steps=100; batch-size=16; image-size=64; num-validations=1; val-fraction=0.25",
                "--store", str(store), "--out", str(tmp_path / "run")]) == 0
    printed = capsys.readouterr().out
    assert "published lighting@1 after 100 steps (completed): top-1 " in printed
    manifest = json.loads((store / "lighting" / "v1" / "manifest.json").read_text())
    assert [(label["name"], label["type"]) for label in manifest["labels"]] == [(n, "tag") for n in LIGHTING]
    assert manifest["metrics"]["top1"] >= 0.8 and list(manifest["provenance"]["cvat"]["tasks"]) == [str(labelled)]
    exported = tmp_path / "run" / "dataset"
    assert sorted(p.name for p in (exported / "train").iterdir()) == sorted(LIGHTING)  # the ImageNet layout

    assert cli(["annotate", "--task", str(fresh), "--model", "lighting", "--store", str(store),
                "--no-confidence-tags", "--threshold", "0"]) == 0
    names = {cvat_double.label_id(fresh, n): n for n in LIGHTING}
    written = {t["frame"]: names[t["label_id"]] for t in cvat_double.annotations(fresh)["tags"]}
    assert len(written) == 8 and not cvat_double.annotations(fresh)["shapes"]
    truth = {i: f.tags[0] for i, f in enumerate(frames[:8]) if f.tags}
    assert sum(written[i] == tag for i, tag in truth.items()) >= len(truth) - 1


def test_the_bridge_exports_the_tags_of_a_task_a_job_and_a_project(cvat_double, monkeypatch, tmp_path, capsys):
    """Task 7 of the recordings has one tag: ``daytime`` on frame 0 (job 7); job 8 has none."""
    from preannotate.cli import main as cli

    for key, value in (("CVAT_URL", cvat_double.base_url), ("CVAT_USERNAME", cvat_double.credentials[0]),
                       ("CVAT_PASSWORD", cvat_double.credentials[1])):
        monkeypatch.setenv(key, value)
    first = cvat_double.tasks[7].frames[0].name
    for source, prefix in ((["--task", "7"], ""), (["--job", "7"], ""), (["--project", "6"], "task_7/")):
        out = tmp_path / source[0].strip("-")
        assert cli(["export", *source, "--format", "imagenet", "--out", str(out)]) == 0, capsys.readouterr().err
        images = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.suffix in (".jpg", ".jpeg"))
        assert images == [f"train/daytime/{prefix}{first}"]
        labels, splits = read_dataset(out)
        assert "daytime" in [label.name for label in labels]
        assert [(frame.name, frame.tags) for frame, _ in splits["train"]] == [(prefix + first, ["daytime"])]
    capsys.readouterr()
    assert cli(["export", "--job", "8", "--format", "imagenet", "--out", str(tmp_path / "none")]) == 0
    assert not list((tmp_path / "none").rglob("*.jpg"))  # nothing tagged: no image, and said
    assert "left out (no class to learn): 3 untagged frames" in capsys.readouterr().out


def test_train_on_all_takes_the_tags_people_made_in_unfinished_jobs_and_never_the_models(cvat_double):
    """Task 8 of the recordings: one job, new (unfinished); labels cat and dog (type any)."""
    from preannotate.cvat.reader import read_finished

    cat, dog = cvat_double.label_id(8, "cat"), cvat_double.label_id(8, "dog")
    with make_client(cvat_double.base_url, credentials=cvat_double.credentials) as client:
        client.tasks.retrieve(8).update_annotations(models.PatchedLabeledDataRequest(tags=[
            models.LabeledImageRequest(frame=0, label_id=cat, source="manual"),
            models.LabeledImageRequest(frame=0, label_id=dog, source="auto"),
            models.LabeledImageRequest(frame=1, label_id=dog, source="auto")]), action=AnnotationUpdateAction.CREATE)
        assert read_finished(client, 8).annotations.frames == {}  # by default: finished jobs only
        everything = read_finished(client, 8, ("all",)).annotations.frames
    assert {number: frame.tags for number, frame in everything.items() if frame.tags} == {0: ["cat"]}
