"""The bridge from the command line, as a user runs it: `preannotate export` and `preannotate webhook register`
against the CVAT test double (credentials from the environment)."""

from __future__ import annotations

import json
import re

import pytest
import tensorflow as tf
from preannotate.cli import main as cli
from preannotate.formats.dataset import read_dataset

from tests.conftest import FIXTURES
from tests.test_coco import assert_like_cvat


@pytest.fixture
def cvat_env(cvat_double, monkeypatch, tmp_path):
    monkeypatch.setenv("CVAT_URL", cvat_double.base_url)
    monkeypatch.setenv("CVAT_USERNAME", cvat_double.credentials[0])
    monkeypatch.setenv("CVAT_PASSWORD", cvat_double.credentials[1])
    monkeypatch.setenv("PREANNOTATE_CACHE", str(tmp_path / "cache"))
    return cvat_double


def test_export_a_task_to_coco_matches_cvats_own_export(cvat_env, tmp_path, capsys):
    out = tmp_path / "coco"
    assert cli(["export", "--task", "7", "--format", "coco", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "train: 6 frames" in printed and "left out" in printed and f"wrote coco to {out}" in printed
    ours = json.loads((out / "annotations" / "instances_train.json").read_text())
    cvat = json.loads((FIXTURES / "export" / "instances_default.json").read_text())
    assert_like_cvat(ours, cvat)
    assert sorted(p.name for p in (out / "images").rglob("*") if p.is_file()) == sorted(
        image["file_name"].rsplit("/", 1)[-1] for image in cvat["images"])


def test_export_a_task_to_tfrecord_with_a_val_split_reads_back_in_tensorflow(cvat_env, tmp_path):
    out = tmp_path / "records"
    assert cli(["export", "--task", "7", "--format", "tfrecord", "--out", str(out), "--val-fraction", "0.3",
                "--seed", "1"]) == 0
    labels, splits = read_dataset(out)
    assert set(splits) == {"train", "val"} and sum(len(v) for v in splits.values()) == 6
    records = sorted(out.glob("*.record-*"))
    count = sum(1 for _ in tf.data.TFRecordDataset([str(p) for p in records]))
    assert count == 6 and (out / "label_map.pbtxt").is_file()
    assert [label.name for label in labels][:1] == ["car"]


def test_export_a_job_holds_only_its_frames(cvat_env, tmp_path):
    job = max(j.id for j in cvat_env.jobs.values() if j.task_id == 7)  # the second job: frames 3-5
    first, last = cvat_env.jobs[job].start, cvat_env.jobs[job].stop
    assert first > 0
    out = tmp_path / "job"
    assert cli(["export", "--job", str(job), "--format", "coco", "--out", str(out)]) == 0
    frames = [image["frame"] for image in json.loads((out / "annotations" / "instances_train.json").read_text())[
        "images"]]
    assert frames == list(range(first, last + 1))


def test_export_of_an_unknown_task_is_a_clear_error(cvat_env, tmp_path, capsys):
    assert cli(["export", "--task", "999999", "--out", str(tmp_path / "x")]) == 2
    assert "task 999999 was not found" in capsys.readouterr().err


def test_wrong_credentials_are_reported_without_the_password(cvat_env, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("CVAT_PASSWORD", "not-the-Password-42")
    assert cli(["export", "--task", "7", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "username or password" in err and "not-the-Password-42" not in err


def test_webhook_register_from_the_command_line(cvat_env, capsys):
    project = next(iter(cvat_env.projects))
    assert cli(["webhook", "register", "--project", str(project), "--url", "http://fn:8080/webhook",
                "--secret", "s3"]) == 0
    assert "sends create:task, update:job, update:task to http://fn:8080/webhook" in capsys.readouterr().out
    assert [w["secret"] for w in cvat_env.webhooks.values()] == ["s3"]
    assert cli(["webhook", "register", "--project", str(project), "--url", "http://fn:8080/webhook"]) == 2


def test_import_of_our_own_export_as_predictions_is_idempotent(cvat_env, tmp_path, capsys):
    out = tmp_path / "coco"
    assert cli(["export", "--task", "8", "--format", "coco", "--out", str(out)]) == 0
    instances = out / "annotations" / "instances_train.json"
    manual = [s for s in cvat_env.annotations(8)["shapes"] if s["source"] != "auto"]
    capsys.readouterr()
    for _ in range(2):  # twice: the second run replaces what the first wrote
        assert cli(["import", "--task", "8", str(instances), "--format", "coco"]) == 0
    printed = capsys.readouterr().out.splitlines()
    created = int(re.search(r"(\d+) shapes? created", printed[0]).group(1))  # "1 shape", "2 shapes"
    assert created > 0 and f"{created} earlier auto shapes replaced" in printed[1]
    shapes = cvat_env.annotations(8)["shapes"]
    assert sum(s["source"] == "auto" for s in shapes) == created
    assert [s for s in shapes if s["source"] != "auto"] == manual  # a person's work is never touched


def test_annotate_a_task_with_a_model_from_the_store(cvat_env, published_store, tmp_path, capsys):
    # the model knows car and person; task 8 has cat and dog
    assert cli(["annotate", "--task", "8", "--model", "boxes", "--store", str(published_store.root),
                "--threshold", "0", "--frames", "0-1"]) == 0
    unmapped = capsys.readouterr().out.split("not in the task (left out; --label-map renames): ")[1]
    assert set(re.findall(r"(\w+) \(\d+\)", unmapped)) <= {"car", "person"} and unmapped.strip()
    assert not [s for s in cvat_env.annotations(8)["shapes"] if s["source"] == "auto"]
    assert cli(["annotate", "--task", "8", "--model", "boxes", "--store", str(published_store.root),
                "--threshold", "0", "--frames", "0-1", "--label-map", "car=cat,person=dog"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"task 8: 2 frames annotated by boxes@\d+ \(\w+\) with score ≥ 0 \(", printed), printed
    auto = [s for s in cvat_env.annotations(8)["shapes"] if s["source"] == "auto"]
    assert auto and {s["frame"] for s in auto} <= {0, 1} and {s["type"] for s in auto} == {"rectangle"}
    assert cli(["annotate", "--task", "8", "--model", "boxes", "--store", str(published_store.root),
                "--frames", "x-1"]) == 2
    assert "--frames 'x-1'" in capsys.readouterr().err


TINY = "init=random; num-steps=2; batch-size=2; image-size=64; max-image-size=96; num-validations=1"


def test_train_from_a_cvat_task_and_from_its_export_publishes_versions(cvat_env, tmp_path, capsys):
    store = tmp_path / "store"
    assert cli(["train", "--task", "7", "--model", "fasterrcnn_mobilenet_v3_large_320_fpn", "-H",
                TINY + "; val-fraction=0.3", "--store", str(store), "--name", "cars", "--out",
                str(tmp_path / "run1")]) == 0
    assert "published cars@1 after 2 steps" in capsys.readouterr().out
    manifest = json.loads((store / "cars" / "v1" / "manifest.json").read_text())
    assert list(manifest["provenance"]["cvat"]["tasks"]) == ["7"] and manifest["labels"][0]["name"] == "car"

    assert cli(["export", "--task", "7", "--format", "tfrecord", "--out", str(tmp_path / "records"),
                "--val-fraction", "0.3"]) == 0
    assert cli(["train", "--data", str(tmp_path / "records"), "--model", "fasterrcnn_mobilenet_v3_large_320_fpn",
                "-H", TINY.replace("init=random; ", ""), "--store", str(store), "--name", "cars",
                "--from-model", "cars@1", "--out", str(tmp_path / "run2")]) == 0
    printed = capsys.readouterr().out
    assert "left out (a detector cannot learn them): 1 points, 1 polyline" in printed
    assert "validating on 3" in printed and "cars@2" in printed
    assert json.loads((store / "cars" / "v2" / "manifest.json").read_text())["provenance"]["init"] == "previous"


def test_train_says_what_is_wrong_before_doing_anything(cvat_env, tmp_path, capsys):
    assert cli(["train", "--model", "yolo", "--task", "7"]) == 2
    assert "yolo" in capsys.readouterr().err
    assert cli(["train", "--model", "ssdlite320_mobilenet_v3_large"]) == 2
    assert "--task/--project" in capsys.readouterr().err
    assert cli(["train", "--task", "7", "--model", "ssdlite320_mobilenet_v3_large", "-H", "batch-siz=4"]) == 2
    assert "batch-size" in capsys.readouterr().err


# ------------------------------------------------------------------------- what a newcomer hit (issue 11)

def test_a_broken_import_file_is_one_sentence_naming_it(cvat_env, tmp_path, capsys):
    broken = tmp_path / "predictions.json"
    broken.write_text("this is not json")
    assert cli(["import", "--task", "8", str(broken)]) == 2
    err = capsys.readouterr().err
    assert f"{broken} is not a JSON file (expecting value at line 1, column 1)" in err
    assert "Expecting value: line" not in err and "Traceback" not in err
    short = tmp_path / "short.json"
    short.write_text(json.dumps([{"image_id": 1, "category_id": 1, "bbox": [1, 2], "score": 0.9}]))
    assert cli(["import", "--task", "8", str(short)]) == 2
    err = capsys.readouterr().err
    assert "short.json: result #1: bbox must be [x, y, width, height] (4 numbers), not [1, 2]" in err
    assert "unpack" not in err
    assert cli(["import", "--task", "8", str(short), "--format", "coco"]) == 2
    assert "short.json is not a COCO dataset" in capsys.readouterr().err
    assert not [s for s in cvat_env.annotations(8)["shapes"] if s["source"] == "auto"]  # nothing half-written


def test_annotate_refuses_frames_it_cannot_annotate(cvat_env, published_store, capsys):
    common = ["annotate", "--task", "8", "--model", "boxes", "--store", str(published_store.root)]
    assert cli([*common, "--frames", "5-2"]) == 2
    assert "--frames '5-2': the last frame comes before the first" in capsys.readouterr().err
    assert cli([*common, "--frames", "10-20"]) == 2  # task 8 has 3 frames
    assert "task 8 has frames 0-2: frames 10-20 are none of them" in capsys.readouterr().err


def test_export_says_once_what_it_left_out(cvat_env, tmp_path, capsys, caplog):
    assert cli(["export", "--task", "7", "--out", str(tmp_path / "coco")]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("left out") == 1 and "cannot learn" not in captured.err
    assert not [r for r in caplog.records if r.levelno >= 30 and "cannot learn" in r.getMessage()]


def test_a_closed_port_is_one_error_without_retry_warnings(monkeypatch, tmp_path, capsys, caplog):
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("CVAT_USERNAME", "someone")
    monkeypatch.setenv("CVAT_PASSWORD", "secret")
    assert cli(["export", "--task", "1", "--out", str(tmp_path / "x"), "--cvat-url", f"http://127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"cannot connect to CVAT at http://127.0.0.1:{port}" in err[0]
    assert not [r for r in caplog.records if r.name.startswith("urllib3") and r.levelno >= 30]
