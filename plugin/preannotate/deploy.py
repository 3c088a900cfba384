"""Deploying: a Nuclio function for a trained model version (``preannotate deploy``), the build step of function
images (``preannotate models fetch-weights``), and training jobs as Kubernetes Jobs.

Nothing here talks to Nuclio or Kubernetes directly: it renders configurations, validates them, and runs ``nuctl`` or
``kubectl`` — the tools operators already use with CVAT — or, with ``dry_run``, prints what it would run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from preannotate import functions
from preannotate.cvat import lambda_spec
from preannotate.models import (
    Manifest,
    ModelNotFound,
    ModelReference,
    ModelStore,
    PretrainedWeightsUnavailable,
    default_store,
    family_of,
    get_architecture,
    open_store,
)
from preannotate.models.registry import DEFAULT_ARCHITECTURE, function_name
from preannotate.shapes import Label

PROJECT = "cvat"                 # CVAT lists only the functions of this Nuclio project
NETWORK = "cvat_cvat"            # CVAT's compose network: the function reaches cvat_server by name
MASKED_ENV = tuple(k for k in functions.SECRET_ENV if any(w in k for w in ("PASSWORD", "TOKEN", "SECRET")))
K8S_STORE_MOUNT = "/store"
NUCTL_HINT = ("install nuctl of the same version as CVAT's Nuclio dashboard "
              "(https://github.com/nuclio/nuclio/releases), or use --dry-run to see the commands")


class DeployError(RuntimeError):
    """A problem the operator can fix; the message says how."""


# ------------------------------------------------------------------------------------------ Nuclio functions

def render_model_function(store: ModelStore, reference: str, out: Path, cron: str | None = None,
                          train_project: int | None = None, store_claim: str | None = None,
                          first_labels: Sequence[Label] | None = None, architecture: str | None = None,
                          annotate_on: str = "", reannotate: str = "", kind: str = "detector",
                          ) -> tuple[Path, str, list[Label]]:
    """Write the function directory (function.yaml, function-gpu.yaml, main.py) that serves ``reference``
    (``NAME``: its served version, swapped when a new one is promoted; ``NAME@VERSION``: pinned) and return it with
    the function's name and the labels left out of its CVAT spec (types the model can never return).

    The spec lists the labels of the model's manifest or, before its first version, ``first_labels``: those of the
    project ``train_project`` it trains on (read from CVAT), or an architecture's pretrained ones (what it serves
    until then). They are typed as the model returns them. The store is mounted from where it is (``store.root``)
    or from ``store_claim``. ``kind`` ``tracker`` or ``reid`` serves the model as CVAT's tracker or reid function
    (``functions.function_config``)."""
    parsed = ModelReference.parse(reference)
    try:
        manifest = Manifest.read(parsed.directory(store))
    except ModelNotFound:
        if first_labels is None or parsed.version is not None:
            raise  # its message lists the models
        manifest = None
    default = parsed.architecture or DEFAULT_ARCHITECTURE
    arch = get_architecture(architecture or (manifest.architecture if manifest else default))
    labels, impossible = lambda_spec.spec_labels(manifest.labels if manifest else first_labels, arch.output,
                                                 manifest.outlines if manifest else None)
    if kind != "detector" and arch.output == "tag":
        raise DeployError(f"{arch.name} is a classifier: it finds no boxes, so it has nothing to follow as a {kind}")
    if not labels:
        raise DeployError(f"{arch.name} returns {arch.output} shapes: none of the labels "
                          f"({', '.join(f'{label.name} ({label.type})' for label in impossible) or 'none'}) can take "
                          f"them, so CVAT would get nothing; add a label of type "
                          f"{' or '.join(lambda_spec.label_types(arch.output))}")
    if manifest:
        state, source = f"{len(labels)} labels", "the model's manifest"
    elif train_project is not None:
        state, source = f"{len(labels)} labels of project {train_project}, not trained yet", \
            f"project {train_project}'s labels"
    else:
        state, source = f"{len(labels)} pretrained labels until its first version", f"{arch.name}'s pretrained labels"
    served_as = "" if kind == "detector" else f" as CVAT's {kind}"
    settings = {"model": reference, "name": function_name(parsed.name, arch.framework) + ("" if kind == "detector"
                                                                                          else f"-{kind}"),
                "cron": cron, "train_project": train_project,
                "description": f"preannotate model {parsed.name}{served_as} ({arch.name}, {state})",
                "store_host_path": str(store.root.resolve()), "store_claim": store_claim,
                "annotate_on": annotate_on, "reannotate": reannotate, "kind": kind}
    option = "" if kind == "detector" else f" --kind {kind}"
    header = f"# Rendered by `preannotate deploy --model {reference}{option}` from {source}.\n"
    files, problems = {}, []
    for filename, gpu in (("function.yaml", False), ("function-gpu.yaml", True)):
        config = functions.function_config(arch, labels, gpu, **settings)
        problems += [f"{filename}: {p}" for p in functions.validate_config(config, gpu)]
        files[filename] = functions.dump(config, header)
    if problems:
        raise DeployError("the function would not work in CVAT:\n  " + "\n  ".join(problems))
    out.mkdir(parents=True, exist_ok=True)
    files["main.py"] = functions.MAIN_PY.format(name=reference)
    for filename, text in files.items():
        (out / filename).write_text(text)
    return out, settings["name"], impossible


def project_labels(client, project_id: int) -> list[Label]:
    """The labels of a CVAT project (what its tasks are annotated with), read through a cvat-sdk ``client``."""
    from preannotate.cvat.annotations import read_labels
    from preannotate.cvat.client import cvat_errors

    with cvat_errors(client, f"project {project_id}"):
        labels = client.projects.retrieve(project_id).get_labels()
    # without the class index read_labels gives, but with a skeleton's parts and drawing: the spec lists them
    return [dataclasses.replace(label, id=None) for label in read_labels([m.to_dict() for m in labels])]


def pretrained_labels(architecture: str) -> list[Label]:
    """The labels an architecture's pretrained weights predict (COCO's, ImageNet's): what its function serves until
    the store has a version of its name."""
    arch = get_architecture(architecture)
    try:
        return family_of(arch).pretrained_labels(arch)
    except PretrainedWeightsUnavailable:
        raise DeployError(f"{arch.name} has no pretrained labels to serve: deploy it for the CVAT project it learns "
                          "from with --train-project P, or train it first") from None


def secret_env_args(environ: Mapping[str, str]) -> list[str]:
    """``--env NAME=value`` for each secret set in the operator's environment (never written into YAML)."""
    return [arg for key in functions.SECRET_ENV if environ.get(key) for arg in ("--env", f"{key}={environ[key]}")]


def nuctl_commands(directory: Path, gpu: bool, environ: Mapping[str, str], platform: str = "local",
                   namespace: str | None = None, registry: str | None = None, base_image: str | None = None,
                   network: str = NETWORK, nuctl: str = "nuctl") -> list[list[str]]:
    """Create the ``cvat`` project, then deploy the function the way CVAT's serverless/deploy_*.sh do."""
    where = ["--platform", platform] + (["--namespace", namespace] if namespace else [])
    config = directory / ("function-gpu.yaml" if gpu else "function.yaml")
    deploy = [nuctl, "deploy", "--project-name", PROJECT, "--path", str(directory), "--file", str(config), *where,
              *secret_env_args(environ)]
    if platform == "local":
        deploy += ["--platform-config", json.dumps({"attributes": {"network": network}})]
    if registry:
        deploy += ["--registry", registry]
    if base_image:
        deploy += ["--base-image", base_image]
    return [[nuctl, "create", "project", PROJECT, *where], deploy]


def shown(command: list[str]) -> str:
    """A command as a shell line, secret values replaced by a reference to the variable (still runnable)."""
    words = []
    for word in command:
        key = word.partition("=")[0]
        words.append(f'"{key}=${key}"' if "=" in word and key in MASKED_ENV else shlex.quote(word))
    return " ".join(words)


def run_commands(commands: list[list[str]], dry_run: bool, out: TextIO | None = None, hint: str = "") -> None:
    """Run each command (stop at the first failure) or, with ``dry_run``, print them."""
    for command in commands:
        if dry_run:
            print(shown(command), file=out or sys.stdout)
            continue
        if shutil.which(command[0]) is None:
            raise DeployError(f"{command[0]} is not on PATH: {hint}" if hint else f"{command[0]} is not on PATH")
        if command[1:3] == ["create", "project"] and _project_exists(command):
            continue
        code = subprocess.run(command).returncode
        if code != 0:
            raise DeployError(f"`{shown(command)}` failed with exit code {code}")


def _project_exists(create: list[str]) -> bool:
    """Whether the Nuclio project exists already, so that a second deploy never trips over creating it."""
    get = [create[0], "get", "project", *create[3:]]
    return subprocess.run(get, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0


def deploy_model(model: str, *, store: str | os.PathLike | None = None, train_project: int | None = None,
                 architecture: str | None = None, cron: str | None = None, annotate_on: str | None = None,
                 reannotate_unreviewed: bool = False, gpu: bool = False, platform: str = "local",
                 namespace: str | None = None, registry: str | None = None, base_image: str | None = None,
                 store_claim: str | None = None, out_dir: str | os.PathLike | None = None, dry_run: bool = False,
                 connect: Callable[[], Any] | None = None, environ: Mapping[str, str] | None = None,
                 out: TextIO | None = None, kind: str = "detector") -> str:
    """Render the Nuclio function serving ``model`` (``NAME`` or ``NAME@VERSION`` in ``store``) into ``out_dir`` and
    deploy it with nuctl, or with ``dry_run`` print the commands; returns the function's name.

    Before a model's first version its labels come from the CVAT project ``train_project`` (read with a client from
    ``connect``, default: ``cvat.client.connect()`` from the environment) or, for an architecture's own name, from
    its pretrained weights (what it serves until then). A dry run reads the store but needs none; otherwise the
    store is made when missing, as the function trains into it.

    ``kind="tracker"`` (or ``"reid"``) deploys the model as CVAT's tracker (reid) function beside its detector: it
    trains nothing and serves the versions the detector function trains into the same store."""
    environ = os.environ if environ is None else environ
    out = out or sys.stdout
    if kind != "detector":
        training = [flag for flag, value in (("--cron", cron), ("--train-project", train_project),
                                             ("--annotate-on", annotate_on not in (None, "none") and annotate_on),
                                             ("--reannotate-unreviewed", reannotate_unreviewed)) if value]
        if training:
            raise DeployError(f"a {kind} trains and pre-annotates nothing: give {', '.join(training)} to the "
                              f"detector function (`preannotate deploy --model {model}`); the {kind} serves what it "
                              "trains")
    if cron and train_project is None:
        raise DeployError("--cron retrains a project: give it with --train-project N")
    if platform == "kube" and not store_claim:
        raise DeployError("on Kubernetes the store is a PersistentVolumeClaim: give it with --store-claim NAME")
    parsed = ModelReference.parse(model)
    root = Path(store or default_store())
    models = ModelStore(root)  # what is there; a missing store holds nothing
    untrained = parsed.version is None and not models.versions(parsed.name)
    if untrained and kind != "detector" and not parsed.architecture:
        open_store(root)  # a mistyped --store says so
        raise DeployError(f"{parsed.name} has no version yet: deploy its {kind} once the detector function (or "
                          "`preannotate train`) has published one")
    if untrained and train_project is None and not parsed.architecture:
        open_store(root)  # a mistyped --store says so
        raise DeployError(f"{parsed.name} has no version yet: deploy it for the CVAT project it learns from with "
                          "--train-project P (the project's labels go into the function), or train it first")
    first_labels = None
    if untrained and train_project is not None:
        if connect is None:
            from preannotate.cvat.client import connect as connect_from_environment

            connect = connect_from_environment
        with connect() as client:
            first_labels = project_labels(client, train_project)
    elif untrained:
        first_labels = pretrained_labels(parsed.architecture)
    if not dry_run:
        root.mkdir(parents=True, exist_ok=True)  # the function trains into it: made (and mounted) now
    folder = parsed.name if kind == "detector" else f"{parsed.name}-{kind}"  # beside the detector's, not over it
    directory = Path(out_dir) if out_dir else Path(tempfile.gettempdir()) / "preannotate-functions" / folder
    if annotate_on is None:
        annotate_on = "task" if train_project else ""
    directory, name, impossible = render_model_function(
        models, model, directory, cron=cron, train_project=train_project, store_claim=store_claim,
        first_labels=first_labels, architecture=architecture, annotate_on="" if annotate_on == "none" else annotate_on,
        reannotate="unreviewed" if reannotate_unreviewed else "", kind=kind)
    print(f"# function {name} rendered in {directory}", file=out)
    if untrained and train_project is not None:
        print(f"# {parsed.name} is not trained yet: the function answers 503 until a job of project "
              f"{train_project} is finished (its webhook starts training) or POST /train", file=out)
    elif untrained:
        print(f"# {parsed.name} has no version yet: the function serves {parsed.name}'s pretrained weights until "
              "one is trained under that name", file=out)
    for label in impossible if kind == "detector" else ():  # a tracker's or reid's spec is empty: no label is left
        print(f"# left out of the spec: {lambda_spec.cannot_fill(label)}", file=out)
    commands = nuctl_commands(directory, gpu, environ, platform=platform, namespace=namespace, registry=registry,
                              base_image=base_image)
    run_commands(commands, dry_run, out, NUCTL_HINT)
    if not dry_run:
        where = {"detector": "CVAT's Models page", "tracker": "CVAT's AI Tools → Trackers",
                 "reid": "the Automatic annotation menu of CVAT's tasks"}[kind]
        print(f"deployed {name}: it appears in {where}", file=out)
    return name


# ------------------------------------------------------------------------------------------ image build step

def fetch_weights(architecture: str) -> Path:
    """Put the architecture's pretrained weights into its framework's cache (torch: ``$TORCH_HOME/hub/checkpoints``;
    Keras: ``$KERAS_HOME`` and keras-hub's ``$KAGGLEHUB_CACHE``): the build step of a function image, so that a
    function neither downloads at run time nor needs the network."""
    arch = get_architecture(architecture)
    if not arch.pretrained:
        raise DeployError(f"{arch.name} has no pretrained weights to fetch")
    return family_of(arch).fetch_pretrained(arch)


# ------------------------------------------------------------------------------------------ Kubernetes Jobs

def render_training_job(job_id: str, image: str, store_claim: str, gpu: bool = False, secret: str = "preannotate",
                        namespace: str | None = None, backoff_limit: int = 2,
                        ttl_seconds_after_finished: int = 7 * 24 * 3600) -> dict[str, Any]:
    """A ``batch/v1`` Job training the store's job ``job_id`` with the function's own image: the store's
    PersistentVolumeClaim mounted, CVAT credentials from the Secret ``secret``. A failed pod is retried
    ``backoff_limit`` times, each retry resuming from the job's last checkpoint in the store."""
    slug = re.sub(r"[^a-z0-9-]+", "-", job_id.lower()).strip("-")
    labels = {"app.kubernetes.io/name": "preannotate", "app.kubernetes.io/component": "training",
              "preannotate/job": slug[:63].strip("-")}
    container: dict[str, Any] = {
        "name": "train",
        "image": image,
        "command": ["python", "-m", "preannotate.worker", "run", K8S_STORE_MOUNT, job_id],
        "env": [{"name": "PREANNOTATE_MODEL_STORE", "value": K8S_STORE_MOUNT},
                {"name": "PREANNOTATE_DEVICE", "value": "cuda" if gpu else "cpu"},
                {"name": "TORCH_HOME", "value": functions.TORCH_HOME}],
        "envFrom": [{"secretRef": {"name": secret}}],
        "volumeMounts": [{"name": "store", "mountPath": K8S_STORE_MOUNT}],
    }
    if gpu:
        container["resources"] = {"limits": {"nvidia.com/gpu": 1}}
    metadata: dict[str, Any] = {"name": f"preannotate-train-{slug}"[:63].rstrip("-"), "labels": labels}
    if namespace:
        metadata["namespace"] = namespace
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata,
        "spec": {
            "backoffLimit": backoff_limit,
            "ttlSecondsAfterFinished": ttl_seconds_after_finished,
            "template": {
                "metadata": {"labels": labels},
                "spec": {"restartPolicy": "Never", "containers": [container],
                         "volumes": [{"name": "store", "persistentVolumeClaim": {"claimName": store_claim}}]},
            },
        },
    }


def validate_training_job(manifest: dict[str, Any]) -> list[str]:
    """What the API server would refuse in a Job (the parts we write), so a mistake fails before ``kubectl``."""
    problems = []
    if manifest.get("apiVersion") != "batch/v1" or manifest.get("kind") != "Job":
        problems.append("apiVersion/kind must be batch/v1 Job")
    name = str((manifest.get("metadata") or {}).get("name", ""))
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) or len(name) > 63:
        problems.append(f"metadata.name {name!r} is not a DNS label (lower-case, digits, '-', at most 63)")
    spec = manifest.get("spec") or {}
    for key in ("backoffLimit", "ttlSecondsAfterFinished"):
        if key in spec and (not isinstance(spec[key], int) or spec[key] < 0):
            problems.append(f"spec.{key} must be a non-negative integer")
    pod = (spec.get("template") or {}).get("spec") or {}
    if pod.get("restartPolicy") not in ("Never", "OnFailure"):
        problems.append("spec.template.spec.restartPolicy must be Never or OnFailure in a Job")
    containers = pod.get("containers") or []
    if not containers:
        problems.append("spec.template.spec.containers is empty")
    volumes = {v.get("name") for v in pod.get("volumes") or []}
    for index, container in enumerate(containers):
        where = f"containers[{index}]"
        if not container.get("name") or not container.get("image"):
            problems.append(f"{where} needs a name and an image")
        command = container.get("command")
        if not isinstance(command, list) or not command or not all(isinstance(w, str) for w in command):
            problems.append(f"{where}.command must be a non-empty list of strings")
        for mount in container.get("volumeMounts") or []:
            if mount.get("name") not in volumes:
                problems.append(f"{where} mounts {mount.get('name')!r}, which is not in the pod's volumes")
            if not str(mount.get("mountPath", "")).startswith("/"):
                problems.append(f"{where} mountPath must be absolute")
    return problems


def submit_kubernetes_job(manifest: dict[str, Any], dry_run: bool = False, kubectl: str = "kubectl",
                          out: TextIO | None = None) -> list[str]:
    """Apply the Job with ``kubectl apply -f -`` (the manifest on its stdin); with ``dry_run`` print both."""
    problems = validate_training_job(manifest)
    if problems:
        raise DeployError("the Job manifest is not valid: " + "; ".join(problems))
    command = [kubectl, "apply", "-f", "-"]
    text = functions.dump(manifest, header="")
    if dry_run:
        print(f"{shlex.join(command)} <<'EOF'\n{text}EOF", file=out or sys.stdout)
        return command
    if shutil.which(kubectl) is None:
        raise DeployError(f"{kubectl} is not on PATH: install kubectl for your cluster, or use --dry-run")
    code = subprocess.run(command, input=text, text=True).returncode
    if code != 0:
        raise DeployError(f"`{shlex.join(command)}` failed with exit code {code}")
    return command
