"""connect() and cvat_errors() against the CVAT 2.42 double, through the real cvat-sdk client."""

from __future__ import annotations

import io
import json
import logging
import socket

import pytest
import urllib3
from preannotate.cvat.client import CvatError, connect, cvat_errors

from tests import cvat_double as double_module

cvat_double = double_module.cvat_double

_ENV = ("CVAT_URL", "CVAT_USERNAME", "CVAT_PASSWORD", "CVAT_ACCESS_TOKEN", "CVAT_ORG")


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch):
    for name in _ENV:
        monkeypatch.delenv(name, raising=False)


def api_key(double) -> str:
    """A CVAT API key, as ``POST /api/auth/login`` hands it out."""
    response = urllib3.request("POST", double.base_url + "/api/auth/login",
                               json={"username": "admin", "password": double.password})
    return json.loads(response.data)["key"]


def logged(caplog) -> str:
    return "\n".join(f"{r.name} {r.getMessage()} {r.args}" for r in caplog.records)


@pytest.fixture
def debug_logs(caplog):
    """Everything at DEBUG. Each SDK client resets the ``urllib3`` and ``cvat_sdk.api_client`` loggers to WARNING,
    so the modules' own loggers are set too: their level is the one that counts."""
    for name in (None, "urllib3", "urllib3.connectionpool", "urllib3.util.retry", "cvat_sdk",
                 "cvat_sdk.api_client.rest", "preannotate"):
        caplog.set_level(logging.DEBUG, logger=name)
    return caplog


def test_password_login_opens_a_session(cvat_double, debug_logs):
    with connect(cvat_double.base_url, username="admin", password=cvat_double.password) as client:
        assert {"sessionid", "csrftoken"} <= set(client.api_client.cookies)
        assert client.tasks.retrieve(7).name == "fixtures-images"
        assert client.api_client.configuration.verify_ssl is True
        assert client.organization_slug is None
    with connect(cvat_double.base_url + "/", username="admin", password=cvat_double.password):
        pass
    versions = [r for r in debug_logs.records if "CVAT 2.42.0 at" in r.getMessage()]
    assert len(versions) == 1  # once per server, and no SDK version warning
    assert "not compatible" not in logged(debug_logs)
    assert cvat_double.count("/api/auth/login") == 2


def test_environment_supplies_url_credentials_and_organization(cvat_double, monkeypatch):
    monkeypatch.setenv("CVAT_URL", cvat_double.base_url)
    monkeypatch.setenv("CVAT_USERNAME", "admin")
    monkeypatch.setenv("CVAT_PASSWORD", cvat_double.password)
    monkeypatch.setenv("CVAT_ORG", "fixtures-org")
    with connect(verify_tls=False) as client:
        assert client.organization_slug == "fixtures-org"  # sent as X-Organization on every request
        assert client.api_client.configuration.verify_ssl is False
        assert client.users.retrieve_current_user().username == "admin"
    with connect(organization="") as client:  # explicit: the personal workspace
        assert client.organization_slug == ""


def test_access_token_is_sent_as_token_authorization(cvat_double, monkeypatch):
    key = api_key(cvat_double)
    with connect(cvat_double.base_url, access_token=key) as client:
        assert "sessionid" not in client.api_client.cookies  # no session: only the Token header authenticates
        assert client.tasks.retrieve(8).name == "fixtures-standalone"
    monkeypatch.setenv("CVAT_ACCESS_TOKEN", key)
    monkeypatch.setenv("CVAT_USERNAME", "admin")  # the token from the environment wins over a username there
    with connect(cvat_double.base_url) as client:
        assert client.jobs.retrieve(9).task_id == 8
    assert cvat_double.count("/api/auth/login") == 1  # only the one that made the key


def test_explicit_username_wins_over_an_environment_token(cvat_double, monkeypatch):
    monkeypatch.setenv("CVAT_ACCESS_TOKEN", "f" * 40)  # would be rejected
    monkeypatch.setenv("CVAT_PASSWORD", cvat_double.password)
    with connect(cvat_double.base_url, username="admin") as client:
        assert "sessionid" in client.api_client.cookies


@pytest.mark.parametrize("kwargs, message", [
    ({}, "no CVAT server given"),
    ({"url": "cvat.example.com:8080", "username": "a", "password": "b"}, "needs a scheme"),
    ({"url": "http://127.0.0.1:9"}, "no CVAT credentials"),
    ({"url": "http://127.0.0.1:9", "username": "admin"}, "no CVAT credentials"),
])
def test_missing_settings_are_named(kwargs, message):
    with pytest.raises(CvatError, match=message):
        connect(**kwargs)


def test_refused_connection(debug_logs):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(CvatError, match=rf"cannot connect to CVAT at http://127.0.0.1:{port}: .*refused"):
        connect(f"http://127.0.0.1:{port}", username="admin", password="s3cret-password")
    assert "s3cret-password" not in logged(debug_logs)


def test_a_url_that_is_not_cvat(cvat_double):
    with pytest.raises(CvatError, match=rf"^the CVAT API was not found on {cvat_double.base_url}/web$"):
        connect(cvat_double.base_url + "/web", username="admin", password=cvat_double.password)


def test_wrong_password_names_the_problem_and_hides_the_password(cvat_double, debug_logs):
    secret = "wrong-Pa55word-1234"
    with pytest.raises(CvatError) as error:
        connect(cvat_double.base_url, username="admin", password=secret)
    assert str(error.value) == (f"CVAT at {cvat_double.base_url} rejected the username or password: "
                                "Unable to log in with provided credentials.")
    assert error.value.__cause__ is None and error.value.__suppress_context__
    assert any(r.name.startswith("urllib3") for r in debug_logs.records)  # the HTTP layer did log at DEBUG
    assert secret not in logged(debug_logs)


def test_bad_token_names_the_problem_and_hides_the_token(cvat_double, debug_logs):
    secret = "0123456789abcdef" * 2 + "deadbeef"
    with pytest.raises(CvatError) as error:
        connect(cvat_double.base_url, access_token=secret)
    assert str(error.value) == f"CVAT at {cvat_double.base_url} rejected the credentials: Invalid token. (401)"
    assert any(r.name.startswith("urllib3") for r in debug_logs.records)
    assert secret not in logged(debug_logs) and secret not in repr(error.value)


def test_cvat_errors_translates_statuses(cvat_double):
    with connect(cvat_double.base_url, username="admin", password=cvat_double.password) as client:
        with pytest.raises(CvatError, match=rf"^task 999999 was not found on {cvat_double.base_url}$"):
            with cvat_errors(client, "task 999999"):
                client.tasks.retrieve(999999)
        cvat_double.fail_next(r"^/api/jobs/7$", 403,
                              body={"detail": "You do not have permission to perform this action."})
        with pytest.raises(CvatError, match=r"not allowed to access job 7 on .*: You do not have permission"):
            with cvat_errors(client, "job 7"):
                client.jobs.retrieve(7)
        cvat_double.fail_next(r"^/api/tasks/7$", 500)
        with pytest.raises(CvatError, match=r"answered 500 Internal Server Error for task 7$"):  # HTML body left out
            with cvat_errors(client, "task 7"):
                client.tasks.retrieve(7)
        with pytest.raises(CvatError, match=r"answered 400 Bad Request for chunk 99: Invalid chunk number '99'"):
            with cvat_errors(client, "chunk 99"):
                client.tasks.retrieve(7).download_chunk(99, io.BytesIO())
        with cvat_errors(client, "task 7"):  # nothing to translate
            assert client.tasks.retrieve(7).id == 7
