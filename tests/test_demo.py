"""``preannotate demo`` (``make demo``) in small: a generated task, a few training steps on the CPU, the version
published and served through the Nuclio handler, held-out frames scored, and a second run reusing the model."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image
from preannotate.models import ModelStore


def test_demo_trains_publishes_serves_through_nuclio_and_scores_held_out_frames(tmp_path):
    from preannotate.demo import run_demo

    said = []
    summary = run_demo(tmp_path, steps=3, frames=20, held_out=4, progress=False, say=said.append,
                       hyperparameters="batch-size=4; num-validations=1")
    assert summary["version"] == 1 and summary["steps"] == 3
    assert [line.split()[0] for line in said] == ["generated", "training", "trained", "training", "served",
                                                   "predictions"]  # ... and "training report: ..."
    assert "AP@.5 per class: box" in said[4]
    assert ModelStore(tmp_path / "store").versions("demo") == [1]
    predictions = json.loads((tmp_path / "predictions.json").read_text())
    truth = json.loads((tmp_path / "ground_truth.json").read_text())  # anyone can score predictions.json
    # served as CVAT's menu asks when its threshold is left empty: each label at the threshold publishing chose
    manifest = json.loads((ModelStore(tmp_path / "store").path("demo", 1) / "manifest.json").read_text())
    assert manifest["thresholds"] and summary["thresholds"] == {**dict.fromkeys(
        ("box", "disc", "triangle", "blob"), manifest["score_threshold"]), **manifest["thresholds"]}
    assert manifest["metrics"]["review"]["served"]["per_100"] <= manifest["metrics"]["review"][
        "at_score_threshold"]["per_100"]  # chosen on these validation frames: never more edits than 0.5 there
    name = {category["id"]: category["name"] for category in truth["categories"]}
    assert all(p["image_id"] in (1, 2, 3, 4) and p["score"] >= summary["thresholds"][name[p["category_id"]]]
               and len(p["bbox"]) == 4 for p in predictions)
    assert "at the served thresholds" in said[4] and "edits per 100 true objects" in said[4]
    assert set(summary["edits"]) == {"objects", "adds", "deletes", "moves", "edits", "per_100"}
    assert [image["id"] for image in truth["images"]] == [1, 2, 3, 4]
    assert sorted(p.name for p in (tmp_path / "held-out").iterdir()) == sorted(i["file_name"] for i in truth["images"])
    assert summary["map50"] is not None and 0.0 <= summary["map50"] <= 1.0
    with Image.open(tmp_path / "demo.png") as picture:  # the held-out frames in a grid, upscaled to be legible
        assert picture.format == "PNG" and picture.size[0] >= 1000
    assert [Path(p).name for p in summary["report"]] == ["report.png", "predictions.png"]
    version = ModelStore(tmp_path / "store").path("demo", 1)
    assert json.loads((version / "manifest.json").read_text())["report"] == ["report.png", "predictions.png"]
    assert (version / "report.png").is_file()

    again = []  # a second demo on the same folder says it reuses the run
    run_demo(tmp_path, steps=3, frames=20, held_out=4, progress=False, say=again.append,
             hyperparameters="batch-size=4; num-validations=1")
    assert again[1].startswith(f"{tmp_path} holds a finished demo run: reusing its model")  # said first, then
    assert not any("from random weights" in line for line in again)  # no training announced that does not happen
    assert ModelStore(tmp_path / "store").versions("demo") == [1]
