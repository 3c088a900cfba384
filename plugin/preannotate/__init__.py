"""cvat-preannotate: train detectors from CVAT annotations and pre-annotate new tasks.

Data flows one way — CVAT → frames and shapes → formats → training → store → serving → CVAT — and so do the imports:
a module imports only from its own layer or the layers below it; composition (the command line, pre-annotating a
task with a model, the demo, deploying) lives at the top. ``tests/test_layers.py`` holds the package to this list.

Layers, bottom to top (a module belongs to the first entry naming it or a package above it):

1. vocabulary: `preannotate.shapes`, `preannotate.frames`, `preannotate.hyperparameters`, `preannotate.durations`,
   `preannotate.files`, `preannotate.uncertainty`, `preannotate.devices`, `preannotate.suggest`
   — labels, shapes and the annotations of a frame; frame images and frame ranges; the hyperparameter language;
   file helpers; how sure a model is of a frame; the devices this machine has; "did you mean" for a mistyped name;
2. formats: `preannotate.formats`
   — the mask codecs, COCO, TF Object Detection API records, dataset folders on disk and their train/val split;
3. cvat: `preannotate.cvat`, `preannotate.tracking`
   — the cvat-sdk bridge: connect, read annotations and frames, write shapes and tracks (the one encoder into CVAT's
   request format), webhooks; it turns CVAT into the vocabulary and back and knows nothing of models; detections of
   consecutive frames linked into CVAT tracks, keyframed where CVAT's interpolation would miss them;
4. models: `preannotate.models`
   — the registry, the model families (``models.family``: the contract each family and each loaded model keeps),
   artifacts, the store and the model-reference grammar;
5. training: `preannotate.training`
   — the one training recipe, the one training run (``training.loop``) and its framework adapters, evaluation,
   reports, jobs and the trigger policy;
6. serving: `preannotate.serving`
   — the CVAT detector contract, the serving core and its doors (Nuclio, local HTTP);
7. top: `preannotate.cli`, `preannotate.annotate`, `preannotate.demo`, `preannotate.deploy`,
   `preannotate.functions`, `preannotate.cvat_function`, `preannotate.worker`
   — entry points and orchestration (``worker``: the process a recorded job runs in).

A framework is imported only by what needs it: torch by the torch families, the torch adapter and what runs their
models; TensorFlow only by ``formats.tfrecord`` (through ``formats.tfrecord.tensorflow()``, which imports torchvision
first: the other order crashes the process) and what builds on it (the Keras family and adapter).
"""

__version__ = "0.1.0"
