"""The Nuclio dashboard client (``preannotate.cvat.dashboard``) against the stand-in dashboard."""

from __future__ import annotations

import json
import socket

import pytest
import urllib3
from preannotate.cvat.dashboard import (
    DASHBOARD_ENV,
    DashboardError,
    NuclioDashboard,
    function_name_from_environment,
)

from tests import nuclio_dashboard_double
from tests.nuclio_dashboard_double import NuclioDashboardDouble

nuclio_dashboard = nuclio_dashboard_double.nuclio_dashboard  # the fixture, for this module

NAME = "pth-preannotate-fasterrcnn-resnet50-fpn"
IMAGE = "cvat.preannotate.fasterrcnn_resnet50_fpn:latest"
OLD_SPEC = '[\n  {"id": 1, "name": "person", "type": "rectangle", "attributes": []}\n]\n'
NEW_SPEC = ('[\n  {"id": 1, "name": "person", "type": "rectangle", "attributes": []},\n'
            '  {"name": "scooter", "type": "rectangle", "attributes": []}\n]\n')


def function_yaml(name: str = NAME) -> dict:
    """A function.yaml as ours render it (functions/pytorch/*/nuclio/function.yaml), trimmed."""
    return {
        "metadata": {
            "name": name,
            "namespace": "cvat",
            "labels": {"nuclio.io/project-name": "cvat"},
            "annotations": {"name": "fasterrcnn_resnet50_fpn (preannotate)", "type": "detector",
                            "framework": "pytorch", "spec": OLD_SPEC},
        },
        "spec": {
            "description": "Faster R-CNN",
            "runtime": "python:3.11",
            "handler": "main:handler",
            "eventTimeout": "60s",
            "env": [{"name": "PREANNOTATE_MODEL", "value": "fasterrcnn_resnet50_fpn"},
                    {"name": "PREANNOTATE_FUNCTION_LABELS", "value": '["person"]'},
                    {"name": "PREANNOTATE_DEVICE", "value": "cpu"}],
            "build": {"image": IMAGE, "baseImage": "cvat.preannotate.base:cpu",
                      "directives": {"postCopy": [{"kind": "RUN", "value": "preannotate models fetch-weights x"}]}},
            "triggers": {"myHttpTrigger": {"kind": "http", "numWorkers": 2}},
            "platform": {"attributes": {"mountMode": "volume"}},
        },
    }


def raw(double: NuclioDashboardDouble, method: str, path: str, body: dict | None = None, **headers: str):
    return urllib3.request(method, double.url + path, body=None if body is None else json.dumps(body).encode(),
                           headers={key.replace("_", "-"): value for key, value in headers.items()}, retries=False)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_get_function_reads_the_config_cvat_reads(nuclio_dashboard):
    nuclio_dashboard.add_function(function_yaml())
    config = NuclioDashboard(nuclio_dashboard.url).get_function(NAME)

    assert config["metadata"]["name"] == NAME
    assert config["metadata"]["namespace"] == "nuclio"  # nuctl deploy's --namespace, not the file's
    assert config["metadata"]["annotations"]["spec"] == OLD_SPEC
    assert config["spec"]["image"] == IMAGE
    assert config["status"] == {"state": "ready", "httpPort": 32768}
    (request,) = nuclio_dashboard.requests
    assert (request.method, request.path) == ("GET", f"/api/functions/{NAME}")
    assert request.headers["x-nuclio-project-name"] == "cvat"
    assert "x-nuclio-function-namespace" not in request.headers


def test_update_changes_the_spec_and_named_env_and_keeps_the_rest(nuclio_dashboard):
    nuclio_dashboard.add_function(function_yaml())
    before = nuclio_dashboard.function(NAME)

    sent = NuclioDashboard(nuclio_dashboard.url).update_function(
        NAME, annotations={"spec": NEW_SPEC},
        env={"PREANNOTATE_FUNCTION_LABELS": '["person", "scooter"]', "PREANNOTATE_NEW": "1"})

    assert [(r.method, r.path) for r in nuclio_dashboard.requests] == [
        ("GET", f"/api/functions/{NAME}"), ("PUT", f"/api/functions/{NAME}")]
    put = nuclio_dashboard.requests[1]
    assert put.body == sent
    assert put.headers["x-nuclio-project-name"] == "cvat"
    assert put.headers["content-type"] == "application/json"
    assert "x-nuclio-wait-function-action" not in put.headers
    assert "status" not in put.body
    assert put.body["spec"]["build"]["mode"] == "neverBuild"
    assert put.body["spec"]["image"] == IMAGE

    nuclio_dashboard.settle()
    after = nuclio_dashboard.function(NAME)
    annotations = after["metadata"]["annotations"]
    assert list(annotations) == ["name", "type", "framework", "spec"]  # same keys, same order
    assert annotations["spec"] == NEW_SPEC
    assert {k: v for k, v in annotations.items() if k != "spec"} == {
        "name": "fasterrcnn_resnet50_fpn (preannotate)", "type": "detector", "framework": "pytorch"}
    assert after["spec"]["env"] == [
        {"name": "PREANNOTATE_MODEL", "value": "fasterrcnn_resnet50_fpn"},
        {"name": "PREANNOTATE_FUNCTION_LABELS", "value": '["person", "scooter"]'},
        {"name": "PREANNOTATE_DEVICE", "value": "cpu"},
        {"name": "PREANNOTATE_NEW", "value": "1"},
    ]
    # Redeployed from the built image, not rebuilt; the mode is not stored (Nuclio clears it).
    assert nuclio_dashboard.deploys == [NAME]
    assert nuclio_dashboard.builds == []
    assert after["spec"]["image"] == IMAGE
    assert after["spec"]["build"] == before["spec"]["build"]
    assert {k: v for k, v in after["spec"].items() if k != "env"} == \
        {k: v for k, v in before["spec"].items() if k != "env"}
    assert after["metadata"]["labels"] == {"nuclio.io/project-name": "cvat"}
    assert after["status"] == {"state": "ready", "httpPort": 32768}


def test_what_cvat_lists_after_an_update(nuclio_dashboard):
    nuclio_dashboard.add_function(function_yaml())
    nuclio_dashboard.add_function(function_yaml("other-project-function"), project="elsewhere")
    NuclioDashboard(nuclio_dashboard.url).update_function(NAME, annotations={"spec": NEW_SPEC}, wait=True)

    # As CVAT's LambdaGateway.list asks (cvat/apps/lambda_manager/views.py).
    answer = raw(nuclio_dashboard, "GET", "/api/functions", x_nuclio_project_name="cvat",
                 x_nuclio_function_namespace="nuclio")
    assert answer.status == 200
    listed = answer.json()
    assert list(listed) == [NAME]
    spec = json.loads(listed[NAME]["metadata"]["annotations"]["spec"])
    assert [label["name"] for label in spec] == ["person", "scooter"]
    assert listed[NAME]["status"]["state"] == "ready"


def test_the_state_goes_through_building(nuclio_dashboard):
    nuclio_dashboard.deploy_seconds = 0.5
    nuclio_dashboard.add_function(function_yaml())
    NuclioDashboard(nuclio_dashboard.url).update_function(NAME, annotations={"spec": NEW_SPEC})
    assert nuclio_dashboard.function(NAME)["status"] == {"state": "building"}
    nuclio_dashboard.settle()
    assert nuclio_dashboard.function(NAME)["status"]["state"] == "ready"


def test_wait_answers_after_the_redeploy(nuclio_dashboard):
    nuclio_dashboard.deploy_seconds = 30  # would still be building without the wait header
    nuclio_dashboard.add_function(function_yaml())
    NuclioDashboard(nuclio_dashboard.url).update_function(NAME, annotations={"spec": NEW_SPEC}, wait=True)
    assert nuclio_dashboard.requests[1].headers["x-nuclio-wait-function-action"] == "true"
    assert nuclio_dashboard.function(NAME)["status"]["state"] == "ready"


def test_wait_reports_a_failed_redeploy(nuclio_dashboard):
    nuclio_dashboard.add_function(function_yaml())
    nuclio_dashboard.fail_next_deploy = "Failed to run function container: image not found"
    with pytest.raises(DashboardError) as caught:
        NuclioDashboard(nuclio_dashboard.url).update_function(NAME, annotations={"spec": NEW_SPEC}, wait=True)
    message = str(caught.value)
    assert f"could not redeploy function {NAME}" in message
    assert "state error" in message and "image not found" in message


def test_a_plain_put_would_rebuild(nuclio_dashboard):
    # The rule the client works around: without neverBuild, a spec.build.image means a build.
    nuclio_dashboard.add_function(function_yaml())
    config = nuclio_dashboard.function(NAME)
    del config["status"]
    answer = raw(nuclio_dashboard, "PUT", f"/api/functions/{NAME}", config, x_nuclio_project_name="cvat")
    assert (answer.status, answer.data, answer.headers["Content-Type"]) == (202, b"", "application/json")
    assert nuclio_dashboard.builds == [NAME]


def test_nothing_is_sent_when_nothing_changes(nuclio_dashboard):
    nuclio_dashboard.add_function(function_yaml())
    sent = NuclioDashboard(nuclio_dashboard.url).update_function(
        NAME, annotations={"spec": OLD_SPEC}, env={"PREANNOTATE_DEVICE": "cpu"})
    assert [r.method for r in nuclio_dashboard.requests] == ["GET"]
    assert nuclio_dashboard.deploys == []
    assert sent["metadata"]["annotations"]["spec"] == OLD_SPEC


def test_a_literal_value_replaces_a_reference(nuclio_dashboard):
    config = function_yaml()
    config["spec"]["env"][2] = {"name": "PREANNOTATE_DEVICE",
                                "valueFrom": {"configMapKeyRef": {"name": "preannotate", "key": "device"}}}
    nuclio_dashboard.add_function(config)
    NuclioDashboard(nuclio_dashboard.url).update_function(NAME, env={"PREANNOTATE_DEVICE": "cuda"})
    nuclio_dashboard.settle()
    assert nuclio_dashboard.function(NAME)["spec"]["env"][2] == {"name": "PREANNOTATE_DEVICE", "value": "cuda"}


def test_missing_function_names_it(nuclio_dashboard):
    nuclio_dashboard.add_function(function_yaml("in-another-project"), project="elsewhere")
    dashboard = NuclioDashboard(nuclio_dashboard.url)
    for name in ("no-such-function", "in-another-project"):
        with pytest.raises(DashboardError) as caught:
            dashboard.update_function(name, annotations={"spec": NEW_SPEC})
        assert f"no function {name} in Nuclio project cvat (the dashboard's default namespace" in str(caught.value)
        assert nuclio_dashboard.url in str(caught.value)
    assert [r.method for r in nuclio_dashboard.requests] == ["GET", "GET"]


def test_the_namespace_header_is_sent(nuclio_dashboard):
    nuclio_dashboard.add_function(function_yaml(), namespace="cvat-functions")
    with pytest.raises(DashboardError, match=f"no function {NAME} in Nuclio project cvat \\(the dashboard's default "
                                             "namespace, "):
        NuclioDashboard(nuclio_dashboard.url).get_function(NAME)  # not in the default namespace
    config = NuclioDashboard(nuclio_dashboard.url, namespace="cvat-functions").get_function(NAME)
    assert config["metadata"]["namespace"] == "cvat-functions"
    assert nuclio_dashboard.requests[-1].headers["x-nuclio-function-namespace"] == "cvat-functions"


def test_a_function_without_a_built_image_is_not_updated(nuclio_dashboard):
    config = function_yaml()
    config["spec"]["image"] = ""
    nuclio_dashboard.add_function(config)
    with pytest.raises(DashboardError, match=f"function {NAME} .* has no built image"):
        NuclioDashboard(nuclio_dashboard.url).update_function(NAME, annotations={"spec": NEW_SPEC})
    assert [r.method for r in nuclio_dashboard.requests] == ["GET"]


def test_a_function_changed_meanwhile_is_not_overwritten(nuclio_dashboard):
    config = function_yaml()
    config["metadata"]["resourceVersion"] = "7"  # as on Kubernetes
    nuclio_dashboard.add_function(config)
    dashboard = NuclioDashboard(nuclio_dashboard.url)
    read = dashboard.get_function

    def get_then_someone_else_updates(name):
        config = read(name)
        other = {"metadata": config["metadata"], "spec": {**config["spec"], "build": {"mode": "neverBuild"}}}
        assert raw(nuclio_dashboard, "PUT", f"/api/functions/{name}", other).status == 202
        return config

    dashboard.get_function = get_then_someone_else_updates
    with pytest.raises(DashboardError, match=f"function {NAME} was changed in Nuclio.*409"):
        dashboard.update_function(NAME, annotations={"spec": NEW_SPEC})
    nuclio_dashboard.settle()
    assert nuclio_dashboard.function(NAME)["metadata"]["annotations"]["spec"] == OLD_SPEC


def test_dashboard_down_names_the_url():
    url = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(DashboardError) as caught:
        NuclioDashboard(url, timeout=2).get_function(NAME)
    message = str(caught.value)
    assert f"cannot connect to the Nuclio dashboard at {url}/api/functions/{NAME}" in message
    assert DASHBOARD_ENV in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_a_dashboard_that_does_not_answer_times_out():
    with socket.socket() as sock:  # listens, never answers
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        with pytest.raises(DashboardError) as caught:
            NuclioDashboard(url, timeout=0.3).get_function(NAME)
    assert f"the Nuclio dashboard at {url}/api/functions/{NAME} did not answer within 0.3 s" in str(caught.value)


def test_something_else_at_the_address(nuclio_dashboard):
    url = nuclio_dashboard.url + "/v1"
    with pytest.raises(DashboardError) as caught:
        NuclioDashboard(url).get_function(NAME)  # not a route: chi's text 404, not the dashboard's JSON one
    assert str(caught.value).startswith(f"the server at {url} does not look like a Nuclio dashboard (GET "
                                        f"{url}/api/functions/{NAME} answered 404: 404 page not found)")


def test_the_double_answers_other_methods_405(nuclio_dashboard):
    answer = raw(nuclio_dashboard, "POST", f"/api/functions/{NAME}", {})
    assert (answer.status, answer.data) == (405, b"")


def test_non_string_values_are_refused(nuclio_dashboard):
    nuclio_dashboard.add_function(function_yaml())
    with pytest.raises(TypeError, match="annotation version must be a string"):
        NuclioDashboard(nuclio_dashboard.url).update_function(NAME, annotations={"version": 2})


def test_from_environment():
    assert NuclioDashboard.from_environment({}) is None
    assert NuclioDashboard.from_environment({DASHBOARD_ENV: ""}) is None
    assert NuclioDashboard.from_environment({DASHBOARD_ENV: "  "}) is None
    dashboard = NuclioDashboard.from_environment({DASHBOARD_ENV: "http://nuclio:8070/"})
    assert (dashboard.url, dashboard.project, dashboard.namespace) == ("http://nuclio:8070", "cvat", None)
    assert NuclioDashboard.from_environment({DASHBOARD_ENV: "nuclio"}).url == "http://nuclio:8070"
    assert NuclioDashboard.from_environment({DASHBOARD_ENV: "dash:9000"}).url == "http://dash:9000"
    assert NuclioDashboard.from_environment({DASHBOARD_ENV: "https://nuclio.example"}).url == \
        "https://nuclio.example"
    assert NuclioDashboard.from_environment(
        {DASHBOARD_ENV: "http://nuclio:8070", "PREANNOTATE_NUCLIO_NAMESPACE": "nuclio-cvat"}).namespace == \
        "nuclio-cvat"
    with pytest.raises(DashboardError, match=f"not an http\\(s\\) URL; set {DASHBOARD_ENV}"):
        NuclioDashboard.from_environment({DASHBOARD_ENV: "ftp://nuclio:8070"})


def test_from_environment_reaches_the_dashboard(nuclio_dashboard):
    nuclio_dashboard.add_function(function_yaml())
    env = {DASHBOARD_ENV: nuclio_dashboard.url, "NUCLIO_FUNCTION_NAME": NAME}
    dashboard = NuclioDashboard.from_environment(env)
    assert dashboard.get_function(function_name_from_environment(env))["metadata"]["name"] == NAME


def test_function_name_from_environment():
    assert function_name_from_environment({"NUCLIO_FUNCTION_NAME": NAME, "PREANNOTATE_FUNCTION_NAME": "x"}) == NAME
    assert function_name_from_environment({"NUCLIO_FUNCTION_NAME": "", "PREANNOTATE_FUNCTION_NAME": "x"}) == "x"
    assert function_name_from_environment({"PREANNOTATE_FUNCTION_NAME": " y "}) == "y"
    assert function_name_from_environment({}) is None
    assert function_name_from_environment({"NUCLIO_FUNCTION_VERSION": "3"}) is None
