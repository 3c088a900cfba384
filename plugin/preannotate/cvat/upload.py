"""Write predictions into a CVAT task: idempotent, batched, resumable.

* Shapes go in as ``source: "auto"`` with the task's label ids (matched by name, after an optional ``a=b``
  rename); a shape whose label the task lacks is counted in ``UploadReport.unmapped``, never an error.
* **Idempotent per frame**: writing frames first deletes the ``auto`` shapes and ``auto`` tags (a classifier's)
  already on exactly those frames, and the ``auto`` tracks visible on any of them, so a re-run replaces instead of
  duplicating. Everything a person touched stays: ``manual`` and ``file`` shapes, tags and tracks, and
  ``semi-auto`` ones — CVAT turns an ``auto`` shape or track into ``semi-auto`` when someone edits it. The
  confidence tag (``review``) is one per frame. ``replace=True`` deletes every shape, tag and track there instead.
* **Tracks** (``shapes.Track``, written with the frames they lie on) should lie within one job each: CVAT keeps one
  piece of a track per job (``AnnotationIR.slice`` in cvat/apps/dataset_manager/annotation.py cuts what a task-level
  write sends at job boundaries), so the caller cuts them there (``job_ranges``) and writes a job's frames at once.
* **Bounded**: frames are written in batches, each batch a PATCH ``action=delete`` then PATCH ``action=create``
  request(s) of at most ``max_shapes`` shapes.
* **Resumable**: a journal under a state directory, keyed by server, task and a digest of the input, records the
  frames whose batch finished; a re-run with the same input skips them. A batch cut off half-way is simply done
  again (it is idempotent), and the journal is removed once everything is written.

The task's existing annotations are read once (one GET) when a writer starts; the writer then keeps them current
from its own requests. A concurrent writer of ``auto`` shapes on the same frames is not seen: ``before_write`` (run
before every batch) is where a caller checks for one and stops (``lambda_requests.check_idle``: CVAT's menu).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cvat_sdk import Client
from cvat_sdk.api_client.exceptions import ApiException
from cvat_sdk.core.helpers import make_request_headers
from tqdm import tqdm

from preannotate.cvat import encoding, review
from preannotate.cvat.annotations import frames_from_annotations, read_labels, track_frames
from preannotate.cvat.client import CvatError, cvat_errors
from preannotate.cvat.meta import frame_meta
from preannotate.files import write_atomically
from preannotate.formats import coco
from preannotate.frames import frame_ranges, parse_frame_ranges
from preannotate.shapes import TAG, Shape, Track

log = logging.getLogger(__name__)

AUTO = "auto"
FORMATS = ("coco-results", "coco")
DEFAULT_BATCH_FRAMES = 100
DEFAULT_MAX_SHAPES = 1000


@dataclass
class UploadReport:
    frames: int = 0                     # frames written (their auto shapes replaced)
    created: int = 0                    # shapes (and a classifier's tags) created
    tracks: int = 0                     # tracks created
    keyframes: int = 0                  # their keyframes (outside ones included)
    deleted: int = 0                    # earlier shapes and tracks deleted
    resumed: int = 0                    # frames skipped: an interrupted run with the same input had written them
    unmapped: Counter[str] = field(default_factory=Counter)     # shapes dropped: label not in the task, by label
    unmatched_images: list[str] = field(default_factory=list)   # import: images matching no frame of the task

    def add(self, other: UploadReport) -> None:
        self.frames += other.frames
        self.created += other.created
        self.tracks += other.tracks
        self.keyframes += other.keyframes
        self.deleted += other.deleted
        self.resumed += other.resumed
        self.unmapped.update(other.unmapped)
        self.unmatched_images += other.unmatched_images


def parse_label_map(text: str | Mapping[str, str] | None) -> dict[str, str]:
    """``"vehicle=car,human=person"`` (model or file label = task label) → a dict; a mapping passes through."""
    if text is None:
        return {}
    if isinstance(text, Mapping):
        return dict(text)
    pairs = {}
    for item in (part.strip() for part in text.split(",") if part.strip()):
        source, sep, target = item.partition("=")
        if not sep or not source.strip() or not target.strip():
            raise ValueError(f"label map item {item!r} is not NAME=TASK_LABEL")
        pairs[source.strip()] = target.strip()
    return pairs


def server_of(client: Client) -> str:
    return client.api_client.configuration.host.rstrip("/")


# ---------------------------------------------------------------------------------------------------- journal

def default_state_dir() -> Path:
    if os.environ.get("PREANNOTATE_STATE_DIR"):
        return Path(os.environ["PREANNOTATE_STATE_DIR"])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "preannotate" / "journal"


def digest(*parts: Any) -> str:
    """A stable digest of JSON-able parts (the identity of an input, for the journal)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class Journal:
    """The frames an interrupted write had finished, in a small JSON file (``"0-99,200-299"``), rewritten
    atomically. One it cannot read is ignored: the write starts afresh, which is idempotent."""

    def __init__(self, path: Path, header: dict[str, Any]):
        self.path, self.header = Path(path), header
        self.frames: set[int] = set()
        if self.path.is_file():
            try:
                self.frames = set(parse_frame_ranges(json.loads(self.path.read_text())["frames"]))
            except (ValueError, TypeError, KeyError, AttributeError):  # not JSON, or not ours (an older format)
                log.warning("ignoring unreadable journal %s", self.path)

    @classmethod
    def open(cls, state_dir: str | os.PathLike | None, client: Client, task_id: int, input_digest: str) -> Journal:
        server = server_of(client)
        key = digest(server, task_id, input_digest)[:24]
        directory = Path(state_dir) if state_dir is not None else default_state_dir()
        return cls(directory / f"task{task_id}-{key}.json",
                   {"server": server, "task": task_id, "input": input_digest})

    def add(self, frames: Iterable[int]) -> None:
        self.frames.update(frames)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({**self.header, "frames": frame_ranges(self.frames)})
        write_atomically(self.path, text)

    def finish(self) -> None:
        """Everything was written: a later run with the same input starts afresh (and is idempotent anyway)."""
        self.path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------- writer

@dataclass(frozen=True)
class _TaskLabel:
    id: int
    type: str
    attributes: dict[str, int]  # attribute name → spec id
    mutable: frozenset[str]     # the names of its mutable attributes (a track's keyframes take those)
    sublabels: dict[str, int] = field(default_factory=dict)  # a skeleton's: sublabel name → id, in its order


class TaskWriter:
    """Writes shapes into one task, frame by frame replacing its earlier ``auto`` shapes (see the module doc)."""

    def __init__(self, client: Client, task_id: int, *, label_map: Mapping[str, str] | str | None = None,
                 replace: bool = False, max_shapes: int = DEFAULT_MAX_SHAPES,
                 before_write: Callable[[], None] | None = None):
        self.client, self.task_id, self.replace, self.max_shapes = client, task_id, replace, max_shapes
        self.before_write = before_write  # raises to stop before a batch is written (another writer at work)
        self.label_map = parse_label_map(label_map)
        with cvat_errors(client, f"task {task_id}"):
            self.task = client.tasks.retrieve(task_id)
            self.label_models = self.task.get_labels()
            self.meta = frame_meta(self.task.get_meta())
            _, response = client.tasks.api.retrieve_annotations(task_id, _parse_response=False)
        self.labels = {label.name: _TaskLabel(label.id, str(label.type),
                                              {a.name: a.id for a in label.attributes or ()},
                                              frozenset(a.name for a in label.attributes or () if a.mutable),
                                              {sub.name: sub.id for sub in getattr(label, "sublabels", None) or ()})
                       for label in self.label_models if getattr(label, "parent_id", None) is None}
        self.annotations = json.loads(response.data)
        self.shapes_on: dict[int, list[dict[str, Any]]] = {}  # frame → stored shapes (GET JSON), kept current
        for stored in self.annotations.get("shapes") or ():
            self.shapes_on.setdefault(stored["frame"], []).append(stored)
        self.confidence_tags_on: dict[int, list[dict[str, Any]]] = {}  # frame → our confidence tags
        self.tags_on: dict[int, list[dict[str, Any]]] = {}  # frame → every other stored tag
        for stored in self.annotations.get("tags") or ():
            self._keep_tag(stored)
        self.tracks_on: list[dict[str, Any]] = list(self.annotations.get("tracks") or ())  # kept current too

    @property
    def is_video(self) -> bool:
        """A video task (CVAT's ``mode`` "interpolation"), whose unit of work is the track."""
        return str(getattr(self.task, "mode", "")) == "interpolation"

    def job_ranges(self) -> list[range]:
        """The frames of each annotation job (not the ground-truth job), in order: where CVAT cuts tracks."""
        with cvat_errors(self.client, f"jobs of task {self.task_id}"):
            jobs = [job for job in self.task.get_jobs() if str(getattr(job, "type", "annotation")) == "annotation"]
        return [range(job.start_frame, job.stop_frame + 1) for job in sorted(jobs, key=lambda job: job.start_frame)]

    def _keep_tag(self, stored: dict[str, Any]) -> None:
        confidence = self.labels.get(review.CONFIDENCE_LABEL)
        kept = self.confidence_tags_on if confidence is not None and stored.get("label_id") == confidence.id \
            else self.tags_on
        kept.setdefault(stored["frame"], []).append(stored)

    def frame_names(self) -> list[str]:
        """Name of every task frame (index = frame number)."""
        return [info.name for info in self.meta.numbered().values()]

    def frames(self) -> list[int]:
        """The task's frames that are not deleted."""
        return self.meta.present()

    def human_frames(self) -> set[int]:
        """Frames with a shape, or a visible track, whose source is not ``auto``: someone annotated them."""
        annotated = frames_from_annotations(self.annotations, [m.to_dict() for m in self.label_models], self.meta)
        return {number for number, frame in annotated.frames.items()
                if any(shape.source != AUTO for shape in frame.shapes)}

    def task_label_names(self) -> list[str]:
        return [label.name for label in read_labels([m.to_dict() for m in self.label_models])]

    def unshared(self, names: Iterable[str]) -> list[str]:
        """The label names (a model's, a file's) that map to no task label."""
        return [name for name in names if self.label_map.get(name, name) not in self.labels]

    def write(self, shapes_by_frame: Mapping[int, Sequence[Shape]],
              confidence: Mapping[int, float] | None = None, tracks: Sequence[Track] = ()) -> UploadReport:
        """Replace the ``auto`` shapes (every shape with ``replace``) of exactly these frames, and the ``auto``
        tracks visible on them, by the given shapes and ``tracks`` (which should lie on these frames, one job each);
        a frame given with no shapes just loses its earlier ``auto`` shapes. ``confidence`` (frame → 0.0-1.0)
        replaces the frames' confidence tags (``review``) when the task has the confidence label; the tags travel
        in the same requests as the shapes."""
        if self.before_write is not None:
            self.before_write()
        report = UploadReport(frames=len(shapes_by_frame))
        old = [stored for frame in shapes_by_frame for stored in self.shapes_on.get(frame, ())
               if self.replace or stored.get("source") == AUTO]
        new, new_tags, written = [], [], Counter()
        for frame, shapes in shapes_by_frame.items():
            for shape in shapes:
                request = self._request(shape, frame)
                if request is None:
                    report.unmapped[shape.label] += 1
                elif shape.type == TAG:
                    new_tags.append(request)
                    report.created += 1
                else:
                    new.append(request)
                    written[frame] += 1
        old_tags, confidence_tags = self._confidence_tags(confidence or {}, written)
        new_tags = confidence_tags + new_tags
        replaced_tags = [stored for frame in shapes_by_frame for stored in self.tags_on.get(frame, ())
                         if self.replace or stored.get("source") == AUTO]
        old_tags += [_writable_tag(stored) for stored in replaced_tags]
        for index, part in enumerate(_chunks(old, self.max_shapes, at_least_one=bool(old_tags))):
            self._patch("delete", [_writable(s) for s in part], old_tags if index == 0 else ())
            report.deleted += len(part)
        report.deleted += len(replaced_tags)
        gone = {id(s) for s in (*old, *replaced_tags)}
        for frame in shapes_by_frame:
            for kept in (self.shapes_on, self.tags_on):
                if frame in kept:
                    kept[frame] = [s for s in kept[frame] if id(s) not in gone]
        for index, part in enumerate(_chunks(new, self.max_shapes, at_least_one=bool(new_tags))):
            written = self._patch("create", part, new_tags if index == 0 else ())
            for stored in written.get("shapes") or ():
                self.shapes_on.setdefault(stored["frame"], []).append(stored)
            for stored in written.get("tags") or ():
                self._keep_tag(stored)
            report.created += len(part)
        self._write_tracks(set(shapes_by_frame), tracks, report)
        return report

    def _write_tracks(self, frames: set[int], tracks: Sequence[Track], report: UploadReport) -> None:
        """Delete the tracks ``write`` replaces on ``frames``, then create ``tracks``, each request holding at most
        ``max_shapes`` keyframes (a longer track goes alone)."""
        old = [stored for stored in self.tracks_on if (self.replace or stored.get("source") == AUTO)
               and self._visible_on(stored, frames)]
        new = []
        for track in tracks:
            label = self.labels.get(self.label_map.get(track.label, track.label))
            if label is None:
                report.unmapped[track.label] += 1
                continue
            body = encoding.labeled_track(track, label_id=label.id, attribute_ids=label.attributes,
                                          mutable=label.mutable, label_type=label.type, source=AUTO)
            if body is not None:
                new.append(body)
        for part in _chunks_by_keyframes(old, self.max_shapes):
            self._patch("delete", [], tracks=[_writable_track(stored) for stored in part])
            report.deleted += len(part)
        gone = {id(stored) for stored in old}
        self.tracks_on = [stored for stored in self.tracks_on if id(stored) not in gone]
        for part in _chunks_by_keyframes(new, self.max_shapes):
            self.tracks_on += self._patch("create", [], tracks=part).get("tracks") or []
            report.tracks += len(part)
            report.keyframes += sum(len(body["shapes"]) for body in part)

    def _visible_on(self, stored: Mapping[str, Any], frames: set[int]) -> bool:
        if not frames:
            return False
        return any(frame in frames for frame, *_ in
                   track_frames(stored, min(frames), max(frames) + 1, self.meta.deleted))

    def _confidence_tags(self, confidence: Mapping[int, float], written: Mapping[int, int]
                         ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The frames' earlier confidence tags (to delete) and their new ones (to create), each saying how many
        shapes were ``written`` on its frame (what ``review.review_counts`` compares a reviewed frame with)."""
        label = self.labels.get(review.CONFIDENCE_LABEL)
        if not confidence or label is None or review.CONFIDENCE_ATTRIBUTE not in label.attributes:
            return [], []
        old = [_writable_tag(t) for frame in confidence for t in self.confidence_tags_on.pop(frame, ())]
        new = [review.confidence_tag(frame, value, label.id, label.attributes, written.get(frame, 0))
               for frame, value in confidence.items()]
        return old, new

    def _request(self, shape: Shape, frame: int) -> dict[str, Any] | None:
        """The shape as a ``LabeledShapeRequest`` body for this task's label (``encoding.labeled_shape``), a tag as
        a ``LabeledImageRequest`` (``encoding.labeled_tag``)."""
        label = self.labels.get(self.label_map.get(shape.label, shape.label))
        if label is None:
            return None
        if shape.type == TAG:
            return encoding.labeled_tag(shape, frame=frame, label_id=label.id, attribute_ids=label.attributes,
                                        source=AUTO)
        return encoding.labeled_shape(shape, frame=frame, label_id=label.id, attribute_ids=label.attributes,
                                      label_type=label.type, source=AUTO, sublabel_ids=label.sublabels)

    def _patch(self, action: str, shapes: list[dict[str, Any]], tags: Sequence[dict[str, Any]] = (),
               tracks: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
        """PATCH ``/api/tasks/ID/annotations?action=create|delete`` with a plain JSON body (see ``_request``) on
        cvat-sdk's connection, headers and auth, as cvat-sdk's own downloader makes its raw calls. Not through
        ``call_api``: it first walks the body in Python (``model_utils.to_json``), 25x the time of ``json.dumps``
        (seconds for the 50,000 boxes of 200 frames)."""
        api = self.client.api_client
        url = self.client.api_map.make_endpoint_url("/api/tasks/{id}/annotations", kwsub={"id": self.task_id},
                                                    query_params={"action": action})
        headers = {**make_request_headers(api), "Content-Type": "application/json",
                   "Accept": "application/vnd.cvat+json"}
        body = {"shapes": shapes, **({"tags": list(tags)} if tags else {}),
                **({"tracks": list(tracks)} if tracks else {})}
        what = f"{len(shapes)} shapes" + (f", {len(tags)} tags" if tags else "") + \
            (f", {len(tracks)} tracks" if tracks else "")
        with cvat_errors(self.client, f"task {self.task_id} ({action} {what})"):
            response = api.rest_client.pool_manager.request("PATCH", url, headers=headers,
                                                             body=json.dumps(body).encode())
            if not 200 <= response.status <= 299:
                raise ApiException(http_resp=response)
        return json.loads(response.data or b"{}")


def _writable(stored: dict[str, Any]) -> dict[str, Any]:
    """A stored shape (GET JSON) as a request: CVAT validates a delete body like a create body."""
    return {k: v for k, v in stored.items() if k in ("id", "type", "frame", "label_id", "points", "rotation",
                                                       "occluded", "outside", "z_order", "group", "source",
                                                       "attributes", "elements")}


def _writable_track(stored: dict[str, Any]) -> dict[str, Any]:
    """A stored track (GET JSON) as a request, its keyframes with it: CVAT cuts a deletion at job boundaries by
    them before it deletes by id."""
    track = {k: v for k, v in stored.items() if k in ("id", "frame", "label_id", "group", "source", "attributes",
                                                       "elements")}
    return {**track, "shapes": [_writable(shape) for shape in stored.get("shapes") or ()]}


def _chunks_by_keyframes(tracks: list[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    """``tracks`` in runs of at most ``size`` keyframes (a track with more goes alone)."""
    part: list[dict[str, Any]] = []
    count = 0
    for track in tracks:
        weight = len(track.get("shapes") or ())
        if part and count + weight > size:
            yield part
            part, count = [], 0
        part.append(track)
        count += weight
    if part:
        yield part


def _writable_tag(stored: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in stored.items() if k in ("id", "frame", "label_id", "group", "source", "attributes")}


def _chunks(items: list, size: int, at_least_one: bool = False) -> Iterator[list]:
    """``items`` in runs of ``size``; with ``at_least_one``, one empty run when there are none (a request that
    carries only tags)."""
    if not items and at_least_one:
        yield []
    for start in range(0, len(items), size):
        yield items[start:start + size]


# ---------------------------------------------------------------------------------------------------- entry points

def write_predictions(client: Client, task_id: int, shapes_by_frame: Mapping[int, Sequence[Shape]], *,
                      label_map: Mapping[str, str] | str | None = None, replace: bool = False,
                      batch_frames: int = DEFAULT_BATCH_FRAMES, state_dir: str | os.PathLike | None = None,
                      input_digest: str | None = None, progress: bool = False,
                      writer: TaskWriter | None = None) -> UploadReport:
    """Write predictions (frame → shapes; a frame with ``[]`` loses its earlier ``auto`` shapes) in batches of
    ``batch_frames`` frames, resumable under ``state_dir`` (default ``$PREANNOTATE_STATE_DIR`` or
    ``~/.cache/preannotate/journal``). ``input_digest`` names the input for the journal (default: its content)."""
    writer = writer or TaskWriter(client, task_id, label_map=label_map, replace=replace)
    frames = sorted(shapes_by_frame)
    unknown = [f for f in frames if not 0 <= f < writer.meta.size]
    if unknown:
        raise CvatError(f"task {task_id} has frames 0..{writer.meta.size - 1}; predictions name frames "
                        f"{unknown[:5]}")
    if input_digest is None:
        input_digest = digest([[f, [(s.label, s.type, s.points, s.rotation, s.score, s.attributes)
                                    for s in shapes_by_frame[f]]] for f in frames])
    journal = Journal.open(state_dir, client, task_id,
                           digest(input_digest, writer.label_map, writer.replace, batch_frames))
    report = UploadReport(resumed=sum(f in journal.frames for f in frames))
    todo = [f for f in frames if f not in journal.frames]
    with tqdm(total=len(frames), initial=report.resumed, unit="frame", desc=f"task {task_id}",
              disable=not progress) as bar:
        for batch in _chunks(todo, max(1, batch_frames)):
            report.add(writer.write({f: shapes_by_frame[f] for f in batch}))
            journal.add(batch)
            bar.update(len(batch))
    journal.finish()
    if report.unmapped:
        log.warning("task %d has no label for %s: %d shapes not written", task_id,
                    ", ".join(sorted(report.unmapped)), sum(report.unmapped.values()))
    return report


def import_file(client: Client, task_id: int, path: str | os.PathLike, fmt: str = "coco-results", *,
                threshold: float | None = None, label_map: Mapping[str, str] | str | None = None,
                replace: bool = False, coco_file: str | os.PathLike | None = None,
                state_dir: str | os.PathLike | None = None, batch_frames: int = DEFAULT_BATCH_FRAMES,
                progress: bool = False) -> UploadReport:
    """Import predictions from a file into a task (idempotent and resumable, see the module doc).

    ``fmt="coco"``: a COCO instances dataset; its images are matched to the task's frames by ``file_name`` (the
    frame name as CVAT has it, else its base name when that is unique), its categories to task labels by name.
    Every matched image counts as written, so an image without annotations loses its earlier ``auto`` shapes.

    ``fmt="coco-results"``: a list of ``{image_id, category_id, bbox | segmentation, score}``. With ``coco_file``
    (the COCO dataset the results refer to) ids resolve through it as above. Without it, the convention of our own
    COCO export and of CVAT's ``COCO 1.0`` export of a task without deleted frames: image id = frame + 1, category
    id = position of the task label in CVAT's label order, from 1. Only frames that have a result are written.

    ``threshold`` drops shapes scoring below it (shapes without a score are kept)."""
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    raw, data = coco.read_file(path)
    extra, dataset = coco.read_file(coco_file) if coco_file is not None else (b"", None)
    writer = TaskWriter(client, task_id, label_map=label_map, replace=replace)
    name = Path(path).name
    if fmt == "coco":
        shapes_by_frame, unmatched = _from_dataset(data, writer, name)
    else:
        shapes_by_frame, unmatched = _from_results(data, dataset, writer, name, Path(coco_file or "").name)
    if threshold is not None:
        shapes_by_frame = {f: [s for s in shapes if s.score is None or s.score >= threshold]
                           for f, shapes in shapes_by_frame.items()}
    report = write_predictions(client, task_id, shapes_by_frame, replace=replace, batch_frames=batch_frames,
                               state_dir=state_dir, progress=progress, writer=writer,
                               input_digest=digest(hashlib.sha256(raw).hexdigest(), fmt, threshold,
                                                   hashlib.sha256(extra).hexdigest()))
    report.unmatched_images = unmatched
    return report


def _frame_matcher(writer: TaskWriter):
    names = writer.frame_names()
    exact = {name: i for i, name in enumerate(names)}
    base = Counter(os.path.basename(name) for name in names)
    by_base = {os.path.basename(name): i for i, name in enumerate(names) if base[os.path.basename(name)] == 1}
    deleted = writer.meta.deleted

    def match(file_name: str) -> int | None:
        frame = exact.get(file_name)
        if frame is None:
            frame = by_base.get(os.path.basename(file_name))
        return None if frame in deleted else frame

    return match


def _sized(writer: TaskWriter, frame: int) -> tuple[int, int, int]:
    """A task frame as ``coco.read_shapes`` places shapes on it: (frame, width, height)."""
    info = writer.meta.entries[frame]
    return frame, info.width, info.height


def _images_to_frames(dataset: Any, writer: TaskWriter, file: str) -> tuple[dict[Any, tuple[int, int, int]], list[str]]:
    """A COCO dataset's image id → (task frame, width, height), by file name, and the file names that match no
    frame (all unmatched is an error)."""
    match = _frame_matcher(writer)
    images, unmatched = {}, []
    for image_id, file_name in coco.dataset_images(dataset, file):
        frame = match(file_name)
        if frame is None:
            unmatched.append(file_name)
        else:
            images[image_id] = _sized(writer, frame)
    if unmatched and not images:
        raise CvatError(f"none of the {len(unmatched)} images (e.g. {unmatched[0]!r}) is a frame of task "
                        f"{writer.task_id} (frames like {writer.frame_names()[0]!r})")
    if unmatched:
        log.warning("%d images match no frame of task %d, e.g. %s", len(unmatched), writer.task_id, unmatched[0])
    return images, unmatched


def _from_dataset(dataset: Any, writer: TaskWriter, file: str) -> tuple[dict[int, list[Shape]], list[str]]:
    """A COCO dataset's shapes on the task's frames; every image matched counts, with or without annotations."""
    images, unmatched = _images_to_frames(dataset, writer, file)
    name_of = coco.dataset_categories(dataset, file)

    def label_of(category_id: Any) -> str:
        if category_id not in name_of:
            raise ValueError(f"{file}: category_id {category_id!r} is not among its categories")
        return name_of[category_id]

    shapes, _ = coco.read_shapes(dataset.get("annotations") or [], "annotation", file, label_of, images, AUTO,
                                 keypoints=coco.dataset_keypoints(dataset))
    return {frame: shapes.get(frame, []) for frame, _, _ in images.values()}, unmatched


def _from_results(results: Any, dataset: Any, writer: TaskWriter, file: str, dataset_file: str
                  ) -> tuple[dict[int, list[Shape]], list[str]]:
    """COCO results on the task's frames: through their COCO dataset when given, else by our export's convention
    (see ``import_file``). Only frames that have a result."""
    if not isinstance(results, list):
        raise ValueError(f"{file} is not COCO results: a JSON list of {{image_id, category_id, bbox, score}} "
                         "(a COCO dataset is imported with --format coco)")
    if dataset is not None:
        images, unmatched = _images_to_frames(dataset, writer, dataset_file)
        name_of = coco.dataset_categories(dataset, dataset_file)
    else:  # our export's convention (see import_file)
        images = {frame + 1: _sized(writer, frame) for frame in writer.frames()}
        unmatched = []
        name_of = dict(enumerate(writer.task_label_names(), start=1))
    shapes_by_frame, elsewhere = coco.read_shapes(results, "result", file,
                                                  lambda c: name_of.get(c, f"category {c}"), images, AUTO)
    unmatched += [f"image_id {image_id}" for image_id in elsewhere]
    if results and not shapes_by_frame:
        raise CvatError(f"no result of the file names a frame of task {writer.task_id} "
                        f"(e.g. {unmatched[0]}; give the COCO file the results refer to)")
    return shapes_by_frame, sorted(set(unmatched))
