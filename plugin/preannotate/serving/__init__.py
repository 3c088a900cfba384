"""Serving: the CVAT detector contract, the serving core, and its doors (Nuclio, local HTTP)."""
