"""TensorFlow detectors: the keras family behind the same calls as torch's, the TF OD API's keys, the records
pipeline, serving in a TensorFlow-only process, and (slow) training from TFRecords with resume and fine-tuning."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from preannotate.formats.dataset import export_dataset
from preannotate.hyperparameters import HyperparameterError
from preannotate.models import (
    ModelStore,
    create_detector,
    get_architecture,
    hyperparameters_for,
    load_detector,
    publish_detector,
    save_artifact,
)
from preannotate.models import keras_family as family
from preannotate.shapes import parse_label_list
from preannotate.training import keras_adapter, optim
from preannotate.training.synthetic import generate

from tests.conftest import b64, encode, files_activity, photo, run_while_advancing, wait_while_advancing

SSD = "keras_ssd_mobilenet_v2_fpnlite_320"
SMALL = "init=random;image-size=96"
REPO = Path(__file__).resolve().parents[1]


def test_the_tf_od_api_names_change_the_run():
    hp = hyperparameters_for(SSD, "momentum_optimizer_value=0.8\nmomentum_decay=0.95\nmomentum_epsilon=1.0\n"
                                  "decay_steps=200\ndecay_factor=0.9")
    recipe = hp.recipe
    assert (recipe.optimizer, recipe.momentum, recipe.rmsprop_decay) == ("rmsprop", 0.8, 0.95)
    assert recipe.rmsprop_epsilon == 1.0
    # exponential_decay_learning_rate is a staircase in the TF OD API (staircase: true by default)
    assert (hp.recipe.schedule, hp.recipe.schedule_step_size, hp.recipe.schedule_gamma) == ("step", 200, 0.9)
    schedule = optim.Schedule(hp.recipe, 1000)
    assert schedule.main(199) == 1.0 and schedule.main(200) == pytest.approx(0.9)
    keras_rms = keras_adapter.build_optimizer(hp.recipe)
    assert (keras_rms.rho, keras_rms.momentum, keras_rms.epsilon) == (0.95, 0.8, 1.0)
    torch_rms = optim.build_optimizer([torch.nn.Parameter(torch.zeros(2))], hp.recipe)
    assert (torch_rms.defaults["alpha"], torch_rms.defaults["momentum"], torch_rms.defaults["eps"]) == (0.95, 0.8, 1.0)
    # a user's schedule wins over the one decay_steps brings
    assert hyperparameters_for(SSD, "decay_steps=200;schedule=exponential").recipe.schedule == "exponential"


def test_one_cycle_of_the_keras_trainer_is_torchs():
    hp = hyperparameters_for(SSD, "schedule=one-cycle;initial-learning-rate=0.01")
    schedule = optim.Schedule(hp.recipe, 50)
    parameter = torch.nn.Parameter(torch.zeros(1))
    reference = optim.build_scheduler(torch.optim.SGD([parameter], lr=0.01), hp.recipe, 50)
    for step in range(50):
        assert 0.01 * schedule(step) == pytest.approx(reference.get_last_lr()[0], rel=1e-9, abs=1e-15)
        reference.optimizer.step()
        reference.step()


def test_post_processing_keys_reach_torchvisions_knobs_and_a_missing_knob_names_the_models_that_have_it():
    labels = parse_label_list("car,person")
    detector = create_detector("fasterrcnn_mobilenet_v3_large_320_fpn", labels, hyperparameters=(
        "init=random;second_stage_nms_score_threshold=0.2;second_stage_nms_iou_threshold=0.3;"
        "second_stage_max_detections_max_total_detections=7"))
    heads = detector.model.roi_heads
    assert (heads.score_thresh, heads.nms_thresh, heads.detections_per_img) == (0.2, 0.3, 7)
    ssd = create_detector("ssdlite320_mobilenet_v3_large", labels, hyperparameters="init=random;max-total-detections=9")
    assert ssd.model.detections_per_img == 9
    with pytest.raises(HyperparameterError, match=r"ssdlite320_mobilenet_v3_large cannot honour "
                                                  r"max-detections-per-class.*keras_ssd_mobilenet_v2_fpnlite_320"):
        hyperparameters_for("ssdlite320_mobilenet_v3_large", "second_stage_max_detections_per_class=3")


def test_class_nms_caps_detections_per_class_and_per_image():
    boxes = np.array([[[10 + 40 * i, 10, 40 + 40 * i, 40] for i in range(5)] + [[0, 100, 30, 130]]], np.float32)
    logits = np.full((1, 6, 2), -10.0, np.float32)
    logits[0, :5, 0] = [4, 3, 2, 1, 0.5]   # five separate boxes of class 0, decreasing scores
    logits[0, 5, 1] = 5                     # one of class 1
    capped = family.decoder({"max_detections_per_class": 2})(boxes, logits)
    kept = [(int(c), round(float(s), 3)) for c, s in zip(capped["labels"][0], capped["confidence"][0], strict=True)
            if s > 0]
    assert sorted(kept) == sorted([(1, 0.993), (0, 0.982), (0, 0.953)])
    total = family.decoder({"max_total_detections": 2, "nms_score_threshold": 0.5})(boxes, logits)
    assert int(total["num_detections"][0]) == 2
    overlapping = np.array([[[10, 10, 50, 50], [12, 12, 52, 52]]], np.float32)
    both = np.array([[[3.0, -10], [2.0, -10]]], np.float32)
    assert int(family.decoder({"nms_iou_threshold": 0.5})(overlapping, both)["num_detections"][0]) == 1
    assert int(family.decoder({"nms_iou_threshold": 0.95})(overlapping, both)["num_detections"][0]) == 2


def test_a_published_keras_model_loads_with_its_post_processing(tmp_path):
    store = ModelStore(tmp_path / "store")
    detector = create_detector(SSD, parse_label_list("car,person"),
                               hyperparameters=SMALL + ";max-detections-per-class=3;nms-iou-threshold=0.4")
    version = publish_detector(detector, store, "tf-cars")
    manifest = json.loads((store.path("tf-cars", version) / "manifest.json").read_text())
    assert (manifest["framework"], manifest["weights"]) == ("tensorflow", "model.keras")
    loaded = load_detector(store.path("tf-cars", version))
    nms = loaded.model.prediction_decoder
    assert (nms.max_detections_per_class, nms.iou_threshold) == (3, 0.4)
    image = photo(80, 60)
    assert [s.points for s in loaded.detect([image], 0.0)[0]] == [s.points for s in detector.detect([image], 0.0)[0]]


def test_init_previous_with_another_label_set_keeps_all_but_the_class_head(tmp_path):
    first = create_detector(SSD, parse_label_list("car,person"), hyperparameters=SMALL)
    (tmp_path / "v1").mkdir()
    save_artifact(first, tmp_path / "v1")
    second = create_detector(SSD, parse_label_list("car,person,bus"), init="previous", previous=tmp_path / "v1",
                             hyperparameters=SMALL)
    old, new = family._detector_weights(first.model), family._detector_weights(second.model)
    same = [np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(old, new, strict=True)]
    different = [b.path for b, equal in zip(new, same, strict=True) if not equal]
    assert len(different) == 2 and all("classification_head" in path for path in different)  # its last kernel, bias
    assert second.manifest.provenance["init"] == "previous"


def _items(count=12, seed=0):
    task = generate(count, width=96, height=72, seed=seed, objects=(1, 2), size=(0.3, 0.5))
    return task, [(frame, task.images) for frame in task.annotations.frames.values()]


def test_records_pipeline_is_deterministic_resumable_and_in_pixels(tmp_path):
    task, items = _items()
    files = keras_adapter.write_records(items, task.annotations.labels, tmp_path, "train")
    assert files == [tmp_path / "train.record-00000-of-00001"]
    assert keras_adapter.write_records(items, task.annotations.labels, tmp_path, "train") == files  # reused
    hp = hyperparameters_for(SSD, SMALL + ";batch-size=4;augment=flip,colour,scale")
    first = [batch for batch, _ in zip(keras_adapter.pipeline(files, hp, 96, train=True), range(4), strict=False)]
    again = [batch for batch, _ in zip(keras_adapter.pipeline(files, hp, 96, train=True), range(4), strict=False)]
    resumed = next(iter(keras_adapter.pipeline(files, hp, 96, train=True, start=2 * 4)))
    for (images, targets), (images2, targets2) in zip(first, again, strict=True):
        assert np.array_equal(images.numpy(), images2.numpy())
        assert np.array_equal(targets["boxes"].numpy(), targets2["boxes"].numpy())
    assert np.array_equal(resumed[0].numpy(), first[2][0].numpy())  # a resume draws what the run would have
    images, targets = first[0]
    assert images.shape == (4, 96, 96, 3) and float(images.numpy().max()) <= 255.0
    labels, boxes = targets["labels"].numpy(), targets["boxes"].numpy()
    real = labels >= 0
    assert real.any() and (boxes[real] >= -1e-3).all() and (boxes[real] <= 96 + 1e-3).all()
    assert set(labels[real].astype(int)) <= set(range(len(task.annotations.labels)))
    # unaugmented, the boxes are the frames' own, scaled to the square
    plain = next(iter(keras_adapter.pipeline(files, hp, 96, train=False, batch=1)))
    frame = items[0][0]
    expected = np.array([s.bbox() for s in frame.shapes]) * [96 / 96, 96 / 72, 96 / 96, 96 / 72]
    np.testing.assert_allclose(plain[1]["boxes"].numpy()[0][:len(frame.shapes)], expected, atol=0.6)


def test_the_tensorflow_function_serves_cvat_shapes_without_loading_torch(tmp_path):
    store = ModelStore(tmp_path / "store")
    # untrained, the class head says its prior (0.01) everywhere: a zero score floor lets its boxes through
    publish_detector(create_detector(SSD, parse_label_list("car,person"), hyperparameters=SMALL +
                                     ";nms-score-threshold=0"), store, "tf-cars")
    (tmp_path / "frame.b64").write_text(b64(encode(photo(80, 60))))
    script = f"""
import json, sys
import nuclio_sdk, nuclio_sdk.test
from preannotate.serving import nuclio
image = open({str(tmp_path / 'frame.b64')!r}).read()
platform = nuclio_sdk.test.Platform()
event = nuclio_sdk.Event(body={{"image": image, "threshold": 0.0}}, content_type="application/json", method="POST",
                         path="/", headers={{}})
response = platform.call_handler(nuclio.handler, event)
bad = platform.call_handler(nuclio.handler, nuclio_sdk.Event(body={{"image": "x"}}, content_type="application/json",
                                                              method="POST", path="/", headers={{}}))
print(json.dumps({{"status": response.status_code, "shapes": json.loads(response.body), "bad": bad.status_code,
                  "message": json.loads(bad.body), "torch": "torch" in sys.modules}}))
"""
    env = {**os.environ, "PREANNOTATE_MODEL": "tf-cars", "PREANNOTATE_MODEL_STORE": str(store.root),
           "PREANNOTATE_DEVICE": "cpu"}
    done = run_while_advancing([sys.executable, "-c", script], env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["status"] == 200 and answer["torch"] is False
    assert answer["shapes"] and {s["type"] for s in answer["shapes"]} == {"rectangle"}
    assert {s["label"] for s in answer["shapes"]} <= {"car", "person"}
    assert all(len(s["points"]) == 4 and 0 <= float(s["confidence"]) <= 1 for s in answer["shapes"])
    assert answer["bad"] == 400 and "Traceback" not in json.dumps(answer["message"])


def _export_tfrecord(tmp_path, count=24):
    task, items = _items(count, seed=3)
    summary = export_dataset(tmp_path / "records", "tfrecord", task.annotations.labels,
                             [(frame.frame, frame) for frame, _ in items], task.images, val_fraction=0.25, seed=0,
                             progress=False)
    assert any(path.name.startswith("train.record") for path in summary.files)
    return tmp_path / "records"


def _train_command(data: Path, store: Path, out: Path, steps: int, extra: str = "", name: str = "tf-shapes"):
    return [sys.executable, "-m", "preannotate.cli", "train", "--data", str(data), "--model", SSD, "--store",
            str(store), "--name", name, "--out", str(out),
            "-H", f"{SMALL};num-steps={steps};batch-size=4;num-validations=1{extra}"]


@pytest.mark.slow
def test_tfrecord_to_trained_version_resumed_after_sigkill_then_fine_tuned_on_more_labels(tmp_path):
    data = _export_tfrecord(tmp_path)
    store, out = tmp_path / "store", tmp_path / "run"
    # a run killed with SIGKILL after its first checkpoint (step 50 of 60) resumes there and ends at step 60
    log = tmp_path / "first.log"
    with open(log, "wb") as output:
        process = subprocess.Popen(_train_command(data, store, out, 60), stdout=output, stderr=subprocess.STDOUT)
    try:
        wait_while_advancing(lambda: (out / "last.keras.npz").exists() or process.poll() is not None,
                             files_activity(out, log), "the run to its first checkpoint")
        assert process.poll() is None, log.read_text()[-3000:]
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    resumed = run_while_advancing([*_train_command(data, store, out, 60), "-v"], watch=(out,))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resuming {out} at step 50 of 60" in resumed.stdout + resumed.stderr
    result = json.loads((out / "result.json").read_text())
    assert result["steps"] == 60 and result["version"] == 1 and result["metrics"]["map"] is not None
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["event"] == "train"]
    assert steps == sorted(steps) and steps[-1] == 60  # the resumed log continues, no step logged twice
    version = store / "tf-shapes" / "v1"
    manifest = json.loads((version / "manifest.json").read_text())
    assert manifest["framework"] == "tensorflow" and (version / "model.keras").is_file()
    # fine-tuning it on a label set with one more label starts from it: a second version
    task, items = _items(16, seed=9)
    more = [*task.annotations.labels, *parse_label_list("extra")]
    export_dataset(tmp_path / "more", "tfrecord", more, [(frame.frame, frame) for frame, _ in items], task.images,
                   val_fraction=0.25, progress=False)
    tuned = run_while_advancing([*_train_command(tmp_path / "more", store, tmp_path / "run2", 10, ";init=previous"),
                                 "--from-model", "tf-shapes@1"], watch=(tmp_path / "run2",))
    assert tuned.returncode == 0, tuned.stdout[-3000:] + tuned.stderr[-3000:]
    second = json.loads((store / "tf-shapes" / "v2" / "manifest.json").read_text())
    assert second["provenance"]["init"] == "previous" and [label["name"] for label in second["labels"]][-1] == "extra"


@pytest.mark.parametrize("name", ["keras_ssd_mobilenet_v2_fpnlite_320", "keras_retinanet_resnet50_fpn",
                                  "keras_retinanet_efficientnet_b0"])
def test_trainable_backbone_layers_freezes_the_encoders_first_stages(name):
    detector = create_detector(name, parse_label_list("car"), hyperparameters="init=random;image-size=64")
    layers = detector.model.backbone.image_encoder.features.layers
    frozen = [len(family.freeze_backbone(detector.model, k, "pretrained")) for k in (5, 4, 3, 2, 1)]
    assert frozen[0] == 0 and frozen == sorted(frozen) and len(set(frozen)) == 5  # each stage more frozen
    assert all(not layer.trainable for layer in layers[:frozen[-1]]) and layers[-1].trainable
    assert family.freeze_backbone(detector.model, 0, "pretrained") == list(layers)
    assert not detector.model.backbone.image_encoder.trainable and detector.model.classification_head.trainable


def test_num_clones_asks_tensorflow_for_that_many_gpus():
    one = hyperparameters_for(SSD, "num-clones=1")
    assert keras_adapter.strategy_for(one.recipe).num_replicas_in_sync == 1
    with pytest.raises(HyperparameterError, match=r"num-clones=2 trains on 2 GPUs with MirroredStrategy, and "
                                                  r"TensorFlow sees 0"):
        keras_adapter.strategy_for(hyperparameters_for(SSD, "num-clones=2").recipe)


def test_pretrained_weights_that_cannot_be_fetched_say_what_to_do():
    from preannotate.models import PretrainedWeightsUnavailable

    with pytest.raises(PretrainedWeightsUnavailable, match=r"keras_ssd_mobilenet_v2_fpnlite_320 \(imagenet\) could "
                                                         r"not be loaded: .*-H init=random"):
        create_detector(SSD, parse_label_list("car"), init="pretrained")
    with pytest.raises(PretrainedWeightsUnavailable, match="only an ImageNet encoder"):
        family.pretrained_labels(get_architecture(SSD))
    coco = family.pretrained_labels(get_architecture("keras_retinanet_resnet50_fpn"))
    assert len(coco) == 80 and (coco[0].name, coco[0].id) == ("person", 2)  # the preset's class index 1


def test_the_tf_default_is_the_od_apis_fpn_lite_neck_and_weight_shared_separable_head():
    model = create_detector(SSD, parse_label_list("car,person"), hyperparameters=SMALL).model
    features = model.backbone(np.zeros((1, 96, 96, 3), np.float32))
    assert sorted(features) == ["P3", "P4", "P5", "P6", "P7"] and {f.shape[-1] for f in features.values()} == {128}
    assert model.anchor_generator.num_base_anchors == 6  # 2 scales x 3 aspect ratios per location
    tower = [layer for layer in model.layers if layer.name.startswith("head_tower_")]
    assert len(tower) == 4 and all(isinstance(layer, family.keras.layers.SeparableConv2D) for layer in tower)
    assert all(len(layer._inbound_nodes) == 5 for layer in tower)  # one kernel for the five levels
    norms = [layer for layer in model.layers if layer.name.startswith("head_P")]
    assert sum(isinstance(layer, family.keras.layers.BatchNormalization) for layer in norms) == 4 * 5  # per level


def test_an_untrained_tf_default_starts_at_the_class_prior_with_boxes_on_its_anchors():
    # keras-hub's RetinaNet put the prior on its box head: every class started at 0.5 (a first loss of ~270) and
    # every box at exp(-4.6) of its anchor
    model = create_detector(SSD, parse_label_list("car,person"), hyperparameters=SMALL).model
    image = np.random.default_rng(0).uniform(0, 255, (1, 96, 96, 3)).astype(np.float32)
    out = model(image, training=False)
    scores = 1 / (1 + np.exp(-np.asarray(out["cls_logits"])))
    assert np.median(scores) == pytest.approx(0.01, rel=0.5)  # the OD API's class_prediction_bias_init -4.6
    assert np.median(np.abs(np.asarray(out["bbox_regression"]))) < 1.0


def test_anchors_sit_on_the_centres_of_their_cells():
    model = create_detector(SSD, parse_label_list("car"), hyperparameters=SMALL).model
    anchors = model.anchor_generator(np.zeros((1, 96, 96, 3), np.float32))
    first = np.asarray(anchors["P3"])[0]  # the first anchor of the top-left cell (stride 8)
    assert ((first[0] + first[2]) / 2, (first[1] + first[3]) / 2) == (4.0, 4.0)


def test_box_targets_decode_back_to_their_boxes():
    model = create_detector(SSD, parse_label_list("car,person"), hyperparameters=SMALL).model
    images = np.zeros((1, 96, 96, 3), np.float32)
    box = np.array([[[20.0, 30.0, 50.0, 70.0], [0.0, 0.0, 0.0, 0.0]]], np.float32)  # and a padding box
    targets, classes = model.label_encoder(images, box, np.array([[1.0, -1.0]], np.float32))
    assert np.isfinite(np.asarray(targets)).all()
    positive = np.asarray(classes)[0] == 1.0
    assert positive.any()  # the box has anchors (its best one at least)
    logits = np.where(positive[None, :, None], 10.0, -10.0) * np.eye(2)[1][None, None]
    decoded = model.decode_predictions({"bbox_regression": np.asarray(targets) * positive[None, :, None],
                                        "cls_logits": logits.astype(np.float32)}, images)
    assert decoded["num_detections"][0] >= 1
    np.testing.assert_allclose(np.asarray(decoded["boxes"])[0][0], box[0][0], atol=0.5)
