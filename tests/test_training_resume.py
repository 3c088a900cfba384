"""A short training run of each framework, through the recipe every entry point uses (``train_and_publish``):
stopped after a few steps, it leaves a checkpoint and publishes nothing; run again, it resumes where it stopped,
ends at the same step count and publishes. The long versions (SIGKILL, the very same weights, learning to a
quality) are test_training_loop.py and test_keras.py, in make test-all."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from preannotate.models import ModelStore, hyperparameters_for
from preannotate.training.recipe import TrainingData, train_and_publish
from preannotate.training.runs import TrainingInterrupted
from preannotate.training.synthetic import generate

STEPS = 5


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


class StopAtStep(threading.Event):
    """The ``stop`` event of a run, set by itself once the run has logged ``step``: the run looks at it after every
    step, so it stops there however fast the machine."""

    def __init__(self, run: Path, step: int):
        super().__init__()
        self.run, self.step = run, step

    def is_set(self) -> bool:
        if not super().is_set() and (self.run / "metrics.jsonl").is_file() and any(
                r.get("event") == "train" and r["step"] >= self.step for r in records(self.run)):
            self.set()
        return super().is_set()


@pytest.mark.parametrize("architecture", ["ssdlite320_mobilenet_v3_large", "keras_ssd_mobilenet_v2_fpnlite_320"])
def test_a_stopped_run_resumes_where_it_stopped_and_publishes(architecture, tmp_path):
    task = generate(8, width=96, height=72, seed=1, labels=("box", "disc"), objects=(1, 1), size=(0.4, 0.6))
    items = [(frame, task.images) for frame in task.annotations.frames.values()]
    data = TrainingData(task.annotations.labels, items[2:], items[:2])
    hp = hyperparameters_for(architecture, f"init=random; num-steps={STEPS}; batch-size=2; image-size=96; "
                                           "num-validations=1")
    store, run = ModelStore(tmp_path / "store"), tmp_path / "run"

    def train(stop=None):
        return train_and_publish(data, architecture=architecture, hyperparameters=hp, store=store, name="shapes",
                                 output_dir=run, progress=False, stop=stop)

    with pytest.raises(TrainingInterrupted) as stopped:
        train(StopAtStep(run, 2))
    assert 2 <= stopped.value.step < STEPS and stopped.value.checkpoint.is_file()
    assert store.versions("shapes") == []  # nothing published
    assert [r["step"] for r in records(run) if r["event"] == "interrupted"] == [stopped.value.step]

    result = train()  # the same call again
    assert (result.version, result.steps, result.stopped) == (1, STEPS, "completed")
    assert store.versions("shapes") == [1] and store.serving("shapes") == 1
    logged = records(run)
    # resumed, not started over: every step trained once, the stop still on record
    assert [r["step"] for r in logged if r["event"] == "train"] == list(range(1, STEPS + 1))
    assert [r["step"] for r in logged if r["event"] == "interrupted"] == [stopped.value.step]
    assert [r["step"] for r in logged if r["event"] == "validation"] == [STEPS]

    assert train().version == 1  # a finished run called again publishes nothing new
    assert store.versions("shapes") == [1]
