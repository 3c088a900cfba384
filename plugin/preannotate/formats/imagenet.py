"""Frame tags as an ImageNet-style folder: ``<split>/<label>/<frame file>`` — a classifier's dataset.

Why this layout for CVAT's tags: it is what CVAT's own "ImageNet 1.0" export writes for tags (and Ultralytics'
"YOLO Classification" export too), and what ``torchvision.datasets.ImageFolder`` and Keras'
``image_dataset_from_directory`` read as they are, so a folder we export trains anywhere and a folder made elsewhere
trains here. As CVAT does, a frame with several tags is copied into each one's folder; a frame with no tag of the
labels is left out (counted, like the shapes a format cannot hold). A JSON list would keep multi-tag frames in one
place, but no classification trainer reads one.

A label's folder is its name with path separators replaced; ``labels.json`` beside the splits keeps the real names.
A folder without ``labels.json`` takes its folder names as tag labels, in sorted order.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from PIL import Image

from preannotate.shapes import TAG, FrameAnnotations, Label

UNTAGGED = "untagged frame"  # what ``write_frame`` counts in ``skipped`` for a frame it leaves out


def folder(label: str) -> str:
    """A label's folder name: one path component, whatever the label is called."""
    name = re.sub(r"[/\\\0]", "_", label).strip()
    return "_" if name in ("", ".", "..") else name


def write_frame(root: Path, split: str, frame: FrameAnnotations, data: bytes, name: str,
                labels: Sequence[Label], skipped: Counter[str]) -> int:
    """Write the frame's image into the folder of each of its tags among ``labels``; returns how many copies."""
    names = {label.name for label in labels}
    tags = frame.tags_among(names)
    if not tags:
        skipped[UNTAGGED] += 1
        return 0
    for tag in tags:
        target = root / split / folder(tag) / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return len(tags)


def is_folder(root: Path) -> bool:
    """Whether ``root`` is laid out as split folders of label folders of images: a split holds label folders and
    nothing else, a label folder images (at any depth: a project's frames are under ``task_<id>/``) and nothing
    else, and there is an image. Hidden files and folders do not count. Anything else — a model store, a demo's
    output, a folder of photos — holds no tags to learn."""
    images = 0
    for split in _splits(root):
        for entry in _visible(split.iterdir()):
            if not entry.is_dir():
                return False  # a file beside the label folders
            files = [path for path in _visible(entry.rglob("*"), entry) if path.is_file()]
            if any(path.suffix.lower() not in _EXTENSIONS for path in files):
                return False
            images += len(files)
    return images > 0


def read(root: Path, saved: list[Label] | None) -> tuple[list[Label], dict[str, list[tuple[FrameAnnotations, Path]]]]:
    """Labels and, per split, ``(frame with its one tag, image path)`` in the order of the frames' names (CVAT's
    frame order, not grouped by label); frames are numbered per split."""
    splits = _splits(root)
    folders = sorted({child.name for split in splits for child in _visible(split.iterdir()) if child.is_dir()})
    labels = saved or [Label(name, TAG, id=i) for i, name in enumerate(folders, start=1)]
    label_of = {folder(label.name): label.name for label in labels}
    out: dict[str, list[tuple[FrameAnnotations, Path]]] = {}
    for split in splits:
        found = sorted((path.relative_to(child).as_posix(), label_of[child.name], path)
                       for child in split.iterdir() if child.is_dir() and child.name in label_of
                       for path in _images(child))
        pairs = []
        for name, label, path in found:
            with Image.open(path) as image:  # the header only
                width, height = image.size
            pairs.append((FrameAnnotations(len(pairs), width, height, name, tags=[label]), path))
        if pairs:
            out[split.name] = pairs
    return labels, out


def _splits(root: Path) -> list[Path]:
    return sorted(p for p in _visible(root.iterdir()) if p.is_dir() and p.name not in ("annotations", "images")) \
        if root.is_dir() else []


def _images(directory: Path) -> Iterable[Path]:
    return sorted(p for p in _visible(directory.rglob("*"), directory) if p.is_file()
                  and p.suffix.lower() in _EXTENSIONS)


def _visible(paths: Iterable[Path], under: Path | None = None) -> Iterator[Path]:
    """``paths`` without the hidden ones (``.DS_Store``, ``.ipynb_checkpoints/``, ...): by their name or, with
    ``under``, by any part of their path below it."""
    for path in paths:
        parts = path.relative_to(under).parts if under else (path.name,)
        if not any(part.startswith(".") for part in parts):
            yield path


_EXTENSIONS = frozenset(Image.registered_extensions())
