"""The CVAT 2.42 test double answers like the recordings, for raw HTTP and for the real cvat-sdk client."""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import io
import json
import logging
import re
import socket
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import urllib3
from cvat_sdk import make_client, models
from cvat_sdk.api_client import exceptions
from cvat_sdk.core.proxies.annotations import AnnotationUpdateAction
from PIL import Image

from tests import cvat_double as double_module
from tests.conftest import encode, photo
from tests.cvat_double import FIXTURES, RECORDED_BASE, CvatDouble, load_fixture

cvat_double = double_module.cvat_double  # the fixture: a started double with the recorded state, fresh per test

# cvat-sdk 2.80 warns (through logging) that server 2.42 is outside its supported range: expected here.
logging.getLogger("cvat_sdk").setLevel(logging.ERROR)

_http = urllib3.PoolManager()


def call(double: CvatDouble, method: str, target: str, body: object = None, *, auth: str | None = "basic",
         headers: dict[str, str] | None = None) -> tuple[int, urllib3.HTTPHeaderDict, bytes]:
    """One raw request, as python-requests would send it (Accept: the CVAT type, gzip accepted)."""
    sent = {"Accept": "application/vnd.cvat+json", "Accept-Encoding": "gzip, deflate"}
    if auth == "basic":
        sent["Authorization"] = "Basic " + base64.b64encode(f"admin:{double.password}".encode()).decode()
    if body is not None:
        sent["Content-Type"] = "application/json"
    sent.update(headers or {})
    response = _http.request(method, double.base_url + target, headers=sent,
                             body=None if body is None else json.dumps(body).encode())
    return response.status, response.headers, response.data  # headers: case-insensitive, repeated ones joined


def rebased(double: CvatDouble, relative: str) -> object:
    """A recorded body with its absolute URLs pointing at the double."""
    return json.loads((FIXTURES / relative).read_text().replace(RECORDED_BASE, double.base_url))


@pytest.fixture(autouse=True)
def _double_raised_nothing(cvat_double: CvatDouble):
    yield
    assert cvat_double.errors == []  # an exception inside the double is answered with 500 and kept here


@pytest.fixture
def client(cvat_double: CvatDouble):
    with make_client(cvat_double.base_url, credentials=cvat_double.credentials) as sdk_client:
        yield sdk_client


# ------------------------------------------------------------------ raw HTTP against the recordings

@pytest.mark.parametrize("target, recording", [
    ("/api/server/about", "api/GET_api_server_about.json"),
    ("/api/users/self", "api/GET_api_users_self.json"),
    ("/api/projects/6", "api/GET_api_projects_ID.json"),
    ("/api/tasks/7", "api/GET_api_tasks_ID.json"),
    ("/api/tasks/8", "api/GET_api_tasks_ID.standalone.json"),
    ("/api/tasks?project_id=6", "api/GET_api_tasks__project_id=ID.json"),
    ("/api/jobs?task_id=7", "api/GET_api_jobs__task_id=ID.json"),
    ("/api/jobs?task_id=8", "api/GET_api_jobs__task_id=ID.standalone.json"),
    ("/api/jobs/7", "api/GET_api_jobs_ID.job1.json"),
    ("/api/jobs/8", "api/GET_api_jobs_ID.job2.json"),
    ("/api/labels?project_id=6", "api/GET_api_labels__project_id=ID.json"),
    ("/api/labels?task_id=7", "api/GET_api_labels__task_id=ID.json"),
    ("/api/labels?job_id=7", "api/GET_api_labels__job_id=ID.job1.json"),
    ("/api/labels?task_id=8", "api/GET_api_labels__task_id=ID.standalone.json"),
    ("/api/labels?project_id=6&page_size=2", "api/GET_api_labels__project_id=ID,page_size=2.page1.json"),
    ("/api/labels?project_id=6&page_size=2&page=3", "api/GET_api_labels__project_id=ID,page_size=2,page=3.json"),
    ("/api/labels/18", "api/GET_api_labels_ID.car.json"),
    ("/api/tasks/7/data/meta", "api/GET_api_tasks_ID_data_meta.json"),
    ("/api/tasks/8/data/meta", "api/GET_api_tasks_ID_data_meta.standalone.json"),
    ("/api/jobs/7/data/meta", "api/GET_api_jobs_ID_data_meta.job1.json"),
    ("/api/jobs/8/data/meta", "api/GET_api_jobs_ID_data_meta.job2.json"),
    ("/api/tasks/7/annotations", "api/GET_api_tasks_ID_annotations.json"),
    ("/api/tasks/8/annotations", "api/GET_api_tasks_ID_annotations.standalone.json"),
    ("/api/jobs/7/annotations", "api/GET_api_jobs_ID_annotations.job1.json"),
    ("/api/jobs/8/annotations", "api/GET_api_jobs_ID_annotations.job2.json"),
])
def test_get_bodies_equal_the_recordings(cvat_double, target, recording):
    status, headers, body = call(cvat_double, "GET", target)
    assert status == 200
    assert headers["content-type"] == "application/vnd.cvat+json"
    # Exact, order included: e.g. the task view adds the closing outside shape (id 9 twice) to track 4.
    assert json.loads(body) == rebased(cvat_double, recording)


@pytest.mark.parametrize("method, target, recording, status, extra", [
    ("GET", "/api/tasks", "errors/GET_api_tasks.no_auth.json", 401, {"auth": None}),
    ("GET", "/api/tasks/7", "errors/GET_api_tasks_ID.no_auth.json", 401, {"auth": None}),
    ("GET", "/api/tasks", "errors/GET_api_tasks.bad_password_basic_auth.json", 401,
     {"auth": None, "headers": {"Authorization": "Basic " + base64.b64encode(b"admin:wrong").decode()}}),
    ("GET", "/api/tasks", "errors/GET_api_tasks.invalid_token.json", 401,
     {"auth": None, "headers": {"Authorization": "Token " + "0" * 40}}),
    ("GET", "/api/server/about", "errors/GET_api_server_about.accept_application_json.json", 406,
     {"headers": {"Accept": "application/json"}}),
    ("GET", "/api/tasks/999999", "errors/GET_api_tasks_ID.bad_task_id_999999.json", 404, {}),
    ("GET", "/api/jobs/999999", "errors/GET_api_jobs_ID.bad_job_id_999999.json", 404, {}),
    ("GET", "/api/tasks/999999/annotations", "errors/GET_api_tasks_ID_annotations.bad_task_id_999999.json", 404, {}),
    ("GET", "/api/tasks/7/data", "errors/GET_api_tasks_ID_data__no_type.json", 400, {}),
    ("GET", "/api/tasks/7/data?type=chunk&number=99&quality=compressed",
     "errors/GET_api_tasks_ID_data__type=chunk,number=99.json", 400, {}),
    ("GET", "/api/tasks/7/data?type=frame&number=6&quality=original",
     "errors/GET_api_tasks_ID_data__type=frame,number=6,quality=original.json", 400, {}),
    ("GET", "/api/tasks/7/data?type=frame&number=99&quality=original",
     "errors/GET_api_tasks_ID_data__type=frame,number=99.json", 400, {}),
    ("PATCH", "/api/jobs/7", "errors/PATCH_api_jobs_ID.bad_state_value.json", 400, {}),
    ("PATCH", "/api/tasks/7/annotations", "errors/PATCH_api_tasks_ID_annotations__no_action.json", 400, {}),
    *[("PATCH", f"/api/tasks/{task}/annotations?action=create",
       f"errors/PATCH_api_tasks_ID_annotations__action=create.{case}.json", 400, {})
      for task, case in [(8, "label_of_other_project"), (7, "malformed_points_rectangle_3_values"),
                         (7, "malformed_points_string"), (7, "mask_too_few_points"), (7, "unknown_attribute_spec_id"),
                         (7, "unknown_label_id")]],
])
def test_error_bodies_equal_the_recordings(cvat_double, method, target, recording, status, extra):
    request_file = FIXTURES / recording.replace(".json", ".request.json")
    body = json.loads(request_file.read_text()) if request_file.exists() else None
    got_status, headers, got = call(cvat_double, method, target, body, **extra)
    assert (got_status, json.loads(got)) == (status, load_fixture(recording))
    assert headers["content-type"] == "application/vnd.cvat+json"
    if status == 401:
        assert headers["www-authenticate"] == "Token"


def test_headers_gzip_and_request_log(cvat_double):
    status, headers, body = call(cvat_double, "GET", "/api/tasks/7")
    assert status == 200 and headers["content-encoding"] == "gzip"  # decoded by urllib3, as by the SDK
    assert headers["vary"] == "Accept, Accept-Encoding, Origin, Cookie" and headers["x-frame-options"] == "DENY"
    assert headers["allow"] == "GET, PATCH, DELETE, HEAD, OPTIONS" and re.fullmatch(r"[0-9a-f-]{36}",
                                                                                    headers["x-request-id"])
    _, small_headers, _ = call(cvat_double, "GET", "/api/tasks/999999")
    assert "content-encoding" not in small_headers  # bodies under 200 bytes go out as they are
    assert [(r.method, r.path, r.status) for r in cvat_double.requests] == [
        ("GET", "/api/tasks/7", 200), ("GET", "/api/tasks/999999", 404)]
    assert cvat_double.count(r"^/api/tasks/\d+$") == 2


def test_token_login_and_logout(cvat_double):
    status, headers, body = call(cvat_double, "POST", "/api/auth/login",
                                 {"username": "admin", "password": cvat_double.password}, auth=None)
    key = json.loads(body)["key"]
    assert status == 200 and set(json.loads(body)) == set(load_fixture("api/POST_api_auth_login.json"))
    assert re.fullmatch(r"[0-9a-f]{40}", key)
    assert re.findall(r"(?:^|, )(\w+)=", headers["set-cookie"]) == ["csrftoken", "sessionfresh", "sessionid"]
    token = {"Authorization": f"Token {key}"}
    assert call(cvat_double, "GET", "/api/users/self", auth=None, headers=token)[0] == 200
    assert call(cvat_double, "POST", "/api/auth/logout", auth=None, headers=token)[0] == 200
    status, _, body = call(cvat_double, "GET", "/api/users/self", auth=None, headers=token)
    assert (status, json.loads(body)) == (401, {"detail": "Invalid token."})


def test_session_writes_need_the_csrf_header(cvat_double):
    _, headers, _ = call(cvat_double, "POST", "/api/auth/login",
                         {"username": "admin", "password": cvat_double.password}, auth=None)
    cookies = dict(re.findall(r"(csrftoken|sessionid)=([^;]+)", headers["set-cookie"]))
    cookie = {"Cookie": f"csrftoken={cookies['csrftoken']}; sessionid={cookies['sessionid']}"}
    assert call(cvat_double, "GET", "/api/jobs/7", auth=None, headers=cookie)[0] == 200
    assert call(cvat_double, "PATCH", "/api/jobs/7", {"state": "new"}, auth=None, headers=cookie)[0] == 403
    with_csrf = {**cookie, "X-CSRFToken": cookies["csrftoken"]}
    assert call(cvat_double, "PATCH", "/api/jobs/7", {"state": "new"}, auth=None, headers=with_csrf)[0] == 200


def test_job_chunk_and_frames_equal_the_recorded_bytes(cvat_double):
    status, headers, body = call(cvat_double, "GET", "/api/jobs/8/data?type=chunk&index=0&quality=original")
    recorded = zipfile.ZipFile(FIXTURES / "data/GET_api_jobs_ID_data__type=chunk,index=0,quality=original.job2.zip")
    served = zipfile.ZipFile(io.BytesIO(body))
    assert status == 200 and headers["content-type"] == "application/zip" and "x-checksum" in headers
    assert headers["x-updated-date"] == "2026-11-21T21:07:34.121994Z"
    assert served.namelist() == recorded.namelist() == ["000000.jpg", "000001.jpg", "000002.jpg"]
    assert [served.read(n) for n in served.namelist()] == [recorded.read(n) for n in recorded.namelist()]
    assert all(info.compress_type == zipfile.ZIP_STORED for info in served.infolist())
    status, headers, body = call(cvat_double, "GET", "/api/tasks/8/data?type=frame&number=0&quality=original")
    assert (status, headers["content-type"]) == (200, "image/png")
    assert body == (FIXTURES / "data/GET_api_tasks_ID_data__type=frame,number=0,quality=original.standalone.png"
                    ).read_bytes()
    status, headers, body = call(cvat_double, "GET", "/api/tasks/7/data?type=frame&number=0&quality=compressed")
    assert (status, headers["content-type"]) == (200, "image/jpeg")
    assert body == (FIXTURES / "data/GET_api_tasks_ID_data__type=frame,number=0,quality=compressed.jpg").read_bytes()


def test_job_state_and_stage_derive_the_status(cvat_double):
    status, _, body = call(cvat_double, "PATCH", "/api/jobs/8", {"stage": "annotation"})
    assert (status, json.loads(body)["status"]) == (200, "annotation")
    _, _, body = call(cvat_double, "PATCH", "/api/jobs/8",
                      load_fixture("api/PATCH_api_jobs_ID.job2.stage=acceptance.request.json"))
    recorded = rebased(cvat_double, "api/PATCH_api_jobs_ID.job2.stage=acceptance.json")
    assert {**json.loads(body), "updated_date": None} == {**recorded, "updated_date": None}
    call(cvat_double, "PATCH", "/api/jobs/8", {"state": "completed"})
    task = json.loads(call(cvat_double, "GET", "/api/tasks/7")[2])
    assert (task["jobs"]["completed"], task["status"]) == (1, "annotation")  # job 7 is still in stage annotation
    call(cvat_double, "PATCH", "/api/jobs/7", {"stage": "acceptance"})
    assert json.loads(call(cvat_double, "GET", "/api/tasks/7")[2])["status"] == "completed"


def test_write_responses_match_the_recorded_shapes(cvat_double):
    """Replays the recorded PATCH create and PUT bodies without the rectangle track that spans both jobs (the
    double does not cut tracks at job boundaries); tags, shapes and the polygon track answer as recorded."""
    request = load_fixture("api/PATCH_api_tasks_ID_annotations__action=create.request.json")
    request["tracks"] = [t for t in request["tracks"] if t["label_id"] == 19]

    def without_ids(data: dict, kind: str) -> list:
        return [{**o, "id": None, **({"shapes": [{**s, "id": None} for s in o["shapes"]]} if "shapes" in o else {})}
                for o in data[kind]]

    for method, target, recording in [
        ("PATCH", "/api/tasks/7/annotations?action=create", "api/PATCH_api_tasks_ID_annotations__action=create.json"),
        ("PUT", "/api/tasks/7/annotations", "api/PUT_api_tasks_ID_annotations.json"),
    ]:
        status, _, body = call(cvat_double, method, target, request)
        got, recorded = json.loads(body), load_fixture(recording)
        recorded["tracks"] = [t for t in recorded["tracks"] if t["label_id"] == 19]
        assert status == 200 and got["version"] == 0
        for kind in ("tags", "shapes", "tracks"):
            assert without_ids(got, kind) == without_ids(recorded, kind), kind
        ids = [s["id"] for s in got["shapes"]]
        assert ids == list(range(ids[0], ids[0] + 10))  # handed out job by job, in request order
    stored = json.loads(call(cvat_double, "GET", "/api/tasks/7/annotations")[2])
    assert len(stored["shapes"]) == 10 and len(stored["tags"]) == 1  # PUT replaced the creates
    assert stored["shapes"][0]["attributes"] == [{"spec_id": 1, "value": "red"}, {"spec_id": 2, "value": "false"}]
    assert stored["shapes"][3]["points"][0] == 3.0 and isinstance(stored["shapes"][3]["points"][0], float)


def test_job_update_replays_the_recorded_save(cvat_double):
    status, _, body = call(cvat_double, "PATCH", "/api/jobs/7/annotations?action=update",
                           load_fixture("api/PATCH_api_jobs_ID_annotations__action=update.job1.request.json"))
    recorded = load_fixture("api/PATCH_api_jobs_ID_annotations__action=update.job1.json")
    assert (status, json.loads(body)) == (200, recorded)
    status, _, body = call(cvat_double, "GET", "/api/jobs/7/annotations")
    assert json.loads(body) == load_fixture("api/GET_api_jobs_ID_annotations.job1.json")


# ------------------------------------------------------------------ the real cvat-sdk client

def test_sdk_task_labels_meta_and_jobs(cvat_double, client):
    task = client.tasks.retrieve(7)
    recorded = load_fixture("api/GET_api_tasks_ID.json")
    for key in ("id", "name", "project_id", "size", "segment_size", "data_chunk_size", "image_quality", "status",
                "data_original_chunk_type", "data_compressed_chunk_type"):
        assert str(getattr(task, key)) == str(recorded[key]), key
    assert task.url == f"{cvat_double.base_url}/api/tasks/7" and task.jobs.count == 2

    labels = task.get_labels()
    assert [(label.id, label.name, str(label.type)) for label in labels] == [
        (18, "car", "rectangle"), (19, "person", "polygon"), (20, "road", "mask"), (21, "sign", "any"),
        (22, "daytime", "tag")]
    car = labels[0]
    assert [(a.id, a.name, a.mutable, a.default_value) for a in car.attributes] == [
        (1, "color", False, "red"), (2, "parked", True, "false")]

    frames = task.get_meta().frames
    assert [(f.name, f.width, f.height) for f in frames] == [
        (f"frame_{i:02d}.jpg", 96 if i % 2 == 0 else 80, 64 if i % 2 == 0 else 60) for i in range(6)]
    assert [(j.id, j.start_frame, j.stop_frame, str(j.status)) for j in task.get_jobs()] == [
        (8, 3, 5, "validation"), (7, 0, 2, "annotation")]
    assert [f.name for f in client.jobs.retrieve(8).get_meta().frames] == ["frame_03.jpg", "frame_04.jpg",
                                                                            "frame_05.jpg"]
    assert client.projects.retrieve(6).name == "fixtures-project"


def test_sdk_download_chunk_and_frame(cvat_double, client):
    task = client.tasks.retrieve(7)
    buffer = io.BytesIO()
    task.download_chunk(0, buffer, quality="original")
    with zipfile.ZipFile(buffer) as chunk:
        sizes = [Image.open(io.BytesIO(chunk.read(name))).size for name in chunk.namelist()]
        assert chunk.namelist() == [f"{i:06d}.jpg" for i in range(6)]
    assert sizes == [(96, 64), (80, 60)] * 3
    with zipfile.ZipFile(FIXTURES / "data/GET_api_tasks_ID_data__type=chunk,number=0,quality=compressed.zip") as rec:
        recorded = [rec.read(name) for name in rec.namelist()]
    buffer = io.BytesIO()
    task.download_chunk(0, buffer, quality="compressed")
    with zipfile.ZipFile(buffer) as chunk:
        assert chunk.namelist() == [f"{i:06d}.jpeg" for i in range(6)]
        assert [chunk.read(name) for name in chunk.namelist()] == recorded
    assert Image.open(task.get_frame(1, quality="original")).size == (80, 60)
    assert cvat_double.count(r"type=chunk") == 2 and cvat_double.count(r"type=frame") == 1


def test_sdk_annotations_crud(cvat_double, client):
    task = client.tasks.retrieve(7)
    recorded = load_fixture("api/GET_api_tasks_ID_annotations.json")

    def shapes() -> list[dict]:
        return sorted((s.to_dict() for s in task.get_annotations().shapes), key=lambda s: s["id"])

    assert shapes() == sorted(recorded["shapes"], key=lambda s: s["id"])
    assert [t.id for t in task.get_annotations().tracks] == [4, 5, 6]

    task.update_annotations(models.PatchedLabeledDataRequest(shapes=[
        models.LabeledShapeRequest(type="rectangle", frame=5, label_id=18, points=[1, 2, 30, 40], source="auto"),
        models.LabeledShapeRequest(type="polygon", frame=0, label_id=19, points=[1, 1, 9, 1, 5, 8]),
    ]), action=AnnotationUpdateAction.CREATE)
    created = [s for s in shapes() if s["id"] >= 100]
    assert [(s["id"], s["type"], s["frame"], s["source"]) for s in created] == [
        (100, "polygon", 0, "manual"), (101, "rectangle", 5, "auto")]  # ids job by job: frame 0 first
    assert created[1]["points"] == [1.0, 2.0, 30.0, 40.0]
    assert created[1]["attributes"] == [{"spec_id": 1, "value": "red"}, {"spec_id": 2, "value": "false"}]

    task.remove_annotations(ids=[88, 101])
    assert {s["id"] for s in shapes()} == {s["id"] for s in recorded["shapes"]} - {88} | {100}

    task.set_annotations(models.LabeledDataRequest(shapes=[
        models.LabeledShapeRequest(type="rectangle", frame=2, label_id=18, points=[0, 0, 5, 5])]))
    annotations = task.get_annotations()
    assert ([(s.id, s.frame) for s in annotations.shapes], annotations.tags, annotations.tracks) == ([(102, 2)], [], [])

    client.jobs.retrieve(8).update_annotations(models.PatchedLabeledDataRequest(shapes=[
        models.LabeledShapeRequest(type="points", frame=4, label_id=21, points=[3, 3])]),
        action=AnnotationUpdateAction.CREATE)
    assert [s.id for s in client.jobs.retrieve(7).get_annotations().shapes] == [102]
    assert [s.id for s in client.jobs.retrieve(8).get_annotations().shapes] == [103]
    task.remove_annotations()
    assert task.get_annotations().shapes == []


def test_sdk_errors(cvat_double, client):
    with pytest.raises(exceptions.NotFoundException) as error:
        client.tasks.retrieve(999999)
    assert error.value.status == 404 and json.loads(error.value.body) == {"detail": "No Task matches the given query."}
    with pytest.raises(exceptions.ApiException) as error:  # session login: the login endpoint rejects with 400
        make_client(cvat_double.base_url, credentials=("admin", "wrong"))
    assert error.value.status == 400
    with make_client(cvat_double.base_url) as basic:  # HTTP Basic through the SDK configuration: 401
        basic.api_client.configuration.username, basic.api_client.configuration.password = "admin", "wrong"
        with pytest.raises(exceptions.UnauthorizedException) as error:
            basic.tasks.retrieve(7)
    assert json.loads(error.value.body) == load_fixture("errors/GET_api_tasks.bad_password_basic_auth.json")
    with pytest.raises(exceptions.ApiException) as error:
        client.tasks.retrieve(7).update_annotations(models.PatchedLabeledDataRequest(shapes=[
            models.LabeledShapeRequest(type="rectangle", frame=0, label_id=23, points=[0, 0, 1, 1])]),
            action=AnnotationUpdateAction.CREATE)
    assert (error.value.status, json.loads(error.value.body)) == (400, ["label_id `23` is invalid"])


def test_sdk_session_login_and_logout(cvat_double, client):
    assert {"sessionid", "csrftoken"} <= set(client.api_client.cookies)  # client.login() used the session
    assert client.users.retrieve_current_user().username == "admin"
    client.logout()  # a POST: passes only with the X-CSRFToken header the SDK copies from the cookie
    with pytest.raises(exceptions.UnauthorizedException) as error:
        client.tasks.retrieve(7)
    assert json.loads(error.value.body) == load_fixture("errors/GET_api_tasks_ID.no_auth.json")


def test_fault_injection_fails_one_chunk_request(cvat_double, client):
    task = client.tasks.retrieve(7)
    cvat_double.fail_next(r"/api/tasks/7/data\?.*type=chunk", status=500)
    with pytest.raises(exceptions.ApiException) as error:
        task.download_chunk(0, io.BytesIO(), quality="original")
    assert error.value.status == 500
    buffer = io.BytesIO()
    task.download_chunk(0, buffer, quality="original")
    assert len(zipfile.ZipFile(buffer).namelist()) == 6
    assert [r.status for r in cvat_double.requests if "type" in r.query] == [500, 200]


def test_synthetic_300_frame_task_is_served_by_chunks(cvat_double, client):
    frames = [(f"img_{i:03d}.jpg", encode(photo(16, 12, seed=i)), 16, 12) for i in range(300)]
    task_id = cvat_double.add_task("synthetic", frames, [
        {"name": "car", "type": "rectangle", "attributes": [
            {"name": "parked", "input_type": "checkbox", "values": ["false"], "mutable": True}]},
        {"name": "person"}], segment_size=100, chunk_size=72, annotations={"shapes": [
            {"type": "rectangle", "frame": 250, "label_id": 25, "points": [1, 1, 5, 5]}]})
    cvat_double.clear_requests()
    task = client.tasks.retrieve(task_id)
    assert (task.size, task.segment_size, task.data_chunk_size, task.jobs.count) == (300, 100, 72, 3)
    assert [(j.start_frame, j.stop_frame) for j in task.get_jobs()] == [(200, 299), (100, 199), (0, 99)]
    assert [label.name for label in task.get_labels()] == ["car", "person"]
    assert task.get_labels()[0].attributes[0].default_value == "false"
    assert len(task.get_meta().frames) == 300

    counts = []
    for number in range(5):  # ceil(300 / 72) chunks: 72, 72, 72, 72, 12 frames
        buffer = io.BytesIO()
        task.download_chunk(number, buffer, quality="original")
        with zipfile.ZipFile(buffer) as chunk:
            counts.append(len(chunk.namelist()))
            if number == 4:
                assert chunk.read("000011.jpg") == frames[299][1]
    assert counts == [72, 72, 72, 72, 12]
    buffer = io.BytesIO()
    task.download_chunk(4, buffer, quality="compressed")  # re-encoded JPEGs, made on demand
    assert Image.open(io.BytesIO(zipfile.ZipFile(buffer).read("000000.jpeg"))).size == (16, 12)
    with pytest.raises(exceptions.ApiException) as error:
        task.download_chunk(5, io.BytesIO())
    assert json.loads(error.value.body) == "Invalid chunk number '5'. The chunk number should be in the [0, 4] range"
    assert cvat_double.count(r"type=chunk") == 7 and cvat_double.count(r"type=frame") == 0

    shapes = task.get_annotations().shapes
    assert [(s.frame, s.attributes[0].value) for s in shapes] == [(250, "false")]
    job = next(j for j in task.get_jobs() if j.start_frame == 200)
    assert [s.frame for s in job.get_annotations().shapes] == [250]
    sizes = [len(zipfile.ZipFile(io.BytesIO(call(cvat_double, "GET", f"/api/jobs/{job.id}/data?type=chunk&index={i}"
                                                              "&quality=original")[2])).namelist()) for i in (0, 1)]
    assert sizes == [72, 28]  # job chunks count from the job's first frame


def test_add_task_in_a_project_and_invalid_seed_annotations(cvat_double):
    frame = ("a.png", encode(photo(8, 6), "PNG"), 8, 6)
    task_id = cvat_double.add_task("in-project", [frame] * 4, project_id=6, annotations={"tags": [
        {"frame": 3, "label_id": cvat_double.label_id(7, "daytime")}]})
    assert cvat_double.label_id(task_id, "car") == 18 and cvat_double.annotations(task_id)["tags"][0]["id"] == 9
    assert json.loads(call(cvat_double, "GET", "/api/projects/6")[2])["tasks"]["count"] == 2
    status, headers, _ = call(cvat_double, "GET", f"/api/tasks/{task_id}/data?type=frame&number=0&quality=original")
    assert (status, headers["content-type"]) == (200, "image/png")
    with pytest.raises(ValueError, match="label_id `18` is invalid"):
        cvat_double.add_task("bad", [frame], [{"name": "cat"}], annotations={"shapes": [
            {"type": "rectangle", "frame": 0, "label_id": 18, "points": [0, 0, 1, 1]}]})
    assert [t["name"] for t in json.loads(call(cvat_double, "GET", "/api/tasks")[2])["results"]] == [
        "in-project", "fixtures-standalone", "fixtures-images"]


# ------------------------------------------------------------------ projects and their labels

def shape_of(value: object) -> object:
    """The key structure of a JSON value with its leaves replaced by their type names (None: "NoneType")."""
    if isinstance(value, dict):
        return {key: shape_of(item) for key, item in value.items()}
    if isinstance(value, list):
        return [shape_of(item) for item in value]
    return type(value).__name__


def frames_of(count: int, width: int = 16, height: int = 12) -> list:
    return [(f"img_{i:02d}.jpg", encode(photo(width, height, seed=i)), width, height) for i in range(count)]


VEHICLE_LABELS = [
    {"name": "car", "type": "rectangle", "attributes": [
        {"name": "color", "input_type": "select", "values": ["red", "blue"], "default_value": "red"},
        {"name": "parked", "input_type": "checkbox", "values": ["false"], "mutable": True}]},
    {"name": "person", "type": "polygon"},
    {"name": "junk", "type": "any"},
]
CONFIDENCE = {"name": "confidence", "input_type": "number", "values": ["0", "100", "1"], "mutable": True}


def test_add_project_is_served_like_the_recorded_project(cvat_double, client):
    project_id = cvat_double.add_project("vehicles", VEHICLE_LABELS)
    assert project_id == 9  # after the recorded projects 6, 7 and 8
    status, _, body = call(cvat_double, "GET", f"/api/projects/{project_id}")
    record = json.loads(body)
    assert status == 200 and list(record) == list(load_fixture("api/GET_api_projects_ID.json"))
    assert shape_of(record) == shape_of(load_fixture("api/POST_api_projects.json"))  # no task yet: dimension null
    assert (record["name"], record["tasks"]["count"], record["dimension"]) == ("vehicles", 0, None)
    assert record["labels"]["url"] == f"{cvat_double.base_url}/api/labels?project_id=9"

    project = client.projects.retrieve(project_id)
    labels = project.get_labels()
    assert [(label.name, str(label.type), label.project_id) for label in labels] == [
        ("car", "rectangle", 9), ("person", "polygon", 9), ("junk", "any", 9)]
    assert [(a.name, str(a.input_type), a.mutable, a.default_value, a.values) for a in labels[0].attributes] == [
        ("color", "select", False, "red", ["red", "blue"]), ("parked", "checkbox", True, "false", ["false"])]
    recorded_label = load_fixture("api/GET_api_labels__project_id=ID.json")["results"][0]
    listed = json.loads(call(cvat_double, "GET", f"/api/labels?project_id={project_id}")[2])["results"]
    assert [shape_of(label) for label in listed[:1]] == [shape_of(recorded_label)]

    first = cvat_double.add_task("first", frames_of(2), project_id=project_id)
    second = cvat_double.add_task("second", frames_of(3), project_id=project_id, segment_size=2)
    assert sorted(task.id for task in project.get_tasks()) == [first, second]
    project.fetch()
    assert (project.tasks.count, project.dimension) == (2, "2d")
    assert [label.name for label in client.tasks.retrieve(second).get_labels()] == ["car", "person", "junk"]
    assert cvat_double.label_id(first, "junk") == labels[2].id
    assert [p.id for p in client.projects.list()] == [9, 6]
    with pytest.raises(ValueError, match="unique"):
        cvat_double.add_project("twice", [{"name": "a"}, {"name": "a"}])


def test_patch_project_labels_adds_updates_and_deletes(cvat_double, client):
    project_id = cvat_double.add_project("vehicles", VEHICLE_LABELS)
    car, _, junk = (cvat_double.labels[i] for i in (25, 26, 27))
    task_id = cvat_double.add_task("t", frames_of(4), project_id=project_id, segment_size=2, annotations={"shapes": [
        {"type": "rectangle", "frame": 0, "label_id": car["id"], "points": [1, 1, 5, 5]},
        {"type": "points", "frame": 3, "label_id": junk["id"], "points": [2, 2]}]})
    project = client.projects.retrieve(project_id)
    before = project.updated_date

    project.update({"labels": [
        {"name": "score", "type": "tag", "attributes": [CONFIDENCE]},
        {"id": car["id"], "name": "vehicle", "attributes": [
            {"id": car["attributes"][0]["id"], "name": "color", "mutable": False, "input_type": "select",
             "values": ["red", "blue", "green"]}]},  # cvat-sdk requires these four
        {"id": junk["id"], "deleted": True},
    ]})
    labels = {label.name: label for label in project.get_labels()}
    assert list(labels) == ["vehicle", "person", "score"]
    assert labels["vehicle"].id == car["id"] and str(labels["vehicle"].type) == "rectangle"
    assert labels["vehicle"].attributes[0].values == ["red", "blue", "green"]
    score = labels["score"]
    assert (str(score.type), score.id) == ("tag", 28)
    assert [(a.name, str(a.input_type), a.values, a.mutable, a.default_value) for a in score.attributes] == [
        ("confidence", "number", ["0", "100", "1"], True, "")]  # no default_value sent: CVAT stores ""
    task = client.tasks.retrieve(task_id)  # the project's tasks see the new labels at once
    assert [label.name for label in task.get_labels()] == ["vehicle", "person", "score"]
    assert [s.label_id for s in task.get_annotations().shapes] == [car["id"]]  # junk's shape went with it
    assert project.updated_date > before and task.updated_date == project.updated_date

    # The raw API: the answer is the project record; the generated API client works too.
    status, _, body = call(cvat_double, "PATCH", f"/api/projects/{project_id}", {"labels": [
        {"id": score.id, "attributes": [{"name": "confidence", "default_value": "50"}]}], "name": "renamed"})
    assert status == 200 and json.loads(body) == json.loads(call(cvat_double, "GET", f"/api/projects/{project_id}")[2])
    assert json.loads(body)["name"] == "renamed"
    assert cvat_double.labels[score.id]["attributes"][0]["default_value"] == "50"  # found by name: updated
    read, response = client.api_client.projects_api.partial_update(
        project_id, patched_project_write_request=models.PatchedProjectWriteRequest(
            labels=[models.PatchedLabelRequest(name="extra", type="tag")]))
    assert (response.status, read.id, read.name) == (200, project_id, "renamed")
    assert [label.name for label in task.get_labels()][-1] == "extra"


@pytest.mark.parametrize("labels, status, answer", [
    ([{"deleted": True}], 400, {"labels": [{"non_field_errors": ["Deleted label must have an ID"]}]}),
    ([{"id": 18, "name": "x"}], 404, {"detail": "Not found label with id #18 to change"}),  # project 6's label
    ([{"name": "fresh"}, {"name": "person"}], 400, ["All label names must be unique"]),
    ([{"name": "blob", "type": "blob"}], 400, {"labels": [{"type": ['"blob" is not a valid choice.']}]}),
    ([{"name": "n", "attributes": [{"name": "a"}, {"name": "a"}]}], 400, ["Duplicate attribute with name 'a' exists"]),
    ([{"id": 25, "attributes": [{"id": 1, "name": "color"}]}], 404, {"detail": "Attribute with id #1 does not exist"}),
])
def test_patch_project_label_errors_change_nothing(cvat_double, labels, status, answer):
    project_id = cvat_double.add_project("vehicles", VEHICLE_LABELS)
    before = copy.deepcopy(cvat_double.labels)
    got_status, _, body = call(cvat_double, "PATCH", f"/api/projects/{project_id}", {"labels": labels})
    assert (got_status, json.loads(body)) == (status, answer)
    assert cvat_double.labels == before  # one transaction: "fresh" was not kept either


def test_patch_task_labels_of_a_standalone_task(cvat_double, client):
    read, _ = client.api_client.tasks_api.partial_update(8, patched_task_write_request=models.PatchedTaskWriteRequest(
        name="renamed", labels=[models.PatchedLabelRequest(name="score", type="tag", attributes=[
            models.AttributeRequest(**CONFIDENCE)]), models.PatchedLabelRequest(id=24, deleted=True)]))
    assert (read.id, read.name, read.size) == (8, "renamed", 3)
    labels = client.tasks.retrieve(8).get_labels()
    assert [(label.name, label.task_id) for label in labels] == [("cat", 8), ("score", 8)]
    assert [(a.name, a.values) for a in labels[1].attributes] == [("confidence", ["0", "100", "1"])]
    # A task in a project takes its labels from the project: labels sent with the task are ignored.
    status, _, body = call(cvat_double, "PATCH", "/api/tasks/7", {"labels": [{"name": "ignored"}]})
    assert status == 200 and json.loads(body) == json.loads(call(cvat_double, "GET", "/api/tasks/7")[2])
    assert "ignored" not in [label["name"] for label in cvat_double.labels.values()]


# ------------------------------------------------------------------ tags with attributes

def test_tags_with_attributes_through_the_sdk(cvat_double, client):
    project = client.projects.retrieve(6)
    project.update({"labels": [{"id": 22, "attributes": [CONFIDENCE]}]})  # daytime (tag) gains an attribute
    confidence = cvat_double.labels[22]["attributes"][0]["id"]
    task = client.tasks.retrieve(7)
    assert task.get_annotations().tags[0].attributes[0].to_dict() == {"spec_id": confidence, "value": ""}  # tag 8

    task.update_annotations(models.PatchedLabeledDataRequest(tags=[
        models.LabeledImageRequest(frame=1, label_id=22, attributes=[
            models.AttributeValRequest(spec_id=confidence, value="87")]),
        models.LabeledImageRequest(frame=4, label_id=22)]), action=AnnotationUpdateAction.CREATE)
    tags = {tag.frame: tag for tag in task.get_annotations().tags}
    assert sorted(tags) == [0, 1, 4]
    assert [a.to_dict() for a in tags[1].attributes] == [{"spec_id": confidence, "value": "87"}]
    assert [a.to_dict() for a in tags[4].attributes] == [{"spec_id": confidence, "value": ""}]  # default, on read

    job = client.jobs.retrieve(8)
    job.update_annotations(models.PatchedLabeledDataRequest(tags=[models.LabeledImageRequest(
        id=tags[4].id, frame=4, label_id=22, attributes=[models.AttributeValRequest(spec_id=confidence, value="12")])]),
        action=AnnotationUpdateAction.UPDATE)
    assert [a.value for a in job.get_annotations().tags[0].attributes] == ["12"]

    # A number sent as a JSON number comes back as a string (AttributeValSerializer: str(value)).
    status, _, body = call(cvat_double, "PATCH", "/api/jobs/7/annotations?action=create", {"tags": [
        {"frame": 2, "label_id": 22, "attributes": [{"spec_id": confidence, "value": 33}]}]})
    assert status == 200 and json.loads(body)["tags"][0]["attributes"] == [{"spec_id": confidence, "value": "33"}]

    task.remove_annotations(ids=[tags[1].id])
    assert sorted(tag.frame for tag in task.get_annotations().tags) == [0, 2, 4]
    job.set_annotations(models.LabeledDataRequest(tags=[models.LabeledImageRequest(frame=5, label_id=22, attributes=[
        models.AttributeValRequest(spec_id=confidence, value="99")])]))
    assert [(t.frame, t.attributes[0].value) for t in task.get_annotations().tags] == [(0, ""), (2, "33"), (5, "99")]


@pytest.mark.parametrize("target, body, status, answer", [
    # a spec of the car label (color, id 1) on a tag of the daytime label
    ("/api/tasks/7/annotations?action=create", {"tags": [
        {"frame": 0, "label_id": 22, "attributes": [{"spec_id": 1, "value": "red"}]}]}, 400,
     ["spec_id `1` is invalid"]),
    ("/api/jobs/7/annotations?action=update", {"tags": [
        {"id": 8, "frame": 0, "label_id": 22, "attributes": [{"spec_id": 2, "value": "x"}]}]}, 400,
     ["spec_id `2` is invalid"]),
    # tracks: immutable attributes on the track, mutable ones on its shapes
    ("/api/jobs/8/annotations?action=create", {"tracks": [{"frame": 3, "label_id": 18, "attributes": [
        {"spec_id": 2, "value": "true"}], "shapes": [{"type": "rectangle", "frame": 3, "points": [0, 0, 2, 2]}]}]},
     400, ["spec_id `2` is invalid"]),
    ("/api/jobs/8/annotations?action=create", {"tracks": [{"frame": 3, "label_id": 18, "shapes": [
        {"type": "rectangle", "frame": 3, "points": [0, 0, 2, 2], "attributes": [{"spec_id": 1, "value": "red"}]}]}]},
     400, ["spec_id `1` is invalid"]),
    ("/api/tasks/7/annotations", {"tags": [{"frame": 0, "label_id": 22, "attributes": [{"value": "1"}]}]}, 400,
     {"tags": [{"attributes": [{"spec_id": ["This field is required."]}]}]}),
])
def test_attribute_specs_must_belong_to_the_label(cvat_double, target, body, status, answer):
    before = cvat_double.annotations(7)
    method = "PUT" if "action" not in target else "PATCH"
    got_status, _, got = call(cvat_double, method, target, body)
    assert (got_status, json.loads(got)) == (status, answer)
    assert cvat_double.annotations(7) == before


def test_an_attribute_value_missing_is_a_server_error_as_in_cvat(cvat_double):
    status, headers, body = call(cvat_double, "PATCH", "/api/tasks/7/annotations?action=create", {"tags": [
        {"frame": 0, "label_id": 22, "attributes": [{"spec_id": 1}]}]})
    assert (status, headers["content-type"]) == (500, "text/html; charset=utf-8") and b"Server Error" in body


# ------------------------------------------------------------------ tasks whose data is not uploaded yet

def test_pending_upload_then_finish_upload(cvat_double, client):
    task_id = cvat_double.add_task("pending", frames_of(5), project_id=6, segment_size=2, pending_upload=True)
    status, _, body = call(cvat_double, "GET", f"/api/tasks/{task_id}")
    record = json.loads(body)
    recorded = load_fixture("api/POST_api_tasks.fixtures-images.json")  # the task right after POST /api/tasks
    assert status == 200 and list(record) == list(recorded) and shape_of(record) == shape_of(recorded)
    assert (record["mode"], record["overlap"], record["segment_size"], record["status"]) == ("", None, 2, "annotation")
    assert record["jobs"] == {"count": 0, "completed": 0, "validation": 0,
                              "url": f"{cvat_double.base_url}/api/jobs?task_id={task_id}"}
    task = client.tasks.retrieve(task_id)
    assert task.jobs.count == 0 and task.get_jobs() == [] and "size" not in task._model
    assert [label.name for label in task.get_labels()] == ["car", "person", "road", "sign", "daytime"]

    # Media and annotations of a task without data answer as CVAT's views do.
    status, headers, body = call(cvat_double, "GET", f"/api/tasks/{task_id}/annotations")
    assert (status, headers["content-type"], body) == (
        400, "text/html; charset=utf-8", b"Exporting annotations from a task without data is not allowed")
    tag = {"tags": [{"frame": 0, "label_id": 22}]}
    status, _, body = call(cvat_double, "PATCH", f"/api/tasks/{task_id}/annotations?action=create", tag)
    assert (status, json.loads(body)) == (400, "'NoneType' object has no attribute 'validation_mode'")
    for method, target, body in [("GET", "data/meta", None), ("PUT", "annotations", tag),
                                 ("GET", "data?type=chunk&number=0&quality=original", None)]:
        assert call(cvat_double, method, f"/api/tasks/{task_id}/{target}", body)[0] == 500, target
    assert json.loads(call(cvat_double, "GET", f"/api/tasks/{task_id}/data?type=frame")[2]) == [
        "Number is not specified"]
    with pytest.raises(exceptions.ApiException) as error:
        task.get_meta()
    assert error.value.status == 500
    with pytest.raises(ValueError, match="without data"):
        cvat_double.add_task("bad", frames_of(1), project_id=6, pending_upload=True, annotations=tag)

    cvat_double.finish_upload(task_id)
    task.fetch()
    assert (task.size, task.mode, task.overlap, task.segment_size, task.jobs.count) == (5, "annotation", 0, 2, 3)
    assert sorted((j.start_frame, j.stop_frame) for j in task.get_jobs()) == [(0, 1), (2, 3), (4, 4)]
    assert [f.name for f in task.get_meta().frames] == [f"img_{i:02d}.jpg" for i in range(5)]
    assert list(json.loads(call(cvat_double, "GET", f"/api/tasks/{task_id}")[2])) == list(
        load_fixture("api/GET_api_tasks_ID.json"))
    task.update_annotations(models.PatchedLabeledDataRequest(tags=[models.LabeledImageRequest(frame=4, label_id=22)]),
                            action=AnnotationUpdateAction.CREATE)
    assert [t.frame for t in task.get_annotations().tags] == [4]
    with pytest.raises(ValueError, match="already has its data"):
        cvat_double.finish_upload(task_id)


# ------------------------------------------------------------------ webhook deliveries

class Receiver:
    """A small HTTP server taking webhook deliveries: keeps (path, headers in order, raw body), answers
    ``status`` with ``answer`` once ``open`` is set (it is, unless a test holds the deliveries)."""

    def __init__(self) -> None:
        self.received: list[tuple[str, list[tuple[str, str]], bytes]] = []
        self.status, self.answer, self.open = 200, b"ok", threading.Event()
        self.open.set()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.open.wait()
                receiver.received.append((self.path, list(self.headers.items()), body))
                self.send_response(receiver.status)
                self.send_header("Content-Length", str(len(receiver.answer)))
                self.end_headers()
                self.wfile.write(receiver.answer)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"


@pytest.fixture
def receiver():
    got = Receiver()
    yield got
    got.open.set()  # nothing held past the test
    got.server.shutdown()
    got.server.server_close()


def signed(secret: str, body: bytes, headers: list[tuple[str, str]]) -> bool:
    expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, dict(headers)["X-Signature-256"])


RECORDED_DELIVERIES = {d["capture_seq"]: d for d in load_fixture("webhooks/all_deliveries.json")}
PROJECT_WEBHOOK_EVENTS = load_fixture("webhooks/api/POST_api_webhooks.project.request.json")["events"]


def assert_like_recorded(deliveries: list, sequence: range) -> None:
    """Each delivery has the recorded event, payload shape (keys, nesting, nulls) and before_update keys."""
    recorded = [RECORDED_DELIVERIES[n]["body_json"] for n in sequence]
    assert [d.event for d in deliveries] == [r["event"] for r in recorded]
    for delivery, expected in zip(deliveries, recorded, strict=True):
        assert shape_of(delivery.payload) == shape_of(expected), delivery.event
        assert list(delivery.payload.get("before_update", {})) == list(expected.get("before_update", {}))


def test_task_creation_sends_the_recorded_deliveries(cvat_double, client, receiver):
    webhook = cvat_double.add_webhook(receiver.url("/cvat-webhook/project"), "s3cret", PROJECT_WEBHOOK_EVENTS, 6)
    task_id = cvat_double.add_task("like-fixtures-images", frames_of(6), project_id=6, segment_size=3)
    deliveries = cvat_double.wait_for_deliveries()
    assert_like_recorded(deliveries, range(4, 12))  # create:task ... the last update:task
    assert [(d.webhook_id, d.status_code, d.response, d.error) for d in deliveries] == [(webhook, 200, "ok", None)] * 8
    assert len(receiver.received) == 8
    recorded_headers = [name for name, _ in RECORDED_DELIVERIES[4]["headers"].items()]
    for delivery, (path, headers, body) in zip(deliveries, receiver.received, strict=True):
        assert path == "/cvat-webhook/project" and body == delivery.body
        assert body == json.dumps(json.loads(body)).encode()  # the raw body is json.dumps(payload)
        assert signed("s3cret", body, headers) and not signed("other", body, headers)
        assert [name for name, _ in headers] == recorded_headers
        assert dict(headers)["Content-Type"] == "application/json"
        assert json.loads(body)["webhook_id"] == webhook
    payloads = [d.payload for d in deliveries]
    assert payloads[0]["task"]["id"] == task_id and "size" not in payloads[0]["task"]
    assert (payloads[2]["task"]["size"], payloads[2]["task"]["image_quality"]) == (0, 50)  # data attached
    assert payloads[3]["task"]["jobs"] == {"count": 0, "completed": 0, "validation": 0,
                                           "url": f"{cvat_double.base_url}/api/jobs?task_id={task_id}"}
    jobs = sorted(j.id for j in client.tasks.retrieve(task_id).get_jobs())
    assert [p["job"]["url"] for p in payloads[4:6]] == [f"/api/jobs/{j}" for j in jobs]  # sent from the worker
    assert payloads[6]["task"]["size"] == 6 and payloads[6]["before_update"]["mode"] == ""
    assert deliveries[2].changed_fields == "updated_date,data_compressed_chunk_type,data_original_chunk_type,size," \
                                           "image_quality,data"


def test_pending_task_sends_its_deliveries_in_two_steps(cvat_double, client, receiver):
    cvat_double.add_webhook(receiver.url(), "s3cret", PROJECT_WEBHOOK_EVENTS, 6)
    task_id = cvat_double.add_task("scratch", frames_of(1), project_id=6, pending_upload=True)
    assert [d.event for d in cvat_double.wait_for_deliveries()] == ["create:task", "update:project"]
    cvat_double.finish_upload(task_id)
    assert_like_recorded(cvat_double.wait_for_deliveries(), range(29, 36))  # the scratch task, no segment_size
    assert cvat_double.deliveries[5].payload["before_update"]["segment_size"] == 0

    client.tasks.retrieve(task_id).remove()  # DELETE /api/tasks/ID
    assert_like_recorded(cvat_double.wait_for_deliveries()[7:], range(36, 39))
    assert cvat_double.deliveries[-1].payload["task"]["jobs"]["count"] == 1  # the view's object: counts annotated

    cvat_double.deliveries.clear()  # PATCH /api/tasks/ID saves the view's object, then touches the project
    status, _, _ = call(cvat_double, "PATCH", "/api/tasks/7", {"name": "renamed"})
    deliveries = cvat_double.wait_for_deliveries()
    assert status == 200 and [d.event for d in deliveries] == ["update:task", "update:project"]
    assert list(deliveries[0].payload["before_update"]) == ["name", "updated_date", "jobs"]
    assert deliveries[0].payload["task"]["jobs"]["count"] == 2
    assert all(signed("s3cret", body, headers) for _, headers, body in receiver.received)


def test_job_changes_and_annotation_saves_send_the_recorded_deliveries(cvat_double, client, receiver):
    cvat_double.add_webhook(receiver.url(), "s3cret", ["update:job", "update:task", "update:project"], 6)
    job7, job8 = client.jobs.retrieve(7), client.jobs.retrieve(8)
    job7.update({"state": "new"})  # the recorded state is already completed: replay the change
    job8.update({"stage": "annotation"})
    cvat_double.wait_for_deliveries()
    cvat_double.deliveries.clear()

    job7.update({"state": "completed"})
    job8.update({"stage": "acceptance"})
    deliveries = cvat_double.wait_for_deliveries()
    assert_like_recorded(deliveries, range(27, 29))
    assert deliveries[0].payload["before_update"]["state"] == "new"
    assert deliveries[1].payload["before_update"]["stage"] == deliveries[1].payload["before_update"]["status"] \
        == "annotation" and deliveries[1].payload["job"]["status"] == "validation"

    cvat_double.deliveries.clear()
    job7.update_annotations(models.PatchedLabeledDataRequest(**load_fixture(
        "api/PATCH_api_jobs_ID_annotations__action=update.job1.request.json")), action=AnnotationUpdateAction.UPDATE)
    assert_like_recorded(cvat_double.wait_for_deliveries(), range(24, 27))  # job, task, project: updated_date only

    cvat_double.deliveries.clear()  # a task-level save: the triple for every job it changed, in job order
    task = client.tasks.retrieve(7)
    task.update_annotations(models.PatchedLabeledDataRequest(shapes=[
        models.LabeledShapeRequest(type="points", frame=f, label_id=21, points=[1, 1]) for f in (4, 0)]),
        action=AnnotationUpdateAction.CREATE)
    deliveries = cvat_double.wait_for_deliveries()
    assert_like_recorded(deliveries, range(12, 18))
    assert [d.payload["job"]["id"] for d in deliveries if d.event == "update:job"] == [7, 8]
    cvat_double.deliveries.clear()
    task.update_annotations(models.PatchedLabeledDataRequest(shapes=[
        models.LabeledShapeRequest(type="points", frame=5, label_id=21, points=[1, 1])]),
        action=AnnotationUpdateAction.CREATE)
    assert [(d.event, d.payload[d.event[7:]]["id"]) for d in cvat_double.wait_for_deliveries()] == [
        ("update:job", 8), ("update:task", 7), ("update:project", 6)]  # job 7 got nothing: not touched

    cvat_double.deliveries.clear()  # job 7 done: the task's status changes, so the task is saved too
    job7.update({"stage": "acceptance", "state": "completed"})
    deliveries = cvat_double.wait_for_deliveries()
    assert [d.event for d in deliveries] == ["update:job", "update:task"]
    assert deliveries[1].payload["before_update"] == {"updated_date": deliveries[1].payload["before_update"][
        "updated_date"], "status": "annotation"} and deliveries[1].payload["task"]["status"] == "validation"


def test_webhooks_created_over_http_filters_and_a_target_that_is_down(cvat_double, client, receiver):
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{closed.getsockname()[1]}/hook"
    created, _ = client.api_client.webhooks_api.create(models.WebhookWriteRequest(
        target_url=down, type="project", project_id=6, events=["update:job"], secret="x",
        content_type="application/json"))
    live = cvat_double.add_webhook(receiver.url(), "s3cret", ["update:job"], 6)
    cvat_double.add_webhook(receiver.url("/inactive"), "s3cret", ["update:job"], 6, is_active=False)
    cvat_double.add_webhook(receiver.url("/other"), "s3cret", ["update:job"], cvat_double.add_project("other"))
    cvat_double.add_webhook(receiver.url("/tasks-only"), "s3cret", ["create:task"], 6)
    receiver.status, receiver.answer = 202, b"accepted"

    client.jobs.retrieve(7).update({"state": "in progress"})
    client.jobs.retrieve(9).update({"state": "in progress"})  # task 8 is in no project: no webhook sees it
    deliveries = cvat_double.wait_for_deliveries()
    assert [(d.webhook_id, d.target, d.status_code, d.response) for d in deliveries] == [
        (created.id, down, 502, ""), (live, receiver.url(), 202, "accepted")]
    assert deliveries[0].error and deliveries[1].error is None
    assert [path for path, _, _ in receiver.received] == ["/hook"]
    assert signed("s3cret", receiver.received[0][2], receiver.received[0][1])

    status, _, body = call(cvat_double, "POST", "/api/webhooks", {
        "target_url": receiver.url(), "type": "project", "project_id": 6, "events": ["create:project"]})
    assert (status, json.loads(body)) == (400, {"non_field_errors": ["Invalid events list for project webhook"]})


def test_deliveries_are_sent_in_order_from_a_background_thread(cvat_double, receiver):
    cvat_double.add_webhook(receiver.url(), "", ["update:job"], 6)  # no secret: no signature header
    receiver.open.clear()  # the receiver holds the deliveries: an API call that waited for one would wait in vain
    for state in ("in progress", "rejected", "completed"):
        assert call(cvat_double, "PATCH", "/api/jobs/7", {"state": state})[0] == 200
    with pytest.raises(TimeoutError):
        cvat_double.wait_for_deliveries(timeout=0.05)  # still going out: the API calls answered before them
    receiver.open.set()
    deliveries = cvat_double.wait_for_deliveries()
    assert [d.status_code for d in deliveries] == [200, 200, 200]  # none timed out
    assert [d.payload["job"]["state"] for d in deliveries] == ["in progress", "rejected", "completed"]
    assert [json.loads(body)["job"]["state"] for _, _, body in receiver.received] == [
        "in progress", "rejected", "completed"]
    assert "X-Signature-256" not in dict(receiver.received[0][1])


# ------------------------------------------------------------------ the lambda manager's requests (the menu)

class FakeFunction:
    """A detector function as Nuclio serves it: answers every POST with ``answer``, keeps the bodies."""

    def __init__(self, answer: list) -> None:
        self.bodies: list[dict] = []
        function = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                function.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                body = json.dumps(answer).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"


@pytest.fixture
def fake_function():
    answer = [{"confidence": "0.9", "label": "car", "points": [1, 2, 11, 12], "type": "rectangle",
               "attributes": [{"name": "color", "value": "blue"}, {"name": "parked", "value": "maybe"}]},
              {"confidence": "0.8", "label": "bus", "points": [3, 3, 9, 9], "type": "rectangle"},  # not in the task
              {"confidence": "0.7", "label": "sign", "type": "tag"}]
    function = FakeFunction(answer)
    yield function
    function.server.shutdown()
    function.server.server_close()


def test_lambda_requests_one_per_task_run_by_the_worker_and_saved_as_auto(cvat_double, client, fake_function,
                                                                         receiver):
    """Project 6: car (rectangle: color select, parked checkbox), sign (any). The function's spec has car, bus and
    sign; only car and sign map, the invalid checkbox value is dropped (check_attr_value)."""
    cvat_double.add_lambda_function("fn", fake_function.url, [
        {"name": "car", "type": "rectangle", "attributes": [{"name": "color"}, {"name": "parked"}]},
        {"name": "bus", "type": "rectangle"}, {"name": "sign", "type": "tag"}])
    task_id = cvat_double.add_task("menu", frames_of(3), project_id=6, segment_size=2)
    cvat_double.add_webhook(receiver.url(), "s3cret", ["update:job", "update:task", "update:project"], 6)
    rq_id = f"action=autoannotate&target=task&target_id={task_id}"

    status, _, body = call(cvat_double, "POST", "/api/lambda/requests", {"function": "fn", "task": task_id,
                                                                         "threshold": 0.4})
    made = json.loads(body)
    assert status == 200 and made["id"] == rq_id and made["status"] == "queued" and made["progress"] == 0
    assert made["function"] == {"id": "fn", "task": task_id, "threshold": 0.4}
    assert list(made) == ["id", "function", "status", "progress", "enqueued", "started", "ended", "exc_info"]
    status, _, body = call(cvat_double, "POST", "/api/lambda/requests", {"function": "fn", "task": task_id})
    assert (status, json.loads(body)) == (409, f"Only one running request is allowed for the same task #{task_id}")
    assert call(cvat_double, "POST", "/api/lambda/requests", {"function": "nope", "task": task_id})[0] == 404
    status, _, body = call(cvat_double, "POST", "/api/lambda/requests", {"task": task_id})
    assert (status, json.loads(body)) == (400, {"function": ["This field is required."]})
    listed, _ = client.api_client.lambda_api.list_requests()  # cvat-sdk reads the plain list
    assert [(r.id, r.status, r.function.task) for r in listed] == [(rq_id, "queued", task_id)]

    assert cvat_double.run_lambda_request(rq_id, frames=1)["status"] == "started"
    assert cvat_double.annotations(task_id)["shapes"] == []  # collected, saved every 100 frames and at the end
    got = json.loads(call(cvat_double, "GET", f"/api/lambda/requests/{rq_id.replace('&', '%26')}")[2])
    assert (got["status"], got["progress"], got["started"] is not None, got["ended"]) == ("started", 33, True, None)
    finished = cvat_double.run_lambda_request(rq_id)
    assert (finished["status"], finished["progress"]) == ("finished", 100) and finished["ended"]
    assert len(fake_function.bodies) == 3 and fake_function.bodies[0]["threshold"] == 0.4
    assert base64.b64decode(fake_function.bodies[0]["image"]) == cvat_double.tasks[task_id].frames[0].data
    stored = cvat_double.annotations(task_id)
    assert [(s["frame"], s["label_id"], s["source"], s["points"]) for s in stored["shapes"]] == [
        (frame, 18, "auto", [1.0, 2.0, 11.0, 12.0]) for frame in range(3)]
    assert stored["shapes"][0]["attributes"] == [{"spec_id": 1, "value": "blue"}, {"spec_id": 2, "value": "false"}]
    assert [(t["frame"], t["label_id"], t["source"]) for t in stored["tags"]] == [(f, 21, "auto") for f in range(3)]
    # one save, task-level: the triple for each of its two jobs, sent from the worker, only updated_date changed
    deliveries = cvat_double.wait_for_deliveries()
    assert [d.event for d in deliveries] == ["update:job", "update:task", "update:project"] * 2
    assert all(list(d.payload["before_update"]) == ["updated_date"] for d in deliveries)
    task_delivery = deliveries[1].payload
    assert task_delivery["task"]["url"] == f"/api/tasks/{task_id}" and "email" in task_delivery["sender"]

    again = json.loads(call(cvat_double, "POST", "/api/lambda/requests", {"function": "fn", "task": task_id,
                                                                          "cleanup": True})[2])
    assert again["status"] == "queued" and again["function"]["threshold"] is None  # the finished one made way
    cvat_double.run_lambda_request(rq_id)
    assert "threshold" not in fake_function.bodies[-1]
    assert len(cvat_double.annotations(task_id)["shapes"]) == 3  # cleanup: the earlier ones went first
    assert call(cvat_double, "DELETE", f"/api/lambda/requests/{rq_id.replace('&', '%26')}")[0] == 204
    status, _, body = call(cvat_double, "GET", f"/api/lambda/requests/{rq_id.replace('&', '%26')}")
    assert (status, json.loads(body)) == (404, f"{rq_id} lambda job is not found")
    assert json.loads(call(cvat_double, "GET", "/api/lambda/requests")[2]) == []
