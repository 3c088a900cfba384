"""What CVAT's data meta (``GET /api/tasks/ID/data/meta``, or a job's) says of the frames — read here only.

The meta lists each frame's name and size, except that a video's lists one entry for all its frames; it also names
the deleted frames, and a ground-truth job's meta lists only the frames it includes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class FrameInfo:
    name: str
    width: int
    height: int


@dataclass(frozen=True)
class FrameMeta:
    """What a task's (or a job's) data meta says of its frames."""

    size: int                           # how many frames the task (or job) has
    entries: tuple[FrameInfo, ...]      # the frames it lists, in order; a video's one entry repeated for each frame
    video: bool
    deleted: frozenset[int]
    included: tuple[int, ...] = ()      # a ground-truth job's frames (its meta lists only those)

    def numbered(self, numbers: Sequence[int] | None = None) -> dict[int, FrameInfo]:
        """Frame number → its entry, entry i being frame ``numbers[i]`` (by default frame i: a task's meta);
        a video's frames are named by number, ``frame_000012``, as CVAT's exports name them."""
        numbers = range(len(self.entries)) if numbers is None else numbers
        return {number: FrameInfo(f"frame_{number:06d}", info.width, info.height) if self.video else info
                for number, info in zip(numbers, self.entries, strict=True)}

    def present(self) -> list[int]:
        """A task's frame numbers, less the deleted ones."""
        return [number for number in range(self.size) if number not in self.deleted]


def frame_meta(meta: Any) -> FrameMeta:
    """A task's or job's data meta, as JSON or a cvat-sdk model (a ``FrameMeta`` passes through)."""
    if isinstance(meta, FrameMeta):
        return meta
    meta = meta.to_dict() if hasattr(meta, "to_dict") else meta  # cvat-sdk's to_dict keeps the JSON names
    entries = [FrameInfo(entry.get("name") or "", int(entry["width"]), int(entry["height"]))
               for entry in meta["frames"] or ()]
    size = int(meta.get("size") or len(entries))
    video = len(entries) == 1 and size > 1  # a video's meta describes all its frames with one entry
    return FrameMeta(size=size, entries=tuple(entries * size if video else entries), video=video,
                     deleted=frozenset(meta.get("deleted_frames") or ()),
                     included=tuple(meta.get("included_frames") or ()))
