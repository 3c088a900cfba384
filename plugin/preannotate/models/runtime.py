"""Which runtime runs a model's network: its framework's own (eager PyTorch, or TensorFlow for a Keras model), or
its exported graph through OpenVINO or ONNX Runtime.

On a CPU a detector's backbone and head — what runs on the batch once it is resized and normalised: the exported
graph — run several times faster through OpenVINO than in eager PyTorch or TensorFlow. What surrounds them (the
resize, the anchors, the box decoding, NMS) stays the family's own code, run the same way whatever runs the graph.

``PREANNOTATE_RUNTIME`` names the runtime: ``auto`` (the default) takes the one ``FASTEST_ON_CPU`` measured fastest
for the architecture, on a CPU; a GPU keeps the framework (CUDA); ``torch`` is the model's own framework (TensorFlow
for a Keras model). The graph is exported once, the first time a version is loaded to run converted, into the
family's ``GRAPH_FILE`` beside its weights (atomically: written in a temporary directory, the file that names the
graph moved into place last), and the runtime reads that file. A family whose models can run converted is a
``models.family.ConvertibleFamily`` (``models.torchvision_family``: ONNX, read by both runtimes;
``models.keras_family``: OpenVINO's own IR); the others run in their framework.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from preannotate.models.family import ConvertibleFamily, Detector, Graph, ModelFamily
from preannotate.suggest import did_you_mean

log = logging.getLogger(__name__)

ENVIRONMENT = "PREANNOTATE_RUNTIME"
RUNTIMES = ("auto", "torch", "openvino", "onnxruntime")
CONVERTED = ("openvino", "onnxruntime")
EAGER = {"pytorch": "torch", "tensorflow": "tensorflow"}  # the runtime of a model not converted, by its framework

# Which runtime runs each architecture's exported graph fastest on a CPU, and the measurement that says so:
# `python bench/inference_overhead.py --runtimes --repetitions 15` on this project's 2-core CPU, median ms per
# 640x480 JPEG, the graph alone (what runs on the transformed batch) and the served Nuclio handler end to end, the
# runtimes interleaved in one run; bench/RESULTS.md holds the run. An architecture not listed keeps its framework
# under ``auto`` (not measured; PREANNOTATE_RUNTIME=openvino converts any torchvision or Keras detector).
FASTEST_ON_CPU: dict[str, str] = {
    # idle (2026-12-07): graph torch 37.3, openvino 10.2, onnxruntime 8.3; handler 77.1, 23.8 (3.2x), 21.4 (3.6x).
    # ONNX Runtime is ahead by 8 % idle (60 repetitions: 21.1 against 22.9 ms) but was 30 % behind with the CPU
    # shared (load 4-7, 2026-12-06: handler 107 against 140 ms), as a function's CPU usually is; and the base image
    # carries OpenVINO, not ONNX Runtime
    "ssdlite320_mobilenet_v3_large": "openvino",
    # the graph is the FPN backbone (the RPN and box head stay eager): graph 43.4, 14.3, 14.0; handler 125.1,
    # 72.5 (1.7x), 81.4 (1.5x). onnxruntime#14326 is about the whole model, NMS and RoIAlign included, which stay
    # in PyTorch here; loaded (2026-12-06): handler 1407, 284 (5.0x), 437 (3.2x)
    "fasterrcnn_mobilenet_v3_large_320_fpn": "openvino",
    # the TF default: its forward pass through OpenVINO (no ONNX export: tf2onnx), keras-hub's decoding and
    # TensorFlow's NMS around it: graph tensorflow 36.5, openvino 11.4; handler 42.3, 20.3 (2.1x)
    "keras_ssd_mobilenet_v2_fpnlite_320": "openvino",
}


class RuntimeChoiceError(ValueError):
    """A runtime that does not exist, or cannot run here (its package is missing)."""


def requested(environ: Mapping[str, str] | None = None) -> str:
    """The runtime ``PREANNOTATE_RUNTIME`` asks for (``auto`` when it is not set); ``RuntimeChoiceError`` for a
    name that is none."""
    raw = (os.environ if environ is None else environ).get(ENVIRONMENT, "")
    return checked(raw, ENVIRONMENT)


def checked(name: str | None, given_as: str = ENVIRONMENT) -> str:
    """``name`` as one of ``RUNTIMES`` (``auto`` when empty); ``RuntimeChoiceError`` when it is none of them."""
    value = (name or "").strip().lower() or "auto"
    if value not in RUNTIMES:
        raise RuntimeChoiceError(f"{given_as}={name}: there is no such runtime{did_you_mean(value, RUNTIMES)}; "
                                 f"give one of {', '.join(RUNTIMES)}")
    return value


def chosen(architecture: str, device: str, wanted: str) -> str:
    """The runtime to run ``architecture`` on ``device`` with: ``wanted``, ``auto`` resolved by ``FASTEST_ON_CPU``;
    ``torch`` (the framework) on anything but a CPU (the converted graph runs on the CPU, the framework on the
    GPU). ``device`` as torch (``cpu``, ``cuda:0``) or TensorFlow (``/CPU:0``) names it."""
    if "cpu" not in str(device).lower():
        return "torch"
    if wanted == "auto":
        return FASTEST_ON_CPU.get(architecture, "torch")
    return wanted


def use(detector: Detector, family: ModelFamily, directory: Path, wanted: str | None = None) -> str:
    """Make ``detector`` (loaded from ``directory`` by ``family``) run on the runtime chosen for it (``wanted``:
    default ``PREANNOTATE_RUNTIME``), exporting its graph the first time; return the runtime it runs on."""
    wanted = checked(wanted) if wanted is not None else requested()
    framework = detector.manifest.framework
    eager = EAGER.get(framework, framework)
    runtime = chosen(detector.manifest.architecture, str(getattr(detector, "device", "cpu")), wanted)
    if runtime == "torch" or not isinstance(family, ConvertibleFamily) or not family.convertible(detector):
        if runtime != "torch" and wanted != "auto":
            log.warning("%s=%s: %s runs only in %s here", ENVIRONMENT, wanted, detector.manifest.architecture, eager)
        return eager
    readers = family.CONVERTS_TO
    if runtime not in readers:
        log.warning("%s=%s: %s runs in %s or %s, not %s; serving it in %s", ENVIRONMENT, wanted,
                    detector.manifest.architecture, eager, " or ".join(readers), runtime, eager)
        return eager
    try:
        graph = graph_file(Path(directory), lambda path: family.export_graph(detector, path), family.GRAPH_FILE)
        runner = compiled(graph, runtime)
    except RuntimeChoiceError:
        if wanted != "auto":
            raise
        log.warning("%s is not installed: %s runs in %s", runtime, detector.manifest.architecture, eager)
        return eager
    detector.run_converted(runner)
    return runtime


def graph_file(directory: Path, export: Callable[[Path], Any], name: str) -> Path:
    """The version's exported graph (``name`` in ``directory``), exported by ``export`` (into the path it is given,
    with any files beside it that the graph reads: OpenVINO's weights) when it is not there yet. Exported into a
    temporary directory and moved into place, the file ``name`` last: a process loading the version at the same
    time finds the whole graph or none. A store this process cannot write to (a read-only volume) gets its graph
    exported into a temporary directory, again at each start."""
    path = directory / name
    if path.is_file():
        return path
    try:
        staging = Path(tempfile.mkdtemp(dir=directory, prefix=".graph."))
    except OSError:
        log.warning("cannot write the exported graph beside %s: exported for this process only", directory)
        path = Path(tempfile.mkdtemp(prefix="preannotate-graph-")) / name
        export(path)
        return path
    try:
        export(staging / name)
        for file in sorted(staging.iterdir(), key=lambda file: file.name == name):
            os.replace(file, directory / file.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def compiled(path: Path, runtime: str) -> Graph:
    """The exported graph at ``path`` compiled by ``runtime`` for this CPU: images (float32, laid out as the
    graph takes them) in, its outputs by name out."""
    if runtime == "openvino":
        try:
            import openvino
        except ImportError:
            raise RuntimeChoiceError(_missing("openvino")) from None
        # float32 throughout: on a CPU with bfloat16 units (AMX, AVX512-BF16) OpenVINO would otherwise compute in
        # bfloat16 and answer otherwise than PyTorch does (class logits off by a fifth)
        model = openvino.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        names = [output.get_any_name() for output in model.outputs]

        def run(images: np.ndarray) -> dict[str, np.ndarray]:
            # an infer request per call: one compiled model serves every thread
            results = model.create_infer_request().infer(images)
            return {name: results[output] for name, output in zip(names, model.outputs, strict=True)}
        return run
    if runtime == "onnxruntime":
        try:
            import onnxruntime
        except ImportError:
            raise RuntimeChoiceError(_missing("onnxruntime")) from None
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [output.name for output in session.get_outputs()]
        image_input = session.get_inputs()[0].name
        return lambda images: dict(zip(names, session.run(names, {image_input: images}), strict=True))
    raise RuntimeChoiceError(f"{runtime} does not run exported graphs; give one of {', '.join(CONVERTED)}")


def _missing(package: str) -> str:
    return (f"{ENVIRONMENT}={package}: the {package} package is not installed here (pip install {package}); or set "
            f"{ENVIRONMENT}=torch")
