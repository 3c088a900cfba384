"""Files replaced whole: the one way this package writes state that another process may read meanwhile (job state,
checkpoints, the serving pointer, upload journals, downloaded chunks)."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed over ``path`` when the block ends without error, so
    readers see the old file or the new one and never half of one (a kill or an error leaves the old one), and
    removed otherwise. The name is unique per process and thread, and the file keeps the usual permissions."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_atomically(path: str | os.PathLike, data: str | bytes) -> None:
    """``path`` replaced by ``data`` (text is written as UTF-8) in one step."""
    with replacing(path) as temporary:
        temporary.write_bytes(data if isinstance(data, bytes) else data.encode())
