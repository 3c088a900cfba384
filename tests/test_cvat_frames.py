"""CvatFrames: frames by chunk, cached on disk, prefetched, against the CVAT 2.42 double through cvat-sdk."""

from __future__ import annotations

import io
import threading
import zipfile

import numpy as np
import pytest
from PIL import Image
from preannotate.cvat.client import CvatError, connect
from preannotate.cvat.frames import CvatFrames
from preannotate.frames import decode_rgb

from tests import cvat_double as double_module
from tests.conftest import encode, photo, wait_for
from tests.cvat_double import CUT, FIXTURES

cvat_double = double_module.cvat_double
CHUNKS = r"/api/tasks/\d+/data\?.*type=chunk"


@pytest.fixture
def client(cvat_double):
    with connect(cvat_double.base_url, username="admin", password=cvat_double.password) as sdk_client:
        yield sdk_client


@pytest.fixture(autouse=True)
def _fast_retries(monkeypatch):
    monkeypatch.setattr(CvatFrames, "BACKOFF_S", 0.01)


def image_task(double, count: int, chunk_size: int) -> tuple[int, list[bytes]]:
    """A task of ``count`` distinct PNG frames (lossless, so decoded pixels can be compared exactly)."""
    files = [encode(photo(24, 16, seed=i), "PNG") for i in range(count)]
    task_id = double.add_task("frames", [(f"img_{i:02d}.png", data, 24, 16) for i, data in enumerate(files)],
                              [{"name": "car"}], chunk_size=chunk_size)
    return task_id, files


def recorded(name: str) -> list[bytes]:
    with zipfile.ZipFile(FIXTURES / "data" / name) as archive:
        return [archive.read(entry) for entry in archive.namelist()]


def chunk_numbers(double) -> list[tuple[str, int]]:
    return [(r.query["number"], r.status) for r in double.requests if r.query.get("type") == "chunk"]


def test_one_request_per_chunk_touched_then_the_disk_cache(cvat_double, client, tmp_path):
    task_id, files = image_task(cvat_double, 10, chunk_size=4)  # chunks: 0-3, 4-7, 8-9
    frames = CvatFrames(client, task_id, cache_dir=tmp_path)
    assert (frames.size, frames.chunk_size, frames.video) == (10, 4, False)
    assert list(frames.encoded([5, 6])) == [(5, files[5]), (6, files[6])]
    assert chunk_numbers(cvat_double) == [("1", 200)]
    got = list(frames.encoded([9, 0, 5, 1, 8]))  # any order: answered in the order asked
    assert got == [(n, files[n]) for n in (9, 0, 5, 1, 8)]
    assert sorted(chunk_numbers(cvat_double)) == [("0", 200), ("1", 200), ("2", 200)]  # chunk 1 came from disk

    cvat_double.clear_requests()
    again = CvatFrames(client, task_id, cache_dir=tmp_path, prefetch=0)  # a new reader: only the disk cache
    decoded = list(again.decoded(range(10)))
    assert [n for n, _ in decoded] == list(range(10))
    assert all(np.array_equal(array, np.asarray(photo(24, 16, seed=n))) for n, array in decoded)
    assert cvat_double.count("type=chunk") == 0 and cvat_double.count(r"/data/meta") == 1
    assert not list(tmp_path.rglob("*.tmp"))


def test_recorded_chunks_original_and_compressed(cvat_double, client, tmp_path):
    original = CvatFrames(client, 7, cache_dir=tmp_path)
    compressed = CvatFrames(client, 7, quality="compressed", cache_dir=tmp_path)
    assert original.cache_dir != compressed.cache_dir
    assert [data for _, data in original.encoded(range(6))] == recorded(
        "GET_api_tasks_ID_data__type=chunk,number=0,quality=original.zip")
    assert [data for _, data in compressed.encoded(range(6))] == recorded(
        "GET_api_tasks_ID_data__type=chunk,number=0,quality=compressed.zip")
    sharp, soft = dict(original.decoded([0, 1])), dict(compressed.decoded([0, 1]))
    assert [a.shape for a in sharp.values()] == [(64, 96, 3), (60, 80, 3)] == [a.shape for a in soft.values()]
    assert sharp[0].dtype == np.uint8 and not np.array_equal(sharp[0], soft[0])  # re-encoded at quality 70
    assert np.abs(sharp[0].astype(int) - soft[0]).mean() < 10
    assert [r.query["quality"] for r in cvat_double.requests if "type" in r.query] == ["original", "compressed"]
    with pytest.raises(ValueError, match="quality"):
        CvatFrames(client, 7, quality="high")


def test_changed_media_is_not_read_from_a_stale_cache(cvat_double, client, tmp_path):
    task_id, files = image_task(cvat_double, 3, chunk_size=4)
    assert dict(CvatFrames(client, task_id, cache_dir=tmp_path).encoded([0]))[0] == files[0]
    replaced = encode(photo(24, 16, seed=99), "PNG")
    with cvat_double._lock:  # what re-uploading the task's media does on the server
        cvat_double.tasks[task_id].frames[0].data = replaced
        cvat_double.tasks[task_id].chunks_updated_date = "2027-01-01T00:00:00.000000Z"
        cvat_double._chunk_cache.clear()
    assert dict(CvatFrames(client, task_id, cache_dir=tmp_path).encoded([0]))[0] == replaced
    assert cvat_double.count("type=chunk") == 2 and len(list(tmp_path.iterdir())) == 2


def test_cache_dir_from_the_environment(cvat_double, client, tmp_path, monkeypatch):
    monkeypatch.setenv("PREANNOTATE_CACHE", str(tmp_path))
    frames = CvatFrames(client, 8)
    assert frames.cache_dir.parent == tmp_path
    list(frames.encoded([2]))
    assert [p.name for p in frames.cache_dir.iterdir()] == ["000000.zip"]


@pytest.mark.parametrize("status", [500, 502, CUT])
def test_a_failed_chunk_request_is_tried_again(cvat_double, client, tmp_path, status, caplog):
    task_id, files = image_task(cvat_double, 6, chunk_size=4)
    cvat_double.fail_next(r"/api/tasks/\d+/data\?(?=.*type=chunk)(?=.*number=1\b)", status)
    assert list(CvatFrames(client, task_id, cache_dir=tmp_path).encoded(range(6))) == list(enumerate(files))
    statuses = [s for n, s in chunk_numbers(cvat_double) if n == "1"]
    assert statuses[0] == status and statuses[-1] == 200
    ours = [r.getMessage() for r in caplog.records if r.name == "preannotate.cvat.frames"]
    if status != 502:  # urllib3 itself retries 502-504 (the SDK's Retry); 500 and a cut body are ours
        assert ours == [f"chunk 1 of task {task_id} failed ({'ProtocolError' if status == CUT else 500}); "
                        "trying again in 0.01 s"]
    assert not list(tmp_path.rglob("*.tmp"))  # the cut download left nothing behind


def test_a_chunk_that_keeps_failing_gives_a_clear_error(cvat_double, client, tmp_path):
    cvat_double.fail_next(CHUNKS, 500, times=3)
    with pytest.raises(CvatError, match=r"answered 500 Internal Server Error for chunk 0 of task 7$"):
        list(CvatFrames(client, 7, cache_dir=tmp_path).encoded([0]))
    assert chunk_numbers(cvat_double) == [("0", 500)] * 3
    cvat_double.fail_next(CHUNKS, 403, body={"detail": "You do not have permission to perform this action."})
    with pytest.raises(CvatError, match=r"not allowed to access chunk 0 of task 7"):
        list(CvatFrames(client, 7, cache_dir=tmp_path).encoded([0]))
    assert chunk_numbers(cvat_double)[3:] == [("0", 403)]  # a refusal is not tried again
    assert not list(tmp_path.rglob("*.zip*"))


def test_frames_out_of_range_deleted_or_of_an_unknown_task(cvat_double, client, tmp_path):
    frames = CvatFrames(client, 7, cache_dir=tmp_path)
    with pytest.raises(CvatError, match=r"^frame 6 is out of range: task 7 has frames 0\.\.5$"):
        list(frames.encoded([0, 6]))
    with pytest.raises(CvatError, match="frame -1 is out of range"):
        next(frames.decoded([-1]))
    cvat_double.tasks[7].deleted_frames = [2]
    with pytest.raises(CvatError, match=r"^frame 2 of task 7 is deleted$"):
        list(CvatFrames(client, 7, cache_dir=tmp_path).encoded([1, 2]))
    assert cvat_double.count("type=chunk") == 0  # checked before anything is downloaded
    with pytest.raises(CvatError, match=rf"^task 999999 was not found on {cvat_double.base_url}$"):
        CvatFrames(client, 999999, cache_dir=tmp_path)


def test_prefetch_runs_ahead_and_an_early_close_does_not_hang(cvat_double, client, tmp_path):
    task_id, files = image_task(cvat_double, 16, chunk_size=2)  # 8 chunks
    generator = CvatFrames(client, task_id, cache_dir=tmp_path, prefetch=2).encoded(range(16))
    assert next(generator) == (0, files[0])
    # threads fetching from a local server: instant, so a fixed (generous) wait
    wait_for(lambda: cvat_double.count("type=chunk") >= 3, what="chunks 1 and 2")
    assert cvat_double.count("type=chunk") == 3  # chunks 1 and 2 fetched while chunk 0 is being read
    closing = threading.Thread(target=generator.close)  # an early close returns, not after the whole task
    closing.start()
    closing.join(30)
    assert not closing.is_alive(), "closing the frames hung"
    wait_for(lambda: not any(t.name.startswith(f"chunks-task{task_id}") for t in threading.enumerate()),
             what="the prefetch threads to end")
    assert cvat_double.count("type=chunk") == 3  # nothing more was fetched after the close
    assert not list(tmp_path.rglob("*.tmp"))


def video_frames(count: int) -> list[np.ndarray]:
    """Distinct, smooth frames (H.264 keeps them close): a gradient with a box moving 4 px per frame."""
    y, x = np.mgrid[0:48, 0:64]
    frames = []
    for i in range(count):
        array = np.stack([x * 3, y * 4, np.full_like(x, 60 + 10 * i)], axis=-1)
        array[10:30, 4 + 4 * i:24 + 4 * i] = [230, 230, 40]
        frames.append(array.astype(np.uint8))
    return frames


def test_every_reader_of_a_video_tasks_meta_names_and_counts_its_frames_alike(cvat_double, client, tmp_path):
    """A video's meta lists one entry for all its frames: the annotations, the writer, the review ranking and the
    chunk reader all read it through ``cvat.meta.frame_meta`` (the review ranking once named no frame at all)."""
    from preannotate.cvat.reader import read_task
    from preannotate.cvat.review import task_confidences
    from preannotate.cvat.upload import TaskWriter

    task_id = cvat_double.add_task("video", [(f"{i}.png", encode(Image.fromarray(a), "PNG"), 64, 48)
                                             for i, a in enumerate(video_frames(5))],
                                   [{"name": "car"}], chunk_size=4, video="clip.mp4")
    names = [f"frame_{i:06d}" for i in range(5)]
    assert [frame.name for frame in read_task(client, task_id).frames.values()] == names
    writer = TaskWriter(client, task_id)
    assert writer.frame_names() == names and writer.frames() == [0, 1, 2, 3, 4]
    assert task_confidences(client, task_id) == ({}, dict(enumerate(names)))
    assert CvatFrames(client, task_id, cache_dir=tmp_path).size == 5


@pytest.mark.parametrize("quality, tolerance", [("original", 3), ("compressed", 6)])
def test_video_chunks_are_decoded(cvat_double, client, tmp_path, quality, tolerance):
    sources = video_frames(10)
    task_id = cvat_double.add_task("video", [(f"{i}.png", encode(Image.fromarray(a), "PNG"), 64, 48)
                                             for i, a in enumerate(sources)],
                                   [{"name": "car"}], chunk_size=4, video="clip.mp4")
    frames = CvatFrames(client, task_id, quality=quality, cache_dir=tmp_path)
    assert (frames.video, frames.size) == (True, 10)

    def nearest(array: np.ndarray) -> int:
        return int(np.argmin([np.abs(array.astype(int) - source).mean() for source in sources]))

    order = [9, 2, 1, 1, 3, 0, 5]  # backwards within a chunk: the chunk is decoded again from its start
    decoded = list(frames.decoded(order))
    assert [n for n, _ in decoded] == order and [nearest(a) for _, a in decoded] == order
    assert all(a.shape == (48, 64, 3) and np.abs(a.astype(int) - sources[n]).mean() < tolerance
               for n, a in decoded)
    assert sorted(chunk_numbers(cvat_double)) == [("0", 200), ("1", 200), ("2", 200)]
    assert all(r.query["quality"] == quality for r in cvat_double.requests if r.query.get("type") == "chunk")
    assert list(tmp_path.rglob("*.mp4"))

    encoded = dict(frames.encoded([4, 7]))  # JPEG (quality 95) of the decoded frame, from the disk cache
    assert all(Image.open(io.BytesIO(data)).format == "JPEG" for data in encoded.values())
    assert [nearest(decode_rgb(encoded[n])) for n in (4, 7)] == [4, 7]
    assert cvat_double.count("type=chunk") == 3
