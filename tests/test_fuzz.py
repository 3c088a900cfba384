"""Malformed requests, seeded and fuzzed, against both doors: ``preannotate serve`` (a real server on loopback) and
the Nuclio handler. Every answer is a JSON 4xx with one sentence, never a 500, a dropped connection or Python's own
text; a valid request is still answered afterwards."""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import random
import re
import socket
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field

import nuclio_sdk
import nuclio_sdk.test
import pytest
from preannotate.serving import nuclio
from preannotate.serving.core import App, ModelProvider
from preannotate.serving.http import make_server
from preannotate.serving.training import TrainingRoutes
from preannotate.training.jobs import JobStore

from tests.conftest import b64, encode, photo

SEED = 20240611
MUTATIONS = 150  # random mutations of a valid request, per door
SECRET = "fuzz-secret"
LEAKS = re.compile(r"Traceback|\b0x[0-9a-fA-F]{4,}|\b[A-Z]\w*(?:Error|Exception|Warning)\b|invalid literal|"
                   r"Expecting (?:value|property)|\(char \d+\)|must be str, bytes|object at|NoneType|builtins")


@dataclass
class Case:
    name: str
    body: bytes = b""
    content_type: str | None = "application/json"
    method: str = "POST"
    path: str = "/"
    headers: dict[str, str] = field(default_factory=dict)
    expect: tuple[int, ...] = (200, 400, 413)  # what a detector call may answer


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_of_size(width: int, height: int) -> bytes:
    """A PNG whose header says ``width``x``height`` (1-bit gray), with one row of data: refused from its header."""
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * (1 + (width + 7) // 8))) + chunk(b"IEND", b""))


PNG = encode(photo(24, 16), "PNG")
JPEG = encode(photo(24, 16), "JPEG")
VALID = {"image": b64(PNG), "threshold": 0.99}  # a random model at 0.99: next to nothing to decode after it
AFTER = {"image": b64(encode(photo(40, 30), "PNG")), "threshold": 0.0}  # after the storm: a size the model has not run


def js(value) -> bytes:
    return json.dumps(value).encode()


def seeds() -> list[Case]:
    """The cases found by earlier fuzz runs and the ones the contract names; each door gets all of them."""
    valid = js(VALID)
    cases = [Case(f"bare {text}", text.encode()) for text in
             ("2", "1e+308", "-0", "true", "false", "null", '"string"', '""', "[]", "{}", "1e999", "-1e999")]
    cases += [
        Case("array 5000 deep", b"[" * 5000 + b"]" * 5000),
        Case("object 5000 deep", b'{"a":' * 5000 + b"1" + b"}" * 5000),
        Case("array 5000 deep, unclosed", b"[" * 5000),
        Case("image 5000 deep", b'{"image": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
        Case("array 900 deep", b"[" * 900 + b"]" * 900),
        Case("invalid UTF-8", b'{"image": "\xff\xfe\xfd"}'),
        Case("invalid UTF-8 alone", b"\xff\xfe\x00\x80"),
        Case("UTF-16 with a BOM", '{"image": "x"}'.encode("utf-16")),
        Case("lone surrogate", b'{"image": "\\ud800"}'),
        Case("huge integer", b"1" * 5000),
        Case("huge integer threshold", b'{"image": "' + b64(PNG).encode() + b'", "threshold": ' + b"9" * 5000 + b"}"),
        Case("huge float", b"1" + b"0" * 400 + b".5"),
        Case("NaN", b"NaN"), Case("Infinity", b"Infinity"), Case("-Infinity", b"-Infinity"),
        Case("NaN threshold", b'{"image": "' + b64(PNG).encode() + b'", "threshold": NaN}'),
        Case("Infinity threshold", b'{"image": "' + b64(PNG).encode() + b'", "threshold": Infinity}'),
        Case("empty body", b""), Case("blank body", b" \n\t "), Case("empty body, no type", b"", None),
        Case("not JSON", b"{not json"), Case("trailing garbage", valid + b"}}"), Case("two objects", valid * 2),
        Case("no image", js({"threshold": 0.5})), Case("empty image", js({"image": ""})),
        Case("bad base64", js({"image": "***"})), Case("base64 with spaces", js({"image": "iVBO Rw0K"})),
        Case("base64, non-ASCII", js({"image": "ÿÿÿÿ"})), Case("data URL", js({"image": "data:image/png;base64,"
                                                                                      + b64(PNG)})),
        Case("base64 of text", js({"image": b64(b"plain text, not an image")})),
        Case("base64 of a GIF header", js({"image": b64(b"GIF89a but broken")})),
        Case("base64 of nothing but a PNG signature", js({"image": b64(PNG[:8])})),
        Case("truncated PNG", js({"image": b64(PNG[: len(PNG) // 2])})),
        Case("truncated PNG header", js({"image": b64(PNG[:30])})),
        Case("truncated JPEG", js({"image": b64(JPEG[: len(JPEG) // 2])})),
        Case("truncated JPEG header", js({"image": b64(JPEG[:20])})),
        Case("20000x20000 PNG", js({"image": b64(png_of_size(20000, 20000))}), expect=(413,)),
        Case("9000x9000 PNG", js({"image": b64(png_of_size(9000, 9000))}), expect=(413,)),
        Case("0x0 PNG header", js({"image": b64(png_of_size(0, 0))})),
        Case("1x20000 PNG", js({"image": b64(encode(photo(1, 20000), "PNG"))}), expect=(400,)),
        Case("20000x1 JPEG", js({"image": b64(encode(photo(20000, 1)))}), expect=(400,)),
        Case("1x1 PNG", js({"image": b64(encode(photo(1, 1), "PNG"))}), expect=(200,)),
        Case("valid as text/plain", valid, "text/plain", expect=(200,)),
        Case("valid, no content type", valid, None, expect=(200,)),
        Case("valid with charset", valid, "application/json; charset=utf-8", expect=(200,)),
        Case("number as text/plain", b"2", "text/plain"), Case("deep as text/plain", b"[" * 5000, "text/plain"),
        Case("form body", b"image=abc&threshold=0.5", "application/x-www-form-urlencoded"),
        Case("multipart body", b"--x\r\nContent-Disposition: form-data; name=image\r\n\r\nabc\r\n--x--",
             "multipart/form-data; boundary=x"),
        Case("an image file as the body", PNG, "image/png"),
        Case("valid, GET", valid, method="GET", expect=(405,)),
        Case("valid, PUT", valid, method="PUT", expect=(405,)),
        Case("valid, /nothing", valid, path="/nothing", expect=(404,)),
        Case("valid, query string", valid, path="/?threshold=abc", expect=(200,)),
    ]
    for name, value in [("image null", None), ("image number", 12), ("image true", True), ("image list", [b64(PNG)]),
                        ("image object", {"data": b64(PNG)}), ("image NaN", float("nan"))]:
        cases.append(Case(name, js({"image": value})))
    for name, value in [("threshold string", "0.5"), ("threshold true", True), ("threshold list", [0.5]),
                        ("threshold object", {}), ("threshold 2", 2), ("threshold -0.1", -0.1),
                        ("threshold 1e+308", 1e308), ("threshold long string", "x" * 10000)]:
        cases.append(Case(name, js({"image": b64(PNG), "threshold": value})))
    # the other routes
    cases += [
        Case("health", b"", None, "GET", "/health", expect=(200,)),
        Case("models", b"", None, "GET", "/models", expect=(200,)),
        Case("health, POST", b"2", path="/health", expect=(405,)),
        Case("train, garbage", b"[" * 5000, path="/train", expect=(403,)),
        Case("train, number", b"2", path="/train", expect=(403,)),
        Case("train, valid-looking", js({"tasks": [1]}), path="/train", expect=(403,)),
        Case("jobs", b"", None, "GET", "/jobs", expect=(403,)),
        Case("cancel", b"", None, "POST", "/jobs/x/cancel", expect=(403,)),
        Case("cron, garbage", b"\xff", path="/cron", expect=(403,)),
    ]
    return cases


def webhook_cases(secret: str | None) -> list[Case]:
    """Garbage to ``POST /webhook``: without a secret the function refuses every delivery (403); with one, an unsigned
    or forged one is a 401, a signed one that is not a CVAT payload a 400."""
    bodies = [b"", b"2", b"null", b"[" * 5000, b'{"a":' * 5000, b"\xff\xfe", b"{not json", js([1, 2]), js({"x": 1}),
              js({"event": 5}) + b"x", b"1" * 5000]
    if secret is None:
        return [Case(f"webhook {body[:12]!r}", body, path="/webhook", expect=(403,)) for body in bodies]
    cases = [Case(f"webhook unsigned {body[:12]!r}", body, path="/webhook", expect=(401,)) for body in bodies]
    cases += [Case(f"webhook forged {body[:12]!r}", body, path="/webhook", expect=(401,),
                   headers={"X-Signature-256": "sha256=" + "0" * 64}) for body in bodies]
    cases += [Case("webhook bad header", b"{}", path="/webhook", expect=(401,), headers={"X-Signature-256": "\x7f"})]
    return cases


def signed_webhook_cases(secret: str, signed_bytes) -> list[Case]:
    """Deliveries signed with the secret (``signed_bytes``: the bytes the door checks) that are not CVAT payloads."""
    bodies = [b"2", b"null", b'"event"', b"[" * 5000, b"\xff\xfe", b"{not json", js([1, 2]), js({"x": 1}),
              js({"event": "ping"})]
    return [Case(f"webhook signed {body[:12]!r}", body, path="/webhook", expect=(200, 400),
                 headers={"X-Signature-256": "sha256=" + hmac.new(secret.encode(), signed_bytes(body),
                                                                 hashlib.sha256).hexdigest()}) for body in bodies]


def random_json(rng: random.Random, depth: int = 0):
    kind = rng.randrange(10 if depth < 3 else 7)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice([0, -1, 1, 2, 10 ** 300, -(10 ** 30), 2 ** 63])
    if kind == 3:
        return rng.choice([0.5, -0.0, 1e308, 1e-308, float("nan"), float("inf"), -float("inf"), 0.99])
    if kind in (4, 5):
        return rng.choice(["", "x", "0.5", "\ud800", "ÿ", "=" * 7, "A" * rng.randrange(1, 64), b64(PNG)[:17],
                           "\x00", "true"])
    if kind == 6:
        return b64(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 48))))
    if kind in (7, 8):
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(["image", "threshold", "", "x", "é"]): random_json(rng, depth + 1) for _ in range(3)}


def mutate(rng: random.Random) -> Case:
    """One random mutation of a valid request."""
    valid = js(VALID)
    how = rng.randrange(9)
    if how == 0:  # bit flips
        data = bytearray(valid)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        body, name = bytes(data), "bit flips"
    elif how == 1:  # truncation
        body, name = valid[: rng.randrange(len(valid))], "truncated"
    elif how == 2:  # duplicated keys, the last one wins
        key = rng.choice(["image", "threshold"])
        body, name = valid[:-1] + b", " + js(key) + b": " + js(random_json(rng)) + b"}", f"duplicate {key}"
    elif how == 3:  # extra keys
        extra = {f"k{i}": random_json(rng) for i in range(rng.randint(1, 4))}
        body, name = js({**VALID, **extra}), "extra keys"
    elif how == 4:  # a field of another type
        key = rng.choice(["image", "threshold"])
        body, name = js({**VALID, key: random_json(rng)}), f"random {key}"
    elif how == 5:  # bytes inserted or deleted
        data = bytearray(valid)
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(data))
            if rng.random() < 0.5:
                del data[at: at + rng.randint(1, 8)]
            else:
                data[at:at] = rng.choice([b"\x00", b"\xff", b"[", b"{", b'"', b"\\", b",", b"]]]", b"\\u12"])
        body, name = bytes(data), "bytes in and out"
    elif how == 6:  # a damaged image file inside a valid request
        image = bytearray(rng.choice([PNG, JPEG]))
        if rng.random() < 0.5:
            image = image[: rng.randrange(1, len(image))]
        else:
            for _ in range(rng.randint(1, 8)):
                image[rng.randrange(len(image))] = rng.randrange(256)
        body, name = js({**VALID, "image": b64(bytes(image))}), "damaged image"
    elif how == 7:  # random JSON in place of the whole body
        body, name = js(random_json(rng)), "random JSON"
    else:  # random bytes
        body, name = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))), "random bytes"
    content_type = rng.choice(["application/json"] * 6 + ["text/plain", None, "application/json; charset=utf-8",
                                                          "APPLICATION/JSON", "application/octet-stream"])
    return Case(f"mutation: {name}", body, content_type)


def check(case: Case, status: int, text: bytes | str) -> None:
    where = f"{case.name} ({case.method} {case.path}, {case.content_type}): {status} {str(text)[:300]}"
    assert status < 500 and status in case.expect, where
    reply = json.loads(text)
    if status >= 400:
        assert isinstance(reply, dict) and isinstance(reply.get("error"), str) and reply["error"], where
        assert not LEAKS.search(reply["error"]), where
        assert len(reply["error"]) < 400, where
    elif case.path == "/":
        assert isinstance(reply, list), where


def run_the_model_once_per_image_size(app: App, monkeypatch) -> None:
    """The real model runs once on each size of image the storm gets through to it (at threshold 0; a higher one
    filters that answer): what a request can break is decoding, and a forward pass takes a second on a busy machine."""
    detector = app.provider.current()
    real, answers = detector.detect, {}

    def detect(images, threshold):
        assert all(image.mode == "RGB" for image in images) and 0.0 <= threshold <= 1.0
        key = tuple(image.size for image in images)
        if key not in answers:
            answers[key] = real(images, 0.0)
        return [[shape for shape in shapes if shape.score >= threshold] for shapes in answers[key]]

    monkeypatch.setattr(detector, "detect", detect)


def storm(rng: random.Random, cases: list[Case]) -> list[Case]:
    cases = cases + [mutate(rng) for _ in range(MUTATIONS)]
    rng.shuffle(cases)
    return cases


# ---------------------------------------------------------------- preannotate serve


@pytest.fixture
def server(published_store, tmp_path, monkeypatch):
    app = App(ModelProvider("boxes", published_store))
    # no API token (POST /train is 403) and no webhook secret (every delivery is 403)
    TrainingRoutes(app, JobStore(tmp_path), runner=None, environ={})
    run_the_model_once_per_image_size(app, monkeypatch)
    httpd = make_server(app, "127.0.0.1", 0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()


def raw_exchange(port: int, data: bytes) -> bytes:
    """Bytes to the server as they are, then the end of the stream; what it answers until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk_ := sock.recv(65536):
            answer += chunk_
    return answer


def test_malformed_requests_to_the_local_server(server):
    rng = random.Random(SEED)
    cases = storm(rng, seeds() + webhook_cases(None))
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", server, timeout=60)
    for case in cases:
        headers = dict(case.headers)
        if case.content_type is not None:
            headers["Content-Type"] = case.content_type
        # a dropped connection raises here (RemoteDisconnected, ConnectionResetError): the test fails
        connection.request(case.method, case.path, body=case.body if case.method != "GET" else None, headers=headers)
        response = connection.getresponse()
        text = response.read()
        assert response.getheader("Content-Type") == "application/json", case.name
        check(case, response.status, text)
        if response.will_close:
            connection.close()
            connection = http.client.HTTPConnection("127.0.0.1", server, timeout=60)
    # What http.client would not send: the HTTP layer itself malformed.
    for name, data, expected in [
        ("Content-Length not a number", b"POST / HTTP/1.1\r\nContent-Length: abc\r\n\r\n{}", 400),
        ("negative Content-Length", b"POST / HTTP/1.1\r\nContent-Length: -5\r\n\r\n{}", 400),
        ("Content-Length in unicode digits", "POST / HTTP/1.1\r\nContent-Length: ²\r\n\r\n".encode(), 400),
        ("huge Content-Length", b"POST / HTTP/1.1\r\nContent-Length: " + b"9" * 40 + b"\r\n\r\n{}", 413),
        ("body shorter than its Content-Length", b"POST / HTTP/1.1\r\nContent-Length: 100\r\n\r\n{}", 400),
        ("chunked body", b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n", 411),
        ("request line of four words", b"GET / HTTP/1.1 extra\r\n\r\n", 400),
        ("not an HTTP version", b"GET / XTTP/1.1\r\n\r\n", 400),
        ("header line without a colon", b"POST / HTTP/1.1\r\nContent-Length 2\r\n\r\n{}", 400),
        ("unknown method", b"FROB / HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 405),
        ("not a URL", b"POST http://[x/ HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}", 400),
    ]:
        answer = raw_exchange(server, data)
        head, _, text = answer.partition(b"\r\n\r\n")
        match = re.match(rb"HTTP/1\.[01] (\d{3}) ", head)
        assert match, f"{name}: no answer ({answer[:200]!r})"
        length = re.search(rb"\r\nContent-Length: (\d+)", head)
        text = text[: int(length.group(1))] if length else text  # the first answer (more may follow)
        check(Case(name, expect=(expected,)), int(match.group(1)), text)
    # A valid request is answered after the storm, on the same connection as before.
    connection.request("POST", "/", body=js(AFTER), headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200 and isinstance(json.loads(response.read()), list)
    connection.close()
    print(f"{len(cases)} requests and the raw ones in {time.perf_counter() - started:.1f}s")


# ---------------------------------------------------------------- the Nuclio handler


def as_nuclio_delivers(body: bytes, content_type: str | None):
    """The event body the handler gets: Nuclio decodes an ``application/json`` body when it can, else keeps bytes
    (nuclio_sdk's ``_try_deserialize_json``)."""
    if content_type == "application/json":
        try:
            return json.loads(body.decode("utf-8"))
        except Exception:  # what Nuclio does: any failure leaves the bytes
            return body
    return body


@pytest.fixture
def function(monkeypatch, published_store):
    monkeypatch.setenv("PREANNOTATE_MODEL", "boxes")
    monkeypatch.setenv("PREANNOTATE_MODEL_STORE", str(published_store.root))
    monkeypatch.setenv("PREANNOTATE_WEBHOOK_SECRET", SECRET)  # deliveries are checked: 401 unsigned, 400 not CVAT's
    monkeypatch.delenv("PREANNOTATE_API_TOKEN", raising=False)
    monkeypatch.delenv("PREANNOTATE_API_AUTH", raising=False)
    platform = nuclio_sdk.test.Platform()
    yield platform
    training = getattr(platform._get_handler_context(nuclio.handler).user_data, "training", None)
    if training is not None and training.runner is not None:
        training.runner.stop()


def call(platform, case: Case):
    event = nuclio_sdk.Event(body=as_nuclio_delivers(case.body, case.content_type), content_type=case.content_type,
                             method=case.method, path=case.path, headers=dict(case.headers))
    response = platform.call_handler(nuclio.handler, event)
    assert isinstance(response, nuclio_sdk.Response) and response.content_type == "application/json", case.name
    return response.status_code, response.body


def test_malformed_events_to_the_nuclio_handler(function, monkeypatch):
    from preannotate.cvat.webhooks import signed_body

    def nuclio_signed(body: bytes) -> bytes:  # the bytes the function checks the signature of (no raw body there)
        delivered = as_nuclio_delivers(body, "application/json")
        return signed_body(delivered if isinstance(delivered, (dict, list, bytes)) else body)

    rng = random.Random(SEED + 1)
    cases = storm(rng, seeds() + webhook_cases(SECRET) + signed_webhook_cases(SECRET, nuclio_signed))
    started = time.perf_counter()
    assert call(function, Case("health", method="GET", path="/health", expect=(200,)))[0] == 200  # init_context
    run_the_model_once_per_image_size(function._get_handler_context(nuclio.handler).user_data.app, monkeypatch)
    for case in cases:
        check(case, *call(function, case))
    status, text = call(function, Case("valid", js(AFTER)))
    assert status == 200 and isinstance(json.loads(text), list)
    print(f"{len(cases)} events in {time.perf_counter() - started:.1f}s")

