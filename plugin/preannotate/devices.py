"""Which device runs a model: the name a person gives (``--device``, ``PREANNOTATE_DEVICE``) checked against what this
machine has, so that a wrong one is one sentence naming the devices there are, not torch's error from inside a model.

Names are torch's (``cpu``, ``cuda``, ``cuda:1``, ``mps``); ``gpu`` is ``cuda``. torch is imported only when a device
is named; without torch (a TensorFlow function's image) TensorFlow says which GPUs there are.
"""

from __future__ import annotations

from collections.abc import Mapping

ALIASES = {"gpu": "cuda"}
ENVIRONMENT = "PREANNOTATE_DEVICE"


class DeviceError(ValueError):
    """A device this machine does not have; the message names those it has."""


def available() -> list[str]:
    """This machine's devices: ``cpu``, then each CUDA GPU (``cuda:0`` ...) and Apple's ``mps``."""
    try:
        import torch
    except ImportError:
        return ["cpu", *_tensorflow_gpus()]
    found = ["cpu", *(f"cuda:{index}" for index in range(torch.cuda.device_count()))]
    if torch.backends.mps.is_available():
        found.append("mps")
    return found


def checked(device: str | None, given_as: str = "--device") -> str | None:
    """``device`` as torch names it (``gpu`` → ``cuda``, ``GPU:1`` → ``cuda:1``), or None when none is given (the
    default then: a GPU when there is one). ``DeviceError`` when this machine has no such device."""
    if device is None or not str(device).strip():
        return None
    kind, colon, index = str(device).strip().lower().partition(":")
    kind = ALIASES.get(kind, kind)
    name = kind + colon + index
    if kind == "cpu" and index in ("", "0"):
        return "cpu"
    have = available()
    if (kind == "cuda" and (not colon or index.isdigit()) and f"cuda:{index or 0}" in have) or name in have:
        return name
    if kind == "cuda" and not any(d.startswith("cuda") for d in have):
        what = "has no CUDA GPU"
    elif kind in ("cuda", "mps"):
        what = f"has no {name}"
    else:
        what = "knows no such device (give cpu, cuda, cuda:N or gpu)"
    raise DeviceError(f"{given_as} {device}: this machine {what}; it has {', '.join(have)}")


def from_environment(environ: Mapping[str, str]) -> str | None:
    """The device ``PREANNOTATE_DEVICE`` names, checked (None when it is not set)."""
    return checked(environ.get(ENVIRONMENT), ENVIRONMENT)


def _tensorflow_gpus() -> list[str]:
    try:
        import tensorflow as tf
    except ImportError:
        return []
    return [f"cuda:{index}" for index, _ in enumerate(tf.config.list_physical_devices("GPU"))]
