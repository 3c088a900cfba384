"""The Nuclio function directories: rendered from the registry, valid for CVAT and Nuclio, not drifting."""

from __future__ import annotations

import copy
import filecmp
import json
from pathlib import Path

import pytest
import yaml
from preannotate import functions
from preannotate.cli import main as cli
from preannotate.durations import parse_duration
from preannotate.models import ARCHITECTURES
from preannotate.shapes import parse_label_list

REPO = Path(__file__).resolve().parents[1]


def test_checked_in_functions_match_their_source(tmp_path):
    functions.render_all(tmp_path)
    rendered = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    checked_in = sorted(p.relative_to(REPO / "functions") for p in (REPO / "functions").rglob("*")
                        if p.is_file() and "__pycache__" not in p.parts)
    assert checked_in == rendered, "functions/ differs from the registry: run `make functions`"
    drifted = [str(p) for p in rendered if not filecmp.cmp(tmp_path / p, REPO / "functions" / p, shallow=False)]
    assert not drifted, f"edited by hand or stale, run `make functions`: {drifted}"


# the architectures whose pretrained weights come with labels: COCO's detectors, ImageNet's classifiers
COCO_MODELS = [name for name, arch in ARCHITECTURES.items() if arch.pretrained_kind in ("coco", "imagenet")]


def test_no_function_is_rendered_with_an_empty_spec():
    untrained = sorted(set(ARCHITECTURES) - set(COCO_MODELS))
    # an ImageNet backbone only: no labels before training (deployed for a project, `preannotate deploy`)
    assert untrained == ["custom", "fasterrcnn_resnet101_fpn", "keras_retinanet_efficientnet_b0",
                         "keras_ssd_mobilenet_v2_fpnlite_320", "keypointrcnn_mobilenet_v3_large_fpn"]
    assert not any((REPO / "functions" / ARCHITECTURES[name].framework / name).exists() for name in untrained)
    config = functions.function_config(ARCHITECTURES[untrained[0]], [], gpu=False)
    assert functions.validate_config(config, gpu=False) == [
        "metadata.annotations.spec lists no labels: CVAT would list a detector with nothing to map"]


@pytest.mark.parametrize("name", COCO_MODELS)
def test_every_registry_model_has_a_valid_cpu_and_gpu_function(name):
    directory = REPO / "functions" / ARCHITECTURES[name].framework / name / "nuclio"
    assert functions.validate_directory(directory) == []
    cpu = yaml.safe_load((directory / "function.yaml").read_text())
    gpu = yaml.safe_load((directory / "function-gpu.yaml").read_text())
    assert cpu["metadata"]["name"] == gpu["metadata"]["name"] == ARCHITECTURES[name].function_name
    assert cpu["metadata"]["annotations"]["type"] == "detector"
    assert cpu["metadata"]["annotations"]["spec"] == gpu["metadata"]["annotations"]["spec"]
    env = {e["name"]: e["value"] for e in cpu["spec"]["env"]}
    assert env["PREANNOTATE_MODEL"] == name
    assert gpu["spec"]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert cpu["spec"]["triggers"]["myHttpTrigger"]["attributes"]["maxRequestBodySize"] == 32 * 1024 * 1024
    timeout = parse_duration(cpu["spec"]["eventTimeout"])
    assert ARCHITECTURES[name].cpu_timeout_s == timeout <= 120
    labels = json.loads(cpu["metadata"]["annotations"]["spec"])
    expected_type = ARCHITECTURES[name].output
    assert all(label["type"] == expected_type for label in labels)
    main = (directory / "main.py").read_text()
    assert len([line for line in main.splitlines() if line.strip()]) <= 3


def test_coco_functions_list_the_coco_labels_and_bake_the_weights_at_build_time():
    config = yaml.safe_load((REPO / "functions/pytorch/ssdlite320_mobilenet_v3_large/nuclio/function.yaml")
                            .read_text())
    labels = json.loads(config["metadata"]["annotations"]["spec"])
    assert len(labels) == 80 and labels[0] == {"id": 1, "name": "person", "type": "rectangle", "attributes": []}
    directives = config["spec"]["build"]["directives"]["postCopy"]
    assert directives == [{"kind": "ENV", "value": f"TORCH_HOME={functions.TORCH_HOME}"},
                          {"kind": "RUN", "value": "preannotate models fetch-weights ssdlite320_mobilenet_v3_large"}]


def test_a_classifier_function_lists_imagenet_classes_as_tags_cvat_stores_as_tags():
    config = yaml.safe_load((REPO / "functions/pytorch/efficientnet_b4/nuclio/function.yaml").read_text())
    labels = json.loads(config["metadata"]["annotations"]["spec"])
    assert len(labels) == 1000 and labels[0] == {"id": 1, "name": "tench", "type": "tag", "attributes": []}
    assert config["metadata"]["annotations"]["type"] == "detector"  # CVAT's kinds: classification is a detector
    assert config["spec"]["build"]["directives"]["postCopy"][-1] == {
        "kind": "RUN", "value": "preannotate models fetch-weights efficientnet_b4"}


@pytest.mark.parametrize("filename", ["function.yaml", "function-gpu.yaml"])
def test_functions_train_into_a_store_outside_the_image_and_carry_no_secrets(filename):
    for name in COCO_MODELS:
        config = yaml.safe_load((REPO / "functions" / ARCHITECTURES[name].framework / name / "nuclio" / filename)
                                .read_text())
        spec = config["spec"]
        env = {e["name"]: e["value"] for e in spec["env"]}
        (volume,) = spec["volumes"]
        assert volume["volume"] == {"name": "preannotate-store", "hostPath": {"path": "/var/lib/preannotate/store"}}
        assert volume["volumeMount"] == {"name": "preannotate-store", "mountPath": env["PREANNOTATE_MODEL_STORE"]}
        assert env["PREANNOTATE_TRAIN_MODEL"] == name
        if ARCHITECTURES[name].framework == "tensorflow":  # its own base image: Keras's caches, no torch
            assert env["KERAS_HOME"] == functions.KERAS_HOME and "TORCH_HOME" not in env
            assert spec["build"]["baseImage"].startswith("cvat.preannotate.base-tf:")
            assert config["metadata"]["name"].startswith("tf-preannotate-")
            assert config["metadata"]["annotations"]["framework"] == "tensorflow"
        else:
            assert env["TORCH_HOME"] == functions.TORCH_HOME
            assert config["metadata"]["annotations"]["framework"] == "pytorch"
        assert env["PREANNOTATE_TRAIN_ON"] == "completed,acceptance"
        assert all(isinstance(value, str) for value in env.values())
        assert not set(env) & set(functions.SECRET_ENV)
        assert list(spec["triggers"]) == ["myHttpTrigger"]  # cron only when asked for


def test_training_settings_in_the_yaml_are_ones_the_function_accepts():
    from preannotate.hyperparameters import Hyperparameters
    from preannotate.training.triggers import TrainingPolicy

    config = yaml.safe_load((REPO / "functions/pytorch/retinanet_resnet50_fpn/nuclio/function.yaml").read_text())
    env = {e["name"]: e["value"] for e in config["spec"]["env"]}
    policy = TrainingPolicy.from_environment(env)
    assert policy.train_on == ("completed", "acceptance") and policy.debounce_s == 300
    Hyperparameters().updated(env["PREANNOTATE_TRAIN_HYPERPARAMETERS"])


@pytest.mark.parametrize("when, attributes", [
    ("6h", {"interval": "6h"}), ("30m", {"interval": "30m"}), ("0 3 * * *", {"schedule": "0 3 * * *"}),
    ("@daily", {"schedule": "@daily"})])
def test_cron_trigger_is_rendered_when_asked(when, attributes):
    arch = ARCHITECTURES["ssdlite320_mobilenet_v3_large"]
    config = functions.function_config(arch, parse_label_list("box"), gpu=False, cron=when, train_project=4)
    trigger = config["spec"]["triggers"]["retrain"]
    assert trigger == {"kind": "cron", "attributes": {**attributes, "event": {"body": '{"trigger": "cron"}'}}}
    assert {"name": "PREANNOTATE_TRAIN_PROJECT", "value": "4"} in config["spec"]["env"]
    assert functions.validate_config(config, gpu=False) == []


def _valid_config():
    arch = ARCHITECTURES["ssdlite320_mobilenet_v3_large"]
    from preannotate.shapes import parse_label_list

    return functions.function_config(arch, parse_label_list("car,person", "rectangle"), gpu=False)


@pytest.mark.parametrize("break_it, problem", [
    (lambda c: c["spec"].pop("description"), "spec.description is missing"),
    (lambda c: c["metadata"]["annotations"].update(type="classifier"), "is not one of detector"),
    (lambda c: c["metadata"]["annotations"].update(spec='[{"name": "car"},]'), "not valid JSON"),
    (lambda c: c["metadata"]["annotations"].update(spec='[{"name": "car"}, {"name": "car"}]'), "appears twice"),
    (lambda c: c["metadata"]["annotations"].update(
        spec='[{"name": "car", "attributes": [{"name": "color", "values": ["red"]}]}]'), "lacks input_type"),
    (lambda c: c["metadata"]["annotations"].update(spec='[{"name": "car", "type": "box"}]'), "type 'box'"),
    (lambda c: c["metadata"]["annotations"].update(version=2), "must be a string"),
    (lambda c: c["metadata"].pop("labels"), "nuclio.io/project-name"),
    (lambda c: c["metadata"].update(name="Bad_Name"), "metadata.name"),
    (lambda c: c["spec"].update(eventTimeout="5m"), "longer than CVAT waits"),
    (lambda c: c["spec"].update(eventTimeout="thirty"), "not a duration"),
    (lambda c: c["spec"]["triggers"]["myHttpTrigger"]["attributes"].pop("maxRequestBodySize"), "below 32 MiB"),
    (lambda c: c["spec"].update(resources={"limits": {"nvidia.com/gpu": 1}}), "must not request a GPU"),
    (lambda c: c["spec"].pop("volumes"), "is not on a volume"),
    (lambda c: c["spec"]["volumes"][0]["volumeMount"].update(mountPath="/data"), "is not on a volume"),
    (lambda c: c["spec"]["volumes"][0]["volumeMount"].update(name="other"), "must be set and equal"),
    (lambda c: c["spec"]["volumes"][0]["volume"]["hostPath"].update(path="store"), "absolute path on the host"),
    (lambda c: c["spec"]["volumes"][0].update(volume={"name": "preannotate-store", "persistentVolumeClaim": {}}),
     "claimName is missing"),
    (lambda c: c["spec"]["env"].append({"name": "CVAT_PASSWORD", "value": "hunter2"}), "holds a secret"),
    (lambda c: c["spec"]["env"].append({"name": "PREANNOTATE_TRAIN_MIN_NEW_FRAMES", "value": 10}), "must be a string"),
    (lambda c: [e.update(value="/opt/other") for e in c["spec"]["env"] if e["name"] == "PREANNOTATE_MODEL_STORE"],
     "is not on a volume"),
    (lambda c: c["spec"]["triggers"].update(retrain={"kind": "cron", "attributes": {}}), "exactly one of"),
    (lambda c: c["spec"]["triggers"].update(retrain={"kind": "cron", "attributes": {"interval": "6h",
                                                                                    "schedule": "0 * * * *"}}),
     "exactly one of"),
    (lambda c: c["spec"]["triggers"].update(retrain={"kind": "cron", "attributes": {"interval": "often"}}),
     "not a duration"),
    (lambda c: c["spec"]["triggers"].update(retrain={"kind": "cron", "attributes": {"schedule": "0 3 *"}}),
     "not a cron schedule"),
    (lambda c: c["spec"]["triggers"].update(retrain=functions.cron_trigger("6h")), "would do nothing"),
])
def test_validator_catches_what_breaks_cvat(break_it, problem):
    config = copy.deepcopy(_valid_config())
    assert functions.validate_config(config, gpu=False) == []
    break_it(config)
    assert any(problem in p for p in functions.validate_config(config, gpu=False)), problem


def test_gpu_file_must_request_a_gpu_and_one_worker():
    config = _valid_config()
    problems = functions.validate_config(config, gpu=True)
    assert any("nvidia.com/gpu" in p for p in problems) and any("numWorkers 1" in p for p in problems)


def test_functions_cli_renders_and_validates(tmp_path, capsys):
    assert cli(["functions", "render", "--out", str(tmp_path)]) == 0
    assert cli(["functions", "validate", str(tmp_path)]) == 0
    assert "14 function directories checked, 0 problems" in capsys.readouterr().out
    broken = tmp_path / "pytorch" / "retinanet_resnet50_fpn" / "nuclio" / "function-gpu.yaml"
    broken.write_text(broken.read_text().replace("description:", "summary:"))
    assert cli(["functions", "validate", str(tmp_path)]) == 1
    assert "spec.description is missing" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["tracker", "reid"])
def test_tracker_and_reid_functions_pass_cvats_rules_and_answer_as_what_cvat_calls_them(kind):
    config = functions.function_config(ARCHITECTURES["ssdlite320_mobilenet_v3_large"],
                                       parse_label_list("car,person", "rectangle"), gpu=False, model="cars",
                                       kind=kind, cron="6h", train_project=4)
    assert functions.validate_config(config, gpu=False) == []
    annotations = config["metadata"]["annotations"]
    assert annotations["type"] == kind and annotations["spec"] == "[]"  # as CVAT's own trackers: nothing to map
    assert config["metadata"]["name"] == f"pth-preannotate-ssdlite320-mobilenet-v3-large-{kind}"
    env = {item["name"]: item["value"] for item in config["spec"]["env"]}
    assert env["PREANNOTATE_FUNCTION_KIND"] == kind and env["PREANNOTATE_MODEL"] == "cars"
    # it serves what the detector function trains: no training of its own
    assert not any(name.startswith("PREANNOTATE_TRAIN") for name in env) and set(config["spec"]["triggers"]) == {
        "myHttpTrigger"}
    assert (annotations.get("supported_shape_types") == "rectangle") == (kind == "tracker")


@pytest.mark.parametrize("break_it, problem", [
    (lambda c: [e.update(value="detector") for e in c["spec"]["env"] if e["name"] == "PREANNOTATE_FUNCTION_KIND"],
     "CVAT calls it as a tracker but it answers as a detector"),
    (lambda c: c["metadata"]["annotations"].pop("supported_shape_types"), "must declare"),
    (lambda c: c["metadata"]["annotations"].update(supported_shape_types=" , "), "lists no shape type"),
    (lambda c: c["metadata"]["annotations"].update(supported_shape_types="rectangle, box"), "'box' is not one of"),
    (lambda c: c["metadata"]["annotations"].update(type="interactor"), "these functions serve detector"),
])
def test_validator_catches_a_tracker_cvat_would_skip_or_misroute(break_it, problem):
    config = functions.function_config(ARCHITECTURES["ssdlite320_mobilenet_v3_large"],
                                       parse_label_list("car", "rectangle"), gpu=False, kind="tracker")
    assert functions.validate_config(config, gpu=False) == []
    break_it(config)
    assert any(problem in p for p in functions.validate_config(config, gpu=False)), problem


def test_a_detector_still_needs_labels_in_its_spec():
    config = _valid_config()
    config["metadata"]["annotations"]["spec"] = "[]"
    assert any("lists no labels" in p for p in functions.validate_config(config, gpu=False))
    config["spec"]["env"].append({"name": "PREANNOTATE_FUNCTION_KIND", "value": "tracker"})
    assert any("CVAT calls it as a detector but it answers as a tracker" in p
               for p in functions.validate_config(config, gpu=False))
