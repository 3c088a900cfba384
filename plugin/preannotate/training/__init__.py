"""Training (layer 5): from annotated frames to a validated model version in the store, and what starts it.

* ``recipe`` — the one recipe: load (``export_from_cvat`` or a folder) → split → train → publish → promote
  (``should_promote``), used by ``preannotate train``, a function's jobs and the demo;
* ``loop`` — the one run: ``train(...) -> TrainingResult`` (resume, steps, validation and its judgement, early
  stopping, time limit, checkpoints, signals, publishing), whatever the framework; its ``FrameworkAdapter``s own
  what differs: ``torch_adapter`` (torchvision's reference step, DDP) and ``keras_adapter`` (TFRecords through
  ``tf.data``, Keras's own step); ``runs`` — the run's vocabulary (result, budget, state, logs, publishing);
  ``loop`` and ``runs`` import no framework;
* ``data`` — frames → image and target tensors (``transforms.v2``), resumable batch order, loaders;
* ``evaluation`` — COCO mAP with pycocotools (of a torch model's loader, or of any detector's shapes); batch-norm
  recalibration before each validation;
* ``optim`` — optimizers and learning-rate schedules;
* ``logs`` — ``metrics.jsonl`` and TensorBoard events; ``report`` — the pictures of a run (matplotlib);
* ``synthetic`` — generated CVAT-like tasks (tests, benchmarks, the demo);
* ``triggers`` — what starts training (webhook policy, debounce, minimum new frames, cron's "changed?");
* ``jobs``, ``execute`` — training jobs recorded in the store and run in their own process.

The hyperparameter language is ``preannotate.hyperparameters`` (below the model registry, which holds the defaults).
Nothing is imported here, so importing ``preannotate.training.jobs`` (the serving side) does not pull in torch.
"""
