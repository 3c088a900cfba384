"""Everything that speaks CVAT: its annotation JSON (``annotations``) and, later, the server itself."""
