"""cvat-preannotate: train detectors from CVAT annotations and pre-annotate new tasks."""

__version__ = "0.1.0"
