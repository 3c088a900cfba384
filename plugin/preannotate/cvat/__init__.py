"""The cvat-sdk bridge (layer 3): CVAT in the package's vocabulary and back, knowing nothing of models.

``client`` (connect, errors a user can act on), ``annotations`` (CVAT's annotation JSON → frames, tracks
interpolated), ``meta`` (what a data meta says of the frames), ``reader`` (a task, job or project through cvat-sdk),
``frames`` (images by chunk), ``export`` (to a COCO, TFRecord or ImageNet-style folder: the one path, for
``preannotate export`` and for training), ``encoding`` (our shapes as CVAT's JSON: the one encoder), ``upload``
(writing predictions, idempotent and resumable), ``review`` (the confidence tags), ``webhooks`` (signatures,
registration, what a delivery says), ``lambda_requests`` (what CVAT's *Automatic annotation* menu has running).
"""
