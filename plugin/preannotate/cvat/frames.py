"""The frames of a CVAT task as ``preannotate.frames.FrameImages``: read by chunk, cached on disk, fetched ahead."""

from __future__ import annotations

import hashlib
import io
import itertools
import logging
import os
import time
import zipfile
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import urllib3
from cvat_sdk import Client
from cvat_sdk.api_client.exceptions import ApiException
from PIL import Image

from preannotate.cvat.client import CvatError, cvat_errors
from preannotate.cvat.meta import frame_meta
from preannotate.files import replacing
from preannotate.frames import decode_rgb

log = logging.getLogger(__name__)


class CvatFrames:
    """The frames of a CVAT task (task-relative numbers, as in its annotations), read chunk by chunk.

    A chunk (``data_chunk_size`` consecutive frames: a zip of the image files, or for a video task an MP4) is
    downloaded once with ``GET /api/tasks/ID/data?type=chunk`` and kept under ``cache_dir`` (default
    ``$PREANNOTATE_CACHE``, else ``~/.cache/preannotate/chunks``) in a folder keyed by the server, the task, its data
    and the time its chunks last changed, so edited media is never read stale while annotation edits keep the cache.
    While the caller works on one chunk, ``prefetch`` threads download the next ones. A chunk request that fails
    (5xx, connection reset) is tried again with backoff.
    """

    ATTEMPTS = 3
    BACKOFF_S = 0.25

    def __init__(self, client: Client, task_id: int, *, quality: str = "original", cache_dir: str | Path | None = None,
                 prefetch: int = 2) -> None:
        if quality not in ("original", "compressed"):
            raise ValueError(f"quality must be 'original' or 'compressed', not {quality!r}")
        self.client, self.task_id, self.quality, self.prefetch = client, task_id, quality, max(0, prefetch)
        with cvat_errors(client, f"task {task_id}"):
            self._task = client.tasks.retrieve(task_id)
            meta = self._task.get_meta()
        # Task frame i is source frame start_frame + i * step; chunks are numbered over the task frames.
        frames = frame_meta(meta)
        self.size, self.deleted, self.chunk_size = frames.size, frames.deleted, int(meta.chunk_size)
        chunk_type = (self._task.data_original_chunk_type if quality == "original"
                      else self._task.data_compressed_chunk_type)
        self.video = str(chunk_type) == "video"
        changed = getattr(meta, "chunks_updated_date", None) or self._task.updated_date
        key = hashlib.sha256(f"{client.api_map.host}|{task_id}|{self._task.data}|{quality}|{changed}".encode())
        root = Path(cache_dir or os.environ.get("PREANNOTATE_CACHE") or Path.home() / ".cache/preannotate/chunks")
        self.cache_dir = root / f"task{task_id}-{quality}-{key.hexdigest()[:16]}"

    def encoded(self, frames: Iterable[int]) -> Iterator[tuple[int, bytes]]:
        """Image chunks: the stored files as they are. Video: each decoded frame as a JPEG (quality 95)."""
        for frame, item in self._frames(frames):
            yield frame, _jpeg(item) if isinstance(item, np.ndarray) else item

    def decoded(self, frames: Iterable[int]) -> Iterator[tuple[int, np.ndarray]]:
        for frame, item in self._frames(frames):
            yield frame, item if isinstance(item, np.ndarray) else decode_rgb(item)

    def _frames(self, frames: Iterable[int]) -> Iterator[tuple[int, bytes | np.ndarray]]:
        """(frame, file bytes or, for video, RGB array), chunk after chunk in the order asked."""
        frames = [self._checked(frame) for frame in frames]
        runs = [(chunk, list(group)) for chunk, group in itertools.groupby(frames, lambda f: f // self.chunk_size)]
        pool = ThreadPoolExecutor(max_workers=max(1, self.prefetch), thread_name_prefix=f"chunks-task{self.task_id}")
        fetching: dict[int, Future[Path]] = {}
        try:
            for index, (chunk, group) in enumerate(runs):
                for ahead, _ in runs[index:index + 1 + self.prefetch]:
                    if ahead not in fetching:
                        fetching[ahead] = pool.submit(self._chunk_path, ahead)
                path = fetching[chunk].result()
                yield from (self._video if self.video else self._images)(path, chunk, group)
        finally:  # also on an early close: queued downloads are dropped, a running one finishes into the cache
            pool.shutdown(wait=False, cancel_futures=True)

    def _checked(self, frame: int) -> int:
        if not 0 <= frame < self.size:
            raise CvatError(f"frame {frame} is out of range: task {self.task_id} has frames 0..{self.size - 1}")
        if frame in self.deleted:
            raise CvatError(f"frame {frame} of task {self.task_id} is deleted")
        return frame

    def _chunk_path(self, number: int) -> Path:
        """The chunk file in the cache, downloaded first if missing (to a temporary file, renamed when complete,
        so neither a failed download nor a concurrent reader ever sees half a chunk)."""
        path = self.cache_dir / f"{number:06d}{'.mp4' if self.video else '.zip'}"
        if path.exists():
            return path
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        for attempt in itertools.count(1):
            try:
                with replacing(path) as partial, open(partial, "wb") as out:
                    self._task.download_chunk(number, out, quality=self.quality)
                return path
            except (ApiException, urllib3.exceptions.HTTPError) as error:
                transient = not isinstance(error, ApiException) or error.status is None or error.status >= 500
                if not transient or attempt == self.ATTEMPTS:
                    with cvat_errors(self.client, f"chunk {number} of task {self.task_id}"):
                        raise
                delay = self.BACKOFF_S * 2 ** (attempt - 1)
                log.warning("chunk %d of task %d failed (%s); trying again in %.2f s", number, self.task_id,
                            getattr(error, "status", None) or type(error).__name__, delay)
                time.sleep(delay)
        raise AssertionError("not reached")  # for type checkers: the loop returns or raises

    def _images(self, path: Path, chunk: int, group: list[int]) -> Iterator[tuple[int, bytes]]:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()  # named by position in the chunk, stored in frame order
            for frame in group:
                position = frame - chunk * self.chunk_size
                if position >= len(entries):
                    raise CvatError(f"chunk {chunk} of task {self.task_id} holds {len(entries)} frames, "
                                    f"frame {frame} is not among them")
                yield frame, archive.read(entries[position])

    def _video(self, path: Path, chunk: int, group: list[int]) -> Iterator[tuple[int, np.ndarray]]:
        """Decodes forward through the chunk, reopening it only when asked for an earlier frame."""
        import av  # only video tasks need PyAV

        container, pictures, position, array = None, iter(()), -1, None
        try:
            for frame in group:
                wanted = frame - chunk * self.chunk_size
                if wanted < position or container is None:
                    if container is not None:
                        container.close()
                    container = av.open(str(path))
                    stream = container.streams.video[0]
                    stream.thread_type = "AUTO"
                    pictures, position = container.decode(stream), -1
                while position < wanted:
                    video_frame = next(pictures, None)
                    if video_frame is None:
                        raise CvatError(f"chunk {chunk} of task {self.task_id} holds {position + 1} frames, "
                                        f"frame {frame} is not among them")
                    position += 1
                    if position == wanted:
                        array = video_frame.to_ndarray(format="rgb24")
                yield frame, array
        finally:
            if container is not None:
                container.close()


def _jpeg(array: np.ndarray, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
