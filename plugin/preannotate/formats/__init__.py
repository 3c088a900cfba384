"""Formats (layer 2): ``coco``, ``tfrecord`` (TF Object Detection API records and ``label_map.pbtxt``), ``dataset``
(folders on disk and their split); ``masks`` (every mask encoding) sits in the vocabulary below them."""
