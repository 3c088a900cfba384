"""The cvat-sdk bridge (layer 3): CVAT in the package's vocabulary and back, knowing nothing of models.

``client`` (connect, errors a user can act on), ``annotations`` (CVAT's annotation JSON → frames, tracks
interpolated), ``reader`` (a task, job or project through cvat-sdk), ``frames`` (images by chunk), ``export`` (to a
COCO or TFRecord folder), ``encoding`` (our shapes as CVAT's JSON: the one encoder), ``upload`` (writing predictions,
idempotent and resumable), ``webhooks`` (signatures, registration).
"""
