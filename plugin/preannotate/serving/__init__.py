"""Serving (layer 6): the CVAT detector contract (``contract``), the serving core every door calls (``core``), the
doors (``nuclio``, ``http``) and the training routes a function carries (``training``)."""
