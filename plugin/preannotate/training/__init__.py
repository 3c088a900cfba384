"""Training: from annotated frames to a validated model version in the store.

* ``hyperparameters`` — the ``key=value`` language and its defaults;
* ``synthetic`` — generated CVAT-like tasks (tests, benchmarks, the demo);
* ``data`` — frames → image and target tensors (``transforms.v2``), resumable batch order, loaders;
* ``evaluation`` — COCO mAP with pycocotools; batch-norm recalibration before each validation;
* ``optim`` — optimizers and learning-rate schedules;
* ``logs`` — ``metrics.jsonl`` and TensorBoard events;
* ``trainer`` — the loop: ``train(...) -> TrainingResult`` (checkpoints, resume, signals, DDP, publishing);
* ``jobs``, ``execute`` — training jobs started by a function's routes, in their own process.

Nothing is imported here, so importing ``preannotate.training.jobs`` (the serving side) does not pull in torch.
"""
