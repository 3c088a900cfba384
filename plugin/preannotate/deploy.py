"""Deploying: a Nuclio function for a trained model version (``preannotate deploy``), the build step of function
images (``preannotate models fetch-weights``), and training jobs as Kubernetes Jobs.

Nothing here talks to Nuclio or Kubernetes directly: it renders configurations, validates them, and runs ``nuctl`` or
``kubectl`` — the tools operators already use with CVAT — or, with ``dry_run``, prints what it would run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from preannotate import functions
from preannotate.cvat import lambda_spec
from preannotate.cvat.review import CONFIDENCE_LABEL
from preannotate.models import (
    DEFAULT_STORE,
    Manifest,
    ModelNotFound,
    ModelReference,
    ModelStore,
    family_of,
    get_architecture,
    open_store,
)
from preannotate.models.registry import DEFAULT_ARCHITECTURE, FUNCTION_PREFIX
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

def function_name(model_name: str, framework: str = "pytorch") -> str:
    """The Nuclio function (and CVAT function id) of a model in the store (``pth-`` or ``tf-``, as CVAT's own)."""
    return FUNCTION_PREFIX[framework] + re.sub(r"[^a-z0-9]+", "-", model_name.lower()).strip("-")


def render_model_function(store: ModelStore, reference: str, out: Path, cron: str | None = None,
                          train_project: int | None = None, store_claim: str | None = None,
                          project_labels: Sequence[Label] | None = None, architecture: str | None = None,
                          annotate_on: str = "", reannotate: str = "") -> tuple[Path, str, list[Label]]:
    """Write the function directory (function.yaml, function-gpu.yaml, main.py) that serves ``reference``
    (``NAME``: its served version, swapped when a new one is promoted; ``NAME@VERSION``: pinned) and return it with
    the function's name and the labels left out of its CVAT spec (types the model can never return).

    The spec lists the labels of the model's manifest or, before its first version, ``project_labels`` (the labels of
    the project ``train_project`` it trains on, read from CVAT), typed as the model returns them. The store is
    mounted from where it is now (``store.root``) or from ``store_claim``."""
    parsed = ModelReference.parse(reference)
    try:
        manifest = Manifest.read(parsed.directory(store))
    except ModelNotFound:
        if project_labels is None or parsed.version is not None:
            raise  # its message lists the models
        manifest = None
    arch = get_architecture(architecture or (manifest.architecture if manifest else DEFAULT_ARCHITECTURE))
    labels, impossible = lambda_spec.spec_labels(manifest.labels if manifest else project_labels, arch.output)
    if not labels:
        raise DeployError(f"{arch.name} returns {arch.output} shapes: none of the labels "
                          f"({', '.join(f'{label.name} ({label.type})' for label in impossible) or 'none'}) can take "
                          f"them, so CVAT would get nothing; add a label of type {' or '.join(arch.label_types)}")
    state = f"{len(labels)} labels" if manifest else f"{len(labels)} labels of project {train_project}, not trained yet"
    settings = {"model": reference, "name": function_name(parsed.name, arch.framework), "cron": cron,
                "train_project": train_project,
                "description": f"preannotate model {parsed.name} ({arch.name}, {state})",
                "store_host_path": str(store.root.resolve()), "store_claim": store_claim,
                "annotate_on": annotate_on, "reannotate": reannotate}
    header = f"# Rendered by `preannotate deploy --model {reference}` from the model's " + \
        ("manifest.\n" if manifest else f"project {train_project}'s labels.\n")
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


def project_labels(args: argparse.Namespace, project_id: int) -> list[Label]:
    """The labels of a CVAT project (what its tasks are annotated with), read through cvat-sdk."""
    from preannotate.cvat.annotations import read_labels
    from preannotate.cvat.client import connect, cvat_errors

    with connect(args.cvat_url, organization=args.org, verify_tls=not args.insecure) as client:
        with cvat_errors(client, f"project {project_id}"):
            labels = client.projects.retrieve(project_id).get_labels()
    return [Label(label.name, label.type, label.attributes) for label in read_labels([m.to_dict() for m in labels])
            if label.name != CONFIDENCE_LABEL]


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


def deploy_model(args: argparse.Namespace, environ: Mapping[str, str] | None = None,
                 out: TextIO | None = None) -> int:
    environ = os.environ if environ is None else environ
    out = out or sys.stdout
    if args.cron and args.train_project is None:
        raise DeployError("--cron retrains a project: give it with --train-project N")
    if args.platform == "kube" and not args.store_claim:
        raise DeployError("on Kubernetes the store is a PersistentVolumeClaim: give it with --store-claim NAME")
    parsed = ModelReference.parse(args.model)
    # Deploying for a project comes first: the store the function will train into is made (and mounted) now.
    store = open_store(args.store, create=args.train_project is not None)
    untrained = parsed.version is None and not store.versions(parsed.name)
    if untrained and args.train_project is None:
        raise DeployError(f"{parsed.name} has no version yet: deploy it for the CVAT project it learns from with "
                          "--train-project P (the project's labels go into the function), or train it first")
    directory = Path(args.out) if args.out else Path(tempfile.gettempdir()) / "preannotate-functions" / parsed.name
    labels = project_labels(args, args.train_project) if untrained else None
    annotate_on = args.annotate_on if args.annotate_on is not None else ("task" if args.train_project else "")
    directory, name, impossible = render_model_function(
        store, args.model, directory, cron=args.cron, train_project=args.train_project, store_claim=args.store_claim,
        project_labels=labels, architecture=args.arch, annotate_on="" if annotate_on == "none" else annotate_on,
        reannotate="unreviewed" if args.reannotate_unreviewed else "")
    print(f"# function {name} rendered in {directory}", file=out)
    if untrained:
        print(f"# {parsed.name} is not trained yet: the function answers 503 until a job of project "
              f"{args.train_project} is finished (its webhook starts training) or POST /train", file=out)
    for label in impossible:
        print(f"# left out of the spec: {label.name} ({label.type}): the model cannot return {label.type} shapes, "
              "so CVAT could map nothing to it", file=out)
    commands = nuctl_commands(directory, args.gpu, environ, platform=args.platform, namespace=args.namespace,
                              registry=args.registry, base_image=args.base_image)
    run_commands(commands, args.dry_run, out, NUCTL_HINT)
    if not args.dry_run:
        print(f"deployed {name}: it appears in CVAT's Models page", file=out)
    return 0


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


# ------------------------------------------------------------------------------------------ command line

def add_commands(commands: argparse._SubParsersAction, models_commands: argparse._SubParsersAction,
                 common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``preannotate deploy`` and ``preannotate models fetch-weights`` (``common``: the options every command takes);
    returns the deploy parser (the command line adds its CVAT options: a project's labels are read from CVAT)."""
    what = "put architectures' pretrained weights into torch's cache (a function image build step)"
    fetch = models_commands.add_parser("fetch-weights", help=what, description=what, parents=[common])
    fetch.add_argument("architectures", nargs="+", help="registry architectures")

    what = ("deploy a Nuclio function serving a trained model (nuctl), or submit a training job to Kubernetes "
            "(--runner kubernetes)")
    deploy = commands.add_parser("deploy", help=what, description=what, parents=[common])
    deploy.add_argument("--model", help="NAME[@VERSION] in the store (NAME follows the served version)")
    deploy.add_argument("--store", default=None,
                        help="the model store on this machine, mounted into the function (default "
                             f"$PREANNOTATE_MODEL_STORE, else {DEFAULT_STORE})")
    deploy.add_argument("--gpu", action="store_true", help="deploy function-gpu.yaml (or a GPU training Job)")
    deploy.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
    deploy.add_argument("--cron", help="retrain on a schedule when the annotations changed: an interval (6h) or a "
                                       "cron schedule ('0 3 * * *'); needs --train-project")
    deploy.add_argument("--train-project", type=int,
                        help="the CVAT project the function learns from (finished jobs retrain it, cron retrains "
                             "it) and pre-annotates; before the first version its labels go into the function")
    deploy.add_argument("--arch", help="the architecture to train (default: the served version's, else "
                                       f"{DEFAULT_ARCHITECTURE})")
    deploy.add_argument("--annotate-on", choices=("task", "none"),
                        help="task: pre-annotate each new task of --train-project once its data is uploaded "
                             "(the default with --train-project); none: only when asked")
    deploy.add_argument("--reannotate-unreviewed", action="store_true",
                        help="when a better version is promoted, pre-annotate again the project's tasks no one "
                             "has started (every job new, in annotation)")
    deploy.add_argument("--out", help="where to write the function directory (default: a temporary directory)")
    deploy.add_argument("--platform", choices=("local", "kube"), default="local",
                        help="Nuclio platform: local (Docker, default) or kube")
    deploy.add_argument("--namespace", help="Kubernetes namespace (kube platform, or the training Job)")
    deploy.add_argument("--registry", help="container registry the kube platform pushes function images to")
    deploy.add_argument("--base-image", help="the base image as the kube builder pulls it "
                                             "(e.g. REGISTRY/cvat.preannotate.base:cpu)")
    deploy.add_argument("--store-claim", help="PersistentVolumeClaim holding the store (Kubernetes)")
    deploy.add_argument("--runner", choices=("nuclio", "kubernetes"), default="nuclio",
                        help="nuclio: deploy a function for --model (default); kubernetes: run the store's job "
                             "--job as a Kubernetes Job")
    deploy.add_argument("--job", help="the id of a job recorded in the store (with --runner kubernetes)")
    deploy.add_argument("--image", help="the image of the training Job: the function's image")
    deploy.add_argument("--secret", default="preannotate",
                        help="Secret with CVAT_URL, credentials, ... for the training Job (default %(default)s)")
    return deploy


def cmd_deploy(args: argparse.Namespace) -> int:
    if args.runner == "kubernetes":
        missing = [flag for flag, value in (("--job", args.job), ("--image", args.image),
                                            ("--store-claim", args.store_claim)) if not value]
        if missing:
            raise DeployError(f"--runner kubernetes needs {', '.join(missing)}")
        manifest = render_training_job(args.job, args.image, args.store_claim, gpu=args.gpu, secret=args.secret,
                                       namespace=args.namespace)
        submit_kubernetes_job(manifest, dry_run=args.dry_run)
        if not args.dry_run:
            print(f"submitted; follow it with: kubectl logs -f job/{manifest['metadata']['name']}")
        return 0
    if not args.model:
        raise DeployError("say which model to deploy: --model NAME[@VERSION]")
    return deploy_model(args)


def cmd_fetch_weights(args: argparse.Namespace) -> int:
    for architecture in args.architectures:
        print(f"{architecture}: {fetch_weights(architecture)}")
    return 0
