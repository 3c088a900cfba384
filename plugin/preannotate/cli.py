"""The preannotate command line: train detectors from CVAT annotations, serve them, and pre-annotate new tasks."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from preannotate import __version__
from preannotate.models.reference import DEFAULT_STORE
from preannotate.models.registry import DEFAULT_ARCHITECTURE
from preannotate.shapes import LEARNED_ATTRIBUTE_TYPES


class CommandError(Exception):
    """A problem the user can fix; printed without a traceback."""


def _common() -> argparse.ArgumentParser:
    """Options every command takes, before or after its name (``preannotate -v train`` or ``train -v``)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="log what happens (INFO) on stderr")
    return common


class _HyperparameterHelp(argparse.Action):
    """``--help-hyperparameters``: the language's keys, then exit (as ``--help`` does, whatever else is missing)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        from preannotate.hyperparameters import help_text

        print("Hyperparameters (-H \"key=value; ...\", dashes or underscores alike):\n" + help_text())
        parser.exit()


def _store_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", default=None,
                        help=f"model store directory (default $PREANNOTATE_MODEL_STORE, else {DEFAULT_STORE})")


def _cvat_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("CVAT server (credentials only from the environment, so they stay out of "
                                      "shell history: CVAT_USERNAME + CVAT_PASSWORD, or CVAT_ACCESS_TOKEN)")
    group.add_argument("--cvat-url", default=os.environ.get("CVAT_URL"), help="e.g. http://localhost:8080 "
                                                                               "(default $CVAT_URL)")
    group.add_argument("--org", default=os.environ.get("CVAT_ORG"), help="organization slug (default $CVAT_ORG)")
    group.add_argument("--insecure", action="store_true", help="do not verify the server's TLS certificate")


def _connect(args: argparse.Namespace):
    from preannotate.cvat.client import connect

    return connect(args.cvat_url, organization=args.org, verify_tls=not args.insecure)


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = argparse.ArgumentParser(prog="preannotate", description=__doc__, parents=[common])
    parser.add_argument("--version", action="version", version=f"preannotate {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(parent, name: str, help: str) -> argparse.ArgumentParser:
        return parent.add_parser(name, help=help, description=help, parents=[common])

    models = command(commands, "models", "list, show and create model versions in the store")
    models_commands = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    listing = command(models_commands, "list", "published models and their versions")
    _store_argument(listing)
    listing.add_argument("--json", action="store_true", help="print JSON")
    show = command(models_commands, "show", "the manifest of NAME[@VERSION] or of an artifact directory")
    _store_argument(show)
    show.add_argument("model", help="NAME, NAME@VERSION or an artifact directory")
    promote = command(models_commands, "promote", "serve NAME@VERSION from now on (roll back or forward); "
                                                  "functions switch on their next call")
    _store_argument(promote)
    promote.add_argument("model", help="NAME@VERSION")
    architectures = command(models_commands, "architectures", "the architectures of the registry")
    architectures.add_argument("--json", action="store_true", help="print JSON")
    create = command(models_commands, "create", "publish an untrained or pretrained version of an architecture "
                                                "(what an image build does)")
    _store_argument(create)
    create.add_argument("architecture", help="a registry architecture (preannotate models architectures)")
    create.add_argument("--labels", help="comma-separated label names, optionally name:type (a type the model can "
                                         "fill; untyped: the one it fills, e.g. tag for a classifier; default "
                                         "with --init pretrained: the COCO labels)")
    create.add_argument("--name", help="model name in the store (default: the architecture)")
    create.add_argument("--init", choices=("random", "pretrained"), default="random",
                        help="random weights, or torchvision's pretrained ones (default %(default)s)")
    create.add_argument("-H", "--hyperparameters", default="", help='e.g. "image-size=512; score-threshold=0.4"')

    functions = command(commands, "functions", "render and check the Nuclio functions")
    functions_commands = functions.add_subparsers(dest="functions_command", required=True, metavar="ACTION")
    render = command(functions_commands, "render", "write functions/ from the model registry")
    render.add_argument("--out", default="functions", help="directory (default %(default)s)")
    validate = command(functions_commands, "validate", "check function directories against CVAT's rules")
    validate.add_argument("directories", nargs="*", default=["functions"],
                          help="function directories, or roots searched for function.yaml (default functions)")

    export = command(commands, "export", "a CVAT task, job or project as a COCO, TFRecord or ImageNet-style "
                                         "(frame tags) training folder")
    _cvat_arguments(export)
    source = export.add_mutually_exclusive_group(required=True)
    source.add_argument("--task", type=int, help="a CVAT task id")
    source.add_argument("--job", type=int, help="a CVAT job id (its frames only)")
    source.add_argument("--project", type=int, help="a CVAT project id (all its tasks)")
    export.add_argument("--format", choices=("coco", "tfrecord", "imagenet"), default="coco",
                        help="default %(default)s; imagenet: <split>/<tag label>/<frame>, for classifiers")
    export.add_argument("--out", required=True, help="output directory (must be empty or absent)")
    export.add_argument("--val-fraction", type=float, default=0.0, help="share of frames in the val split")
    export.add_argument("--seed", type=int, default=0, help="the split's seed (same seed, same split)")
    export.add_argument("--quality", choices=("original", "compressed"), default="original",
                        help="CVAT's original files or its compressed chunks (default %(default)s)")

    importer = command(commands, "import", "predictions from a file into a task, as auto shapes (re-running "
                                           "replaces them, never duplicates)")
    _cvat_arguments(importer)
    importer.add_argument("--task", type=int, required=True, help="the CVAT task to write into")
    importer.add_argument("file", help="COCO results (a list of detections) or a COCO dataset")
    importer.add_argument("--format", choices=("coco-results", "coco"), default="coco-results",
                          help="default %(default)s")
    importer.add_argument("--coco-file", help="coco-results: the COCO dataset they refer to (default: our export's "
                                              "convention, image id = frame + 1, categories in CVAT label order)")
    importer.add_argument("--threshold", type=float, help="keep detections scoring at least this")
    importer.add_argument("--label-map", help="renames, e.g. 'automobile=car,human=person'")
    importer.add_argument("--replace", action="store_true", help="replace every shape of those frames, manual too")

    annotate = command(commands, "annotate", "pre-annotate a task or project with a model or a deployed function")
    _cvat_arguments(annotate)
    _store_argument(annotate)
    target = annotate.add_mutually_exclusive_group(required=True)
    target.add_argument("--task", type=int, help="a CVAT task id")
    target.add_argument("--project", type=int, help="every task of a CVAT project")
    model = annotate.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", help="NAME[@VERSION] in the store, an architecture, or an artifact directory")
    model.add_argument("--function-url", help="a deployed detector function, e.g. http://localhost:32001")
    annotate.add_argument("--threshold", type=float,
                          help="minimum score of every label (default: each label's served threshold)")
    annotate.add_argument("--frames", help="a range of task frames, FIRST-LAST, e.g. 0-99 (default: all)")
    annotate.add_argument("--only-unannotated", action="store_true", help="skip frames someone annotated")
    annotate.add_argument("--batch-size", type=int, default=4, help="frames per forward pass (GPU: 8-16)")
    annotate.add_argument("--upload-every", type=int, default=200, help="frames per upload (finished work is kept)")
    annotate.add_argument("--label-map", help="model=task label renames, e.g. 'automobile=car'")
    annotate.add_argument("--as", dest="annotate_as", metavar="tracks|shapes",
                          help="write tracks (objects linked across frames, keyframed where CVAT's interpolation "
                               "would miss) or per-frame shapes (default: tracks for a video task, else shapes)")
    annotate.add_argument("--device", help="cpu, cuda, cuda:1 or gpu (default: cuda when available)")
    annotate.add_argument("--no-confidence-tags", action="store_true",
                          help="do not tag each frame with the model's confidence (a tag label is added to the "
                               "project for them; `preannotate review` ranks frames by it)")

    review = command(commands, "review", "the frames of a pre-annotated task the model is least sure of, first")
    _cvat_arguments(review)
    review.add_argument("--task", type=int, required=True, help="a CVAT task pre-annotated by preannotate")
    review.add_argument("--top", type=int, default=20, help="how many frames to print (default %(default)s)")
    review.add_argument("--out", help="the whole ranking as CSV (default: review-task-N.csv)")

    train = command(commands, "train", "train a model from CVAT tasks or an exported folder and publish it")
    _cvat_arguments(train)
    _store_argument(train)
    train.add_argument("--task", type=int, action="append", default=[], help="a CVAT task (repeatable)")
    train.add_argument("--project", type=int, help="every task of a CVAT project")
    train.add_argument("--data", help="an export folder (COCO, TFRecord, or ImageNet-style for a classifier); a "
                                      "'val' split there is the validation set")
    train.add_argument("--model", required=True, help="the architecture (preannotate models architectures)")
    train.add_argument("-H", "--hyperparameters", default="", help='e.g. "num-steps=2000; batch-size=8" '
                                                                    "(key=value lines or ;/, lists)")
    train.add_argument("--help-hyperparameters", action=_HyperparameterHelp,
                       help="list every hyperparameter key, by concern, and exit")
    train.add_argument("--from-model", help="fine-tune NAME[@VERSION] from the store (init=previous)")
    train.add_argument("--name", help="the model name to publish under (default: the architecture)")
    train.add_argument("--promote", choices=("auto", "always", "never"), default="auto",
                       help="serve the new version: auto (unless it scores below the served one), always, never")
    train.add_argument("--out", help="checkpoints and logs; run again with the same --out to resume "
                                     "(default: runs/NAME)")
    train.add_argument("--restart", action="store_true", help="forget the run in --out and start over")
    train.add_argument("--device", help="cpu, cuda, cuda:1 or gpu (default: cuda when available)")

    demo = command(commands, "demo", "the whole loop on this machine: generate (or read --task), train, publish, "
                                     "serve, pre-annotate, score")
    demo.add_argument("--out", default="demo-output", help="where everything goes (default %(default)s)")
    demo.add_argument("--task", type=int, help="learn from this CVAT task instead (CVAT_URL and credentials "
                                               "from the environment)")
    demo.add_argument("--model", default="ssdlite320_mobilenet_v3_large", help="architecture (default %(default)s)")
    demo.add_argument("--steps", type=int, default=120, help="training steps (default %(default)s)")
    demo.add_argument("--restart", action="store_true", help="train anew even if --out holds a finished run")

    webhook = command(commands, "webhook", "CVAT webhooks that start training in a function")
    webhook_commands = webhook.add_subparsers(dest="webhook_command", required=True, metavar="ACTION")
    register = command(webhook_commands, "register", "send a project's (or organization's) job and task events to a "
                                                     "function's /webhook")
    _cvat_arguments(register)
    register.add_argument("--project", type=int, help="project id (default: an organization webhook, with --org)")
    register.add_argument("--url", required=True, help="the function's webhook URL, e.g. http://host:32001/webhook")
    register.add_argument("--secret", default=os.environ.get("PREANNOTATE_WEBHOOK_SECRET"),
                          help="the function's PREANNOTATE_WEBHOOK_SECRET (default: that variable)")
    register.add_argument("--no-verify-ssl", action="store_true", help="CVAT does not check the URL's certificate")

    serve = command(commands, "serve", "serve a model over HTTP with the routes of the Nuclio function")
    _store_argument(serve)
    serve.add_argument("--model", required=True, help="NAME[@VERSION] in the store, an architecture, or a path")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    serve.add_argument("--port", type=int, default=8765, help="port (default %(default)s; CVAT itself is on 8080)")
    serve.add_argument("--device", help="cpu, cuda, cuda:1 or gpu (default: cuda when available)")
    serve.add_argument("--kind", choices=("detector", "tracker", "reid"), default="detector",
                       help="what POST / answers, as the deployed function of that kind does (default %(default)s)")

    what = "put architectures' pretrained weights into torch's cache (a function image build step)"
    fetch = command(models_commands, "fetch-weights", what)
    fetch.add_argument("architectures", nargs="+", help="registry architectures")

    deploy = command(commands, "deploy", "deploy a Nuclio function serving a trained model (nuctl), or submit a "
                                         "training job to Kubernetes (--runner kubernetes)")
    _cvat_arguments(deploy)  # a project's labels are read from CVAT
    deploy.add_argument("--model", help="NAME[@VERSION] in the store (NAME follows the served version), or an "
                                        "architecture (its pretrained weights until it has a version)")
    deploy.add_argument("--kind", choices=("detector", "tracker", "reid"), default="detector",
                        help="what CVAT calls the function as: detector (default); tracker (AI Tools → Trackers "
                             "follow drawn boxes with the model) or reid (the Automatic annotation menu links a "
                             "task's boxes into tracks), each a function of its own beside the detector")
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
    return parser


def _store(args: argparse.Namespace, create: bool = False):
    from preannotate.models import open_store

    return open_store(args.store, create=create)


def cmd_models(args: argparse.Namespace) -> int:
    from preannotate.models import ARCHITECTURES, Manifest, ModelReference

    if args.models_command == "fetch-weights":
        from preannotate.deploy import fetch_weights

        for architecture in args.architectures:
            print(f"{architecture}: {fetch_weights(architecture)}")
        return 0
    if args.models_command == "architectures":
        rows = [{"name": a.name, "output": a.output, "fills": list(a.label_types), "pretrained": a.pretrained_kind,
                 "image_size": a.image_size, "description": a.description,
                 "attributes": [] if a.output == "tag" else list(LEARNED_ATTRIBUTE_TYPES)}
                for a in ARCHITECTURES.values()]
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            _table([("ARCHITECTURE", "OUTPUT", "FILLS", "DESCRIPTION")]
                   + [(row["name"], row["output"], ",".join(row["fills"]), row["description"]) for row in rows])
            print("FILLS: the CVAT label types it fills. Boxes are upright: a rotated rectangle is served as the box "
                  "around it and an ellipse label not at all; a mask model serves both in their own type (custom: "
                  "with head=mask-rcnn)")
            print("Every torch detector also learns its labels' select, radio and checkbox attributes (a classifier on "
                  "each object's crop, published with it); number and text attributes are left to people.")
        return 0
    if args.models_command == "list":
        store = _store(args)
        rows = store.describe()
        if args.json:
            print(json.dumps(rows, indent=2))
        elif not rows:
            print(f"no models in {store.root}")
        else:
            _table([("NAME", "VERSION", "ARCHITECTURE", "LABELS", "mAP@.5 / TOP-1", "CREATED")] + [
                (row["name"], f"{row['version']}{'*' if row['serving'] else ''}", row["architecture"],
                 str(row["labels"]), _score(row["metrics"]), row["created"]) for row in rows])
            print("* the version served")
        return 0
    if args.models_command == "promote":
        reference = ModelReference.parse(args.model)
        if reference.version is None or reference.path is not None:
            raise CommandError(f"give the version to serve as NAME@VERSION, not {args.model!r}")
        _store(args).promote(reference.name, reference.version)
        print(f"{reference.name}@{reference.version} is served from now on")
        return 0
    if args.models_command == "show":
        reference = ModelReference.parse(args.model)
        directory = reference.path or reference.directory(_store(args))
        print(json.dumps(Manifest.read(directory).to_dict(), indent=2))
        return 0
    if args.models_command == "create":
        from preannotate.models import (
            create_detector,
            declared_labels,
            get_architecture,
            hyperparameters_for,
            publish_detector,
        )

        arch = get_architecture(args.architecture)
        hp = hyperparameters_for(arch.name, args.hyperparameters)
        labels = declared_labels(arch.resolved(hp), args.labels) if args.labels else None  # as hp composes it
        detector = create_detector(arch.name, labels, init=args.init, hyperparameters=hp)
        store = _store(args, create=True)
        name = args.name or arch.name
        version = publish_detector(detector, store, name)
        print(f"published {name}@{version} ({args.init}, {_count(len(detector.labels), 'label')}) in {store.root}")
        return 0
    raise AssertionError(args.models_command)


def _table(rows: list[tuple[str, ...]]) -> None:
    """Columns as wide as their widest cell (the last one left ragged)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1])


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def cmd_functions(args: argparse.Namespace) -> int:
    from preannotate import functions

    if args.functions_command == "render":
        for path in functions.render_all(Path(args.out)):
            print(path)
        return 0
    directories = []
    for given in map(Path, args.directories):
        found = sorted({p.parent for p in given.rglob("function.yaml")}) if not (given / "function.yaml").exists() \
            else [given]
        if not found:
            raise CommandError(f"no function.yaml under {given}")
        directories += found
    problems = [p for directory in directories for p in functions.validate_directory(directory)]
    for problem in problems:
        print(problem, file=sys.stderr)
    print(f"{_count(len(directories), 'function directory')} checked, {_count(len(problems), 'problem')}"
          .replace("directorys", "directories"))
    return 1 if problems else 0


def cmd_export(args: argparse.Namespace) -> int:
    from preannotate.cvat.export import export
    from preannotate.formats.imagenet import UNTAGGED

    if not 0 <= args.val_fraction < 1:
        raise CommandError("--val-fraction must be at least 0 and below 1")
    with _connect(args) as client:
        summary = export(client, args.out, args.format, task=args.task, job=args.job, project=args.project,
                         val_fraction=args.val_fraction, seed=args.seed, quality=args.quality,
                         progress=sys.stderr.isatty())
    for split, frames in summary.frames.items():
        print(f"{split}: {_count(frames, 'frame')}, {_count(summary.objects.get(split, 0), 'object')}")
    if summary.skipped:
        print(f"left out ({'no class to learn' if args.format == 'imagenet' else 'a detector cannot learn them'}): "
              + ", ".join(_count(n, kind) if kind == UNTAGGED else f"{n} {kind}"  # shape types: CVAT's names
                          for kind, n in sorted(summary.skipped.items())))
    print(f"wrote {args.format} to {summary.path}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from preannotate.cvat.upload import import_file

    with _connect(args) as client:
        report = import_file(client, args.task, args.file, args.format, threshold=args.threshold,
                             label_map=args.label_map, replace=args.replace, coco_file=args.coco_file,
                             progress=sys.stderr.isatty())
    print(f"task {args.task}: {_count(report.frames, 'frame')} written, {_count(report.created, 'shape')} created, "
          f"{report.deleted} earlier auto shapes replaced" + (f", {_count(report.resumed, 'frame')} done before" if
                                                              report.resumed else ""))
    _report_unmapped(report.unmapped)
    if report.unmatched_images:
        print(f"{_count(len(report.unmatched_images), 'image')} match no frame of the task, e.g. "
              f"{', '.join(report.unmatched_images[:3])}")
    return 0


def _report_unmapped(unmapped) -> None:
    if unmapped:
        print("not in the task (left out; --label-map renames): "
              + ", ".join(f"{label} ({n})" for label, n in unmapped.most_common()))


def _frame_range(text: str | None) -> range | None:
    if not text:
        return None
    first, _, last = text.partition("-")
    if not first.strip().isdigit() or (last and not last.strip().isdigit()):
        raise CommandError(f"--frames {text!r}: give FIRST-LAST, e.g. 0-99")
    frames = range(int(first), int(last or first) + 1)
    if not frames:
        raise CommandError(f"--frames {text!r}: the last frame comes before the first")
    return frames


def cmd_annotate(args: argparse.Namespace) -> int:
    from preannotate.annotate import annotate_project, annotate_task, parse_annotate_as

    options = dict(as_tracks=parse_annotate_as(args.annotate_as), threshold=args.threshold,
                   frames=_frame_range(args.frames), only_unannotated=args.only_unannotated, batch_size=args.batch_size,
                   upload_every=args.upload_every, label_map=args.label_map, progress=sys.stderr.isatty(),
                   confidence_tags=not args.no_confidence_tags)
    source = dict(detector=args.model, store=args.store, device=args.device) if args.model else dict(
        function_url=args.function_url)
    with _connect(args) as client:
        reports = ({args.task: annotate_task(client, args.task, **source, **options)} if args.task else
                   annotate_project(client, args.project, **source, **options))
    for task_id, report in reports.items():
        print(f"task {task_id}: {_count(report.annotated, 'frame')} annotated by {report.model} {report.threshold} "
              f"({report.frames_per_second:.1f} frames/s), {_count(report.created, 'shape')} created, "
              + (f"{_count(report.tracks, 'track')} ({_count(report.keyframes, 'keyframe')}), " if report.tracks
                 else "") +
              f"{report.deleted} earlier auto shapes replaced"
              + (f", {_count(report.skipped_annotated, 'annotated frame')} left alone" if report.skipped_annotated
                 else "")
              + (f", {_count(report.resumed, 'frame')} done before" if report.resumed else ""))
        _report_unmapped(report.unmapped)
    return 0


def cmd_review(args: argparse.Namespace) -> int:
    import csv

    from preannotate.cvat.review import CONFIDENCE_LABEL, review_counts, task_confidences
    from preannotate.uncertainty import ranking

    with _connect(args) as client:
        confidences, names = task_confidences(client, args.task)
        jobs = review_counts(client, args.task) if confidences else []
    if not confidences:
        raise CommandError(f"task {args.task} has no {CONFIDENCE_LABEL} tags: pre-annotate it first "
                           f"(`preannotate annotate --task {args.task} --model NAME`, or a function with "
                           "PREANNOTATE_ANNOTATE_ON=task)")
    ranked = ranking(confidences)
    out = Path(args.out or f"review-task-{args.task}.csv")
    with open(out, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["rank", "frame", "name", "confidence"])
        writer.writerows((rank, frame, names.get(frame, ""), value) for rank, (frame, value) in enumerate(ranked, 1))
    rows = [("rank", "frame", "confidence", "name")] + [
        (str(rank), str(frame), str(value), names.get(frame, "")) for rank, (frame, value) in
        enumerate(ranked[:max(0, args.top)], 1)]
    _table(rows)
    print(f"{_count(len(ranked), 'frame')} ranked, least confident first: {out}. In CVAT, filter "
          f"attr[\"confidence\"] < 60 on label {CONFIDENCE_LABEL!r} to step through them.")
    _print_review(args.task, jobs)
    return 0


def _print_review(task: int, jobs: list) -> None:
    """What people changed on the pre-annotated frames of the jobs they started (``cvat.review.ReviewCounts``)."""
    from preannotate.cvat.review import ReviewCounts

    started = [job for job in jobs if job.started]
    print()
    if not started:
        print(f"review: no job of task {task} has been started yet; its counts come once people save in one")
        return
    rows = [("job", "state", "frames", "arrived", "kept", "moved", "deleted", "added", "edits per 100 objects")]
    for name, counts, state in [*((str(job.job), job.counts, f"{job.state}, {job.stage}") for job in started),
                                ("all", sum((job.counts for job in started), ReviewCounts()), "")]:
        per_100 = "" if counts.per_100 is None else f"{counts.per_100:.0f}"
        rows.append((name, state, str(counts.frames), str(counts.arrived), str(counts.kept), str(counts.moved),
                     str(counts.deleted), str(counts.added), per_100))
    print(f"review of task {task} so far, on the pre-annotated frames of the {_count(len(started), 'started job')} "
          "(drawing every object from scratch is 100 edits per 100 objects):")
    _table(rows)
    notes = []
    if any(job.state != "completed" for job in started):
        notes.append("frames of a job still in progress count as kept until someone changes them")
    total = sum((job.counts for job in started), ReviewCounts())
    if total.uncounted:
        notes.append(f"{_count(total.uncounted, 'frame')} pre-annotated before this version recorded what arrived: "
                     "left out")
    if total.foreign:
        notes.append(f"{_count(total.foreign, 'auto shape')} beyond what arrived (another writer, such as CVAT's "
                     "Automatic annotation): left out")
    notes.append("a relabelled shape stays auto in CVAT and counts as kept")
    print("; ".join(notes) + ".")


def _score(metrics: dict) -> str:
    """A version's validation in the models table: a detector's mAP@.5, a classifier's top-1 accuracy."""
    value = metrics.get("top1") if "top1" in metrics else metrics.get("map50")
    return "" if value is None else f"{value:.3f}"


def cmd_train(args: argparse.Namespace) -> int:
    from preannotate.models import get_architecture, hyperparameters_for
    from preannotate.training.evaluation import summary
    from preannotate.training.recipe import NothingFinished, train_model
    from preannotate.training.runs import RunMismatch, TrainingInterrupted

    arch = get_architecture(args.model)  # an unknown name fails before anything is downloaded
    if bool(args.data) == bool(args.task or args.project):
        raise CommandError("learn from CVAT (--task/--project) or from an export folder (--data), one of them")
    hp = hyperparameters_for(arch.name, args.hyperparameters)  # the one parse
    name = args.name or arch.name
    out = Path(args.out or Path("runs") / name)
    try:
        result = train_model(arch.name, hp, store=_store(args, create=True), name=name, output_dir=out,
                             data=Path(args.data) if args.data else None,
                             request={"tasks": args.task, "project": args.project}, connect=lambda: _connect(args),
                             from_model=args.from_model, promote=args.promote, device=args.device,
                             restart=args.restart, announce=lambda text: print(text, flush=True))
    except NothingFinished as nothing:
        raise CommandError(str(nothing)) from None
    except TrainingInterrupted as stopped:
        print(f"preannotate: {stopped}", file=sys.stderr)
        return 130
    except RunMismatch as error:
        raise CommandError(f"{error}: use --restart to start it over, or another --out") from None
    print(f"published {name}@{result.version} after {result.steps} steps ({result.stopped}): "
          f"{summary(result.metrics, 'none (not validated)')}; {result.promotion}")
    if result.report:
        print(f"training report: {', '.join(str(path) for path in result.report)} (copied into {result.path})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from preannotate.demo import run_demo
    from preannotate.training.runs import RunMismatch

    try:
        run_demo(args.out, architecture=args.model, steps=args.steps, task=args.task, restart=args.restart)
    except RunMismatch as error:
        raise CommandError(f"{error}: run `preannotate demo --restart` (make demo RESTART=1), or give another "
                           "--out") from None
    return 0


def cmd_webhook(args: argparse.Namespace) -> int:
    from preannotate.cvat import webhooks

    if not args.secret:
        raise CommandError("give --secret (or set PREANNOTATE_WEBHOOK_SECRET): the function refuses unsigned "
                           "deliveries")
    with _connect(args) as client:
        created = webhooks.register(client, url=args.url, secret=args.secret, project_id=args.project,
                                    organization=args.org, verify_ssl=not args.no_verify_ssl)
    print(f"webhook {created['id']} sends {', '.join(created['events'])} to {created['target_url']}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import signal

    from preannotate.serving.core import App
    from preannotate.serving.http import make_server
    from preannotate.serving.training import TrainingRoutes

    try:  # the port first: a busy one fails at once, not after loading a model
        server = make_server(None, args.host, args.port)
    except OSError as error:
        raise CommandError(f"cannot listen on {args.host}:{args.port} ({error.strerror or error}); "
                           "choose another --port") from None
    try:
        # Configured as a function is (its environment, the command's options on top): a name with no version is
        # served once trained only when something trains it (PREANNOTATE_TRAIN_PROJECT, ...), else it is a mistake.
        env = {**os.environ, "PREANNOTATE_MODEL": args.model, "PREANNOTATE_MODEL_STORE": str(_store(args).root),
               **({"PREANNOTATE_DEVICE": args.device} if args.device else {}), "PREANNOTATE_FUNCTION_KIND": args.kind}
        app = App.from_environment(env)
        if not app.provider.untrained():
            app.provider.current()  # load now: fail before serving if the model cannot be served
    except BaseException:
        server.server_close()
        raise
    # POST /train, /jobs, /webhook (jobs train in a process): a detector's, as in the function
    training = TrainingRoutes.attach(app, environ=env) if args.kind == "detector" else None
    url = f"http://{args.host}:{server.server_address[1]}/"
    if app.provider.untrained():  # as the function: it starts, trains, and answers 503 until then
        print(f"{args.model} is not trained yet: POST / answers 503 until its first version "
              f"({app.provider.how_to_train})", flush=True)
    server.app = app
    body = {"detector": '{"image": base64}', "tracker": '{"image", "shapes", "states"} as CVAT\'s trackers',
            "reid": '{"image0", "image1", "boxes0", "boxes1"} as CVAT\'s reid'}[args.kind]
    print(f"serving {args.model} as a {args.kind} on {url} (POST / with {body}; GET /health, /models)", flush=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop as on Ctrl-C: what it started stops too
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        if training is not None:
            _stop_jobs(training.runner)
    return 0


def _stop_jobs(runner) -> None:
    """Stop the job the server's runner trains, if any: it checkpoints and stops (Ctrl-C again: at once), and the
    next `preannotate serve` on the store resumes it."""
    if runner.running_job:
        print(f"stopping job {runner.running_job}: it saves a checkpoint, and the next `preannotate serve` on this "
              "store resumes it (Ctrl-C again stops it at once)", file=sys.stderr, flush=True)
    try:
        runner.stop()
    except KeyboardInterrupt:
        runner.kill()
        runner.stop()


def cmd_deploy(args: argparse.Namespace) -> int:
    from preannotate import deploy

    if args.runner == "kubernetes":
        missing = [flag for flag, value in (("--job", args.job), ("--image", args.image),
                                            ("--store-claim", args.store_claim)) if not value]
        if missing:
            raise CommandError(f"--runner kubernetes needs {', '.join(missing)}")
        manifest = deploy.render_training_job(args.job, args.image, args.store_claim, gpu=args.gpu,
                                              secret=args.secret, namespace=args.namespace)
        deploy.submit_kubernetes_job(manifest, dry_run=args.dry_run)
        if not args.dry_run:
            print(f"submitted; follow it with: kubectl logs -f job/{manifest['metadata']['name']}")
        return 0
    if not args.model:
        raise CommandError("say which model to deploy: --model NAME[@VERSION]")
    deploy.deploy_model(args.model, store=args.store, train_project=args.train_project, architecture=args.arch,
                        cron=args.cron, annotate_on=args.annotate_on,
                        reannotate_unreviewed=args.reannotate_unreviewed, gpu=args.gpu, platform=args.platform,
                        namespace=args.namespace, registry=args.registry, base_image=args.base_image,
                        store_claim=args.store_claim, out_dir=args.out, dry_run=args.dry_run,
                        connect=lambda: _connect(args), kind=args.kind)
    return 0


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not verbose:  # urllib3 warns at every retry of a connection; our error says once what went wrong
        logging.getLogger("urllib3").setLevel(logging.ERROR)


COMMANDS = {"models": cmd_models, "functions": cmd_functions, "serve": cmd_serve, "export": cmd_export,
            "webhook": cmd_webhook, "import": cmd_import, "annotate": cmd_annotate,
            "train": cmd_train, "review": cmd_review, "demo": cmd_demo, "deploy": cmd_deploy}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(getattr(args, "verbose", False))
    from preannotate.cvat.client import CvatError
    from preannotate.hyperparameters import HyperparameterError
    from preannotate.models import ModelNotFound
    from preannotate.models.registry import UnknownArchitecture
    from preannotate.serving.core import ModelUnavailable

    try:
        if getattr(args, "device", None):  # every command that runs a model on a --device
            from preannotate.devices import checked

            args.device = checked(args.device)
        return COMMANDS[args.command](args)
    # RuntimeError covers e.g. pretrained weights that are not on disk
    except (CommandError, CvatError, ModelNotFound, UnknownArchitecture, ModelUnavailable, HyperparameterError,
            ValueError, OSError, RuntimeError) as error:
        print(f"preannotate: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
