"""What a training job does, in its own process: the recipe (``training.recipe``) on the CVAT tasks its request
names. A cron job (``only_if_changed``) first asks CVAT whether the annotations changed since the served version
learned them, and ends without training when they did not.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from preannotate.models import Manifest, ModelStore, hyperparameters_for
from preannotate.training.recipe import NothingFinished, train_model
from preannotate.training.runs import TrainingInterrupted
from preannotate.training.triggers import annotations_changed

log = logging.getLogger(__name__)


def execute_job(job, work_dir: Path, store_root: Path, stop: threading.Event) -> dict[str, Any] | None:
    """Train as ``job.request`` says. Returns the outcome (``version``, ``promoted``, ``metrics``, ``promotion``; or
    ``skipped`` and why); ``None`` when stopped by a signal (its checkpoint stays for a resume)."""
    from preannotate.cvat.client import connect

    request = job.request
    store = ModelStore(store_root)
    name = request["name"]
    hp = hyperparameters_for(request["model"], request.get("hyperparameters") or "")
    if request.get("only_if_changed"):
        served = store.serving(name)
        learned = None
        if served is not None:
            learned = (Manifest.read(store.path(name, served)).provenance.get("cvat") or {}).get("jobs")
        with connect() as client:
            changed, why = annotations_changed(client, request, learned, f"{name}@{served}" if served else name,
                                               hp.sources.train_on)
        log.info("cron: %s", why)
        if not changed:
            return {"skipped": why}
    try:
        result = train_model(request["model"], hp, store=store, name=name, output_dir=work_dir / "run",
                             request=request, connect=connect, dataset_dir=work_dir / "dataset",
                             from_model=request.get("from_model"), promote=request.get("promote", "auto"),
                             provenance={"job": job.id, "trigger": job.trigger}, stop=stop)
    except NothingFinished as nothing:
        log.info("%s", nothing)
        return {"skipped": str(nothing)}
    except TrainingInterrupted as stopped:
        log.info("%s", stopped)
        return None
    log.info("published %s@%s: %s", name, result.version, result.promotion)
    return {"version": result.version, "promoted": result.served, "metrics": result.metrics,
            "promotion": result.promotion}
