"""Pre-annotate CVAT tasks with one of our models, or with any deployed CVAT detector function, in a pipeline.

Frames stream chunk by chunk (``CvatFrames``: downloads run ahead in threads, decoding runs ahead in one more),
the model takes them ``batch_size`` at a time, and every ``upload_every`` frames the predictions go to a background
uploader (a queue of two batches, so inference only waits on a server slower than the model). Each upload goes
through ``upload.TaskWriter``: the frames' earlier ``auto`` shapes are replaced, manual work stays, and a journal
records the uploaded frames, so an interrupted run started again continues where it stopped and never duplicates.

A video task (CVAT ``mode`` "interpolation") gets tracks instead (``as_tracks``; ``preannotate.tracking``): each
job's detections are linked into tracks, keyframed where CVAT's interpolation would miss them, and written when the
job's last frame is detected — a job is the unit of upload and of the journal, since CVAT cuts tracks there anyway.

With ``function_url`` the frames' files are POSTed as CVAT's lambda manager would (``{"image": base64,
"threshold"?}``) to a Nuclio function or ``preannotate serve``, ``workers`` requests in flight on one connection pool.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any, TypeVar

import urllib3
from cvat_sdk import Client
from tqdm import tqdm

from preannotate import tracking, uncertainty
from preannotate.cvat import review
from preannotate.cvat.client import CvatError, cvat_errors
from preannotate.cvat.frames import CvatFrames
from preannotate.cvat.upload import Journal, TaskWriter, UploadReport, digest
from preannotate.models import Detector, load_model
from preannotate.serving import contract
from preannotate.shapes import Shape, Track
from preannotate.suggest import did_you_mean
from preannotate.training.edits import threshold_text

log = logging.getLogger(__name__)

T = TypeVar("T")
# A deployed function decides with its own threshold; scoring uncertainty needs one, and this is CVAT's default.
DEFAULT_FUNCTION_THRESHOLD = 0.5
ANNOTATE_AS = ("tracks", "shapes")  # what a task's predictions are written as (default: tracks for a video task)


def parse_annotate_as(text: str | None, where: str = "--as") -> bool | None:
    """``tracks`` → True, ``shapes`` → False, nothing → None (the task decides: tracks for a video task)."""
    if not text:
        return None
    if text.strip().lower() not in ANNOTATE_AS:
        raise ValueError(f"{where} {text!r}: give tracks or shapes{did_you_mean(text, ANNOTATE_AS)}")
    return text.strip().lower() == "tracks"


class FunctionError(RuntimeError):
    """A deployed detector function failed or answered something that is not CVAT's detector contract."""


@dataclass
class AnnotateReport:
    task_id: int
    frames: int = 0                  # frames of the task in the range asked
    annotated: int = 0               # frames run through the model and uploaded in this run
    skipped_annotated: int = 0       # only_unannotated: frames a person had annotated
    resumed: int = 0                 # frames an interrupted earlier run had finished
    created: int = 0
    tracks: int = 0                  # tracks created (a video task's predictions), and their keyframes
    keyframes: int = 0
    deleted: int = 0
    unmapped: Counter[str] = field(default_factory=Counter)  # predictions dropped: the task has no such label
    unshared_labels: list[str] = field(default_factory=list)  # model labels the task lacks (known up front)
    seconds: float = 0.0             # from the first frame asked to the last upload done
    model: str = ""                  # what annotated: NAME@VERSION (architecture) or the function's URL
    threshold: str = ""              # what was kept: "with score ≥ 0.5", "at the served thresholds: car ≥ 0.42, ..."
    confidence: dict[int, float] = field(default_factory=dict)  # frame → how sure the model is (``uncertainty``)

    @property
    def frames_per_second(self) -> float:
        return self.annotated / self.seconds if self.seconds > 0 else 0.0

    def add_upload(self, upload: UploadReport) -> None:
        self.created += upload.created
        self.tracks += upload.tracks
        self.keyframes += upload.keyframes
        self.deleted += upload.deleted
        self.unmapped.update(upload.unmapped)


def resolve_detector(model: Detector | str, store: str | os.PathLike | None = None,
                     device: str | None = None) -> Detector:
    """A detector, or a reference to one as ``preannotate serve --model`` takes it (a name in the store, its
    ``NAME@VERSION``, an architecture or an artifact directory)."""
    return model if not isinstance(model, str) else load_model(model, store, device)


def annotate_task(client: Client, task_id: int, *, detector: Detector | str | None = None,
                  function_url: str | None = None, threshold: float | None = None, frames: range | None = None,
                  only_unannotated: bool = False, batch_size: int = 4, upload_every: int = 200,
                  state_dir: str | os.PathLike | None = None, progress: bool = True,
                  label_map: Mapping[str, str] | str | None = None, replace: bool = False,
                  store: str | os.PathLike | None = None, device: str | None = None, workers: int = 2,
                  quality: str = "original", cache_dir: str | os.PathLike | None = None,
                  prefetch: int = 2, confidence_tags: bool = True,
                  before_write: Callable[[], None] | None = None, as_tracks: bool | None = None,
                  linker: Callable[[float], tracking.Linker] = tracking.ByteTrackLinker) -> AnnotateReport:
    """Pre-annotate task ``task_id`` with ``detector`` (or a deployed function at ``function_url``).

    ``threshold``: minimum score for every label (default: each label's served threshold, ``Manifest.threshold_of``;
    for a function, the function's). ``frames``: a range of task frames (default all; deleted frames are skipped).
    ``only_unannotated``: leave frames that have a shape or a track someone made (any source but ``auto``).
    ``label_map``: ``model=task`` label renames; predictions whose label the task lacks are counted in ``unmapped``.
    ``replace``: replace every shape on the frames annotated, not only earlier ``auto`` ones. ``batch_size``: frames
    per forward pass; 4 pays on the CPU too (on 2 cores SSDlite runs about 1.3x as fast as frame by frame, Faster
    R-CNN about 1.05x). ``state_dir``: where the resume journal lives (see ``upload.default_state_dir``).
    ``confidence_tags``: score every frame's uncertainty (``preannotate.uncertainty``; near misses are asked for
    too) and write it as the frame's confidence tag (``cvat.review``, the label added when missing).
    ``before_write``: run before each batch is written; what it raises stops the run there (``upload.TaskWriter``).
    ``as_tracks``: link each job's detections into tracks (``preannotate.tracking``; a frame left out by
    ``only_unannotated`` hides them) rather than write per-frame shapes; default: tracks for a video task, shapes
    for an image task. ``linker``: makes each job's ``tracking.Linker`` from the lowest served threshold (the
    detections it is handed passed their label's). Returns what was done; ``CvatError`` for server problems."""
    if (detector is None) == (function_url is None):
        raise ValueError("give a detector (or model reference) or a function_url, not both")
    if threshold is not None and not 0 <= threshold <= 1:
        raise ValueError(f"threshold must be between 0 and 1, got {threshold}")
    model = resolve_detector(detector, store, device) if detector is not None else None
    if confidence_tags:
        review.ensure_confidence_label(client, task_id)
    writer = TaskWriter(client, task_id, label_map=label_map, replace=replace, before_write=before_write)
    report = AnnotateReport(task_id)
    as_tracks = writer.is_video if as_tracks is None else as_tracks
    wanted = [f for f in writer.frames() if frames is None or f in frames]
    covered = list(wanted)  # a track's frames: those a person annotated too (it is hidden there)
    if frames is not None and not wanted:
        raise CvatError(f"task {task_id} has frames 0-{writer.meta.size - 1}: frames {frames.start}-{frames.stop - 1} "
                        "are none of them")
    report.frames = len(wanted)
    if only_unannotated:
        human = writer.human_frames()
        report.skipped_annotated = sum(f in human for f in wanted)
        wanted = [f for f in wanted if f not in human]
    if model is not None:
        report.unshared_labels = writer.unshared(label.name for label in model.labels)
        identity = ["model", model.manifest.name, model.manifest.version, model.manifest.architecture,
                    model.manifest.created]
        report.model = f"{model.manifest.name or model.manifest.architecture}@{model.manifest.version} " \
                       f"({model.manifest.architecture})"
    else:
        identity = ["function", function_url]
        report.model = function_url
    threshold_of, lowest = _thresholds(model, threshold, confidence_tags)
    report.threshold = ("at the function's own thresholds" if threshold_of is None else
                        threshold_text({label.name: threshold_of(label.name) for label in model.labels})
                        if model is not None else threshold_text({"": lowest}))
    asked = uncertainty.candidate_threshold(lowest) if confidence_tags else lowest
    if report.unshared_labels:
        log.warning("task %d has no label %s: those predictions are not written", task_id,
                    ", ".join(report.unshared_labels))
    journal = Journal.open(state_dir, client, task_id, digest(identity, threshold, writer.label_map, replace,
                                                               confidence_tags, *(["tracks"] if as_tracks else [])))
    report.resumed = sum(f in journal.frames for f in wanted)
    todo = [f for f in wanted if f not in journal.frames]
    jobs = _track_jobs(writer, todo, covered) if as_tracks else {}

    images = CvatFrames(client, task_id, quality=quality, cache_dir=cache_dir, prefetch=prefetch)
    started = time.perf_counter()
    with _Uploader(writer, journal, report) as uploader, \
            tqdm(total=len(wanted), initial=report.resumed, unit="frame", desc=f"task {task_id}",
                 disable=not progress) as bar:
        if model is not None:
            predictions = _detect(model, _ahead(images.decoded(todo)), batch_size, asked)
        else:
            predictions = _call_function(function_url, _ahead(images.encoded(todo)), asked, workers)
        pending: dict[int, list[Shape]] = {}
        confidence: dict[int, float] = {}
        with closing(predictions):  # on an error: stop the downloads and the decoding thread at once
            for frame, candidates, novelty in predictions:
                if confidence_tags:
                    confidence[frame] = report.confidence[frame] = _confidence(candidates, threshold_of, novelty)
                if threshold_of is not None:  # each label at its own threshold, as uncertainty.kept keeps them
                    candidates = [shape for shape in candidates
                                  if shape.score is None or shape.score >= threshold_of(shape.label)]
                pending[frame] = candidates
                bar.update(1)
                if frame in jobs:  # the job's last frame: its tracks are complete
                    uploader.put(*_as_tracks(pending, *jobs[frame], linker(lowest or 0.0)), confidence=confidence)
                    pending, confidence = {}, {}
                elif not as_tracks and len(pending) >= upload_every:
                    uploader.put(pending, confidence=confidence)
                    pending, confidence = {}, {}
        if pending:
            uploader.put(pending, confidence=confidence)
    report.seconds = time.perf_counter() - started
    report.annotated = len(todo)
    journal.finish()
    if report.unmapped:
        log.warning("task %d: %d predictions had no task label (%s)", task_id, sum(report.unmapped.values()),
                    ", ".join(f"{name} {count}" for name, count in report.unmapped.most_common()))
    return report


def annotate_project(client: Client, project_id: int, *, detector: Detector | str | None = None,
                     store: str | os.PathLike | None = None, device: str | None = None,
                     **options: Any) -> dict[int, AnnotateReport]:
    """``annotate_task`` on every task of a project (the model is loaded once), task by task in id order."""
    with cvat_errors(client, f"project {project_id}"):
        tasks = sorted(task.id for task in client.projects.retrieve(project_id).get_tasks())
    model = resolve_detector(detector, store, device) if detector is not None else None
    return {task_id: annotate_task(client, task_id, detector=model, **options) for task_id in tasks}


def _thresholds(model: Detector | None, threshold: float | None, confidence_tags: bool
                ) -> tuple[Callable[[str], float] | None, float | None]:
    """Each label's threshold and the lowest of them (what to ask the model for): the one given, for every label;
    else the model's served ones (``Manifest.threshold_of``). A deployed function decides with its own (None)
    unless confidence is scored, which needs a threshold: then CVAT's default."""
    if threshold is not None:
        return (lambda _: threshold), threshold
    if model is not None:
        return model.manifest.threshold_of, model.manifest.lowest_threshold()
    if confidence_tags:
        return (lambda _: DEFAULT_FUNCTION_THRESHOLD), DEFAULT_FUNCTION_THRESHOLD
    return None, None


def _confidence(candidates: Sequence[Shape], threshold_of: Callable[[str], float], novelty: float) -> float:
    """``uncertainty.frame_confidence`` with each label judged at its own threshold: the least confident label's
    (the frame's confidence is 1 minus its largest doubt, so the per-label minimum is the same measure)."""
    by_label: dict[str, list[Shape]] = {}
    for shape in candidates:
        by_label.setdefault(shape.label, []).append(shape)
    return min((uncertainty.frame_confidence(shapes, threshold_of(label), novelty)
                for label, shapes in by_label.items()),
               default=uncertainty.frame_confidence([], 1.0, novelty))


# ---------------------------------------------------------------------------------------------------- pipeline

def _track_jobs(writer: TaskWriter, todo: list[int], covered: list[int]) -> dict[int, tuple[list[int], int | None]]:
    """For each job with frames to do: its last frame to do → (the job's frames its tracks cover, the frame after
    them where tracks still seen end: a track left visible would reach every later job, CVAT giving each a piece
    of it; None at the task's end)."""
    present = writer.frames()
    jobs = {}
    for job in writer.job_ranges():
        doing = [f for f in todo if f in job]
        if doing:
            frames = [f for f in covered if f in job]
            jobs[doing[-1]] = (frames, next((f for f in present if f > frames[-1]), None))
    return jobs


def _as_tracks(pending: dict[int, list[Shape]], frames: list[int], close_at: int | None, linker: tracking.Linker
               ) -> tuple[dict[int, list[Shape]], list[Track]]:
    """One job's predictions as (the frames written, with their tags and what is not linked; the tracks)."""
    objects = {f: [s for s in pending.get(f, ()) if tracking.linked(s)] for f in frames}
    tracks = tracking.link(objects, frames, linker=linker, close_at=close_at)
    return {f: [s for s in shapes if not tracking.linked(s)] for f, shapes in pending.items()}, tracks


def _detect(model: Detector, images: Iterator[tuple[int, Any]], batch_size: int, threshold: float
            ) -> Iterator[tuple[int, list[Shape], float]]:
    """``(frame, shapes, novelty)``; a model that cannot say how unfamiliar a frame is gives 0."""
    def run(batch: list[tuple[int, Any]]) -> Iterator[tuple[int, list[Shape], float]]:
        arrays = [image for _, image in batch]
        scored = model.detect_scored(arrays, threshold)
        for (frame, _), (shapes, novelty) in zip(batch, scored, strict=True):
            yield frame, shapes, novelty

    batch: list[tuple[int, Any]] = []
    for item in images:
        batch.append(item)
        if len(batch) >= batch_size:
            yield from run(batch)
            batch = []
    if batch:
        yield from run(batch)


def _call_function(url: str, files: Iterator[tuple[int, bytes]], threshold: float | None, workers: int
                   ) -> Iterator[tuple[int, list[Shape], float]]:
    """POST each frame to a CVAT detector function, ``workers`` at a time, answers in frame order."""
    # A busy Nuclio function answers 503 (no free worker) and a starting one may drop connections: retry those.
    retries = urllib3.Retry(total=4, backoff_factor=0.5, status_forcelist=(502, 503, 504),
                            allowed_methods=None, raise_on_status=False)
    pool = urllib3.PoolManager(maxsize=max(1, workers), retries=retries)

    def call(frame: int, data: bytes) -> list[Shape]:
        body: dict[str, Any] = {"image": base64.b64encode(data).decode("ascii")}
        if threshold is not None:
            body["threshold"] = threshold
        try:
            response = pool.request("POST", url, body=json.dumps(body).encode(),
                                    headers={"Content-Type": "application/json"}, timeout=120.0)
        except urllib3.exceptions.HTTPError as error:
            raise FunctionError(f"the function at {url} did not answer for frame {frame}: {error}") from None
        if response.status != 200:
            raise FunctionError(f"the function at {url} answered {response.status} for frame {frame}: "
                                f"{response.data[:300].decode(errors='replace')}")
        try:
            return contract.response_to_shapes(json.loads(response.data), frame)
        except (ValueError, KeyError, TypeError) as error:
            raise FunctionError(f"the function at {url} answered frame {frame} with something that is not a "
                                f"CVAT detector response: {error}") from None

    try:
        for frame, shapes in _in_order(call, files, workers):
            yield frame, shapes, 0.0  # a function does not say how unfamiliar a frame is
    finally:
        pool.clear()


def _in_order(call: Callable[[int, Any], T], items: Iterable[tuple[int, Any]], workers: int
              ) -> Iterator[tuple[int, T]]:
    """``(key, call(key, value))`` for each item, ``workers`` calls running at once, in the order of the items
    (never more than ``2 * workers`` items read ahead)."""
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="function") as executor:
        running: deque[tuple[int, Future[T]]] = deque()
        try:
            for key, value in items:
                running.append((key, executor.submit(call, key, value)))
                if len(running) >= 2 * max(1, workers):
                    key, future = running.popleft()
                    yield key, future.result()
            while running:
                key, future = running.popleft()
                yield key, future.result()
        finally:
            for _, future in running:
                future.cancel()


_END = object()


def _ahead(items: Iterator[T], depth: int = 4) -> Iterator[T]:
    """The items of ``items``, produced by a background thread up to ``depth`` ahead: fetching and decoding
    frames overlaps with inference. An exception in the producer is raised here."""
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        """False once the consumer has gone."""
        while not stop.is_set():
            try:
                buffer.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    break
            else:
                put(_END)
        except BaseException as error:  # handed to the consumer
            put(error)
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()  # an unfinished frame iterator stops its downloads

    thread = threading.Thread(target=produce, name="frames-ahead", daemon=True)
    thread.start()
    try:
        while (item := buffer.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


class _Uploader:
    """Uploads batches of predictions in a background thread, in order; a bounded queue, so a slow server slows
    inference down rather than piling predictions up in memory. An upload error stops the run at the next put
    (or at the end) with that error; what was uploaded before stays uploaded and journaled."""

    def __init__(self, writer: TaskWriter, journal: Journal, report: AnnotateReport, depth: int = 2):
        self.writer, self.journal, self.report = writer, journal, report
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"upload-task{writer.task_id}", daemon=True)

    def __enter__(self) -> _Uploader:
        self.thread.start()
        return self

    def put(self, batch: dict[int, Sequence[Shape]], tracks: Sequence[Track] = (), *,
            confidence: dict[int, float]) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((batch, tracks, confidence))

    def __exit__(self, exc_type, exc, tb) -> None:
        self.queue.put(None)  # the thread drains the queue (skipping work after an error), so this never blocks long
        self.thread.join()
        if self.error is not None and exc is None:
            raise self.error

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is not None:
                continue
            batch, tracks, confidence = item
            try:
                self.report.add_upload(self.writer.write(batch, confidence, tracks))
                self.journal.add(batch)
            except BaseException as error:  # re-raised in the inference thread
                self.error = error


__all__ = ["AnnotateReport", "CvatError", "FunctionError", "annotate_project", "annotate_task", "resolve_detector"]
