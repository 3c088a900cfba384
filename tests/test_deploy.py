"""Deploying: the deploy scripts (run with DRY_RUN=1, or against recording stand-ins for docker and nuctl),
`preannotate deploy` for a trained version, the image build step `models fetch-weights`, and training Jobs for
Kubernetes. Nothing here reaches Docker, Nuclio or a cluster."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml
from preannotate import deploy, functions
from preannotate.cli import main as cli
from preannotate.models import ARCHITECTURES
from preannotate.models.artifact import Manifest, ModelStore
from preannotate.shapes import parse_label_list

REPO = Path(__file__).resolve().parents[1]
SECRETS = {"CVAT_URL": "http://cvat_server:8080", "CVAT_USERNAME": "bot", "CVAT_PASSWORD": "pa ss'word",
           "PREANNOTATE_WEBHOOK_SECRET": "hook-secret-123", "PREANNOTATE_API_TOKEN": "token-456"}
TOOLS = ("bash", "dirname", "basename", "find", "sort")


def _tools_only(tmp_path: Path) -> Path:
    """A PATH directory with what the scripts need from the system, and no docker or nuctl."""
    directory = tmp_path / "tools"
    directory.mkdir()
    for tool in TOOLS:
        found = subprocess.run(["bash", "-c", f"command -v {tool}"], capture_output=True, text=True).stdout.strip()
        (directory / tool).symlink_to(found)
    return directory


def _script(variant: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {"PATH": os.environ["PATH"], "DRY_RUN": "1", **(env or {})}
    return subprocess.run(["bash", str(REPO / "deploy" / f"deploy_{variant}.sh"), *args], env=environment,
                          capture_output=True, text=True, timeout=60)


def _option(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def _env_options(command: list[str]) -> dict[str, str]:
    pairs = [command[i + 1] for i, word in enumerate(command) if word == "--env"]
    return dict(pair.split("=", 1) for pair in pairs)


# ------------------------------------------------------------------------------------------ deploy scripts

@pytest.mark.parametrize("variant, filename", [("cpu", "function.yaml"), ("gpu", "function-gpu.yaml")])
def test_script_deploys_every_function_as_cvat_does(variant, filename):
    result = _script(variant)
    assert result.returncode == 0, result.stderr
    commands = [shlex.split(line) for line in result.stdout.splitlines()]
    build, tf_build, create, *deploys, listing = commands
    assert build[:4] == tf_build[:4] == ["docker", "build", "-f", str(REPO / "deploy" / "Dockerfile.base")]
    assert _option(build, "-t") == f"cvat.preannotate.base:{variant}" and build[-1] == str(REPO)
    assert ("TORCH_INDEX=https://download.pytorch.org/whl/cpu" in build) == (variant == "cpu")
    # the TensorFlow functions' base image: the package with TensorFlow, without torch
    assert _option(tf_build, "-t") == f"cvat.preannotate.base-tf:{variant}"
    assert _option(tf_build, "--build-arg") == ("EXTRAS=tf" if variant == "cpu" else "EXTRAS=tf-gpu")
    assert create == ["nuctl", "create", "project", "cvat", "--platform", "local"]
    assert listing == ["nuctl", "get", "function", "--platform", "local"]
    deployed = set()
    for command in deploys:
        assert command[:2] == ["nuctl", "deploy"]
        assert _option(command, "--project-name") == "cvat" and _option(command, "--platform") == "local"
        assert json.loads(_option(command, "--platform-config")) == {"attributes": {"network": "cvat_cvat"}}
        assert "--env" not in command  # nothing set in this environment, nothing passed
        path, config = Path(_option(command, "--path")), Path(_option(command, "--file"))
        assert config == path / filename and config.is_file()
        assert functions.validate_directory(path) == []
        deployed.add(path.parent.name)
    coco = {name for name, arch in ARCHITECTURES.items()  # the others have no labels before training
            if arch.pretrained_kind in ("coco", "imagenet")}
    assert deployed == coco and len(deploys) == len(coco)


def test_script_deploys_the_functions_named_by_architecture_or_function_name():
    result = _script("gpu", "ssdlite320_mobilenet_v3_large", "pth-preannotate-maskrcnn-resnet50-fpn")
    assert result.returncode == 0, result.stderr
    deploys = [shlex.split(line) for line in result.stdout.splitlines() if line.startswith("nuctl deploy")]
    assert [Path(_option(c, "--file")).parts[-3:] for c in deploys] == [
        ("ssdlite320_mobilenet_v3_large", "nuclio", "function-gpu.yaml"),
        ("maskrcnn_resnet50_fpn", "nuclio", "function-gpu.yaml")]
    unknown = _script("cpu", "yolo")
    assert unknown.returncode == 1 and "no function.yaml for 'yolo'" in unknown.stderr and unknown.stdout == ""


def test_script_passes_secrets_from_the_environment_without_printing_them():
    result = _script("cpu", "ssdlite320_mobilenet_v3_large", env={**SECRETS, "NUCLIO_NETWORK": "other_net"})
    assert result.returncode == 0, result.stderr
    for value in ("pa ss'word", "hook-secret-123", "token-456"):
        assert value not in result.stdout
    (command,) = [shlex.split(line) for line in result.stdout.splitlines() if line.startswith("nuctl deploy")]
    assert _env_options(command) == {
        "CVAT_URL": "http://cvat_server:8080", "CVAT_USERNAME": "bot", "CVAT_PASSWORD": "$CVAT_PASSWORD",
        "PREANNOTATE_WEBHOOK_SECRET": "$PREANNOTATE_WEBHOOK_SECRET", "PREANNOTATE_API_TOKEN": "$PREANNOTATE_API_TOKEN"}
    assert json.loads(_option(command, "--platform-config")) == {"attributes": {"network": "other_net"}}
    # the printed line is runnable: the shell expands the reference to the operator's secret
    line = next(line for line in result.stdout.splitlines() if line.startswith("nuctl deploy"))
    echoed = subprocess.run(["bash", "-c", f"printf '%s\\n' {line}"], env={**SECRETS, "PATH": os.environ["PATH"]},
                            capture_output=True, text=True).stdout.splitlines()
    assert "CVAT_PASSWORD=pa ss'word" in echoed


def test_script_runs_docker_and_nuctl_and_creates_the_project_only_once(tmp_path):
    log = tmp_path / "calls.log"
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for tool in ("docker", "nuctl"):  # record each call; `nuctl get project` answers as $PROJECT_EXISTS says
        (stubs / tool).write_text(f'#!/usr/bin/env bash\necho "{tool} $*" >> "{log}"\n'
                                  '[ "$1 $2" != "get project" ] || [ "${PROJECT_EXISTS:-0}" = 1 ]\n')
        (stubs / tool).chmod(0o755)
    path = f"{stubs}:{_tools_only(tmp_path)}"
    for exists in ("0", "1"):
        log.unlink(missing_ok=True)
        result = _script("cpu", "ssdlite320_mobilenet_v3_large", env={"DRY_RUN": "0", "PATH": path,
                                                                      "PROJECT_EXISTS": exists})
        assert result.returncode == 0, result.stderr
        calls = [line.split()[:3] for line in log.read_text().splitlines()]
        expected = [["docker", "build", "-f"], ["nuctl", "get", "project"]]
        expected += [] if exists == "1" else [["nuctl", "create", "project"]]
        assert calls == expected + [["nuctl", "deploy", "--project-name"], ["nuctl", "get", "function"]]


def test_script_without_nuctl_stops_before_doing_anything(tmp_path):
    result = _script("cpu", env={"DRY_RUN": "0", "PATH": str(_tools_only(tmp_path))})
    assert result.returncode == 1 and "is not on PATH" in result.stderr and result.stdout == ""


# ------------------------------------------------------------------------------------------ preannotate deploy

@pytest.fixture
def store(tmp_path):
    """A store with two versions of "Cars_v2" (manifests only: deploying reads nothing else)."""
    store = ModelStore(tmp_path / "store")
    for labels in ("car,person", "car,person,truck"):
        manifest = Manifest(architecture="fasterrcnn_resnet50_fpn", labels=parse_label_list(labels, "rectangle"))
        store.publish("Cars_v2", lambda directory, m=manifest: m)
    return store


def _deploy(capsys, *args: str) -> tuple[int, list[str], str]:
    code = cli(["deploy", *args])
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), captured.err


def test_deploy_renders_a_function_for_the_served_version_and_prints_nuctl(store, tmp_path, capsys, monkeypatch):
    for key, value in SECRETS.items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "fn"
    code, lines, err = _deploy(capsys, "--model", "Cars_v2", "--store", str(store.root), "--out", str(out),
                               "--dry-run")
    assert code == 0, err
    assert lines[0] == f"# function pth-preannotate-cars-v2 rendered in {out}"
    assert shlex.split(lines[1]) == ["nuctl", "create", "project", "cvat", "--platform", "local"]
    command = shlex.split(lines[2])
    assert command[:2] == ["nuctl", "deploy"] and _option(command, "--project-name") == "cvat"
    assert _option(command, "--path") == str(out) and _option(command, "--file") == str(out / "function.yaml")
    assert json.loads(_option(command, "--platform-config")) == {"attributes": {"network": "cvat_cvat"}}
    assert _env_options(command)["CVAT_PASSWORD"] == "$CVAT_PASSWORD" and "pa ss'word" not in "\n".join(lines)
    assert functions.validate_directory(out) == []
    config = yaml.safe_load((out / "function.yaml").read_text())
    assert config["metadata"]["name"] == "pth-preannotate-cars-v2"
    labels = json.loads(config["metadata"]["annotations"]["spec"])
    assert [label["name"] for label in labels] == ["car", "person", "truck"]  # version 2's labels
    env = {e["name"]: e["value"] for e in config["spec"]["env"]}
    assert env["PREANNOTATE_MODEL"] == "Cars_v2" and env["PREANNOTATE_TRAIN_MODEL"] == "fasterrcnn_resnet50_fpn"
    assert not set(SECRETS) & set(env)
    (volume,) = config["spec"]["volumes"]
    assert volume["volume"]["hostPath"]["path"] == str(store.root.resolve())
    assert volume["volumeMount"]["mountPath"] == env["PREANNOTATE_MODEL_STORE"]
    assert config["spec"]["eventTimeout"] == f"{ARCHITECTURES['fasterrcnn_resnet50_fpn'].cpu_timeout_s}s"
    assert "retrain" not in config["spec"]["triggers"]


def test_deploy_a_pinned_version_on_a_gpu_with_cron(store, tmp_path, capsys):
    out = tmp_path / "fn"
    code, lines, err = _deploy(capsys, "--model", "Cars_v2@1", "--store", str(store.root), "--out", str(out),
                               "--gpu", "--cron", "6h", "--train-project", "3", "--dry-run")
    assert code == 0, err
    assert _option(shlex.split(lines[2]), "--file") == str(out / "function-gpu.yaml")
    config = yaml.safe_load((out / "function-gpu.yaml").read_text())
    assert [label["name"] for label in json.loads(config["metadata"]["annotations"]["spec"])] == ["car", "person"]
    env = {e["name"]: e["value"] for e in config["spec"]["env"]}
    assert env["PREANNOTATE_MODEL"] == "Cars_v2@1" and env["PREANNOTATE_TRAIN_PROJECT"] == "3"
    assert config["spec"]["triggers"]["retrain"] == {
        "kind": "cron", "attributes": {"interval": "6h", "event": {"body": '{"trigger": "cron"}'}}}
    assert config["spec"]["resources"]["limits"]["nvidia.com/gpu"] == 1

    code, _, err = _deploy(capsys, "--model", "Cars_v2", "--store", str(store.root), "--out", str(out),
                           "--cron", "0 3 * * *", "--train-project", "3", "--dry-run")
    assert code == 0, err
    cron = yaml.safe_load((out / "function.yaml").read_text())["spec"]["triggers"]["retrain"]
    assert cron["attributes"]["schedule"] == "0 3 * * *" and "interval" not in cron["attributes"]


def test_deploy_on_kubernetes_mounts_the_store_claim(store, tmp_path, capsys):
    out = tmp_path / "fn"
    code, _, err = _deploy(capsys, "--model", "Cars_v2", "--store", str(store.root), "--out", str(out),
                           "--platform", "kube", "--dry-run")
    assert code == 2 and "--store-claim" in err
    code, lines, err = _deploy(capsys, "--model", "Cars_v2", "--store", str(store.root), "--out", str(out),
                               "--platform", "kube", "--store-claim", "preannotate-store", "--namespace", "cvat",
                               "--registry", "registry.local:5000", "--dry-run")
    assert code == 0, err
    assert shlex.split(lines[1]) == ["nuctl", "create", "project", "cvat", "--platform", "kube", "--namespace",
                                     "cvat"]
    command = shlex.split(lines[2])
    assert _option(command, "--platform") == "kube" and _option(command, "--registry") == "registry.local:5000"
    assert "--platform-config" not in command  # the Docker network means nothing on Kubernetes
    (volume,) = yaml.safe_load((out / "function.yaml").read_text())["spec"]["volumes"]
    assert volume["volume"]["persistentVolumeClaim"] == {"claimName": "preannotate-store"}


@pytest.mark.parametrize("args, message", [
    (["--model", "Trucks"], "Trucks has no version yet: deploy it for the CVAT project it learns from with "
                            "--train-project P"),
    (["--model", "Trucks@2"], "no published model named 'Trucks'"),
    (["--model", "Cars_v2@7"], "Cars_v2 has no version '7'"),
    (["--model", "Cars_v2", "--cron", "6h"], "--train-project"),
    ([], "--model NAME[@VERSION]"),
])
def test_deploy_explains_what_is_wrong(store, tmp_path, capsys, args, message):
    code, _, err = _deploy(capsys, *args, "--store", str(store.root), "--out", str(tmp_path / "fn"), "--dry-run")
    assert code == 2 and message in err


def test_deploy_runs_nuctl_and_creates_the_project_when_missing(store, tmp_path, capsys, monkeypatch):
    log = tmp_path / "calls.log"
    nuctl = tmp_path / "bin" / "nuctl"
    nuctl.parent.mkdir()
    nuctl.write_text(f'#!/usr/bin/env bash\necho "$*" >> "{log}"\n[ "$1" != get ]\n')  # no project yet
    nuctl.chmod(0o755)
    monkeypatch.setenv("PATH", f"{nuctl.parent}:{os.environ['PATH']}")
    code, lines, err = _deploy(capsys, "--model", "Cars_v2", "--store", str(store.root), "--out", str(tmp_path / "fn"))
    assert code == 0, err
    calls = [shlex.split(line) for line in log.read_text().splitlines()]
    assert [c[:3] for c in calls] == [["get", "project", "cvat"], ["create", "project", "cvat"],
                                      ["deploy", "--project-name", "cvat"]]
    assert lines[-1] == "deployed pth-preannotate-cars-v2: it appears in CVAT's Models page"


def test_deploy_without_nuctl_says_how_to_get_it(store, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    code, _, err = _deploy(capsys, "--model", "Cars_v2", "--store", str(store.root), "--out", str(tmp_path / "fn"))
    assert code == 2 and "nuctl is not on PATH" in err and "--dry-run" in err


def test_deploy_refuses_a_function_cvat_could_not_list(store, tmp_path):
    long_name = "a" * 50  # pth-preannotate-aaa... is longer than a function name may be
    store.publish(long_name, lambda d: Manifest(architecture="ssdlite320_mobilenet_v3_large",
                                                labels=parse_label_list("car", "rectangle")))
    with pytest.raises(deploy.DeployError, match="metadata.name"):
        deploy.render_model_function(store, long_name, tmp_path / "long")
    assert not (tmp_path / "long").exists()  # nothing written


# ------------------------------------------------------------------------------------------ fetch-weights

def test_fetch_weights_fills_the_torch_cache_or_says_why_not(tmp_path, capsys, monkeypatch):
    import torch
    import torchvision

    arch = ARCHITECTURES["ssdlite320_mobilenet_v3_large"]
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("PREANNOTATE_OFFLINE", "1")
    monkeypatch.delenv("PREANNOTATE_WEIGHTS_DIR", raising=False)
    assert cli(["models", "fetch-weights", arch.name]) == 2
    assert "pretrained weights for ssdlite320_mobilenet_v3_large are not on disk" in capsys.readouterr().err

    # what the image build leaves behind: the file in $TORCH_HOME/hub/checkpoints, found and loadable
    filename = Path(torchvision.models.get_weight(arch.pretrained).url).name
    checkpoint = tmp_path / "torch" / "hub" / "checkpoints" / filename
    checkpoint.parent.mkdir(parents=True)
    torch.save({"head.weight": torch.zeros(2)}, checkpoint)
    assert cli(["models", "fetch-weights", arch.name]) == 0
    assert capsys.readouterr().out.strip() == f"{arch.name}: {checkpoint}"


# ------------------------------------------------------------------------------------------ Kubernetes Jobs

JOB_ID = "20250101-120000-a1b2c3"


def test_training_job_manifest_has_what_batch_v1_requires():
    manifest = deploy.render_training_job(JOB_ID, "registry.local/cvat.preannotate.ssdlite:latest", "store-pvc",
                                          gpu=True, secret="cvat-creds", namespace="cvat")
    assert deploy.validate_training_job(manifest) == []
    assert manifest["apiVersion"] == "batch/v1" and manifest["kind"] == "Job"
    assert manifest["metadata"] == {"name": f"preannotate-train-{JOB_ID}", "namespace": "cvat",
                                    "labels": manifest["spec"]["template"]["metadata"]["labels"]}
    spec = manifest["spec"]
    assert spec["backoffLimit"] == 2 and spec["ttlSecondsAfterFinished"] > 0
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    (container,) = pod["containers"]
    assert container["command"] == ["python", "-m", "preannotate.worker", "run", "/store", JOB_ID]
    assert container["envFrom"] == [{"secretRef": {"name": "cvat-creds"}}]
    assert container["resources"] == {"limits": {"nvidia.com/gpu": 1}}
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["PREANNOTATE_MODEL_STORE"] == "/store" and env["PREANNOTATE_DEVICE"] == "cuda"
    assert {m["name"] for m in container["volumeMounts"]} == {v["name"] for v in pod["volumes"]}
    assert pod["volumes"] == [{"name": "store", "persistentVolumeClaim": {"claimName": "store-pvc"}}]
    assert yaml.safe_load(yaml.safe_dump(manifest, sort_keys=False)) == manifest
    cpu = deploy.render_training_job(JOB_ID, "image", "store-pvc")
    assert "resources" not in cpu["spec"]["template"]["spec"]["containers"][0]


def _kubernetes_schema_problems(manifest) -> list[str]:
    """What Kubernetes' own OpenAPI schemas (strict: no unknown field) say of a manifest, for the oldest and the
    newest version kubernetes-validate ships (offline: the schemas are in the package)."""
    import kubernetes_validate

    versions = sorted(set(kubernetes_validate.utils.all_versions()), key=lambda v: tuple(map(int, v.split("."))))
    problems = []
    for version in (versions[0], versions[-1]):
        try:
            kubernetes_validate.validate(manifest, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            problems.append(f"{version}: {'.'.join(map(str, error.path))}: {error.message}")
    return problems


@pytest.mark.parametrize("options", [{}, {"gpu": True, "namespace": "cvat", "secret": "cvat-creds"}])
def test_training_job_manifest_is_valid_against_the_kubernetes_schema(options, capsys):
    manifest = deploy.render_training_job(JOB_ID, "registry.local/cvat.preannotate.ssdlite:latest", "store-pvc",
                                          **options)
    assert _kubernetes_schema_problems(manifest) == []
    # what `deploy --runner kubernetes --dry-run` prints, as kubectl would read it
    assert cli(["deploy", "--runner", "kubernetes", "--job", JOB_ID, "--image", "reg/preannotate:1",
                "--store-claim", "store-pvc", "--dry-run", *(["--gpu"] if options.get("gpu") else [])]) == 0
    printed = capsys.readouterr().out.partition("\n")[2].removesuffix("EOF\n")
    assert _kubernetes_schema_problems(yaml.safe_load(printed)) == []


@pytest.mark.parametrize("break_it, field", [
    (lambda m: m["spec"].update(backoffLimit="2"), "spec.backoffLimit"),
    (lambda m: m["spec"]["template"]["spec"]["containers"][0].update(volumeMount=[]), "containers.0"),
    (lambda m: m["spec"]["template"]["spec"]["containers"][0]["env"][0].pop("name"), "env.0"),
])
def test_the_kubernetes_schema_check_sees_a_broken_manifest(break_it, field):
    manifest = deploy.render_training_job(JOB_ID, "image", "store-pvc")
    break_it(manifest)
    problems = _kubernetes_schema_problems(manifest)
    assert len(problems) == 2 and all(field in problem for problem in problems), problems


@pytest.mark.parametrize("break_it, problem", [
    (lambda m: m.update(apiVersion="v1"), "batch/v1"),
    (lambda m: m["metadata"].update(name="Train_Job"), "DNS label"),
    (lambda m: m["spec"]["template"]["spec"].update(restartPolicy="Always"), "restartPolicy"),
    (lambda m: m["spec"]["template"]["spec"]["containers"][0].update(command="python -m x"), "command"),
    (lambda m: m["spec"]["template"]["spec"]["volumes"][0].update(name="data"), "not in the pod's volumes"),
    (lambda m: m["spec"].update(backoffLimit=-1), "backoffLimit"),
])
def test_training_job_validator_catches_what_the_api_server_refuses(break_it, problem):
    manifest = deploy.render_training_job(JOB_ID, "image", "store-pvc")
    break_it(manifest)
    assert any(problem in p for p in deploy.validate_training_job(manifest)), problem
    with pytest.raises(deploy.DeployError):
        deploy.submit_kubernetes_job(manifest, dry_run=True)


def test_training_job_is_applied_with_kubectl(tmp_path, monkeypatch):
    received = tmp_path / "applied.yaml"
    kubectl = tmp_path / "kubectl"
    kubectl.write_text(f'#!/usr/bin/env bash\necho "$*" > "{tmp_path}/args"\ncat > "{received}"\n')
    kubectl.chmod(0o755)
    manifest = deploy.render_training_job(JOB_ID, "image", "store-pvc")
    assert deploy.submit_kubernetes_job(manifest, kubectl=str(kubectl)) == [str(kubectl), "apply", "-f", "-"]
    assert (tmp_path / "args").read_text().strip() == "apply -f -"
    assert yaml.safe_load(received.read_text()) == manifest


def test_cli_submits_a_training_job_dry_run(capsys, tmp_path):
    code = cli(["deploy", "--runner", "kubernetes", "--job", JOB_ID, "--image", "reg/preannotate:1",
                "--store-claim", "store-pvc", "--gpu", "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0
    first, _, rest = out.partition("\n")
    assert first == "kubectl apply -f - <<'EOF'" and rest.endswith("EOF\n")
    manifest = yaml.safe_load(rest[: -len("EOF\n")])
    assert manifest == deploy.render_training_job(JOB_ID, "reg/preannotate:1", "store-pvc", gpu=True)
    assert "&id" not in rest and "*id" not in rest  # the labels shared by two places are written out, as a person does
    assert cli(["deploy", "--runner", "kubernetes", "--job", JOB_ID, "--dry-run"]) == 2
    assert "needs --image, --store-claim" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["tracker", "reid"])
def test_deploy_kind_renders_the_model_as_cvats_tracker_or_reid(store, tmp_path, capsys, kind):
    out = tmp_path / kind
    code, lines, err = _deploy(capsys, "--model", "Cars_v2", "--store", str(store.root), "--out", str(out),
                               "--kind", kind, "--dry-run")
    assert code == 0, err
    assert lines[0] == f"# function pth-preannotate-cars-v2-{kind} rendered in {out}"
    for filename, gpu in (("function.yaml", False), ("function-gpu.yaml", True)):
        text = (out / filename).read_text()
        assert text.startswith(f"# Rendered by `preannotate deploy --model Cars_v2 --kind {kind}`")
        config = yaml.safe_load(text)
        assert config["metadata"]["annotations"]["type"] == kind
        assert functions.validate_config(config, gpu) == []
    assert functions.validate_directory(out) == []
    assert any("nuctl deploy" in line and str(out / "function.yaml") in line for line in lines)


@pytest.mark.parametrize("args, message", [
    (["--model", "Cars_v2", "--kind", "tracker", "--cron", "6h", "--train-project", "3"],
     "a tracker trains and pre-annotates nothing: give --cron, --train-project to the detector function"),
    (["--model", "Later", "--kind", "reid"], "Later has no version yet: deploy its reid once"),
    (["--model", "resnet50", "--kind", "tracker"], "resnet50 is a classifier: it finds no boxes"),
])
def test_deploy_kind_explains_what_is_wrong(store, tmp_path, capsys, args, message):
    code, _, err = _deploy(capsys, *args, "--store", str(store.root), "--out", str(tmp_path / "fn"), "--dry-run")
    assert code != 0 and message in err, err


def test_a_tracker_renders_beside_its_detector_and_lists_no_spec(store, tmp_path, capsys, monkeypatch):
    """Deployed one after the other without --out, the tracker must not overwrite the detector's folder, and its
    empty spec leaves no label out."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    rendered = {}
    for kind in ("detector", "tracker"):
        code, lines, err = _deploy(capsys, "--model", "Cars_v2", "--store", str(store.root), "--kind", kind,
                                   "--dry-run")
        assert code == 0, err
        rendered[kind] = Path(lines[0].split(" rendered in ")[1])
        if kind == "tracker":
            assert not any(line.startswith("# left out of the spec") for line in lines)
    assert rendered["detector"] != rendered["tracker"]
    for kind, directory in rendered.items():
        assert yaml.safe_load((directory / "function.yaml").read_text())["metadata"]["annotations"]["type"] == kind
