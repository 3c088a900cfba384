"""The local HTTP door: `preannotate serve`, used as a new user would (a process and HTTP requests)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest
import urllib3
from preannotate.serving.core import App, ModelProvider, Request
from preannotate.serving.http import make_server

from tests.conftest import b64, encode, photo


def request(url, body=None, method=None, content_type="application/json"):
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method or ("POST" if data is not None else "GET"))
    if data is not None:
        req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()), dict(error.headers)


@pytest.fixture
def server(published_store):
    app = App(ModelProvider("boxes", published_store))
    httpd = make_server(app, "127.0.0.1", 0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_local_server_serves_the_function_routes(server):
    status, items, headers = request(server + "/", {"image": b64(encode(photo())), "threshold": 0.0})
    assert status == 200 and items and headers["Content-Type"] == "application/json"
    assert {item["label"] for item in items} <= {"car", "person"}
    status, health, _ = request(server + "/health")
    assert status == 200 and health["model"]["name"] == "boxes"
    status, models, _ = request(server + "/models")
    assert status == 200 and models["serving"]["version"] == 1


def test_local_server_errors_are_json_and_it_keeps_serving(server):
    status, reply, _ = request(server + "/", b"{broken", content_type="application/json")
    assert status == 400 and "not JSON" in reply["error"]
    status, reply, _ = request(server + "/", {"image": "@@"})
    assert status == 400 and "base64" in reply["error"]
    status, reply, _ = request(server + "/", b"x" * (32 * 1024 * 1024 + 1), content_type="application/json")
    assert status == 413 and "limit" in reply["error"]
    status, reply, headers = request(server + "/health", b"{}", method="POST")
    assert status == 405 and headers["Allow"] == "GET"
    assert request(server + "/", {"image": b64(encode(photo()))})[0] == 200


def test_json_that_is_no_object_and_broken_http_get_a_sentence_and_the_connection_goes_on(server):
    import http.client
    import socket

    port = int(server.rsplit(":", 1)[1])
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    for body, message in [(b"2", "must be a JSON object"), (b"true", "not true"), (b"[" * 5000, "nested too deeply"),
                          (b'{"a":' * 5000, "nested too deeply"), (b"1" * 5000, "too many digits")]:
        connection.request("POST", "/", body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()  # one connection throughout: none of them drops it
        assert response.status == 400 and message in json.loads(response.read())["error"]
    connection.request("POST", "/", body=json.dumps({"image": b64(encode(photo()))}),
                       headers={"Content-Type": "application/json"})
    assert connection.getresponse().status == 200
    connection.close()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nContent-Length: twelve\r\n\r\n")
        answer = sock.makefile("rb").read()
    assert answer.startswith(b"HTTP/1.1 400 ") and b"Content-Length header must be a number" in answer


def test_concurrent_requests_are_all_answered(server):
    body = {"image": b64(encode(photo(64, 48))), "threshold": 0.0}
    results = []
    threads = [threading.Thread(target=lambda: results.append(request(server + "/", body)[0])) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [200] * 8


def test_concurrent_requests_take_the_model_in_turn(server, monkeypatch):
    """Requests are decoded side by side but run the model one at a time: each then finishes in turn (torch spreads
    one forward pass over every core already) instead of all of them at the end."""
    from preannotate.models.torchvision_family import TorchvisionDetector

    inside, most = 0, 0
    lock = threading.Lock()
    detect = TorchvisionDetector.detect

    def counted(self, images, threshold):
        nonlocal inside, most
        with lock:
            inside += 1
            most = max(most, inside)
        try:
            return detect(self, images, threshold)
        finally:
            with lock:
                inside -= 1

    monkeypatch.setattr(TorchvisionDetector, "detect", counted)
    body = {"image": b64(encode(photo(64, 48))), "threshold": 0.0}
    threads = [threading.Thread(target=request, args=(server + "/", body)) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert most == 1


def test_preannotate_serve_command_with_a_model_from_the_store(published_store):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "preannotate.cli", "serve", "--model", "boxes", "--store",
         str(published_store.root), "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = process.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert match, line + process.stderr.read()
        url = f"http://127.0.0.1:{match.group(1)}"
        # What a user sends with curl: the CVAT body.
        status, items, _ = request(url + "/", {"image": b64(encode(photo(640, 480))), "threshold": 0.0})
        assert status == 200 and all(len(item["points"]) == 4 for item in items)
    finally:
        process.terminate()
        process.wait(timeout=30)



def test_preannotate_serve_kind_tracker_answers_cvats_tracker_call_and_trains_nothing(published_store):
    """``serve --kind tracker`` is the tracker function on a laptop: POST / takes CVAT's tracker body and the
    training routes, a detector's, are not there."""
    process = subprocess.Popen(
        [sys.executable, "-m", "preannotate.cli", "serve", "--model", "boxes", "--store", str(published_store.root),
         "--port", "0", "--kind", "tracker"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = process.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert match and "as a tracker" in line, line + process.stderr.read()
        url = f"http://127.0.0.1:{match.group(1)}"
        start = {"image": b64(encode(photo(64, 48))), "shapes": [{"type": "rectangle", "points": [10, 8, 40, 28]}],
                 "states": []}
        status, answer, _ = request(url + "/", start)
        assert status == 200 and len(answer["shapes"]) == len(answer["states"]) == 1, answer
        status, answer, _ = request(url + "/", {"image": b64(encode(photo(64, 48)))})  # a detector's body
        assert status == 400 and "shapes" in answer["error"]
        assert request(url + "/health")[1]["kind"] == "tracker"
        assert request(url + "/train", {})[0] == 404
    finally:
        process.terminate()
        process.wait(timeout=30)

def test_preannotate_serve_refuses_a_version_that_does_not_exist_before_listening(tmp_path):
    result = subprocess.run([sys.executable, "-m", "preannotate.cli", "serve", "--model", "nothing@3", "--store",
                             str(tmp_path), "--port", "0"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "no published model named 'nothing'" in result.stderr and "Traceback" not in result.stderr


def test_preannotate_serve_refuses_a_mistyped_name_naming_the_models_of_the_store(published_store):
    """Nothing trains a name with no version (no CVAT project to learn from): a mistake, not "not trained yet"."""
    result = subprocess.run([sys.executable, "-m", "preannotate.cli", "serve", "--model", "boxs", "--store",
                             str(published_store.root), "--port", "0"], capture_output=True, text=True, timeout=120,
                            env={key: value for key, value in os.environ.items()
                                 if not key.startswith("PREANNOTATE_TRAIN_")})
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(f"preannotate: error: no model named 'boxs' in {published_store.root} (did you "
                                    "mean boxes?); models there: boxes, masks (train it first: ")
    assert result.stderr.count("\n") == 1


def test_a_name_with_no_version_is_served_only_when_something_trains_it(published_store, tmp_path):
    """A function (and `preannotate serve`, configured the same way) for a name with no version: "not trained yet"
    while a CVAT project or a recorded job trains it; otherwise the name is a mistake, found when it starts."""
    from preannotate.models import ModelNotFound
    from preannotate.training.jobs import JobStore

    env = {"PREANNOTATE_MODEL": "boxs", "PREANNOTATE_MODEL_STORE": str(published_store.root)}
    with pytest.raises(ModelNotFound, match=r"^no model named 'boxs' in .* \(did you mean boxes\?\); models there: "
                                            r"boxes, masks \(train it first"):
        App.from_environment(env)
    for extra, how in (({"PREANNOTATE_TRAIN_PROJECT": "6"}, "finish a job in CVAT project 6"),
                       ({"PREANNOTATE_TRAIN_TASKS": "7,8"}, "finish a job of CVAT task(s) 7,8")):
        assert App.from_environment({**env, **extra}).provider.how_to_train.startswith(how)
    job = JobStore(tmp_path).create({"name": "cars", "model": "ssdlite320_mobilenet_v3_large", "tasks": [7]})
    app = App.from_environment({"PREANNOTATE_MODEL": "cars", "PREANNOTATE_MODEL_STORE": str(tmp_path)})
    reply = app.handle(Request("POST", "/", {"image": b64(encode(photo()))}))
    assert reply.status == 503 and reply.body["error"] == f"not trained yet: its training job {job.id} runs " \
                                                          f"(GET /jobs/{job.id})"


def test_a_404_lists_the_routes_as_a_person_reads_them(tmp_path):
    from preannotate.models import ModelStore
    from preannotate.serving.training import TrainingRoutes
    from preannotate.training.jobs import JobStore

    app = App(ModelProvider("boxes", ModelStore(tmp_path)))
    TrainingRoutes(app, JobStore(tmp_path), None, environ={"PREANNOTATE_API_AUTH": "none"})
    reply = app.handle(Request("GET", "/job/1"))
    assert reply.status == 404 and reply.body == {"error": "no route for GET /job/1; routes: POST /, GET /health, "
                                                           "GET /models, POST /train, GET /jobs, GET /jobs/<id>, "
                                                           "POST /jobs/<id>/cancel, POST /webhook, POST /cron"}
    assert app.handle(Request("GET", "/jobs/no-such.job_1/")).body == {"error": f"no job 'no-such.job_1' in "
                                                                                f"{tmp_path / '.jobs'}"}


def test_preannotate_serve_starts_before_the_first_version_as_the_function_does(tmp_path):
    """A name with no version yet, trained from a CVAT project: /health and the training routes answer, POST /
    answers 503 until it is trained."""
    server = subprocess.Popen([sys.executable, "-m", "preannotate.cli", "serve", "--model", "boxes", "--store",
                               str(tmp_path), "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env={**os.environ, "PREANNOTATE_API_AUTH": "none",
                                              "PREANNOTATE_TRAIN_PROJECT": "3"})
    try:
        lines = []
        while not lines or not lines[-1].startswith("serving"):
            lines.append(server.stdout.readline())
            assert lines[-1], f"the server ended before serving: {lines}"  # end of its output
        assert any(line.startswith("boxes is not trained yet: POST / answers 503 until its first version")
                   for line in lines), lines
        url = re.search(r"on (http://\S+/)", lines[-1]).group(1)
        pool = urllib3.PoolManager()
        detect = pool.request("POST", url, body=json.dumps({"image": b64(encode(photo()))}).encode(),
                              headers={"Content-Type": "application/json"})
        assert detect.status == 503
        assert json.loads(detect.data)["error"] == ("not trained yet: finish a job in CVAT project 3 (its webhook "
                                                    "starts training) or POST /train")
        health = json.loads(pool.request("GET", url + "health").data)
        assert health["model"]["state"].startswith("not trained yet") and health["training_routes"].startswith("open")
        assert json.loads(pool.request("GET", url + "jobs").data) == {"jobs": []}
    finally:
        server.terminate()
        server.wait(timeout=30)
